"""Artifacts where a worker can run them: a local artifacts directory is used as it is; one on an object store
is fetched into a worker-local cache before any ONNX Runtime session is made.

The cache folder is keyed by the manifest's fingerprint and its own digest, so artifacts that differ never share
files; each file is downloaded beside its final name and renamed into place (worker processes on one machine
may fetch at once), and checked against the manifest's sha256 once per process. manifest.json is written last:
a cache folder with a manifest is complete. The cache lives in RAEE_CACHE_DIR, else the system temp folder.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

from raee_ops import storage
from raee_ops.errors import ArtifactError, ArtifactsChanged, first_line
from raee_ops.schemas.manifest import MANIFEST_NAME, check_file, parse_manifest

CACHE_ENV = "RAEE_CACHE_DIR"
log = logging.getLogger(__name__)


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "raee-cache")


def local_artifacts(uri: str) -> Path:
    """A local directory holding the artifacts at `uri`, every file checked against the manifest."""
    if storage.is_local(uri):
        return Path(storage.local_path(uri))
    raw = storage.read_bytes(storage.join(uri, MANIFEST_NAME))
    manifest = parse_manifest(raw.decode(), storage.join(uri, MANIFEST_NAME))
    target = cache_root() / f"{manifest.fingerprint[:16]}-{hashlib.sha256(raw).hexdigest()[:16]}"
    target.mkdir(parents=True, exist_ok=True)
    for ref in manifest.file_refs():
        local = target / ref.file
        if local.is_file():
            try:
                check_file(local, ref.sha256)
                continue
            except ArtifactError:  # a damaged cache entry: fetch it again
                log.warning("cached %s does not match its manifest; fetching it again", local)
        storage.download(storage.join(uri, ref.file), str(local))
        try:
            check_file(local, ref.sha256)
        except ArtifactError as exc:
            if storage.read_bytes(storage.join(uri, MANIFEST_NAME)) != raw:  # republished while this worker fetched
                raise ArtifactsChanged(
                    f"the artifacts at {uri} were replaced while this worker fetched them ({first_line(exc)}): "
                    "run again once the new export is in place"
                ) from exc
            raise
    if not (target / MANIFEST_NAME).is_file():
        storage.write_bytes(str(target / MANIFEST_NAME), raw)
    return target
