"""RoBERTa: positions count real tokens from padding_idx + 1 (fairseq style); padding sits at padding_idx."""

from __future__ import annotations

import torch
from raee_ops.onnx_export.adapters.encoder import (
    HeadlessEncoderAdapter,
    MaskedLMEncoderAdapter,
    SequenceClassificationEncoderAdapter,
)


class _Roberta:
    model_types = ("roberta",)

    def position_ids(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """From the mask, not input_ids: a real token that happens to be the pad id keeps its position."""
        mask = attention_mask.long()
        return torch.cumsum(mask, dim=1) * mask + self.model.config.pad_token_id


class _RobertaLMTransform(torch.nn.Module):
    """RobertaLMHead up to the vocabulary projection (dense, gelu, layer_norm); its forward has no split."""

    def __init__(self, lm_head: torch.nn.Module) -> None:
        super().__init__()
        self.dense = lm_head.dense
        self.layer_norm = lm_head.layer_norm

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(torch.nn.functional.gelu(self.dense(hidden_states)))


class RobertaMaskedLMAdapter(_Roberta, MaskedLMEncoderAdapter):
    def mlm_parts(self) -> tuple[torch.nn.Module, torch.nn.Linear]:
        return _RobertaLMTransform(self.model.lm_head), self.model.lm_head.decoder


class RobertaSequenceClassificationAdapter(_Roberta, SequenceClassificationEncoderAdapter):
    def classifier(self) -> torch.nn.Module:
        """RobertaClassificationHead (dense, tanh, out_proj) reads position 0 of what it is given."""
        return self.model.classifier


class RobertaEncoderAdapter(_Roberta, HeadlessEncoderAdapter):
    """RobertaModel: the encoder alone."""
