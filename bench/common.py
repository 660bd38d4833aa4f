"""Helpers every benchmark shares, so results are comparable and self-describing."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa

from raee_ops import logs

logs.configure(0)  # before Beam's import (below, through raee_ops): third-party noise hidden, as the CLI hides it

from raee_ops.runtime import SegmentRuntime  # noqa: E402
from raee_ops.tasks import Task  # noqa: E402

T = TypeVar("T")
REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"
#: Timed passes per measurement; the fastest is reported.
REPEATS = 2
#: Distributions whose versions move benchmark numbers; read from metadata so nothing heavy gets imported.
TRACKED_PACKAGES = ("numpy", "pyarrow", "lancedb", "onnxruntime", "apache-beam", "torch", "transformers")


def parse_args(description: str) -> argparse.Namespace:
    """The flags every bench script accepts, so run_all can pass them through blindly."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick", action="store_true", help="smaller sizes; the whole suite in about half an hour on 2 cores"
    )
    return parser.parse_args()


def data_dir() -> Path:
    """RAEE_DATA_DIR, relative paths taken from the repo root like the Makefile does."""
    path = Path(os.environ.get("RAEE_DATA_DIR", "../shared/datasets"))
    return path if path.is_absolute() else (REPO_ROOT / path).resolve()


def require_data() -> Path:
    """The data dir, or a skip (exit 0): a machine without the datasets is not a failing benchmark."""
    path = data_dir()
    if not path.is_dir():
        print(f"benchmark data not found at {path}: set RAEE_DATA_DIR. Skipping.")
        sys.exit(0)
    return path


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


#: CPU features int8 and fp32 speed hinge on, most capable first: ONNX Runtime's int8 MatMul sums products in one
#: instruction with VNNI, and in int16 pairs without it (onnx_export/quantize.py), so two "AMD EPYC" machines can
#: differ by far in the int8 results.
SIMD_FEATURES = ("amx_int8", "avx512_vnni", "avx_vnni", "avx512f", "avx2")


def _simd() -> list[str]:
    """The SIMD_FEATURES this CPU has (Linux; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [feature for feature in SIMD_FEATURES if feature in flags]


def _ram_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def machine_info() -> dict[str, Any]:
    """What the numbers depend on besides the code."""
    versions: dict[str, str | None] = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cpu": _cpu_model(),
        "simd": _simd(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gb": _ram_gb(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def git_info() -> dict[str, Any]:
    """Commit and dirtiness; bench outputs (results, RESULTS.md, its plots) are ignored, so writing one result does
    not dirty the next."""
    status = _git("status", "--porcelain", "--", ".", ":!bench/results", ":!bench/RESULTS.md", ":!bench/*.png")
    return {"commit": _git("rev-parse", "--short", "HEAD"), "dirty": None if status is None else bool(status)}


def write_result(name: str, payload: dict[str, Any], quick: bool, git: dict[str, Any] | None = None) -> Path:
    """Write bench/results/<name>.json as {name, date, quick, git, machine, load_avg, result: payload}; `git`: the
    commit the run's inputs were prepared at, where that is not this checkout's (bench/gpu.py)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    doc = {
        "name": name,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quick": quick,
        "git": git or git_info(),
        "machine": machine_info(),
        # other jobs sharing the cores skew timings; this shows whether they did
        "load_avg": list(os.getloadavg()),
        "result": payload,
    }
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {path.relative_to(REPO_ROOT)}")
    return path


@dataclass
class Elapsed:
    """Seconds spent in a `timer` block; set when the block exits."""

    s: float = 0.0


@contextmanager
def timer() -> Iterator[Elapsed]:
    """`with timer() as t: ...` then `t.s`: wall-clock seconds, exceptions included."""
    elapsed = Elapsed()
    start = time.perf_counter()
    try:
        yield elapsed
    finally:
        elapsed.s = time.perf_counter() - start


def fastest(run: Callable[[], T], passes: int = REPEATS) -> tuple[T, float]:
    """run()'s result and the fastest of `passes` timed calls: other work on a shared machine can only slow a pass
    down."""
    best, out = float("inf"), None
    for _ in range(passes):
        with timer() as t:
            out = run()
        best = min(best, t.s)
    return out, best  # type: ignore[return-value]


def seeded_sample(table: pa.Table, n: int, rng: np.random.Generator) -> pa.Table:
    """n rows drawn without replacement, in file order (benchmarks cap every split this way)."""
    rows = np.sort(rng.choice(table.num_rows, size=min(n, table.num_rows), replace=False))
    return table.take(pa.array(rows))


def task_inputs(task: Task, rows: pa.Table, suffix: str) -> tuple[list[str], list[str | None] | None, list[str]]:
    """The rows' raw texts and pairs (what a retrieval key embeds) and their prompts (what the layers run)."""
    texts, pairs = task.key_inputs(rows)
    prompts = [task.render(t, p, suffix=suffix) for t, p in zip(texts, pairs or [None] * len(texts), strict=True)]
    return texts, pairs, prompts


def within_max_length(runtime: SegmentRuntime, task: Task, rows: pa.Table) -> pa.Table:
    """The rows whose prompt fits the backbone's max_length: build-db and evaluate reject the others."""
    prompts = task_inputs(task, rows, runtime.suffix)[2]
    return rows.filter(pa.array(token_lengths(runtime, prompts) <= runtime.manifest.max_length))


def token_lengths(runtime: SegmentRuntime, prompts: list[str]) -> np.ndarray:
    """Each prompt's length in the backbone's tokens."""
    return np.array([len(ids) for ids in runtime.encode(prompts)], dtype=np.int64)
