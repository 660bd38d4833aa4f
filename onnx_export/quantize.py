"""INT8 artifacts: every layer segment's MatMul weights stored as int8 (per output channel, symmetric) and each
MatMul's input quantized per token at run time (symmetric, its own scale), checked against the fp32 segments they
come from before they replace them.

Per token, not per batch (ONNX Runtime's dynamic quantization takes one scale for the whole input tensor): a
row's states then never depend on the rows batched with it or on their padding (per batch, one SmolLM2 row's
last-layer state moved by 58% of its size when its batch was cut in two: bench/int8_methods.py), outlier tokens
spoil only their own scale, so the MLP's down projection quantizes too, and no calibration data is needed.

The embedding (a lookup) and the heads (a few label rows) stay fp32. The check chains the fp32 and the int8
layers on the verification prompts padded into one batch and records, per layer, the readout states' error
relative to the fp32 states' size and how often each task's zero-shot head gives the same answer, and chains the
int8 layers again on the batch cut in two: an export whose last layer's relative error exceeds MAX_RELATIVE_ERROR,
or whose states move with the batch by more than MAX_BATCH_DEPENDENCE, is refused. The int8 layers change the
artifacts' fingerprint, so int8 artifacts refuse a table built on fp32 ones: build-db runs (and fits on) the int8
states.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper
from raee_ops.onnx_export.optimize import CONTRIB, INT8_MATMUL
from raee_ops.onnx_export.verify import Sessions, ort_layer_states, pad_prompts, sample_prompts
from raee_ops.schemas.manifest import FileRef, Manifest
from tokenizers import Tokenizer

from raee_ops.errors import ArtifactError
from raee_ops.tasks import Task

METHOD = "int8 MatMuls: 7-bit weights per output channel, 8-bit inputs per token at run time (both symmetric)"
#: Largest accepted ‖h_int8 − h_fp32‖ / ‖h_fp32‖ over the readout states at the last layer: a guard against a
#: broken quantization (SmolLM2: 0.13 per token; 0.38 with one scale per batch: bench/int8_methods.py), not an
#: accuracy claim.
MAX_RELATIVE_ERROR = 0.2
#: Largest accepted change of any one row's int8 readout states between two batchings (relative to its size): per
#: token it is a float's rounding; one scale per batch moved a SmolLM2 row by 0.58.
MAX_BATCH_DEPENDENCE = 1e-3
INT8_DIR = "int8"
#: Symmetric input range, −127…127 (−128 unused, so a value and its negation quantize alike), held as uint8 about
#: INPUT_ZERO: ONNX Runtime's fast integer MatMul takes uint8 × int8.
INPUT_LEVELS, INPUT_ZERO = 127, 128
#: Weights in −63…63 (7 bits): x86 CPUs without VNNI (AVX2, AVX-512 before Cascade Lake, e.g. many cloud workers)
#: sum uint8 × int8 products in pairs into int16, which saturates unless 2 × 255 × 63 = 32130 ≤ 32767. With 8-bit
#: weights the export would verify on a VNNI machine and compute wrongly on the others; SmolLM2's last-layer error
#: is 0.13 with 7 bits against 0.11 with 8 (Gemma 3: 0.062 against 0.054).
WEIGHT_LEVELS = 63
TINY = 1e-12


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(float(np.linalg.norm(a)), TINY))


def compare(
    directory: Path, manifest: Manifest, int8_files: Sequence[str], tasks: Sequence[Task], suffix: str
) -> dict[str, Any]:
    """Per layer: the int8 readout states' relative error and each task's head agreement with fp32; and how far
    the int8 states move when the batch is cut in two (other companions, other padding)."""
    tokenizer = Tokenizer.from_file(str(directory / manifest.tokenizer.file))
    encoded = [tokenizer.encode(prompt).ids for prompt in sample_prompts(tasks, suffix)]
    sessions = Sessions(directory)

    def states(prompts: Sequence[list[int]], layer_files: Sequence[str] | None) -> list[np.ndarray]:
        return ort_layer_states(sessions, manifest, pad_prompts(manifest, prompts), layer_files)

    fp32, int8 = states(encoded, None), states(encoded, int8_files)
    half = len(encoded) // 2
    halves = (states(part, int8_files) for part in (encoded[:half], encoded[half:]))
    cut = [np.concatenate(pair) for pair in zip(*halves, strict=True)]
    heads = {n: sessions[e.head.file] for n, e in manifest.tasks.items() if e.head is not None}

    def answers(head: Any, states: np.ndarray) -> np.ndarray:
        return head.run(None, {"hidden_states": states})[0].argmax(axis=1)

    return {
        "layers": [
            {
                "relative_error": _relative(a, b),
                "head_agreement": {name: float(np.mean(answers(h, a) == answers(h, b))) for name, h in heads.items()},
            }
            for a, b in zip(fp32, int8, strict=True)
        ],
        "batch_dependence": max(_relative(a[i], b[i]) for a, b in zip(int8, cut, strict=True) for i in range(len(a))),
    }


@dataclass
class _Rewrite:
    """The nodes and constants that replace a graph's fp32 MatMuls, built in graph order."""

    opset: int
    weight_levels: int = WEIGHT_LEVELS
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    constants: list[onnx.TensorProto] = field(default_factory=list)
    #: A MatMul input already quantized -> (uint8 rows, per-row scale column, leading shape).
    inputs: dict[str, tuple[str, str, str]] = field(default_factory=dict)

    def const(self, name: str, value: np.ndarray) -> str:
        self.constants.append(numpy_helper.from_array(value, name))
        return name

    def node(self, op: str, inputs: Sequence[str], output: str, **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op, list(inputs), [output], name=output, **attrs))
        return output

    def quantized_input(self, x: str, width: int) -> tuple[str, str, str]:
        """`x` as uint8 rows of `width`, each row scaled by its own largest magnitude (computed once per input,
        shared by the MatMuls that read it)."""
        if x not in self.inputs:
            p = f"{x}/int8_input"
            rows = self.node("Reshape", [x, self.const(f"{p}/width", np.array([-1, width], np.int64))], f"{p}/rows")
            magnitude = self.node("Abs", [rows], f"{p}/abs")
            if self.opset >= 18:  # ReduceMax took its axes as an attribute before opset 18
                axes = self.const(f"{p}/axes", np.array([1], np.int64))
                peak = self.node("ReduceMax", [magnitude, axes], f"{p}/peak", keepdims=0)
            else:
                peak = self.node("ReduceMax", [magnitude], f"{p}/peak", axes=[1], keepdims=0)
            per_level = self.node(
                "Mul", [peak, self.const(f"{p}/levels", np.float32(1 / INPUT_LEVELS))], f"{p}/per_level"
            )
            scale = self.node("Max", [per_level, self.const(f"{p}/tiny", np.float32(TINY))], f"{p}/scale")
            zero = self.node(
                "ConstantOfShape",
                [self.node("Shape", [scale], f"{p}/count")],
                f"{p}/zero",
                value=numpy_helper.from_array(np.array([INPUT_ZERO], np.uint8)),
            )
            quantized = self.node("QuantizeLinear", [rows, scale, zero], f"{p}/q", axis=0)
            column = self.node("Unsqueeze", [scale, self.const(f"{p}/axis1", np.array([1], np.int64))], f"{p}/col")
            shape = self.node("Shape", [x], f"{p}/shape")
            start, stop = (
                self.const(f"{p}/start", np.array([0], np.int64)),
                self.const(f"{p}/stop", np.array([-1], np.int64)),
            )
            lead = self.node("Slice", [shape, start, stop], f"{p}/lead")
            self.inputs[x] = (quantized, column, lead)
        return self.inputs[x]

    def matmul(self, node: onnx.NodeProto, weight: np.ndarray) -> None:
        """x @ W as (int8 x) @ (int8 W), rescaled by the column's scales inside ONNX Runtime's integer MatMul (its
        input scale is one number, so 1) and by the row's after it."""
        rows, column, lead = self.quantized_input(node.input[0], weight.shape[0])
        scale = np.maximum(np.abs(weight).max(axis=0), TINY) / self.weight_levels
        q = f"{node.output[0]}/int8_matmul"  # node names may be empty; a node's output names it uniquely
        inputs = [
            rows,
            self.const(f"{q}/w", np.round(weight / scale).astype(np.int8)),
            self.const(f"{q}/one", np.float32(1.0)),
            self.const(f"{q}/w_scale", scale.astype(np.float32)),
            self.const(f"{q}/zero", np.uint8(INPUT_ZERO)),
        ]
        by_column = self.node(INT8_MATMUL, inputs, f"{q}/by_col", domain=CONTRIB)
        by_row = self.node("Mul", [by_column, column], f"{q}/by_row")
        width = self.const(f"{q}/width", np.array([weight.shape[1]], np.int64))
        shape = self.node("Concat", [lead, width], f"{q}/shape", axis=0)
        self.nodes.append(helper.make_node("Reshape", [by_row, shape], list(node.output), name=node.name))


def quantize_matmuls(source: Path, target: Path, weight_levels: int = WEIGHT_LEVELS) -> int:
    """Every MatMul of `source` by a constant 2-D weight, as int8 per output channel with its input int8 per
    token: the one quantization every int8 graph goes through (`weight_levels`: other than WEIGHT_LEVELS only for
    bench/int8_methods.py's comparison). Returns how many MatMuls it quantized."""
    model = onnx.load(str(source))
    graph = model.graph
    weights = {tensor.name: tensor for tensor in graph.initializer}
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    rewrite = _Rewrite(opset, weight_levels)
    for node in graph.node:
        weight = weights.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is None or len(weight.dims) != 2:
            rewrite.nodes.append(node)
            continue
        rewrite.matmul(node, numpy_helper.to_array(weight).astype(np.float32))
    if rewrite.constants and all(o.domain != CONTRIB for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(CONTRIB, 1))
    read = {name for node in rewrite.nodes for name in node.input}
    kept = [tensor for tensor in graph.initializer if tensor.name in read]
    del graph.node[:], graph.initializer[:]
    graph.node.extend(rewrite.nodes)
    graph.initializer.extend(kept + rewrite.constants)
    onnx.save(model, str(target))
    return sum(node.op_type == INT8_MATMUL for node in rewrite.nodes)


def quantize_per_batch(source: Path, target: Path) -> int:
    """ONNX Runtime's dynamic quantization (weights per channel, ONE input scale per MatMul per batch): what the
    export used before, kept to show why not (bench/int8_methods.py; the test that the export check refuses it).
    Returns how many MatMuls it quantized."""
    from onnxruntime.quantization import quantize_dynamic

    quantize_dynamic(
        source,
        target,
        op_types_to_quantize=["MatMul"],
        per_channel=True,
        # ONNX shape inference knows no contrib op of the optimized graphs: the tensors it cannot type are fp32
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    matmuls = [sum(n.op_type == "MatMul" for n in onnx.load(str(p)).graph.node) for p in (source, target)]
    return matmuls[0] - matmuls[1]


def quantize_layers(work: Path, manifest: Manifest, tasks: Sequence[Task], suffix: str) -> Manifest:
    """Quantize the layer segments of the export being written in `work`, check them against fp32, and return
    the manifest that vouches for the int8 files, which replace the fp32 ones."""
    (work / INT8_DIR).mkdir()
    int8_files = [f"{INT8_DIR}/{ref.file}" for ref in manifest.segments.layers]
    for ref, target in zip(manifest.segments.layers, int8_files, strict=True):
        if not quantize_matmuls(work / ref.file, work / target):
            raise ArtifactError(f"--quantize int8: {ref.file} has no MatMul by a constant weight to quantize")
    check = compare(work, manifest, int8_files, tasks, suffix)
    if check["layers"][-1]["relative_error"] > MAX_RELATIVE_ERROR:
        raise ArtifactError(
            f"int8 layers drift too far from fp32: the last layer's relative error is "
            f"{check['layers'][-1]['relative_error']:.3f} (at most {MAX_RELATIVE_ERROR})"
        )
    if check["batch_dependence"] > MAX_BATCH_DEPENDENCE:
        raise ArtifactError(
            f"int8 layers depend on the batch: a row's states move by {check['batch_dependence']:.2g} of their "
            f"size when batched otherwise (at most {MAX_BATCH_DEPENDENCE})"
        )
    for ref, target in zip(manifest.segments.layers, int8_files, strict=True):
        (work / target).replace(work / ref.file)
    shutil.rmtree(work / INT8_DIR)
    segments = replace(manifest.segments, layers=[FileRef.of(work, ref.file) for ref in manifest.segments.layers])
    limits = {"max_relative_error": MAX_RELATIVE_ERROR, "max_batch_dependence": MAX_BATCH_DEPENDENCE}
    return replace(manifest, segments=segments, quantization={"method": METHOD, "check": limits | check})
