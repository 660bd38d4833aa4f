"""INT8 against fp32, side by side on the same rows: the default strategy's task metric (each table's probes fitted
on its own artifacts' hidden states) and its speed per row in process, with the full model on the same segments.

Issue 12's goal: the int8 default at ≥ 1.8× the fp32 default's rows/s, its metric within 1 point (macro over the
tasks). fp32 artifacts are the quality bench's (.bench/artifacts-<preset>); the int8 ones are exported beside them
with `export-onnx --quantize int8` (the export refuses int8 layers that drift too far from fp32).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import quality
import speed
from common import require_data, write_result

from raee_ops.exit_policy import DEFAULT_STRATEGY
from raee_ops.retrieval import Retriever
from raee_ops.runtime import SegmentRuntime
from raee_ops.tasks import get_task

PRESETS = ("smollm2-135m", "gemma3-270m")
VARIANTS = ("fp32", "int8")


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help=f"tasks {', '.join(quality.QUICK_TASKS)}, fewer rows")
    parser.add_argument("--preset", choices=PRESETS, action="append", help="repeatable; default: smollm2-135m")
    return parser.parse_args()


def ensure_int8(preset: str) -> Path:
    out = quality.BENCH / f"artifacts-{preset}-int8"
    if not (out / "manifest.json").is_file():
        tasks = [arg for task in quality.TASKS for arg in ("--task", task)]
        quality.raee_ops("export-onnx", "--model", preset, "--out", str(out), "--quantize", "int8", *tasks)
    return out


def default_scores(artifacts: Path, label: str, data: Path, task: str, quick: bool) -> dict[str, Any]:
    row = quality.bench_task(artifacts, label, data, task, quick)
    default = row["strategies"][DEFAULT_STRATEGY]
    return {
        "score": default["score"],
        "mean_exit_layer": default["mean_exit_layer"],
        "probe_best": row["baselines"]["probe-best"]["score"],
        "key_lr": row["baselines"]["key-lr"]["score"],
    }


def speed_of(artifacts: Path, label: str, quick: bool, data: Path) -> dict[str, Any]:
    """The default strategy and the full model on the same segments, timed as bench/speed.py times them."""
    runtime = SegmentRuntime(artifacts)
    _, reference, rows, warm = speed.bench_rows(runtime, data, quick)
    db, table = speed.build_db(artifacts, label, reference)
    prompts = rows.prompts
    core = speed.Core(runtime, Retriever(db, table), DEFAULT_STRATEGY, get_task(speed.TASK))
    probs, default_s = speed.timed(core.run, rows, warm)

    def full(r: speed.Rows) -> np.ndarray:
        return runtime.run_to_exit(speed.TASK, r.prompts, np.full(len(r.prompts), runtime.num_layers))

    logits, full_s = speed.timed(full, rows, warm)
    result = {
        "rows": len(prompts),
        "default_rows_per_s": len(prompts) / default_s,
        "default_accuracy": float(np.mean(probs.argmax(axis=1) == rows.labels)),
        "default_mean_exit_layer": float(core.exits.mean()),
        "segments_rows_per_s": len(prompts) / full_s,
        "segments_accuracy": float(np.mean(logits.argmax(axis=1) == rows.labels)),
    }
    print(f"{label}: default {result['default_rows_per_s']:.1f} rows/s, full {result['segments_rows_per_s']:.1f}")
    return result


def main() -> int:
    args = parse()
    data = require_data()
    tasks = quality.QUICK_TASKS if args.quick else quality.TASKS
    for preset in args.preset or PRESETS[:1]:
        artifacts = {"fp32": quality.ensure_artifacts(preset), "int8": ensure_int8(preset)}
        per_task = {
            task: {v: default_scores(artifacts[v], f"{preset}-{v}", data, task, args.quick) for v in VARIANTS}
            for task in tasks
        }
        speeds = {v: speed_of(artifacts[v], f"{preset}-{v}", args.quick, data) for v in VARIANTS}
        payload = {"preset": preset, "default_strategy": DEFAULT_STRATEGY, "tasks": per_task, "speed": speeds}
        write_result(f"int8-{preset}", payload, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
