"""Gemma 3 text (model_type gemma3_text).

Layers alternate `sliding_attention` / `full_attention` (config.layer_types): each type has its own RoPE base
(`rotary_emb(x, positions, layer_type)`) and sliding layers only see keys with q - k < sliding_window. The
sqrt(hidden) embedding scale lives inside `embed_tokens` and the extra pre/post norms inside the HF layers,
so the shared decoder segments cover them; the head applies final_logit_softcapping when set.
Exported with the legacy (TorchScript, dynamo=False) exporter, like Llama: the real gemma3-270m verifies
within 4e-5 of PyTorch at every layer.
"""

from __future__ import annotations

from typing import Any

from raee_ops.onnx_export.adapters.decoder import DecoderAdapter

from raee_ops.errors import RaeeConfigError


class Gemma3Adapter(DecoderAdapter):
    model_types = ("gemma3_text",)

    def __init__(self, model: Any, tokenizer: Any) -> None:
        super().__init__(model, tokenizer)
        if getattr(self.config, "use_bidirectional_attention", False):
            raise RaeeConfigError("Gemma 3 with use_bidirectional_attention is not supported (causal only)")

    def layer_kind(self, index: int) -> str:
        return self.config.layer_types[index]

    def rotary_kwargs(self, index: int) -> dict[str, Any]:
        return {"layer_type": self.layer_kind(index)}

    def window(self, index: int) -> int | None:
        return self.config.sliding_window if self.layer_kind(index) == "sliding_attention" else None
