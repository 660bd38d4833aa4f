"""Exit-metadata tables in LanceDB: identity checks and batched top-k neighbour look-ups.

Connections are opened by `Retriever(...)` (made as a worker loads its work, batches.Classify.load), never pickled
or forked.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, replace
from typing import Any, TypeVar

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from lancedb.index import IvfFlat

from raee_ops import s3_clients, storage
from raee_ops.calibration import FusedPolicy
from raee_ops.errors import (
    CommitConflict,
    Overtaken,
    RaeeConfigError,
    RaeeError,
    RaeeRunError,
    StoreUnavailable,
    VersionRemoved,
    exhausted,
    first_line,
)
from raee_ops.exit_policy import Context, Neighbours
from raee_ops.key_names import BACKBONE, key_available
from raee_ops.layer_key import LayerKey, unit_rows
from raee_ops.probe_policy import DEFAULT_LAYER_BUDGET, DEFAULT_LAYER_PRICE, ProbePolicy, budgeted
from raee_ops.probes import ProbeSet, check_probes, fit_share, in_fit_sample
from raee_ops.progress import phase
from raee_ops.run_record import default_errors_dir, work_dir
from raee_ops.runtime import STORED_GRAPHS, open_session, ort
from raee_ops.schemas.manifest import Manifest
from raee_ops.schemas.tables import (
    FEATURES,
    FEATURES_SUFFIX,
    FEATURES_VERSION_META_KEY,
    ID,
    LAYER_KEY_META_KEY,
    POLICY_META_KEY,
    PROBE_POLICY_META_KEY,
    PROBES_META_KEY,
    TableMeta,
    flat_values,
    stored_fields,
)

T = TypeVar("T")
#: From this many rows build-db gives the table an IVF_FLAT index and searches probe it; below, every search is exact,
#: on a copy of the table read into memory. Memory, not speed, sets the line: in bench/retrieval.py the in-memory
#: search was 3.7× the index's batched rate (at PROBE_SHARE) at 100k rows and 3.2× at 1M, but each worker process
#: holds the copy (158 MB at 100k rows, 1.6 GB and 15 s to read at 1M; Dataflow runs a Python process per core).
INDEX_MIN_ROWS = 100_000
#: Share of the index's partitions each search probes: the smallest measured share whose recall@10 on real keys
#: reaches 0.99 (bench/index_recall.py: the default key of 118k shared-dataset texts, 0.966 at 0.2, 0.994 at 0.4;
#: synthetic keys in bench/retrieval.py reached 0.998 at 0.2 already).
PROBE_SHARE = 0.4
#: kmeans iterations when training the index (the default 50 makes a 1M-row build take many minutes on 2 cores);
#: the bench's recall figures were measured with this many.
KMEANS_ITERATIONS = 10


def index_partitions(rows: int) -> int:
    """IVF partitions for a table of this many rows (the rule bench/retrieval.py measured)."""
    return max(16, round(math.sqrt(rows) / 4))


def build_index(table: lancedb.table.Table) -> bool:
    """Give a large table its IVF_FLAT index (cosine); small tables stay exact. True when one was built."""
    rows = table.count_rows()
    if rows < INDEX_MIN_ROWS:
        return False
    config = IvfFlat(distance_type="cosine", num_partitions=index_partitions(rows), max_iterations=KMEANS_ITERATIONS)
    with phase(f"build-db: building the IVF_FLAT index over {rows} rows"):
        table.create_index("vector", config=config, replace=True)
    return True


def expected_meta(manifest: Manifest, task: str, embedder: str) -> TableMeta:
    return TableMeta(
        fingerprint=manifest.fingerprint,
        task=task,
        embedder=embedder,
        num_layers=manifest.num_layers,
        label_names=list(manifest.task(task).label_names),
        task_fingerprint=manifest.task(task).fingerprint,
        key_fingerprint=manifest.key_fingerprint(embedder),
    )


WHY = {
    "fingerprint": ": the table was built from other artifacts, another model or another export of it (--quantize, "
    "--no-optimize, another raee-ops release); build its table from these, or give the artifacts it was built "
    "from (export-onnx prints an export's fingerprint, info a table's)",
    "task_fingerprint": ": the task's prompt, labels or head differ from those the table was built with",
    "key_fingerprint": ": the key embedder was exported otherwise (its graph, tokenizer or settings) than the one "
    "the table's keys were made with, so its keys would find other neighbours",
}


#: Fingerprints of another field's subject: told only where the subject matched (another key is no key exported
#: otherwise).
SUBJECT = {"task_fingerprint": "task", "key_fingerprint": "embedder"}


def foreign_table(where: str, consequence: str = "") -> RaeeConfigError:
    """A LanceDB table without raee-ops' identity: another program's, named by a misspelt --table."""
    return RaeeConfigError(f"{where} has no raee metadata: not an exit table built by raee-ops build-db{consequence}")


def check_meta(found: TableMeta | None, expected: TableMeta, where: str) -> None:
    """Refuse a table built from other artifacts, another task, embedder or depth, in one line."""
    if found is None:
        raise foreign_table(where)
    want, have = asdict(expected), asdict(found)  # None: a field the table's build-db did not record yet
    told = [k for k, v in have.items() if v not in (want[k], None)]
    diffs = [f"{k} {have[k]!r} (expected {want[k]!r}{WHY.get(k, '')})" for k in told if SUBJECT.get(k) not in told]
    if diffs:
        raise RaeeConfigError(f"{where} does not match this run: {'; '.join(diffs)}")


def table_names(db: lancedb.DBConnection) -> set[str]:
    """Every table in the database, following LanceDB's pages (remote catalogues return them in pages)."""
    names: set[str] = set()
    token = None
    while True:
        try:
            with _waiting_on(db.uri):
                page = db.list_tables(page_token=token)
        except (ValueError, OSError, RuntimeError) as exc:
            raise unreachable(db.uri, exc) from exc
        names.update(page.tables)
        token = page.page_token
        if not token:
            return names


def connect(db_uri: str, storage_options: dict[str, str] | None = None) -> lancedb.DBConnection:
    """The database; on object stores `storage_options` (endpoint, keys, region) or the standard AWS_* / Google
    environment say how to reach it."""
    try:
        with _waiting_on(db_uri):
            return lancedb.connect(db_uri, storage_options=storage_options or None)
    except (ValueError, OSError, RuntimeError) as exc:
        raise unreachable(db_uri, exc) from exc


#: LanceDB's words for a commit another writer beat: at once, or once its own retries are spent.
_CONFLICT = re.compile(r"commit conflict for version \d+|too many concurrent writers", re.IGNORECASE)
#: The Rust source location LanceDB appends to its messages.
_RUST_SOURCE = re.compile(r",\s*\S+\.rs:\d+:\d+")


def conflict(exc: BaseException) -> str | None:
    """LanceDB's message, without its Rust source location, where `exc` is a commit another writer beat (one outside
    raee-ops's claims: two raee-ops runs never race one); None for any other error."""
    text = str(exc)
    return _RUST_SOURCE.sub("", first_line(text)) if _CONFLICT.search(text) else None


@contextlib.contextmanager
def committing(db_uri: str, table: str) -> Iterator[None]:
    """A LanceDB write whose commit another writer beat is CommitConflict (exit 75): its version was not made, and
    the same command run again makes it."""
    try:
        yield
    except Exception as exc:
        said = conflict(exc)
        if said is None:
            raise
        raise CommitConflict(
            f"another writer committed to table {table!r} in {db_uri} first (one outside raee-ops's claims, or a run "
            f"that took the table over once this run stalled past its claim; {said}): "
            "this run's version was not made; run again"
        ) from exc


def keep_theirs(table: lancedb.table.Table, read: int | None, what: str) -> None:
    """After this run's commit (`table` at its new version): a version between `read`, the latest when this run
    looked under its claim (None: there was no table), and this run's own is another run's, made once this run's
    claim lapsed (the run stalled past the claim's life: a paused VM, a stopped process, a store that did not answer),
    and this run's whole-table write replaced it. The claim's checks cannot close that window: a stall can come
    between the last check and the write. That version is made current again, as a new version, and the run ends
    with Overtaken (75): a rerun builds on it."""
    theirs = table.version - 1
    if theirs <= (read or 0):
        return
    table.checkout(theirs)
    table.restore()
    seen = "found no table" if read is None else f"read version {read}"
    raise Overtaken(
        f"{what}: version {theirs} was committed by another run after this run {seen} under its claim (this run "
        f"stalled past its claim's life, or a writer outside raee-ops's claims), and this run's version {theirs + 1} "
        f"replaced it: version {theirs} is current again (as version {table.version}), nothing of this run's is kept; "
        "run again"
    )


def _waiting_on(db_uri: str) -> contextlib.AbstractContextManager[None]:
    """LanceDB's look-ups on an object store, timed for the store watch (s3_clients.watch): its own client retries
    a store that stopped answering for minutes, unseen by the watch."""
    return contextlib.nullcontext() if storage.is_local(db_uri) else s3_clients.waiting_on(db_uri)


def unreachable(db_uri: str, exc: Exception) -> RaeeError:
    """A database LanceDB cannot reach, as one short line: its error is kilobytes of the store client's debug dump.
    No connection, a timeout or a server error is an outage a scheduler's retry mends (75); anything else (a wrong
    endpoint's scheme, a missing bucket, refused credentials) is configuration (2); this process out of open files
    is neither (1: it said "check --db")."""
    ran_out = exhausted(str(exc))  # this process's open files, not the database: not configuration
    if ran_out:
        return RaeeRunError(f"{ran_out[0]} opening the database at {db_uri}: {ran_out[1]}, then run again")
    line = f"cannot reach the database at {db_uri} (check --db and the store's settings): {_problem(exc)}"
    if "BadScheme" in str(exc):  # an http:// endpoint from the environment (AWS_ENDPOINT_URL), which LanceDB refuses
        line += " (an http:// endpoint: pass it as --s3_endpoint_url, or set AWS_ALLOW_HTTP=true)"
    if _OUTAGE.search(str(exc)):
        return StoreUnavailable(f"{line} (retry later)")
    return RaeeConfigError(line)


#: What an object store's client says when the store did not answer or failed, not the request.
_OUTAGE = re.compile(r"kind: (?:Connect|Timeout)\b|status: 5\d\d\b")
#: An S3 error body inside the client's dump (its quotes escaped there): its code and message.
_S3_ERROR = re.compile(r"<Code>([^<]+)</Code>\s*<Message>([^<]*)</Message>")


#: What LanceDB wraps the words of an error in (0.40: layers of "Wrapped error: "; 0.41 drops those and keeps
#: "Generic <store> error: ").
_LANCE_LAYERS = re.compile(r"Wrapped error: |Generic [\w/]+ error: ")
#: A lost file's path as LanceDB's local reader gives it: absolute, less its leading slash.
_NOT_FOUND = re.compile(r"(?<=Not found: )(?!/)(\S+)")


def _rooted(found: re.Match[str]) -> str:
    """The path of a `Not found:` with its leading slash back where it is a local file's (a folder two or more
    levels down above it exists here, the table's at least: its whole data folder may be gone); an object store's
    key stays as said, though its bucket is named like a folder at the root here (`tmp/db/t.lance/...`)."""
    path = found[1]
    folder = os.path.dirname(f"/{path}")
    while folder.count("/") > 1 and not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    return f"/{path}" if folder.count("/") > 1 else path


def _problem(exc: Exception) -> str:
    """The words of a LanceDB error that say what went wrong. Its store client's errors are a Rust debug dump
    (`Failed to connect to namespace: IO { source: Generic { … } }`): their head, then the innermost cause (an S3
    error body's code and message, a `message: "…"`, a `source: "…"` up to its own dump, else the innermost
    `source: Name`). Other errors: the first line
    without the Rust source lines that raised it and the layers LanceDB wraps around a lost file's
    "Not found: <path>" (_LANCE_LAYERS)."""
    text = str(exc)
    coded = _S3_ERROR.search(text)
    messages = re.findall(r'message: "([^"]+)"', text)
    told = [re.sub(r": \w+$", "", said.split("(", 1)[0]) for said in re.findall(r'source: "([^"(]+)', text)]
    sources = re.findall(r"source: ([A-Za-z]\w*) \}", text)
    cause = f"{coded[1]}: {coded[2]}" if coded else (messages or told or sources or [None])[-1]
    if cause is None or " { " not in text:
        said = _LANCE_LAYERS.split(first_line(re.sub(r",\s*/\S+\.rs:\d+:\d+", "", text)))[-1]
        return _NOT_FOUND.sub(_rooted, said)
    head = re.sub(r": [A-Z]\w*$", "", first_line(text).split(" { ", 1)[0])
    return first_line(f"{head}: {cause}")


class Unfinished(RaeeConfigError):
    """A table the database lists that has no committed version: the build-db creating it was killed before its
    first commit (or is creating it now). No row was ever in it; build-db of that table removes what a killed one
    left (`table_folder`)."""


def open_listed(db: lancedb.DBConnection, db_uri: str, name: str) -> lancedb.table.Table:
    """A table the database lists, opened; one whose files are damaged (a truncated manifest, say) is one line,
    not the Rust reader's error, and one without any version is `Unfinished`."""
    try:
        with _waiting_on(db_uri):
            return db.open_table(name)
    except (ValueError, OSError, RuntimeError) as exc:
        if not storage.children(storage.join(table_folder(db_uri, name), "_versions"), "*.manifest"):
            raise Unfinished(
                f"table {name!r} in {db_uri} has no committed version: the build-db creating it was stopped before "
                "its first commit, or is creating it now (an overwrite of the table by build-db removes what a stopped "
                "one left)"
            ) from exc
        raise _unreadable(  # LanceDB opens no version of it, an earlier one neither: rollback and build-db cannot
            f"table {name!r} in {db_uri}",
            exc,
            f"no version of it opens, so neither rollback nor build-db can mend it: restore its files, or move its "
            f"folder {table_folder(db_uri, name)} away and rebuild it with build-db",
        ) from exc


def table_folder(db_uri: str, name: str) -> str:
    """Where LanceDB keeps a table of a database directory (or object-store prefix)."""
    return storage.join(db_uri, f"{name}.lance")


def check_writable(db_uri: str, table: str) -> None:
    """Refuse, before any work, a local table whose folders this process cannot write in: its own and its probes'
    feature rows' (a new version goes into them), its work folder and its default errors folder."""
    folders = [table_folder(db_uri, name) for name in (table, table + FEATURES_SUFFIX)]
    for folder in [*folders, work_dir(db_uri, table), default_errors_dir(db_uri, table)]:
        storage.check_tree(folder, f"table {table!r} in {db_uri}")


def _unreadable(
    where: str, exc: Exception, remedy: str = "restore them, or rebuild it with build-db"
) -> RaeeConfigError:
    """The one line for a table whose files LanceDB cannot read, whichever read found it."""
    return RaeeConfigError(f"{where} cannot be read (damaged or incomplete files?): {_problem(exc)}; {remedy}")


def no_table(name: str, db_uri: str) -> RaeeConfigError:
    """The line for a table the database does not list (a misspelt --table, or no build-db yet)."""
    return RaeeConfigError(f"no table {name!r} in {db_uri} (run build-db first)")


def no_database(db_uri: str) -> bool:
    """Whether `db_uri` is a local database directory that does not exist yet: connecting would create it, empty
    (an object-store database has no directory to look for)."""
    return storage.is_local(db_uri) and not storage.is_dir(db_uri)


def check_database(db_uri: str) -> None:
    """Refuse a local database directory that does not exist (`no_database`), or that the workers cannot see
    (`storage.unseen`)."""
    if no_database(db_uri):
        raise storage.unseen(db_uri, "--db") or RaeeConfigError(
            f"no LanceDB database at {db_uri} (run build-db first, or check --db)"
        )


def open_table(
    db_uri: str, name: str, version: int | None = None, storage_options: dict[str, str] | None = None
) -> lancedb.table.Table:
    """An existing table (at `version`, when given); a missing database is refused, never created."""
    check_database(db_uri)
    db = connect(db_uri, storage_options)
    if name not in table_names(db):
        raise no_table(name, db_uri)
    table = open_listed(db, db_uri, name)
    if version is not None:
        try:
            table.checkout(version)
        except (ValueError, OSError, RuntimeError) as exc:  # "Version N no longer exists"
            if _removed(table, version):
                raise _version_removed(f"table {name!r} in {db_uri}", version) from exc
            raise
    return table


def checked_table(
    db_uri: str, name: str, manifest: Manifest, task: str, artifacts: str, storage_options: dict[str, str]
) -> tuple[lancedb.table.Table, TableMeta]:
    """The table's current version, and the identity it was checked to have: refused with one line unless these
    artifacts compute its key and it was built with them for `task` (classify's and evaluate's check)."""
    opened = open_table(db_uri, name, storage_options=storage_options)
    meta = TableMeta.decode(opened.schema)
    embedder = meta.embedder if meta else BACKBONE
    if not key_available(manifest, embedder):
        raise RaeeConfigError(f"table {name!r} was keyed with embedder {embedder!r}, not in {artifacts}")
    expected = expected_meta(manifest, task, embedder)
    check_meta(meta, expected, f"table {name!r} in {db_uri}")
    return opened, expected


@contextlib.contextmanager
def _reading_versions(table: lancedb.table.Table) -> Iterator[None]:
    """A damaged manifest of a version read in the block is the one line for unreadable files, not the Rust
    reader's error (exit 1, "internal error")."""
    try:
        yield
    except (ValueError, OSError, RuntimeError) as exc:
        raise _unreadable(f"table {table.name!r}", exc, _manifest_remedy(table, str(exc))) from exc


#: A version's manifest as LanceDB names it: `<version>.manifest`, or (its newer scheme) `<2**64 - 1 - version>…`.
_MANIFEST = re.compile(r"_versions/(\d+)\.manifest")


def _manifest_remedy(table: lancedb.table.Table, problem: str) -> str:
    """What mends a table one of whose manifests is damaged: where it is an older version's (the current one reads
    whole: classify and evaluate run), dropping that version; moving the table away lost every version."""
    named = _MANIFEST.search(problem)
    damaged = int(named.group(1)) if named else None
    if damaged is not None and damaged >= 2**63:
        damaged = 2**64 - 1 - damaged
    try:
        current = table.version
    except (ValueError, OSError, RuntimeError):
        current = None
    if damaged is None or current is None or damaged == current:
        return "restore them, or move its folder away and rebuild it"
    return (
        f"it is version {damaged}'s manifest, not the current version {current}'s (classify and evaluate read that "
        "one): restore the file, or delete it to drop that version from the history"
    )


def versions_of(table: lancedb.table.Table) -> list[dict[str, Any]]:
    """LanceDB's list of the table's versions (it reads every version's manifest)."""
    with _reading_versions(table):
        return table.list_versions()


def version_schemas(
    handle: lancedb.table.Table, versions: Iterable[int] | None = None
) -> Iterator[tuple[int, pa.Schema]]:
    """(version, its schema and metadata) of each of the table's `versions` (default: all), newest first: a walk
    over a table's history (its run records, companions' versions). The handle is left at the last one read."""
    wanted = versions if versions is not None else (v["version"] for v in versions_of(handle))
    for version in sorted(wanted, reverse=True):
        with _reading_versions(handle):
            handle.checkout(version)
        yield version, handle.schema


def checked_features(
    db_uri: str, name: str, schema: pa.Schema, ids: pa.Array | pa.ChunkedArray, storage_options: dict[str, str] | None
) -> lancedb.table.Table:
    """The probes' feature rows an append of the table version of `schema`, whose rows are `ids`, refits on: the
    companion at the version written with it (the latest for tables built before build-db recorded it). Refused with
    one line unless it opens, its `id` column reads, it has a features column and it holds every fit row's (an
    append checks this before its work, and info shows it: either way the append would fail after it)."""
    companion = name + FEATURES_SUFFIX
    where = f"table {companion!r} in {db_uri}, the old rows' features the probes are refitted on,"
    mend = f"rebuild table {name!r} (build-db --mode overwrite)"
    db = connect(db_uri, storage_options)
    if companion not in table_names(db):
        raise RaeeConfigError(f"append refused: {where} is missing; {mend}")
    try:
        features = open_listed(db, db_uri, companion)
        pinned = (schema.metadata or {}).get(FEATURES_VERSION_META_KEY)
        if pinned is not None:
            _checkout_pinned(features, int(pinned), where, mend)
        held = read_column(features, ID, where)
    except _Gone:
        raise
    except RaeeConfigError as exc:
        if isinstance(exc, Unfinished):
            why = "has no committed version (a build-db writing it was stopped)"
        else:
            why = f"cannot be read (damaged or incomplete files?): {_problem(exc.__cause__ or exc)}"
        folder = table_folder(db_uri, companion)
        raise RaeeConfigError(f"append refused: {where} {why}; move its folder {folder} away and {mend}") from exc
    if FEATURES not in features.schema.names:
        raise RaeeConfigError(f"append refused: {where} has no {FEATURES!r} column; {mend}")
    fit = ids.filter(pa.array(in_fit_sample(ids.to_pylist(), fit_share(len(ids)))))
    lacking = len(fit) - (pc.sum(pc.is_in(fit, value_set=held.combine_chunks())).as_py() or 0)
    if lacking:
        raise RaeeConfigError(f"append refused: {where} lacks {lacking} of the table's probe fit rows; {mend}")
    return features


class _Gone(RaeeConfigError):
    """The companion no longer holds the version its table was written with: not damage."""


def _checkout_pinned(features: lancedb.table.Table, version: int, where: str, mend: str) -> None:
    """The companion at the version its table pins, that version's manifest alone read (a damaged older version
    must not stop an append that never reads it)."""
    try:
        features.checkout(version)
    except (ValueError, OSError, RuntimeError) as exc:
        if _removed(features, version):
            raise _Gone(
                f"append refused: {where} no longer holds version {version}, which the table was written with; {mend}"
            ) from exc
        raise _unreadable(where, exc) from exc


class Retriever:
    """Top-k neighbours' exit information for many query vectors at once.

    A table below INDEX_MIN_ROWS (no index: every LanceDB search is an exact scan anyway) is read into memory once,
    on the first search, and searched by one matrix product: a LanceDB exact search of 32 queries over 1,000 rows
    took ~21 ms here against ~0.5 ms, and on object storage each would read the table again. At 100k rows that is
    ~160 MB per worker process (see INDEX_MIN_ROWS). Larger tables are searched through LanceDB (its IVF index,
    which build-db gives them).
    """

    def __init__(
        self, db_uri: str, table: str, version: int | None = None, storage_options: dict[str, str] | None = None
    ) -> None:
        self.table = open_table(db_uri, table, version, storage_options)
        self.where = f"table {table!r} in {db_uri}"
        self.meta = TableMeta.decode(self.table.schema)
        self.rows = self.table.count_rows()
        self.policy = table_policy(self.table.schema)
        self.probes = table_probes(self.table.schema)
        self.probe_policy = table_probe_policy(self.table.schema)
        self.layer_key = table_layer_key(self.table.schema)
        self.has_probe_answers = "probe_correct" in self.table.schema.names
        self.has_head_answers = "layer_logprobs" in self.table.schema.names  # none without a label-word head
        indexed = self.rows >= INDEX_MIN_ROWS and any(i.columns == ["vector"] for i in self.table.list_indices())
        self.nprobes = max(1, round(index_partitions(self.rows) * PROBE_SHARE)) if indexed else None
        self._memory: InMemory | None = None

    @property
    def key_depth(self) -> int:
        """Layers a query runs for its key: N for a layer-N table, else 0."""
        return self.layer_key.depth if self.layer_key else 0

    def _search(self, vectors: np.ndarray, k: int, num_layers: int, num_labels: int) -> Neighbours:
        if self.rows < INDEX_MIN_ROWS:
            if self._memory is None:
                self._memory = self._read(lambda: InMemory.read(self.table, self._columns()))
            return self._memory.search(vectors, k, num_layers, num_labels)
        query = self.table.search(list(vectors), vector_column_name="vector").metric("cosine").limit(k)
        query = query.bypass_vector_index() if self.nprobes is None else query.nprobes(self.nprobes)
        hits = self._read(lambda: query.select([*self._columns(), "_distance"]).to_arrow())
        return _group(hits, len(vectors), k, num_layers, num_labels)

    def _read(self, read: Callable[[], T]) -> T:
        """A read of the table: its failure is the table's or the store's (`_read_failure`), which fails the job;
        what the search then makes of the rows' keys fails their rows only (a key that is not finite finds no
        neighbours in LanceDB)."""
        try:
            return read()
        except (ValueError, OSError, RuntimeError) as exc:
            raise _read_failure(self.table, self.where, exc) from exc

    def _columns(self) -> list[str]:
        head = ["layer_correct", "layer_logprobs"] * self.has_head_answers
        return ["label", *head, *["probe_correct"] * self.has_probe_answers]

    def search(self, vectors: np.ndarray, k: int) -> Neighbours:
        """Neighbours of query keys: for a layer-N table, the queries' raw states, standardized here as the
        table's own keys were."""
        num_layers, num_labels = self.meta.num_layers, len(self.meta.label_names)
        k = min(k, self.rows)
        if len(vectors) == 0 or k == 0:
            return Neighbours.none(len(vectors), num_layers, num_labels)
        vectors = np.asarray(vectors, np.float32)
        if self.layer_key is not None:
            vectors = self.layer_key.apply(vectors)
        if not np.isfinite(vectors).all():  # no neighbours (LanceDB 0.40), a refused query (0.41), NaN ones in memory
            raise _too_few(0, k)
        found = self._search(vectors, k, num_layers, num_labels)
        if self.probes is None:
            return found
        return replace(found, key_logprobs=self.probes.key.log_probs(vectors))


class InMemory:
    """A small exit table's columns as arrays, searched exactly by cosine similarity (as LanceDB's exact scan),
    through the stored `search` graph on ONNX Runtime's shared thread pool (onnx_export/stored_graphs.py: why not
    numpy)."""

    def __init__(self, rows: pa.Table) -> None:
        n = rows.num_rows
        vectors = flat_values(rows, "vector").reshape(n, -1).astype(np.float32, copy=False)
        norms = np.maximum(np.linalg.norm(vectors, axis=1), 1e-12)
        # unit keys written transposed straight into the one array kept (normalizing, then transposing, held two more
        # copies of the keys at the peak: 1.2 GB against 0.6 for 300 MB of keys); ORT reads it in place
        keys_t = np.empty((vectors.shape[1], n), np.float32)
        np.divide(vectors.T, norms[None, :], out=keys_t)
        self.keys_t = ort.OrtValue.ortvalue_from_numpy(keys_t)  # handed over once
        self.session = open_session(STORED_GRAPHS / "search.onnx")
        self.columns = _arrays(rows.drop_columns(["vector"]))

    @classmethod
    def read(cls, table: lancedb.table.Table, columns: list[str]) -> InMemory:
        """The table's keys and these exit columns (only these: not the table's other columns), read once."""
        wanted = ["vector", *columns]
        return cls(table.search().select(wanted).limit(None).to_arrow().select(wanted))

    @property
    def nbytes(self) -> int:
        """Memory the arrays hold: the keys (float32) and the exit columns."""
        dim, rows = self.keys_t.shape()
        return 4 * dim * rows + sum(values.nbytes for values in self.columns.values())

    def search(self, vectors: np.ndarray, k: int, num_layers: int, num_labels: int) -> Neighbours:
        queries = unit_rows(vectors)
        feed = {"queries": queries.astype(np.float32), "keys_t": self.keys_t, "k": np.array([k], np.int64)}
        top_sims, top = self.session.run(None, feed)  # k <= rows
        found = {name: values[top] for name, values in self.columns.items()}
        return _neighbours(found, top_sims, num_layers, num_labels)


def table_policy(schema: pa.Schema) -> FusedPolicy | None:
    raw = (schema.metadata or {}).get(POLICY_META_KEY)
    return FusedPolicy(**stored_fields(FusedPolicy, json.loads(raw), "fused policy")) if raw else None


def table_layer_key(schema: pa.Schema) -> LayerKey | None:
    raw = (schema.metadata or {}).get(LAYER_KEY_META_KEY)
    return LayerKey.from_json(raw) if raw else None


def table_probes(schema: pa.Schema) -> ProbeSet | None:
    raw = (schema.metadata or {}).get(PROBES_META_KEY)
    return ProbeSet.from_json(raw) if raw else None


def table_probe_policy(schema: pa.Schema) -> ProbePolicy | None:
    raw = (schema.metadata or {}).get(PROBE_POLICY_META_KEY)
    return ProbePolicy(**stored_fields(ProbePolicy, json.loads(raw), "probe policy")) if raw else None


def kept_costs(schema: pa.Schema | None, layer_budget: float | None, layer_price: float | None) -> tuple[float, float]:
    """build-db's layer budget and price: as given, else those the table (`schema`: an append's) was fitted with, as
    an append keeps its key (an append without them reset a table built at another cost to the defaults, and its
    rows ran other layers), else the defaults."""
    own = table_probe_policy(schema) if schema is not None else None
    if layer_budget is None:
        layer_budget = own.layer_budget if own is not None and own.layer_budget is not None else DEFAULT_LAYER_BUDGET
    if layer_price is None:
        layer_price = own.layer_price if own is not None else DEFAULT_LAYER_PRICE
    return layer_budget, layer_price


def table_context(
    schema: pa.Schema,
    num_layers: int,
    num_labels: int,
    k: int,
    layer_budget: float | None = None,
    layer_price: float | None = None,
) -> Context:
    """What a strategy reads of a table besides its rows: its fitted policies (probe-fused's settings for another
    layer budget or price where asked), its probes and its key's depth. classify's driver and workers and evaluate
    all take it from here, so they run one strategy alike."""
    layer_key = table_layer_key(schema)
    return Context(
        num_layers,
        num_labels,
        k,
        table_policy(schema),
        table_probes(schema),
        budgeted(table_probe_policy(schema), layer_budget, layer_price),
        layer_key.depth if layer_key else 0,
    )


def other_metric(ctx: Context, metric: str, where: str) -> str | None:
    """A note when the table's policies were fitted for another metric than the task's (an export that changed only
    the task's metric keeps its tables): they still answer, tuned for the other one; an append or rebuild refits."""
    fitted = next((p.metric for p in (ctx.probe_policy, ctx.policy) if p is not None), metric)
    if fitted == metric:
        return None
    return (
        f"{where}: its policies were fitted for {fitted}, and the task is scored by {metric} in these artifacts; "
        "rebuild it with build-db to fit them for it"
    )


def probe_identity(meta: TableMeta, rows: int) -> dict:
    """What a table's probes must have been fitted for: its artifacts, task, embedder, depth, labels and rows (the
    key embedder's identity is the table's own, checked with it: probes fitted before it was recorded stay valid)."""
    identity = asdict(meta) | {"rows": rows}
    del identity["key_fingerprint"]
    return identity


def check_table_contents(
    table: lancedb.table.Table, expected: TableMeta, needed: bool, where: str, reads_rows: bool = True
) -> int:
    """Refuse an empty table (build-db --allow-empty makes one: no row has neighbours, probes or a policy to give)
    where the strategy `reads_rows` (`full` and `layer:N` read nothing of it); probes fitted for another table or
    artifacts whenever a table has them; and a table without them when the strategy reads them. Returns its rows."""
    rows = table.count_rows()
    if rows == 0 and reads_rows:
        raise RaeeConfigError(f"{where} is empty: add reference rows with build-db --mode append first")
    if reads_rows:
        read_column(table, "label", where)  # the workers' first search must not be where damaged files show
    probes = table_probes(table.schema)
    if probes is not None or needed:
        check_probes(probes, probe_identity(expected, rows), where)
    return rows


def neighbours_asked(k: int, table_rows: int) -> str:
    """--k as a run uses it: a search finds at most the table's rows, so a larger k is said to be that many."""
    return f"k={k}" if k <= table_rows else f"k={table_rows} (--k {k}; the table holds {table_rows} rows)"


def read_column(table: lancedb.table.Table, column: str, where: str) -> pa.ChunkedArray:
    """One column of every row; a table whose data files are gone or cut short (its manifest still names them) is
    one line, not the Rust reader's error in the middle of a run."""
    try:
        return table.search().select([column]).limit(None).to_arrow().column(column)
    except (ValueError, OSError, RuntimeError) as exc:
        raise _read_failure(table, where, exc) from exc


def _read_failure(
    table: lancedb.table.Table, where: str, exc: Exception
) -> RaeeConfigError | VersionRemoved | StoreUnavailable:
    """The one line for a read of the table's version that failed: the store failing or out of reach (a retry
    reads it), the version pruned meanwhile (a retry reads the current one), else its files damaged."""
    if _OUTAGE.search(str(exc)):
        return StoreUnavailable(f"{where} could not be read: {_problem(exc)} (the store failed; retry later)")
    if _removed(table, table.version):
        return _version_removed(where, table.version)
    return _unreadable(where, exc)


def _removed(table: lancedb.table.Table, version: int) -> bool:
    """Whether `version` has left the table's history (a prune): its files going while it was read is no damage."""
    try:
        return version not in {v["version"] for v in table.list_versions()}
    except (ValueError, OSError, RuntimeError):
        return False


def _version_removed(where: str, version: int) -> VersionRemoved:
    return VersionRemoved(
        f"{where}: version {version}, which this run read, was removed meanwhile (prune --grace 0 removes versions "
        "a running job may read); run again"
    )


def _group(hits: pa.Table, num_queries: int, k: int, num_layers: int, num_labels: int) -> Neighbours:
    """LanceDB's results (query_index, _distance and the exit columns) as dense B×k arrays, nearest first."""
    if "query_index" not in hits.column_names:  # a single query comes back without it
        hits = hits.append_column("query_index", pa.array(np.zeros(hits.num_rows, np.int32)))
    hits = hits.sort_by([("query_index", "ascending"), ("_distance", "ascending")])
    query = hits.column("query_index").to_numpy()
    found = np.bincount(query, minlength=num_queries)
    if not np.array_equal(found, np.full(num_queries, k)):
        raise _too_few(found.min(), k)
    similarity = 1.0 - hits.column("_distance").to_numpy().reshape(num_queries, k)
    return _neighbours(_arrays(hits.drop_columns(["query_index", "_distance"])), similarity, num_layers, num_labels)


def _too_few(found: int, k: int) -> ValueError:
    """A search's failure for its batch's rows (retried one by one, they reject the row alone), not the table's."""
    return ValueError(f"{found} neighbours found for a key, not {k} (a key that is not finite?)")


def _arrays(table: pa.Table) -> dict[str, np.ndarray]:
    """Each column as a numpy array, a fixed-size list column as rows × size."""
    return {
        name: flat_values(table, name).reshape(table.num_rows, -1)
        if pa.types.is_fixed_size_list(table.schema.field(name).type)
        else table.column(name).to_numpy()
        for name in table.column_names
    }


def _neighbours(columns: dict[str, np.ndarray], similarity: np.ndarray, num_layers: int, num_labels: int) -> Neighbours:
    """Neighbours from the exit columns of B×k neighbour rows (each column B×k×…, in `similarity`'s order). A
    head-less backbone's table has no head columns: placeholders there, which no strategy allowed on it reads
    (exit_policy.refuse_head)."""
    b, k = similarity.shape
    if "layer_logprobs" in columns:
        correct = columns["layer_correct"].reshape(b, k, num_layers).astype(bool)
        logprobs = columns["layer_logprobs"].reshape(b, k, num_layers, num_labels)
    else:
        correct = np.zeros((b, k, num_layers), bool)
        logprobs = np.zeros((b, k, num_layers, num_labels), np.float32)
    probe = columns["probe_correct"].reshape(b, k, num_layers).astype(bool) if "probe_correct" in columns else None
    labels = columns["label"].reshape(b, k).astype(np.int64)
    return Neighbours(correct, similarity.astype(np.float32), labels, logprobs, probe)
