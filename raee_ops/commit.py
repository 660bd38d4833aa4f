"""Run-private staging and all-or-nothing publishing, safe against kills and concurrent runs, for local paths and
object stores alike (every location goes through raee_ops.storage).

A run claims the place it writes (an output folder, a table's work folder, its export staging folder):

- locally, with an exclusive `flock` on that directory: the kernel drops the lock when the process dies, however
  it dies, so a killed run never blocks the next one, and a second live run is refused (`Busy`, exit 75);
- on an object store (no locks there), with a claim object `_CLAIM-<run id>` in that place that the run rewrites
  every HEARTBEAT_S seconds. A run that finds another run's claim updated in the last STALE_S seconds is refused
  (`Busy`, exit 75); older claims are a killed run's and are removed. Two runs that start together may both be
  refused (each sees the other's claim: a retry sorts it out) but never both proceed, given the store's
  read-after-write consistency (S3 and GCS have it). A run killed on an object store blocks its place for up to
  STALE_S seconds; deleting its `_CLAIM-*` object releases it at once. A live run whose claim went about that long
  without renewal (the store unreachable, the driver stalled) may have lost the place, and publishes nothing
  (`check_held`).

Under the claim, a run stages everything in `_temporary/<run id>/` (readers such as pyarrow datasets skip
`_`-prefixed names), publishes by moving staged files into place, and writes the `_SUCCESS` marker last.
Whatever an earlier killed run left (staging, published files without a marker) is removed by the next run that
claims the place, which names what it removed.
"""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

from apache_beam.io.filesystem import FileMetadata

from raee_ops import logs, storage
from raee_ops.errors import Busy, RaeeConfigError, first_line
from raee_ops.faults import fault_point

TEMPORARY = "_temporary"
SUCCESS = "_SUCCESS"
#: A run is moving files into this folder: written before the first move, removed once it is complete. In an output
#: folder it lists the names being moved; in an object-store export's --out (export._publish_remote) it marks an
#: export's folder, even without a manifest.
PUBLISHING = "_PUBLISHING"
#: What export-onnx writes to `_PUBLISHING` in an object-store --out while it copies an export's files in.
EXPORT_MARK = b"export-onnx is publishing here\n"
CLAIM = "_CLAIM-"
#: How the file names Beam's writers give their shards end (`predictions-00000-of-00001.parquet`), as a regex.
SHARD_ENDING = r"-\d+-of-\d+\.parquet"
#: How often a run on an object store rewrites its claim, and after how long without it a claim is a dead run's.
HEARTBEAT_S, STALE_S = 60.0, 600.0

log = logging.getLogger(__name__)


_run_ids = itertools.count()


def new_run_id() -> str:
    """Sortable and unique across hosts, processes and the calls of one process (two claims one process makes
    within a second must not share a name: the second would overwrite the first's claim and not see it)."""
    return time.strftime("%Y%m%dT%H%M%S") + f"-{socket.gethostname()}-{os.getpid()}-{next(_run_ids):06d}"


_RUN_ID = re.compile(r"\d{8}T\d{6}-.+-\d+-\d{6}")


def some(names: Sequence[str], shown: int = 3) -> str:
    """The first few of `names` for a one-line message, '…' standing for the rest."""
    return ", ".join(names[:shown]) + (" …" if len(names) > shown else "")


def unseen_staging(rows_in: int, staged: int, where: str) -> str:
    """What a count of nothing staged most likely means (workers on other machines wrote to their own disks), to add
    to the count's refusal."""
    if rows_in and not staged:
        return f" (no staged file is visible here: workers on other machines need {where} where this one sees it too)"
    return ""


def say(message: str) -> None:
    if not logs.quiet():
        print(message, file=logs.stream(), flush=True)


@contextmanager
def locked(directory: str, what: str, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on a local `directory` (created if missing) for the block; refuse if another run
    holds it, or with `wait`, wait for it (for short critical sections)."""
    directory = storage.local_path(str(directory))
    storage.mkdirs(directory)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise Busy(f"another run is writing {what} ({directory}); retry when it has finished") from exc
            raise
        yield
    finally:
        os.close(fd)  # releases the lock


def _claims(place: str) -> list[Any]:
    return storage.match_metadata(storage.join(place, CLAIM + "*"))


#: The heartbeat's clock, which goes on while the machine sleeps (CLOCK_BOOTTIME; a laptop's suspend): other runs
#: judge a claim by the store's clock, and CLOCK_MONOTONIC, which stops then, hid such a lapse from the run itself.
_CLOCK = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


def _now() -> float:
    return time.clock_gettime(_CLOCK)


class _Beat:
    """Renews one object-store claim every HEARTBEAT_S seconds while the run lives, and knows whether it lapsed: a
    claim not renewed for STALE_S seconds (the store unreachable, the driver stalled) is another run's to take, which
    then writes the same place; this run must not write there any more (`check`)."""

    #: Renewals further apart than this (a beat's margin under STALE_S) count as lapsed.
    LAPSE_S = STALE_S - HEARTBEAT_S

    def __init__(self, claim: str) -> None:
        self.claim, self.renewed, self.lapsed = claim, _now(), False
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            if self.gone():  # renewing now would put back a claim the run that took the place over removed
                self.lapsed = True
                return
            try:
                storage.write_bytes(self.claim, json.dumps({"run": self.claim, "time": time.time()}).encode())
            except Exception as exc:  # a missed beat only shortens the claim; the run goes on until `check`
                log.warning("could not renew the claim %s: %s", self.claim, first_line(exc))
                log.debug("renewing the claim %s failed", self.claim, exc_info=True)
                continue
            now = _now()
            self.lapsed = now - self.renewed >= self.LAPSE_S  # a renewal that took that long to land
            self.renewed = now

    def gone(self) -> bool:
        """Whether the claim lapsed: another run may hold the place now."""
        return self.lapsed or _now() - self.renewed >= self.LAPSE_S

    def check(self) -> None:
        if self.gone():
            raise Busy(
                f"this run's claim on {storage.parent(self.claim)} went {self.LAPSE_S:.0f} s or more without "
                "renewal, so another run may have taken it over; nothing more is written (retry)"
            )

    def end(self) -> None:
        self.stop.set()
        self.thread.join()


#: The object-store places this process holds, by place: their claims' heartbeats.
_held: dict[str, _Beat] = {}


#: Set by `note_interrupt` once a Ctrl-C reached this process.
_interrupted = threading.Event()


def note_interrupt(signum: int, frame: object) -> None:
    """SIGINT's handler while a command runs: Python's own (KeyboardInterrupt), remembered. Where the exception lands
    in a library that cannot pass it on (LanceDB's client, opening a table, printed it as "Exception ignored" and
    went on), the run went on to publish with exit 0; `check_held` raises it again before anything is written."""
    _interrupted.set()
    signal.default_int_handler(signum, frame)


@contextmanager
def interrupts_noted() -> Iterator[None]:
    """A command's run: SIGINT handled by `note_interrupt` where Python's own handler was in place (in the main
    thread; an ignored SIGINT, as in a `cmd &` job, stays ignored)."""
    replace = (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    )
    if replace:
        signal.signal(signal.SIGINT, note_interrupt)
        printing = sys.unraisablehook
        sys.unraisablehook = _unraisable(printing)
    try:
        yield
    finally:
        if replace:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            sys.unraisablehook = printing
            _interrupted.clear()


def _unraisable(printing: Callable[[Any], None]) -> Callable[[Any], None]:
    """Python's hook for an exception it could not raise, but for a swallowed Ctrl-C's, which goes to the log (-v):
    its "Exception ignored ... KeyboardInterrupt" traceback stood above the run's one `error: interrupted` line."""

    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            log.debug("a library swallowed the interrupt in %r", unraisable.object)
        else:
            printing(unraisable)

    return hook


def lapsed(place: str) -> bool:
    """Whether this run's claim on an object-store place lapsed (a local lock cannot): what it staged there may be
    another run's to remove by now, and what is there another run's."""
    beat = _held.get(place)
    return beat is not None and beat.gone()


def check_held(place: str) -> None:
    """Before writing what others must not overwrite (publishing an output, committing a table): stop a run whose
    Ctrl-C a library swallowed (`note_interrupt`); refuse (Busy) where this run's claim on an object-store place
    lapsed; a local lock cannot lapse."""
    if _interrupted.is_set():
        raise KeyboardInterrupt
    beat = _held.get(place)
    if beat is not None:
        beat.check()


@contextmanager
def claimed(place: str, what: str) -> Iterator[None]:
    """Hold an object-store place through a claim object renewed while the run lives (see the module doc)."""
    mine = storage.join(place, CLAIM + new_run_id())
    storage.write_bytes(mine, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode())
    claims = _claims(place)
    now = max((c.last_updated_in_seconds for c in claims if c.path == mine), default=time.time())
    others = [c for c in claims if c.path != mine]
    live = [c.path for c in others if now - c.last_updated_in_seconds < STALE_S]
    if live:
        storage.delete([mine])
        raise Busy(
            f"another run is writing {what} ({place}; its claim {storage.name(live[0])} was renewed less than "
            f"{STALE_S:.0f} s ago); retry when it has finished (a killed run's claim lapses {STALE_S:.0f} s after its "
            "last renewal; deleting it releases the place now, if no run is alive to renew it)"
        )
    remove_leftovers([c.path for c in others], place)
    _held[place] = _Beat(mine)
    try:
        yield
    finally:
        _release(place)


def _release(place: str) -> None:
    """Stop renewing this process's claim on a place and delete it (nothing where it was released already)."""
    beat = _held.pop(place, None)
    if beat is not None:
        beat.end()
        storage.delete([beat.claim])


def end_terminated() -> None:
    """End as a SIGTERM ends a process (status -15, nothing else cleaned up: a scheduler's SIGKILL may follow soon),
    once every object-store claim this process holds is given up: a scheduler's retry was refused with exit 75 until
    the claim lapsed (STALE_S), where after a Ctrl-C, whose unwinding releases it, it ran at once. What the run
    staged stays for the next run to remove. Only where this process writes nothing more to the claimed places (its
    job cancelled, or `released_on_sigterm`): a retry must not start while a dying run's writes may still land."""
    for place in list(_held):
        _release(place)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


@contextmanager
def released_on_sigterm() -> Iterator[None]:
    """A block where the driver holds its claims but only reads and computes (build-db's fit, minutes on a large
    table): a scheduler's SIGTERM there gives them up before the process ends (`end_terminated`), where it used to
    leave them for STALE_S, as a kill does. Elsewhere outside a job (the driver publishing or committing) a SIGTERM
    still leaves them. Only Python's own handling is replaced, in the main thread (as the job's is)."""
    main = threading.current_thread() is threading.main_thread()
    replace = main and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    if replace:
        signal.signal(signal.SIGTERM, lambda signum, frame: end_terminated())
    try:
        yield
    finally:
        if replace:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def export_publishing(folder: str) -> bool:
    """Whether an object-store folder holds export-onnx's mark of a publish, under way or stopped midway (not
    classify's `_PUBLISHING`, a list of its names)."""
    mark = storage.join(folder, PUBLISHING)
    return storage.exists(mark) and storage.read_bytes(mark) == EXPORT_MARK


def live_claim(place: str) -> str | None:
    """The name of a claim on an object-store place renewed in the last STALE_S seconds by this machine's clock, or
    None: a reader's guess whether a run is writing there (taking a claim to judge by the store's clock would write
    to a place the reader must not touch), for what to tell it, never to exclude a writer."""
    now = time.time()
    return next((storage.name(c.path) for c in _claims(place) if now - c.last_updated_in_seconds < STALE_S), None)


def check_unclaimed(place: str, what: str) -> None:
    """Before long work whose place is claimed only at its end (evaluate's report): refuse at once where a live
    run's claim on an object store would refuse it then (within a killed run's claim's lapse, say), not after the
    work; a claim taken and let go at once, so the store's clock judges, as then. A local place is locked then,
    waiting for the other run: nothing to tell."""
    if not storage.is_local(place):
        with claimed(place, what):
            pass


@contextmanager
def hold(place: str, what: str, wait: bool = False) -> Iterator[None]:
    """This run's exclusive claim on a place: a local lock, or an object-store claim."""
    if storage.is_local(place):
        with locked(place, what, wait):
            yield
    else:
        with claimed(place, what):
            yield


def is_held(place: str) -> bool:
    """Whether a live run holds a place (a killed run's never does)."""
    try:
        with hold(place, "a temporary folder"):
            return False
    except Busy:
        return True


def remove_leftovers(paths: Sequence[str], where: str) -> None:
    """Delete `paths` in their order (a run killed midway leaves the rest for the next)."""
    if not paths:
        return
    for path in paths:
        try:
            storage.delete([path])
        except PermissionError as exc:  # another user's run's, say: the bare file name said neither where nor whose
            raise RaeeConfigError(
                f"cannot remove what an earlier, unfinished run left in {where}: {exc.strerror}: {exc.filename} "
                "(remove it as its owner, then run again)"
            ) from exc
        fault_point("leftovers")
    names = ", ".join(sorted(storage.name(p) for p in paths))
    say(f"removed what an earlier, unfinished run left in {where}: {names}")


@dataclass(frozen=True)
class OutputClaim:
    """A claimed output folder: stage into `staging`, then `publish`; or, with `done`, the `_SUCCESS` marker of this
    very job, which another run of it published while this one waited for the claim (nothing staged)."""

    folder: str
    staging: str
    patterns: tuple[str, ...]
    done: dict[str, Any] | None = None

    def publish(self, marker: dict[str, Any]) -> list[str]:
        """Move the staged files matching `patterns` into the folder (pattern by pattern), then write `_SUCCESS`
        with `marker` and the published file names; returns the published paths. The names are written to
        `_PUBLISHING` first: a run killed midway leaves the next run a list of exactly what it may remove."""
        staged = {pattern: storage.match(self.staging_of(pattern)) for pattern in self.patterns}
        names = [storage.name(s) for files in staged.values() for s in files]
        check_held(self.folder)
        storage.write_bytes(storage.join(self.folder, PUBLISHING), json.dumps(names).encode())
        published = []
        for pattern, files in staged.items():
            moves = [(s, storage.join(self.folder, storage.name(s))) for s in files]
            check_held(self.folder)  # each move a store's copies long: no file of a run that lost its place
            try:
                storage.rename(moves)
            except Exception:
                check_held(self.folder)  # the run that took the place over removed them: its place, not a failure
                raise
            published += [target for _, target in moves]
            fault_point(f"publish:{pattern}")
        marker = marker | {"files": names}
        check_held(self.folder)
        storage.write_bytes(storage.join(self.folder, SUCCESS), json.dumps(marker, indent=1, sort_keys=True).encode())
        fault_point(f"publish:{SUCCESS}")
        storage.delete([storage.join(self.folder, PUBLISHING)])
        return published

    def staging_of(self, pattern: str) -> str:
        return storage.join(self.staging, pattern)


class Job(NamedTuple):
    """What one job is (`job_of`): its digest, which a complete output or table version records, and the settings
    and inputs it was taken from, which a complete output's marker keeps so that a refusal can name what differs."""

    digest: str
    settings: dict[str, Any]
    inputs: list[list[Any]]
    #: Each input file as the run reads it (its path as matched) -> its content digest, which the workers check
    #: the file still holds (inputs.read_validated_file).
    contents: dict[str, str]

    def differences(self, marker: dict[str, Any]) -> str:
        """What the job of a complete output's `marker` had otherwise than this one, for its refusal ('' where the
        marker does not say: another tool's; an earlier release's, which names its job otherwise, said so)."""
        settings, inputs = marker.get("settings"), marker.get("inputs")
        if not isinstance(settings, dict) or not isinstance(inputs, list):
            earlier = " of a job an earlier raee-ops recorded without its settings (that release's rerun of it is done)"
            return earlier if "job" in marker else ""
        ours, theirs = ({str(i[0]): i for i in rows if isinstance(i, list) and i} for rows in (self.inputs, inputs))
        said = [
            f"its {_setting(key)} was {_value(settings.get(key))}, this run's {_value(value)}"
            for key, value in self.settings.items()
            if settings.get(key) != value
        ]
        for what, paths in (
            ("not among its inputs", sorted(ours.keys() - theirs.keys())),
            ("its inputs, not this run's", sorted(theirs.keys() - ours.keys())),
            ("changed since", sorted(p for p in ours.keys() & theirs.keys() if ours[p] != theirs[p])),
        ):
            if paths:
                said.append(f"{some([_value(p) for p in paths])}: {what}")
        return f" of another job ({'; '.join(said)})" if said else ""


def _setting(key: str) -> str:
    """A job setting as the user gave it: its option."""
    return "artifacts' fingerprint" if key == "fingerprint" else f"--{key.replace('_', '-')}"


def _value(value: Any) -> str:
    """A job setting's or input's value for a one-line refusal: none given (the table's) said so, long ones cut."""
    shown = "not given" if value is None else str(value)
    return shown if len(shown) <= 120 else shown[:117] + "..."


def job_of(settings: dict[str, Any], files: Sequence[FileMetadata]) -> Job:
    """What one job is (settings and input files, each by path with its links resolved, size and content): a
    complete output or table version that names the same job is this job's, done. By content
    (storage.content_digest), not modification time: the same rows copied again (a scheduler's retry that fetches
    its input anew) are the same job, done, and other rows in the file's place are another, however their time or
    Parquet footer were kept (`cp -p`, an edit in place that keeps every size and minimum and maximum)."""
    contents = {m.path: storage.content_digest(m.path) for m in files}
    # sizes once hashed, not as listed: a file replaced in between was recorded with the old one's size and the new
    # one's content, and the same job run again on it was another
    inputs = sorted([storage.resolved(m.path), storage.size(m.path), contents[m.path]] for m in files)
    digest = hashlib.sha256(json.dumps([settings, inputs], sort_keys=True, default=str).encode()).hexdigest()
    return Job(digest, settings, inputs, contents)


def read_marker(folder: str) -> dict[str, Any] | None:
    """A folder's `_SUCCESS` marker as raee-ops writes it (JSON), {} for another tool's (Spark's and Hadoop's are
    empty files), None where there is none."""
    marker = storage.join(str(folder), SUCCESS)
    if not storage.exists(marker):
        return None
    try:
        found = json.loads(storage.read_bytes(marker))
    except (OSError, ValueError):  # not JSON, not UTF-8, not a file
        return {}
    return found if isinstance(found, dict) else {}


def completed(folder: str, job: Job) -> dict[str, Any] | None:
    """The `_SUCCESS` marker of a folder holding this very job's complete output (a retry of a run killed after it
    finished, or run twice by a scheduler), else None."""
    found = read_marker(folder)
    if found is None or found.get("job") != job.digest:
        return None
    _tidy(str(folder))
    return found


def _tidy(folder: str) -> None:
    """What a run killed just after writing `_SUCCESS` left beside it (its publishing list, its staging folder),
    removed under the folder's claim; left to a later retry while another run holds the folder."""
    leftovers = [storage.join(folder, n) for n in storage.children(folder) if n in (PUBLISHING, TEMPORARY)]
    if not leftovers:
        return
    try:
        with hold(folder, "the output folder"):
            remove_leftovers(leftovers, folder)
    except Busy:
        pass


@contextmanager
def claim_output(
    folder: str, patterns: Sequence[str], what: str, job: Job | None = None, refused: Sequence[str] = ()
) -> Iterator[OutputClaim]:
    """Claim an output folder for one run: refuse a folder that holds a complete output (`_SUCCESS`), files matching
    `patterns` or `refused` that no unfinished run left, or is being written by a live run; remove an unfinished
    run's leftovers; on exit remove this run's staging. A complete
    output of this very `job`, published by another run while this one waited for the claim, is yielded as `done`
    (its twin started together is not refused for it: a scheduler reads 2 as a mistake to mend)."""
    folder = str(folder)
    storage.check_folder(folder, what)
    with hold(folder, what):
        found = read_marker(folder)
        if found is not None and job is not None and found.get("job") == job.digest:
            yield OutputClaim(folder, "", tuple(patterns), done=found)
            return
        if found is not None:
            why = job.differences(found) if job is not None else ""
            raise RaeeConfigError(
                f"{folder} already holds a complete output ({SUCCESS} present){why}; choose another {what} or delete it"
            )
        names = [n for n in storage.children(folder) if not n.startswith(CLAIM)]
        ours = set(json.loads(storage.read_bytes(storage.join(folder, PUBLISHING)))) if PUBLISHING in names else set()
        foreign = [
            n
            for n in names
            if n not in ours
            and any(fnmatch.fnmatchcase(n, p) for p in (*patterns, *refused))
            and not storage.empty_folder(storage.join(folder, n))  # no reader takes one (a volume's lost+found)
        ]
        if foreign:  # another command's files (build-db's errors?) would be mixed into this output, or removed
            raise RaeeConfigError(
                f"{folder} holds {some(foreign)}, which no run of this command left unfinished there (a reader of "
                f"the folder would take them with this run's outputs); choose another {what}"
            )
        # the list last: a run killed while removing leaves the next run the list of what is still to remove
        stale = sorted((n for n in names if n in ours or n in (TEMPORARY, PUBLISHING)), key=lambda n: n == PUBLISHING)
        remove_leftovers([storage.join(folder, n) for n in stale], folder)
        staging = storage.join(folder, TEMPORARY, new_run_id())
        storage.mkdirs(staging)
        try:
            yield OutputClaim(folder, staging, tuple(patterns))
        finally:
            if not lapsed(folder):  # else another run's staging may be there now: the next run removes ours
                storage.delete([storage.join(folder, TEMPORARY)])


@contextmanager
def claim_work_dir(work: str, what: str, run_id: str) -> Iterator[str]:
    """Claim a work folder that several runs share over time (a table's); yield this run's private staging
    folder inside it, named by its `run_id`, removing earlier runs' staging first (`_`-prefixed names are the
    folder's own: claims, notes its runs keep)."""
    with hold(work, what):
        stale = [storage.join(work, n) for n in storage.children(work) if not n.startswith("_")]
        remove_leftovers(stale, work)
        staging = storage.join(work, run_id)
        storage.mkdirs(staging)
        try:
            yield staging
        finally:
            storage.delete([staging])


def run_named(folder: str, prefix: str) -> list[str]:
    """The names in `folder` that a run made: `prefix` then a run id. A user's folder of a like name
    (`.out.old-backup`) is never taken for a killed run's."""
    return [n for n in storage.children(folder, f"{prefix}*") if _RUN_ID.fullmatch(n[len(prefix) :])]


def reclaim_siblings(folder: str, prefix: str) -> None:
    """Remove the folders in `folder` that a run named `prefix` + its run id and that no live run holds (a killed
    export's temporary folder): each run holds its own temporary folder for as long as it lives."""
    for name in run_named(folder, prefix):
        path = storage.join(folder, name)
        if not is_held(path):
            storage.delete([path])
            say(f"removed what an earlier, unfinished run left: {path}")


@contextmanager
def scratch_folder(kind: str) -> Iterator[str]:
    """A private folder on this machine's temporary disk for the block, removed after it. Held while the run lives:
    the folders killed runs left (a model's worth of segments, for an export) are removed by the next run's."""
    root = tempfile.gettempdir()
    scratch = os.path.join(root, f"raee-{kind}-{new_run_id()}")
    with ExitStack() as held:
        with locked(root, "the temporary folder", wait=True):  # no run reclaims a folder made but not yet held
            reclaim_siblings(root, f"raee-{kind}-")
            held.enter_context(locked(scratch, f"a {kind} folder"))
        try:
            yield scratch
        finally:
            shutil.rmtree(scratch, ignore_errors=True)  # while held: another run's reclaim leaves it alone
