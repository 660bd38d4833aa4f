"""Which retrieval key for the default strategy, end to end (issue 12: "a key read from the backbone's first
layer(s) ... which rows that run layers need anyway"). bench/keys.py compares keys by their neighbours' vote alone;
this compares what the default makes of each key, against what each key costs.

On each quality-bench reference table (bench/quality.py runs first and leaves them in .bench/quality-<preset>), the
default's settings are fitted on a seeded half of the rows with each key (build-db's own fit) and scored on the
other half the way classify runs them (the product's own strategy functions), over SPLITS splits. No validation or
test row is read: a rule that uses reference rows only.

Keys: `minilm` (the whole MiniLM, the default until this bench adopted `minilm-3`), `minilm-N` (MiniLM's first N
layers, mean-pooled: a cheaper key, exported beside the quality bench's artifacts for this run), each computed here
from the rows' texts whichever key the quality bench's tables hold, and `layer-N`: the mean over the prompt's real
tokens after the backbone's first N layers, standardized with the fit half's mean and spread, then L2-normalized.
Each key gets its own key probe (the answer at exit 0), fitted on the fit half with out-of-fold answers there, as
build-db fits one.
The per-layer probe answers are out-of-fold ones fitted on the whole table (slightly better informed than a half's
own would be; alike for every key): for a MiniLM key the table's own; for `layer-N` the same unless the table's probes
read the bare input, which a layer-N table's cannot (build-db keeps it on the prompt's views, where its key's
layers are): then probes on the prompt's views are fitted here, as build-db would fit them on such a table.

Cost, in layers of the backbone per row, measured on the same rows in this run: `minilm` and `minilm-N` cost their
key (the graph's time over the time of one backbone layer) plus the row's exit layer (0 at exit 0); a `minilm-N`
table's probes are the MiniLM table's (the key does not change what a layer's probe reads). `layer-N` costs at least
N layers, as the key runs layers 1..N, which a row going further reuses; a row the fitted rule would let out before
layer N is read out at N (it ran that far for its key). The fit here does not know of either adjustment (it
runs as build-db's fit did before build-db learnt to count a layer key's layers), so this measures layer keys as a
drop-in for the MiniLM-keyed fit.
"""

from __future__ import annotations

import sys
from typing import Any

import lancedb
import numpy as np
import pyarrow.parquet as pq
from common import fastest, parse_args, require_data, task_inputs, write_result
from keys import key_artifacts
from quality import BENCH, PRESETS, QUICK_TASKS, TASKS, work_dir
from raee_ops.schemas.tables import PROBES_META_KEY, flat_values

from raee_ops.calibration import K_GRID, not_before_key
from raee_ops.exit_policy import Context, Neighbours, resolve
from raee_ops.layer_key import LayerKey
from raee_ops.metrics import METRICS
from raee_ops.probe_policy import ProbePolicy, confident_exits, fit_probe_policy
from raee_ops.probes import PROMPT_VIEWS, ProbeSet, fit_key_probe, fit_probes  # as build-db fits them
from raee_ops.runtime import SegmentRuntime, mean_states
from raee_ops.tasks import get_task

EMBEDDER = "minilm"
DEPTHS = (1, 2)
#: Truncated MiniLM keys (bench/keys.py compares them by vote and key probe alone).
TRUNCATED = ("minilm-3", "minilm-4")
KEYS = (EMBEDDER, *TRUNCATED)
SPLITS, QUICK_SPLITS = 10, 3
#: Depth the backbone's per-layer time is measured to: (time to TIMING_DEPTH - time to 1) / (TIMING_DEPTH - 1).
TIMING_DEPTH = 4
STRATEGY = "probe-fused"


def reference_rows(preset: str, task_name: str, runtime: SegmentRuntime) -> dict[str, Any] | None:
    """The quality bench's reference table for `task_name` and its rows' texts and prompts, in table order."""
    work = work_dir(preset, task_name)
    if not (work / "db").is_dir() or not (work / "reference.parquet").is_file():
        return None
    table = lancedb.connect(str(work / "db")).open_table(task_name).to_arrow()
    source = pq.read_table(work / "reference.parquet")
    position = {str(row_id): i for i, row_id in enumerate(source["id"].to_pylist())}  # the table stores ids as text
    take = [position[row_id] for row_id in table["id"].to_pylist()]
    task = get_task(task_name)
    texts, pairs, prompts = task_inputs(task, source.take(take), runtime.suffix)
    num_layers, num_labels = runtime.num_layers, len(task.label_names)
    return {
        "texts": texts,
        "pairs": pairs,
        "prompts": prompts,
        "labels": table["label"].to_numpy().astype(np.int64),
        "probe_lp": flat_values(table, "probe_logprobs").reshape(table.num_rows, num_layers, num_labels),
        "probe_form": ProbeSet.from_json(table.schema.metadata[PROBES_META_KEY]).form,
    }


def prompt_view_answers(runtime: SegmentRuntime, task: str, rows: dict[str, Any], metric_name: str) -> np.ndarray:
    """Out-of-fold probe answers N×L×C from the prompt's views, on every row: what a layer-N table holds."""
    _, pooled = runtime.all_layers_pooled(task, rows["prompts"])
    num_labels = rows["probe_lp"].shape[2]
    features = pooled.transpose(1, 0, 2, 3)
    keys = np.zeros((len(rows["labels"]), 1), np.float32)  # the key probe fit_probes adds is not read here
    return fit_probes(features, keys, rows["labels"], num_labels, metric_name, {}, PROMPT_VIEWS).oof


def mean_after(runtime: SegmentRuntime, task: str, prompts: list[str], depth: int) -> np.ndarray:
    pooled = runtime.run_to_exit_pooled(task, prompts, np.full(len(prompts), depth)).pooled
    return mean_states(pooled).astype(np.float32)


def key_probe(keys: np.ndarray, labels: np.ndarray, fit: np.ndarray, num_labels: int) -> np.ndarray:
    """Key-probe log-probs for every row: out of fold on the fit rows, the fit rows' probe on the others."""
    probe, oof = fit_key_probe(keys[fit], labels[fit], num_labels)
    out = probe.log_probs(keys)
    out[fit] = oof
    return out


def held_out(
    policy: ProbePolicy,
    keys: np.ndarray,
    key_lp: np.ndarray,
    probe_lp: np.ndarray,
    rows: dict[str, Any],
    fit: np.ndarray,
    held: np.ndarray,
    depth: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(predictions, exits) of the held-out rows, their neighbours among the fit rows, as classify decides; with a
    layer-`depth` key a row let out before `depth` is read out there (it ran that far for its key)."""
    labels = rows["labels"]
    num_layers, num_labels = probe_lp.shape[1:]
    width = max(K_GRID)
    sims = keys[held] @ keys[fit].T
    top = np.argsort(-sims, axis=1, kind="stable")[:, :width]
    near = fit[top]
    correct = probe_lp.argmax(axis=2) == labels[:, None]
    nb = Neighbours(
        np.zeros((len(held), width, num_layers), bool),  # the head's answers: not read by the default
        np.take_along_axis(sims, top, axis=1),
        labels[near],
        np.zeros((len(held), width, num_layers, num_labels), np.float32),
        correct[near],
        key_lp[held],
    )
    ctx = Context(num_layers, num_labels, 10, probe_policy=policy)
    strategy = resolve(STRATEGY, num_layers)
    own = probe_lp[held]
    exits = confident_exits(np.exp(own.max(axis=2)), strategy.exits(nb, ctx), strategy.threshold(ctx), depth)
    exits = not_before_key(exits, depth)
    at_exit = np.where((exits > 0)[:, None], own[np.arange(len(held)), np.maximum(exits, 1) - 1], 0.0)
    return strategy.answer(at_exit, exits, nb, ctx).argmax(axis=1), exits


def one_task(
    preset: str,
    runtime: SegmentRuntime,
    task_name: str,
    splits: int,
    embedders: tuple[str, ...],
    depths: tuple[int, ...],
) -> dict[str, Any] | None:
    """The default with each sentence key in `embedders` (the others are read against the first) and each layer-N
    key for N in `depths`, over `splits` halvings of the task's reference table."""
    rows = reference_rows(preset, task_name, runtime)
    if rows is None:
        print(f"{preset}/{task_name}: no quality-bench table (run bench/quality.py first); skipped", flush=True)
        return None
    labels, n = rows["labels"], len(rows["labels"])
    num_labels = rows["probe_lp"].shape[2]
    metric_name = get_task(task_name).metric_name
    metric = METRICS[metric_name]
    states = {d: mean_after(runtime, task_name, rows["prompts"], d) for d in depths}
    # each sentence key timed, its vectors taken from the timed run
    timed = {name: fastest(lambda name=name: runtime.key(name, rows["texts"], rows["pairs"])) for name in embedders}
    sentence = {name: vectors for name, (vectors, _) in timed.items()}
    layer_lp = rows["probe_lp"]
    if depths and rows["probe_form"] != "prompt":
        layer_lp = prompt_view_answers(runtime, task_name, rows, metric_name)
    _, one_s = fastest(lambda: mean_after(runtime, task_name, rows["prompts"], 1))
    _, deep_s = fastest(lambda: mean_after(runtime, task_name, rows["prompts"], TIMING_DEPTH))
    layer_s = (deep_s - one_s) / (TIMING_DEPTH - 1)
    key_layers = {name: seconds / layer_s for name, (_, seconds) in timed.items()}
    names = [*sentence, *(f"layer-{d}" for d in depths)]
    out: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for split in range(splits):
        order = np.random.default_rng(100 + split).permutation(n)
        fit, held = np.sort(order[: n // 2]), np.sort(order[n // 2 :])
        for name in names:
            depth = 0 if name in sentence else int(name.split("-")[1])
            keys = sentence[name] if depth == 0 else LayerKey.fit(depth, states[depth][fit]).apply(states[depth])
            probe_lp = rows["probe_lp"] if depth == 0 else layer_lp
            key_lp = key_probe(keys, labels, fit, num_labels)
            policy = fit_probe_policy(keys[fit], labels[fit], probe_lp[fit], key_lp[fit], num_labels, metric_name)
            pred, exits = held_out(policy, keys, key_lp, probe_lp, rows, fit, held, depth)
            cost = key_layers[name] + exits.mean() if depth == 0 else np.maximum(exits, depth).mean()
            out[name].append((metric(labels[held], pred, num_labels), float(cost)))
    result = {
        "task": task_name,
        "metric": metric_name,
        "rows": n,
        "probe_form": rows["probe_form"],  # the table's probes' input form (layer keys: always the prompt)
        "key_layers": key_layers[embedders[0]],
        "key_layers_by_key": key_layers,
        "keys": {
            name: {"metric": float(np.mean([m for m, _ in v])), "layers": float(np.mean([c for _, c in v]))}
            for name, v in out.items()
        },
    }
    cells = ", ".join(f"{k} {v['metric']:.3f} @ {v['layers']:.1f}" for k, v in result["keys"].items())
    print(
        f"{preset}/{task_name} ({metric_name}; {embedders[0]} key = {key_layers[embedders[0]]:.1f} layers): {cells}",
        flush=True,
    )
    return result


def run(name: str, embedders: tuple[str, ...], depths: tuple[int, ...]) -> int:
    """Score the default with the `embedders` keys and layer-`depths` keys on every preset's quality-bench tables;
    write result `name`."""
    args = parse_args(__doc__ or "")
    require_data()  # the quality bench's tables come from the datasets: without them, the benches' skip
    splits = QUICK_SPLITS if args.quick else SPLITS
    presets = []
    for preset in PRESETS:
        artifacts = BENCH / f"artifacts-{preset}"
        if not (artifacts / "manifest.json").is_file():
            print(f"{preset}: no artifacts (run bench/quality.py first); skipped", flush=True)
            continue
        runtime = SegmentRuntime(key_artifacts(artifacts, embedders, tag=name))
        tasks = [
            t
            for t in (
                one_task(preset, runtime, task, splits, embedders, depths)
                for task in (QUICK_TASKS if args.quick else TASKS)
            )
            if t
        ]
        if tasks:
            presets.append({"preset": preset, "num_layers": runtime.num_layers, "tasks": tasks})
    if not presets:
        print("no quality-bench tables to read: run bench/quality.py first", file=sys.stderr)
        return 1
    payload = {
        "strategy": STRATEGY,
        "splits": splits,
        "depths": list(depths),
        "presets": presets,
    }
    write_result(name, payload, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(run("key-policy", KEYS, DEPTHS))
