"""Export one segment module to ONNX with fixed input/output names and dynamic batch and sequence axes.

Generic on purpose: the adapter hands over a plain torch module, which may name its own graph inputs and outputs
(`input_names`, `output_names`) and the axes of those that are not B×T×… (`axes`); nothing here knows about model
names. Every architecture exports with the legacy
(TorchScript, `dynamo=False`) exporter.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import onnx
import torch
from raee_ops.onnx_export.optimize import optimize_graph

if TYPE_CHECKING:
    from raee_ops.onnx_export.adapters.base import ArchitectureAdapter

OPSET = 17
EXAMPLE_BATCH, EXAMPLE_LENGTH = 2, 7  # distinct sizes so tracing cannot confuse the two axes

IO_NAMES: dict[str, tuple[list[str], list[str]]] = {
    "embed": (["input_ids", "attention_mask"], ["hidden_states"]),
    "layer": (["hidden_states", "attention_mask"], ["hidden_states_out"]),
    "head": (["hidden_states"], ["logits"]),
}
HEAD_AXES: dict[str, dict[int, str]] = {"hidden_states": {0: "batch"}, "logits": {0: "batch"}}
#: Every segment tensor's dynamic axes unless its module says otherwise (`axes`); the runtime trims the axes named
#: "sequence" when rows leave.
BATCH_TIME = {0: "batch", 1: "sequence"}


def io_names(module: torch.nn.Module, kind: str) -> tuple[list[str], list[str]]:
    """A segment's graph input and output names: the kind's defaults unless the module names its own (decoder
    embeds add per-batch outputs, decoder layers take them)."""
    inputs, outputs = IO_NAMES[kind]
    return list(getattr(module, "input_names", inputs)), list(getattr(module, "output_names", outputs))


def dynamic_axes(module: torch.nn.Module, names: list[str]) -> dict[str, dict[int, str]]:
    """Batch and sequence axes of each named tensor: B×T×… unless the module declares a tensor's own (`axes`: a
    decoder's B×1×T×T attention bias)."""
    own = getattr(module, "axes", {})
    return {name: own.get(name, BATCH_TIME) for name in names}


def example_inputs(
    kind: str, hidden_size: int, names: list[str], embed: torch.nn.Module | None = None
) -> tuple[torch.Tensor, ...]:
    """Small inputs of the segment's signature; the second row is right-padded. A layer's per-batch inputs
    (masks, rotary tables) are what `embed` computes for the example batch."""
    mask = torch.ones(EXAMPLE_BATCH, EXAMPLE_LENGTH, dtype=torch.long)
    mask[1, EXAMPLE_LENGTH - 2 :] = 0
    hidden = torch.randn(EXAMPLE_BATCH, EXAMPLE_LENGTH, hidden_size)
    ids = torch.arange(EXAMPLE_BATCH * EXAMPLE_LENGTH).reshape(EXAMPLE_BATCH, EXAMPLE_LENGTH) % 5 + 1
    if kind == "embed":
        return (ids, mask)
    if kind == "head":
        return (hidden[:, 0],)
    context = {"attention_mask": mask}
    if embed is not None:
        with torch.no_grad():
            outputs = embed(ids, mask)
        if isinstance(outputs, tuple):
            context.update(zip(io_names(embed, "embed")[1][1:], outputs[1:], strict=True))
    return tuple(hidden if name == "hidden_states" else context[name] for name in names)


def export_segment(
    module: torch.nn.Module,
    kind: str,
    hidden_size: int,
    path: Path,
    embed: torch.nn.Module | None = None,
) -> None:
    """Write `module` (a segment of `kind`: embed, layer or head) to `path` and check it with onnx.checker;
    `embed` (the embed segment) makes a layer's example per-batch inputs."""
    inputs, outputs = io_names(module, kind)
    axes = HEAD_AXES if kind == "head" else dynamic_axes(module, inputs + outputs)
    args = example_inputs(kind, hidden_size, inputs, embed)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape-derived values are expected here
        torch.onnx.export(
            module.eval(),
            args,
            str(path),
            input_names=inputs,
            output_names=outputs,
            opset_version=OPSET,
            dynamo=False,
            dynamic_axes=axes,
        )
    onnx.checker.check_model(str(path))


@dataclass(frozen=True)
class SegmentJob:
    """One file to export: kind is embed, layer (with index) or head (with the task's label token ids)."""

    kind: str
    file: str
    index: int = 0
    label_token_ids: tuple[int, ...] = ()


def export_job(adapter: ArchitectureAdapter, job: SegmentJob, path: Path, optimize: bool) -> None:
    """Write one job's segment of `adapter`'s model to `path`; a layer fused for ONNX Runtime where `optimize`
    (where it is exported: each worker fuses its own layers, once)."""
    modules = {
        "embed": adapter.embed_segment,
        "layer": lambda: adapter.layer_segment(job.index),
        "head": lambda: adapter.head_segment(job.label_token_ids),
    }
    embed = adapter.embed_segment() if job.kind == "layer" else None  # a layer's example per-batch inputs
    export_segment(modules[job.kind](), job.kind, adapter.hidden_size, path, embed=embed)
    if optimize and job.kind == "layer":
        optimize_graph(path)
