"""Tiny BERT/RoBERTa encoders through the whole export (Beam pipeline, ONNX segments, verification)."""

from __future__ import annotations

from pathlib import Path

import pytest
from raee_ops.pipelines.export import run_export
from raee_ops.schemas.manifest import load_manifest
from tiny_encoders import BUILDERS, build_tiny_encoder

from raee_ops.tasks import PRESETS

READOUTS = {"mlm": "mask", "cls": "cls"}


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_export_verifies(kind: str, tmp_path: Path) -> None:
    model_dir = build_tiny_encoder(kind, tmp_path / "model")
    out = tmp_path / "artifacts"
    manifest = run_export(
        str(model_dir), out, [PRESETS["sst2"]], verify=True, embedders=[], max_length=64, beam_args=[]
    )
    assert manifest.verify is not None and manifest.verify["passed"]
    assert len(manifest.verify["max_abs_diff"]) == manifest.num_layers == 2
    assert manifest.readout == READOUTS[kind.split("-")[1]]
    assert load_manifest(out).segments == manifest.segments
