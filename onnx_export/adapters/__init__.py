"""The adapter registry: the one place that knows which architectures are supported."""

from __future__ import annotations

from typing import Any

from raee_ops.onnx_export.adapters.base import ArchitectureAdapter, head_kind_of
from raee_ops.onnx_export.adapters.bert import (
    BertEncoderAdapter,
    BertMaskedLMAdapter,
    BertSequenceClassificationAdapter,
)
from raee_ops.onnx_export.adapters.gemma3 import Gemma3Adapter
from raee_ops.onnx_export.adapters.llama import LlamaAdapter
from raee_ops.onnx_export.adapters.roberta import (
    RobertaEncoderAdapter,
    RobertaMaskedLMAdapter,
    RobertaSequenceClassificationAdapter,
)

from raee_ops.errors import RaeeConfigError

ADAPTERS: list[type[ArchitectureAdapter]] = [
    LlamaAdapter,
    Gemma3Adapter,
    BertMaskedLMAdapter,
    BertSequenceClassificationAdapter,
    RobertaMaskedLMAdapter,
    RobertaSequenceClassificationAdapter,
    BertEncoderAdapter,
    RobertaEncoderAdapter,
]


def adapter_for(config: Any) -> type[ArchitectureAdapter]:
    """The adapter class for a transformers config, or a RaeeConfigError listing what is supported."""
    for adapter in ADAPTERS:
        if adapter.matches(config):
            return adapter
    supported = ", ".join(sorted({f"{t} ({a.head_kind})" for a in ADAPTERS for t in a.model_types}))
    raise RaeeConfigError(
        f"unsupported architecture: model_type {config.model_type!r} ({head_kind_of(config)}); supported: {supported}"
    )
