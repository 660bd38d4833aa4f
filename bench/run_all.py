"""Run every benchmark, then regenerate RESULTS.md; one failing bench does not hide the others' numbers."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from common import parse_args

BENCH_DIR = Path(__file__).resolve().parent
#: Bench scripts (bench/<name>.py) in run order; extend this list to add one.
BENCHES = [
    "retrieval",
    "export",
    "probe_fit",
    "keys",
    "index_recall",
    "quality",
    "nested",
    "key_policy",
    "key_int8",
    "key_depth",
    "speed",
    "int8",
    "int8_methods",
    "scaling",
    "workers",
    "build_passes",
]


def main() -> int:
    args = parse_args(__doc__ or "")
    extra = ["--quick"] if args.quick else []
    failed: list[str] = []
    for name in BENCHES:
        script = BENCH_DIR / f"{name}.py"
        if not script.exists():
            print(f"== {name}: no {script.name}, skipped", flush=True)
            continue
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        rc = subprocess.run([sys.executable, str(script), *extra], cwd=BENCH_DIR.parent).returncode
        print(
            f"== {name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {time.perf_counter() - start:.0f}s",
            flush=True,
        )
        if rc:
            failed.append(name)
    report_rc = subprocess.run([sys.executable, str(BENCH_DIR / "report.py")], cwd=BENCH_DIR.parent).returncode
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed or report_rc else 0


if __name__ == "__main__":
    sys.exit(main())
