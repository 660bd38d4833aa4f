"""What decoder-only LMs (Llama, Gemma 3) share: positions, the 4-D additive mask and the causal-LM head.

The segments reuse the model's own modules. What the HF model builds once per forward (positions, rotary
tables, masks) the embed segment builds once per batch, from the B×T attention mask, as extra outputs that every
layer takes as inputs: the layer graphs hold only the layer, which ORT can fuse (and does not rebuild T×T masks
31 times). A right-padded row computes exactly what the same row computes unpadded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from raee_ops.onnx_export.adapters.base import ArchitectureAdapter
from raee_ops.onnx_export.attention import fused_attention
from transformers import AutoModelForCausalLM

#: The per-batch additive attention mask's graph name (a prefix: one per layer kind).
BIAS = "attention_bias"


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """cumsum(mask) - 1, clamped at 0: real tokens of a right-padded row keep their unpadded positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype, window: int | None = None) -> torch.Tensor:
    """B×T int mask -> B×1×T×T additive mask: causal AND real key AND (if windowed) q - k < window.

    Every query also sees itself, so padded query rows never have an all-masked softmax (no NaN); real rows
    already include themselves, so their result is unchanged.
    """
    index = torch.ones_like(attention_mask[0]).cumsum(0) - 1  # 0..T-1 without a data-dependent arange
    distance = index[:, None] - index[None, :]  # query - key, T×T
    allowed = distance >= 0
    if window is not None:
        allowed = allowed & (distance < window)
    allowed = allowed[None, None] & attention_mask[:, None, None, :].bool()
    allowed = allowed | (distance == 0)[None, None]
    zero = torch.zeros((), dtype=dtype)
    return torch.where(allowed, zero, torch.tensor(torch.finfo(dtype).min, dtype=dtype))


class DecoderEmbed(torch.nn.Module):
    """(input_ids, attention_mask) -> hidden and, once per batch, what every layer reads: for each layer kind its
    rotary cos/sin (B×T×D) and additive mask (B×1×T×T). Padded positions of hidden are zeroed (they only ever
    feed themselves)."""

    def __init__(
        self,
        embed_tokens: torch.nn.Module,
        rotary: torch.nn.Module,
        kinds: dict[str, tuple[dict[str, Any], int | None]],
    ) -> None:
        super().__init__()
        self.embed_tokens = embed_tokens
        self.rotary = rotary
        self.kinds = kinds  # layer kind -> (rotary kwargs, sliding window)
        self.output_names = ["hidden_states"]
        for kind in kinds:
            self.output_names += layer_inputs(kind)[1:]
        self.axes = square_axes(self.output_names)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hidden = self.embed_tokens(input_ids)
        hidden = hidden * attention_mask[..., None].to(hidden.dtype)
        positions = position_ids(attention_mask)
        outputs = [hidden]
        for rotary_kwargs, window in self.kinds.values():
            bias = additive_mask(attention_mask, hidden.dtype, window)
            outputs += [bias, *self.rotary(hidden, positions, **rotary_kwargs)]
        return tuple(outputs)


def layer_inputs(kind: str) -> list[str]:
    """A decoder layer's graph inputs; per-kind names, so one embed output feeds every layer of its kind."""
    suffix = f"_{kind}" if kind else ""
    return ["hidden_states", f"{BIAS}{suffix}", f"cos{suffix}", f"sin{suffix}"]


def square_axes(names: list[str]) -> dict[str, dict[int, str]]:
    """The attention biases' axes (B×1×T×T: query × key, both the sequence); the other tensors are B×T×…."""
    return {name: {0: "batch", 2: "sequence", 3: "sequence"} for name in names if name.startswith(BIAS)}


class DecoderLayer(torch.nn.Module):
    """(hidden, attention bias, cos, sin) -> hidden: one HF decoder layer with fused attention; the per-batch
    inputs come from the embed segment, so the layer graph holds nothing but the layer."""

    def __init__(self, layer: torch.nn.Module, config: Any, kind: str) -> None:
        super().__init__()
        self.layer = layer
        self.config = config
        self.input_names = layer_inputs(kind)
        self.axes = square_axes(self.input_names)

    def forward(
        self, hidden_states: torch.Tensor, attention_bias: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        with fused_attention(self.config):
            return self.layer(hidden_states, attention_mask=attention_bias, position_embeddings=(cos, sin))


class CausalLMHead(torch.nn.Module):
    """B×H -> B×labels: final norm, the lm_head rows of the verbalizer tokens, optional logit soft-capping;
    a head file holds a few rows instead of the (tied) vocabulary matrix."""

    def __init__(
        self, norm: torch.nn.Module, lm_head: torch.nn.Linear, token_ids: Sequence[int], softcap: float | None
    ) -> None:
        super().__init__()
        ids = torch.tensor(list(token_ids), dtype=torch.long)
        self.norm = norm
        self.weight = torch.nn.Parameter(lm_head.weight.detach()[ids].clone(), requires_grad=False)
        bias = lm_head.bias.detach()[ids].clone() if lm_head.bias is not None else None
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self.softcap = softcap

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = torch.nn.functional.linear(self.norm(hidden_states), self.weight, self.bias)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


class DecoderAdapter(ArchitectureAdapter):
    """A `*ForCausalLM` whose base model at `model.model` has embed_tokens, layers, norm and rotary_emb; the
    next token is predicted at the last real token. Subclasses say how each layer picks RoPE and window."""

    head_kind: ClassVar[str] = "causal-lm"
    readout: ClassVar[str] = "last"
    auto_class = AutoModelForCausalLM

    def layer_kind(self, index: int) -> str:
        """Layers of one kind share their rotary table and mask ("" when all layers are alike)."""
        return ""

    def rotary_kwargs(self, index: int) -> dict[str, Any]:
        return {}

    def window(self, index: int) -> int | None:
        return None

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def embed_segment(self) -> torch.nn.Module:
        kinds = {}
        for index in range(self.num_layers):
            kinds.setdefault(self.layer_kind(index), (self.rotary_kwargs(index), self.window(index)))
        return DecoderEmbed(self.model.model.embed_tokens, self.model.model.rotary_emb, kinds)

    def layer_segment(self, index: int) -> torch.nn.Module:
        return DecoderLayer(self.hf_layers()[index], self.config, self.layer_kind(index))

    def head_segment(self, label_token_ids: Sequence[int]) -> torch.nn.Module:
        softcap = getattr(self.config, "final_logit_softcapping", None)
        return CausalLMHead(self.model.model.norm, self.model.lm_head, label_token_ids, softcap)

    def hf_layers(self) -> Sequence[torch.nn.Module]:
        return self.model.model.layers[: self.num_layers]
