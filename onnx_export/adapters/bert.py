"""BERT: absolute positions 0..T-1 (right padding keeps every real token's position)."""

from __future__ import annotations

import torch
from raee_ops.onnx_export.adapters.encoder import (
    HeadlessEncoderAdapter,
    MaskedLMEncoderAdapter,
    SequenceClassificationEncoderAdapter,
)


def arange_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """0..T-1 on every row: with right padding each real token keeps the position it has alone."""
    positions = torch.arange(attention_mask.shape[1], dtype=torch.long, device=attention_mask.device)
    return positions.unsqueeze(0).expand_as(attention_mask)


class _Bert:
    model_types = ("bert",)

    def position_ids(self, attention_mask: torch.Tensor) -> torch.Tensor:
        return arange_positions(attention_mask)


class BertMaskedLMAdapter(_Bert, MaskedLMEncoderAdapter):
    def mlm_parts(self) -> tuple[torch.nn.Module, torch.nn.Linear]:
        predictions = self.model.cls.predictions
        return predictions.transform, predictions.decoder


class BertSequenceClassificationAdapter(_Bert, SequenceClassificationEncoderAdapter):
    def classifier(self) -> torch.nn.Module:
        """Pooler (dense + tanh on the CLS state), then the classifier: BertForSequenceClassification."""
        return torch.nn.Sequential(self.base.pooler, self.model.dropout, self.model.classifier)


class BertEncoderAdapter(_Bert, HeadlessEncoderAdapter):
    """BertModel: the encoder alone (the `minilm-l6` preset)."""
