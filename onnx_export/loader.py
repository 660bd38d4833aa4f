"""Load a --model SPEC (onnx_export.model_source finds its files) as a model, tokenizer and adapter.
Loads are cached per process, so an in-process Beam worker and the driver share one copy of the weights.
"""

from __future__ import annotations

import functools
import pickle
import struct
from dataclasses import dataclass
from typing import Any

import torch
from raee_ops.onnx_export.adapters import adapter_for
from raee_ops.onnx_export.adapters.base import ArchitectureAdapter
from raee_ops.onnx_export.model_source import ModelSource, fingerprint, resolve
from safetensors import SafetensorError
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

from raee_ops.errors import RaeeConfigError, first_line

#: What loading a model's damaged or missing files raises (a file or a header cut short, weights of the wrong shape, a
#: directory without weights): the user's model, not a bug, so exit 2 naming it.
LOAD_ERRORS = (OSError, ValueError, RuntimeError, EOFError, struct.error, pickle.UnpicklingError, SafetensorError)


@dataclass(frozen=True)
class LoadedModel:
    adapter: ArchitectureAdapter
    source: str
    fingerprint: str

    @property
    def model(self) -> torch.nn.Module:
        return self.adapter.model

    @property
    def tokenizer(self) -> Any:
        return self.adapter.tokenizer


def model_config(spec: str) -> PretrainedConfig:
    """The model's config alone, before its weights load (minutes for a large model): what a request must fit is
    checked against it first. Cached with the load, so the load reads it no second time."""
    source = resolve(spec)
    return _config(source, fingerprint(source))


def load_model(spec: str) -> LoadedModel:
    source = resolve(spec)
    return _load(source, fingerprint(source))


def _kwargs(source: ModelSource) -> dict[str, Any]:
    return {"gguf_file": source.gguf_file} if source.gguf_file else {}


@functools.lru_cache(maxsize=2)
def _config(source: ModelSource, digest: str) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(source.directory, **_kwargs(source))
    except (*LOAD_ERRORS, KeyError) as exc:
        raise RaeeConfigError(f"cannot read a model config from {source.source}: {first_line(exc)}") from exc


@functools.lru_cache(maxsize=2)
def _load(source: ModelSource, digest: str) -> LoadedModel:
    adapter_class = adapter_for(_config(source, digest))
    try:
        model = adapter_class.auto_class.from_pretrained(
            source.directory, attn_implementation="eager", dtype=torch.float32, **_kwargs(source)
        )
    except LOAD_ERRORS as exc:
        raise RaeeConfigError(f"--model {source.source}: cannot load its weights: {first_line(exc)}") from exc
    return LoadedModel(adapter_class(model, _tokenizer(source)), source.source, digest)


def _tokenizer(source: ModelSource) -> Any:
    """The model's tokenizer; a BERT directory without tokenizer files loads as one of its special tokens alone,
    which would export a model that reads every word as unknown."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.directory, **_kwargs(source))
    except (OSError, ValueError) as exc:
        said = " ".join(str(exc).split())  # transformers' first line ends in "from one of:", the list after it
        raise RaeeConfigError(f"--model {source.source}: cannot load its tokenizer: {said}") from exc
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)):
        raise RaeeConfigError(
            f"--model {source.source}: its tokenizer knows only its special tokens (no tokenizer.json or "
            "vocabulary file?)"
        )
    return tokenizer
