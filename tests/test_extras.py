"""Extras: without any ONNX Runtime flavour installed, a command ends with one line naming the extras."""

import subprocess
import sys

from raee_ops.extras import ONNXRUNTIME_MISSING

WITHOUT_ORT = "import sys; sys.modules['onnxruntime'] = None; from raee_ops.cli import main; main()"


def test_no_onnxruntime_is_one_error_line_naming_the_extras(tmp_path):
    args = ["classify", "--artifacts", str(tmp_path), "--task", "sst2", "--db", str(tmp_path / "db")]
    args += ["--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out")]
    run = subprocess.run([sys.executable, "-c", WITHOUT_ORT, *args], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:") or "Traceback" in line]
    assert errors == [f"error: {ONNXRUNTIME_MISSING}"]  # Beam's own import-time warnings may precede it
    assert "raee-ops[cpu]" in run.stderr and "raee-ops[gpu]" in run.stderr
