"""Save the HF tokenizer as a plain tokenizers `tokenizer.json`: the runtime has no transformers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from raee_ops.errors import RaeeConfigError


def save_tokenizer(tokenizer: Any, path: Path) -> None:
    """The fast backend with its post-processor (e.g. Gemma's <bos>), minus padding and truncation, which the
    runtime does itself; the verifier checks it encodes exactly as the HF tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        name = type(tokenizer).__name__
        raise RaeeConfigError(f"{name} has no tokenizers backend; cannot write tokenizer.json")
    saved = Tokenizer.from_str(backend.to_str())
    saved.no_padding()
    saved.no_truncation()
    saved.save(str(path))
