"""Verbalizer words -> label token ids: each word, read after a space, must be exactly one token, a known one, and
no other label's: the head scores labels by their tokens' logits, so two labels on one token always tie."""

from __future__ import annotations

from typing import Any

from raee_ops.errors import RaeeConfigError
from raee_ops.tasks import Task


def label_token_ids(tokenizer: Any, task: Task) -> list[int]:
    ids = [_word_id(tokenizer, task, word) for word in task.verbalizer]
    first: dict[int, str] = {}
    for word, token in zip(task.verbalizer, ids, strict=True):
        if token in first:
            raise RaeeConfigError(
                f"task {task.name!r}: verbalizer words {first[token]!r} and {word!r} are the same token "
                f"{tokenizer.convert_ids_to_tokens(token)!r} for this tokenizer; choose words that differ"
            )
        first[token] = word
    return ids


def _word_id(tokenizer: Any, task: Task, word: str) -> int:
    """The one token `word` is after a space; a word the vocabulary lacks becomes the unknown token, which says
    nothing about the label."""
    encoded = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    if len(encoded) != 1:
        pieces = tokenizer.convert_ids_to_tokens(encoded)
        raise RaeeConfigError(
            f"task {task.name!r}: verbalizer word {word!r} is {len(encoded)} tokens {pieces} for this "
            "tokenizer; choose words that are one token after a space"
        )
    if tokenizer.unk_token_id is not None and encoded[0] == tokenizer.unk_token_id:
        raise RaeeConfigError(
            f"task {task.name!r}: verbalizer word {word!r} is the unknown token {tokenizer.unk_token!r} for this "
            "tokenizer; choose words in its vocabulary"
        )
    return int(encoded[0])
