"""What BERT-style encoders share: embeddings + a stack of bidirectional layers, and the two head families.

The per-architecture classes (bert.py, roberta.py) only say where the model keeps its parts and how positions
are numbered; segments reuse the model's own modules, so the exported graphs compute what transformers does.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
from raee_ops.onnx_export.adapters.base import ArchitectureAdapter
from transformers import AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification

from raee_ops.errors import RaeeConfigError

PositionFn = Callable[[torch.Tensor], torch.Tensor]


def key_padding_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """B×T int mask -> B×1×1×T additive bias (0 for real keys, dtype min for padding), as transformers' eager
    mask does; it broadcasts over heads and queries, so padded keys get no weight in any row."""
    padding = attention_mask[:, None, None, :].eq(0).to(dtype)
    return padding * torch.finfo(dtype).min


class EncoderEmbed(torch.nn.Module):
    """(input_ids, attention_mask) -> hidden: word + position + token-type 0 embeddings, then LayerNorm."""

    def __init__(self, embeddings: torch.nn.Module, positions: PositionFn) -> None:
        super().__init__()
        self.embeddings = embeddings
        self.positions = positions

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.embeddings(
            input_ids=input_ids,
            position_ids=self.positions(attention_mask),
            token_type_ids=torch.zeros_like(input_ids),
        )


class EncoderLayer(torch.nn.Module):
    """(hidden, attention_mask) -> hidden: one encoder layer with the key-padding bias built inside."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.layer(hidden_states, attention_mask=key_padding_bias(attention_mask, hidden_states.dtype))


class MaskedLMHead(torch.nn.Module):
    """The model's MLM head with its vocabulary projection cut down to the verbalizer rows (B×H -> B×labels),
    so a head file holds a few rows instead of the whole (tied) vocabulary matrix."""

    def __init__(self, transform: torch.nn.Module, decoder: torch.nn.Linear, token_ids: Sequence[int]) -> None:
        super().__init__()
        ids = torch.tensor(list(token_ids), dtype=torch.long)
        self.transform = transform
        self.weight = torch.nn.Parameter(decoder.weight.detach()[ids].clone(), requires_grad=False)
        self.bias = torch.nn.Parameter(decoder.bias.detach()[ids].clone(), requires_grad=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(self.transform(hidden_states), self.weight, self.bias)


class ClsHead(torch.nn.Module):
    """A sequence classifier fed the CLS state alone (B×H); HF classifiers slice position 0 of a sequence, so
    the state is handed to them as a length-1 sequence."""

    def __init__(self, classifier: torch.nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.classifier(hidden_states.unsqueeze(1))


class EncoderAdapter(ArchitectureAdapter):
    """Embed and layer segments of the encoder at `model.base_model` (embeddings, encoder.layer): the `bert` or
    `roberta` attribute of a model with a head, the model itself when it has none.

    Segments are returned in eval mode: torch.onnx.export restores a wrapper's mode afterwards, and a
    wrapper left in train mode would switch the model's own modules (dropout) to training with it.
    """

    @abstractmethod
    def position_ids(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """B×T position ids for right-padded rows, from the attention mask alone."""

    @property
    def base(self) -> torch.nn.Module:
        return self.model.base_model

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def embed_segment(self) -> torch.nn.Module:
        return EncoderEmbed(self.base.embeddings, self.position_ids).eval()

    def layer_segment(self, index: int) -> torch.nn.Module:
        return EncoderLayer(self.hf_layers()[index]).eval()

    def hf_layers(self) -> Sequence[torch.nn.Module]:
        return self.base.encoder.layer


class MaskedLMEncoderAdapter(EncoderAdapter):
    """Masked-LM family: the prompt ends in the mask token and the head scores the verbalizer tokens there."""

    head_kind: ClassVar[str] = "masked-lm"
    readout: ClassVar[str] = "mask"
    auto_class = AutoModelForMaskedLM

    @abstractmethod
    def mlm_parts(self) -> tuple[torch.nn.Module, torch.nn.Linear]:
        """(transform before the vocabulary projection, the projection itself)."""

    def head_segment(self, label_token_ids: Sequence[int]) -> torch.nn.Module:
        transform, decoder = self.mlm_parts()
        return MaskedLMHead(transform, decoder, label_token_ids).eval()


class SequenceClassificationEncoderAdapter(EncoderAdapter):
    """Fine-tuned classifier family: the head is the model's own classifier on the CLS state; labels are its
    output columns in order, so verbalizer token ids play no part."""

    head_kind: ClassVar[str] = "sequence-classification"
    readout: ClassVar[str] = "cls"
    auto_class = AutoModelForSequenceClassification

    @abstractmethod
    def classifier(self) -> torch.nn.Module:
        """Maps a B×1×H sequence (the CLS state) to B×num_labels logits."""

    def head_segment(self, label_token_ids: Sequence[int]) -> torch.nn.Module:
        num_labels = self.model.config.num_labels
        if len(label_token_ids) != num_labels:
            raise RaeeConfigError(
                f"task has {len(label_token_ids)} labels but this classifier was trained with {num_labels}; "
                "a sequence-classification backbone only serves tasks with its own label set"
            )
        return ClsHead(self.classifier()).eval()


class HeadlessEncoderAdapter(EncoderAdapter):
    """A bare encoder (e.g. a BertModel such as all-MiniLM-L6-v2): no MLM or classifier head, so no label-word
    head either. Its layers are read by the probe heads build-db fits on the pooled states (token mean, or the CLS
    token as the readout), which is all a backbone needs; strategies that read a label-word head refuse it."""

    head_kind: ClassVar[str] = "none"
    readout: ClassVar[str] = "cls"
    label_word_head: ClassVar[bool] = False
    auto_class = AutoModel

    def head_segment(self, label_token_ids: Sequence[int]) -> torch.nn.Module:
        raise RaeeConfigError(f"{type(self.model).__name__} has no label-word head to export")
