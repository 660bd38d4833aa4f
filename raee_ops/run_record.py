"""What an exit-table version records about the build-db run that wrote it, and the errors folder kept in step.

A run's rejected rows are staged in its errors folder itself (`_staging/<scope>/<run id>/`, the scope naming the
database and table: publishing is then a rename on one filesystem, wherever `--errors` is, and runs on other
databases sharing the folder never touch it) and published there only after the run's table version is committed.
That version records the run (`RUN_META_KEY`): its id, its mode, its job (settings and input files, as classify
names its own) and its rejected rows' count, so a retried append whose version is committed already is recognised as
done, not refused, and held to its own --max-rejected. The table's next run, under the table's claim, settles what a
killed run left: a committed run's staged errors are published (whether its version is current or a rollback left it
in the history), any other run's staging removed. Each version also records its lineage, the runs whose rows it
holds (an overwrite's own; an append's base's and its own), and the table's own errors folder is kept in step with
the current version's: the files of runs it does not hold (an overwrite replaced them, a rollback went back before
them) wait in `_replaced/` until a rollback brings their rows back, or prune removes the last version that holds
them. So the errors folder, read as a dataset (`_`-prefixed names are skipped), holds each rejected row of the runs
whose rows the table holds, once. A run refused for rejecting too many rows keeps its rejected rows in
`_uncommitted/<scope>/<run id>/` (named in its error line) until the table's next run. Until a run has published its
rows, the table's work folder names its errors folder (`NOTE`): a next run given another --errors settles that
folder first, so a retry's new --errors never strands them.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import pyarrow as pa

from raee_ops import storage
from raee_ops.commit import SHARD_ENDING, remove_leftovers, say
from raee_ops.schemas.tables import LINEAGE_JOBS_META_KEY, LINEAGE_META_KEY, RUN_META_KEY, known_fields

STAGING, UNCOMMITTED, REPLACED = "_staging", "_uncommitted", "_replaced"
#: Runs a version's `jobs` records: a killed append's retry comes within its scheduler's retries, not this many
#: appends later, and the schema's metadata, copied into every search's result, must not grow with the table's age.
JOBS_KEPT = 64
#: In the table's work folder, from before a run stages rejected rows until it has published them: its errors folder.
NOTE = "_ERRORS"
#: A published error file's name: `errors-<run id>` and Beam's shard template.
_SHARD = re.compile(rf"errors-(.+){SHARD_ENDING}")
#: The database's folder of its tables' default errors folders.
ERRORS_FOLDER = "_errors"


@dataclass(frozen=True)
class RunRecord:
    """`rejected`: the rows the run rejected, which a retry of its job answers for against its own --max-rejected
    (None: a version recorded before they were counted). `lineage`: the runs whose rows the version holds, oldest
    first, this one last (None: a version recorded before it was, or an append onto one). `jobs`: the records of
    the lineage's newest JOBS_KEPT runs (`mode`, `job`, `rejected`) by run id, oldest first, this one's last."""

    run_id: str
    mode: str
    job: str
    rejected: int | None = None
    lineage: list[str] | None = None
    jobs: dict[str, dict[str, Any]] | None = None

    @classmethod
    def new(cls, run_id: str, mode: str, job: str, rejected: int, base: pa.Schema | None) -> RunRecord:
        """This run's record; `base`: the schema of the version an append adds to (None: the table's first run),
        whose lineage this one's continues."""
        record = cls(run_id, mode, job, rejected)
        if mode == "overwrite" or base is None:
            return replace(record, lineage=[run_id], jobs=record.entry())
        before = cls.of(base)
        if before is None:
            return replace(record, jobs=record.entry())
        jobs = list(((before.jobs if before.jobs is not None else before.entry()) | record.entry()).items())
        lineage = None if before.holds is None else [*before.holds, run_id]
        return replace(record, lineage=lineage, jobs=dict(jobs[-JOBS_KEPT:]))

    def entry(self) -> dict[str, dict[str, Any]]:
        """This run in a version's `jobs`."""
        return {self.run_id: {"mode": self.mode, "job": self.job, "rejected": self.rejected}}

    def run_of(self, job: str) -> RunRecord | None:
        """The run of `job` whose rows this version holds, as recorded: its own, or one of its lineage's newest
        (an append killed after its commit, then appended onto; its own version may be pruned since). None: none
        recorded."""
        if self.job == job:
            return self
        for run_id, entry in (self.jobs or {}).items():
            if entry.get("job") == job:
                return RunRecord(**known_fields(RunRecord, {**entry, "run_id": run_id}))
        return None

    @property
    def holds(self) -> list[str] | None:
        """The runs whose rows the version holds: its lineage; for an overwrite recorded before lineages were, itself
        alone; else (such an append) not known."""
        return self.lineage if self.lineage is not None or self.mode != "overwrite" else [self.run_id]

    def metadata(self) -> dict[bytes, bytes]:
        record = {name: value for name, value in asdict(self).items() if name not in ("lineage", "jobs")}
        lineage = {} if self.lineage is None else {LINEAGE_META_KEY: json.dumps(self.lineage).encode()}
        jobs = {} if self.jobs is None else {LINEAGE_JOBS_META_KEY: json.dumps(self.jobs).encode()}
        return {RUN_META_KEY: json.dumps(record).encode(), **lineage, **jobs}

    @classmethod
    def of(cls, schema: pa.Schema) -> RunRecord | None:
        """None: a table built before runs were recorded. Fields a later release added are passed by."""
        metadata = schema.metadata or {}
        raw, lineage, jobs = (metadata.get(key) for key in (RUN_META_KEY, LINEAGE_META_KEY, LINEAGE_JOBS_META_KEY))
        if raw is None:
            return None
        record = known_fields(cls, json.loads(raw))
        return cls(**{**record, "lineage": _loaded(lineage), "jobs": _loaded(jobs)})


def _loaded(raw: bytes | None) -> Any:
    return None if raw is None else json.loads(raw)


def scope(db_uri: str, table: str) -> str:
    """The errors folder's subfolder for one table of one database (several may share a --errors folder), the same
    however the database is named (through a link: a retry found nothing its killed run staged)."""
    return f"{table}.{hashlib.sha256(storage.resolved(db_uri).encode()).hexdigest()[:12]}"


def staging_dir(errors_dir: str, where: str, run_id: str) -> str:
    return storage.join(errors_dir, STAGING, where, run_id)


def publish(folder: str, errors_dir: str) -> None:
    """A staged run's error files into `errors_dir`, then the emptied staging folder away."""
    files = storage.match(storage.join(folder, "errors-*.parquet"))
    storage.rename((f, storage.join(errors_dir, storage.name(f))) for f in files)
    storage.delete([folder])


def keep_uncommitted(errors_dir: str, where: str, run_id: str) -> str:
    """A run that will not commit: its staged rejected rows where the user can read them, outside the errors
    output; returns that folder."""
    kept = storage.join(errors_dir, UNCOMMITTED, where, run_id)
    storage.mkdirs(kept)
    publish(staging_dir(errors_dir, where, run_id), kept)
    return kept


def settle(
    errors_dir: str, where: str, record: RunRecord | None, own: bool, recorded: Callable[[set[str]], set[str]]
) -> None:
    """Under the table's claim, before this run writes: publish the committed runs' staged errors (killed between
    their commit and publishing them; `record`: the current version's run, `recorded`: which of some run ids an
    older version records, a run committed and then rolled back past), remove every other run's staging and a
    refused run's kept rows."""
    staged = storage.join(errors_dir, STAGING, where)
    runs = storage.children(staged)
    current = record.run_id if record else None
    earlier = recorded({run for run in runs if run != current})
    for run in runs:
        if run == current or run in earlier:
            publish(storage.join(staged, run), errors_dir)
        else:
            remove_leftovers([storage.join(staged, run)], staged)
    kept = storage.join(errors_dir, UNCOMMITTED, where)  # a refused run's, kept until now as its line said
    storage.delete(storage.join(kept, run) for run in storage.children(kept))
    tidy(errors_dir, where, own)
    in_step(errors_dir, record, own, recorded)


def tidy(errors_dir: str, where: str, own: bool) -> None:
    """Under the table's claim: its emptied `_staging/<scope>` and `_uncommitted/<scope>` folders removed, and in
    the table's own errors folder, which only its runs write, their parents too (in a folder shared through
    --errors they may be another table's run's at this moment)."""
    for kind in (STAGING, UNCOMMITTED):
        storage.remove_empty(storage.join(errors_dir, kind, where))
        if own:
            storage.remove_empty(storage.join(errors_dir, kind))


def note_errors(work: str, errors_dir: str, own: bool) -> None:
    """Name the errors folder this run stages in, in the table's work folder, until `forget_errors`: a next run given
    another --errors still finds what this one leaves there if it does not finish."""
    storage.write_bytes(storage.join(work, NOTE), json.dumps([storage.canonical(errors_dir), own]).encode())


def forget_errors(work: str) -> None:
    storage.delete([storage.join(work, NOTE)])


def settle_noted(
    work: str, errors_dir: str, where: str, record: RunRecord | None, recorded: Callable[[set[str]], set[str]]
) -> None:
    """Under the table's claim, before `settle`: the errors folder an unfinished earlier run named, when it is not
    this run's (a retry given another --errors), settled as a run into it would settle it, and said so."""
    note = storage.join(work, NOTE)
    if not storage.is_file(note):
        return
    folder, own = json.loads(storage.read_bytes(note))
    if folder != storage.canonical(errors_dir):
        storage.check_scheme(folder, "an earlier, unfinished run's errors folder")
        settle(folder, where, record, own, recorded)
        say(f"settled what an earlier, unfinished run left in its errors folder {folder}")
    forget_errors(work)


def in_step(errors_dir: str, record: RunRecord | None, own: bool, recorded: Callable[[set[str]], set[str]]) -> None:
    """In the table's own errors folder, under the table's claim: the error files of the runs the current version
    (`record`) holds, the files of its other runs (`recorded`: those some version records) in `_replaced/`. A file
    of a run the table never recorded is left where it is: another database's build-db given this folder as its
    --errors before the table existed wrote it, and a prune deletes what lies in `_replaced/`. A folder given with
    --errors may be shared by tables, so nothing there is moved. Where the runs a version holds are not known (an
    append an earlier release recorded), its own run's files are brought back and none moved away."""
    if not own or record is None:
        return
    aside, known = storage.join(errors_dir, REPLACED), record.holds
    holds = set(known) if known is not None else {record.run_id}
    if known is not None:
        here = storage.match(storage.join(errors_dir, "errors-*.parquet"))
        others = {f: run for f in here if (run := _run(f)) not in holds}
        ours = recorded({run for run in others.values() if run})
        away = [(f, storage.join(aside, storage.name(f))) for f, run in others.items() if run in ours]
        if away:
            storage.mkdirs(aside)
        storage.rename(away)
    back = [f for f in storage.match(storage.join(aside, "errors-*.parquet")) if _run(f) in holds]
    storage.rename((f, storage.join(errors_dir, storage.name(f))) for f in back)


def drop_replaced(errors_dir: str, records: list[RunRecord | None]) -> None:
    """After prune, in the table's own errors folder: the replaced files of runs no version left holds (kept all
    while the runs a version left holds are not known)."""
    holds = [record.holds if record is not None else None for record in records]
    if any(runs is None for runs in holds):
        return
    held = {run for runs in holds for run in runs}
    aside = storage.match(storage.join(errors_dir, REPLACED, "errors-*.parquet"))
    storage.delete(f for f in aside if _run(f) not in held)


def _run(path: str) -> str | None:
    """The run an error file is of (`errors-<run id>` and Beam's shard template), None for another file."""
    named = _SHARD.fullmatch(storage.name(path))
    return named and named.group(1)


def foreign_parquet(errors_dir: str) -> list[str]:
    """The names in an errors folder of Parquet no build-db wrote there (a file, or a folder holding some, by
    content: Hive's `000000_0` has no suffix), which a reader of the folder (a dataset: `_`- and `.`-prefixed names
    skipped, folders read) would take with the rejected rows, under the first file's schema. Other files make such
    a reader fail, so they are left alone."""
    found = []
    for name in storage.children(errors_dir, "[!_.]*"):
        path = storage.join(errors_dir, name)
        if name and _run(path) is None and any(map(_is_parquet, storage.match(path) + _files_under(path))):
            found.append(name)
    return found


#: The files of a folder in an errors folder read for their first bytes: enough to find a user's Parquet there.
LOOKED_AT = 100


def _files_under(folder: str) -> list[str]:
    return storage.match(storage.join(folder, "**"), LOOKED_AT)


def _is_parquet(path: str) -> bool:
    try:
        with storage.open_read(path) as handle:
            return handle.read(4) == b"PAR1"
    except OSError:  # a folder (locally), a file gone meanwhile
        return False


def default_errors_dir(db_uri: str, table: str) -> str:
    return storage.join(db_uri, ERRORS_FOLDER, table)


def errors_owner(uri: str) -> tuple[str, str] | None:
    """The database and table whose default errors folder `uri` is, or lies in: a folder `<db>/_errors/<table>` where
    `<db>` holds that table or its work folder. That table's build-db sets files aside there and prunes them."""
    up = storage.folders_up(uri)
    for inner, errors, db in zip(up, up[1:], up[2:], strict=False):
        table = storage.name(inner)
        if storage.name(errors) == ERRORS_FOLDER and any(
            storage.is_dir(marker) for marker in (work_dir(db, table), storage.join(db, f"{table}.lance"))
        ):
            return db, table
    return None


def work_dir(db_uri: str, table: str) -> str:
    """Where a table's runs stage their rows and hold their claim: beside the table, in the database's location
    (a local folder or an object-store prefix), never the driver's temp folder, so workers anywhere can write."""
    return storage.join(db_uri, "_raee-work", table)
