"""Task quality per preset: every layer, full, calibrated, oracle, neighbour vote, each exit strategy and the
baselines a user would pick instead (key-lr, knn-vote, majority, probe-best, probe-last, and sentence-lr: logistic
regression on MiniLM's whole sentence embedding, what a user fits without raee-ops), all fitted on the same reference
rows.

One export per preset (all bench tasks; the default key and the whole MiniLM) in .bench/artifacts-<preset>; per
task a reference table built from a seeded train sample through `raee-ops build-db`, then `raee_ops.evaluate` on a
seeded held-out sample. qnli and mnli ship without a train split here, so their validation file is split 80/20
(seed 0) into reference and test rows; the result says so per task. `minilm-l6` has no label-word head: its
zero-shot numbers (full, calibrated, oracle, head by layer, raee) are null in the results, never made up.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from common import REPO_ROOT, require_data, seeded_sample, task_inputs, timer, within_max_length, write_result
from raee_ops.onnx_export.quantize import METHOD as QUANTIZE_METHOD
from raee_ops.schemas.manifest import load_manifest

from raee_ops.evaluate import evaluate, strategy_rows
from raee_ops.exit_policy import DEFAULT_STRATEGY, STRATEGIES
from raee_ops.key_names import DEFAULT_KEY, GPU_KEY
from raee_ops.metrics import METRICS
from raee_ops.probes import fit_key_probe
from raee_ops.report import write_report
from raee_ops.runtime import SegmentRuntime
from raee_ops.tasks import get_task

PRESETS = ("smollm2-135m", "gemma3-270m", "minilm-l6")
TASKS = ("sst2", "cola", "mrpc", "rte", "qnli", "mnli", "sst5", "trec")
QUICK_TASKS = ("sst2", "trec")
REF_ROWS, QUICK_REF_ROWS = 500, 200
EVAL_ROWS, QUICK_EVAL_ROWS = 300, 100
#: Held-out files in order of preference: a labelled test split where one exists, else validation.
EVAL_SPLITS = ("test", "validation", "validation_matched")
K, SEED, REFERENCE_SHARE = 10, 0, 0.8
#: The tables' key (build-db's default), and the embedding a user's own logistic regression reads (sentence-lr).
EMBEDDER, SENTENCE = DEFAULT_KEY, "minilm"
#: Exported with them: the default key as GPUs run it (int8 MatMuls have no CUDA kernel), for bench/gpu.py.
EXPORTED_EMBEDDERS = tuple(dict.fromkeys((EMBEDDER, SENTENCE, GPU_KEY)))
BENCH = REPO_ROOT / ".bench"


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help=f"tasks {', '.join(QUICK_TASKS)} only, fewer rows")
    parser.add_argument("--preset", choices=PRESETS, action="append", help="repeatable; default: all")
    return parser.parse_args()


def raee_ops(*args: str) -> None:
    """The CLI as a user runs it, in a child process (export and Beam stay out of this one)."""
    subprocess.run([sys.executable, "-m", "raee_ops", *args], cwd=REPO_ROOT, check=True)


def ensure_artifacts(preset: str, quantize: str | None = None) -> Path:
    """Export once with every bench task and both embedders (`quantize`: export-onnx --quantize, in a folder of its
    own); an existing export lacking one, or quantized by another method than today's, is redone beside it and
    swapped in, so another bench reading the old directory never sees a half-written one."""
    name = f"artifacts-{preset}" + (f"-{quantize}" if quantize else "")
    out = BENCH / name
    if (out / "manifest.json").is_file():
        manifest = load_manifest(out, verify_checksums=False)
        method = (manifest.quantization or {}).get("method")
        if (
            set(TASKS) <= set(manifest.tasks)
            and set(EXPORTED_EMBEDDERS) <= set(manifest.embedders)
            and method == (QUANTIZE_METHOD if quantize else None)
        ):
            return out
    fresh = BENCH / f"{name}.new"
    shutil.rmtree(fresh, ignore_errors=True)
    print(f"exporting {preset} with tasks {', '.join(TASKS)} -> {out}", flush=True)
    raee_ops(
        "export-onnx",
        "--model",
        preset,
        "--out",
        str(fresh),
        *[arg for embedder in EXPORTED_EMBEDDERS for arg in ("--embedder", embedder)],
        *[arg for task in TASKS for arg in ("--task", task)],
        *(["--quantize", quantize] if quantize else []),
    )
    if out.exists():
        stale = out.rename(BENCH / f"{name}.old-{time.time_ns()}")
        fresh.rename(out)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        fresh.rename(out)
    return out


def read_checked(path: Path, task: str) -> pa.Table:
    """The file's rows, refused if its label order (file metadata) is not the preset task's."""
    table = pq.read_table(path)
    names = (table.schema.metadata or {}).get(b"label_names")
    if names and json.loads(names) != get_task(task).label_names:
        raise SystemExit(f"{path}: label order {json.loads(names)} differs from task {task!r}")
    return table.replace_schema_metadata(None)


def held_out_file(data: Path, task: str) -> Path | None:
    """The task's evaluation split: the first of EVAL_SPLITS the data folder has."""
    return next((data / task / f"{s}.parquet" for s in EVAL_SPLITS if (data / task / f"{s}.parquet").is_file()), None)


def require_tasks(tasks: Sequence[str]) -> Path:
    """The data folder (without one, the benches' skip), every task's evaluation split in it checked before any
    export: a missing one is one `error:` line, exit 2."""
    data = require_data()
    missing = [task for task in tasks if held_out_file(data, task) is None]
    if missing:
        splits = ", ".join(f"{s}.parquet" for s in EVAL_SPLITS)
        print(f"error: no {splits} for {', '.join(missing)} in {data} (set RAEE_DATA_DIR)", file=sys.stderr)
        sys.exit(2)
    return data


def splits(data: Path, task: str, quick: bool) -> tuple[pa.Table, pa.Table, str]:
    """(reference rows, evaluation rows, where they came from), capped and seeded."""
    ref_cap, eval_cap = (QUICK_REF_ROWS, QUICK_EVAL_ROWS) if quick else (REF_ROWS, EVAL_ROWS)
    held_out = held_out_file(data, task)
    assert held_out is not None, "require_tasks checks every task first"
    rng = np.random.default_rng(SEED)
    train = data / task / "train.parquet"
    if train.is_file():
        reference, evaluation = read_checked(train, task), read_checked(held_out, task)
        source = f"reference: train sample; test: {held_out.stem} sample"
    else:
        rows = read_checked(held_out, task)
        order = np.random.default_rng(SEED).permutation(rows.num_rows)
        cut = int(REFERENCE_SHARE * rows.num_rows)
        reference, evaluation = rows.take(pa.array(np.sort(order[:cut]))), rows.take(pa.array(np.sort(order[cut:])))
        source = f"no train split: {held_out.stem} split 80/20 (seed {SEED}) into reference/test, then sampled"
    return seeded_sample(reference, ref_cap, rng), seeded_sample(evaluation, eval_cap, rng), source


def work_dir(preset: str, task: str) -> Path:
    """bench_task's folder for one preset (or variant label) and task: its rows, table and evaluate's report."""
    return BENCH / f"quality-{preset}" / task


def bench_task(runtime: SegmentRuntime, preset: str, data: Path, task: str, quick: bool) -> dict[str, Any]:
    artifacts = runtime.dir
    work = work_dir(preset, task)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    reference, evaluation, source = splits(data, task, quick)
    pq.write_table(reference, work / "reference.parquet")
    pq.write_table(evaluation, work / "test.parquet")
    print(f"[{preset}/{task}] build-db on {reference.num_rows} rows ({source})", flush=True)
    raee_ops(
        "build-db",
        "--artifacts",
        str(artifacts),
        "--task",
        task,
        "--input",
        str(work / "reference.parquet"),
        "--db",
        str(work / "db"),
        "--embedder",
        EMBEDDER,
    )
    print(f"[{preset}/{task}] evaluate on {evaluation.num_rows} rows", flush=True)
    with timer() as took:
        evaluated = evaluate(artifacts, task, str(work / "db"), task, [str(work / "test.parquet")], K)
    write_report(evaluated, work / "report")
    report = evaluated.report
    sentence = sentence_lr(runtime, task, reference, evaluation)
    scores = ", ".join(f"{name} {b['metric']:.3f}" for name, b in report["baselines"].items() if b)
    print(
        f"[{preset}/{task}] {report['metric_name']}: {scores}, sentence-lr {sentence['score']:.3f} in {took.s:.0f}s",
        flush=True,
    )
    row = task_row(report, source, reference.num_rows, took.s)
    row["baselines"]["sentence-lr"] = sentence
    row["default_exit_share"] = exit_share(evaluated.predictions, report["num_layers"])
    return row


def exit_share(predictions: pa.Table, num_layers: int) -> dict[str, float]:
    """The default's mean share of the layers on the scored rows and its standard error (how far it moves with the
    rows drawn), from the answers evaluate kept: for the layer-share goal's interval."""
    share = strategy_rows(predictions, DEFAULT_STRATEGY)["exit_layer"].to_numpy() / num_layers
    return {"share": float(share.mean()), "standard_error": float(share.std(ddof=1) / np.sqrt(share.size))}


def sentence_lr(runtime: SegmentRuntime, task_name: str, reference: pa.Table, evaluation: pa.Table) -> dict[str, Any]:
    """What a user with these labelled rows fits without raee-ops: logistic regression on MiniLM's sentence
    embedding, fitted as build-db fits its key probe, scored on the rows evaluate scored (prompts within max_length:
    evaluate and build-db reject the others). It runs no backbone layer, like key-lr."""
    task = get_task(task_name)
    num_labels = len(task.label_names)
    fit, scored = (within_max_length(runtime, task, rows) for rows in (reference, evaluation))
    keys = [runtime.key(SENTENCE, *task_inputs(task, rows, runtime.suffix)[:2]) for rows in (fit, scored)]
    probe = fit_key_probe(keys[0], fit["label"].to_numpy(), num_labels)[0]
    labels, predicted = scored["label"].to_numpy(), probe.log_probs(keys[1]).argmax(axis=1)
    metric = METRICS[task.metric_name]
    return {
        "score": metric(labels, predicted, num_labels),
        "accuracy": float(np.mean(predicted == labels)),
        "mean_exit_layer": 0.0,
    }


def _scored(entry: dict[str, Any]) -> dict[str, float]:
    return {"score": entry["metric"], "accuracy": entry["accuracy"]}


def _get(entry: dict[str, Any] | None, key: str) -> Any:
    """entry[key], or None where the report has no entry (a number of a label-word head the backbone lacks)."""
    return None if entry is None else entry[key]


def reference_estimate(report: dict[str, Any]) -> dict[str, float]:
    """What build-db expected from the reference rows alone: the default's leave-one-out metric and mean exit (the
    setting its policy chose), probe-best's and key-lr's out-of-fold metric; beside the scored rows' numbers they
    show how far the reference rows' own estimate carries to unseen rows."""
    probes, policy = report["probes"], report["probe_policy"]
    return {
        "default": policy["loo_metric"],
        "default_mean_exit_layer": policy["loo_mean_exit"],
        "probe_best": probes["reference_oof_metric"][probes["best_layer"] - 1],
        "key_lr": probes["key_reference_oof_metric"],
    }


def task_row(report: dict[str, Any], source: str, reference_rows: int, seconds: float) -> dict[str, Any]:
    """One task in bench/report.py's quality shape ("score" is the task metric), plus accuracies; the label-word
    head's numbers are None on a backbone without one."""
    best = report["best_layer"]
    return {
        "task": report["task"],
        "metric": report["metric_name"],
        "label_word_head": report.get("label_word_head", True),
        "full": _get(report["full"], "metric"),
        "full_calibrated": _get(report["full_calibrated"], "metric"),
        "best_layer": {"layer": best["layer"], **_scored(best)} if best else None,
        "oracle": report["oracle_metric"],
        "neighbour_vote": _scored(report["neighbour_vote"]),
        "strategies": {
            name: {
                **_scored(s),
                "mean_exit_layer": s["mean_exit_layer"],
                "retrieval_only_share": s["retrieval_only_share"],
            }
            for name, s in report["strategies"].items()
        },
        "baselines": {
            name: {**_scored(b), "mean_exit_layer": b["mean_exit_layer"]} if b else None
            for name, b in report["baselines"].items()
        },
        "default_against": report["default_against"],
        "probe_layer": report["per_layer_probe_metric"],
        "head_layer": report["per_layer_metric"],
        "probe_pooling": report["probes"]["pooling"],
        "probe_best_layer": report["probes"]["best_layer"],
        "reference_estimate": reference_estimate(report),
        "default_by_budget": report["default_by_budget"],
        "layer_cost": {key: report["probe_policy"][key] for key in ("layer_budget", "layer_price")},
        "default_hindsight": report["default_hindsight"],
        "accuracy": {
            "full": _get(report["full"], "accuracy"),
            "full_calibrated": _get(report["full_calibrated"], "accuracy"),
            "oracle": report["oracle_accuracy"],
        },
        "num_layers": report["num_layers"],
        "reference_rows": reference_rows,
        "eval_rows": report["rows"],
        "rejected": report["rejected"],
        "split": source,
        "evaluate_s": seconds,
    }


def main() -> int:
    args = parse()
    tasks = QUICK_TASKS if args.quick else TASKS
    data = require_tasks(tasks)
    for preset in args.preset or PRESETS:
        runtime = SegmentRuntime(ensure_artifacts(preset))
        rows = [bench_task(runtime, preset, data, task, args.quick) for task in tasks]
        payload = {
            "preset": preset,
            "strategies": list(STRATEGIES),  # those reading a label-word head the backbone lacks: absent per task
            "k": K,
            "embedder": EMBEDDER,
            "sentence_embedder": SENTENCE,
            "default_strategy": DEFAULT_STRATEGY,
            "tasks": rows,
        }
        write_result(f"quality-{preset}", payload, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
