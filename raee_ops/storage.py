"""Every user-supplied location (inputs, outputs, artifacts, error folders, staging) is a URI read and written
through Beam's `FileSystems`: a local path, `s3://` (the `aws` extra) or `gs://` (the `gcp` extra).

Beam's filesystems take their settings (S3 endpoint and keys, GCP project) from pipeline options that live in one
process-wide slot; `configure` fills it from the run's own options before the driver touches any location, so a
run never uses an earlier run's settings; workers get theirs from the runner and from the DoFns that carry them
(`carry`, `on_worker`). Parquet is read by pyarrow from
the same file objects. Local paths behave as before; where the two differ (folders exist locally, not on object
stores; a local write is made atomic by a rename) the local branch is taken only after `is_local`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import functools
import hashlib
import os
import re
import shutil
import socket
import stat
import warnings
from collections.abc import Hashable, Iterable, Iterator, Sequence
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystem import BeamIOError, CompressionTypes, FileMetadata, FileSystem
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, S3Options

from raee_ops import s3_clients
from raee_ops.errors import MissingDependency, NotShared, RaeeConfigError, StoreUnavailable
from raee_ops.extras import install_line
from raee_ops.processes import alive

# `[[]`, the only escape of `[` that Beam's glob has, compiles to a regex Python warns of (a FutureWarning, in a
# scheduler's log, for a pattern the README tells users to write)
warnings.filterwarnings("ignore", "Possible nested set", FutureWarning)

#: The extra that installs each scheme's filesystem, and a module whose absence means it is not installed.
EXTRAS = {"s3": ("aws", "boto3"), "gs": ("gcp", "google.cloud.storage")}
RAW = CompressionTypes.UNCOMPRESSED
BLOCK = 1 << 22
#: What creating a local folder answers where the location cannot hold one (not a full disk nor an I/O error).
REFUSED_NAMES = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST}


def scheme(uri: str) -> str | None:
    return FileSystems.get_scheme(uri)


def is_local(uri: str) -> bool:
    return scheme(uri) in (None, "file")


def local_path(uri: str) -> str:
    return uri.removeprefix("file://")


def canonical(uri: str) -> str:
    """One spelling of a location: a local path made absolute and normalised, an object-store URI without a
    trailing slash."""
    return os.path.abspath(local_path(uri)) if is_local(uri) else uri.rstrip("/")


def absolute(uri: str) -> str:
    """A local location made absolute with its folders resolved as the system resolves them, its own name kept (a
    link there is refused where it must be): `..` after a link is the link's target's parent. Collapsed as text
    (`canonical`), a check read one folder and the run wrote another; left in, Beam's writers collapse it while
    readers resolve it. An object-store URI as it is."""
    if not is_local(uri):
        return uri
    path = os.path.join(os.getcwd(), local_path(uri))
    folder, own = os.path.split(path.rstrip("/"))
    if own in ("", ".", "..") or not os.path.isdir(folder):  # refused where it is checked (a link to nothing, say)
        return path
    return os.path.join(os.path.realpath(folder), own)


def resolved(uri: str) -> str:
    """What a location is: `canonical`, a local path's links resolved too (a file or database named through a link
    is that file or database)."""
    return os.path.realpath(local_path(uri)) if is_local(uri) else canonical(uri)


def identity(uri: str) -> Hashable:
    """What a file is, however it is named: a local file's device and inode (another spelling, a symbolic or a hard
    link to it), else `resolved`."""
    if is_local(uri):
        with contextlib.suppress(OSError):  # gone since it was listed: reading it says so
            found = os.stat(local_path(uri))
            return found.st_dev, found.st_ino
    return resolved(uri)


def resolved_pattern(pattern: str) -> str:
    """A glob as `resolved` spells a location: a local pattern's folders before its first glob character with their
    links resolved (what `match` lists through them lies there)."""
    if not is_local(pattern):
        return canonical(pattern)
    parts = os.path.abspath(local_path(pattern)).split("/")
    first = next((i for i, part in enumerate(parts) if is_pattern(part)), len(parts))
    return os.path.join(os.path.realpath("/".join(parts[:first]) or "/"), *parts[first:])


_options = PipelineOptions([])  # the run's, as `configure` last gave them to Beam's filesystems
_reached: set[tuple[str | None, str]] = set()  # (endpoint, bucket) pairs that answered in this process


def configure(beam_args: Sequence[str] | PipelineOptions = ()) -> PipelineOptions:
    """Give Beam's filesystems this run's options (and only this run's); returns them."""
    global _options
    options = beam_args if isinstance(beam_args, PipelineOptions) else PipelineOptions(list(beam_args))
    s3_clients.share()
    FileSystems.set_options(options)
    _options = options
    return options


#: In `carry`'s dict: where the command runs (`here`), so that a worker can tell a local location it cannot see there.
PLACE = "_raee_place"
#: The launching command's place, in a worker that `on_worker` gave the run's options.
_launched_from: str | None = None


def here() -> str:
    """Which files this process sees: its host, its boot and its mount namespace (a container's, or `unshare -m`'s,
    differs on the same host)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as boot_id:
            boot = boot_id.read().strip()
        mounts = os.stat("/proc/self/ns/mnt").st_ino
    except OSError:  # not Linux: the host alone
        boot, mounts = "", 0
    return f"{socket.gethostname()}/{boot}/{mounts}"


def carry(options: PipelineOptions) -> dict[str, Any]:
    """The run's options as a plain dict that DoFns and the batch work carry to workers (see `on_worker`); options of
    classes this process has not imported are kept as given, not dropped; and where this process runs (`PLACE`)."""
    return options.get_all_options(drop_default=True, retain_unknown_options=True) | {PLACE: here()}


def on_worker(carried: dict[str, Any] | None) -> None:
    """Give a worker's filesystems the run's options. Beam's own worker entry point (the containers Dataflow and
    the portable runners start) does this already; a harness started another way (Beam's external worker pool)
    does not, and a worker would then reach S3 without the run's endpoint and keys."""
    global _launched_from
    s3_clients.share()
    if carried is not None:
        options = dict(carried)
        _launched_from = options.pop(PLACE, None)
        configure(PipelineOptions.from_dictionary(options))


def unseen(uri: str, what: str) -> NotShared | None:
    """The refusal for a local location this worker cannot find where it runs elsewhere than the command that found
    it (another machine, a container): the workers need locations they share with it. None where it is there, or
    not local, or the worker runs beside the command (a location gone there went during the run)."""
    if not is_local(uri) or _launched_from in (None, here()) or exists(uri):
        return None
    return NotShared(
        f"{what} {uri} is not there for the workers, which run elsewhere than this command (another machine or "
        "container): give locations they see too (an object store, a shared filesystem)"
    )


#: A location spelled as a URL short of its `//` (`s3:/bucket/x`, `file:/tmp/x`): Beam reads it as a local folder
#: named `s3:` in the working directory, where a run wrote its output or its rejected rows, exit 0.
_HALF_URL = re.compile(r"(file|s3|gs|gcs|hdfs|azfs|https?|az|abfss?):/?(?!/)", re.IGNORECASE)


def refuse_half_url(uri: str, what: str) -> None:
    """Refuse a location spelled as a URL short of its `//` (checked as given, before it is made absolute)."""
    half = _HALF_URL.match(uri)
    if half:
        raise RaeeConfigError(f"{what} {uri}: write {half[1]}://… (a local folder named so: ./{uri})")


def check_scheme(uri: str, what: str) -> None:
    """Refuse, in one line naming the extra, a URI whose filesystem is not installed, and one short of its `//`."""
    name = scheme(uri)
    refuse_half_url(uri, what)
    if is_local(uri):
        return
    if name not in EXTRAS:
        raise RaeeConfigError(f"{what} {uri}: unsupported scheme {name}:// (use a local path, s3:// or gs://)")
    bucket, _, key = uri.split("://", 1)[1].partition("/")
    if not key.strip("/"):  # Beam's filesystems take objects under a bucket: its root stalls them in retries
        raise RaeeConfigError(f"{what} {uri}: give a folder inside the bucket ({name}://{bucket}/<folder>)")
    if any(part in ("", ".", "..") for part in key.rstrip("/").split("/")):
        # Beam's filesystems take the key as written, LanceDB resolves it: one table, two places for its claim
        raise RaeeConfigError(f"{what} {uri}: spell the location without '.', '..' or empty folder names")
    extra, module = EXTRAS[name]
    try:
        __import__(module)
        FileSystems.get_filesystem(uri)
    except (ImportError, ValueError) as exc:
        raise MissingDependency(
            f"{what} {uri}: the {name}:// filesystem is not installed: {install_line(extra)}"
        ) from exc
    if name == "s3":
        _check_bucket(uri, what)


def _check_bucket(uri: str, what: str) -> None:
    """The bucket answers, asked once with a short timeout and no retry, as Beam's S3 client would ask (same
    options). Why: that client retries a connection it cannot make, with backoff, for many minutes and says
    nothing; a scheduled job would hang instead of failing with a line to read."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        ReadTimeoutError,
    )

    s3 = _options.view_as(S3Options)
    bucket = uri[len("s3://") :].split("/", 1)[0]
    where = s3.s3_endpoint_url or "AWS"
    if (s3.s3_endpoint_url, bucket) in _reached:
        return
    try:
        client = boto3.session.Session().client(
            "s3",
            region_name=s3.s3_region_name,
            use_ssl=not s3.s3_disable_ssl,
            verify=s3.s3_verify,
            endpoint_url=s3.s3_endpoint_url,
            aws_access_key_id=s3.s3_access_key_id,
            aws_secret_access_key=s3.s3_secret_access_key,
            aws_session_token=s3.s3_session_token,
            config=Config(connect_timeout=5, read_timeout=15, retries={"total_max_attempts": 1}),
        )
        client.head_bucket(Bucket=bucket)
    except ClientError as exc:  # the store answered: a missing bucket is a typo; a refusal may be policy, left to it
        error = exc.response.get("Error", {}).get("Code")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        if error in ("404", "NoSuchBucket"):
            raise RaeeConfigError(f"{what} {uri}: no bucket {bucket!r} at {s3.s3_endpoint_url or 'AWS S3'}") from exc
        if status >= 500:  # 500, 503 SlowDown: the store is failing, not the request
            raise StoreUnavailable(f"{what} {uri}: S3 at {where} is failing ({error}); retry later") from exc
    except (EndpointConnectionError, ConnectionClosedError, ConnectTimeoutError, ReadTimeoutError) as exc:
        # nothing answered: a store that is down (or an endpoint spelled wrong: the line names it)
        raise StoreUnavailable(f"{what} {uri}: cannot reach S3 at {where}: {exc} (retry later)") from exc
    except (BotoCoreError, ValueError) as exc:  # no credentials, a malformed endpoint: no retry will mend them
        raise RaeeConfigError(f"{what} {uri}: cannot reach S3 at {where}: {exc}") from exc
    _reached.add((s3.s3_endpoint_url, bucket))


#: What Beam's filesystems read as a pattern in a location.
GLOB_CHARACTERS = "*?["


def is_pattern(uri: str) -> bool:
    return any(c in uri for c in GLOB_CHARACTERS)


def escaped(name: str) -> str:
    """`name` as a glob that matches it alone: each glob character as `[c]` (Beam's glob has no other escape)."""
    return re.sub(f"([{re.escape(GLOB_CHARACTERS)}])", r"[\1]", name)


def check_folder(uri: str, what: str) -> None:
    """Refuse, before any work, a location given as a folder that is a file or, locally, that this process cannot
    create or write in (an object store says so only at the first write)."""
    if is_pattern(uri):  # Beam's filesystems read them as a pattern: the files would never be found
        raise RaeeConfigError(f"{what} {uri}: a location written to may not hold glob characters (* ? [)")
    if is_file(uri):
        raise RaeeConfigError(f"{what} {uri} exists and is not a directory")
    if not is_local(uri):
        return
    existing = _nearest(uri)
    if not os.path.exists(existing):
        raise RaeeConfigError(f"{what} {uri}: {existing} is a link to nothing ({os.readlink(existing)})")
    if not os.path.isdir(existing):
        raise RaeeConfigError(f"{what} {uri}: {existing} is a file, not a directory")
    _writable(existing, f"{what} {uri}")


def check_tree(uri: str, what: str) -> None:
    """Refuse, before any work, a local folder with a folder in it (itself included) this process cannot write in,
    or, where it is not there yet, whose nearest existing parent it cannot: LanceDB writes a table's new version into
    its subfolders (data, _versions, …), so a table folder another user owns failed the run only at its commit, an
    internal error after all its work."""
    if not is_local(uri):
        return
    top = os.path.abspath(local_path(uri))
    for folder in [folder for folder, _, _ in os.walk(top)] if os.path.isdir(top) else [_nearest(uri)]:
        _writable(folder, what)


def _nearest(uri: str) -> str:
    """A local location, or where it is not there yet, its nearest parent that is (what a write there needs)."""
    path = os.path.abspath(local_path(uri))
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    return path


def _writable(folder: str, what: str) -> None:
    if not os.access(folder, os.W_OK | os.X_OK):
        raise RaeeConfigError(f"{what}: cannot write in {folder} (permissions, or a read-only filesystem)")


def within(uri: str, folder: str) -> bool:
    """Whether `uri` is `folder` or lies under it (local paths with their links resolved)."""
    inner, outer = (os.path.realpath(local_path(u)) if is_local(u) else u.rstrip("/") for u in (uri, folder))
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def check_outside(uri: str, what: str, folder: str, unless_in: str | None = None, kind: str = "the database") -> None:
    """Refuse, before any work, a location to write inside `folder`: the database (a table's folder or beside the
    tables: files LanceDB and raee-ops keep there) except under `unless_in` in it, or another `kind` of folder whose
    owner replaces it whole (an artifacts folder)."""
    if within(uri, folder) and not (unless_in and within(uri, join(folder, unless_in))):
        allowed = f" (only its {unless_in} folder may be)" if unless_in else ""
        raise RaeeConfigError(f"{what} {uri}: inside {kind} {folder}{allowed}; choose a folder outside it")


def folders_up(uri: str) -> list[str]:
    """`uri` and every folder above it up to the root (an object store's bucket), nearest first; a local path with
    its links resolved, as `within` compares it."""
    if not is_local(uri):
        head, _, rest = uri.rstrip("/").partition("://")
        parts = rest.split("/")
        return [f"{head}://{'/'.join(parts[:n])}" for n in range(len(parts), 0, -1)]
    path = os.path.realpath(local_path(uri))
    found = [path]
    while os.path.dirname(path) != path:
        path = os.path.dirname(path)
        found.append(path)
    return found


def join(base: str, *parts: str) -> str:
    return FileSystems.join(base, *parts) if parts else base


def name(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


def parent(uri: str) -> str:
    return FileSystems.split(uri.rstrip("/"))[0]


def exists(uri: str) -> bool:
    """A file, or (locally) a directory."""
    return os.path.exists(local_path(uri)) if is_local(uri) else FileSystems.exists(uri)


def is_dir(uri: str) -> bool:
    """A local directory, or an object-store prefix holding at least one object."""
    if is_local(uri):
        return os.path.isdir(local_path(uri))
    return bool(match(join(uri, "**"), limit=1))


def empty_folder(uri: str) -> bool:
    """A local folder holding no file at any depth (an object store has no folders without objects under them)."""
    return is_local(uri) and os.path.isdir(local_path(uri)) and not any(f for _, _, f in os.walk(local_path(uri)))


def is_file(uri: str) -> bool:
    return exists(uri) and not (is_local(uri) and is_dir(uri))


def metadata(uri: str) -> FileMetadata:
    """One file's path, size and modification time, its name taken as spelt (glob characters and all)."""
    path = os.path.abspath(local_path(uri)) if is_local(uri) else uri
    return FileSystems.get_filesystem(path).metadata(path)


def size(uri: str) -> int | None:
    """A file's size now (None where it cannot be read)."""
    try:
        return metadata(uri).size_in_bytes
    except (OSError, BeamIOError):
        return None


def match_metadata(pattern: str, limit: int | None = None) -> list[FileMetadata]:
    """Files matching a glob (`*` stays within one folder, `**` crosses folders), sorted by path. A local pattern is
    made absolute first: Beam matches a bare `part-*.parquet` against nothing, not the working directory."""
    if is_local(pattern):
        pattern = os.path.abspath(local_path(pattern))
    found = FileSystems.match([pattern], [limit])[0].metadata_list
    return sorted(found, key=lambda m: m.path)


def unreadable_matches(pattern: str) -> list[str]:
    """Local entries a pattern names or matches that are not regular files: a link to nothing, which Beam's glob
    skips without a word (its rows would go missing), and a named pipe, socket or device, whose read waits forever."""
    path = os.path.abspath(local_path(pattern))
    prefix = re.match("^[^[*?]*", path).group(0)
    named = os.path.lexists(path) and not os.path.isdir(path)  # glob characters and all (inputs._matched)
    if prefix == path or named:
        found = [path] if os.path.lexists(path) else []
    else:  # the folder Beam walks for it
        walked = (os.path.join(d, f) for d, _, files in os.walk(os.path.dirname(prefix)) for f in files)
        found = [f for f in walked if matches(path, f)]
    return [f for f in found if not _regular(f)]


def _regular(path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def match(pattern: str, limit: int | None = None) -> list[str]:
    return [m.path for m in match_metadata(pattern, limit)]


def matches(pattern: str, uri: str) -> bool:
    """Whether `match(pattern)` would list the file `uri` were it there (Beam's own glob rules)."""
    if is_local(pattern) != is_local(uri):
        return False
    return re.match(FileSystem.translate_pattern(canonical(pattern)), canonical(uri)) is not None


def children(uri: str, pattern: str = "*") -> list[str]:
    """Names directly under a folder (files and sub-folders) that match `pattern`, sorted; on an object store only
    the keys under `<uri>/<pattern>` are listed."""
    if is_local(uri):
        names = os.listdir(local_path(uri)) if os.path.isdir(local_path(uri)) else []
        return sorted(n for n in names if fnmatch.fnmatchcase(n, pattern))
    prefix = uri.rstrip("/") + "/"
    found = match_metadata(prefix + pattern) + match_metadata(prefix + pattern + "/**")
    return sorted({m.path[len(prefix) :].split("/", 1)[0] for m in found})


def mkdirs(uri: str) -> None:
    """Create a local folder (and its parents); object stores have no folders to create. A filesystem that refuses
    the name (/proc answers ENOENT under a folder root may write in) is the location given, not a bug."""
    if is_local(uri):
        try:
            os.makedirs(local_path(uri), exist_ok=True)
        except OSError as exc:
            if exc.errno not in REFUSED_NAMES:
                raise
            raise RaeeConfigError(f"cannot create the folder {uri}: {exc.strerror}") from exc


def remove_empty(uri: str) -> None:
    """Remove a local folder if it is empty (a run's emptied staging); object stores have no folders. A folder
    another process writes in meanwhile is not empty and stays."""
    if is_local(uri):
        with contextlib.suppress(OSError):
            os.rmdir(local_path(uri))


def open_read(uri: str) -> BinaryIO:
    return FileSystems.open(uri, compression_type=RAW)


def read_bytes(uri: str) -> bytes:
    with open_read(uri) as handle:
        return handle.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Readers see the old content or the new, never a part (see `_write`)."""
    _write(uri, [data])


def upload(local_file: str, uri: str) -> None:
    """Copy a local file to `uri` in blocks (segments can be large), as `write_bytes` does."""
    with open(local_file, "rb") as source:
        _write(uri, iter(lambda: source.read(BLOCK), b""))


def _write(uri: str, blocks: Iterable[bytes]) -> None:
    """A local file is written aside and renamed into place; an object-store upload only becomes visible once
    complete."""
    target = _partial(uri) if is_local(uri) else uri
    try:
        with FileSystems.create(target, compression_type=RAW) as handle:
            for block in blocks:
                handle.write(block)
        if target != uri:
            os.replace(local_path(target), local_path(uri))
    except BaseException:  # a full disk or an interrupt: no stray partial stays behind to fill the disk on retries
        if target != uri:
            with contextlib.suppress(OSError):
                os.unlink(local_path(target))
        raise


def download(uri: str, local_file: str) -> None:
    """Copy to a local file, streamed in blocks (segments can be large); the file appears whole or not at all."""
    with open_read(uri) as source:
        _write(local_file, iter(lambda: source.read(BLOCK), b""))


def _partial(uri: str) -> str:
    """Where a local file is written before its rename, named by host, process-id namespace and process. A writer
    killed outright (SIGKILL, a lost machine) cannot remove its own; the next write of the file removes those of
    writers that are gone among the processes it can see (its host's, in its namespace: containers sharing a
    hostname number their processes apart), so retries of a killed job do not pile them up."""
    mkdirs(parent(uri))
    prefix = f".{name(uri)}.partial-{_processes_seen()}-"
    with contextlib.suppress(OSError):
        for entry in os.scandir(local_path(parent(uri))):
            pid = entry.name[len(prefix) :] if entry.name.startswith(prefix) else ""
            if pid.isdigit() and not alive(int(pid)):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
    return join(parent(uri), f"{prefix}{os.getpid()}")


@functools.cache
def _processes_seen() -> str:
    """This host and its process-id namespace: the processes whose ids this one can look up."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:  # no /proc (not Linux): the host's one namespace
        namespace = 0
    return f"{socket.gethostname()}-{namespace}"


def rename(pairs: Iterable[tuple[str, str]]) -> None:
    """Move files (an atomic rename locally; copy then delete on object stores)."""
    pairs = list(pairs)
    if pairs:
        FileSystems.rename([s for s, _ in pairs], [d for _, d in pairs])


def exchange(a: str, b: str) -> bool:
    """Swap two local paths in one atomic step (Linux's renameat2 with RENAME_EXCHANGE), so no moment finds
    either missing; False where the system or the filesystem (NFS, say) cannot."""
    swap = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if swap is None:
        return False
    swap.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_cwd, rename_exchange = -100, 2
    if swap(at_cwd, os.fsencode(local_path(a)), at_cwd, os.fsencode(local_path(b)), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), a)


def delete(uris: Iterable[str]) -> None:
    """Delete files, or folders with everything under them; missing ones are skipped, as are files another process
    removes meanwhile (two runs may remove one killed run's leftovers at once)."""
    for uri in uris:
        if is_local(uri):
            path = local_path(uri)
            if os.path.isdir(path) and not os.path.islink(path):  # a link: itself, never what it points to
                shutil.rmtree(path, onerror=_unless_gone)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        else:
            FileSystems.delete([uri.rstrip("/") + "/", uri] if exists(uri) else [uri.rstrip("/") + "/"])


def _unless_gone(_: Any, path: str, exc_info: tuple[type[BaseException], BaseException, Any]) -> None:
    """rmtree's failure but a file gone meanwhile, naming its whole path (rmtree's own error, from a call relative to
    its folder, named the file alone)."""
    exc = exc_info[1]
    if isinstance(exc, FileNotFoundError):
        return
    if isinstance(exc, OSError) and exc.filename != path:
        raise type(exc)(exc.errno, exc.strerror, path) from exc
    raise exc


#: content_digest of a file that cannot be read: gone, or on a store that did not answer.
UNREADABLE = "unreadable"


def content_digest(uri: str) -> str:
    """What a file holds, byte for byte: a local file's SHA-256, read whole (about a second a GB on a 2-core machine);
    an object store's own checksum of the object (S3's ETag, GCS's CRC32C), which changes with its bytes and not
    with a copy of the same bytes (S3's does with an upload in parts of another size, or under SSE-KMS or SSE-C).
    UNREADABLE where the file cannot be read (the run then refuses it)."""
    try:
        if not is_local(uri):
            return f"{scheme(uri)}:{FileSystems.checksum(uri)}"
        return sha256_file(local_path(uri))
    except (OSError, BeamIOError):
        return UNREADABLE


def sha256_file(path: str | os.PathLike[str]) -> str:
    with open(path, "rb") as handle:
        return sha256_stream(handle)


def sha256_stream(handle: BinaryIO) -> str:
    """The SHA-256 of what is left to read from `handle`, read a MB at a time."""
    digest = hashlib.sha256()
    for block in iter(lambda: handle.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def parquet_rows(uri: str) -> int:
    with open_read(uri) as handle:
        return pq.ParquetFile(handle).metadata.num_rows


def parquet_batches(uri: str, columns: list[str], rows: int) -> Iterator[pa.Table]:
    """The file `rows` rows at a time, read on this thread as `read_parquet` reads: for files larger than memory
    should hold at once (build-db's staged hidden states, ~140 kB a row on SmolLM2)."""
    with open_read(uri) as handle:
        for batch in pq.ParquetFile(handle).iter_batches(batch_size=rows, columns=columns, use_threads=False):
            yield pa.Table.from_batches([batch])


def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    """The whole file, read on this thread. Not `pq.read_table`: on a Python file it pre-buffers through Arrow's
    I/O threads, and a buffer one of them frees while the interpreter shuts down aborts the process
    ("terminate called without an active exception", exit 134) after a run that had succeeded."""
    with open_read(uri) as handle:
        return pq.ParquetFile(handle).read(columns=columns, use_threads=False)
