"""Extras: without a package an extra installs, a command ends with one line naming what installs it."""

import subprocess
import sys
from pathlib import Path

from raee_ops.extras import onnxruntime_missing

REPO = Path(__file__).resolve().parents[1]

WITHOUT_ORT = "import sys; sys.modules['onnxruntime'] = None; from raee_ops.cli import main; main()"


def test_no_onnxruntime_is_one_error_line_naming_the_extras(tmp_path):
    args = ["classify", "--artifacts", str(tmp_path), "--task", "sst2", "--db", str(tmp_path / "db")]
    args += ["--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out")]
    run = subprocess.run([sys.executable, "-c", WITHOUT_ORT, *args], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:") or "Traceback" in line]
    assert errors == [f"error: {onnxruntime_missing()}"]  # Beam's own import-time warnings may precede it
    # raee-ops is not on PyPI: the line names the packages themselves, not `raee-ops[cpu]`
    assert "pip install 'onnxruntime>=" in run.stderr and "pip install 'onnxruntime-gpu>=" in run.stderr


def test_export_without_its_extra_is_one_error_line_before_any_work(tmp_path):
    without = "import sys; sys.modules['gguf'] = None; from raee_ops.cli import main; main()"
    args = ["export-onnx", "--model", "smollm2-135m", "--task", "sst2", "--out", str(tmp_path / "art")]
    run = subprocess.run([sys.executable, "-c", without, *args], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2  # it was an internal error (exit 1) naming a ModuleNotFoundError
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:") or "Traceback" in line]
    assert len(errors) == 1 and errors[0].startswith("error: export-onnx needs gguf: pip install ")
    assert "raee-ops's export extra" in errors[0] and not (tmp_path / "art").exists()


def test_a_package_is_found_by_its_modules_whatever_their_names():
    from raee_ops import extras

    extras.require("dev", "the tests")  # pytest-xdist installs `xdist`, moto[server] `moto`: all installed here
    first = extras.install_line("export").split(" (the CPU build) first, then ")[0]
    # the CPU build first, as the README installs it (the line asked for another version than the README's)
    assert first.startswith("pip install torch==") and f"\n{first}\n" in (REPO / "README.md").read_text()
