"""build-db's driver side: staged layer rows -> probe heads, out-of-fold probe answers and fitted policies -> the
exit table and the probes' feature rows, ready to commit.

Probes are fitted on at most probes.FIT_ROWS rows: every row of smaller tables, a hash-of-id sample of larger ones
(features are read shard by shard, so only the sample's pooled states are ever in memory). Fit rows get
out-of-fold answers; the other new rows are answered by the final probes, which never saw them. The sample's
pooled states, in the chosen view (input form and pooling), go to `<table>__features` so that append can refit: append
keeps the view, refits C and the probes on the (re-drawn, never larger) sample, recomputes the fit rows' out-of-fold
answers and answers the new rows; older rows outside the sample keep the answers the earlier probes gave them (their
pooled states are not stored). Below FIT_ROWS rows append is therefore exactly a rebuild.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raee_ops import storage
from raee_ops.calibration import FusedPolicy, fit_fused_policy, fit_line
from raee_ops.errors import CountMismatch, RaeeConfigError
from raee_ops.key_names import layer_depth
from raee_ops.layer_key import LayerKey
from raee_ops.probe_policy import DEFAULT_LAYER_BUDGET, DEFAULT_LAYER_PRICE, ProbePolicy, fit_probe_policy
from raee_ops.probes import FOLDS, VIEWS, ProbeSet, choose_view, fit_probes, fit_share, in_fit_sample, table_views
from raee_ops.retrieval import probe_identity, table_layer_key
from raee_ops.schemas.tables import (
    FEATURES,
    GROUP,
    LAYER_KEY_META_KEY,
    POLICY_META_KEY,
    PROBE_POLICY_META_KEY,
    PROBES_META_KEY,
    TableMeta,
    exit_table_schema,
    features_schema,
    fixed_list,
    flat_values,
)
from raee_ops.tasks import Task

#: Staged rows whose pooled states are read at a time (about 35 MB of them on SmolLM2).
STATES_READ = 256


@dataclass(frozen=True)
class Reference:
    data: pa.Table  # exit-table rows, identity, policies and probes in the schema metadata
    features: pa.Table  # `<table>__features` rows: the probes' fit rows' pooled states
    policy: FusedPolicy | None
    probes: ProbeSet | None
    probe_policy: ProbePolicy | None
    fit_seconds: float = 0.0  # probes and both policies
    label_names: tuple[str, ...] = ()  # the task's, in label order

    def render(self) -> list[str]:
        p, q = self.probes, self.probe_policy
        if p is None or q is None:
            return ["probe heads: none (fewer than 2 rows)"]
        curve = " ".join(f"{v:.2f}" for v in p.oof_metric)
        return [
            f"probe heads ({p.pooling} view, fitted on {p.fit_rows} rows; probes and policies fitted in "
            f"{self.fit_seconds:.1f}s; out-of-fold {p.metric} by layer): "
            f"{curve}; key probe {p.key_oof_metric:.3f}; best layer {p.best_layer}",
            fit_line("probe policy", q),
            *filter(None, [q.estimate_line()]),
            *self.no_signal(),
            *self.unseen_labels(),
        ]

    def unseen_labels(self) -> list[str]:
        """A warning naming the task's labels that no reference row has: the table holds nothing that answers them
        (its probes never saw them, no neighbour carries them), and it built with exit 0 without a word."""
        counts = self.probes.label_counts if self.probes else None
        missing = [name for name, n in zip(self.label_names, counts or [], strict=False) if n == 0]
        if not missing:
            return []
        which = f"label {missing[0]!r}" if len(missing) == 1 else f"labels {', '.join(map(repr, missing))}"
        return [
            f"warning: no reference row has {which}: the table holds nothing that answers "
            f"{'it' if len(missing) == 1 else 'them'} (the probes never saw one, no neighbour carries one); add rows "
            "so labelled (build-db --mode append)"
        ]

    def no_signal(self) -> list[str]:
        """A warning where no setting of the default beat answering every row with the most common label on the
        left-out reference rows, so the default answers that label (what it reads does not predict these labels)."""
        q = self.probe_policy
        if not q.majority:
            return []
        best = q.best_elsewhere()
        if best is not None:  # the budget or price ruled the better settings out, not the data
            return [
                f"warning: on the reference rows ({q.validation()}) no setting of the default within layer budget "
                f"{q.layer_budget} at layer price {q.layer_price} scored better than answering every row with the "
                f"most common label ({q.metric} {q.loo_metric:.3f}), so the default answers that label for every row; "
                f"settings that run more layers scored up to {best:.3f} (a higher --layer-budget or a lower "
                "--layer-price would choose them)"
            ]
        return [
            f"warning: on the reference rows ({q.validation()}) no setting of the default scored better than answering "
            f"every row with the most common label ({q.metric} {q.loo_metric:.3f}): the default answers that label for "
            "every row, as by this metric nothing it reads predicts these labels better"
        ]


def assemble(
    shards: list[str],
    staged: pa.Schema,
    task: Task,
    meta: TableMeta,
    hidden: int,
    old: pa.Table | None = None,
    old_features: pa.Table | None = None,
    label_word_head: bool = True,
    layer_budget: float = DEFAULT_LAYER_BUDGET,
    group_of: dict[str, str] | None = None,
    layer_price: float = DEFAULT_LAYER_PRICE,
    view: str | None = None,
) -> Reference:
    """The reference table from staged shards (plus, on append, the table's rows and feature rows so far). Without
    a label-word head the table has no head columns (the staged ones hold only the runtime's placeholders) and no
    fused policy is fitted. `group_of` maps new rows' ids to their group (build-db --group-column); old rows keep
    the groups stored with them. `view`: the one chosen already (sample_view), the only one staged for every row."""
    num_layers, num_labels = meta.num_layers, len(meta.label_names)
    dim = staged.field("vector").type.list_size
    schema = exit_table_schema(dim, num_layers, num_labels, label_word_head)
    layer_fields = [f.name for f in staged if f.name != FEATURES and f.name in schema.names]
    new = pa.concat_tables([storage.read_parquet(s, columns=layer_fields) for s in shards] or [staged.empty_table()])
    new = new.select(layer_fields).cast(pa.schema([staged.field(n) for n in layer_fields]))
    # by id: the shards' order is the runner's bundling (a multi-process or remote runner's differs run to run),
    # and the fits read rows by position (folds, samples), so the same rows fit the same table on every runner
    order = pc.sort_indices(new, [("id", "ascending")]).to_numpy()
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    new = new.take(order)
    new, layer_key = _layer_keyed(meta, new, old)
    key_depth = layer_key.depth if layer_key else 0  # layers every row runs for its key: the fits count them
    old_probes = None
    if old is not None:  # with probe columns and feature rows: exit_table.claimed_append_base refused it otherwise
        old_probes = ProbeSet.from_json(old.schema.metadata[PROBES_META_KEY]) if old.num_rows > 1 else None
    if old is not None and GROUP not in old.column_names:  # built before groups: every row a group of its own
        old = old.append_column(GROUP, pa.nulls(old.num_rows, pa.string()))
    old = old.cast(schema) if old is not None else schema.empty_table()
    rows = old.num_rows + new.num_rows
    ids = old.column("id").to_pylist() + new.column("id").to_pylist()
    group_names = old.column(GROUP).to_pylist() + [(group_of or {}).get(i) for i in new.column("id").to_pylist()]
    groups = group_codes(ids, group_names)
    check_groups(groups)
    labels = np.concatenate([old.column("label").to_numpy(), new.column("label").to_numpy()]).astype(np.int64)
    vectors = np.concatenate([flat_values(t, "vector").reshape(t.num_rows, dim) for t in (old, new)])
    sample = in_fit_sample(ids, fit_share(rows))
    views = (old_probes.pooling,) if old_probes else (view,) if view else table_views(meta.embedder)
    pick = [VIEWS.index(v) for v in views]

    def staged_features() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(each row's position among all rows, B×L×VIEWS×H) per STATES_READ staged rows: a whole shard's states
        in memory at once (its copies too) took 0.8 GB a row thousand, 17 GB for 20,000 SmolLM2 rows."""
        read = 0
        for shard in shards:
            for part in storage.parquet_batches(shard, [FEATURES], STATES_READ):
                values = flat_values(part, FEATURES)
                count = len(values) // (num_layers * len(VIEWS) * hidden)
                yield old.num_rows + rank[read : read + count], values.reshape(count, num_layers, len(VIEWS), hidden)
                read += count
        if read != len(rank):  # a shard rewritten between two reads: its rows would land on other rows' places
            raise CountMismatch(f"the staged shards hold {read} rows' states, {len(rank)} rows: not committing")

    fit_rows = np.flatnonzero(sample)  # in table order, as the fits read them
    features = np.empty((len(fit_rows), num_layers, len(pick), hidden), np.float16)
    old_sample = fit_rows[fit_rows < old.num_rows]
    features[: len(old_sample)] = _old_features(
        old_features, [ids[i] for i in old_sample], num_layers, len(pick), hidden
    )
    for positions, block in staged_features():
        keep = np.flatnonzero(sample[positions])
        features[np.searchsorted(fit_rows, positions[keep])] = block[keep][:, :, pick]
    started = time.perf_counter()
    metric = task.metric_name
    probe_lp = np.zeros((rows, num_layers, num_labels), np.float32)
    probes = probe_policy = policy = None
    if rows >= 2:
        identity = probe_identity(meta, rows)
        fit_groups = None if groups is None else groups[fit_rows]
        fitted = fit_probes(
            features, vectors[fit_rows], labels[fit_rows], num_labels, metric, identity, views, groups=fit_groups
        )
        # every row's label, as the probe policy's floor counts them: one most common label for both
        probes = replace(fitted.probes, label_counts=np.bincount(labels, minlength=num_labels).tolist())
        probe_lp[: old.num_rows] = flat_values(old, "probe_logprobs").reshape(old.num_rows, num_layers, num_labels)
        for positions, block in staged_features():
            probe_lp[positions] = probes.every_layer(block.transpose(1, 0, 2, 3)).transpose(1, 0, 2)
        probe_lp[fit_rows] = fitted.oof
        key_lp = probes.key.log_probs(vectors)
        key_lp[fit_rows] = fitted.key_oof
        probe_policy = fit_probe_policy(
            vectors,
            labels,
            probe_lp,
            key_lp,
            num_labels,
            metric,
            layer_budget=layer_budget,
            layer_price=layer_price,
            groups=groups,
            key_depth=key_depth,
        )
        kept = features[:, :, views.index(probes.pooling)]
    else:
        kept = np.zeros((0, num_layers, hidden), np.float16)
    layers = pa.concat_tables([old.select(layer_fields), new])
    data = _with_probe_columns(layers, probe_lp, labels, pa.array(group_names, pa.string()), schema)
    if rows >= 2 and label_word_head:  # the fused policy reads the label-word head: none without one
        head_lp = flat_values(data, "layer_logprobs").reshape(rows, num_layers, num_labels)
        policy = fit_fused_policy(vectors, labels, head_lp, num_labels, metric, groups=groups, key_depth=key_depth)
    extra = {
        POLICY_META_KEY: json.dumps(policy.to_dict()).encode() if policy else None,
        PROBES_META_KEY: probes.to_json() if probes else None,
        PROBE_POLICY_META_KEY: json.dumps(probe_policy.to_dict()).encode() if probe_policy else None,
        LAYER_KEY_META_KEY: layer_key.to_json() if layer_key else None,
    }
    data = data.replace_schema_metadata(meta.encode() | {k: v for k, v in extra.items() if v is not None})
    features_rows = _features_table([ids[i] for i in fit_rows], kept, num_layers, hidden)
    fit_seconds = time.perf_counter() - started
    return Reference(data, features_rows, policy, probes, probe_policy, fit_seconds, tuple(meta.label_names))


def sample_view(shards: list[str], meta: TableMeta, hidden: int, group_of: dict[str, str] | None) -> str | None:
    """The view the probes will read, chosen on build-db's first pass (a sample of a large table's rows, staged in
    every view) as fit_probes chooses; None where the sample cannot choose (under FOLDS rows, one label or one group):
    the other rows then run every input form, as in one pass."""
    views = table_views(meta.embedder)
    parts = [storage.read_parquet(s, columns=["id", "label", FEATURES]) for s in shards]
    rows = pa.concat_tables(parts).sort_by("id") if parts else None
    if rows is None or rows.num_rows < FOLDS or pc.count_distinct(rows.column("label")).as_py() < 2:
        return None
    shape = (rows.num_rows, meta.num_layers, len(VIEWS), hidden)
    features = flat_values(rows, FEATURES).reshape(shape)[:, :, [VIEWS.index(v) for v in views]]
    ids = rows.column("id").to_pylist()
    groups = group_codes(ids, [(group_of or {}).get(i) for i in ids])
    if groups is not None and groups.max() < 1:  # one group: nothing to fit on when it is left out
        return None
    labels = rows.column("label").to_numpy().astype(np.int64)
    return choose_view(features, labels, len(meta.label_names), views, groups=groups)


def _layer_keyed(meta: TableMeta, new: pa.Table, old: pa.Table | None) -> tuple[pa.Table, LayerKey | None]:
    """`new` with its staged raw states turned into keys, and the table's standardization, for a layer-N table:
    the table's own on append (old and new keys must stay comparable), else fitted on the new rows."""
    depth = layer_depth(meta.embedder)
    if depth is None:
        return new, None
    layer_key = table_layer_key(old.schema) if old is not None else None
    if not new.num_rows:
        return new, layer_key
    column = new.schema.get_field_index("vector")
    states = flat_values(new, "vector").reshape(new.num_rows, -1)
    layer_key = layer_key or LayerKey.fit(depth, states)
    field = new.schema.field(column)
    return new.set_column(column, field, fixed_list(layer_key.apply(states), field)), layer_key


def group_codes(ids: list[str], names: list[str | None]) -> np.ndarray | None:
    """Group names (None: a group of its own) as ints for the fits; None when every row is its own group, so that
    tables without groups are fitted exactly as before groups existed."""
    if all(name is None for name in names):
        return None
    keyed = [f"g:{name}" if name is not None else f"id:{row_id}" for row_id, name in zip(ids, names, strict=True)]
    return np.unique(keyed, return_inverse=True)[1].astype(np.int64)


def check_groups(groups: np.ndarray | None) -> None:
    """Leave-one-group-out needs a second group to learn from."""
    if groups is not None and len(groups) > 1 and groups.max() < 1:
        raise RaeeConfigError(
            f"--group-column puts all {len(groups)} rows in one group: nothing is left to fit on when it is left "
            "out (pick a column that marks near-copies, e.g. a source sentence or document id)"
        )


def _with_probe_columns(
    layers: pa.Table, probe_lp: np.ndarray, labels: np.ndarray, groups: pa.Array, schema: pa.Schema
) -> pa.Table:
    correct = probe_lp.argmax(axis=2) == labels[:, None]
    columns = {
        "probe_correct": correct.ravel(),
        "probe_logprobs": probe_lp.ravel(),
    }
    for name, values in columns.items():
        layers = layers.append_column(schema.field(name), fixed_list(values, schema.field(name)))
    return layers.append_column(schema.field(GROUP), groups).cast(schema)


def _old_features(table: pa.Table | None, ids: list[str], num_layers: int, pooled: int, hidden: int) -> np.ndarray:
    """The stored pooled states of these old rows, N×L×1×H; refuses an append whose feature table lacks some."""
    if not ids:
        return np.zeros((0, num_layers, pooled, hidden), np.float16)
    assert table is not None
    found = table.filter(pc.is_in(table.column("id"), value_set=pa.array(ids)))
    if found.num_rows != len(ids):
        raise RaeeConfigError(
            f"append refused: the probes' feature table lacks {len(ids) - found.num_rows} of its fit rows; "
            "rebuild the table (--mode overwrite)"
        )
    order = {row_id: i for i, row_id in enumerate(found.column("id").to_pylist())}
    values = flat_values(found, FEATURES).reshape(found.num_rows, num_layers, 1, hidden)
    return values[[order[i] for i in ids]]


def _features_table(ids: list[str], features: np.ndarray, num_layers: int, hidden: int) -> pa.Table:
    schema = features_schema(num_layers, hidden)
    return pa.Table.from_arrays(
        [pa.array(ids, pa.string()), fixed_list(features, schema.field(FEATURES))], schema=schema
    )
