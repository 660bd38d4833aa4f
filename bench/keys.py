"""Which retrieval key (issue 12): each key's neighbour vote on reference rows against its cost per row, side by
side on the same rows, so the default key is picked by measured accuracy per cost.

Keys: `minilm` (the whole sentence embedder), `minilm-N` (MiniLM's first N layers, mean-pooled: export-onnx
--embedder minilm-N), `minilm-int8`, `minilm-3-int8` and `minilm-2-int8` (those graphs with INT8 MatMuls, as
export-onnx --embedder ...-int8 writes them; the issue adopts an int8 key only if its top-10 neighbours overlap
fp32's ≥ 0.9 and its end accuracy stays within 0.5 point: bench/key_policy.py measures the latter for the default),
`backbone` (the paper's key: the embed segment's mean over the raw input's tokens) and `layer-N` (the mean over the
prompt's tokens after the backbone's first N layers, standardized on the rows: a state the rows that run layers
compute anyway).
Scores, among seeded train rows of each task (no validation row is read): the k=10 neighbours' label vote,
leave-one-out, and the key probe (the answer at exit 0, and key-lr's) out of fold, fitted as build-db fits it.
Cost: rows/s of the key alone on the same rows (for `layer-N`: the embed segment and N layers).
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from common import (
    REPEATS,
    fastest,
    parse_args,
    require_data,
    seeded_sample,
    task_inputs,
    within_max_length,
    write_result,
)
from quality import SEED, K, ensure_artifacts, read_checked
from raee_ops.onnx_export.embedder import export_embedder
from raee_ops.schemas.manifest import sealed

from raee_ops.key_names import BACKBONE
from raee_ops.layer_key import LayerKey
from raee_ops.metrics import METRICS
from raee_ops.probes import fit_key_probe
from raee_ops.runtime import SegmentRuntime, mean_states
from raee_ops.tasks import get_task

PRESET, EMBEDDER = "smollm2-135m", "minilm"
TASKS = ("sst2", "trec", "cola", "mrpc", "rte", "sst5")
ROWS, QUICK_ROWS = 1500, 300
LAYERS = (1, 2, 3)
#: Keys export-onnx writes beside the whole MiniLM: its first N of 6 layers, and int8 graphs (below).
EXPORTED = ("minilm-2", "minilm-3", "minilm-4", "minilm-int8", "minilm-3-int8", "minilm-2-int8")
#: Each int8 key -> the fp32 key it must agree with.
INT8_OF = {"minilm-int8": "minilm", "minilm-3-int8": "minilm-3", "minilm-2-int8": "minilm-2"}
#: INT8 is adopted only above this top-k overlap with fp32 (issue 12).
OVERLAP_GOAL = 0.9


def key_artifacts(artifacts: Path, names: tuple[str, ...] = EXPORTED, tag: str = "keys") -> Path:
    """A copy of `artifacts` (in its folder's sibling named with `tag`) with the embedders `names` exported beside
    its own, as export-onnx writes them; those the export already has are kept (their files here are links into it:
    exporting again would write there)."""
    out = artifacts.parent / f"{artifacts.name}-{tag}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for path in artifacts.iterdir():
        if path.name != "manifest.json":
            (out / path.name).symlink_to(path.resolve())
    manifest = json.loads((artifacts / "manifest.json").read_text())
    for name in names:
        if name in manifest["embedders"]:
            continue
        entry = export_embedder(name, out)
        manifest["embedders"][entry.name] = asdict(entry)
    (out / "manifest.json").write_text(sealed(manifest))
    return out


def layer_key(runtime: SegmentRuntime, task: str, prompts: list[str], depth: int) -> np.ndarray:
    """Mean-pooled state after `depth` layers, standardized over these rows, L2-normalized (as build-db keys a
    layer-N table)."""
    states = mean_states(runtime.run_to_exit_pooled(task, prompts, np.full(len(prompts), depth)).pooled)
    return LayerKey.fit(depth, states).apply(states)


def neighbours(keys: np.ndarray) -> np.ndarray:
    """Each row's top-K others by cosine (keys are unit length), leave-one-out."""
    sims = keys @ keys.T
    np.fill_diagonal(sims, -np.inf)
    return np.argpartition(-sims, K, axis=1)[:, :K]


def vote(top: np.ndarray, labels: np.ndarray, num_labels: int) -> np.ndarray:
    counts = np.zeros((len(top), num_labels))
    np.add.at(counts, (np.repeat(np.arange(len(top)), K), labels[top].ravel()), 1)
    return counts.argmax(axis=1)


def timed_keys(fn: Callable[[], np.ndarray]) -> tuple[np.ndarray, float]:
    """Keys and the fastest of REPEATS passes, after one warm-up pass."""
    fn()
    return fastest(fn, REPEATS)


def one_task(runtime: SegmentRuntime, data: Path, task_name: str, n: int) -> dict[str, Any]:
    task = get_task(task_name)
    rows = seeded_sample(read_checked(data / task_name / "train.parquet", task_name), n, np.random.default_rng(SEED))

    # rows whose prompt is over the backbone's max_length: build-db rejects them, so they key no table
    rows = within_max_length(runtime, task, rows)
    texts, pairs, prompts = task_inputs(task, rows, runtime.suffix)
    labels = rows["label"].to_numpy()
    metric_name = task.metric_name
    metric = METRICS[metric_name]
    keys = {
        **{name: (lambda name=name: runtime.key(name, texts, pairs)) for name in (EMBEDDER, *EXPORTED)},
        "backbone": lambda: runtime.key(BACKBONE, texts, pairs),
        **{f"layer-{d}": (lambda d=d: layer_key(runtime, task_name, prompts, d)) for d in LAYERS},
    }
    out: dict[str, Any] = {"task": task_name, "rows": len(texts), "metric": metric_name, "keys": {}}
    tops = {}
    for name, fn in keys.items():
        vectors, seconds = timed_keys(fn)
        tops[name] = neighbours(vectors)
        predicted = vote(tops[name], labels, len(task.label_names))
        probe = fit_key_probe(vectors, labels, len(task.label_names))[1].argmax(axis=1)
        out["keys"][name] = {
            "vote_score": metric(labels, predicted, len(task.label_names)),
            "vote_accuracy": float(np.mean(predicted == labels)),
            "probe_score": metric(labels, probe, len(task.label_names)),
            "rows_per_s": len(texts) / seconds,
        }
        scores = out["keys"][name]
        print(
            f"{task_name} {name}: vote {scores['vote_score']:.3f}, probe {scores['probe_score']:.3f}, "
            f"{len(texts) / seconds:.0f} rows/s"
        )
    for int8, fp32 in INT8_OF.items():
        same = [len(set(a) & set(b)) / K for a, b in zip(tops[int8], tops[fp32], strict=True)]
        out["keys"][int8]["top_k_overlap_with_fp32"] = float(np.mean(same))
    return out


def main() -> int:
    args = parse_args(__doc__ or "")
    data = require_data()
    artifacts = ensure_artifacts(PRESET)
    runtime = SegmentRuntime(key_artifacts(artifacts))
    tasks = [one_task(runtime, data, t, QUICK_ROWS if args.quick else ROWS) for t in TASKS]
    payload = {"preset": PRESET, "k": K, "seed": SEED, "overlap_goal": OVERLAP_GOAL, "int8_of": INT8_OF, "tasks": tasks}
    write_result("keys", payload, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
