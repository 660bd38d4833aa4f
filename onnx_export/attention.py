"""Attention that exports as one `com.microsoft::MultiHeadAttention` node.

ORT's transformer optimizer only recognizes the attention subgraphs of its own Llama/GPT exports; the eager HF
attention (MatMul, Add, Softmax, MatMul, GQA head repeats) traced from our segments matches none of them. So the
segments ask transformers for this attention implementation instead: in PyTorch it computes what the eager path
computes (the verifier compares the exported graph with the HF model's own forward), and the ONNX exporter writes
the fused contrib op, which both the CPU and the CUDA provider implement. Decoder layers use it (encoders keep eager
attention): their additive B×1×T×T bias carries the causal, padding and sliding-window masks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import AttentionInterface

from raee_ops.errors import RaeeConfigError

NAME = "raee_mha"


class _MultiHeadAttention(torch.autograd.Function):
    """query B×T×(N·D), key/value B×N×T×D, bias B×1×T×T -> B×T×(N·D)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        bias: torch.Tensor,
        heads: int,
        scale: float,
    ) -> torch.Tensor:
        batch, length, _ = query.shape
        q = query.view(batch, length, heads, -1).transpose(1, 2)
        weights = torch.softmax(torch.matmul(q, key.transpose(2, 3)) * scale + bias, dim=-1)
        return torch.matmul(weights, value).transpose(1, 2).reshape(batch, length, -1)

    @staticmethod
    def symbolic(g: Any, query: Any, key: Any, value: Any, bias: Any, heads: int, scale: float) -> Any:
        absent = g.op("prim::Constant")
        absent.setType(torch._C.OptionalType.ofTensor())
        output = g.op(
            "com.microsoft::MultiHeadAttention",
            query,
            key,
            value,
            absent,
            absent,
            bias,
            num_heads_i=heads,
            scale_f=scale,
        )
        output.setType(query.type())  # same shape and type as the flat query: the exporter cannot infer it
        return output


def multi_head_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The AttentionInterface signature: query B×N×T×D, key/value B×Nkv×T×D (GQA heads repeated here)."""
    if getattr(module, "attn_logit_softcapping", None) is not None:
        raise RaeeConfigError("attention logit soft-capping has no fused ONNX attention")
    batch, _, length, _ = query.shape
    heads = module.config.num_attention_heads  # a constant of the graph, not a traced size
    kv_heads = getattr(module.config, "num_key_value_heads", None) or heads  # a config without grouped heads
    key, value = _repeat_heads(key, heads, kv_heads), _repeat_heads(value, heads, kv_heads)
    flat = query.transpose(1, 2).reshape(batch, length, -1)
    out = _MultiHeadAttention.apply(flat, key, value, attention_mask, heads, float(scaling))
    return out.view(batch, length, heads, -1), None


def _repeat_heads(states: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    """B×Nkv×T×D -> B×N×T×D, each key/value head shared by N / Nkv query heads (as HF's repeat_kv)."""
    batch, _, length, dim = states.shape
    if kv_heads == heads:
        return states
    expanded = states[:, :, None].expand(batch, kv_heads, heads // kv_heads, length, dim)
    return expanded.reshape(batch, heads, length, dim)


AttentionInterface.register(NAME, multi_head_attention)


@contextmanager
def fused_attention(config: Any) -> Iterator[None]:
    """Let `config`'s model use the fused attention while a segment runs (traces), then restore it, so the same
    model's own forward (the verifier's reference) keeps its eager attention."""
    previous = config._attn_implementation
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = previous
