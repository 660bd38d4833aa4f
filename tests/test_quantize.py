"""INT8 export: the layers are quantized, checked against fp32 with a stated tolerance, and make their own artifacts."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from raee_ops.onnx_export import quantize
from raee_ops.pipelines.export import run_export
from raee_ops.schemas.manifest import load_manifest

from raee_ops.errors import ArtifactError
from raee_ops.runtime import SegmentRuntime
from raee_ops.tasks import PRESETS

TASKS = [PRESETS["sst2"], PRESETS["rte"]]


def export(model: Path, out: Path, quantize_to: str | None) -> Path:
    run_export(str(model), out, TASKS, verify=False, embedders=[], max_length=128, beam_args=[], quantize=quantize_to)
    return out


def test_int8_layers_are_checked_against_fp32_and_change_fingerprint(tiny_llama_dir, tiny_llama_artifacts, tmp_path):
    int8 = load_manifest(export(tiny_llama_dir, tmp_path / "int8", "int8"))
    fp32 = load_manifest(tiny_llama_artifacts)
    check = int8.quantization["check"]
    assert int8.quantization["method"] == quantize.METHOD and fp32.quantization is None
    assert len(check["layers"]) == fp32.num_layers
    assert all(0 < layer["relative_error"] <= quantize.MAX_RELATIVE_ERROR for layer in check["layers"])
    assert int8.quantization["kept_fp32"] == ["down_proj"]  # the decoder adapter's outlier-carrying MatMuls
    assert set(check["layers"][-1]["head_agreement"]) == {"sst2", "rte"}
    assert int8.fingerprint != fp32.fingerprint  # a table built on fp32 states is refused by int8 artifacts
    layer = onnx.load(str(tmp_path / "int8" / int8.segments.layers[0].file))
    ops = {node.op_type for node in layer.graph.node if "down_proj" not in node.name}
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul"}
    assert [n.op_type for n in layer.graph.node if "down_proj" in n.name] == ["MatMul"]
    assert not (tmp_path / "int8" / quantize.INT8_DIR).exists()
    prompts = [TASKS[0].render(t) for t in ("a good film", "bad", "it was fine and fun")]
    got = SegmentRuntime(tmp_path / "int8").all_layers("sst2", prompts)
    want = SegmentRuntime(tiny_llama_artifacts).all_layers("sst2", prompts)
    assert got.shape == want.shape and np.isfinite(got).all() and not np.array_equal(got, want)


def test_int8_that_drifts_too_far_is_refused_and_leaves_nothing(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(quantize, "MAX_RELATIVE_ERROR", 0.0)
    with pytest.raises(ArtifactError, match="int8 layers drift too far from fp32"):
        export(tiny_llama_dir, tmp_path / "int8", "int8")
    assert not (tmp_path / "int8").exists() and not list(tmp_path.glob(".int8.tmp-*"))
