"""One boto3 S3 client per set of settings in a process, for Beam's S3 filesystem.

Why: Beam's `S3FileSystem` builds a new `S3IO`, and with it a new boto3 session and client, for every operation (a
listing, an exists, a delete, each file opened). Building a client loads botocore's S3 service model, ~0.3-0.5 s of
CPU, so a run on S3 spent most of its driver time building clients: a 30-row build-db made ~60 of them. Beam's
per-operation wrapper keeps its own download state, so only the boto3 client underneath is shared (boto3's clients
are thread-safe; its sessions are not, so clients are made under a lock).
"""

from __future__ import annotations

import threading
from types import ModuleType, SimpleNamespace
from typing import Any


class _SharedClients:
    """Stands in for the `boto3` module inside Beam's client wrapper, which calls only
    `boto3.session.Session().client(**settings)`: the same settings get the same client."""

    def __init__(self, boto3: ModuleType) -> None:
        self._boto3 = boto3
        self._clients: dict[tuple[tuple[str, Any], ...], Any] = {}
        self._lock = threading.Lock()
        self.session = SimpleNamespace(Session=lambda: self)

    def client(self, **settings: Any) -> Any:
        key = tuple(sorted(settings.items()))
        with self._lock:
            if key not in self._clients:
                self._clients[key] = self._boto3.session.Session().client(**settings)
            return self._clients[key]


def share() -> None:
    """Make Beam's S3 filesystem in this process share its clients (once; nothing where the aws extra is missing)."""
    try:
        from apache_beam.io.aws.clients.s3 import boto3_client
    except ImportError:
        return
    if boto3_client.boto3 is not None and not isinstance(boto3_client.boto3, _SharedClients):
        boto3_client.boto3 = _SharedClients(boto3_client.boto3)
