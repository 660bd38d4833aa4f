"""A table's version history: `rollback` to an earlier version, `prune` the old ones, and `settle_errors`, which
reads the history to settle what killed runs left in the errors folders (raee_ops/run_record.py).

Every build-db run is one new LanceDB table version (an index, when one is due, a second one), and LanceDB keeps
old versions until they are cleaned up, so a bad reference set is undone by restoring the version before it: the
restore is itself a new version, and nothing is lost. A daily append therefore grows the database without bound
until old versions are pruned. Both hold the table's claim, as build-db does, so neither lands between a running
build-db's check and its commit.

Prune keeps the newest `keep` versions and every version replaced less than `grace` ago (a classify pins the
version it checked and its workers read that one until it ends), and, of the `__features` companion, the versions
those name (append refits on exactly the one its version names) and its latest. LanceDB removes versions by age
(`optimize(cleanup_older_than=…)`, the only clean-up its Python API has without pylance), so the cut is a time
between the newest version to go and the oldest to stay; which versions are left is checked after it. Before
anything goes, what killed runs left in the errors folders is settled as build-db's next run would settle it,
since that reads the history to tell a committed run's rejected rows from an uncommitted one's.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from typing import Any

import lancedb
import pyarrow as pa

from raee_ops import storage
from raee_ops.commit import check_held, hold
from raee_ops.errors import Busy, RaeeConfigError
from raee_ops.faults import fault_point
from raee_ops.info import check_holds_tables, listed, opened, table_info
from raee_ops.retrieval import (
    check_database,
    check_writable,
    committing,
    connect,
    foreign_table,
    keep_theirs,
    open_listed,
    open_table,
    read_column,
    table_folder,
    table_names,
    version_schemas,
    versions_of,
)
from raee_ops.run_record import RunRecord, default_errors_dir, drop_replaced, scope, settle, settle_noted, work_dir
from raee_ops.schemas.tables import FEATURES_SUFFIX, FEATURES_VERSION_META_KEY, ID, TableMeta


def rollback(db_uri: str, table: str, version: int, storage_options: dict[str, str] | None = None) -> dict[str, Any]:
    """Make `version` the current one, as a new version; then the table's info, with `restored`, `previous` and
    `changed` (False: the latest version held it already)."""
    handle = _exit_table(db_uri, table, storage_options)
    _check_version(handle, table, version)  # a typo is told at once, even while another run holds the table
    check_writable(db_uri, table)
    with hold(work_dir(db_uri, table), f"table {table!r}"):
        handle.checkout_latest()  # what another run committed (or pruned) before the claim was ours
        _check_version(handle, table, version)
        previous = handle.version
        _check_whole(handle, table, version)  # current already (or a copy of it), it is no mended table either
        changed = not _holds(handle, version)  # a retried rollback finds its version already current: left so
        if changed:
            check_held(work_dir(db_uri, table))
            with committing(db_uri, table):
                handle.restore(version)
            keep_theirs(handle, previous, f"table {table!r} in {db_uri}")
            fault_point("rollback:restored")
        # the errors folder in step with the version now current: the rejected rows of the runs it holds
        settle_errors(db_uri, table, default_errors_dir(db_uri, table), True, storage_options or {})
    return {
        "restored": version,
        "previous": previous,
        "changed": changed,
        **table_info(handle, db_uri, storage_options),
    }


def _exit_table(db_uri: str, table: str, storage_options: dict[str, str] | None) -> lancedb.table.Table:
    """The exit table rollback or prune acts on; another program's table (a misspelt --table) is refused before
    anything is claimed or changed, as build-db refuses it."""
    handle = open_table(db_uri, table, storage_options=storage_options)
    if TableMeta.decode(handle.schema) is None:
        raise foreign_table(f"table {table!r} in {db_uri}", ", so it is left alone (check --table)")
    return handle


def _check_whole(handle: lancedb.table.Table, table: str, version: int) -> None:
    """Refuse to restore a version whose data files are gone or cut short: the rollback ended with exit 0 and the
    table unreadable (classify refusing it, info exit 2)."""
    handle.checkout(version)
    try:
        read_column(handle, ID, f"version {version} of table {table!r}")
    except RaeeConfigError as exc:
        raise RaeeConfigError(f"rollback refused: {exc}") from exc
    finally:
        handle.checkout_latest()


def _holds(handle: lancedb.table.Table, version: int) -> bool:
    """Whether the latest version is `version` or a restored copy of it: a restore commits a new version number, so a
    rollback retried after a kill that came after its restore compared unequal and restored again, each retry one
    more copy (which `prune --keep` then counted). Every build-db commit stamps its own run record, fit and
    companion pin in the schema's metadata, and a restore reuses the version's data files: equal metadata, row
    counts and data-file totals (LanceDB's per-version statistics) are the same rows. Another program's edit of a
    row (an update, which leaves the metadata and count) writes other files, so it is rolled back."""
    if handle.version == version:
        return True
    files = {v["version"]: v.get("metadata") for v in versions_of(handle)}
    latest = handle.schema.metadata, handle.count_rows(), files.get(handle.version)
    handle.checkout(version)
    then = handle.schema.metadata, handle.count_rows(), files.get(version)
    handle.checkout_latest()
    return latest == then


def _check_version(handle: lancedb.table.Table, table: str, version: int) -> None:
    known = [v["version"] for v in versions_of(handle)]
    if version not in known:
        raise RaeeConfigError(f"table {table!r} has no version {version} (versions: {ranges(known)})")


def ranges(numbers: list[int]) -> str:
    """1-3, 5: version lists are long and mostly consecutive."""
    spans: list[list[int]] = []
    for n in sorted(numbers):
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


@dataclass(frozen=True)
class Pruned:
    """What prune removed (or, with `dry_run`, would remove) and kept, per table; bytes freed (None: a dry run)."""

    table: str
    removed: list[int]
    kept: list[int]
    features_removed: list[int]
    features_kept: list[int]
    bytes_freed: int | None
    #: Kept versions that are not among the --keep newest: replaced less than --grace ago
    within_grace: list[int] = field(default_factory=list)

    def render(self) -> str:
        verb = "would remove" if self.bytes_freed is None else "removed"
        grace = f" ({_listed(self.within_grace)} replaced less than --grace ago)" if self.within_grace else ""
        lines = [f"table {self.table}: {verb} {_listed(self.removed)}; kept {_listed(self.kept)}{grace}"]
        if self.features_removed or self.features_kept:
            lines.append(
                f"  {self.table}{FEATURES_SUFFIX} (probe fit rows): {verb} {_listed(self.features_removed)}; "
                f"kept {_listed(self.features_kept)}"
            )
        if self.bytes_freed is not None:
            lines.append(f"  {_size_text(self.bytes_freed)} freed")
        return "\n".join(lines)


def _size_text(n: int) -> str:
    """1.2 MB: bytes as people read them."""
    size, unit = float(n), "bytes"
    for larger in ("kB", "MB", "GB", "TB"):
        if size < 1000:
            break
        size, unit = size / 1000, larger
    return f"{n} bytes" if unit == "bytes" else f"{size:.1f} {unit}"


def _listed(versions: list[int]) -> str:
    if not versions:
        return "no version"
    return f"version {versions[0]}" if len(versions) == 1 else f"versions {ranges(versions)}"


def to_keep(history: list[tuple[int, float]], keep: int, grace_s: float, now: float) -> set[int]:
    """Of (version, commit time) pairs: the `keep` newest, and those replaced (the next version committed) less
    than `grace_s` before `now`."""
    ordered = sorted(history)
    recent = {v for (v, _), (_, replaced) in zip(ordered, ordered[1:], strict=False) if now - replaced < grace_s}
    return {v for v, _ in ordered[-keep:]} | recent


def prune(
    db_uri: str,
    table: str,
    keep: int,
    grace: timedelta,
    dry_run: bool = False,
    storage_options: dict[str, str] | None = None,
) -> Pruned:
    """Remove the table's versions that are neither among the `keep` newest nor replaced less than `grace` ago,
    and the companion's versions no kept one names (see the module doc)."""
    handle = _exit_table(db_uri, table, storage_options)
    db = connect(db_uri, storage_options)
    return _prune(db_uri, db, table_names(db), handle, keep, grace, dry_run, storage_options)


def prune_all(
    db_uri: str, keep: int, grace: timedelta, dry_run: bool = False, storage_options: dict[str, str] | None = None
) -> tuple[list[Pruned], list[str], list[str]]:
    """`prune` for every exit table of the database (tables build-db did not write are left alone), each under its
    own claim, from one listing of the tables: (what was pruned, the tables another run held, the lines of those
    that cannot be opened; both left as they are)."""
    check_database(db_uri)
    db = connect(db_uri, storage_options)
    names = table_names(db)
    check_holds_tables(db_uri, names)
    pruned, held, damaged = [], [], []
    for name, handle in listed(db, db_uri, sorted(n for n in names if not n.endswith(FEATURES_SUFFIX))):
        if isinstance(handle, RaeeConfigError):
            damaged.append(str(handle))
        elif TableMeta.decode(handle.schema) is not None:
            try:
                pruned.append(_prune(db_uri, db, names, handle, keep, grace, dry_run, storage_options))
            except Busy:
                held.append(name)
            except RaeeConfigError as exc:  # found before anything is removed: a version's or companion's manifest
                damaged.append(str(exc))
    return pruned, held, damaged


def _prune(
    db_uri: str,
    db: lancedb.DBConnection,
    names: set[str],
    handle: lancedb.table.Table,
    keep: int,
    grace: timedelta,
    dry_run: bool,
    storage_options: dict[str, str] | None,
) -> Pruned:
    """One table, opened as `handle` from the database's tables `names` (its companion among them, when it has one)."""
    table = handle.name
    if not dry_run:
        check_writable(db_uri, table)
    with hold(work_dir(db_uri, table), f"table {table!r}"):
        handle.checkout_latest()  # what another run committed before the claim was ours
        try:  # a damaged current version is mended by a rollback to the versions the prune would remove
            read_column(handle, ID, f"table {table!r}")
        except RaeeConfigError as exc:
            raise RaeeConfigError(f"{exc}; nothing pruned: a rollback to a whole earlier version mends it") from exc
        if not dry_run:  # committed runs' staged rejected rows are told apart by the versions about to go
            settle_errors(db_uri, table, default_errors_dir(db_uri, table), True, storage_options or {})
        history = _history(handle)
        now = time.time()
        kept = to_keep(history, keep, grace.total_seconds(), now)
        within_grace = sorted(kept - to_keep(history, keep, 0, now))
        companion = table + FEATURES_SUFFIX
        # a companion a killed build-db left before its first commit holds no version to prune (`opened` passes
        # it by; the table's next build-db removes it)
        features = next(opened(db, db_uri, [companion]), None) if companion in names else None
        features_history = _history(features) if features is not None else []
        there = {v for v, _ in features_history}
        features_kept = (_pinned(handle, kept) & there) | {v for v, _ in features_history[-1:]}
        if dry_run:
            table_left, features_left = _staying(history, kept), _staying(features_history, features_kept)
            companion_split = _split(features_history, features_left)
            return Pruned(table, *_split(history, table_left), *companion_split, None, within_grace)
        before = _size(db_uri, table)
        check_held(work_dir(db_uri, table))  # settling the errors may have run long
        with committing(db_uri, table):
            _cut(handle, history, kept)
            if features is not None:
                _cut(features, features_history, features_kept)
        left = {v for v, _ in _history(handle)}
        features_left = {v for v, _ in _history(features)} if features is not None else set()
        missing = (kept - left) | (features_kept - features_left)
        if missing:  # the cut is by time; a version meant to stay that is gone is a bug to hear of, loudly
            raise RuntimeError(f"prune removed version(s) {ranges(sorted(missing))} of {table!r} it meant to keep")
        drop_replaced(default_errors_dir(db_uri, table), [RunRecord.of(schema) for schema in _schemas(handle, left)])
        return Pruned(
            table,
            *_split(history, left),
            *_split(features_history, features_left),
            before - _size(db_uri, table),
            within_grace,
        )


def _split(history: list[tuple[int, float]], kept: set[int]) -> tuple[list[int], list[int]]:
    """(removed, kept): the versions of a history not kept, and the kept ones (the history's, or what is left after
    the cut: an index's clean-up may commit one more)."""
    return [v for v, _ in history if v not in kept], sorted(kept)


def _history(handle: lancedb.table.Table) -> list[tuple[int, float]]:
    """(version, commit time in seconds since the epoch), oldest first."""
    return sorted((v["version"], v["timestamp"].timestamp()) for v in versions_of(handle))


def _pinned(handle: lancedb.table.Table, versions: set[int]) -> set[int]:
    """The companion versions the given table versions were written with (tables built before that was recorded
    name none: append reads the companion's latest for them)."""
    raw = ((schema.metadata or {}).get(FEATURES_VERSION_META_KEY) for schema in _schemas(handle, versions))
    return {int(r) for r in raw if r is not None}


def _schemas(handle: lancedb.table.Table, versions: set[int]) -> list[pa.Schema]:
    """The schema (with its metadata) of each of the table's `versions`, the handle back at its latest after."""
    schemas = [schema for _, schema in version_schemas(handle, versions)]
    handle.checkout_latest()
    return schemas


def _staying(history: list[tuple[int, float]], kept: set[int]) -> set[int]:
    """The versions a cut that keeps `kept` leaves: LanceDB cuts by age, so every version committed after the
    oldest kept one stays too (a companion's version between two that kept table versions name). No history (a
    table without a companion) leaves none."""
    oldest_kept = min((t for v, t in history if v in kept), default=math.inf)
    return {v for v, t in history if v in kept or t >= oldest_kept}


def _cut(handle: lancedb.table.Table, history: list[tuple[int, float]], kept: set[int]) -> None:
    """Remove the versions `_staying` does not leave, those committed before the oldest kept one. LanceDB cuts by
    age from its own clock's now, read a moment after ours: the cut lies midway between the newest version to go
    and the oldest to stay, so that moment may last half their distance (never the latest version, which LanceDB
    never removes)."""
    staying = _staying(history, kept)
    older = [t for v, t in history if v not in staying]
    if not older:
        return  # nothing to remove: no call, no new version
    cut = (max(older) + min(t for v, t in history if v in staying)) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LanceDB's warning about readers of older versions: the grace is for them
        handle.optimize(cleanup_older_than=timedelta(seconds=time.time() - cut))
    fault_point("prune:cut")


def _size(db_uri: str, table: str) -> int:
    """Bytes under the table's folder and its companion's."""
    folders = [storage.join(table_folder(db_uri, name), "**") for name in (table, table + FEATURES_SUFFIX)]
    return sum(m.size_in_bytes for folder in folders for m in storage.match_metadata(folder))


def table_record(db_uri: str, table: str, storage_options: dict[str, str]) -> RunRecord | None:
    """The run record of the table's current version (None: no table yet, or one built before runs were recorded)."""
    db = connect(db_uri, storage_options)
    return RunRecord.of(open_listed(db, db_uri, table).schema) if table in table_names(db) else None


def recorded_runs(db_uri: str, table: str, storage_options: dict[str, str], run_ids: set[str]) -> set[str]:
    """Which of `run_ids` some version of the table records (read newest first, only when a run's staging is left:
    a committed run whose version a rollback then left behind)."""
    if not run_ids:
        return set()
    db = connect(db_uri, storage_options)
    if table not in table_names(db):
        return set()
    handle, found = open_listed(db, db_uri, table), set()
    for _, schema in version_schemas(handle):
        record = RunRecord.of(schema)
        if record:  # its own run, and those whose rows it holds (an append's base's: their versions may be pruned)
            found |= ({record.run_id} | set(record.holds or ())) & run_ids
            if found == run_ids:
                break
    return found


def settle_errors(db_uri: str, table: str, errors_dir: str, own: bool, storage_options: dict[str, str]) -> None:
    """Under the table's claim, before a run writes or old versions are pruned: what earlier runs left staged in
    the errors folders, published or removed (raee_ops/run_record.py; the history tells a committed run's from an
    uncommitted one's)."""
    recorded = partial(recorded_runs, db_uri, table, storage_options)
    current, where = table_record(db_uri, table, storage_options), scope(db_uri, table)
    settle_noted(work_dir(db_uri, table), errors_dir, where, current, recorded)
    settle(errors_dir, where, current, own, recorded)
