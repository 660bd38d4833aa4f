"""evaluate: labelled Parquet -> how every layer, the full model, the oracle and each exit strategy score.

Every valid row runs through all layers once, as build-db runs it (batches.LayerRows: same prompts, keys, overlong
rejections and per-row failure isolation), so evaluated rows are exactly what a reference table would hold.
Retrieval runs once with the most neighbours any strategy needs. A strategy only picks a layer and reads
that layer's head or probe, so every strategy is scored from both's stored per-layer log-probs without rerunning
the model (softmax is shift-invariant, so log-probs answer exactly as logits would). Beside the report, every
scored row's answer and exit under each strategy (predictions.parquet): the rows behind each number, for error
analysis and for pairing two evaluations of the same rows.

A backbone without a label-word head (a bare encoder) has no zero-shot numbers: the head's per-layer scores, the
full model, the oracle and the head-reading baselines are None (absent, shown as "–"), never made up; strategies
that read the head are left out of the default list and refused when named.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raee_ops import storage
from raee_ops.batches import LayerRows
from raee_ops.calibration import label_vote, neighbour_depths, not_before_key
from raee_ops.errors import CountMismatch, RaeeConfigError
from raee_ops.exit_policy import (
    DEFAULT_K,
    DEFAULT_STRATEGY,
    STRATEGIES,
    Context,
    Neighbours,
    Strategy,
    check_k,
    refuse_head,
    refuse_unanswerable,
    resolve,
    unfitted,
)
from raee_ops.inputs import check_inputs, expand_inputs, read_validated_file, reading
from raee_ops.metrics import METRICS, Metric, accuracy, paired_difference
from raee_ops.probe_policy import (
    HALVINGS,
    SETTING_NAMES,
    Found,
    ProbePolicy,
    confident_exits,
    hindsight,
    refuse_cost_options,
)
from raee_ops.probes import VIEWS, ProbeSet
from raee_ops.progress import Progress
from raee_ops.retrieval import (
    Retriever,
    check_table_contents,
    checked_table,
    other_metric,
    table_context,
    table_probe_policy,
)
from raee_ops.schemas.manifest import Manifest, load_manifest
from raee_ops.schemas.tables import EVALUATION_PREDICTIONS_SCHEMA, FEATURES, flat_values
from raee_ops.settings import worker_settings
from raee_ops.tasks import Task, task_of

log = logging.getLogger(__name__)
#: A scored row whose nearest reference row's key is this similar is a copy of it (keys are unit vectors).
SAME_KEY = 0.9999
#: Rows per model call; small enough for the progress line to move every few seconds on CPU.
CHUNK = 64
#: What a user would pick instead of (or as) the default, all fitted on the same reference rows: report name ->
#: strategy. key-lr: logistic regression on the retrieval key; majority: the reference's most common label for
#: every row; probe-best: the single layer chosen on reference.
BASELINES = {
    "key-lr": "key-lr",
    "knn-vote": "knn-vote",
    "majority": "majority",
    "probe-best": "probe-best",
    "probe-last": "probe-last",
    "full": "full",
    "full-cal": "full-cal",
    "raee": "raee",
    "default": DEFAULT_STRATEGY,
}


@dataclass(frozen=True)
class Evaluation:
    """What evaluate found: the report (JSON numbers) and the answers behind it, one row per (row, strategy) in
    EVALUATION_PREDICTIONS_SCHEMA."""

    report: dict[str, Any]
    predictions: pa.Table


def exported_task(manifest: Manifest, task: Task) -> str:
    """A --task-file task's name, once it is known to be exported exactly as the file describes it."""
    entry = manifest.tasks.get(task.name)
    if entry is None:
        raise RaeeConfigError(
            f"task {task.name!r} from the task file is not exported in these artifacts "
            f"(have: {', '.join(sorted(manifest.tasks))}); export it with export-onnx --task-file first"
        )
    exported = task_of(manifest, task.name)
    for field in ("template", "label_names", "verbalizer", "metric_name"):  # the metric: the one scoring would use
        if getattr(task, field) != getattr(exported, field):
            raise RaeeConfigError(
                f"task {task.name!r} in the task file differs from the one exported in the artifacts in its "
                f"{field.removesuffix('_name')}: {getattr(task, field)!r} against {getattr(exported, field)!r} "
                f"({'name the exported metric in the task file, or ' if field == 'metric_name' else ''}export it "
                "again with this task file)"
            )
    return task.name


def _read_validated(inputs: list[str], task: Task) -> tuple[int, pa.Table, list[dict[str, str]]]:
    """The input files' row count (from their footers), their valid rows and the rejected ones; run-level problems
    raise before any work."""
    files = expand_inputs(inputs)
    contents = {file: storage.content_digest(file) for file in files}  # what each file holds before any read
    with reading(contents):
        schema, rows_in = check_inputs(files, task, need_label=True)
    valid, rejected = [], []
    for file in files:
        for checked in read_validated_file(file, task, True, contents[file], schema, rows=CHUNK):
            if checked.valid.num_rows:
                valid.append(checked.valid)
            rejected += checked.errors.to_pylist()
    if not valid:
        raise nothing_to_evaluate(inputs, rejected)
    return rows_in, pa.concat_tables(valid), rejected


def nothing_to_evaluate(inputs: list[str], rejected: list[dict[str, str]]) -> RaeeConfigError:
    """No row to score: the line says why, with the commonest reasons (evaluate writes no report to keep them)."""
    where = ", ".join(inputs)
    if not rejected:
        return RaeeConfigError(f"nothing to evaluate: {where} holds no rows")
    reasons = Counter(row["reason"] for row in rejected)
    why = "; ".join(f"{n} × {reason}" for reason, n in reasons.most_common(2)) + ("; …" if len(reasons) > 2 else "")
    return RaeeConfigError(f"nothing to evaluate: all {len(rejected)} rows of {where} were rejected ({why})")


def _run_layers(
    work: LayerRows, table: pa.Table, probes: ProbeSet
) -> tuple[pa.Table, np.ndarray, list[dict[str, str]]]:
    """Layer rows (label, key, per-layer head log-probs) for every row the model takes, every layer's probe log-probs
    L×N×C, and the rejected rows; in chunks, the pooled states of one chunk at a time."""
    model = work.load()
    rows, probe_lp, rejected, progress = [], [], [], Progress("evaluate", table.num_rows)
    num_layers, hidden = len(probes.layers), model.runtime.manifest.hidden_size
    for offset in range(0, table.num_rows, CHUNK):
        outcome = work.run(table.slice(offset, CHUNK), model)
        n = outcome.rows.num_rows
        staged = flat_values(outcome.rows, FEATURES).reshape(n, num_layers, len(VIEWS), hidden)
        probe_lp.append(probes.every_layer(staged.transpose(1, 0, 2, 3)))
        rows.append(outcome.rows.drop_columns([FEATURES]))
        rejected += outcome.errors.to_pylist()
        progress.advance(min(CHUNK, table.num_rows - offset))
    return pa.concat_tables(rows), np.concatenate(probe_lp, axis=1), rejected


def _scores(labels: np.ndarray, pred: np.ndarray, metric: Metric, num_labels: int) -> dict[str, float]:
    return {"accuracy": accuracy(labels, pred), "metric": metric(labels, pred, num_labels)}


def _brief(report: dict[str, Any]) -> dict[str, float]:
    keys = ("accuracy", "metric", "mean_exit_layer", "mean_layers_run", "retrieval_only_share")
    return {key: report[key] for key in keys}


def _strategy_report(
    strategy: Strategy, answers: tuple[np.ndarray, np.ndarray], labels: np.ndarray, ctx: Context, metric: Metric
) -> dict[str, Any]:
    """One strategy scored from its `_answers` (each row's answer and exit layer), as classify would run it."""
    pred, exits = answers
    # exit 0 on a layer-N table still ran N layers for its key
    layers_run = float(np.maximum(exits, _key_layers(strategy, ctx)).mean())
    return {
        **_scores(labels, pred, metric, ctx.num_labels),
        "mean_exit_layer": float(exits.mean()),
        "mean_layers_run": layers_run,
        "retrieval_only_share": float(np.mean(exits == 0)),
        "exit_histogram": np.bincount(exits, minlength=ctx.num_layers + 1).tolist(),
        "ideal_speedup": ctx.num_layers / layers_run if layers_run > 0 else None,
    }


def _answers(
    strategy: Strategy, logprobs: np.ndarray, probe_lp: np.ndarray, nb: Neighbours, ctx: Context
) -> tuple[np.ndarray, np.ndarray]:
    """(each row's answer, the layer it left at) of one strategy, from every layer's log-probs L×N×C."""
    exits = strategy.exits(nb, ctx)
    key_layers = _key_layers(strategy, ctx)
    if strategy.reads == "probe":
        logprobs = probe_lp
        confidence = np.exp(probe_lp.max(axis=2)).T
        exits = confident_exits(confidence, exits, strategy.threshold(ctx), key_layers)
    if key_layers:  # as the runtime reads them out, from the key's layers on
        exits = not_before_key(exits, key_layers)
    # exit 0 runs no layer: its logits are zeros, as run_to_exit_pooled returns them
    at_exit = np.where((exits > 0)[:, None], logprobs[np.maximum(exits, 1) - 1, np.arange(exits.shape[0])], 0.0)
    return strategy.answer(at_exit, exits, nb, ctx).argmax(axis=1), exits


def _key_layers(strategy: Strategy, ctx: Context) -> int:
    """The layers every row runs for its key: a layer key's, where the strategy retrieves."""
    return ctx.key_depth if strategy.neighbours(ctx) else 0


def _predictions(
    ids: pa.ChunkedArray, labels: np.ndarray, answers: dict[str, tuple[np.ndarray, np.ndarray]], label_names: list[str]
) -> pa.Table:
    """Each row's answer and exit under every strategy in `answers`, strategy after strategy."""
    n, names = labels.shape[0], list(answers)
    table = pa.Table.from_pydict(
        {
            "id": pa.concat_arrays([ids.combine_chunks()] * len(names)),
            "label": np.tile(labels, len(names)),
            "strategy": np.repeat(names, n),
            "prediction": np.concatenate([pred for pred, _ in answers.values()]),
            "exit_layer": np.concatenate([exits for _, exits in answers.values()]),
        },
        schema=EVALUATION_PREDICTIONS_SCHEMA,
    )
    return table.replace_schema_metadata({b"label_names": json.dumps(label_names).encode()})


def strategy_rows(predictions: pa.Table, strategy: str) -> pa.Table:
    """One strategy's rows of a predictions table (predictions.parquet), in id order: two evaluations of the same
    rows line up row by row."""
    return predictions.filter(pc.equal(predictions["strategy"], strategy)).sort_by("id")


def _zero_shot(
    logprobs: np.ndarray, probe_lp: np.ndarray, labels: np.ndarray, nb: Neighbours, ctx: Context, metric: Metric
) -> tuple[list[dict[str, float]], int, dict[str, float], dict[str, Any]]:
    """The label-word head's numbers: per-layer scores, the best layer (0-based), the oracle (any layer right) and
    the calibrated full model."""
    layer_pred = logprobs.argmax(axis=2)  # L×N
    per_layer = [_scores(labels, pred, metric, ctx.num_labels) for pred in layer_pred]
    best = max(range(ctx.num_layers), key=lambda i: (per_layer[i]["metric"], per_layer[i]["accuracy"]))
    any_right = (layer_pred == labels).any(axis=0)
    oracle = _scores(labels, np.where(any_right, labels, layer_pred[-1]), metric, ctx.num_labels)
    full_cal = STRATEGIES["full-cal"]
    calibrated = _strategy_report(full_cal, _answers(full_cal, logprobs, probe_lp, nb, ctx), labels, ctx, metric)
    return per_layer, best, oracle, calibrated


def evaluate(
    artifacts: str,
    task_name: str,
    db_uri: str,
    table: str,
    inputs: list[str],
    k: int = DEFAULT_K,
    strategies: list[str] | None = None,
    beam_args: Sequence[str] = (),
    layer_budget: float | None = None,
    layer_price: float | None = None,
) -> Evaluation:
    """The report (per-layer, full, calibrated, oracle, neighbour-vote and per-strategy scores, and the default at
    other layer budgets) and each row's answers. `layer_budget`, `layer_price`: the probe strategies' settings for
    that budget and price, not the table's."""
    check_k(k)
    settings = worker_settings(beam_args, db_uri)
    manifest = load_manifest(artifacts)
    task = task_of(manifest, task_name)
    num_layers, num_labels = manifest.num_layers, len(task.label_names)
    head = manifest.label_word_head
    if strategies:
        chosen = [resolve(name, num_layers) for name in strategies]
        refuse_head(chosen, head)
        applies = any(s.needs_probe_policy for s in chosen)
        refuse_cost_options(strategies, applies, layer_budget, layer_price)
    else:
        chosen = [s for s in STRATEGIES.values() if head or not s.needs_head()]
    # one version, checked and read: a build-db or rollback committing meanwhile changes neither (the report names it)
    opened, expected = checked_table(db_uri, table, manifest, task_name, str(artifacts), settings.db_storage_options)
    embedder = expected.embedder
    retriever = Retriever(db_uri, table, opened.version, settings.db_storage_options)
    table_rows = check_table_contents(retriever.table, expected, True, f"table {table!r} in {db_uri}")
    ctx = table_context(retriever.table.schema, num_layers, num_labels, k, layer_budget, layer_price)
    policy, probes, probe_policy = ctx.policy, ctx.probes, ctx.probe_policy
    own = table_probe_policy(retriever.table.schema)  # as build-db fitted it; `probe_policy`: at this run's cost
    if (head and policy is None) or probes is None or probe_policy is None:
        raise unfitted("fitted policy", f"table {table!r}")
    note = other_metric(ctx, task.metric_name, f"table {table!r} in {db_uri}")
    if note:
        log.warning(note)
    if strategies:
        refuse_unanswerable(chosen, probes, f"table {table!r} in {db_uri}")
    chosen = [s for s in chosen if s.answerable(probes)]  # the default list, on a table built before `majority`

    rows_in, valid, rejected = _read_validated(inputs, task)
    views = (probes.pooling,)  # its view only
    work = LayerRows(str(artifacts), task, embedder, views, command="evaluate", checked=manifest, **settings.runtime())
    rows, probe_lp, failed = _run_layers(work, valid, probes)
    rejected += failed
    if rows.num_rows == 0:
        raise nothing_to_evaluate(inputs, rejected)
    if rows_in != rows.num_rows + len(rejected):  # a file rewritten while it was read, say: no report on part of it
        raise CountMismatch(f"rows in {rows_in} != scored {rows.num_rows} + rejected {len(rejected)}")
    labels = rows.column("label").to_numpy().astype(np.int64)
    logprobs = flat_values(rows, "layer_logprobs").reshape(rows.num_rows, num_layers, num_labels).transpose(1, 0, 2)
    keys = flat_values(rows, "vector").reshape(rows.num_rows, -1)

    vote_k = policy.k if policy else probe_policy.k
    sweep = own.shown_costs()
    depths = neighbour_depths(retriever.rows)
    nb = retriever.search(keys, max(k, vote_k, probe_policy.k, *(at.k for at in sweep), *depths))
    metric_name = task.metric_name
    metric = METRICS[metric_name]
    copies = int((nb.similarity[:, 0] >= SAME_KEY).sum())  # report.copies_note says so
    vote = nb.top(vote_k)
    vote_pred = label_vote(vote.labels, vote.similarity, num_labels).argmax(axis=1)
    zero_shot = _zero_shot(logprobs, probe_lp, labels, nb, ctx, metric) if head else None
    probe_layers = [_scores(labels, pred, metric, num_labels) for pred in probe_lp.argmax(axis=2)]
    default = STRATEGIES[DEFAULT_STRATEGY]
    scored = {s.name: s for s in chosen}
    for name in BASELINES.values():
        baseline = resolve(name, num_layers)
        if name not in scored and (head or not baseline.needs_head()) and baseline.answerable(probes):
            scored[name] = baseline
    answers = {name: _answers(s, logprobs, probe_lp, nb, ctx) for name, s in {**scored, default.name: default}.items()}
    reports = {name: _strategy_report(s, answers[name], labels, ctx, metric) for name, s in scored.items()}
    baselines = {name: _brief(reports[s]) if s in reports else None for name, s in BASELINES.items()}
    by_budget = _by_budget(
        ctx, sweep, lambda c: _strategy_report(default, _answers(default, logprobs, probe_lp, nb, c), labels, c, metric)
    )
    per_layer, best, oracle, calibrated = zero_shot or (None, None, None, None)
    found = Found(np.exp(probe_lp.transpose(1, 0, 2)), nb.key_probs(), nb.labels, nb.similarity, nb.probe())
    default_pred = answers[default.name][0]
    against = {}  # the default minus each baseline on these rows, and how much that moves with the rows drawn
    for name, s in BASELINES.items():
        if s in reports and s != default.name:
            gap, se = paired_difference(labels, default_pred, answers[s][0], metric, num_labels)
            against[name] = {"difference": gap, "standard_error": se}
    bound = hindsight(found, probe_policy, labels, default_pred, metric_name, depths, ctx.key_depth)

    report = {
        "task": task_name,
        "label_names": list(task.label_names),
        "input": inputs,
        "db": db_uri,
        "table": table,
        "table_version": opened.version,
        "embedder": embedder,
        "rows_in": rows_in,
        "rows": int(rows.num_rows),
        "rejected": len(rejected),
        "rejected_rows": rejected,
        "num_layers": num_layers,
        "metric_name": metric_name,
        "label_word_head": head,
        "per_layer_accuracy": [s["accuracy"] for s in per_layer] if per_layer else None,
        "per_layer_metric": [s["metric"] for s in per_layer] if per_layer else None,
        "best_layer": {"layer": best + 1, **per_layer[best]} if per_layer else None,
        "oracle_accuracy": oracle["accuracy"] if oracle else None,
        "oracle_metric": oracle["metric"] if oracle else None,
        "full": {**per_layer[-1], "metric_name": metric_name} if per_layer else None,
        "full_calibrated": {"accuracy": calibrated["accuracy"], "metric": calibrated["metric"]} if calibrated else None,
        "neighbour_vote": {**_scores(labels, vote_pred, metric, num_labels), "k": vote.labels.shape[1]},
        "default_strategy": DEFAULT_STRATEGY,
        "strategies": {s.name: reports[s.name] for s in chosen},
        "baselines": baselines,
        "default_against": against,
        "per_layer_probe_accuracy": [s["accuracy"] for s in probe_layers],
        "per_layer_probe_metric": [s["metric"] for s in probe_layers],
        "probes": {
            "pooling": probes.pooling,  # the view: input form and pooling
            "form": probes.form,
            "fit_rows": probes.fit_rows,
            "best_layer": probes.best_layer,
            "reference_oof_metric": probes.oof_metric,
            "key_reference_oof_metric": probes.key_oof_metric,
        },
        "policy": {name: value for name, value in policy.to_dict().items() if name != "bias"} if policy else None,
        "probe_policy": own.to_dict(),
        "layer_cost": {"layer_budget": probe_policy.layer_budget, "layer_price": probe_policy.layer_price},
        "default_by_budget": by_budget,
        "default_hindsight": None
        if bound is None
        else {
            "layer_budget": probe_policy.layer_budget,
            "layer_price": probe_policy.layer_price,
            "metric": bound.best.score,
            "accuracy": bound.best.accuracy,
            "mean_exit_layer": bound.best.mean_exit,
            "settings": dict(zip(SETTING_NAMES, bound.best.settings, strict=True)),
            "held_out_metric": bound.held_out,
            "default_held_out_metric": bound.default_held_out,
            "halvings": HALVINGS,
        },
        "reference_copies": copies,
        "k": min(k, table_rows),  # a search finds at most the table's rows
        "k_asked": k,
        "table_rows": table_rows,
    }
    return Evaluation(report, _predictions(rows.column("id"), labels, answers, list(task.label_names)))


def _by_budget(
    ctx: Context, sweep: list[ProbePolicy], score: Callable[[Context], dict[str, Any]]
) -> list[dict[str, Any]] | None:
    """The default with each of `sweep`'s settings (the table's for SHOWN_BUDGETS and SHOWN_PRICES: what another
    --layer-budget or --layer-price buys, without a rebuild): its leave-one-out score on the reference and
    `score`'s report of it here (None for tables built before frontiers)."""
    if not sweep:
        return None
    out = []
    for at in sweep:
        report = score(replace(ctx, probe_policy=at))
        out.append(
            {
                "layer_budget": at.layer_budget,
                "layer_price": at.layer_price,
                "reference_metric": at.loo_metric,
                "reference_mean_exit": at.loo_mean_exit,
                **_brief(report),
            }
        )
    return out
