"""An exit table as build-db writes it: the refusals of what would break it (duplicate ids, a foreign table of its
name, an overwrite with nothing, a table of one row), what an append builds on (read under the run's claim), what a
killed first build left, and the commit itself (the probes' feature rows, then the table, then its index).

build-db's pipeline (raee_ops/pipelines/build_db.py) runs the jobs and calls these; they read and write LanceDB
only, no Beam.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from raee_ops import storage
from raee_ops.commit import say
from raee_ops.errors import RaeeConfigError
from raee_ops.faults import fault_point
from raee_ops.progress import phase
from raee_ops.reference import check_groups, group_codes
from raee_ops.retrieval import (
    Unfinished,
    build_index,
    check_meta,
    checked_features,
    committing,
    conflict,
    connect,
    foreign_table,
    keep_theirs,
    no_database,
    open_listed,
    open_table,
    read_column,
    table_folder,
    table_names,
    table_probes,
    version_schemas,
)
from raee_ops.run_record import RunRecord
from raee_ops.schemas.tables import FEATURES_SUFFIX, FEATURES_VERSION_META_KEY, ID, TableMeta

log = logging.getLogger(__name__)

#: Examples of offending ids shown in a refusal.
SHOWN_IDS = 5


def _examples(ids: pa.Array) -> str:
    return ", ".join(map(str, ids.to_pylist()[:SHOWN_IDS]))


def refuse_duplicate_ids(ids: pa.Array) -> None:
    """Ids must be unique within the input: the table's rows are keyed by them."""
    counts = pc.value_counts(ids).flatten()
    repeated = counts[0].filter(pc.greater(counts[1], 1))
    if len(repeated):
        raise RaeeConfigError(f"{len(repeated)} id(s) occur more than once in the input (e.g. {_examples(repeated)})")


@dataclass(frozen=True)
class AppendBase:
    """The table an append builds on, as this run found it once it held the table: the version its refit reads,
    and the views its workers run (the probes' one view, which the refit keeps; None, every view a new table may
    choose, for a table without probes: empty, or built before them)."""

    version: int
    views: tuple[str, ...] | None
    #: This very job's run, whose rows the version holds (an append retried after its commit)
    done: RunRecord | None = None


def claimed_append_base(
    db_uri: str, table: str, expected: TableMeta, ids: pa.Array, job: str, storage_options: dict[str, str]
) -> AppendBase:
    """One look at the table under the run's claim, where no other run can write it. Its metadata is checked again:
    another run may have replaced the table (other artifacts, task or key) after this run's first look, and the
    refit must not merge rows of two keys. An append of the very job the current version was written by, whose rows
    are all in it, is done already (its index built, where due); otherwise new ids already in the table are
    refused."""
    opened = open_table(db_uri, table, storage_options=storage_options)
    check_meta(
        TableMeta.decode(opened.schema), expected, f"table {table!r} in {db_uri}, replaced since this run began,"
    )
    record, probes = RunRecord.of(opened.schema), table_probes(opened.schema)
    done = record.run_of(job) if record is not None else None
    present = read_column(opened, ID, f"table {table!r} in {db_uri}").combine_chunks()  # the ids alone
    if done is not None and _holds_rows(done, ids, present):
        if not opened.list_indices():  # killed between its commit and its index
            build_index(opened)
        return AppendBase(opened.version, None, done=done)
    if not len(present):  # built empty (--allow-empty): no probes, no old rows; the append fits them as a build does
        return AppendBase(opened.version, None)
    if probes is None:
        raise RaeeConfigError("append refused: the table was built before probe heads; rebuild it (--mode overwrite)")
    checked_features(db_uri, table, opened.schema, present, storage_options)  # what the refit reads, read now
    clash = ids.filter(pc.is_in(ids, value_set=present))
    if len(clash):
        earlier = _committed_earlier(db_uri, table, job, ids, present, storage_options)
        if earlier is not None:
            return AppendBase(opened.version, None, done=earlier)
        shown = _examples(clash)
        raise RaeeConfigError(f"append refused: {len(clash)} id(s) already in table {table!r} (e.g. {shown})")
    return AppendBase(opened.version, (probes.pooling,))


def _holds_rows(done: RunRecord, ids: pa.Array, present: pa.Array) -> bool:
    """Whether the table holds every row of `done`'s job but those it rejected, as this run reads its inputs: where
    they are gone since (another program deleted them), or an object store's checksum did not tell other bytes
    apart (job_of), the job is not done."""
    if done.rejected is None:  # recorded before rejected rows were counted
        return True
    # at least: a row group that cannot be decoded gives no ids (file_keys), its rows rejected all the same
    return int(pc.sum(pc.is_in(ids, value_set=present)).as_py() or 0) + done.rejected >= len(ids)


def _committed_earlier(
    db_uri: str, table: str, job: str, ids: pa.Array, present: pa.Array, storage_options: dict[str, str]
) -> RunRecord | None:
    """This very job's run record further back in the table's history, when every row it added is still in the
    table: an append killed after its commit, retried after another append committed, finds its rows and is done
    (it was refused for their ids, exit 2, which schedulers do not retry). Walked only when ids clash and the
    current version's record names no run of this job (`RunRecord.run_of`: runs recorded before versions kept
    their lineage's jobs, or more than JOBS_KEPT appends ago)."""
    handle = open_table(db_uri, table, storage_options=storage_options)
    for version, schema in itertools.islice(version_schemas(handle), 1, None):  # further back than the latest
        record = RunRecord.of(schema)
        if record is not None and record.job == job:
            then = read_column(handle, ID, f"table {table!r} in {db_uri}, version {version},").combine_chunks()
            added = ids.filter(pc.is_in(ids, value_set=then))  # none of them were there before it: append refuses
            return record if pc.all(pc.is_in(added, value_set=present)).as_py() else None
    return None


def refuse_replacing_foreign(db_uri: str, table: str, storage_options: dict[str, str]) -> None:
    """An overwrite replaces exit tables only: a table another program keeps in the database (a misspelt --table)
    is not build-db's to replace."""
    if no_database(db_uri):
        return
    db = connect(db_uri, storage_options)
    if table in table_names(db):
        with contextlib.suppress(Unfinished):  # no version: build-db's own, killed before its first commit
            if TableMeta.decode(open_listed(db, db_uri, table).schema) is None:
                raise foreign_table(
                    f"table {table!r} in {db_uri}", ", so build-db does not replace it (choose another --table)"
                )


def remove_unfinished(db_uri: str, table: str, storage_options: dict[str, str]) -> None:
    """Under the table's claim: the folders of the table and its companion that a build-db killed before their
    first commit left. LanceDB lists them but opens neither, so every later build-db of the table, and info or
    prune of the whole database, failed on them."""
    db = connect(db_uri, storage_options)
    names = table_names(db)
    for name in (n for n in (table, table + FEATURES_SUFFIX) if n in names):
        try:
            open_listed(db, db_uri, name)
        except Unfinished:
            storage.delete([table_folder(db_uri, name)])
            say(f"removed what an earlier, unfinished run left: {table_folder(db_uri, name)}")


def refuse_overwrite_with_nothing(table: str, allow_empty: bool) -> None:
    if not allow_empty:
        raise RaeeConfigError(
            f"no rows to write: --mode overwrite would replace table {table!r} with an empty one "
            "(nothing written; pass --allow-empty to do it anyway)"
        )


def refuse_one_row(table: str, rows: int) -> None:
    """A table of one row has nothing to fit its probes and policies on (they are scored leaving each row out), and
    nothing an append could refit them from: refused, left unchanged."""
    if rows == 1:
        raise RaeeConfigError(
            f"table {table!r} would hold 1 row: its probes and exit policies need at least 2 (nothing written)"
        )


def group_map(ids: pa.Array, file_names: list[pa.Array], mode: str) -> dict[str, str]:
    """Each input row's group by id, from every file's group names (rows with a null group are left out: each is a
    group of its own); an overwrite is refused here, before any work, when the input's rows fall into a single
    group (an append's rows may: the table has the others, and the fit checks the whole table)."""
    names = pa.concat_arrays(file_names).to_pylist() if file_names else []
    if mode == "overwrite":
        check_groups(group_codes(ids.to_pylist(), names))
    return {row_id: name for row_id, name in zip(ids.to_pylist(), names, strict=True) if name is not None}


def previous_rows(
    db_uri: str, name: str, version: int, storage_options: dict[str, str] | None = None
) -> tuple[pa.Table, pa.Table | None]:
    """What append builds on: the table's rows at `version` and its probes' feature rows (None for tables built
    without)."""
    rows = open_table(db_uri, name, version, storage_options).to_arrow()
    probed = table_probes(rows.schema) is not None
    features = checked_features(db_uri, name, rows.schema, rows[ID], storage_options) if probed else None
    return rows, None if features is None else features.to_arrow()


def current_version(db_uri: str, name: str, storage_options: dict[str, str] | None = None) -> int | None:
    """The table's latest version; None where there is no table (nor database) yet."""
    if no_database(db_uri):
        return None
    db = connect(db_uri, storage_options)
    return open_listed(db, db_uri, name).version if name in table_names(db) else None


def commit(
    db_uri: str,
    name: str,
    data: pa.Table,
    features: pa.Table | None = None,
    storage_options: dict[str, str] | None = None,
    record: RunRecord | None = None,
    read: int | None = None,
) -> tuple[int, bool, int]:
    """The run's table write, a whole new table version; a large table then gets its ANN index (a second version:
    until it lands, searches scan exactly, so a failed index build leaves a correct table). (rows, indexed,
    version). The probes' feature rows are written first: the exit table never refers to feature rows that are not
    there (a run failing in between leaves extra feature rows, which append ignores). `read`: the table's version
    when the run first looked under its claim (None: no table), which the new version must follow
    (`keep_theirs`): a caller writing over a table passes the version it built on."""
    db = connect(db_uri, storage_options)
    with phase(f"build-db: committing {data.num_rows} rows to LanceDB"), committing(db_uri, name):
        meta = record.metadata() if record is not None else {}
        if features is not None:
            written = db.create_table(name + FEATURES_SUFFIX, features, schema=features.schema, mode="overwrite")
            meta[FEATURES_VERSION_META_KEY] = str(written.version).encode()
        data = data.replace_schema_metadata((data.schema.metadata or {}) | meta)
        table = db.create_table(name, data, schema=data.schema, mode="overwrite")
    keep_theirs(table, read, f"table {name!r} in {db_uri}")
    fault_point("commit:table")
    try:
        indexed = build_index(table)
    except Exception as exc:  # the table is committed; a rerun of an append would find it done, and not index it
        said = conflict(exc)
        if said is None:
            raise
        log.warning("table %r: not indexed (%s); its searches scan exactly until the next build-db", name, said)
        indexed = False
    return table.count_rows(), indexed, table.version
