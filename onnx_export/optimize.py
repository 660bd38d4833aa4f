"""Optimize exported graphs once, at export time, and store them: ORT's basic graph optimizations (constant
folding, redundant-node elimination: provider-neutral) saved offline, then onnxruntime.transformers' fusions
(RMS/LayerNorm, Gelu/FastGelu/BiasGelu) into single ops that both the CPU and the CUDA provider run. Nothing at the
extended/all levels is saved: those rewrite for one provider and its memory layout, and each session still
applies them when it loads the graph.

Skip*LayerNormalization (residual Add folded into the norm) is left out: on this project's 2-core CPU the MiniLM
embedder with it ran ~12% slower (thread CPU time, 32×32 tokens) than with Add + LayerNormalization, and decoder
layers were the same either way.

Every optimized graph is verified against PyTorch like any other (onnx_export.verify, embedder.export_embedder);
what was fused is recorded per file in the manifest, from the stored graph itself.
"""

from __future__ import annotations

import collections
import logging
from pathlib import Path

import onnx

#: onnxruntime.transformers' optimizer model type: the BERT fusions cover the norms, activations and (encoders)
#: attention of every architecture here; decoder attention is already one MultiHeadAttention (attention.py).
MODEL_TYPE = "bert"
#: ORT graph optimization level saved offline: 1 = basic, the provider-independent one.
OPT_LEVEL = 1
ORT_LEVEL = "ORT_ENABLE_BASIC"
METHOD = f"onnxruntime.transformers optimize_model({MODEL_TYPE!r}, opt_level={OPT_LEVEL}, no skip-layer-norm fusion)"
CONTRIB = "com.microsoft"
#: Single-kernel norms ORT fuses into the default domain (SimplifiedLayerNormalization is in no ONNX opset).
FUSED_DEFAULT_DOMAIN = ("LayerNormalization", "SimplifiedLayerNormalization")
#: The contrib op of `--quantize int8`'s MatMuls (quantize.py): an int8 MatMul, not a fusion.
INT8_MATMUL = "MatMulIntegerToFloat"


def optimize_graph(path: Path) -> None:
    """Replace the ONNX file at `path` by its optimized graph."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    from raee_ops.runtime import open_session, ort

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)  # per-fusion chatter
    # ORT's basic level through our own session (optimize_model's would ask for threads of its own, which ORT
    # refuses in a process whose sessions share one pool), then the Python-side fusions on its output.
    basic = path.with_name(f".{path.name}.basic")
    open_session(
        path,
        graph_optimization_level=getattr(ort.GraphOptimizationLevel, ORT_LEVEL),
        optimized_model_filepath=str(basic),
    )
    options = FusionOptions(MODEL_TYPE)
    options.enable_skip_layer_norm = False
    model = optimize_model(
        str(basic), model_type=MODEL_TYPE, num_heads=0, hidden_size=0, opt_level=0, optimization_options=options
    )
    basic.unlink()
    model.save_model_to_file(str(path))  # not onnx.checker: ORT's SimplifiedLayerNormalization is in no ONNX opset


def graph_report(path: Path) -> dict[str, object]:
    """What the manifest records per stored graph: its node count and the counts of its fused op types (contrib
    ops and norms), e.g. {"nodes": 93, "fused": {"MultiHeadAttention": 1, "SimplifiedLayerNormalization": 1, ...}}."""
    nodes = onnx.load(str(path), load_external_data=False).graph.node
    fused = collections.Counter(
        n.op_type
        for n in nodes
        if (n.domain == CONTRIB and n.op_type != INT8_MATMUL) or n.op_type in FUSED_DEFAULT_DOMAIN
    )
    return {"nodes": len(nodes), "fused": dict(sorted(fused.items()))}
