"""Packages chosen through extras: one that is missing fails with one line naming what installs it.

raee-ops is installed from its wheel, not from PyPI, so `pip install 'raee-ops[cpu]'` would ask PyPI for a project
that is not there: the line names the extra's own packages, as this installation's metadata pins them."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import re
from collections.abc import Mapping
from types import ModuleType

from raee_ops.errors import MissingDependency

#: What goes before an extra's line: a plain `pip install torch` takes the multi-GB CUDA build. The README's line: the
#: version the tests and the Makefile run (the extra's own pin is only the oldest that works).
FIRST = {
    "export": "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu (the CPU build) first, then "
}


def pins(extra: str) -> list[str]:
    """The requirements `extra` adds, e.g. ['onnxruntime>=1.32.0'] for `cpu` (none where raee-ops is not installed)."""
    try:
        requirements = importlib.metadata.requires("raee-ops") or []
    except importlib.metadata.PackageNotFoundError:
        return []
    marker = re.compile(rf"""extra\s*==\s*["']{re.escape(extra)}["']""")
    return [r.split(";")[0].strip() for r in requirements if ";" in r and marker.fullmatch(r.split(";", 1)[1].strip())]


def install_line(extra: str) -> str:
    """How to install `extra`: "pip install 'onnxruntime>=1.32.0' (raee-ops's cpu extra)"."""
    packages = " ".join(f"'{p}'" for p in pins(extra))
    line = f"pip install {packages} (raee-ops's {extra} extra)" if packages else f"install raee-ops's {extra} extra"
    return FIRST.get(extra, "") + line


def onnxruntime_missing() -> str:
    """The line for a missing ONNX Runtime (built when needed: it reads the installation's metadata)."""
    return f"ONNX Runtime is not installed: {install_line('cpu')}, or on CUDA machines {install_line('gpu')}, not both"


def onnxruntime() -> ModuleType:
    """The `onnxruntime` module, installed by either the `cpu` (onnxruntime) or the `gpu` (onnxruntime-gpu) extra."""
    try:
        return importlib.import_module("onnxruntime")
    except ImportError as exc:
        raise MissingDependency(onnxruntime_missing()) from exc


def require(extra: str, what: str) -> None:
    """Refuse, before any work, to run `what` without every package of `extra` (found, not imported: torch takes
    seconds to import)."""
    names = [re.match(r"[A-Za-z0-9_.-]+", pin).group(0) for pin in pins(extra)]
    provided = importlib.metadata.packages_distributions()  # module -> distributions: ~0.1 s, so read once
    missing = [name for name in names if not _installed(name, provided)]
    if missing:
        raise MissingDependency(f"{what} needs {', '.join(missing)}: {install_line(extra)}")


def _installed(name: str, provided: Mapping[str, list[str]]) -> bool:
    """Whether a distribution is installed and a module of it can be found (its modules may be named otherwise:
    pytest-xdist installs `xdist`)."""
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    wanted = _normal(name)
    modules = [module for module, dists in provided.items() if wanted in map(_normal, dists)]
    return not modules or any(importlib.util.find_spec(module) is not None for module in modules)


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()
