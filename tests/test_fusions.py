"""The stored graphs keep their fusions (a regression that loses one fails here), the manifest records what the
stored files hold, and verification still catches a wrong optimized graph."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import raee_ops.pipelines.export
from raee_ops.onnx_export.optimize import graph_report
from raee_ops.pipelines.export import fusion_table, run_export
from raee_ops.schemas.manifest import load_manifest
from tiny_encoders import build_tiny_encoder

from raee_ops.errors import ArtifactError
from raee_ops.runtime import open_session
from raee_ops.tasks import PRESETS


def test_tiny_llama_layers_are_stored_fused(tiny_llama_artifacts: Path) -> None:
    manifest = load_manifest(tiny_llama_artifacts)
    graphs = manifest.optimization["graphs"]
    assert list(graphs) == [ref.file for ref in manifest.segments.layers]
    for ref in manifest.segments.layers:
        report = graph_report(tiny_llama_artifacts / ref.file)
        assert report == graphs[ref.file]  # the record describes the stored file
        assert report["fused"]["MultiHeadAttention"] == 1
        assert report["fused"]["SimplifiedLayerNormalization"] == 2  # attention and MLP RMSNorms
        session = open_session(tiny_llama_artifacts / ref.file)
        assert [i.name for i in session.get_inputs()] == ["hidden_states", "attention_bias", "cos", "sin"]
    assert "MultiHeadAttention 1" in fusion_table(manifest)


def test_tiny_bert_layers_are_stored_fused(tmp_path: Path) -> None:
    model_dir = build_tiny_encoder("bert-mlm", tmp_path / "model")
    manifest = run_export(str(model_dir), tmp_path / "out", [PRESETS["sst2"]], True, [], 64, [])
    for report in manifest.optimization["graphs"].values():
        assert report["fused"] == {"BiasGelu": 1, "LayerNormalization": 2}


def test_verify_catches_a_wrong_optimized_graph(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An optimized layer whose fused attention scales its scores wrongly must fail verification."""
    real = raee_ops.onnx_export.segments.optimize_graph

    def skewed(path: Path) -> None:
        real(path)
        model = onnx.load(str(path))
        (attention,) = [n for n in model.graph.node if n.op_type == "MultiHeadAttention"]
        (scale,) = [a for a in attention.attribute if a.name == "scale"]
        scale.f *= 3.0
        onnx.save(model, str(path))

    monkeypatch.setattr(raee_ops.onnx_export.segments, "optimize_graph", skewed)
    with pytest.raises(ArtifactError, match="layer 0"):
        run_export(str(tiny_llama_dir), tmp_path / "out", [PRESETS["sst2"]], True, [], 128, [])
    assert not (tmp_path / "out").exists()
