"""The built wheel works alone: built with the README's line, installed with the README's line into a fresh virtual
environment that cannot see the checkout, then `--version`, every `--help`, and build-db + classify + info on tiny
artifacts made by the test helpers.

Offline and quick: the fresh environment gets its own pip and site-packages (the wheel goes there), and sees the
dependencies already installed in the environment running the tests through one `.pth` line pointing at a folder
of links to that environment's site-packages, minus raee-ops itself (its editable-install finder, its .pth files,
its dist-info and any installed copy of its packages). So pip finds every requirement satisfied and downloads
nothing, and `import raee_ops` can only find the wheel's copy.
"""

from __future__ import annotations

import email
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from packaging.requirements import Requirement
from segment_artifacts import make_artifacts
from test_pipelines import labelled

import raee_ops
from raee_ops.cli import cli

pytestmark = pytest.mark.wheel

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("raee_ops",)
SOURCES = ("pyproject.toml", "README.md", "raee_ops", "pipelines", "onnx_export", "schemas")
#: The README's install lines, run exactly as written (the test checks the README holds them verbatim).
BUILD = "pip wheel --no-deps --no-build-isolation --wheel-dir dist ."
WHEEL = f"raee_ops-{raee_ops.__version__}-py3-none-any.whl"
INSTALL = f"pip install 'dist/{WHEEL}[cpu]'"


def hidden(name: str) -> bool:
    """Entries of the test environment's site-packages the fresh environment must not see."""
    return (
        name.endswith(".pth")
        or name.startswith(("__editable__", "raee_ops-", "raee_ops.", "__pycache__"))
        or name in PACKAGES
    )


def dependencies_overlay(folder: Path) -> Path:
    folder.mkdir()
    paths = sysconfig.get_paths()
    for site in {Path(paths["purelib"]).resolve(), Path(paths["platlib"]).resolve()}:
        for entry in site.iterdir():
            if not hidden(entry.name) and not (folder / entry.name).exists():
                (folder / entry.name).symlink_to(entry)
    return folder


def shell(command: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    run = subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"{command}\n{run.stdout}\n{run.stderr}"
    return run


def check_requirements(wheel: Path) -> None:
    """ONNX Runtime comes from exactly one extra: onnxruntime from `cpu`, onnxruntime-gpu from `gpu`, none in core."""
    with zipfile.ZipFile(wheel) as archive:
        metadata = email.message_from_bytes(archive.read(f"raee_ops-{raee_ops.__version__}.dist-info/METADATA"))
    requirements = [Requirement(r) for r in metadata.get_all("Requires-Dist")]
    runtimes = {(r.name, str(r.marker)) for r in requirements if r.name.startswith("onnxruntime")}
    assert runtimes == {("onnxruntime", 'extra == "cpu"'), ("onnxruntime-gpu", 'extra == "gpu"')}
    assert {"cpu", "gpu", "export", "report", "aws", "gcp", "dev"} <= set(metadata.get_all("Provides-Extra"))


def test_readme_shows_the_lines_this_test_runs():
    readme = (ROOT / "README.md").read_text()
    assert BUILD in readme and INSTALL in readme


def test_the_wheel_works_in_a_fresh_environment_without_the_checkout(tmp_path: Path):
    base_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    project_bin = str(Path(sys.executable).parent)

    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, src / name)
    shell(BUILD, src, base_env | {"PATH": project_bin + os.pathsep + base_env["PATH"]})

    check_requirements(src / "dist" / WHEEL)

    user = tmp_path / "user"
    shutil.copytree(src / "dist", user / "dist")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    fresh_site = Path(
        subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    (fresh_site / "raee-test-dependencies.pth").write_text(f"{dependencies_overlay(tmp_path / 'deps')}\n")
    env = base_env | {"PATH": str(venv / "bin") + os.pathsep + base_env["PATH"], "VIRTUAL_ENV": str(venv)}
    shell(INSTALL, user, env)

    where = shell(f"python -c 'import {', '.join(PACKAGES)}; print({PACKAGES[0]}.__file__)'", user, env).stdout
    assert Path(where.strip()).is_relative_to(fresh_site)
    for package in PACKAGES:
        assert (fresh_site / package / "__init__.py").exists()
    assert {p.name for p in (fresh_site / "raee_ops" / "graphs").iterdir()} >= {"pool.onnx", "compact.onnx"}
    assert shell("raee-ops --version", user, env).stdout == f"raee-ops, version {raee_ops.__version__}\n"
    assert "Commands:" in shell("raee-ops --help", user, env).stdout
    for command in cli.commands:
        assert "Usage: raee-ops " + command in shell(f"raee-ops {command} --help", user, env).stdout

    make_artifacts(user / "artifacts")
    labelled(user / "train.parquet", 30, 0, "t")
    labelled(user / "in.parquet", 10, 1, "q", bad=False)
    common = "--artifacts artifacts --task sst2 --db db"
    built = shell(f"raee-ops build-db {common} --input train.parquet", user, env).stdout
    assert "rows in: 35  written: 30  rejected: 5" in built
    classified = shell(f"raee-ops classify {common} --input in.parquet --output out", user, env).stdout
    assert "rows in: 10  predicted: 10  rejected: 0" in classified
    assert sum(pq.read_table(p).num_rows for p in (user / "out").glob("predictions-*.parquet")) == 10
    [table] = json.loads(shell("raee-ops info --db db --json", user, env).stdout)["tables"]
    assert (table["task"], table["rows"], table["version"]) == ("sst2", 30, 1)
