"""Tiny random-weight decoder models (Llama, Gemma 3 text) saved as HF directories, built offline.

The tokenizer is a WordLevel vocabulary over the task templates and sample texts, so every preset
verbalizer word is a single token and nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from raee_ops.onnx_export.verify import SAMPLE_TEXTS
from tokenizers import Tokenizer, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from raee_ops.tasks import PRESETS

SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]


def _corpus() -> list[str]:
    texts = [t.template for t in PRESETS.values()] + [" ".join(t.verbalizer) for t in PRESETS.values()]
    texts += [text for pair in SAMPLE_TEXTS for text in pair]
    return texts + ["the movie was great and the acting was bad", "a b c d e f g h"]


def build_tokenizer(add_bos: bool) -> PreTrainedTokenizerFast:
    """WordLevel over whitespace/punctuation pieces; `add_bos` adds a <bos> post-processor (as Gemma does)."""
    pre = pre_tokenizers.Whitespace()
    words = sorted({piece for text in _corpus() for piece, _ in pre.pre_tokenize_str(text)})
    vocab = {token: index for index, token in enumerate(SPECIALS + words)}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>"
    )


def _save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, directory: Path) -> Path:
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def build_tiny_llama(directory: Path, seed: int = 0) -> Path:
    """2-layer Llama, hidden 32, 4 query / 2 key-value heads, tied embeddings."""
    tokenizer = build_tokenizer(add_bos=False)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return _save(LlamaForCausalLM(config).eval(), tokenizer, directory)


def build_tiny_gemma3(directory: Path, seed: int = 0) -> Path:
    """3-layer Gemma 3 text model: sliding (window 4), full, sliding layers with distinct RoPE bases, and
    final logit soft-capping."""
    tokenizer = build_tokenizer(add_bos=True)
    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=8,
        query_pre_attn_scalar=8,
        max_position_embeddings=256,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
        },
        final_logit_softcapping=30.0,
        initializer_range=0.2,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return _save(Gemma3ForCausalLM(config).eval(), tokenizer, directory)
