"""Llama family (incl. SmolLM2): one RoPE table, full causal attention in every layer."""

from __future__ import annotations

from raee_ops.onnx_export.adapters.decoder import DecoderAdapter


class LlamaAdapter(DecoderAdapter):
    model_types = ("llama",)
