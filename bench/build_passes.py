"""build-db's two passes against one on the same rows, in one run: a new table above TWO_PASSES_ABOVE input rows
runs a sample in every input form, chooses the probes' view on it and runs the other rows in that view's form only
(plus the prompt where a label-word head reads it); one pass runs every form on every row. Wall time, the rows each
form's all-layer pass ran on, the view each chose, and the default's score on the reference rows (build-db's own
leave-one-out) for both tables. sst2's train split (no --group-column: build time is what is measured).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from common import parse_args, require_data, timer, write_result
from quality import ensure_artifacts
from raee_ops.pipelines import build_db as build_db_module
from raee_ops.pipelines.build_db import run_build_db
from speed import BENCH, EMBEDDER, sample

from raee_ops.retrieval import Retriever
from raee_ops.runtime import SegmentRuntime
from raee_ops.tasks import PRESETS

TASK, SEED = "sst2", 0
#: Presets and input rows: just above the threshold on the cheapest backbone and on a decoder (quick: the first).
RUNS = {"minilm-l6": 20_000, "smollm2-135m": 12_000}
ONE_PASS = sys.maxsize  # TWO_PASSES_ABOVE for the one-pass build
PROMPT_START = PRESETS[TASK].template.split("{")[0]  # what the prompt form's inputs begin with ("Review: ")


def forms_counted() -> dict[str, int]:
    """Rows each input form's all-layer pass runs on in this process (the local runner runs the job here)."""
    counts = {"prompt": 0, "bare": 0}
    whole = SegmentRuntime.all_layers_pooled

    def counted(self: SegmentRuntime, task: str, prompts: Any) -> Any:
        counts["prompt" if prompts and prompts[0].startswith(PROMPT_START) else "bare"] += len(prompts)
        return whole(self, task, prompts)

    SegmentRuntime.all_layers_pooled = counted  # type: ignore[method-assign]
    return counts


def build(artifacts: Path, path: Path, db: Path, above: int, counts: dict[str, int]) -> dict[str, Any]:
    build_db_module.TWO_PASSES_ABOVE = above
    counts.update(prompt=0, bare=0)
    with timer() as t:
        summary = run_build_db(artifacts, TASK, [str(path)], str(db), TASK, EMBEDDER, "overwrite", None)
    print(summary.render(), flush=True)
    retriever = Retriever(str(db), TASK)
    policy = retriever.probe_policy
    return {
        "wall_s": round(t.s, 1),
        "rows_run": dict(counts),
        "view": retriever.probes.pooling,
        "passes": summary.passes,
        "default_reference": policy.loo_metric,
        "default_layers": policy.loo_mean_exit,
        "metric": policy.metric,
    }


def main() -> int:
    args = parse_args(__doc__ or "")
    data = require_data()
    BENCH.mkdir(exist_ok=True)
    counts = forms_counted()
    runs = dict(list(RUNS.items())[:1]) if args.quick else RUNS
    result: dict[str, Any] = {"task": TASK, "embedder": EMBEDDER, "threshold": build_db_module.TWO_PASSES_ABOVE}
    presets = result["presets"] = {}
    threshold = build_db_module.TWO_PASSES_ABOVE
    for preset, rows in runs.items():
        artifacts = ensure_artifacts(preset)
        with tempfile.TemporaryDirectory(dir=BENCH) as tmp:
            path = Path(tmp) / "reference.parquet"
            pq.write_table(sample(data / TASK / "train.parquet", rows, SEED), path)
            presets[preset] = {
                "rows": rows,
                "one pass": build(artifacts, path, Path(tmp) / "one", ONE_PASS, counts),
                "two passes": build(artifacts, path, Path(tmp) / "two", threshold, counts),
            }
    write_result("build-passes", result, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
