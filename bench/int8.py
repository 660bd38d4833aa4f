"""INT8 against fp32, side by side on the same rows: the default strategy's task metric (each table's probes fitted
on its own artifacts' hidden states) and its speed per row in process, with the full model on the same segments.

Issue 12's goal: the int8 default at ≥ 1.8× the fp32 default's rows/s, its metric within 1 point (macro over the
tasks). fp32 artifacts are the quality bench's (.bench/artifacts-<preset>); the int8 ones are exported beside them
with `export-onnx --quantize int8` and the same embedders (the export refuses int8 layers that drift too far from
fp32; it quantizes the layers only, so both variants run the same key: the artifacts' own, `DEFAULT_KEY` unless told).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import quality
import speed
from common import write_result
from raee_ops.schemas.manifest import load_manifest

from raee_ops.evaluate import strategy_rows
from raee_ops.exit_policy import DEFAULT_STRATEGY
from raee_ops.metrics import METRICS, paired_difference
from raee_ops.retrieval import Retriever
from raee_ops.runtime import SegmentRuntime
from raee_ops.tasks import get_task

PRESETS = ("smollm2-135m", "gemma3-270m")
VARIANTS = ("fp32", "int8")
#: Timed rounds, each method's fastest kept: with two, the Gemma int8/fp32 default ratio read 2.21 and 1.58 in two
#: runs of the same artifacts' fits at the same mean exit on this shared machine.
ROUNDS = 5
TIMING = (
    f"fresh process, before any quality run; fp32 and int8, default and full, interleaved pass by pass, the fastest "
    f"of {ROUNDS} rounds"
)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help=f"tasks {', '.join(quality.QUICK_TASKS)}, fewer rows")
    parser.add_argument("--preset", choices=PRESETS, action="append", help="repeatable; default: smollm2-135m")
    part = parser.add_mutually_exclusive_group()
    part.add_argument("--speed-only", action="store_true", help="only the speed part (int8-speed-<preset>.json)")
    part.add_argument(
        "--quality-only", action="store_true", help="only the task metrics (no timing: they may share the machine)"
    )
    parser.add_argument(
        "--baseline-artifacts",
        type=Path,
        help="an unoptimized export of the (one) preset: its full chain is timed with the others (issue 12's "
        "default against the pre-fusion segments)",
    )
    args = parser.parse_args()
    if args.baseline_artifacts and (args.quality_only or len(args.preset or PRESETS[:1]) != 1):
        parser.error("--baseline-artifacts needs exactly one --preset and the speed part")
    return args


def default_scores(runtime: SegmentRuntime, label: str, data: Path, task: str, quick: bool) -> dict[str, Any]:
    row = quality.bench_task(runtime, label, data, task, quick)
    default = row["strategies"][DEFAULT_STRATEGY]
    return {
        "score": default["score"],
        "mean_exit_layer": default["mean_exit_layer"],
        "probe_best": row["baselines"]["probe-best"]["score"],
        "key_lr": row["baselines"]["key-lr"]["score"],
    }


def int8_minus_fp32(preset: str, task: str) -> dict[str, float]:
    """The int8 default's metric minus fp32's on the same rows, with the difference's paired bootstrap standard
    error, from the answers each evaluation kept (predictions.parquet beside its report)."""
    answers = {}
    for variant in VARIANTS:
        report = quality.work_dir(f"{preset}-{variant}", task) / "report"
        answers[variant] = strategy_rows(pq.read_table(report / "predictions.parquet"), DEFAULT_STRATEGY)
    if not answers["int8"]["id"].equals(answers["fp32"]["id"]):  # one tokenizer: both take the same rows
        raise SystemExit(f"{preset}/{task}: the int8 and fp32 evaluations scored different rows")
    labels, num_labels = answers["fp32"]["label"].to_numpy(), len(get_task(task).label_names)
    int8, fp32 = (answers[v]["prediction"].to_numpy() for v in ("int8", "fp32"))
    gap, se = paired_difference(labels, int8, fp32, METRICS[get_task(task).metric_name], num_labels)
    return {"difference": gap, "standard_error": se}


def full_chain(runtime: SegmentRuntime) -> Callable[[speed.Rows], np.ndarray]:
    return lambda r: (
        runtime.run_to_exit_pooled(speed.TASK, r.prompts, np.full(len(r.prompts), runtime.num_layers)).logits
    )


def speeds(artifacts: dict[str, Path], preset: str, quick: bool, data: Path, baseline: Path | None) -> dict[str, Any]:
    """The default strategy and the full model on the same segments for each variant, timed as bench/speed.py
    times them, all interleaved pass by pass (a load change on the shared machine hits them alike); `baseline`:
    another export's full chain, timed with them."""
    fns, cores, rows = {}, {}, None
    for variant, path in artifacts.items():
        runtime = SegmentRuntime(path)
        _, reference, rows, warm = speed.bench_rows(runtime, data, quick)
        db, table = speed.build_db(path, f"{preset}-{variant}", reference)
        cores[variant] = speed.Core(runtime, Retriever(db, table), DEFAULT_STRATEGY, get_task(speed.TASK))
        fns[f"{variant}-default"] = cores[variant].run
        fns[f"{variant}-full"] = full_chain(runtime)
    if baseline is not None:
        fns["baseline-full"] = full_chain(SegmentRuntime(baseline))
    timings = speed.timed_together(fns, rows, warm, ROUNDS)
    result: dict[str, Any] = {}
    if baseline is not None:
        logits, base_s = timings["baseline-full"]
        result["baseline"] = speed.export_identity(baseline) | {
            "segments_rows_per_s": len(rows.prompts) / base_s,
            "segments_accuracy": float(np.mean(logits.argmax(axis=1) == rows.labels)),
        }
    for variant in artifacts:
        (probs, default_s), (logits, full_s) = timings[f"{variant}-default"], timings[f"{variant}-full"]
        result[variant] = {
            "rows": len(rows.prompts),
            "default_rows_per_s": len(rows.prompts) / default_s,
            "default_accuracy": float(np.mean(probs.argmax(axis=1) == rows.labels)),
            "default_mean_exit_layer": float(cores[variant].exits.mean()),
            "segments_rows_per_s": len(rows.prompts) / full_s,
            "segments_accuracy": float(np.mean(logits.argmax(axis=1) == rows.labels)),
        }
        r = result[variant]
        print(f"{preset}-{variant}: default {r['default_rows_per_s']:.1f} rows/s, full {r['segments_rows_per_s']:.1f}")
    return result


def main() -> int:
    args = parse()
    tasks = quality.QUICK_TASKS if args.quick else quality.TASKS
    data = quality.require_tasks(tasks)
    for preset in args.preset or PRESETS[:1]:
        artifacts = {"fp32": quality.ensure_artifacts(preset), "int8": quality.ensure_artifacts(preset, "int8")}
        method = load_manifest(artifacts["int8"], verify_checksums=False).quantization["method"]
        payload: dict[str, Any] = {
            "preset": preset,
            "default_strategy": DEFAULT_STRATEGY,
            "int8_method": method,
            "embedder": quality.EMBEDDER,
        }
        if not args.quality_only:  # first: a fresh process, nothing else loaded yet
            payload["speed"] = speeds(artifacts, preset, args.quick, data, args.baseline_artifacts)
            payload["timing"] = TIMING
        if args.speed_only:
            write_result(f"int8-speed-{preset}", payload, args.quick)
            continue
        runtimes = {v: SegmentRuntime(artifacts[v]) for v in VARIANTS}
        payload["tasks"] = {}
        for task in tasks:
            payload["tasks"][task] = {
                v: default_scores(runtimes[v], f"{preset}-{v}", data, task, args.quick) for v in VARIANTS
            }
            payload["tasks"][task]["int8_minus_fp32"] = int8_minus_fp32(preset, task)
        write_result(f"int8-{preset}", payload, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
