"""Verbalizer words -> label token ids: each word, read after a space, must be exactly one token."""

from __future__ import annotations

from typing import Any

from raee_ops.errors import RaeeConfigError
from raee_ops.tasks import Task


def label_token_ids(tokenizer: Any, task: Task) -> list[int]:
    ids = []
    for word in task.verbalizer:
        encoded = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        if len(encoded) != 1:
            pieces = tokenizer.convert_ids_to_tokens(encoded)
            raise RaeeConfigError(
                f"task {task.name!r}: verbalizer word {word!r} is {len(encoded)} tokens {pieces} for this "
                "tokenizer; choose words that are one token after a space"
            )
        ids.append(int(encoded[0]))
    return ids
