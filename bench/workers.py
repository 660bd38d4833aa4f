"""The local runner's worker processes: classify's wall time with N worker processes (`--direct_running_mode
multi_processing --direct_num_workers N`) sharing the cores (each sized to cores/N ONNX Runtime threads, the
default), each sized to every core (`--raee_intra_op_threads <cores>`, what they did before the share), and one
process (the local runner's default), on the same rows and the same table, in one run, rounds interleaved so that a
change in the machine's load falls on every setting alike.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from common import REPO_ROOT, parse_args, require_data, timer, write_result
from quality import ensure_artifacts
from raee_ops.pipelines.classify import run_classify
from speed import build_db, sample

PRESET, TASK, K, SEED = "smollm2-135m", "sst2", 10, 0
WORKERS = 2
#: The quick run's sample of SST-2's validation rows (a full run classifies all 872).
QUICK_ROWS = 256
REF_ROWS, QUICK_REF_ROWS = 1000, 200
ROUNDS, QUICK_ROUNDS = 3, 1
BENCH = REPO_ROOT / ".bench"


def settings(cores: int) -> dict[str, list[str]]:
    """Each setting's Beam arguments."""
    processes = ["--direct_running_mode", "multi_processing", "--direct_num_workers", str(WORKERS)]
    return {
        "one process": [],
        f"{WORKERS} processes, cores shared": processes,
        f"{WORKERS} processes, every core each": [*processes, "--raee_intra_op_threads", str(cores)],
    }


def main() -> int:
    args = parse_args(__doc__ or "")
    data = require_data()
    BENCH.mkdir(exist_ok=True)
    artifacts = ensure_artifacts(PRESET)
    reference = sample(data / TASK / "train.parquet", QUICK_REF_ROWS if args.quick else REF_ROWS, SEED)
    db, table = build_db(artifacts, PRESET, reference)
    validation = pq.read_table(data / TASK / "validation.parquet").replace_schema_metadata(None)
    rows = sample(data / TASK / "validation.parquet", QUICK_ROWS, SEED) if args.quick else validation
    cores = len(os.sched_getaffinity(0))
    runs: dict[str, list[float]] = {name: [] for name in settings(cores)}
    summaries: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir=BENCH) as tmp:
        path = Path(tmp) / "rows.parquet"
        pq.write_table(rows, path)
        for round_ in range(QUICK_ROUNDS if args.quick else ROUNDS):
            for name, beam_args in settings(cores).items():
                out = Path(tmp) / f"out-{round_}-{len(runs[name])}-{name.replace(' ', '-').replace(',', '')}"
                with timer() as t:
                    summaries[name] = run_classify(
                        artifacts, TASK, db, table, [str(path)], str(out), K, None, beam_args
                    )
                runs[name].append(round(t.s, 2))
                print(f"{name}: {t.s:.1f} s", flush=True)
    result = {
        "preset": PRESET,
        "task": TASK,
        "rows": rows.num_rows,
        "reference_rows": reference.num_rows,
        "cores": cores,
        "workers": WORKERS,
        "settings": {
            name: {
                "beam_args": beam_args,
                "wall_s": runs[name],
                "median_s": statistics.median(runs[name]),
                "rows_per_s": rows.num_rows / statistics.median(runs[name]),
                "mean_exit": summaries[name].mean_exit,
            }
            for name, beam_args in settings(cores).items()
        },
    }
    write_result("workers", result, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
