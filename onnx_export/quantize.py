"""INT8 artifacts: every layer segment's MatMul weights quantized to int8 (per output channel, dynamic: activations
are quantized per batch at run time, so no calibration data is needed), checked against the fp32 segments they
come from before they replace them.

The embedding (a lookup) and the heads (a few label rows) stay fp32. The check chains the fp32 and the int8
layers on the verification prompts padded into one batch and records, per layer, the readout states' error
relative to the fp32 states' size and how often each task's zero-shot head gives the same answer; an export
whose last layer's relative error exceeds MAX_RELATIVE_ERROR is refused. The int8 layers change the artifacts'
fingerprint, so int8 artifacts refuse a table built on fp32 ones: build-db runs (and fits on) the int8 states.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from raee_ops.onnx_export.verify import _session, ort_layer_states, sample_prompts
from raee_ops.schemas.manifest import FileRef, Manifest
from tokenizers import Tokenizer

from raee_ops.errors import ArtifactError
from raee_ops.runtime import attention_mask, pad_right, readout_positions
from raee_ops.tasks import Task

METHOD = "dynamic int8, per-channel weights, MatMul"
#: Largest accepted ‖h_int8 − h_fp32‖ / ‖h_fp32‖ over the readout states at the last layer: a guard against a
#: broken quantization (SmolLM2: 0.14 with its down projections kept fp32, 0.36 without), not an accuracy claim.
MAX_RELATIVE_ERROR = 0.2
INT8_DIR = "int8"


def compare(
    directory: Path, manifest: Manifest, int8_files: Sequence[str], tasks: Sequence[Task], suffix: str
) -> list[dict[str, Any]]:
    """Per layer: the int8 readout states' relative error and each task's head agreement with fp32."""
    tokenizer = Tokenizer.from_file(str(directory / manifest.tokenizer.file))
    encoded = [tokenizer.encode(prompt).ids for prompt in sample_prompts(tasks, suffix)]
    ids, lengths = pad_right(encoded, manifest.tokenizer.pad_id)
    mask = attention_mask(lengths, ids.shape[1])
    positions = readout_positions(ids, lengths, manifest.readout, manifest.tokenizer.mask_token_id)
    fp32 = ort_layer_states(directory, manifest, ids, mask, positions)
    int8 = ort_layer_states(directory, manifest, ids, mask, positions, int8_files)
    heads = {n: _session(directory / e.head.file) for n, e in manifest.tasks.items() if e.head is not None}

    def answers(head: Any, states: np.ndarray) -> np.ndarray:
        return head.run(None, {"hidden_states": states})[0].argmax(axis=1)

    return [
        {
            "relative_error": float(np.linalg.norm(a - b) / max(float(np.linalg.norm(a)), 1e-12)),
            "head_agreement": {name: float(np.mean(answers(h, a) == answers(h, b))) for name, h in heads.items()},
        }
        for a, b in zip(fp32, int8, strict=True)
    ]


def _kept(path: Path, keep_fp32: Sequence[str]) -> list[str]:
    graph = onnx.load(str(path), load_external_data=False).graph
    return [n.name for n in graph.node if n.op_type == "MatMul" and any(part in n.name for part in keep_fp32)]


def quantize_matmuls(source: Path, target: Path, exclude: Sequence[str] = ()) -> None:
    """Dynamic, per-channel INT8 of a graph's MatMul weights (signed int8, the default), the nodes named in
    `exclude` left fp32: the one quantization every int8 graph goes through."""
    from onnxruntime.quantization import quantize_dynamic

    quantize_dynamic(
        source,
        target,
        op_types_to_quantize=["MatMul"],
        per_channel=True,
        nodes_to_exclude=list(exclude),
        # ONNX shape inference knows no contrib op of the optimized graphs: the tensors it cannot type are fp32
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )


def quantize_layers(
    work: Path, manifest: Manifest, tasks: Sequence[Task], suffix: str, keep_fp32: Sequence[str] = ()
) -> Manifest:
    """Quantize the layer segments of the export being written in `work` (MatMuls named by `keep_fp32` stay fp32),
    check them against fp32, and return the manifest that vouches for the int8 files, which replace the fp32
    ones."""
    (work / INT8_DIR).mkdir()
    int8_files = [f"{INT8_DIR}/{ref.file}" for ref in manifest.segments.layers]
    for ref, target in zip(manifest.segments.layers, int8_files, strict=True):
        quantize_matmuls(work / ref.file, work / target, _kept(work / ref.file, keep_fp32))
    layers = compare(work, manifest, int8_files, tasks, suffix)
    if layers[-1]["relative_error"] > MAX_RELATIVE_ERROR:
        raise ArtifactError(
            f"int8 layers drift too far from fp32: the last layer's relative error is "
            f"{layers[-1]['relative_error']:.3f} (at most {MAX_RELATIVE_ERROR})"
        )
    for ref, target in zip(manifest.segments.layers, int8_files, strict=True):
        (work / target).replace(work / ref.file)
    shutil.rmtree(work / INT8_DIR)
    segments = replace(manifest.segments, layers=[FileRef.of(work, ref.file) for ref in manifest.segments.layers])
    check = {"max_relative_error": MAX_RELATIVE_ERROR, "layers": layers}
    method = {"method": METHOD, "kept_fp32": list(keep_fp32), "check": check}
    return replace(manifest, segments=segments, quantization=method)
