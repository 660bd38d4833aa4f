"""Tiny BERT/RoBERTa encoders through the whole export (Beam pipeline, ONNX segments, verification)."""

from __future__ import annotations

from pathlib import Path

import pytest
from raee_ops.onnx_export.loader import load_model
from raee_ops.pipelines.export import run_export
from raee_ops.schemas.manifest import load_manifest
from tiny_encoders import BUILDERS, build_tiny_encoder

from raee_ops.errors import RaeeConfigError
from raee_ops.tasks import PRESETS

READOUTS = {"mlm": "mask", "cls": "cls", "bare": "cls"}


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
    bare = kind.endswith("-bare")  # no label-word head: no head files, the readout states are what is verified
    assert manifest.label_word_head is not bare
    assert all((t.head is None) is bare for t in manifest.tasks.values())
    assert manifest.verify["compared"] == ("readout hidden states (no label-word head)" if bare else "head logits")
    assert load_manifest(out).segments == manifest.segments


def test_bert_directory_without_tokenizer_files_is_refused(tmp_path: Path) -> None:
    """transformers loads a BertTokenizer of the special tokens alone from such a directory: every word would read
    as [UNK] in an export that verifies."""
    model_dir = build_tiny_encoder("bert-bare", tmp_path / "model")
    for file in model_dir.glob("*"):
        if file.name.startswith(("tokenizer", "vocab", "special_tokens")):
            file.unlink()
    with pytest.raises(RaeeConfigError, match=f"--model {model_dir}: its tokenizer knows only its special tokens"):
        load_model(str(model_dir))
