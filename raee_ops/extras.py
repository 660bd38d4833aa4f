"""Packages chosen through extras: one that is missing fails with one line naming the extra that installs it."""

from __future__ import annotations

import importlib
from types import ModuleType

from raee_ops.errors import MissingDependency

ONNXRUNTIME_MISSING = (
    "ONNX Runtime is not installed: pip install 'raee-ops[cpu]' (or 'raee-ops[gpu]' on CUDA machines, not both)"
)


def onnxruntime() -> ModuleType:
    """The `onnxruntime` module, installed by either the `cpu` (onnxruntime) or the `gpu` (onnxruntime-gpu) extra."""
    try:
        return importlib.import_module("onnxruntime")
    except ImportError as exc:
        raise MissingDependency(ONNXRUNTIME_MISSING) from exc
