"""What a LanceDB database holds, for `raee-ops info` (raee_ops/versions.py changes a table's versions)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import lancedb
import pyarrow as pa

from raee_ops import storage
from raee_ops.errors import RaeeConfigError
from raee_ops.probe_policy import SHOWN_BUDGETS
from raee_ops.retrieval import (
    Unfinished,
    check_database,
    checked_features,
    connect,
    no_table,
    open_listed,
    read_column,
    table_names,
    table_policy,
    table_probe_policy,
    table_probes,
    versions_of,
)
from raee_ops.schemas.tables import FEATURES_SUFFIX, ID, TableMeta

#: Versions shown by the text rendering (newest last); --json lists them all.
SHOWN_VERSIONS = 10
#: What `table_info` says of a table: a table that cannot be opened has every one (null but its name and why), so a
#: reader of --json finds the same keys in every entry.
INFO_KEYS = (
    "table", "exit_table", "task", "label_names", "embedder", "fingerprint", "num_layers", "rows", "version",
    "indices", "policy", "probes", "probe_policy", "versions", "unreadable", "features_unreadable",
)  # fmt: skip


def version_history(table: lancedb.table.Table) -> list[dict[str, Any]]:
    """Each version with its time and row count (from the version's manifest; counted when it does not say)."""
    history = []
    for entry in versions_of(table):
        rows = (entry.get("metadata") or {}).get("total_rows")
        if rows is None:
            table.checkout(entry["version"])
            rows = table.count_rows()
            table.checkout_latest()
        history.append({"version": entry["version"], "timestamp": entry["timestamp"].isoformat(), "rows": int(rows)})
    return history


def table_info(table: lancedb.table.Table, db_uri: str, storage_options: dict[str, str] | None) -> dict[str, Any]:
    """Identity, size, index, probe heads, fitted policies and version history of one table, as plain values."""
    meta = TableMeta.decode(table.schema)
    policy = table_policy(table.schema)
    probes, probe_policy = table_probes(table.schema), table_probe_policy(table.schema)
    ids, why = read_whole(table)
    return {
        "table": table.name,
        "exit_table": meta is not None,
        "task": meta.task if meta else None,
        "label_names": meta.label_names if meta else None,
        "embedder": meta.embedder if meta else None,
        "fingerprint": meta.fingerprint if meta else None,
        "num_layers": meta.num_layers if meta else None,
        "rows": table.count_rows(),
        "version": table.version,
        "indices": [{"name": i.name, "type": i.index_type, "columns": list(i.columns)} for i in table.list_indices()],
        "policy": {
            "settings": policy.settings(),
            "validation": policy.validation(),
            **{k: v for k, v in policy.to_dict().items() if k != "bias"},
        }
        if policy
        else None,
        "probes": {
            "view": probes.pooling,
            "form": probes.form,  # the input form classify runs for the strategies reading the probes
            "best_layer": probes.best_layer,
            "metric": probes.metric,
            "best_oof_metric": max(probes.oof_metric),
            "key_oof_metric": probes.key_oof_metric,
            "majority_metric": None if probes.label_counts is None else probes.majority_metric(),
            "fit_rows": probes.fit_rows,
        }
        if probes
        else None,
        "probe_policy": {
            "settings": probe_policy.settings(),
            "validation": probe_policy.validation(),
            "by_budget": probe_policy.by_budget(),
            "estimate_line": probe_policy.estimate_line(),
            **probe_policy.to_dict(),
        }
        if probe_policy
        else None,
        "versions": version_history(table),
        "unreadable": why,
        "features_unreadable": None
        if probes is None or ids is None
        else features_unreadable(table, ids, db_uri, storage_options),
    }


def read_whole(table: lancedb.table.Table) -> tuple[pa.ChunkedArray | None, str | None]:
    """(One column of every row of the current version, the ids where it has them; or why it cannot be read). Its
    manifest can be whole while data files it names are gone or cut short (a lost upload, a bucket lifecycle rule);
    classify would refuse the table, so info, where an operator looks first, must not show it as sound. Reading one
    column of every row opens every data file."""
    column = ID if ID in table.schema.names else table.schema.names[0]
    try:
        return read_column(table, column, f"table {table.name!r}"), None
    except RaeeConfigError as exc:
        return None, str(exc)


def features_unreadable(
    table: lancedb.table.Table, ids: pa.ChunkedArray, db_uri: str, storage_options: dict[str, str] | None
) -> str | None:
    """Why an append of the table (its rows' `ids`) would be refused for its probes' feature rows (the companion
    missing, its version gone, its files damaged, rows missing), or None: classify reads none of them, but a
    scheduled append would fail."""
    try:
        checked_features(db_uri, table.name, table.schema, ids, storage_options)
    except RaeeConfigError as exc:
        return str(exc)
    return None


def check_holds_tables(db_uri: str, names: set[str]) -> None:
    """Refuse a location with no table that holds other things, or (an object-store prefix) nothing: --db names
    another folder (the artifacts, the input Parquet) or a typo'd prefix, which info read as a database with no
    tables and prune as one with nothing to prune, exit 0, where a scheduled check wants to hear of it. An empty
    local folder, or one holding only the tool's own `_` folders, is a database with no tables."""
    if names:
        return
    if not storage.is_dir(db_uri):  # an object-store prefix (a local folder is checked first): nothing there
        raise RaeeConfigError(f"no LanceDB database at {db_uri} (no object under that prefix)")
    others = [
        n
        for n in storage.children(db_uri)  # "": an object store's folder marker; an empty folder: lost+found
        if n
        and not n.startswith(("_", "."))
        and not n.endswith(".lance")
        and not storage.empty_folder(storage.join(db_uri, n))
    ]
    if others:
        shown = ", ".join(others[:3]) + (", …" if len(others) > 3 else "")
        raise RaeeConfigError(f"{db_uri} is not a LanceDB database: it holds no table but {shown} (check --db)")


def describe(db_uri: str, table: str | None = None, storage_options: dict[str, str] | None = None) -> dict[str, Any]:
    """Every table of the database (or the one named), sorted by name."""
    check_database(db_uri)
    db = connect(db_uri, storage_options)
    names = table_names(db)
    check_holds_tables(db_uri, names)
    if table is not None:
        if table not in names:
            raise no_table(table, db_uri)
        found = [(table, _open_or_why(db, db_uri, table))]
    else:
        found = listed(db, db_uri, sorted(name for name in names if not name.endswith(FEATURES_SUFFIX)))
    return {"db": db_uri, "tables": [_shown(name, opened, db_uri, storage_options) for name, opened in found]}


def _shown(
    name: str, found: lancedb.table.Table | RaeeConfigError, db_uri: str, storage_options: dict[str, str] | None
) -> dict[str, Any]:
    """A table's info, or, for one LanceDB cannot open or list the versions of (a manifest damaged), its name and
    why, among the others."""
    try:
        if isinstance(found, RaeeConfigError):
            raise found
        return table_info(found, db_uri, storage_options)
    except RaeeConfigError as why:
        return dict.fromkeys(INFO_KEYS) | {"table": name, "unreadable": str(why)}


def listed(
    db: lancedb.DBConnection, db_uri: str, names: Iterable[str]
) -> Iterator[tuple[str, lancedb.table.Table | RaeeConfigError]]:
    """The tables `names` of the database that have a version, each opened or with the line saying why it cannot
    be: one a build-db is creating, or left unfinished when it was killed, is no table yet (it stopped every
    listing); a damaged one stopped a listing or a prune of every table partway, where the others are sound."""
    for name in names:
        try:
            found = _open_or_why(db, db_uri, name)
        except Unfinished:
            continue
        yield name, found


def _open_or_why(db: lancedb.DBConnection, db_uri: str, name: str) -> lancedb.table.Table | RaeeConfigError:
    """The table opened, or the line saying why it cannot be (`Unfinished` is raised: it is no table yet)."""
    try:
        return open_listed(db, db_uri, name)
    except Unfinished:
        raise
    except RaeeConfigError as exc:
        return exc


def opened(db: lancedb.DBConnection, db_uri: str, names: Iterable[str]) -> Iterator[lancedb.table.Table]:
    """`listed`'s tables, refusing a damaged one."""
    for _, found in listed(db, db_uri, names):
        if isinstance(found, RaeeConfigError):
            raise found
        yield found


def render(info: dict[str, Any]) -> str:
    """The text `raee-ops info` prints: one block per table."""
    if not info["tables"]:
        where = "" if storage.is_local(info["db"]) else " (an object-store prefix with none: check --db)"
        return f"{info['db']}: no tables{where}"
    return "\n\n".join(_render_table(t) for t in info["tables"])


def shown_costs(pp: dict[str, Any]) -> str:
    """The policy's other budgets and prices on one line: what classify --layer-budget / --layer-price would run."""
    shown = pp["by_budget"]
    budgets, prices = shown[: len(SHOWN_BUDGETS)], shown[len(SHOWN_BUDGETS) :]

    def at(points: list[dict[str, Any]], key: str) -> str:
        return ", ".join(f"{b[key]}: {b['metric']:.3f} @ {b['mean_exit']:.1f}" for b in points)

    return (
        f"other layer budgets (classify --layer-budget; {pp['metric']} @ mean exit): {at(budgets, 'layer_budget')}; "
        f"other layer prices (--layer-price): {at(prices, 'layer_price')}"
    )


def _render_table(t: dict[str, Any]) -> str:
    if t["version"] is None:
        return f"table {t['table']}: cannot be read\n  UNREADABLE: {t['unreadable']}"
    lines = [f"table {t['table']}: {_rows(t['rows'])}, version {t['version']}"]
    if t["unreadable"]:
        lines.append(f"  UNREADABLE: {t['unreadable']}")
    if t["features_unreadable"]:
        lines.append(f"  NO APPEND (classify is unaffected): {t['features_unreadable']}")
    if t["exit_table"]:
        lines += [
            f"  task: {t['task']} ({', '.join(t['label_names'])})",
            f"  embedder: {t['embedder']}; {t['num_layers']} layers; artifacts fingerprint: {t['fingerprint']}",
        ]
    else:
        lines.append("  not an exit table built by raee-ops build-db (no raee metadata)")
    indices = ", ".join(f"{i['type']} on {', '.join(i['columns'])}" for i in t["indices"])
    lines.append(f"  index: {indices or 'none (exact search)'}")
    p = t["policy"]
    if p:
        loo = p["loo_metric"] if p["loo_metric"] is not None else p["loo_accuracy"]
        lines.append(
            f"  fused policy: {p['settings']}; {p['metric']} {loo:.3f} ({p['validation']}), "
            f"mean exit layer {p['loo_mean_exit']:.2f}"
        )
    elif t["exit_table"]:
        lines.append("  fused policy: none")
    q, pp = t["probes"], t["probe_policy"]
    if q:
        lines.append(
            f"  probe heads: {q['view']} view (runs the {q['form']} input), fitted on {q['fit_rows']} rows; "
            f"best layer {q['best_layer']} ({q['metric']} {q['best_oof_metric']:.3f} out of fold), "
            f"key probe {q['key_oof_metric']:.3f}"
            + (
                ""
                if q["majority_metric"] is None
                else f", the most common label for every reference row {q['majority_metric']:.3f}"
            )
        )
    if pp:
        lines.append(
            f"  probe policy (the default's): {pp['settings']}; {pp['metric']} {pp['loo_metric']:.3f} "
            f"({pp['validation']}), mean exit layer {pp['loo_mean_exit']:.2f}"
            + ("" if pp["floor"] is None else f"; the most common label there {pp['floor'][0]:.3f}")
        )
        if pp["estimate_line"]:
            lines.append(f"  {pp['estimate_line']}")
        if pp["by_budget"]:
            lines.append(f"  {shown_costs(pp)}")
    versions = t["versions"]
    older = len(versions) - SHOWN_VERSIONS
    hidden = f"; {older} older not shown, see --json; raee-ops prune removes old ones" if older > 0 else ""
    lines.append(f"  versions ({len(versions)}{hidden}):")
    lines += [f"    {v['version']:>4}  {v['timestamp']}  {_rows(v['rows'])}" for v in versions[-SHOWN_VERSIONS:]]
    return "\n".join(lines)


def _rows(n: int) -> str:
    return f"{n} row" if n == 1 else f"{n} rows"
