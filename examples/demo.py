"""The main job, end to end on the embedded defaults (what `make demo` runs).

Exports the default preset, builds an exit-metadata table from the hand-written reviews, classifies the
held-apart quarter, and prints accuracy against its labels, the mean exit layer and rows per second.
Every step is the `raee-ops` command a user would type; the commands are printed as they run.
"""

from __future__ import annotations

import csv
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raee_ops import logs
from raee_ops.key_names import DEFAULT_KEY

HERE = Path(__file__).resolve().parent
WORK = HERE.parent / ".demo"
PRESET, TASK = "smollm2-135m", "sst2"


def raee_ops(*args: str) -> None:
    cmd = [sys.executable, "-m", "raee_ops", *args]
    print(f"\n$ raee-ops {shlex.join(args)}", flush=True)
    subprocess.run(cmd, check=True)


def split_reviews(reference: Path, held_apart: Path) -> int:
    """Every 4th review is held apart as classify input; the rest is the reference set."""
    with open(HERE / "reviews.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for path, keep in ((reference, lambda i: i % 4 != 0), (held_apart, lambda i: i % 4 == 0)):
        part = [r for i, r in enumerate(rows, start=1) if keep(i)]
        table = pa.table(
            {
                "id": [r["id"] for r in part],
                "text": [r["text"] for r in part],
                "label": pa.array([int(r["label"]) for r in part], pa.int64()),
            }
        )
        pq.write_table(table, path)
    return len(rows)


def main() -> None:
    logs.configure(0)  # before Beam is imported (by load_manifest): its "apitools not found" warning is noise here
    from raee_ops.schemas.manifest import load_manifest

    WORK.mkdir(exist_ok=True)
    artifacts, db, out = WORK / "artifacts", WORK / "db", WORK / "predictions"
    reference, held_apart = WORK / "reference.parquet", WORK / "held_apart.parquet"
    total = split_reviews(reference, held_apart)
    print(f"examples/reviews.csv: {total} rows -> {reference.name} (3/4), {held_apart.name} (1/4)")

    exported = (artifacts / "manifest.json").exists()
    if not exported or DEFAULT_KEY not in load_manifest(artifacts, verify_checksums=False).embedders:
        shutil.rmtree(artifacts, ignore_errors=True)  # the demo's own folder, from before the default key changed
        raee_ops("export-onnx", "--model", PRESET, "--task", TASK, "--out", str(artifacts))
    else:
        print(f"\nreusing exported artifacts in {artifacts} (checksums are checked on load)")
    raee_ops(
        "build-db",
        "--artifacts",
        str(artifacts),
        "--task",
        TASK,
        "--input",
        str(reference),
        "--db",
        str(db),
    )
    shutil.rmtree(out, ignore_errors=True)  # the demo's own folder: classify refuses a complete output folder
    started = time.perf_counter()
    raee_ops(
        "classify",
        "--artifacts",
        str(artifacts),
        "--task",
        TASK,
        "--db",
        str(db),
        "--input",
        str(held_apart),
        "--output",
        str(out),
    )
    seconds = time.perf_counter() - started

    predictions = pq.read_table(sorted(out.glob("predictions-*.parquet")))
    correct = int(pc.sum(pc.equal(predictions["prediction"], predictions["label"])).as_py())
    exits = predictions["exit_layer"].to_pylist()
    print(f"\naccuracy on the held-apart reviews: {correct}/{len(exits)} = {correct / len(exits):.1%}")
    print(f"mean exit layer: {sum(exits) / len(exits):.1f} ({exits.count(0)} rows answered from retrieval alone)")
    print(f"classify wall time {seconds:.1f} s, {len(exits) / seconds:.1f} rows/s (includes start-up)")


if __name__ == "__main__":
    main()
