"""What an exit-table version records about the build-db run that wrote it, and the errors folder kept in step.

A run's rejected rows are staged in its errors folder itself (`_staging/<scope>/<run id>/`, the scope naming the
database and table: publishing is then a rename on one filesystem, wherever `--errors` is, and runs on other
databases sharing the folder never touch it) and published there only after the run's table version is committed.
That version records the run (`RUN_META_KEY`): its id, its mode, its job (settings and input files, as classify
names its own) and its rejected rows' count, so a retried append whose version is committed already is recognised as
done, not refused, and held to its own --max-rejected. The table's next run, under the table's claim, settles what a
killed run left: a committed run's staged errors are published (whether its version is current or a rollback left it
in the history; after the current version's overwrite, older runs' files are pruned from the table's own folder),
any other run's staging removed. So the errors folder, read as a dataset (`_`-prefixed names are skipped), holds
each rejected row of the table's runs once. A run refused for rejecting too many rows keeps its rejected rows in
`_uncommitted/<scope>/<run id>/` (named in its error line) until the table's next run. Until a run has published its
rows, the table's work folder names its errors folder (`NOTE`): a next run given another --errors settles that
folder first, so a retry's new --errors never strands them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass

import pyarrow as pa
from raee_ops.pipelines.commit import remove_leftovers, say
from raee_ops.schemas.tables import RUN_META_KEY

from raee_ops import storage

STAGING, UNCOMMITTED = "_staging", "_uncommitted"
#: In the table's work folder, from before a run stages rejected rows until it has published them: its errors folder.
NOTE = "_ERRORS"


@dataclass(frozen=True)
class RunRecord:
    """`rejected`: the rows the run rejected, which a retry of its job answers for against its own --max-rejected
    (None: a version recorded before they were counted)."""

    run_id: str
    mode: str
    job: str
    rejected: int | None = None

    def metadata(self) -> dict[bytes, bytes]:
        return {RUN_META_KEY: json.dumps(asdict(self)).encode()}

    @classmethod
    def of(cls, schema: pa.Schema) -> RunRecord | None:
        """None: a table built before runs were recorded."""
        raw = (schema.metadata or {}).get(RUN_META_KEY)
        return None if raw is None else cls(**json.loads(raw))


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
            if run == current:  # its overwrite replaced older runs' rows; a rolled-back past one replaced nothing now
                prune(errors_dir, record, own)
        else:
            remove_leftovers([storage.join(staged, run)], staged)
    kept = storage.join(errors_dir, UNCOMMITTED, where)  # a refused run's, kept until now as its line said
    storage.delete(storage.join(kept, run) for run in storage.children(kept))


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


def prune(errors_dir: str, record: RunRecord, own: bool) -> None:
    """After an overwrite, in the table's own errors folder: older runs' error files (their rows are gone). A
    folder given with --errors may be shared by tables, so nothing there is removed."""
    if own and record.mode == "overwrite":
        old = storage.match(storage.join(errors_dir, "errors-*.parquet"))
        storage.delete(f for f in old if not storage.name(f).startswith(f"errors-{record.run_id}-"))
