"""Run `raee-ops` as a scheduler would: a separate process, judged by its exit code and its output.

Each run is its own process, forked from a warm parent (`cli_zygote.py`, one per test process and kind) that has
imported Beam, LanceDB and pyarrow once (export-onnx's: torch and transformers too): a fresh interpreter spends
~4 s on those imports before a command's first line (~17 s for export-onnx), which across the suite's few hundred
runs was most of `make test`'s time. `fresh=True` starts a new
interpreter instead, for what happens at import time (third-party noise, modules a command must not load).
"""

from __future__ import annotations

import atexit
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from raee_ops.onnx_export.model_source import PRESETS

TIMEOUT_S = 300
ZYGOTE = Path(__file__).with_name("cli_zygote.py")


class _Zygote:
    """The warm parent's process and its request pipe."""

    def __init__(self, kind: str) -> None:
        self.log = tempfile.NamedTemporaryFile(prefix="cli-zygote-", suffix=".log", delete=False)
        self.process = subprocess.Popen(
            [sys.executable, str(ZYGOTE), kind],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=_environment(None),
        )
        atexit.register(self.close)

    def run(
        self, args: list[str], env: dict[str, str], cwd: Path | None, timeout: float
    ) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory(prefix="cli-run-") as folder:
            out, err = Path(folder, "stdout"), Path(folder, "stderr")
            request = {"args": args, "env": env, "cwd": str(cwd or os.getcwd()), "stdout": str(out), "stderr": str(err)}
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
            try:
                pid = self._answer(TIMEOUT_S)["pid"]  # a new parent first imports its commands' modules
            except subprocess.TimeoutExpired:
                self._discard()  # its late answer would be read as the next run's: never reuse it
                raise
            try:
                status = self._answer(timeout)["status"]
            except subprocess.TimeoutExpired:
                os.kill(pid, signal.SIGKILL)
                try:
                    self._answer(60)
                except subprocess.TimeoutExpired:
                    self._discard()
                raise subprocess.TimeoutExpired(args, timeout, out.read_text(), err.read_text()) from None
            return subprocess.CompletedProcess(args, status, out.read_text(), err.read_text())

    def _answer(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            raise subprocess.TimeoutExpired("cli_zygote", timeout)
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the CLI's warm parent died: {Path(self.log.name).read_text()[-2000:]}")
        return json.loads(line)

    def _discard(self) -> None:
        """End this parent now; `raee_ops` starts another for the next run."""
        self.process.kill()
        self.process.wait()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)
        os.unlink(self.log.name)


#: One warm parent per kind: export-onnx's has torch and transformers imported, which other commands must not have.
_zygotes: dict[str, _Zygote] = {}


def _environment(overrides: dict[str, str | None] | None) -> dict[str, str]:
    """This process's environment without fault settings, with `overrides` added (None: removed)."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("RAEE_FAULT")}
    return {k: v for k, v in (inherited | (overrides or {})).items() if v is not None}


def raee_ops(
    *args: str | Path,
    fault: str | None = None,
    mode: str | None = None,
    tmpdir: Path | None = None,
    cwd: Path | None = None,
    env: dict[str, str | None] | None = None,
    fresh: bool = False,
    timeout: float = TIMEOUT_S,
    under: tuple[str, ...] = (),
) -> subprocess.CompletedProcess:
    """The CLI in its own process (in `cwd`, with `env` added to this one's environment; None removes a
    variable); `fault` sets RAEE_FAULT (and `mode` RAEE_FAULT_MODE) for that run only, `tmpdir` its system temp
    folder. Ctrl-C is live in it, as in a terminal, even where the test process ignores it (pytest-xdist's workers
    do, and a child inherits an ignored SIGINT). `under`: a command that runs it (`setpriv …`), in a fresh
    interpreter."""
    extra = {"TMPDIR": tmpdir and str(tmpdir), "RAEE_FAULT": fault, "RAEE_FAULT_MODE": mode}
    environment = _environment((env or {}) | {k: v for k, v in extra.items() if v})
    argv = [str(a) for a in args]
    if not fresh and not under:
        kind = "export" if _loads_a_model(argv, cwd) else "commands"
        if kind not in _zygotes or _zygotes[kind].process.poll() is not None:
            _zygotes[kind] = _Zygote(kind)
        return _zygotes[kind].run(argv, environment, cwd, timeout)
    return subprocess.run(
        [*under, sys.executable, "-m", "raee_ops", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment,
        cwd=cwd,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _loads_a_model(argv: list[str], cwd: Path | None) -> bool:
    """An export-onnx whose --model is there gets the parent with torch imported; one refused before the model loads
    (no such model, a bad option) needs no torch, and a parent started for it alone costs ~20 s of CPU."""
    if argv[:1] != ["export-onnx"] or "--model" not in argv[:-1]:
        return False
    model = argv[argv.index("--model") + 1]
    return model in PRESETS or Path(cwd or os.getcwd(), model).exists()


def bound_by_permissions() -> tuple[str, ...]:
    """What runs a command so that its files' permissions bind it: nothing for a user, setpriv for root (without
    the capability to override them), as tests may run; skipped where root cannot drop that capability."""
    if os.geteuid() != 0:
        return ()
    under = ("setpriv", "--bounding-set=-dac_override")
    if not shutil.which("setpriv") or subprocess.run([*under, "true"], capture_output=True).returncode:
        pytest.skip("running as root, unable to drop CAP_DAC_OVERRIDE: permissions would not bind the command")
    return under


def one_error_line(run: subprocess.CompletedProcess) -> str:
    """stderr must be exactly one line, starting with `error:`; returns it."""
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    return lines[0]


def read_folder(folder: Path, prefix: str) -> pa.Table:
    files = sorted(folder.glob(f"{prefix}-*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else pa.table({"id": pa.array([], pa.string())})
