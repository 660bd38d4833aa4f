"""The artifact manifest (`manifest.json`): what an export wrote, with checksums, so runtime can trust it.

The manifest is the only contract between the exporter (torch) and the runtime (ONNX Runtime only).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from raee_ops.schemas.tables import known_fields

from raee_ops import storage
from raee_ops.errors import ArtifactError, ArtifactsChanged, first_line
from raee_ops.storage import sha256_file, sha256_stream

FORMAT = "raee-segments/1"
MANIFEST_NAME = "manifest.json"
READOUTS = ("last", "mask", "cls")
#: The field holding the sha256 of the manifest's other fields: the file checksums vouch for the files, the seal
#: for the settings beside them (template, labels, layer order, sizes), which a hand edit changed without a word.
SEAL = "seal"

T = TypeVar("T")


@dataclass(frozen=True)
class FileRef:
    file: str
    sha256: str

    @classmethod
    def of(cls, directory: Path, name: str) -> FileRef:
        return cls(file=name, sha256=sha256_file(directory / name))


@dataclass(frozen=True)
class ModelInfo:
    source: str
    architecture: str
    fingerprint: str


@dataclass(frozen=True)
class TokenizerInfo:
    file: str
    sha256: str
    pad_id: int
    mask_token: str | None = None
    mask_token_id: int | None = None


@dataclass(frozen=True)
class Segments:
    embed: FileRef
    layers: list[FileRef]


@dataclass(frozen=True)
class TaskEntry:
    template: str
    label_names: list[str]
    verbalizer: list[str]
    label_token_ids: list[int]
    head: FileRef | None = None  # None: the backbone has no label-word head (Manifest.label_word_head)
    metric: str | None = None  # the task's metric (Task.metric_name); None: exported before tasks carried one

    @property
    def fingerprint(self) -> str:
        """Identity of what the task reads from the backbone (its prompt, labels and head): a table built with
        another prompt holds other exit information, though the backbone is the same."""
        parts = [self.template, *self.label_names, "", *self.verbalizer, "", *map(str, self.label_token_ids)]
        parts.append(self.head.sha256 if self.head else "")
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class EmbedderEntry:
    """A separate retrieval embedder (e.g. all-MiniLM-L6-v2) exported beside the backbone."""

    name: str
    model: FileRef
    tokenizer: FileRef
    dim: int
    max_length: int
    pooling: str = "mean"
    normalize: bool = True


@dataclass(frozen=True)
class Manifest:
    model: ModelInfo
    num_layers: int
    hidden_size: int
    readout: str
    padding_side: str
    max_length: int
    tokenizer: TokenizerInfo
    segments: Segments
    tasks: dict[str, TaskEntry]
    embedders: dict[str, EmbedderEntry] = field(default_factory=dict)
    #: False for a backbone without a label-word head (a bare encoder such as `minilm-l6`): no task has a head file,
    #: build-db stores no head answers, and strategies that read the head are refused; the probe heads serve it.
    label_word_head: bool = True
    verify: dict[str, Any] | None = None
    #: None for fp32 segments; else how the layers were quantized and how they compare with fp32.
    quantization: dict[str, Any] | None = None
    #: None for graphs stored as exported; else how they were optimized and, per stored graph file, its node
    #: count and fused (com.microsoft) op counts: {"method": ..., "graphs": {file: {"nodes", "fused"}}}.
    optimization: dict[str, Any] | None = None
    format: str = FORMAT

    def to_json(self) -> str:
        return sealed(asdict(self))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Manifest:
        seg = raw["segments"]
        return cls(
            format=raw["format"],
            model=ModelInfo(**known_fields(ModelInfo, raw["model"])),
            num_layers=int(raw["num_layers"]),
            hidden_size=int(raw["hidden_size"]),
            readout=raw["readout"],
            padding_side=raw["padding_side"],
            max_length=int(raw["max_length"]),
            tokenizer=TokenizerInfo(**known_fields(TokenizerInfo, raw["tokenizer"])),
            segments=Segments(embed=FileRef(**seg["embed"]), layers=[FileRef(**x) for x in seg["layers"]]),
            tasks={
                name: TaskEntry(
                    **{**known_fields(TaskEntry, t), "head": FileRef(**t["head"]) if t.get("head") else None}
                )
                for name, t in raw["tasks"].items()
            },
            embedders={
                name: EmbedderEntry(
                    **{
                        **known_fields(EmbedderEntry, e),
                        "model": FileRef(**e["model"]),
                        "tokenizer": FileRef(**e["tokenizer"]),
                    }
                )
                for name, e in raw.get("embedders", {}).items()
            },
            label_word_head=raw.get("label_word_head", True),
            verify=raw.get("verify"),
            quantization=raw.get("quantization"),
            optimization=raw.get("optimization"),
        )

    def file_refs(self) -> list[FileRef]:
        """Every file the manifest vouches for."""
        refs = [FileRef(self.tokenizer.file, self.tokenizer.sha256), self.segments.embed, *self.segments.layers]
        refs += [t.head for t in self.tasks.values() if t.head is not None]
        for e in self.embedders.values():
            refs += [e.model, e.tokenizer]
        return refs

    @property
    def fingerprint(self) -> str:
        """Identity of the backbone segments: a DB built from other artifacts must not be mixed with these."""
        parts = [self.model.fingerprint, self.tokenizer.sha256, self.segments.embed.sha256]
        parts += [layer.sha256 for layer in self.segments.layers]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]

    def identity(self, task: str, embedder: str) -> dict[str, str]:
        """What a run of `task` keyed by `embedder` reads of these artifacts, part by part: the backbone, the task's
        prompt and head, the longest prompt it accepts (the same files exported with another --max-length had every
        row of a run checked against the other export's limit) and the key's embedder where it is a file of its own
        (the backbone's own keys are in its fingerprint). Workers compare it with the launching process's: an export
        replaced mid-run changes one."""
        parts = {"backbone": self.fingerprint, f"task {task}": self.task(task).fingerprint}
        parts["max_length"] = str(self.max_length)
        key = self.key_fingerprint(embedder)
        if key is not None:
            parts[f"key embedder {embedder}"] = key
        return parts

    def key_fingerprint(self, embedder: str) -> str | None:
        """Identity of an exported key embedder (its graph, tokenizer and settings, max_length included): a table's
        keys made with one are not another's neighbours. None for the backbone's own keys (its fingerprint)."""
        if embedder not in self.embedders:
            return None
        entry = json.dumps(asdict(self.embedders[embedder]), sort_keys=True)
        return hashlib.sha256(entry.encode()).hexdigest()[:32]

    def task(self, name: str) -> TaskEntry:
        if name not in self.tasks:
            raise ArtifactError(f"task {name!r} is not in these artifacts (have: {', '.join(sorted(self.tasks))})")
        return self.tasks[name]


def sealed(raw: dict[str, Any]) -> str:
    """`raw` as manifest.json's text, sealed: what export-onnx (or a tool that adds to an export) writes."""
    return json.dumps({**raw, SEAL: _seal(raw)}, indent=2)


def _seal(raw: dict[str, Any]) -> str:
    """The sha256 of the fields besides the seal, whatever the file's layout: reformatting is not a change (nor is
    a whole number written `1` or `1.0`, as jq and JavaScript rewrite the floats an export records)."""
    body = _canonical({k: v for k, v in raw.items() if k != SEAL})
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _canonical(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def write_manifest(directory: str | Path, manifest: Manifest) -> Path:
    path = Path(directory) / MANIFEST_NAME
    path.write_text(manifest.to_json())
    return path


def parse_manifest(text: str, where: str, check_seal: bool = True) -> Manifest:
    """The manifest in `text`, refused with one line if it is not one an export wrote: unreadable, of another
    format, edited after export-onnx sealed it (an export from before seals has none; `check_seal` False: only
    which files it lists is wanted), or with settings no export writes."""
    try:
        raw = json.loads(text)
        if check_seal and isinstance(raw, dict) and SEAL in raw and raw[SEAL] != _seal(raw):
            raise ArtifactError(
                f"{where} was changed after export-onnx wrote it (its seal does not match its contents): export "
                "again with the settings you want rather than edit it"
            )
        manifest = Manifest.from_dict(raw)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # the last: a list where a mapping belongs
        raise ArtifactError(f"{where} is not a valid manifest: {exc}") from exc
    if manifest.format != FORMAT:
        raise ArtifactError(f"{where} has format {manifest.format!r}, expected {FORMAT!r}")
    problem = _invalid(manifest)
    if problem:
        raise ArtifactError(f"{where} is not a valid manifest: {problem}")
    return manifest


def _invalid(m: Manifest) -> str | None:
    """The first file reference of the wrong types, or setting the runtime reads that no export writes: the
    checksums vouch for the files, not for these settings, and a wrong one failed only in workers, or answered rows
    wrongly."""
    for ref in m.file_refs():
        if not (isinstance(ref.file, str) and isinstance(ref.sha256, str)):
            return f"file {ref.file!r} with sha256 {ref.sha256!r}"
        if ref.file in ("", ".", "..") or "/" in ref.file or "\\" in ref.file:  # read (and cached) outside the folder
            return f"file {ref.file!r}, expected a file name in the artifacts folder"
    if m.num_layers != len(m.segments.layers) or m.num_layers < 1:
        return f"num_layers {m.num_layers} for {len(m.segments.layers)} layer files"
    sizes = {"hidden_size": m.hidden_size, "max_length": m.max_length}
    sizes |= {f"embedder {n} {k}": getattr(e, k) for n, e in m.embedders.items() for k in ("dim", "max_length")}
    for name, value in sizes.items():
        if not _whole(value) or value < 1:
            return f"{name} {value!r}, expected a positive whole number"
    for name, task in m.tasks.items():  # a tool writing 3524 as 3524.0 gets past the seal, which reads them alike
        if not isinstance(task.label_token_ids, list) or not all(_whole(i) for i in task.label_token_ids):
            return f"task {name} label_token_ids {task.label_token_ids!r}, expected token ids"
    if not _whole(m.tokenizer.pad_id) or m.tokenizer.pad_id < 0:
        return f"tokenizer pad_id {m.tokenizer.pad_id!r}, expected a token id"
    if m.readout not in READOUTS:
        return f"readout {m.readout!r}, expected one of {', '.join(READOUTS)}"
    if m.readout == "mask" and not isinstance(m.tokenizer.mask_token_id, int):
        return "readout 'mask' without the tokenizer's mask_token_id"
    if m.padding_side != "right":  # the runtime pads on the right: a left-padded export's rows would read padding
        return f"padding_side {m.padding_side!r}, expected right"
    if not isinstance(m.label_word_head, bool):
        return f"label_word_head {m.label_word_head!r}, expected true or false"
    return None


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def load_manifest(directory: str | Path, verify_checksums: bool = True, check_seal: bool = True) -> Manifest:
    """Read `manifest.json` and (by default) check every file's sha256, refusing any mismatch.

    Artifacts on an object store are checked for presence only here; each worker checks every file's sha256
    when it fetches them (raee_ops.artifacts), so the driver never downloads the segments."""
    if not storage.is_local(str(directory)):
        return _load_remote(str(directory), verify_checksums, check_seal)
    directory = Path(storage.local_path(str(directory)))
    path = directory / MANIFEST_NAME
    if not directory.exists():
        raise ArtifactError(f"the artifacts folder {directory} does not exist (export-onnx writes it)")
    if not path.is_file():
        raise ArtifactError(f"no {MANIFEST_NAME} in {directory}: not an exported artifacts directory")
    manifest = parse_manifest(path.read_text(), str(path), check_seal)
    if verify_checksums:
        with republished_is_retry(directory, manifest, "read"):
            for ref in manifest.file_refs():
                check_file(directory / ref.file, ref.sha256)
    return manifest


@contextlib.contextmanager
def republished_is_retry(directory: Path, read: Manifest, doing: str) -> Iterator[None]:
    """A file of a local artifacts folder that fails its check where the folder's manifest is no longer `read` (gone,
    half-written or another export's) belongs to an export published there meanwhile (a link switched, a
    republish), which a rerun reads: ArtifactsChanged (exit 75), not damage."""
    try:
        yield
    except ArtifactError as exc:
        path = directory / MANIFEST_NAME
        try:
            replaced = parse_manifest(path.read_text(), str(path), check_seal=False) != read
        except (OSError, ArtifactError):
            replaced = True
        if replaced:
            raise ArtifactsChanged(
                f"the artifacts at {directory} were replaced while this run {doing} them ({first_line(exc)}): "
                "run again once the new export is in place"
            ) from exc
        raise


def artifacts_holding(uri: str) -> str | None:
    """The nearest artifacts folder (one with a manifest.json) at or above `uri`, if any."""
    return next((d for d in storage.folders_up(uri) if storage.is_file(storage.join(d, MANIFEST_NAME))), None)


def check_outside_artifacts(uri: str, what: str, start: str | None = None) -> None:
    """Refuse, before any work, a location to write in an artifacts folder found at or above `start` (default
    `uri`): a re-export replaces that folder whole, and whatever was written in it with it."""
    folder = artifacts_holding(start or uri)
    if folder is not None:
        storage.check_outside(uri, what, folder, kind="the artifacts folder")


def _load_remote(uri: str, check_presence: bool, check_seal: bool) -> Manifest:
    storage.check_scheme(uri, "--artifacts")
    path = storage.join(uri, MANIFEST_NAME)
    if not storage.exists(path):
        raise _no_manifest(uri)
    manifest = parse_manifest(storage.read_bytes(path).decode(), path, check_seal)
    if check_presence:
        present = set(storage.children(uri))
        missing = [ref.file for ref in manifest.file_refs() if ref.file not in present]
        if missing:
            raise ArtifactError(f"artifact file missing: {storage.join(uri, missing[0])}")
    return manifest


def _no_manifest(uri: str) -> ArtifactError | ArtifactsChanged:
    """An object-store artifacts folder without a manifest. export-onnx publishing there removes the old one first
    and writes the new one last, its `_PUBLISHING` mark there meanwhile: while its claim lives, a rerun will find the
    new export (exit 75, not 2: a scheduler's retry mends it); a mark without a live claim is an export stopped
    midway, which only a rerun of export-onnx mends."""
    from raee_ops.commit import PUBLISHING, export_publishing, live_claim

    if not export_publishing(uri):
        return ArtifactError(f"no {MANIFEST_NAME} in {uri}: not an exported artifacts directory")
    claim = live_claim(uri)
    if claim is not None:
        return ArtifactsChanged(
            f"an export-onnx is publishing the artifacts at {uri} now (its claim {claim}; no {MANIFEST_NAME} yet): "
            "run again once it is in place"
        )
    return ArtifactError(
        f"no {MANIFEST_NAME} in {uri}: an export-onnx publishing there was stopped midway (its {PUBLISHING} mark "
        "stays); run export-onnx again"
    )


#: Files this process has hashed and found as a manifest says, by (device, inode, size, mtime, sha256): the driver's
#: check and an in-process worker's load read a gigabyte of segments once, not twice; a changed or replaced file (a
#: new inode, or new contents and so a new mtime) is hashed again.
_VERIFIED: set[tuple[int, int, int, int, str]] = set()


def _verified_key(stat: os.stat_result, expected: str) -> tuple[int, int, int, int, str]:
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, expected)


def check_file(target: Path, expected: str) -> None:
    """Refuse a local artifact file that is missing or whose sha256 differs (hashed once per process)."""
    with _opened(target) as handle:
        _check_handle(handle, target, expected)


@contextlib.contextmanager
def _opened(target: Path) -> Iterator[BinaryIO]:
    try:
        handle = open(target, "rb")
    except (FileNotFoundError, IsADirectoryError):
        raise ArtifactError(f"artifact file missing: {target}") from None
    with handle:
        yield handle


def _check_handle(handle: BinaryIO, target: Path, expected: str) -> tuple[int, int, int, int, str]:
    """The open file's sha256 against `expected`, hashed through that handle (the file checked is the file keyed);
    returns its key."""
    key = _verified_key(os.fstat(handle.fileno()), expected)
    if key not in _VERIFIED:
        actual = sha256_stream(handle)
        if actual != expected:
            raise ArtifactError(
                f"checksum mismatch for {target}: manifest says {expected[:12]}…, file is {actual[:12]}…"
            )
        _VERIFIED.add(key)
    return key


#: Where this process reopens a file it holds open (Linux): what a loader opens there is the file checked,
#: whatever its path names by then.
_OPEN_FILES = Path("/proc/self/fd")


def load_checked(target: Path, expected: str | None, load: Callable[[str], T]) -> T:
    """`load(path)` of a local artifact file the manifest vouches for (`expected`; None: unchecked), refused unless
    the file it read is the one checked. Why: a session or tokenizer opened by path after a check reads whatever is
    there by then, and an export republished in between (or a link switched to another export) made a run answer
    with one export's layers and another's head, exit 0. The loader opens the checked file through this process's
    handle on it (Linux), or its path, which must then name the same device, inode, size and mtime after the load
    as at the check (an export replaces files, never writes into them)."""
    if expected is None:
        return load(str(target))
    with _opened(target) as handle:
        checked = _check_handle(handle, target, expected)
        if _OPEN_FILES.is_dir():
            return load(str(_OPEN_FILES / str(handle.fileno())))
    loaded = load(str(target))
    try:
        unchanged = _verified_key(os.stat(target), expected) == checked
    except FileNotFoundError:
        unchanged = False
    if not unchanged:
        raise ArtifactsChanged(
            f"{target} changed while it was loaded: an export replaced it? run again once it is in place"
        )
    return loaded
