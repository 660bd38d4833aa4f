"""What an exit-table version records about the build-db run that wrote it, and the errors folder kept in step.

A run's rejected rows are staged in its errors folder itself (`_staging/<table>/<run id>/`: publishing is then a
rename on one filesystem, wherever `--errors` is) and published there only after the run's table version is
committed. That version records the run (`RUN_META_KEY`): its id, a digest of its input ids (a retried append
whose version is committed already is recognised, not refused) and the runs whose error files belong to the
table's rows (an overwrite's own; an append adds its own to the previous version's). The table's next run, under
the table's claim, settles what a killed or failed run left: the committed run's staged errors are published, any
other run's removed. So the errors folder, read as a dataset (`_`-prefixed names are skipped), holds each rejected
row of the table's runs once. A run refused for rejecting too many rows keeps its rejected rows in
`_uncommitted/<table>/<run id>/` (named in its error line) until the table's next run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import pyarrow as pa
from raee_ops.pipelines.commit import remove_leftovers
from raee_ops.schemas.tables import RUN_META_KEY

from raee_ops import storage

STAGING, UNCOMMITTED = "_staging", "_uncommitted"
ERROR_FILES = "errors-*.parquet"


@dataclass(frozen=True)
class RunRecord:
    """`error_runs` None: the table's earlier error files are unknown (it was built before runs were recorded)."""

    run_id: str
    input_digest: str
    error_runs: tuple[str, ...] | None

    def metadata(self) -> dict[bytes, bytes]:
        return {RUN_META_KEY: json.dumps(asdict(self)).encode()}

    @classmethod
    def of(cls, schema: pa.Schema) -> RunRecord | None:
        raw = (schema.metadata or {}).get(RUN_META_KEY)
        if raw is None:
            return None
        fields = json.loads(raw)
        runs = fields["error_runs"]
        return cls(fields["run_id"], fields["input_digest"], None if runs is None else tuple(runs))

    def after(self, run_id: str, input_digest: str) -> RunRecord:
        """The record of an append on top of this version."""
        runs = None if self.error_runs is None else (*self.error_runs, run_id)
        return RunRecord(run_id, input_digest, runs)


def input_digest(ids: pa.Array) -> str:
    """The same input ids, in any order, give the same digest."""
    return hashlib.sha256("\n".join(sorted(map(str, ids.to_pylist()))).encode()).hexdigest()


def staging_dir(errors_dir: str, table: str, run_id: str) -> str:
    return storage.join(errors_dir, STAGING, table, run_id)


def uncommitted_dir(errors_dir: str, table: str, run_id: str) -> str:
    return storage.join(errors_dir, UNCOMMITTED, table, run_id)


def publish(folder: str, errors_dir: str) -> None:
    """A staged run's error files into the errors folder, then the emptied staging folder away."""
    storage.rename((f, storage.join(errors_dir, storage.name(f))) for f in storage.match(storage.join(folder, "*")))
    storage.delete([folder])


def keep_uncommitted(errors_dir: str, table: str, run_id: str) -> str:
    """A run that will not commit: its staged rejected rows where the user can read them, outside the errors
    output; returns that folder."""
    kept = uncommitted_dir(errors_dir, table, run_id)
    storage.mkdirs(kept)
    publish(staging_dir(errors_dir, table, run_id), kept)
    return kept


def settle(errors_dir: str, table: str, record: RunRecord | None, own: bool) -> None:
    """Under the table's claim, before this run writes: publish the committed run's staged errors (it was killed
    between its commit and publishing them), remove every other run's staging and kept rows, and prune."""
    staged = storage.join(errors_dir, STAGING, table)
    for run in storage.children(staged):
        if record and run == record.run_id:
            publish(storage.join(staged, run), errors_dir)
        else:
            remove_leftovers([storage.join(staged, run)], staged)
    kept = storage.join(errors_dir, UNCOMMITTED, table)  # a refused run's, kept until now as its line said
    storage.delete(storage.join(kept, run) for run in storage.children(kept))
    prune(errors_dir, record, own)


def prune(errors_dir: str, record: RunRecord | None, own: bool) -> None:
    """In the table's own errors folder, the error files of runs the table's rows no longer come from (an
    overwrite replaced them). A folder given with --errors may be shared by tables, so nothing there is removed."""
    if not own or record is None or record.error_runs is None:
        return
    runs = record.error_runs
    storage.delete(
        f
        for f in storage.match(storage.join(errors_dir, ERROR_FILES))
        if not any(storage.name(f).startswith(f"errors-{run}-") for run in runs)
    )
