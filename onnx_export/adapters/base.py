"""The contract between one architecture and the generic exporter (Optimum-style: one small class each).

An adapter wraps a loaded transformers model and hands the exporter plain `torch.nn.Module` segments with
fixed signatures. The generic exporter and verifier never branch on model names; everything
architecture-specific (masks, rotary tables, embedding scaling, heads, positions) lives in the adapter.

Segment signatures (all tensors batch-first, B and T dynamic, right padding), the defaults of
`onnx_export.segments.IO_NAMES`:
- embed:  (input_ids int64 B×T, attention_mask int64 B×T) -> hidden_states float32 B×T×H
- layer:  (hidden_states float32 B×T×H, attention_mask int64 B×T) -> hidden_states_out float32 B×T×H
- head:   (hidden_states float32 B×H) -> logits float32 B×C, one column per label
A segment module may name its own inputs and outputs (`input_names`, `output_names`): decoder embeds also return
per-batch tensors computed once from attention_mask (an attention bias and rotary cos/sin per attention kind), and
their layers take those instead of attention_mask (adapters/decoder.py). Either way a padded row equals the same
row alone.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from raee_ops.tasks import readout_suffix


class ArchitectureAdapter(ABC):
    #: `config.model_type` values this adapter handles.
    model_types: ClassVar[tuple[str, ...]]
    #: Which head family: "causal-lm", "masked-lm", "sequence-classification", or "none" (a bare encoder).
    head_kind: ClassVar[str]
    #: False for a backbone without a label-word head (a bare encoder): its layers are read through the probe heads
    #: build-db fits, never zero-shot, so it exports no head segments.
    label_word_head: ClassVar[bool] = True
    #: Where the head reads the hidden state: "last", "mask" or "cls".
    readout: ClassVar[str]
    #: The transformers auto class that loads this kind of model (e.g. transformers.AutoModelForCausalLM).
    auto_class: ClassVar[Any]
    #: The runtime pads on the right, so every architecture's segments must take right-padded batches.
    padding_side: ClassVar[str] = "right"

    def __init__(self, model: torch.nn.Module, tokenizer: Any) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer

    @classmethod
    def matches(cls, config: Any) -> bool:
        """True when this adapter handles a config (model type and head family)."""
        return config.model_type in cls.model_types and cls.head_kind == head_kind_of(config)

    @property
    @abstractmethod
    def num_layers(self) -> int: ...

    @property
    @abstractmethod
    def hidden_size(self) -> int: ...

    @abstractmethod
    def embed_segment(self) -> torch.nn.Module: ...

    @abstractmethod
    def layer_segment(self, index: int) -> torch.nn.Module: ...

    @abstractmethod
    def head_segment(self, label_token_ids: Sequence[int]) -> torch.nn.Module: ...

    @abstractmethod
    def hf_layers(self) -> Sequence[torch.nn.Module]:
        """The model's own layer modules, hooked by the verifier to read each layer's raw output."""

    @property
    def prompt_suffix(self) -> str:
        """Appended to every rendered prompt (masked LMs put their mask token where the label word goes)."""
        return readout_suffix(self.readout, self.tokenizer.mask_token)


def head_kind_of(config: Any) -> str:
    """Head family from `config.architectures` (e.g. BertForMaskedLM -> masked-lm, BertModel -> none)."""
    architectures = config.architectures or []
    names = " ".join(architectures)
    if "ForSequenceClassification" in names:
        return "sequence-classification"
    if "ForMaskedLM" in names:
        return "masked-lm"
    if architectures and all(name.endswith("Model") and "For" not in name for name in architectures):
        return "none"
    return "causal-lm"
