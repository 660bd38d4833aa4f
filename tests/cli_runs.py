"""Run `raee-ops` as a scheduler would: a separate process, judged by its exit code and its output."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

TIMEOUT_S = 300


def raee_ops(
    *args: str | Path,
    fault: str | None = None,
    mode: str | None = None,
    tmpdir: Path | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess:
    """The CLI in its own process (in `cwd`); `fault` sets RAEE_FAULT (and `mode` RAEE_FAULT_MODE) for that run
    only, `tmpdir` its system temp folder. Ctrl-C is live in it, as in a terminal, even where the test process
    ignores it (pytest-xdist's workers do, and a child inherits an ignored SIGINT)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAEE_FAULT")}
    if tmpdir:
        env["TMPDIR"] = str(tmpdir)
    if fault:
        env["RAEE_FAULT"] = fault
    if mode:
        env["RAEE_FAULT_MODE"] = mode
    return subprocess.run(
        [sys.executable, "-m", "raee_ops", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env=env,
        cwd=cwd,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def one_error_line(run: subprocess.CompletedProcess) -> str:
    """stderr must be exactly one line, starting with `error:`; returns it."""
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    return lines[0]


def read_folder(folder: Path, prefix: str) -> pa.Table:
    files = sorted(folder.glob(f"{prefix}-*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else pa.table({"id": pa.array([], pa.string())})
