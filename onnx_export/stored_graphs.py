"""The small graphs the runtime runs besides the segments. A device chain runs two between layers, so a batch's
states stay on the device: `pool` (each row's mean over its real tokens and its readout token, B×T×H ->
B×POOLINGS×H: all a readout or a stop rule needs from a layer) and `compact` (rows `keep`, columns cut to `width`:
the active set once rows leave). A small table's exact search runs `search` (cosine similarities and the top k),
on ONNX Runtime's thread pool, the one the layers run on: numpy's BLAS brought threads of its own that kept
spinning after each search and slowed the layers run next to them (bench/RESULTS.md), and its argpartition was
3× slower than TopK. Why stored graphs: classify loads onnxruntime, not onnx, and ONNX Runtime builds graphs only
from files. They do not depend on the backbone (every dimension is symbolic), so they ship with the package,
written by this module:

    python -m raee_ops.onnx_export.stored_graphs

and tests/test_runtime.py checks the stored files against what it writes, and their results against numpy's.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from raee_ops.runtime import STORED_GRAPHS

OPSET, IR_VERSION = 17, 8  # pinned, so the written bytes do not move with the installed onnx


def _model(name: str, nodes: list, inputs: list, outputs: list, initializers: list | None = None) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializers or [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="raee-ops")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def pool_graph() -> onnx.ModelProto:
    """hidden_states B×T×H, attention_mask B×T (int64), positions B (int64) -> pooled B×2×H (float32), in
    schemas.tables.POOLINGS order: the masked mean, then the readout token's states."""
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    consts = [
        helper.make_tensor("axis_1", i64, [1], [1]),
        helper.make_tensor("axis_2", i64, [1], [2]),
        helper.make_tensor("one", f, [], [1.0]),
    ]
    nodes = [
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=f),
        helper.make_node("Unsqueeze", ["mask_f", "axis_2"], ["mask_3d"]),
        helper.make_node("Mul", ["hidden_states", "mask_3d"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis_1"], ["sums"], keepdims=0),
        helper.make_node("ReduceSum", ["mask_3d", "axis_1"], ["counts"], keepdims=0),
        helper.make_node("Max", ["counts", "one"], ["denominators"]),
        helper.make_node("Div", ["sums", "denominators"], ["mean"]),
        helper.make_node("Unsqueeze", ["positions", "axis_1"], ["index"]),
        helper.make_node("GatherND", ["hidden_states", "index"], ["token"], batch_dims=1),
        helper.make_node("Unsqueeze", ["mean", "axis_1"], ["mean_3d"]),
        helper.make_node("Unsqueeze", ["token", "axis_1"], ["token_3d"]),
        helper.make_node("Concat", ["mean_3d", "token_3d"], ["pooled"], axis=1),
    ]
    inputs = [
        helper.make_tensor_value_info("hidden_states", f, ["batch", "sequence", "hidden"]),
        helper.make_tensor_value_info("attention_mask", i64, ["batch", "sequence"]),
        helper.make_tensor_value_info("positions", i64, ["batch"]),
    ]
    outputs = [helper.make_tensor_value_info("pooled", f, ["batch", 2, "hidden"])]
    return _model("pool", nodes, inputs, outputs, consts)


def compact_graph() -> onnx.ModelProto:
    """hidden_states B×T×H, keep K (int64 row indices), width 1 (int64) -> hidden_states[keep, :width]."""
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    consts = [helper.make_tensor("zero", i64, [1], [0]), helper.make_tensor("axis_1", i64, [1], [1])]
    nodes = [
        helper.make_node("Gather", ["hidden_states", "keep"], ["rows"], axis=0),
        helper.make_node("Slice", ["rows", "zero", "width", "axis_1"], ["kept"]),
    ]
    inputs = [
        helper.make_tensor_value_info("hidden_states", f, ["batch", "sequence", "hidden"]),
        helper.make_tensor_value_info("keep", i64, ["kept_rows"]),
        helper.make_tensor_value_info("width", i64, [1]),
    ]
    outputs = [helper.make_tensor_value_info("kept", f, ["kept_rows", "width", "hidden"])]
    return _model("compact", nodes, inputs, outputs, consts)


def search_graph() -> onnx.ModelProto:
    """queries Q×H, keys_t H×N (unit rows, transposed once), k (int64 [1]) -> similarities and indices of each
    query's k nearest, Q×k, most similar first (ties: the lower index first, as ONNX's TopK defines)."""
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    nodes = [
        helper.make_node("MatMul", ["queries", "keys_t"], ["similarities"]),
        helper.make_node("TopK", ["similarities", "k"], ["top_similarities", "top"], axis=-1, largest=1, sorted=1),
    ]
    inputs = [
        helper.make_tensor_value_info("queries", f, ["queries", "dim"]),
        helper.make_tensor_value_info("keys_t", f, ["dim", "rows"]),
        helper.make_tensor_value_info("k", i64, [1]),
    ]
    outputs = [
        helper.make_tensor_value_info("top_similarities", f, ["queries", "k"]),
        helper.make_tensor_value_info("top", i64, ["queries", "k"]),
    ]
    return _model("search", nodes, inputs, outputs)


BUILDERS = {"pool": pool_graph, "compact": compact_graph, "search": search_graph}


def main() -> None:
    STORED_GRAPHS.mkdir(exist_ok=True)
    for name, build in BUILDERS.items():
        onnx.save(build(), str(STORED_GRAPHS / f"{name}.onnx"))
        print(f"wrote {STORED_GRAPHS / f'{name}.onnx'}")


if __name__ == "__main__":
    main()
