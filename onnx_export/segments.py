"""Export one segment module to ONNX with fixed input/output names and dynamic batch and sequence axes.

Generic on purpose: the adapter hands over a plain torch module and says (via `dynamo`) which exporter path
its architecture needs; nothing here knows about model names.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch

OPSET = 17
EXAMPLE_BATCH, EXAMPLE_LENGTH = 2, 7  # distinct sizes so tracing cannot confuse the two axes

IO_NAMES: dict[str, tuple[list[str], list[str]]] = {
    "embed": (["input_ids", "attention_mask"], ["hidden_states"]),
    "layer": (["hidden_states", "attention_mask"], ["hidden_states_out"]),
    "head": (["hidden_states"], ["logits"]),
}
DYNAMIC_AXES: dict[str, dict[int, str]] = {
    "input_ids": {0: "batch", 1: "sequence"},
    "attention_mask": {0: "batch", 1: "sequence"},
    "hidden_states": {0: "batch", 1: "sequence"},
    "hidden_states_out": {0: "batch", 1: "sequence"},
}
HEAD_AXES: dict[str, dict[int, str]] = {"hidden_states": {0: "batch"}, "logits": {0: "batch"}}


def example_inputs(kind: str, hidden_size: int) -> tuple[torch.Tensor, ...]:
    """Small inputs of the segment's signature; the second row is right-padded."""
    mask = torch.ones(EXAMPLE_BATCH, EXAMPLE_LENGTH, dtype=torch.long)
    mask[1, EXAMPLE_LENGTH - 2 :] = 0
    hidden = torch.randn(EXAMPLE_BATCH, EXAMPLE_LENGTH, hidden_size)
    if kind == "embed":
        ids = torch.arange(EXAMPLE_BATCH * EXAMPLE_LENGTH).reshape(EXAMPLE_BATCH, EXAMPLE_LENGTH) % 5 + 1
        return (ids, mask)
    if kind == "layer":
        return (hidden, mask)
    return (hidden[:, 0],)


def export_segment(module: torch.nn.Module, kind: str, hidden_size: int, path: Path, dynamo: bool) -> None:
    """Write `module` (a segment of `kind`: embed, layer or head) to `path` and check it with onnx.checker."""
    inputs, outputs = IO_NAMES[kind]
    axes = HEAD_AXES if kind == "head" else {n: DYNAMIC_AXES[n] for n in inputs + outputs}
    args = example_inputs(kind, hidden_size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape-derived values are expected here
        if dynamo:
            shapes = {name: {axis: torch.export.Dim.AUTO for axis in axes[name]} for name in inputs}
            program = torch.onnx.export(
                module.eval(),
                args,
                input_names=inputs,
                output_names=outputs,
                opset_version=max(OPSET, 18),
                dynamo=True,
                dynamic_shapes=shapes,
            )
            program.save(str(path), external_data=False)  # one self-contained file per manifest entry
        else:
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
