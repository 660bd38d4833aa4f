"""Run exported backbone segments with ONNX Runtime: tokenize, embed, layer by layer, heads, retrieval keys.

Only onnxruntime, tokenizers and numpy: this module is what Beam workers load. Padding is on the right, so a
batch trimmed to its longest row is a column slice, and a padded row computes the same as the row alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple, TypeVar

import numpy as np
from tokenizers import Tokenizer

from raee_ops import logs
from raee_ops.errors import ArtifactError
from raee_ops.extras import onnxruntime
from raee_ops.key_names import BACKBONE, INT8_SUFFIX, parse_embedder
from raee_ops.layer_key import unit_rows
from raee_ops.schemas.manifest import FileRef, Manifest, load_checked, load_manifest, republished_is_retry
from raee_ops.schemas.tables import POOLINGS
from raee_ops.tasks import readout_suffix

ort = onnxruntime()
set_global_thread_pool_sizes = ort.capi._pybind_state.set_global_thread_pool_sizes
OrtFail = ort.capi.onnxruntime_pybind11_state.Fail
log = logging.getLogger(__name__)
T = TypeVar("T")

#: The small graphs run besides the segments: a device chain's between layers, a small table's exact search
#: (package data, written by raee_ops.onnx_export.stored_graphs).
STORED_GRAPHS = Path(__file__).resolve().parent / "graphs"
#: Rows per ONNX call; rows are sorted by length first so each sub-batch carries little padding.
SUB_BATCH = 32
#: The same on the CUDA provider, where a layer call of 32 rows waits on kernel launches more than on arithmetic: on
#: an H200, of 32-256 rows 128 ran the full chain fastest on both presets (bench/gpu.py's sweep); the default's
#: fastest size moves from run to run (256 on SmolLM2, 128 on Gemma 3 in the committed one).
#: Beam hands the handler up to 128 rows per call (pipelines/inference.py).
CUDA_SUB_BATCH = 128
#: On CUDA a layer call costs about the same for a full batch as for a thinned one, and compacting one gathers its
#: states on the device and sends its masks and rotary tables up again: a batch is compacted only once fewer than
#: this share of its rows still run. On an H200 (bench/gpu.py, one run) level with compacting at every exit on
#: SmolLM2 and faster on Gemma 3, and faster than never compacting on both.
CUDA_COMPACT_BELOW = 0.5


#: An execution provider as ONNX Runtime takes it: a name, or (name, provider options).
Provider = str | tuple[str, dict[str, str]]
#: CUDA with full fp32 matrix products. Why: the CUDA provider multiplies in TF32 by default, which on an H200
#: moved Gemma 3's last-layer states by up to 0.76 of their largest value against the CPU chain and changed 10% of
#: the head's answers; without TF32 they agree within 2e-3 (bench/gpu.py), and the probes were fitted on fp32 states.
CUDA: Provider = ("CUDAExecutionProvider", {"use_tf32": "0"})


def choose_providers(requested: str | None = None) -> list[Provider]:
    """CUDA when asked for and available, else CPU. The request is a pipeline option resolved on the launching
    machine; a worker never reads its own environment for it."""
    wanted = (requested or "cpu").lower()
    if wanted == "cuda":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            return [CUDA, "CPUExecutionProvider"]
        log.warning("CUDA requested but onnxruntime has no CUDAExecutionProvider; using CPU")
    return ["CPUExecutionProvider"]


def default_threads(processes: int = 1) -> int:
    """The cores this process may run on, shared by `processes` like it on one machine (at most 8): one worker per
    machine is the common case. Elsewhere with N worker processes per machine pass --raee_intra_op_threads cores / N.
    `processes` 0: one per core."""
    cores = available_cores()
    return max(1, min(8, cores // (processes or cores)))


def available_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


_pool_threads: int | None = None


def process_thread_pool(threads: int) -> int:
    """Create ONNX Runtime's one intra-op thread pool that every session of this process shares, and return its
    size. Why: a pool per session gave each of ~32 segment sessions 3 pool threads of its own (96 OS threads in a
    worker at 4 threads a session), though the chain only ever runs one session at a time. The first size wins: ORT
    cannot replace the pool. More threads than the process's cores are cut to its cores: the count is set where the
    command starts, which cannot know a worker's cores, and ORT's spinning threads past them stalled a run (1000
    threads on 2 cores)."""
    global _pool_threads
    if _pool_threads is None:
        cores = available_cores()
        if threads > cores:
            log.warning(
                "%d ONNX Runtime threads asked for, more than the process's cores (%d): the pool gets %d",
                threads,
                cores,
                cores,
            )
            threads = cores
        try:
            set_global_thread_pool_sizes(threads, 1)
            _pool_threads = threads
        except OrtFail as err:  # another library created the pools first: share them, whatever their size
            log.debug("ONNX Runtime's global thread pool exists already (%s)", err)
            _pool_threads = 0
    elif threads != _pool_threads and _pool_threads:
        log.debug("ONNX Runtime's thread pool keeps %d threads (asked for %d)", _pool_threads, threads)
    return _pool_threads


_shared_arena = False


def shared_cpu_arena() -> None:
    """Register the one CPU memory arena that every session of this process allocates from. Why: a session keeps an
    arena of its own at the peak of the largest batch it ever ran, and the chain holds ~30 sessions but runs one at a
    time, so a worker held about one such peak per layer (build-db on long RTE pairs was killed for memory on a
    24 GB machine); sharing keeps about one."""
    global _shared_arena
    if not _shared_arena:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        try:
            ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))  # ORT's defaults
        except OrtFail as err:  # another library registered one first: share that
            log.debug("ONNX Runtime's shared CPU allocator exists already (%s)", err)
        _shared_arena = True


def open_session(
    path: str | Path, threads: int | None = None, providers: list[Provider] | None = None, **settings: object
) -> ort.InferenceSession:
    """Every ONNX Runtime session this project opens, on the process's shared pool: once that pool exists, ORT
    refuses any session that asks for threads of its own. `settings` are SessionOptions attributes."""
    options = session_options(threads or default_threads())
    for name, value in settings.items():
        setattr(options, name, value)
    return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])


def session_options(threads: int) -> ort.SessionOptions:
    """Sessions on the process's shared thread pool (`process_thread_pool`) and CPU memory (`shared_cpu_arena`),
    logging as the command says (`ort_log_severity`)."""
    process_thread_pool(threads)
    shared_cpu_arena()
    ort.set_default_logger_severity(ort_log_severity())
    options = ort.SessionOptions()
    options.log_severity_level = ort_log_severity()
    options.use_per_session_threads = False  # a per-session thread count would only draw ORT's warning
    options.add_session_config_entry("session.use_env_allocators", "1")
    return options


def ort_log_severity() -> int:
    """ONNX Runtime's own log lines (printed by its C++ core, whatever Python's stderr is) only from -v on: a row
    that fails in a graph printed ORT's red error line above an exit-0 summary, its reason already in the errors
    output. From -v on, its warnings (its info and verbose levels wrote ~10,000 lines for 90 rows). 4 is fatal."""
    return 2 if logs.verbose() else 4


def prompt_suffix(manifest: Manifest) -> str:
    """What every prompt of this export ends with (tasks.readout_suffix)."""
    return readout_suffix(manifest.readout, manifest.tokenizer.mask_token)


def pad_right(encoded: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ids B×T and lengths."""
    lengths = np.array([len(ids) for ids in encoded], dtype=np.int64)
    ids = np.full((len(encoded), int(lengths.max(initial=1))), pad_id, np.int64)
    for row, seq in enumerate(encoded):
        ids[row, : len(seq)] = seq
    return ids, lengths


def attention_mask(lengths: np.ndarray, width: int) -> np.ndarray:
    return (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)


def readout_positions(ids: np.ndarray, lengths: np.ndarray, readout: str, mask_token_id: int | None) -> np.ndarray:
    """Where each row's head reads: its last real token, the CLS token, or the last mask token (the one the
    prompt suffix appended)."""
    if readout == "last":
        return lengths - 1
    if readout == "cls":
        return np.zeros_like(lengths)
    hits = ids == mask_token_id
    if not hits.any(axis=1).all():
        raise ValueError("a prompt has no mask token to read out")
    return ids.shape[1] - 1 - np.argmax(hits[:, ::-1], axis=1)


READOUT = POOLINGS.index("readout")


def mean_states(pooled: np.ndarray) -> np.ndarray:
    """The mean pooling's states of pooled arrays, ...×POOLINGS×H -> ...×H: what a layer-N key is read from (build-db
    from every layer's pooled states, classify from a prefix's)."""
    return pooled[..., POOLINGS.index("mean"), :]


def masked_mean(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """B×T×H -> B×H in the states' dtype: the mean over each row's real tokens (mask 1)."""
    m = mask[..., None].astype(hidden.dtype)
    return (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1.0)


def pool_states(hidden: np.ndarray, mask: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """B×POOLINGS×H in the states' float32: masked mean over tokens and the readout token of B×T×H hidden states
    (what a device chain's `pool` graph computes; the head reads the readout token's row)."""
    return np.stack([masked_mean(hidden, mask), hidden[np.arange(len(hidden)), pos]], axis=1)


def pool(hidden: np.ndarray, mask: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """pool_states in float16: what build-db stages and stores, so the probes see at classify time exactly what
    they were fitted and scored on."""
    return pool_states(hidden, mask, pos).astype(np.float16)


#: A batch's per-batch layer inputs by graph name: the attention mask and what the embed segment computes once
#: for every layer (decoders: additive masks, rotary cos/sin).
LayerInputs = dict[str, np.ndarray]


def embed_batch(session: ort.InferenceSession, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, LayerInputs]:
    """Hidden states B×T×H and the batch's context from the embed segment (its first output is the hidden states)."""
    hidden, *extra = session.run(None, {"input_ids": ids, "attention_mask": mask})
    names = [output.name for output in session.get_outputs()[1:]]
    return hidden, {"attention_mask": mask, **dict(zip(names, extra, strict=True))}


def layer_feed(session: ort.InferenceSession, hidden: np.ndarray, context: LayerInputs) -> dict[str, np.ndarray]:
    """What a layer session reads: the hidden states and its named inputs from the batch context."""
    feed = {name: context[name] for name in (i.name for i in session.get_inputs()) if name != "hidden_states"}
    return {"hidden_states": np.ascontiguousarray(hidden), **feed}


def sequence_axes(session: ort.InferenceSession) -> dict[str, tuple[int, ...]]:
    """Per embed output, its axes named "sequence" (trimmed to the longest remaining row as rows leave)."""
    outputs = {o.name: o.shape for o in session.get_outputs()}
    return {name: tuple(i for i, d in enumerate(shape) if d == "sequence") for name, shape in outputs.items()}


def take_rows(context: LayerInputs, axes: dict[str, tuple[int, ...]], keep: np.ndarray, width: int) -> LayerInputs:
    """The context of rows `keep`, every sequence axis cut to `width` (right padding: a column slice)."""
    trimmed = {}
    for name, array in context.items():
        index: list[slice | np.ndarray] = [keep] + [slice(None)] * (array.ndim - 1)
        for axis in axes.get(name, (1,)):  # the attention mask is B×T
            index[axis] = slice(0, width)
        trimmed[name] = np.ascontiguousarray(array[tuple(index)])
    return trimmed


class Readout(NamedTuple):
    """What run_to_exit_pooled reads out per row: head logits B×C, pooled states B×POOLINGS×H at the layer the
    row left at, and that layer (1-based; 0 for rows not run)."""

    logits: np.ndarray
    pooled: np.ndarray
    exits: np.ndarray


StopFn = Callable[[int, np.ndarray], np.ndarray]


class Batch(NamedTuple):
    """One sub-batch between layers: its rows (indices into the caller's prompts), lengths, readout positions,
    hidden states (an OrtValue while they stay on the device), context and the context's device copy (IO
    binding; else empty)."""

    rows: np.ndarray
    lengths: np.ndarray
    pos: np.ndarray
    hidden: np.ndarray | ort.OrtValue
    context: LayerInputs
    bound: dict[str, ort.OrtValue]


class Prefix(NamedTuple):
    """Rows run through the backbone's first `depth` layers for a layer key (SegmentRuntime.prefix): their
    sub-batches there, and their pooled states B×POOLINGS×H at `depth`."""

    depth: int
    batches: list[Batch]
    pooled: np.ndarray


class PromptTooLong(ValueError):
    """A prompt exceeds max_length tokens; callers reject such rows rather than truncate them."""


class DeviceChain:
    """Layer calls through ONNX Runtime IO binding: a batch's context is uploaded once, and hidden states stay an
    OrtValue on the provider's device from layer to layer. Where rows leave or a stop rule reads them, only their
    pooled states B×POOLINGS×H come to the host (the `pool` graph), and the active set is compacted on the device
    (the `compact` graph). Why: without it every layer of a CUDA chain copies its states device -> host -> device,
    and a read-out layer did the same with the whole B×T×H. The CPU provider runs the same code (how the tests check
    it)."""

    def __init__(self, device: str, open_graph: Callable[[Path], ort.InferenceSession]) -> None:
        self.device = device
        self._pool = open_graph(STORED_GRAPHS / "pool.onnx")
        self._compact = open_graph(STORED_GRAPHS / "compact.onnx")

    def put(self, array: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, 0)

    def upload(self, context: LayerInputs) -> dict[str, ort.OrtValue]:
        return {name: self.put(array) for name, array in context.items()}

    def _run(self, session: ort.InferenceSession, feed: dict[str, np.ndarray | ort.OrtValue], to: str) -> ort.OrtValue:
        binding = session.io_binding()
        for name in (i.name for i in session.get_inputs()):
            value = feed[name]
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:  # host arrays (indices, a width, the embed segment's states): ORT copies them where a kernel wants
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        binding.bind_output(session.get_outputs()[0].name, to)
        session.run_with_iobinding(binding)
        return binding.get_outputs()[0]

    def run(self, session: ort.InferenceSession, hidden: np.ndarray | ort.OrtValue, context: dict) -> ort.OrtValue:
        """A layer: its states stay on the device."""
        return self._run(session, {**context, "hidden_states": hidden}, self.device)

    def pool(self, hidden: ort.OrtValue, mask: ort.OrtValue, pos: np.ndarray) -> np.ndarray:
        """pool_states on the device; only the B×POOLINGS×H result comes to the host."""
        feed = {"hidden_states": hidden, "attention_mask": mask, "positions": pos.astype(np.int64)}
        return self._run(self._pool, feed, "cpu").numpy()

    def compact(self, hidden: ort.OrtValue, keep: np.ndarray, width: int) -> ort.OrtValue:
        """hidden[keep, :width], staying on the device."""
        feed = {"hidden_states": hidden, "keep": np.flatnonzero(keep), "width": np.array([width], np.int64)}
        return self._run(self._compact, feed, self.device)


class SegmentRuntime:
    """A backbone's segments, heads and embedders as ORT sessions (heads and embedders load lazily). Each file is
    loaded through `load_checked`: what runs is what the manifest vouches for, whatever happens to the folder
    meanwhile. A link to the folder is resolved once, first: a head loaded late comes from the export whose manifest
    was read, though a blue/green link names another by then."""

    def __init__(
        self,
        artifacts: str | Path,
        providers: str | None = None,
        intra_op_threads: int | None = None,
        verify_checksums: bool = True,
        io_binding: bool | None = None,
        sub_batch: int | None = None,
        compact_below: float | None = None,
    ) -> None:
        """`io_binding`: chain the layers through DeviceChain (default: on the CUDA provider only; on the CPU the
        host already holds the states). `sub_batch`: rows per ONNX call (default SUB_BATCH; on CUDA CUDA_SUB_BATCH).
        `compact_below`: a batch whose rows still running fall under this share is compacted to them; until then
        the rows that left ride along (default: 1.0, at every exit, on the host; CUDA_COMPACT_BELOW on CUDA)."""
        self.dir = Path(os.path.realpath(artifacts))
        self.manifest: Manifest = load_manifest(self.dir, verify_checksums=verify_checksums)
        self._verify = verify_checksums
        self._threads = intra_op_threads or default_threads()
        self._providers = choose_providers(providers)
        on_cuda = self._providers[0] == CUDA
        bind = on_cuda if io_binding is None else io_binding
        self._device = DeviceChain("cuda" if on_cuda else "cpu", self._open) if bind else None
        self.sub_batch = sub_batch or (CUDA_SUB_BATCH if on_cuda else SUB_BATCH)
        self.compact_below = (CUDA_COMPACT_BELOW if on_cuda else 1.0) if compact_below is None else compact_below
        m = self.manifest
        if on_cuda and m.quantization:
            log.warning(
                "int8 artifacts on CUDA: ONNX Runtime's CUDA provider has no kernel for their int8 MatMuls "
                "(MatMulIntegerToFloat), so those run on the CPU; export without --quantize for GPUs"
            )
        self.tokenizer = self._tokenizer(FileRef(m.tokenizer.file, m.tokenizer.sha256))
        self._encoded: dict[str, list[int]] = {}  # ids known without tokenizing (see reusing)
        self.suffix = prompt_suffix(m)
        self.embed_session = self._session(m.segments.embed)
        self.layer_sessions = [self._session(ref) for ref in m.segments.layers]
        self._sequence_axes = sequence_axes(self.embed_session)
        self._heads: dict[str, ort.InferenceSession] = {}
        self._embedders: dict[str, tuple[Tokenizer, ort.InferenceSession]] = {}
        self._check_graphs()

    def _check_graphs(self) -> None:
        """The manifest's sizes against the graphs and tokenizer they describe (no checksum covers them): a wrong
        hidden_size failed every row that ran a layer, a pad_id past the vocabulary every padded batch (each row then
        ran alone, slowly)."""
        m = self.manifest
        graphs = [(m.segments.embed.file, self.embed_session.get_outputs()[0].shape)]
        graphs += [
            (ref.file, s.get_outputs()[0].shape) for ref, s in zip(m.segments.layers, self.layer_sessions, strict=True)
        ]
        for file, shape in graphs:
            if isinstance(shape[-1], int) and shape[-1] != m.hidden_size:
                raise ArtifactError(
                    f"{self.dir}: {file} gives {shape[-1]}-wide hidden states, manifest hidden_size {m.hidden_size}"
                )
        vocabulary = self.tokenizer.get_vocab_size(with_added_tokens=True)
        for name, token in (("pad_id", m.tokenizer.pad_id), ("mask_token_id", m.tokenizer.mask_token_id)):
            if token is not None and token >= vocabulary:
                raise ArtifactError(
                    f"{self.dir}: manifest tokenizer {name} {token} is past the tokenizer's {vocabulary} tokens"
                )

    @property
    def num_layers(self) -> int:
        return self.manifest.num_layers

    def _load(self, ref: FileRef, load: Callable[[str], T]) -> T:
        with republished_is_retry(self.dir, self.manifest, "loaded"):
            return load_checked(self.dir / ref.file, ref.sha256 if self._verify else None, load)

    def _session(self, ref: FileRef) -> ort.InferenceSession:
        return self._load(ref, self._open)

    def _open(self, path: str | Path) -> ort.InferenceSession:
        return open_session(path, self._threads, self._providers)

    def _tokenizer(self, ref: FileRef) -> Tokenizer:
        tokenizer = self._load(ref, Tokenizer.from_file)
        tokenizer.no_padding()
        tokenizer.no_truncation()
        return tokenizer

    # -- tokens -------------------------------------------------------------------------------------------

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        """Token ids of each prompt; inside `reusing`, the ids it was given are not tokenized again."""
        known = self._encoded
        missing = list(dict.fromkeys(p for p in prompts if p not in known))
        if missing:
            known = known | dict(zip(missing, self._tokenize(missing), strict=True))
        return [known[p] for p in prompts]

    def encoded_by_prompt(self, prompts: Sequence[str]) -> dict[str, list[int]]:
        """Each prompt's token ids, keyed by the prompt: what `reusing` takes."""
        return dict(zip(prompts, self.encode(prompts), strict=True))

    @contextlib.contextmanager
    def reusing(self, known: dict[str, list[int]]) -> Iterator[None]:
        """Within the block the prompts in `known` are not tokenized again: a batch's work tokenizes it for its
        length check, then runs the same prompts through the layers, where a second tokenizing is pure overhead
        (4-5 ms per 256 rows on the H200 machine's CPUs, about 4% of the full model's time there: bench/gpu.py)."""
        self._encoded = known
        try:
            yield
        finally:
            self._encoded = {}

    def _tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=True)]

    def pad(self, encoded: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        return pad_right(encoded, self.manifest.tokenizer.pad_id)

    def _encode_checked(self, prompts: Sequence[str]) -> list[list[int]]:
        """Token ids; refuses prompts over max_length (truncating would cut the readout)."""
        encoded = self.encode(prompts)
        too_long = [i for i, ids in enumerate(encoded) if len(ids) > self.manifest.max_length]
        if too_long:
            raise PromptTooLong(f"prompts {too_long} exceed max_length {self.manifest.max_length} tokens")
        return encoded

    def readout_positions(self, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        return readout_positions(ids, lengths, self.manifest.readout, self.manifest.tokenizer.mask_token_id)

    # -- segments -----------------------------------------------------------------------------------------

    mask_of = staticmethod(attention_mask)

    def embed(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self.embed_batch(ids, mask)[0]

    def embed_batch(self, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, LayerInputs]:
        """Hidden states and the per-batch context every layer of this batch reads."""
        return embed_batch(self.embed_session, ids, mask)

    def run_layer(self, index: int, hidden: np.ndarray, context: LayerInputs) -> np.ndarray:
        """Layer `index` (0-based, as the segment files are numbered)."""
        session = self.layer_sessions[index]
        return session.run(None, layer_feed(session, hidden, context))[0]

    def take_rows(self, context: LayerInputs, keep: np.ndarray, width: int) -> LayerInputs:
        return take_rows(context, self._sequence_axes, keep, width)

    def head(self, task: str, hidden: np.ndarray) -> np.ndarray:
        """Label logits B×C from the readout hidden states B×H; zeros on a backbone without a label-word head, which
        nothing reads (build-db stores its head answers as absent, and strategies reading the head are refused)."""
        entry = self.manifest.task(task)
        if entry.head is None:
            return np.zeros((len(hidden), len(entry.label_names)), np.float32)
        if task not in self._heads:
            self._heads[task] = self._session(self.manifest.task(task).head)
        return self._heads[task].run(None, {"hidden_states": np.ascontiguousarray(hidden)})[0]

    # -- batch drivers ------------------------------------------------------------------------------------

    def _sub_batches(self, prompts: Sequence[str]) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(row indices, ids, lengths) for length-sorted sub-batches, each padded to its own longest row."""
        yield from self._batched(self._encode_checked(prompts))

    def _batched(self, encoded: Sequence[Sequence[int]]) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Encoded rows in length-sorted sub-batches of `sub_batch` rows: little padding to run."""
        order = np.argsort([len(ids) for ids in encoded], kind="stable")
        for start in range(0, len(order), self.sub_batch):
            rows = order[start : start + self.sub_batch]
            ids, lengths = self.pad([encoded[i] for i in rows])
            yield rows, ids, lengths

    def all_layers_pooled(self, task: str, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Head logits after every layer, L×B×C, and every layer's pooled hidden states, L×B×POOLINGS×H in
        float16 (build-db's exit information and its probes' features, from one pass)."""
        width = len(self.manifest.task(task).label_names)
        out = np.zeros((self.num_layers, len(prompts), width), np.float32)
        pooled = np.zeros((self.num_layers, len(prompts), len(POOLINGS), self.manifest.hidden_size), np.float16)
        for rows, ids, lengths in self._sub_batches(prompts):
            mask = self.mask_of(lengths, ids.shape[1])
            pos = self.readout_positions(ids, lengths)
            hidden, context = self.embed_batch(ids, mask)
            picked = np.arange(len(rows))
            for layer in range(self.num_layers):
                hidden = self.run_layer(layer, hidden, context)
                out[layer, rows] = self.head(task, hidden[picked, pos])
                pooled[layer, rows] = pool(hidden, mask, pos)
        return out, pooled

    def prefix(self, prompts: Sequence[str], depth: int) -> Prefix:
        """Every row through the first `depth` layers (a layer key's; rows that go further continue from here in
        run_to_exit_pooled), with its pooled states there."""
        pooled = np.zeros((len(prompts), len(POOLINGS), self.manifest.hidden_size), np.float16)
        batches = []
        for rows, ids, lengths in self._sub_batches(prompts):
            batch = self._embedded(rows, ids, lengths)
            hidden = batch.hidden
            for layer in range(depth):
                hidden = self._layer(layer, hidden, batch.context, batch.bound)
            batch = batch._replace(hidden=hidden)
            pooled[rows] = self._pooled(batch)
            batches.append(batch)
        return Prefix(depth, batches, pooled)

    def run_to_exit_pooled(
        self,
        task: str,
        prompts: Sequence[str],
        exit_layers: np.ndarray,
        stop: StopFn | None = None,
        start: Prefix | None = None,
    ) -> Readout:
        """Each row read out at its own 1-based exit layer, never running a row past it; rows with exit 0 are
        not run at all (logits and pooled states 0). `stop(layer, pooled A×POOLINGS×H)` may let rows leave
        earlier (a probe confident enough); the layers rows actually left at come back in `exits`. With `start`
        (the prefix of these prompts) rows continue from its depth, and a row with an exit before it is read
        out there: it has run that far already.

        Active-set compaction: after each layer the rows leaving there are read out and dropped, and the columns
        are trimmed to the longest remaining row, so work is proportional to the sum of exit layers (on CUDA, once
        fewer than `compact_below` of a batch's rows still run: until then a thinned call costs what a full one does).
        """
        exit_layers = np.asarray(exit_layers, dtype=np.int64)
        if len(exit_layers) and not ((exit_layers >= 0) & (exit_layers <= self.num_layers)).all():
            raise ValueError(f"exit layers must be in 0..{self.num_layers}")
        readout = Readout(
            np.zeros((len(prompts), len(self.manifest.task(task).label_names)), np.float32),
            np.zeros((len(prompts), len(POOLINGS), self.manifest.hidden_size), np.float16),
            np.zeros(len(prompts), np.int32),
        )
        if start is None:
            running = np.flatnonzero(exit_layers > 0)  # exit 0: answered without the backbone
            sub_batches = self._sub_batches([prompts[i] for i in running])
            batches: Iterable[Batch] = (self._embedded(running[r], ids, n) for r, ids, n in sub_batches)
        else:
            batches = start.batches
        depth = 0 if start is None else start.depth
        for batch in batches:
            self._continue(task, batch, exit_layers, depth, stop, readout)
        return readout

    def _embedded(self, rows: np.ndarray, ids: np.ndarray, lengths: np.ndarray) -> Batch:
        width = int(lengths.max())
        hidden, context = self.embed_batch(ids[:, :width], self.mask_of(lengths, width))
        bound = self._device.upload(context) if self._device else {}
        return Batch(rows, lengths, self.readout_positions(ids, lengths), hidden, context, bound)

    def _layer(
        self, index: int, hidden: np.ndarray | ort.OrtValue, context: LayerInputs, bound: dict[str, ort.OrtValue]
    ) -> np.ndarray | ort.OrtValue:
        """Layer `index` (0-based) on the device where there is one (the states stay there), else on the host."""
        if self._device:
            return self._device.run(self.layer_sessions[index], hidden, bound)
        return self.run_layer(index, hidden, context)

    def _pooled(self, batch: Batch) -> np.ndarray:
        """The batch's pooled states B×POOLINGS×H in float32, computed where its states are."""
        if isinstance(batch.hidden, ort.OrtValue):
            return self._device.pool(batch.hidden, batch.bound["attention_mask"], batch.pos)
        return pool_states(batch.hidden, batch.context["attention_mask"], batch.pos)

    def _continue(
        self, task: str, batch: Batch, exit_layers: np.ndarray, depth: int, stop: StopFn | None, readout: Readout
    ) -> None:
        """`batch` (its states after `depth` layers) through the layers up to each row's exit, read out into
        `readout`; rows with exit 0 are dropped, rows with an exit up to `depth` are read out at `depth`."""
        running = exit_layers[batch.rows] > 0
        if not running.any():
            return
        if not running.all():
            batch = self._kept(batch, running)
        active = np.ones(len(batch.rows), bool)  # rows not read out yet; the others may ride along (compact_below)
        layer = depth
        while True:
            if layer > 0:
                leaving = active & (exit_layers[batch.rows] <= layer)
                if stop is not None or leaving.any():
                    states = self._pooled(batch)
                    pooled = states.astype(np.float16)
                    if stop is not None:
                        leaving |= active & stop(layer, pooled)
                    if leaving.any():
                        done = batch.rows[leaving]
                        readout.logits[done] = self.head(task, states[leaving, READOUT])
                        readout.pooled[done], readout.exits[done] = pooled[leaving], layer
                        active &= ~leaving
                        if not active.any():
                            return
                        if active.mean() < self.compact_below:
                            batch, active = self._kept(batch, active), np.ones(int(active.sum()), bool)
            batch = batch._replace(hidden=self._layer(layer, batch.hidden, batch.context, batch.bound))
            layer += 1

    def _kept(self, batch: Batch, keep: np.ndarray) -> Batch:
        """Rows `keep` of a batch, its columns trimmed to their longest row (right padding: a column slice)."""
        lengths = batch.lengths[keep]
        width = int(lengths.max())
        context = self.take_rows(batch.context, keep, width)
        if isinstance(batch.hidden, ort.OrtValue):
            hidden = self._device.compact(batch.hidden, keep, width)
        else:
            hidden = batch.hidden[keep, :width]
        bound = self._device.upload(context) if self._device else {}
        return Batch(batch.rows[keep], lengths, batch.pos[keep], hidden, context, bound)

    # -- retrieval keys -----------------------------------------------------------------------------------

    def key(self, embedder: str, texts: Sequence[str], pairs: Sequence[str | None] | None = None) -> np.ndarray:
        """L2-normalized keys of the raw inputs, never the prompt (the template is shared by all)."""
        raw = [t if not p else f"{t} {p}" for t, p in zip(texts, pairs or [None] * len(texts), strict=True)]
        if embedder == BACKBONE:
            return self.backbone_key(raw)
        return self.embedder_key(embedder, raw)

    def backbone_key(self, texts: Sequence[str]) -> np.ndarray:
        """Mean of the embed segment's output over each text's real tokens."""
        keys = np.zeros((len(texts), self.manifest.hidden_size), np.float32)
        for rows, ids, lengths in self._batched(self._tokenize(texts)):  # raw texts, never run as prompts
            mask = self.mask_of(lengths, ids.shape[1])
            keys[rows] = masked_mean(self.embed(ids, mask), mask)
        return unit_rows(keys)

    def embedder_key(self, name: str, texts: Sequence[str]) -> np.ndarray:
        """A sentence embedder's output; inputs over its max_length are truncated (only a key)."""
        if name not in self._embedders:
            entry = self.manifest.embedders.get(name)
            if entry is None:
                raise ValueError(f"embedder {name!r} is not in these artifacts")
            if self._providers[0] == CUDA and parse_embedder(name).int8:
                log.warning(
                    "key %s on CUDA: its int8 MatMuls have no CUDA kernel and run on the CPU; for GPUs export "
                    "--embedder %s and build the tables with it",
                    name,
                    name.removesuffix(INT8_SUFFIX),
                )
            tokenizer = self._tokenizer(entry.tokenizer)
            tokenizer.enable_truncation(entry.max_length)
            self._embedders[name] = (tokenizer, self._session(entry.model))
        tokenizer, session = self._embedders[name]
        encoded = [e.ids for e in tokenizer.encode_batch(list(texts), add_special_tokens=True)]
        keys = np.zeros((len(encoded), self.manifest.embedders[name].dim), np.float32)
        for rows, ids, lengths in self._batched(encoded):
            feed = {"input_ids": ids, "attention_mask": self.mask_of(lengths, ids.shape[1])}
            keys[rows] = session.run(None, feed)[0]
        return unit_rows(keys)
