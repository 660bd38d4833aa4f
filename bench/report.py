"""Build bench/RESULTS.md from bench/results/*.json, so the published numbers are never hand-edited."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from common import REPO_ROOT, RESULTS_DIR

from raee_ops.errors import RaeeConfigError
from raee_ops.key_names import parse_embedder

OUTPUT = REPO_ROOT / "bench" / "RESULTS.md"
#: A layer key replaces MiniLM as the default only within this much macro metric of it (bench/key_policy.py).
KEY_TOLERANCE = 0.005
Doc = dict[str, Any]


def _fmt(value: Any) -> str:
    """Three significant digits, whole numbers from 100 up: enough to compare, short enough to scan."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "**NO**"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines


def _simd(machine: Doc) -> str:
    """The CPU's SIMD features, as bench/common.py records them (results written before it named none)."""
    simd = machine.get("simd")
    return "" if simd is None else f" ({', '.join(simd) or 'no AVX2'})"


def _provenance(doc: Doc, header_machine: Doc) -> str:
    git = doc.get("git") or {}
    parts = [doc.get("date", "?"), f"commit {git.get('commit')}{' (dirty)' if git.get('dirty') else ''}"]
    if doc.get("quick"):
        parts.append("--quick")
    if doc.get("load_avg"):
        parts.append(f"load avg {doc['load_avg'][0]:.1f} (1 min) when written")
    machine = doc.get("machine") or {}
    if machine != header_machine:
        parts.append(f"on {machine.get('cpu')}{_simd(machine)} ×{machine.get('cores')}")
    return "_" + " · ".join(parts) + "_"


def render_retrieval(result: Doc) -> list[str]:
    """Top-k retrieval from LanceDB: exact scan vs vector index, and raee-ops's in-memory exact search; shape written
    by bench/retrieval.py."""
    lines = [
        f"k={result['k']}, dim {result['dim']}, {result['metric']} metric, {result['num_queries']} queries; "
        "recall@k against exact numpy search; p50/p95 are one query per call, throughput is all queries "
        "in one call. in-memory: the table's keys and exit columns read once (its build s), then searched exactly "
        "on ONNX Runtime, as classify searches tables below "
        f"{result.get('index_min_rows', 100_000):,} rows (larger ones: LanceDB's IVF_FLAT index at "
        f"{result.get('probe_share', 0.2):.0%} of its partitions).",
        "",
    ]
    rows = []
    for size in result["sizes"]:
        for run in size["runs"]:
            rows.append(
                [
                    size["rows"],
                    run["method"],
                    run["params"],
                    run["build_s"],
                    run["p50_ms"],
                    run["p95_ms"],
                    run["batch_qps"],
                    run["recall_at_k"],
                ]
            )
    header = ["rows", "method", "params", "index build s", "p50 ms", "p95 ms", "batched q/s", "recall@k"]
    return lines + _table(header, rows)


def render_index_recall(result: Doc) -> list[str]:
    """The IVF index on real keys, at classify's share of partitions and around it; shape written by
    bench/index_recall.py."""
    files = ", ".join(f"{name} {rows:,}" for name, rows in result["files"].items())
    ours = next(run for run in result["runs"] if run["share"] == result["probe_share"])
    exact = ours["exact_vote_accuracy"]
    lines = [
        f"Key `{result['key']}` (the default) of every text in the shared datasets ({files}): {result['rows']:,} rows "
        f"in the table and {result['queries']:,} seeded others as queries; keys computed in {result['keys_s']:.0f} s. "
        f"The table indexed by build-db's own rule ({result['partitions']} partitions, "
        f"{result['kmeans_iterations']} kmeans iterations, built in {result['index_build_s']:.1f} s) and queried as "
        f"classify queries it. recall@k: the exact top-{result['k']} found; vote: the hits' similarity-weighted label "
        "vote (a label of its own per task), agreement with the exact top-k's vote and accuracy against the query's "
        "own label (knn-vote's accuracy).",
        "",
        f"classify's share {result['probe_share']:.0%} ({ours['nprobes']} partitions probed): recall@"
        f"{result['k']} {ours['recall_at_k']:.3f}, vote accuracy {100 * (ours['vote_accuracy'] - exact):+.2f} "
        "points against exact search.",
        "",
    ]
    header = [
        "share probed",
        "nprobes",
        "recall@k",
        "queries under 0.9",
        "vote agreement",
        "vote accuracy",
        "exact vote accuracy",
        "batched q/s",
    ]
    rows = [
        [
            run["share"],
            run["nprobes"],
            run["recall_at_k"],
            run["queries_below_0_9"],
            run["vote_agreement"],
            run["vote_accuracy"],
            run["exact_vote_accuracy"],
            run["batch_qps"],
        ]
        for run in result["runs"]
    ]
    return lines + _table(header, rows)


def render_export(result: Doc) -> list[str]:
    """ONNX export per preset.

    Shape: {"presets": [{"preset": str, "wall_s": float, "size_mb": float, "size_mb_by_kind": {kind: float},
    "peak_rss_mb": float, "verify_max_abs_diff": float, "passed": bool, "error": str (only on failure),
    "optimization": the manifest's record (absent before it was kept)}, ...]}
    """
    header = ["preset", "wall s", "size MB", "MB by kind", "peak RSS MB", "verify max abs diff", "passed"]
    rows = []
    for p in result["presets"]:
        kinds = ", ".join(f"{k} {_fmt(v)}" for k, v in (p.get("size_mb_by_kind") or {}).items())
        rows.append(
            [
                p["preset"],
                p.get("wall_s"),
                p.get("size_mb"),
                kinds or p.get("error"),
                p.get("peak_rss_mb"),
                p.get("verify_max_abs_diff"),
                p.get("passed"),
            ]
        )
    lines = _table(header, rows)
    for p in result["presets"]:
        if "optimization" in p:
            lines += _fusions(p["optimization"], f" of {p['preset']}")
    return lines


#: Strategies whose scores are the quality table's own "full" and "full calibrated" columns (at every layer).
SAME_AS_COLUMNS = ("full", "full-cal")


def render_quality(result: Doc) -> list[str]:
    """Task quality of one preset: one row per task plus the macro average, then the default strategy's goal
    check (issue 5: ≥ 10 points over the full model, not below the calibrated full model, ≤ 60% of layers).

    Shape: {"preset": str, "strategies": [str, ...], "default_strategy": str, "tasks": [{"task": str,
    "metric": str, "num_layers": int, "full": float, "full_calibrated": float,
    "best_layer": {"layer": int, "score": float}, "oracle": float, "neighbour_vote": {"score": float},
    "strategies": {name: {"score": float, "mean_exit_layer": float}}, "split": str}, ...]}
    Scores are the task's metric; a strategy cell is "score @ mean exit layer / L". A backbone without a label-word
    head (minilm-l6) has None for the head's numbers and lacks the strategies that read it: shown as "–".
    """
    names, tasks = result["strategies"], result["tasks"]
    shown = [n for n in names if n not in SAME_AS_COLUMNS]
    header = ["task", "metric", "L", "full", "full calibrated", "best layer", "oracle", "neighbour vote"] + shown
    rows: list[list[Any]] = []
    for task in tasks:
        best = task["best_layer"]
        row: list[Any] = [
            task["task"],
            task["metric"],
            task["num_layers"],
            task["full"],
            task["full_calibrated"],
            f"{_fmt(best['score'])} (L{best['layer']})" if best else None,
            task["oracle"],
            task["neighbour_vote"]["score"],
        ]
        row += [_strategy_cell(task["strategies"].get(name)) for name in shown]
        rows.append(row)
    if not tasks:
        return ["No tasks."]

    full, calibrated = _mean([t["full"] for t in tasks]), _mean([t["full_calibrated"] for t in tasks])
    macro: dict[str, tuple[float, float]] = {}  # strategy -> (score, share of layers)
    row = [
        "**macro avg**",
        "",
        "",
        full,
        calibrated,
        _mean([t["best_layer"]["score"] if t["best_layer"] else None for t in tasks]),
        _mean([t["oracle"] for t in tasks]),
        _mean([t["neighbour_vote"]["score"] for t in tasks]),
    ]
    for name in names:
        if not all(name in t["strategies"] for t in tasks):  # reads a label-word head the backbone lacks
            row += [None] if name in shown else []
            continue
        score = _mean([t["strategies"][name]["score"] for t in tasks])
        share = _mean([t["strategies"][name]["mean_exit_layer"] / t["num_layers"] for t in tasks])
        macro[name] = (score, share)
        if name in shown:
            row.append(f"{_fmt(score)} @ {share:.0%} of layers")
    rows.append(row)
    lines = _table(header, rows) + _accuracy_table(shown, tasks) + _baselines(result)
    for task in tasks:
        lines.append(
            f"- {task['task']}: {task.get('reference_rows')} reference rows, {task.get('eval_rows')} scored rows "
            f"({task.get('rejected', 0)} rejected); {task.get('split', '')}"
        )
    default = result.get("default_strategy")
    if default in macro and full is None:
        lines += ["", f"No label-word head on {result['preset']}: no zero-shot comparison for `{default}`."]
    elif default in macro:
        score, share = macro[default]
        gain = 100 * (score - full)
        checks = [
            f"{gain:+.1f} points over the full model (goal ≥ +10: {'met' if gain >= 10 else 'NOT met'})",
            f"{100 * (score - calibrated):+.1f} points over the calibrated full model (goal ≥ 0: "
            f"{'met' if score >= calibrated else 'NOT met'})",
            f"{share:.0%} of the layers on average (goal ≤ 60%: {'met' if share <= 0.6 else 'NOT met'})",
        ]
        no_layers = [t["strategies"][default].get("retrieval_only_share") for t in tasks]
        if None not in no_layers:
            checks.append(f"{_mean(no_layers):.0%} of rows answered from retrieval alone (exit 0, no layer run)")
        lines += ["", f"Default strategy `{default}`, macro average: " + "; ".join(checks) + "."]
    return lines


def _mean(values: list[float | None]) -> float | None:
    """The mean, or None when a value is absent (a number of a label-word head the backbone lacks)."""
    return None if not values or None in values else sum(values) / len(values)  # type: ignore[arg-type]


#: Issue 9's goals for the default against what a user would pick instead: (baseline, points the default must be
#: ahead by; negative: may trail by), on the macro average of each task's metric.
BASELINE_GOALS = (("key-lr", 5.0), ("knn-vote", 10.0), ("probe-best", -1.0))
#: Baselines the default is set against without a goal: (name, what it is).
UNGOALED = (("sentence-lr", "the user's own pick"), ("majority", "the floor, every row the most common label"))
MAX_LAYER_SHARE = 0.35


def _interval(estimates: list[Doc | None], value: float, goal: float, unit: str = "") -> str:
    """The 95% interval of a macro figure `value` (points: a gap, or with unit "%" a share) as the scored rows allow
    it, from each task's estimate's standard error (a paired difference's, or a mean's; the tasks' rows drawn
    independently), and whether it decides the goal; "" for results written before the benches measured the spread."""
    if not estimates or None in estimates:
        return ""
    se = 100 * math.sqrt(sum(e["standard_error"] ** 2 for e in estimates)) / len(estimates)
    low, high = value - 1.96 * se, value + 1.96 * se
    undecided = "; the scored rows cannot tell" if low < goal < high else ""
    sign = "" if unit else "+"  # a share has no sign
    return f"; 95% interval {low:{sign}.1f}{unit} to {high:{sign}.1f}{unit}{undecided}"


def _baselines(result: Doc) -> list[str]:
    """The baselines (all fitted on the same reference rows) per task, score @ mean layers, and issue 9's goal lines
    for the default: each met or not, with the macro numbers and the tasks that miss."""
    tasks = [t for t in result["tasks"] if "baselines" in t]
    if not tasks:
        return []
    names = list(tasks[0]["baselines"])
    header = ["task", "metric", "probe view (best layer)"] + names
    rows: list[list[Any]] = [
        [t["task"], t["metric"], f"{t['probe_pooling']} (L{t['probe_best_layer']})"]
        + [_strategy_cell(t["baselines"][n]) for n in names]
        for t in tasks
    ]

    def macro(name: str) -> float:
        return sum(t["baselines"][name]["score"] for t in tasks) / len(tasks)

    def share(name: str) -> float:
        return sum(t["baselines"][name]["mean_exit_layer"] / t["num_layers"] for t in tasks) / len(tasks)

    def cell(name: str) -> str | None:
        if not all(t["baselines"][name] for t in tasks):  # reads a label-word head the backbone lacks
            return None
        return f"{_fmt(macro(name))} @ {share(name):.0%} of layers"

    rows.append(["**macro avg**", "", ""] + [cell(n) for n in names])
    lines = [
        "",
        "Against what a user would pick instead, all fitted on the same reference rows (score @ mean layers run; "
        f"key-lr: logistic regression on the retrieval key (`{result.get('embedder')}`); knn-vote: the neighbours' "
        "label vote, k=10; majority: the reference's most common label for every row; probe-best: the probe of the "
        "single layer best out of fold on the reference; probe-last: the last layer's probe; sentence-lr: logistic "
        "regression on MiniLM's whole sentence embedding, what a user fits without raee-ops; "
        f"default: `{result.get('default_strategy')}`):",
        "",
        *_table(header, rows),
        "",
    ]
    default = macro("default")
    checks = []
    for name, ahead in BASELINE_GOALS:
        gap = 100 * (default - macro(name))
        misses = [
            f"{t['task']} {100 * (t['baselines']['default']['score'] - t['baselines'][name]['score']):+.1f}"
            for t in tasks
            if 100 * (t["baselines"]["default"]["score"] - t["baselines"][name]["score"]) < ahead
        ]
        verdict = "met" if gap >= ahead else "NOT met"
        where = f"; tasks short of it: {', '.join(misses)}" if misses else ""
        spread = _interval([t.get("default_against", {}).get(name) for t in tasks], gap, ahead)
        checks.append(f"{gap:+.1f} points against {name} (goal {ahead:+.0f}: {verdict}{spread}{where})")
    for name, what in UNGOALED:
        if name not in names:  # results written before it was scored
            continue
        gap = 100 * (default - macro(name))
        behind = [t["task"] for t in tasks if t["baselines"]["default"]["score"] < t["baselines"][name]["score"]]
        checks.append(
            f"{gap:+.1f} points against {name} (no goal: {what}; behind it on {', '.join(behind) or 'no task'})"
        )
    layers = share("default")
    over = [
        t["task"] for t in tasks if t["baselines"]["default"]["mean_exit_layer"] > MAX_LAYER_SHARE * t["num_layers"]
    ]
    spread = _interval([t.get("default_exit_share") for t in tasks], 100 * layers, 100 * MAX_LAYER_SHARE, "%")
    checks.append(
        f"{layers:.0%} of the layers on average (goal ≤ {MAX_LAYER_SHARE:.0%}: "
        f"{'met' if layers <= MAX_LAYER_SHARE else 'NOT met'}{spread}{'; over on ' + ', '.join(over) if over else ''})"
    )
    summary = f"Default `{result.get('default_strategy')}`, macro average (issue 9): " + "; ".join(checks) + "."
    curves = _curves_png(result["preset"])
    image = [f"![probe and label-word head by layer]({curves.name})", ""] if curves.is_file() else []
    return lines + [summary, "", *_hindsight(tasks), *_reference_estimates(tasks), *_budget_sweep(tasks), *image]


def _reference_estimates(tasks: list[Doc]) -> list[str]:
    """What the reference rows alone predicted (the default's leave-one-out metric and mean exit for the setting
    its policy chose; probe-best's out-of-fold metric) beside the scored rows: where the default loses to
    probe-best on unseen rows although it did not on the reference, the estimate did not carry over."""
    tasks = [t for t in tasks if t.get("reference_estimate")]
    if not tasks:
        return []
    header = ["task", "default on reference", "default scored", "probe-best on reference", "probe-best scored"]
    rows: list[list[Any]] = []
    for t in tasks:
        est, base = t["reference_estimate"], t["baselines"]
        rows.append(
            [
                t["task"],
                f"{_fmt(est['default'])} @ {est['default_mean_exit_layer']:.1f}",
                _strategy_cell(base["default"]),
                est["probe_best"],
                base["probe-best"]["score"],
            ]
        )
    ref_gap = 100 * _mean([t["reference_estimate"]["default"] - t["reference_estimate"]["probe_best"] for t in tasks])
    test_gap = 100 * _mean([t["baselines"]["default"]["score"] - t["baselines"]["probe-best"]["score"] for t in tasks])
    return [
        "The default against probe-best as the reference rows predicted them (leave-one-out and out of fold, the "
        "numbers build-db chose settings by) and as scored:",
        "",
        *_table(header, rows),
        "",
        f"Macro, default minus probe-best: {ref_gap:+.1f} points on the reference rows, {test_gap:+.1f} on the "
        "scored rows.",
        "",
    ]


def _hindsight(tasks: list[Doc]) -> list[str]:
    """Whether choosing the default's settings on the reference rows is what costs it against probe-best: the same
    grid chosen on the scored rows themselves (in-sample: an optimistic bound) and on half of them, scored on the
    other half (an honest estimate of choosing on rows of the scored distribution), against the default."""
    tasks = [t for t in tasks if t.get("default_hindsight")]
    if not tasks:
        return []
    bounds = [t["default_hindsight"] for t in tasks]
    default = _mean([t["baselines"]["default"]["score"] for t in tasks])
    best = _mean([t["baselines"]["probe-best"]["score"] for t in tasks])
    in_sample = _mean([b["metric"] for b in bounds])
    share = _mean([b["mean_exit_layer"] / t["num_layers"] for b, t in zip(bounds, tasks, strict=True)])
    scored = round(_mean([t["eval_rows"] for t in tasks]))
    reference = round(_mean([t["reference_rows"] for t in tasks]))
    lines = [
        f"With hindsight, the best setting of the default's grid within layer budget {bounds[0]['layer_budget']} at "
        f"layer price {bounds[0].get('layer_price', 0.0)}, chosen on the scored rows and scored on them, reaches "
        f"{_fmt(in_sample)} at {share:.0%} of the layers "
        f"(macro): {100 * (in_sample - best):+.1f} points against probe-best, {100 * (in_sample - default):+.1f} "
        f"above the default. That is partly luck: the best of thousands of settings on about {scored} scored rows "
        "per task."
    ]
    if all("held_out_metric" in b for b in bounds):
        held_out = _mean([b["held_out_metric"] for b in bounds])
        default_halves = _mean([b["default_held_out_metric"] for b in bounds])
        lines[0] += (
            f" Chosen on one half of the scored rows and scored on the other ({bounds[0]['halvings']} halvings, "
            f"both ways), the grid reaches {_fmt(held_out)} against the default's {_fmt(default_halves)} on the same "
            f"halves ({100 * (held_out - default_halves):+.1f} points): that is what about {scored // 2} rows of "
            f"the scored distribution, as the rows to choose on, are worth against {reference} reference rows. On "
            f"rows its choice did not see the in-sample figure falls by {100 * (in_sample - held_out):.1f} points."
        )
    return lines + [""]


def _budget_sweep(tasks: list[Doc]) -> list[str]:
    """The default at other layer budgets and prices, each with the settings its table keeps for it (classify
    --layer-budget / --layer-price): what more or fewer layers buy against probe-best, macro over the tasks."""
    tasks = [t for t in tasks if t.get("default_by_budget")]
    if not tasks:
        return []
    best = _mean([t["baselines"]["probe-best"]["score"] for t in tasks])
    best_share = _mean([t["baselines"]["probe-best"]["mean_exit_layer"] / t["num_layers"] for t in tasks])
    own = tasks[0].get("layer_cost") or {"layer_budget": 0.35}  # results from before the price: a budget alone
    rows: list[list[Any]] = []
    for i, point in enumerate(tasks[0]["default_by_budget"]):
        at = [t["default_by_budget"][i] for t in tasks]
        scored = _mean([b["metric"] for b in at])
        rows.append(
            [
                point["layer_budget"],
                point.get("layer_price", 0.0),
                _mean([b["reference_metric"] for b in at]),
                scored,
                f"{_mean([b['mean_layers_run'] / t['num_layers'] for b, t in zip(at, tasks, strict=True)]):.0%}",
                f"{100 * (scored - best):+.1f}",
            ]
        )
    header = [
        "layer budget",
        "layer price",
        "default on reference (left out)",
        "default scored",
        "layers run",
        "− probe-best",
    ]
    return [
        "The default at other layer budgets and prices (macro over the tasks), each with the settings its table keeps "
        f"for it (`classify --layer-budget`, `--layer-price`; the tables were built with budget "
        f"{own.get('layer_budget')} and price {own.get('layer_price', 0.0)}); probe-best scored {_fmt(best)} at "
        f"{best_share:.0%} of the layers:",
        "",
        *_table(header, rows),
        "",
    ]


def _price_calibration(results: list[Doc]) -> list[str]:
    """The default layer price's rule, checked on this run's reference rows alone: the share of the layers the
    settings each price chooses run on the reference rows (left out), averaged over every quality table, beside the
    default price's (set where that average is the 35% cost target)."""
    tables = [t for r in results for t in r["tasks"] if t.get("layer_cost")]
    if not tables:
        return []
    own = tables[0]["layer_cost"]
    shares: dict[float, list[float]] = {}
    for t in tables:
        for point in t["default_by_budget"]:
            if point["layer_budget"] == own["layer_budget"]:
                share = point["reference_mean_exit"] / t["num_layers"]
                shares.setdefault(point["layer_price"], []).append(share)
    cells = ", ".join(f"{price:g}: {_mean(values):.0%}" for price, values in sorted(shares.items()))
    return [
        "Layer price, reference rows only (the default price's rule): the share of the layers the default runs on "
        f"the reference rows (left out) at each price, averaged over these {len(tables)} tables: {cells}. The "
        f"default price is {own['layer_price']:g}, budget {own['layer_budget']:g}.",
        "",
    ]


def _curves_png(preset: str) -> Path:
    return OUTPUT.parent / f"probe-curves-{preset}.png"


def plot_probe_curves(result: Doc) -> None:
    """Per task, the probes' and the label-word head's score by layer on the scored rows, with the default,
    key-lr and probe-best at their mean layers run: bench/probe-curves-<preset>.png (skipped without matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in result["tasks"] if "probe_layer" in t]
    if not tasks:
        return
    cols, rows = 4, (len(tasks) + 3) // 4
    fig, axes = plt.subplots(rows, cols, figsize=(14, 3.2 * rows), squeeze=False)
    for ax, t in zip(axes.ravel(), tasks, strict=False):
        layers = range(1, t["num_layers"] + 1)
        ax.plot(layers, t["probe_layer"], "-", color="tab:blue", label="probe")
        if t["head_layer"]:  # none without a label-word head
            ax.plot(layers, t["head_layer"], "-", color="black", label="label-word head")
        for name, marker, color in (
            ("default", "*", "tab:red"),
            ("key-lr", "D", "tab:orange"),
            ("probe-best", "s", "tab:green"),
        ):
            b = t["baselines"][name]
            ax.plot(b["mean_exit_layer"], b["score"], marker, color=color, markersize=9, label=name)
        ax.set(title=f"{t['task']} ({t['metric']})", xlabel="layer / mean layers run")
    for ax in axes.ravel()[len(tasks) :]:
        ax.axis("off")
    axes.ravel()[0].legend(fontsize=7)
    fig.suptitle(f"{result['preset']}: score by layer on the scored rows")
    fig.tight_layout()
    fig.savefig(_curves_png(result["preset"]), dpi=80)
    plt.close(fig)


def _accuracy_table(names: list[str], tasks: list[Doc]) -> list[str]:
    """Plain accuracy beside the task metrics above, for the tasks whose metric is not accuracy."""
    other = [t for t in tasks if t["metric"] != "accuracy"]
    if not other:
        return []
    header = ["task (accuracy)", "full", "full calibrated", "neighbour vote"] + names
    rows = [
        [t["task"], t["accuracy"]["full"], t["accuracy"]["full_calibrated"], t["neighbour_vote"]["accuracy"]]
        + [(t["strategies"].get(name) or {}).get("accuracy") for name in names]
        for t in other
    ]
    return ["", "Accuracy on the tasks scored above with another metric:", ""] + _table(header, rows) + [""]


def _strategy_cell(entry: Doc | None) -> str:
    return "–" if not entry else f"{_fmt(entry['score'])} @ {entry['mean_exit_layer']:.1f}"


def render_speed(result: Doc) -> list[str]:
    """Throughput and accuracy of one preset per method, on the same rows, against the baseline method.

    Shape: {"preset": str, "task": str, "num_layers": int, "rows": int, "reference_rows": int, "k": int,
    "batch_size": int, "baseline": str, "threads": {name: int | str | null}, "timing": str,
    "methods": [{"method": str, "rows_per_s": float, "wall_s": float, "accuracy": float,
    "mean_exit_layer": float | null, "retrieval_only_share": float (early-exit methods), "ideal_speedup": float
    (idem), "speedup_vs_segments": float (idem), "phase_share": {phase: float} (idem), "max_abs_diff_vs_segments":
    float (whole-model ONNX)}, ...]}. Exit 0 rows are answered from retrieval alone and run no layer.
    Ideal × is num_layers / mean_exit_layer: what exiting would give if retrieval and exit checks cost nothing.
    """
    baseline = result.get("baseline", "full")
    base = next((m["rows_per_s"] for m in result["methods"] if m["method"] == baseline), None)
    rows = []
    for m in result["methods"]:
        shares = m.get("phase_share") or {}
        split = ", ".join(f"{k} {v:.1%}" for k, v in shares.items() if v >= 0.0005)
        if "max_abs_diff_vs_segments" in m:
            split = f"max abs diff vs segments {_fmt(m['max_abs_diff_vs_segments'])}"
        if "speedup_vs_ort_whole" in m:  # the chained segments against the one-graph model and an older export
            split = ", ".join(
                f"{_fmt(m[key])}× {label}"
                for key, label in (("speedup_vs_ort_whole", "ort-whole"), ("speedup_vs_baseline", "baseline"))
                if key in m
            )
        rows.append(
            [
                m["method"],
                m["rows_per_s"],
                m["rows_per_s"] / base if base else None,
                m.get("accuracy"),
                m.get("mean_exit_layer"),
                m.get("retrieval_only_share"),
                m.get("ideal_speedup"),
                m.get("speedup_vs_segments"),
                split,
            ]
        )
    threads = ", ".join(f"{k} {v}" for k, v in (result.get("threads") or {}).items())
    lines = [
        f"{result.get('task')}, {result.get('rows')} rows (reference table {result.get('reference_rows')} rows, "
        f"k={result.get('k')}), {result['num_layers']} layers, batch {result.get('batch_size')}; threads: {threads}. "
        f"{result.get('timing', '')}",
        "",
    ]
    base = result.get("baseline_export")
    if base:
        kind = "optimized" if base["optimized"] else "stored before fusion (no optimization record)"
        lines += [
            f"segments-baseline: the --baseline-artifacts export, {kind}"
            f"{', quantized' if base['quantized'] else ''}; fingerprint {base['fingerprint'][:12]}.",
            "",
        ]
    default, layer_keyed = result.get("default_strategy", ""), result.get("layer_key_default")
    lines += _speed_goal(result, default) + _compute_limit_goals(result, default)
    if layer_keyed:
        lines += _speed_goal(result, layer_keyed) + _compute_limit_goals(result, layer_keyed, chains=False)
    header = [
        "method",
        "rows/s",
        f"× {baseline}",
        "accuracy",
        "mean exit layer",
        "rows with exit 0",
        "ideal ×",
        "× segments",
        "notes",
    ]
    return lines + _table(header, rows) + _fusions(result.get("fusions"))


def _fusions(optimization: Doc | None, of: str = "") -> list[str]:
    """The artifacts' manifest record of fused ops per stored graph, runs of identical layers on one line."""
    if not optimization:
        return ["", f"Fusions per segment{of}: graphs stored as exported (no optimization recorded in the manifest)."]
    groups: list[list[Any]] = []  # [first file, last file, nodes, fused]
    for file, report in optimization["graphs"].items():
        fused = ", ".join(f"{op} {n}" for op, n in report["fused"].items()) or "none"
        if groups and groups[-1][2:] == [report["nodes"], fused]:
            groups[-1][1] = file
        else:
            groups.append([file, file, report["nodes"], fused])
    rows = [[first if first == last else f"{first} … {last}", nodes, fused] for first, last, nodes, fused in groups]
    title = f"Fusions per segment{of} ({optimization['method']}):"
    return ["", title, "", *_table(["graph", "nodes", "fused ops"], rows)]


SPEED_GOAL = 3.0


def _speed_goal(result: Doc, name: str) -> list[str]:
    """The speed goal for the default strategy (issue 9: ≥ SPEED_GOAL× the full model, key, retrieval and probes
    included, at accuracy not below it).

    Judged twice: per row (the in-process classify core, tokenizing, key and retrieval included, against the full
    model in three engines) and per job (a whole Beam classify run of the bench rows, start-up included)."""
    methods = {m["method"]: m for m in result["methods"]}

    def verdict(label: str, pairs: list[tuple[Doc | None, Doc | None]]) -> str | None:
        pairs = [(d, f) for d, f in pairs if d and f]
        if not pairs:
            return None
        ratios = [d["rows_per_s"] / f["rows_per_s"] for d, f in pairs]
        met = min(ratios) >= SPEED_GOAL and all(d["accuracy"] >= f["accuracy"] for d, f in pairs)
        shown = ", ".join(f"{r:.2f}× {f['method']}" for r, (_, f) in zip(ratios, pairs, strict=True))
        return f"{label}: {shown} ({'met' if met else 'NOT met'})"

    default = methods.get(name)
    # without a label-word head the full model is every layer read by the last probe (bench/speed.py)
    fulls = [f for f in ("segments", "full", "hf-torch") if f in methods] or ["probe-last"]
    checks = [
        verdict("per row, in process", [(default, methods.get(f)) for f in fulls]),
        verdict(
            f"per Beam job of {result.get('rows')} rows, start-up included",
            [(methods.get(f"beam-{name}"), methods.get("beam-full") or methods.get("beam-probe-last"))],
        ),
    ]
    checks = [c for c in checks if c]
    if not default or not checks:
        return []
    full = (methods.get(fulls[0]) or {}).get("accuracy", float("nan"))
    return [
        f"Default strategy `{name}` against the full model run the same way (goal ≥ {SPEED_GOAL:g}× at accuracy not "
        f"below the full model's; accuracy {default['accuracy']:.3f} against {full:.3f}): " + "; ".join(checks) + ".",
        "",
    ]


#: Issue 12's goals: chain against the whole-model graph and against the pre-fusion export, the key's share of the
#: default's time, the default against the full model per preset, and its time against its parts timed alone.
CHAIN_VS_WHOLE, CHAIN_VS_OLD, KEY_SHARE, OVERHEAD = 0.95, 1.5, 0.15, 1.25
DEFAULT_VS_FULL = {"smollm2-135m": 5.0, "gemma3-270m": 3.5}


def _compute_limit_goals(result: Doc, name: str, chains: bool = True) -> list[str]:
    """Issue 12's speed goals for the default run as `name`, each met or not with its number, or why this run
    could not judge it; `chains`: the segment chains' goals too (they do not depend on the strategy)."""
    methods = {m["method"]: m for m in result["methods"]}
    default, segments = methods.get(name), methods.get("segments")
    base = result.get("baseline_export")
    pre_fusion = methods.get("segments-baseline") if base and not (base["optimized"] or base["quantized"]) else None

    def goal(text: str, value: float | None, target: float, at_most: bool = False) -> str:
        if value is None:
            return f"{text}: not measured in this run"
        met = value <= target if at_most else value >= target
        return f"{text}: {value:.2f} ({'met' if met else 'NOT met'})"

    checks = []
    if segments and chains:
        checks.append(
            goal(
                f"chained segments ≥ {CHAIN_VS_WHOLE}× ort-whole", segments.get("speedup_vs_ort_whole"), CHAIN_VS_WHOLE
            )
        )
        checks.append(
            goal(
                f"≥ {CHAIN_VS_OLD}× the pre-fusion chain (needs --baseline-artifacts of an unoptimized export)",
                segments.get("speedup_vs_baseline") if pre_fusion else None,
                CHAIN_VS_OLD,
            )
        )
    if default:
        share = (default.get("phase_share") or {}).get("key")
        checks.append(goal(f"key ≤ {KEY_SHARE:.0%} of the default's time", share, KEY_SHARE, at_most=True))
        target = DEFAULT_VS_FULL.get(result["preset"])
        # the issue measures against the segments as they were before fusion, where this run chained them too
        full = pre_fusion or segments
        if target and full:
            ratio = default["rows_per_s"] / full["rows_per_s"]
            line = goal(f"default ≥ {target:g}× the full model on the {full['method']}", ratio, target)
            # the goal asks the speed at issue 9's accuracy: its gap to probe-best, read on these rows
            best, ahead = methods.get("probe-best"), dict(BASELINE_GOALS)["probe-best"]
            if best is not None:
                gap = 100 * (default["accuracy"] - best["accuracy"])
                line += (
                    f", at accuracy {default['accuracy']:.3f}, {gap:+.1f} points against probe-best on these rows "
                    f"(issue 9's ≥ {ahead:g}: {'met' if gap >= ahead else 'NOT met'})"
                )
            checks.append(line)
        overhead = default.get("overhead")
        checks.append(
            goal(
                f"default ≤ {OVERHEAD}× the sum of its parts timed alone",
                overhead and overhead["ratio"],
                OVERHEAD,
                at_most=True,
            )
        )
    if not checks:
        return []
    parts = ""
    if default and default.get("overhead"):
        o = default["overhead"]
        parts = (
            f" Parts: the default's layers took {o['layers_measured_s']:.2f} s against {o['layers_full_batch_s']:.2f}"
            f" s for the same rows to the same exits in full batches; {o['measured_s']:.2f} s in all against"
            f" {o['parts_s']:.2f} s."
        )
        if "layers_at_mean_depth_s" in o:
            parts += (
                f" Priced instead at the mean exit over all rows' average length, as earlier runs did, the layers"
                f" would take {o['layers_at_mean_depth_s']:.2f} s (the rows that run deep are not average)."
            )
    label = "Issue 12" if chains else f"Issue 12, `{name}`"
    return [f"{label}: " + "; ".join(checks) + "." + parts, ""]


def render_probe_fit(result: Doc) -> list[str]:
    """build-db's probe fit at its row cap and the probe policy fit on a large table (bench/probe_fit.py)."""
    return [
        f"Probes: {result['fit_rows']:,} fit rows (C and view chosen on {result['cv_rows']:,}), {result['layers']} "
        f"layers × {result['views']} views × hidden {result['hidden']} (SmolLM2's shape, synthetic features): "
        f"**{result['probe_fit_s']} s**. Probe policy (leave-one-out) on a {result['policy_table_rows']:,}-row table: "
        f"**{result['policy_fit_s']} s**. {_probe_cap(result)}",
    ]


def _probe_cap(result: Doc) -> str:
    """What the fit's time says of larger tables: build-db fits on at most the cap's rows (a quick run fits fewer;
    results before the cap was recorded were full runs, at the cap)."""
    cap = result.get("fit_row_cap", result["fit_rows"])
    sample = f"Tables above {cap:,} rows fit their probes on a sample of that size"
    if result["fit_rows"] == cap:
        return f"{sample}, so this is the fit's cost at any larger size."
    return f"{sample}; this quick run fitted {result['fit_rows']:,}, so it is not the cost at the cap."


#: Issue 12's INT8 goals: throughput of the default against fp32's, and the most its macro metric may drop.
INT8_SPEEDUP, INT8_MAX_DROP = 1.8, 0.01


def render_int8(result: Doc) -> list[str]:
    """The default strategy on int8 against fp32 artifacts, same rows, each with probes fitted on its own states;
    a `--speed-only` result (int8-speed-<preset>) has the speed part alone, a `--quality-only` one the metrics."""
    tasks = result.get("tasks")
    method = result.get("int8_method", "ONNX Runtime's dynamic quantization, one input scale per batch")
    key = f" Key: `{result['embedder']}`." if "embedder" in result else " Key: not recorded (runs before it was)."
    lines: list[str] = [f"INT8 method: {method}.{key}", ""]
    verdicts = []
    if tasks:
        lines += [
            "| task | fp32 default | int8 default | Δ | fp32 probe-best | int8 probe-best | fp32 key-lr |",
            "|---|---|---|---|---|---|---|",
        ]
        for task, v in tasks.items():
            f, q = v["fp32"], v["int8"]
            lines.append(
                f"| {task} | {_fmt(f['score'])} @ {f['mean_exit_layer']:.1f} | {_fmt(q['score'])} @ "
                f"{q['mean_exit_layer']:.1f} | {q['score'] - f['score']:+.3f} | {_fmt(f['probe_best'])} | "
                f"{_fmt(q['probe_best'])} | {_fmt(f['key_lr'])} |"
            )
        macro = {v: sum(t[v]["score"] for t in tasks.values()) / len(tasks) for v in ("fp32", "int8")}
        drop = macro["fp32"] - macro["int8"]
        lines += [f"| **macro avg** | {_fmt(macro['fp32'])} | {_fmt(macro['int8'])} | {-drop:+.3f} |  |  |  |", ""]
        spread = _interval([v.get("int8_minus_fp32") for v in tasks.values()], -100 * drop, -100 * INT8_MAX_DROP)
        verdicts.append(
            f"the default's macro metric within {INT8_MAX_DROP * 100:.0f} point of fp32's: {-drop * 100:+.1f} points "
            f"({'met' if drop <= INT8_MAX_DROP + 1e-9 else 'NOT met'}{spread})"
        )
    sp = result.get("speed")
    if sp is None:  # a --quality-only run: the speed is an int8-speed-<preset> result's
        return [*lines, "Issue 12, INT8: " + "; ".join(verdicts) + " (speed: the int8-speed result)."]
    ratio = sp["int8"]["default_rows_per_s"] / sp["fp32"]["default_rows_per_s"]
    full_ratio = sp["int8"]["segments_rows_per_s"] / sp["fp32"]["segments_rows_per_s"]
    timing = result.get("timing", "after the quality runs, in the same process, each variant timed on its own")
    lines += [
        f"Speed in process (sst2, {sp['fp32']['rows']} rows, key, retrieval and probes included; {timing}): default "
        f"{sp['fp32']['default_rows_per_s']:.1f} rows/s fp32 at a mean exit of "
        f"{sp['fp32']['default_mean_exit_layer']:.1f}, {sp['int8']['default_rows_per_s']:.1f} int8 at "
        f"{sp['int8']['default_mean_exit_layer']:.1f} ({ratio:.2f}×); the full model on the same segments "
        f"{sp['fp32']['segments_rows_per_s']:.1f} fp32, {sp['int8']['segments_rows_per_s']:.1f} int8 "
        f"({full_ratio:.2f}×).",
        "",
    ]
    met = "met" if ratio >= INT8_SPEEDUP else "NOT met"
    if "timing" not in result:  # the bench before 90143f6: fp32 timed alone after 16 quality runs, far too slow
        met = "not judged: timed after the quality runs in one long process; see a run that times speed first"
    exits = sp["fp32"]["default_mean_exit_layer"], sp["int8"]["default_mean_exit_layer"]
    if abs(exits[0] - exits[1]) >= 0.5:  # each variant's table has its own fit: the depths need not agree
        met += (
            f"; the two tables' fits exit at {exits[1]:.1f} layers (int8) and {exits[0]:.1f} (fp32), so this is "
            f"not the layers' speed-up alone: at full depth int8 is {full_ratio:.2f}×"
        )
    verdicts.insert(0, f"≥ {INT8_SPEEDUP}× the fp32 default's throughput: {ratio:.2f}× ({met})")
    return [*lines, "Issue 12, INT8: " + "; ".join(verdicts) + ".", *_int8_vs_pre_fusion(result)]


def render_quant_methods(result: Doc) -> list[str]:
    """INT8 methods checked as the export checks its int8 layers (bench/int8_methods.py)."""
    limits = result["limits"]
    rows = [
        [name, m["last_layer_relative_error"], m["last_layer_head_agreement"], m["batch_dependence"]]
        for name, m in result["methods"].items()
    ]
    header = ["method", "last-layer error vs fp32", "zero-shot heads agreeing", "a row's move, batch cut in two"]
    return [
        f"On {result['prompts']}; errors relative to the fp32 states' size. The export refuses an error over "
        f"{limits['max_relative_error']:g} or a move over {limits['max_batch_dependence']:g}.",
        "",
        *_table(header, rows),
    ]


def _int8_vs_pre_fusion(result: Doc) -> list[str]:
    """Issue 12's default-against-the-pre-fusion-chain goal read for the int8 default, where the run timed an
    unoptimized, unquantized export's full chain with it (`--baseline-artifacts`)."""
    sp, target = result["speed"], DEFAULT_VS_FULL.get(result["preset"])
    base = sp.get("baseline")
    if not base or not target or base["optimized"] or base["quantized"]:
        return []
    ratios = {v: sp[v]["default_rows_per_s"] / base["segments_rows_per_s"] for v in ("fp32", "int8")}
    verdict = "the speed met" if ratios["int8"] >= target else "NOT met"
    return [
        "",
        f"The pre-fusion chain (export {base['fingerprint'][:12]}, unoptimized) in the same run: "
        f"{base['segments_rows_per_s']:.1f} rows/s. Issue 12's default ≥ {target:g}× the full model on the pre-fusion "
        f"segments, read for the int8 default: {ratios['int8']:.2f} ({verdict}; fp32 default {ratios['fp32']:.2f}). "
        "The goal also asks issue 9's accuracy of it: judge that by the int8 default's metric in the INT8 quality "
        "table (against fp32's and the probes'), not by this line.",
    ]


def _span(counts: list[int]) -> str:
    return f"{min(counts):,}" if min(counts) == max(counts) else f"{min(counts):,}–{max(counts):,}"


def _truncated_embedder(name: str) -> bool:
    """A key column that is an embedder's first N layers in fp32 (`minilm-N`), as export-onnx names them."""
    try:
        parsed = parse_embedder(name)
    except RaeeConfigError:  # backbone, layer-N: other kinds of key
        return False
    return parsed.layers is not None and not parsed.int8


def render_keys(result: Doc) -> list[str]:
    """Retrieval keys side by side (bench/keys.py): the neighbours' vote on reference rows against each key's cost,
    and INT8 MiniLM against issue 12's adoption rule (top-k overlap with fp32, vote within 0.5 point)."""
    tasks = result["tasks"]
    names = list(tasks[0]["keys"])
    probed = all("probe_score" in k for t in tasks for k in t["keys"].values())
    lines = [
        f"{_span([t['rows'] for t in tasks])} seeded train rows per task (less any whose prompt is over the "
        f"backbone's max_length; {result['preset']}'s layers for `layer-N`), the k="
        f"{result['k']} neighbours' vote leave-one-out"
        + (
            ", then the key probe out of fold (fitted as build-db fits it: the exit-0 answer, and key-lr)"
            if probed
            else ""
        )
        + ", scored with the task's metric; rows/s of the key alone.",
        "",
    ]

    def cell(scores: Doc) -> str:
        probe = f" / {_fmt(scores['probe_score'])}" if probed else ""
        return f"{_fmt(scores['vote_score'])}{probe} @ {scores['rows_per_s']:,.0f}/s"

    def macro(name: str, score: str) -> float:
        return sum(t["keys"][name][score] for t in tasks) / len(tasks)

    rows = [[t["task"], t["metric"], *(cell(t["keys"][n]) for n in names)] for t in tasks]
    rows.append(
        [
            "**macro**",
            "",
            *(f"{macro(n, 'vote_score'):.3f}" + (f" / {macro(n, 'probe_score'):.3f}" if probed else "") for n in names),
        ]
    )
    lines += _table(["task", "metric" + (" (vote / probe)" if probed else ""), *names], rows)
    truncated = [n for n in names if _truncated_embedder(n)]
    if truncated and probed:
        rate = {n: sum(t["keys"][n]["rows_per_s"] for t in tasks) / len(tasks) for n in names}
        lines += [
            "",
            "Truncated MiniLM against `minilm`, macro: "
            + "; ".join(
                f"`{n}` vote {100 * (macro(n, 'vote_score') - macro('minilm', 'vote_score')):+.1f} points, probe "
                f"{100 * (macro(n, 'probe_score') - macro('minilm', 'probe_score')):+.1f} points, "
                f"{rate[n] / rate['minilm']:.2f}× its rows/s"
                for n in truncated
            )
            + ".",
        ]
    best = {t["task"]: max(names, key=lambda n: t["keys"][n]["vote_score"]) for t in tasks}
    lines += ["", "Best vote per task: " + ", ".join(f"{task} `{name}`" for task, name in best.items()) + "."]
    for int8, fp32 in result["int8_of"].items():
        overlap = [t["keys"][int8]["top_k_overlap_with_fp32"] for t in tasks]
        delta = [t["keys"][int8]["vote_score"] - t["keys"][fp32]["vote_score"] for t in tasks]
        lines.append(
            f"`{int8}` against `{fp32}`: top-{result['k']} overlap "
            + ", ".join(f"{t['task']} {o:.3f}" for t, o in zip(tasks, overlap, strict=True))
            + f" (goal ≥ {result['overlap_goal']}: {'met' if min(overlap) >= result['overlap_goal'] else 'NOT met'}), "
            "vote "
            + ", ".join(f"{t['task']} {d * 100:+.1f}" for t, d in zip(tasks, delta, strict=True))
            + f" points (macro {100 * (macro(int8, 'vote_score') - macro(fp32, 'vote_score')):+.1f}"
            + (f", key probe {100 * (macro(int8, 'probe_score') - macro(fp32, 'probe_score')):+.1f}" if probed else "")
            + f"), {_mean([t['keys'][int8]['rows_per_s'] / t['keys'][fp32]['rows_per_s'] for t in tasks]):.2f}× its "
            "rows/s.",
        )
    return lines


def render_key_policy(result: Doc) -> list[str]:
    """bench/key_policy.py, key_int8.py and key_depth.py: the default fitted and scored with each retrieval key on split
    halves of the quality bench's reference tables, against each key's cost in backbone layers; a key is adoptable
    where, on every preset, its macro metric is within KEY_TOLERANCE of the first key's and it costs fewer layers."""
    first = next(iter(result["presets"][0]["tasks"][0]["keys"]))  # the key the others are read against
    lines = [
        f"The default (`{result['strategy']}`) fitted on one half of each quality-bench reference table with each "
        f"key and scored on the other half, {result['splits']} seeded splits; reference rows only. Cells: the "
        "task's metric @ layers of the backbone per row (MiniLM, whole or its first N layers as `minilm-N`, `-int8` "
        "with int8 MatMuls: its key in layers, measured on the same rows, plus the exit"
        + (
            "; `layer-N`: at least N). A layer-N table's probes read the prompt (its key's layers are the rows' "
            "first), so where the MiniLM table's probes chose the bare input, the layer keys are scored with prompt "
            "probes fitted on the same rows"
            if result["depths"]
            else ")"
        )
        + ". Method and caveats: bench/key_policy.py.",
    ]
    verdicts: dict[str, list[bool]] = {}
    for entry in result["presets"]:
        tasks = entry["tasks"]
        names = list(tasks[0]["keys"])
        cell = "{} @ {:.1f}".format
        rows = [
            [t["task"] + (" (MiniLM: bare-input probes)" if t.get("probe_form") == "bare" else ""), t["metric"]]
            + [f"{t['key_layers']:.1f}"]
            + [cell(_fmt(t["keys"][n]["metric"]), t["keys"][n]["layers"]) for n in names]
            for t in tasks
        ]
        macro = {
            n: (_mean([t["keys"][n]["metric"] for t in tasks]), _mean([t["keys"][n]["layers"] for t in tasks]))
            for n in names
        }
        rows.append(["**macro**", "", "", *(cell(_fmt(m), c) for m, c in macro.values())])
        header = ["task", "metric", f"`{first}` key in layers", *names]
        lines += ["", f"**{entry['preset']}** ({entry['num_layers']} layers)", "", *_table(header, rows)]
        base_metric, base_cost = macro[names[0]]
        parts = []
        for n in names[1:]:
            metric, cost = macro[n]
            delta = (metric - base_metric) * 100
            verdicts.setdefault(n, []).append(delta >= -KEY_TOLERANCE * 100 and cost < base_cost)
            parts.append(f"`{n}` {delta:+.1f} points at {cost / base_cost:.2f}× the layers")
        lines += ["", f"Against `{names[0]}`: " + "; ".join(parts) + "."]
    adopted = [n for n, ok in verdicts.items() if all(ok)]
    lines += [
        "",
        f"Adoption rule (set before the run): within {KEY_TOLERANCE * 100:.1f} point macro of `{first}`'s and fewer "
        "layers, on every preset: "
        + (f"{', '.join(f'`{n}`' for n in adopted)} adoptable." if adopted else "no other key is adoptable."),
    ]
    return lines


def render_gpu(result: Doc) -> list[str]:
    """bench/gpu.py: the stored graphs (random weights of their shapes) on CUDA, with and without IO binding, and
    on the GPU machine's own CPUs; the default composed from the key and the layers timed there plus the host
    phases (retrieval, exit policy, answer) timed on the machine that prepared the run."""
    engines, host = result["engines"], result["host_phases_s_measured_here"]
    prepared = result["prepared_at"]
    runs = result.get("layer_runs")
    tf32 = {"1": " (TF32 on)", "0": " (TF32 off)"}.get(result.get("cuda_use_tf32", ""), " (TF32 on: ORT's default)")
    lines = [
        f"{result['gpu']} (driver), onnxruntime-gpu {result['onnxruntime']}{tf32}; "
        f"{result['rows']} {result['task']} rows "
        f"in batches of the runtime's size, fastest of {result['passes']} passes. Weights: {result['weights']}. "
        f"The default's rows leave at the layers they left at in process on the preparing machine (commit "
        f"{prepared['commit']}{', dirty' if prepared['dirty'] else ''}; mean exit {result['mean_exit_layer']:.1f} of "
        f"{result['num_layers']}{', every layer read back for its confidence rule' if result['stops_early'] else ''}"
        f"); {_host_phases(result)} Key timed: {result.get('key', 'not recorded')}.",
        "",
        f"Rows per ONNX call: {result.get('sub_batch', 32)} on every engine below.",
        "",
        "| engine | full rows/s | default rows/s | default ÷ full | key share | full's layers | default's layers "
        "| the same, states not read | probe-best rows/s (÷ full) | key-lr rows/s (÷ full) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    names = {
        "cuda": "CUDA, states kept on the GPU (IO binding)",
        "cuda-host-copies": "CUDA, states copied to the host every layer",
        "cpu": f"CPU, the GPU machine's {result['cpus_on_gpu_machine']} cores",
    }
    for name, e in engines.items():
        unread = e.get("default_layers_unread_s")
        lines.append(
            f"| {names.get(name, name)} | {e['full_rows_per_s']:,.0f} | {e['default_rows_per_s']:,.0f} | "
            f"{e['default_vs_full']:.2f}× | {e['key_share']:.0%} | {e['full_s'] * 1000:.0f} ms | "
            f"{e['default_layers_s'] * 1000:.0f} ms | {'–' if unread is None else f'{unread * 1000:.0f} ms'} | "
            f"{_rate(e, 'probe_best')} | {_rate(e, 'key_lr')} |"
        )
    compaction = result.get("default_layers_s_by_compact_below")
    if compaction:
        lines += [
            "",
            "The default's layers on CUDA (IO binding) by when a batch is compacted to the rows still running: "
            + "; ".join(f"{_compaction(share)}: {s * 1000:.0f} ms" for share, s in compaction.items())
            + f" (the runtime's setting: {_compaction(str(result['compact_below']))}).",
        ]
    sweep = result.get("cuda_sub_batch_sweep")
    if sweep:
        lines += [
            "",
            "Rows per ONNX call on CUDA (states kept on the GPU), the same rows and exits"
            + (
                f"; probe-best runs every row to layer {result['probe_best_layer']}:"
                if "probe_best_layer" in result
                else ":"
            ),
            "",
            "| rows per call | full rows/s | default rows/s | default ÷ full | layer sessions, full / default "
            "| probe-best rows/s (÷ full) | key-lr rows/s (÷ full) |",
            "|---|---|---|---|---|---|---|",
        ]
        for size, e in sweep.items():
            lines.append(
                f"| {size} | {e['full_rows_per_s']:,.0f} | {e['default_rows_per_s']:,.0f} | "
                f"{e['default_vs_full']:.2f}× | {e['layer_runs']['full']} / {e['layer_runs']['default']} | "
                f"{_rate(e, 'probe_best')} | {_rate(e, 'key_lr')} |"
            )
    cuda = engines["cuda"]
    agreement = result.get("agreement_with_cpu")
    if agreement:
        lines += [
            "",
            "The CUDA chains against the CPU chain on the same graphs and rows (full depth): "
            + "; ".join(
                f"{names.get(n, n)}: pooled states within {a['pooled_max_rel_diff']:.1e} of the largest, head "
                f"answers {a['head_argmax_agreement']:.1%} the same"
                for n, a in agreement.items()
            )
            + ".",
        ]
    lines += [
        "",
        f"On CUDA the default runs at {cuda['default_vs_full']:.2f}× the full model. The host phases alone take "
        f"{sum(host.values()) / cuda['full_s']:.0%} of the full model's whole time there."
        + (
            f" key-lr (the key and its probe, no layer) runs at {cuda['key_lr_vs_full']:.1f}× the full model and "
            f"{cuda['key_lr_rows_per_s'] / cuda['default_rows_per_s']:.1f}× the default; its accuracy against "
            "theirs is in Quality above."
            if "key_lr_rows_per_s" in cuda
            else ""
        ),
    ]
    if runs:
        unread = cuda.get("default_layers_unread_s")
        lines[-1] += (
            f" The default runs {runs['default']} layer sessions against the full model's {runs['full']}, but at "
            f"{cuda['default_layers_s'] / runs['default'] * 1000:.1f} ms each against "
            f"{cuda['full_s'] / runs['full'] * 1000:.2f} ms"
            + (
                ""
                if unread is None
                else f" ({unread / runs['default'] * 1000:.1f} ms without the confidence rule's reads)"
            )
            + ": at every layer where some of a batch's rows leave (with the confidence rule, at every layer), the "
            "batch's pooled states are computed on the device and read to the host, the leaving rows' head runs, and "
            "the rest are compacted on the device with their masks and rotary tables sent up again."
        )
    return lines


def _host_phases(result: Doc) -> str:
    """What of each method's time on the GPU machine was timed on the preparing machine."""
    host = sum(result["host_phases_s_measured_here"].values())
    return (
        f"every method running layers tokenizes its rows once ({result['tokenize_s'] * 1000:.0f} ms on the GPU "
        "machine's CPUs, inside its layers' time: the length check, whose ids the layers reuse); the default's "
        f"retrieval, exit policy and answer ({host * 1000:.0f} ms) and key-lr's retrieval, key probe and answer "
        f"({result['key_lr_host_s_measured_here'] * 1000:.0f} ms) are the preparing machine's, as LanceDB is not on "
        "the GPU machine."
    )


def _compaction(share: str) -> str:
    """A compact_below setting in words."""
    return {"1.0": "at every exit", "0.0": "never"}.get(share, f"once under {float(share):.0%} still run")


def _rate(engine: Doc, method: str) -> str:
    """A method's rows/s and its ratio to the full model's, or – where the run did not time it."""
    if f"{method}_rows_per_s" not in engine:
        return "–"
    return f"{engine[f'{method}_rows_per_s']:,.0f} ({engine[f'{method}_vs_full']:.2f}×)"


SCALING_PNG = OUTPUT.parent / "scaling.png"


def render_scaling(result: Doc) -> list[str]:
    """Reference-size scaling (bench/scaling.py): per size, each method's accuracy @ share of the layers run, and
    build-db's time; the plot beside it (bench/scaling.png)."""
    methods = result["methods"]
    header = ["reference rows", "build-db s", "probe fit rows", "probe view (best layer)"] + methods
    header += ["default on reference (leave-one-group-out)", "without groups (leave-one-out)"]
    header += ["nearest row a phrase of the same sentence"]
    rows = [
        [
            size["reference_rows"],
            size["build_db_s"],
            size["probe_fit_rows"],
            f"{size['probe_pooling']} (L{size['probe_best_layer']})",
        ]
        + [f"{_fmt(size['methods'][m]['accuracy'])} @ {size['methods'][m]['layer_share']:.0%}" for m in methods]
        + [
            _fmt((size.get("default_reference_estimate") or {}).get("accuracy")),
            _fmt((size.get("ungrouped_reference_estimate") or {}).get("accuracy")),
            f"{size['sibling_share']:.0%}" if "sibling_share" in size else None,
        ]
        for size in result["sizes"]
    ]
    test_rows = result["sizes"][0]["test_rows"] if result["sizes"] else 0
    lines = [
        f"{result['task']} on `{result['preset']}` ({result['embedder']} keys, k={result['k']}), {test_rows} test rows "
        f"(the whole validation split); {result['sampling']}. Cells: accuracy @ share of the layers run (a row "
        "answered at exit 0 runs none). Why this backbone: " + result["why_this_backbone"] + ".",
        "",
        *_table(header, rows),
    ]
    if not result.get("complete", True):
        done = ", ".join(str(s["reference_rows"]) for s in result["sizes"])
        planned = ", ".join(map(str, result["planned_sizes"]))
        last = result["sizes"][-1]
        rate = last["reference_rows"] / last["build_db_s"]
        todo = [n for n in result["planned_sizes"] if n > last["reference_rows"]]
        lines += [
            "",
            f"**Incomplete run**: sizes {done} of the planned {planned}. build-db's rate at the largest finished size "
            f"was {rate:.1f} rows/s (load included: see the load average above); at that rate "
            + ", ".join(f"{n:,} rows would take ~{n / rate / 60:.0f} min" for n in todo)
            + ".",
        ]
    return lines + (
        ["", f"![accuracy and layers run against reference size]({SCALING_PNG.name})"] * SCALING_PNG.is_file()
    )


def plot_scaling(result: Doc) -> None:
    """Accuracy and mean share of layers run against reference rows (log x), one line per method: bench/scaling.png
    (skipped without matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [s["reference_rows"] for s in result["sizes"]]
    fig, (acc, layers) = plt.subplots(1, 2, figsize=(11, 4))
    for i, method in enumerate(result["methods"]):
        values = [s["methods"][method] for s in result["sizes"]]
        acc.plot(sizes, [v["accuracy"] for v in values], "o-", color=f"C{i}", label=method)
        layers.plot(sizes, [v["layer_share"] for v in values], "o-", color=f"C{i}", label=method)
    acc.set(xscale="log", xlabel="reference rows", ylabel="accuracy", title=f"{result['task']}: accuracy")
    layers.set(
        xscale="log", xlabel="reference rows", ylabel="mean share of layers run", title="layers run", ylim=(0, 1.05)
    )
    acc.legend(fontsize=8)
    fig.suptitle(f"{result['preset']}: reference-size scaling")
    fig.tight_layout()
    fig.savefig(SCALING_PNG, dpi=80)
    plt.close(fig)


def render_workers(result: Doc) -> list[str]:
    """The local runner's worker processes sharing the cores, each sized to every core, and one process
    (bench/workers.py)."""
    settings = result["settings"]
    one = settings["one process"]["median_s"]
    rows = [
        [
            name,
            ", ".join(str(s) for s in entry["wall_s"]),
            entry["median_s"],
            entry["rows_per_s"],
            one / entry["median_s"],
        ]
        for name, entry in settings.items()
    ]
    shared, every = (f"{result['workers']} processes, {how}" for how in ("cores shared", "every core each"))
    return [
        f"classify of {result['rows']:,} {result['task']} rows on {result['preset']} (a "
        f"{result['reference_rows']:,}-row table, the default strategy), local runner, {result['cores']} cores:",
        "",
        *_table(["setting", "wall s (each round)", "median s", "rows/s", "× one process"], rows),
        "",
        f"With {result['workers']} worker processes, every core each took "
        f"{settings[every]['median_s'] / settings[shared]['median_s']:.2f}× the time of sharing the cores (the "
        f"default); one process took {one / settings[shared]['median_s']:.2f}× the time of the shared setting.",
    ]


def render_build_passes(result: Doc) -> list[str]:
    """build-db's two passes against one on the same rows (bench/build_passes.py)."""
    header = ["preset", "input rows", "build", "wall s", "rows run: prompt form", "bare form", "probe view"]
    header += ["default on reference", "× one pass's time"]
    rows, lines = [], []
    for preset, run in result["presets"].items():
        one = run["one pass"]["wall_s"]
        for name in ("one pass", "two passes"):
            build = run[name]
            rows.append(
                [
                    preset,
                    run["rows"],
                    name,
                    build["wall_s"],
                    build["rows_run"]["prompt"],
                    build["rows_run"]["bare"],
                    build["view"],
                    f"{_fmt(build['default_reference'])} @ {build['default_layers']:.1f}",
                    build["wall_s"] / one,
                ]
            )
        one_run, two = run["one pass"], run["two passes"]
        moved = two["default_reference"] - one_run["default_reference"]
        lines.append(
            f"{preset}: two passes took {two['wall_s'] / one:.2f}× the one pass's time, running "
            f"{sum(two['rows_run'].values()) / sum(one_run['rows_run'].values()):.2f}× its rows through the layers; "
            f"view {two['view']} (one pass: {one_run['view']}); the default {moved:+.3f} "
            f"{two['metric']} against the one pass's table on the reference rows."
        )
    return [
        f"build-db of {result['task']} train rows (seeded samples, `{result['embedder']}` keys), one pass (every input "
        "form on every row) and two (above "
        f"{result['threshold']:,} input rows, the default: a sample in every form chooses the probes' view, the other "
        "rows run its form only, and the prompt where a label-word head reads it), one after the other on the same "
        "rows. Rows run: the rows each form's all-layer pass read. Default on reference: the default's score @ mean "
        "layers on the table's reference rows, as build-db scores it (leave-one-out). The time also holds what both "
        "builds do alike: the key, the fits, the commit.",
        "",
        *_table(header, rows),
        "",
        *lines,
    ]


def render_nested(result: Doc) -> list[str]:
    """bench/nested.py: per preset and task, the default and probe-best as build-db scored them on the reference
    rows, chosen on folds of them and scored on the rest (nested), and as the quality bench scored them."""
    lines = [
        f"Nested cross-validation on the quality bench's reference rows ({result['folds']} folds × "
        f"{len(result['seeds'])} shuffles): the default's settings chosen as build-db chooses them on the other folds, "
        "probe-best's layer likewise, each scored on the fold left out. Reference rows only; the scored columns are "
        "the quality bench's held-out rows, for comparison.",
        "",
    ]
    header = ["task", "metric", "default (build-db's leave-one-out)", "default nested", "probe-best (out of fold)"]
    header += ["probe-best nested", "default scored", "probe-best scored"]
    for preset, run in result["presets"].items():
        tasks = run["tasks"]
        rows = [
            [
                t["task"],
                t["metric"],
                f"{_fmt(t['default_loo'])} @ {t['default_loo_mean_exit']:.1f}",
                f"{_fmt(t['default_nested'])} @ {t['default_nested_mean_exit']:.1f}",
                t["probe_best_oof"],
                t["probe_best_nested"],
                (t["scored"] or {}).get("default"),
                (t["scored"] or {}).get("probe-best"),
            ]
            for t in tasks
        ]
        gaps = {
            "on the reference rows as build-db scored them": [t["default_loo"] - t["probe_best_oof"] for t in tasks],
            "nested": [t["default_nested"] - t["probe_best_nested"] for t in tasks],
            "scored": [
                t["scored"]["default"] - t["scored"]["probe-best"]
                for t in tasks
                if t["scored"] and len(t["scored"]) == 2
            ],
        }
        said = "; ".join(f"{100 * sum(v) / len(v):+.1f} {name}" for name, v in gaps.items() if v)
        lines += [f"### {preset}", "", *_table(header, rows), "", f"Macro, default minus probe-best: {said}.", ""]
    return lines


def render_generic(result: Any) -> list[str]:
    """Kinds without a renderer yet: show the payload rather than drop it."""
    return ["```json", json.dumps(result, indent=2), "```"]


#: (title, file-name prefix, renderer); a prefix ending in "-" matches one file per preset.
SECTIONS: list[tuple[str, str, Callable[[Any], list[str]]]] = [
    ("Retrieval", "retrieval", render_retrieval),
    ("Retrieval index on real keys", "index-recall", render_index_recall),
    ("ONNX export", "export", render_export),
    ("Probe fit", "probe-fit", render_probe_fit),
    ("Quality", "quality-", render_quality),
    ("Speed", "speed-", render_speed),
    ("INT8", "int8-", render_int8),
    ("INT8 methods", "quant-methods-", render_quant_methods),
    ("Retrieval keys", "keys", render_keys),
    ("Retrieval keys for the default", "key-policy", render_key_policy),
    ("An int8 retrieval key for the default", "key-int8", render_key_policy),
    ("A two-layer retrieval key for the default", "key-depth", render_key_policy),
    ("Reference-only estimate of the default's choice", "nested", render_nested),
    ("Reference-size scaling", "scaling", render_scaling),
    ("Local worker processes", "workers", render_workers),
    ("build-db in two passes", "build-passes", render_build_passes),
    ("GPU", "gpu-", render_gpu),
]


def _matches(name: str, prefix: str) -> bool:
    return name.startswith(prefix) if prefix.endswith("-") else name == prefix


def _header(docs: dict[str, Doc]) -> tuple[list[str], Doc]:
    """The machine most results ran on names the page; sections from another machine name theirs."""
    by_machine: dict[str, list[Doc]] = {}
    for doc in docs.values():
        by_machine.setdefault(json.dumps(doc.get("machine"), sort_keys=True), []).append(doc)
    usual = max(by_machine.values(), key=len, default=[])
    newest = max(usual, key=lambda d: d.get("date", ""), default={})
    machine = newest.get("machine") or {}
    versions = ", ".join(f"{k} {v}" for k, v in (machine.get("versions") or {}).items() if v)
    git = newest.get("git") or {}
    lines = [
        "# Benchmark results",
        "",
        "<!-- GENERATED by bench/report.py from bench/results/*.json: do not edit by hand. -->",
        "",
        f"Generated {datetime.now(timezone.utc).isoformat(timespec='seconds')} by `python bench/report.py`.",
        "",
    ]
    if newest:
        lines += [
            f"- Machine: {machine.get('cpu')}{_simd(machine)}, {machine.get('cores')} cores, "
            f"{machine.get('ram_gb')} GB RAM, {machine.get('os')}",
            f"- Python {machine.get('python')}; {versions}",
            f"- Latest result on it: {newest.get('date')}, commit {git.get('commit')}"
            f"{' (dirty tree)' if git.get('dirty') else ''}",
            "",
            "Each section names its own date and commit; a different machine is named there too.",
            "",
        ]
    return lines, machine


def build(results_dir: Path = RESULTS_DIR) -> str:
    """Markdown for every result file, known kinds first in a fixed order, others after."""
    docs = {p.stem: json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))}
    lines, machine = _header(docs)
    used: set[str] = set()
    for title, prefix, render in SECTIONS:
        names = [n for n in docs if _matches(n, prefix)]
        lines += [f"## {title}", ""]
        if not names:
            lines += ["Not run yet.", ""]
        for name in names:
            used.add(name)
            if prefix.endswith("-"):
                lines += [f"### {name.removeprefix(prefix)}", ""]
            lines += [_provenance(docs[name], machine), "", *render(docs[name]["result"]), ""]
        if prefix == "quality-":
            lines += _price_calibration([docs[name]["result"] for name in names])
    for name in sorted(set(docs) - used):
        lines += [
            f"## {name}",
            "",
            _provenance(docs[name], machine),
            "",
            *render_generic(docs[name].get("result", docs[name])),
            "",
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__).parse_args(argv)  # no options: --help and typos stop here
    for path in sorted(RESULTS_DIR.glob("quality-*.json")):
        plot_probe_curves(json.loads(path.read_text())["result"])
    if (RESULTS_DIR / "scaling.json").is_file():
        plot_scaling(json.loads((RESULTS_DIR / "scaling.json").read_text())["result"])
    OUTPUT.write_text(build())
    print(f"wrote {OUTPUT.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
