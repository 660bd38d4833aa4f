"""One boto3 S3 client per set of settings in a process, for Beam's S3 filesystem, and a watch on whether the store
still answers.

Why one client: Beam's `S3FileSystem` builds a new `S3IO`, and with it a new boto3 session and client, for every
operation (a listing, an exists, a delete, each file opened). Building a client loads botocore's S3 service model,
~0.3-0.5 s of CPU, so a run on S3 spent most of its driver time building clients: a 30-row build-db made ~60 of them.
Beam's per-operation wrapper keeps its own download state, so only the boto3 client underneath is shared (boto3's
clients are thread-safe; its sessions are not, so clients are made under a lock).

Why the watch: a store that stops answering mid-run (a partition, a dead endpoint that still accepts connections)
is retried by botocore (60 s timeouts, several attempts) under Beam's own seven retries with backoff, so a run hung
for half an hour or more before it failed, and then hung again removing its staging. Every call through the shared
clients is timed; `silent_for` says how long calls have gone unanswered, and `watch` gives up on the run once that
passes a limit (the CLI ends it with exit 75: a kill, which loses nothing; the next run removes what it staged).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType, SimpleNamespace
from typing import Any

from raee_ops.errors import first_line


class _Health:
    """What this process's S3 calls saw: when the store last answered (a reply of any kind but a server error), and
    the calls since that got none, still waiting or failed without one (no connection, a timeout, a 5xx)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._answered = time.monotonic()
        self._waiting: dict[int, tuple[float, str]] = {}  # by call: its start and endpoint
        self._unanswered_since: float | None = None
        self._tokens = itertools.count()
        self.where, self.problem = "", ""

    def begin(self, where: str) -> tuple[int, float]:
        token, start = next(self._tokens), time.monotonic()
        with self._lock:
            self._waiting[token] = start, where
        return token, start

    def end(self, token: int, start: float, answered: bool | None, problem: str = "") -> None:
        """`answered`: None for a failure that says nothing about the store (bad arguments, no credentials)."""
        with self._lock:
            _, where = self._waiting.pop(token)
            if answered:
                self._answered, self._unanswered_since = time.monotonic(), None
            elif answered is False:
                since = self._unanswered_since
                self._unanswered_since = start if since is None else min(since, start)
                self.where, self.problem = where, problem

    def silent_for(self) -> float:
        """Seconds since the store last answered, counted from the oldest call still without an answer (0: none)."""
        with self._lock:
            starts = [start for start, _ in self._waiting.values()]
            starts += [self._unanswered_since] if self._unanswered_since is not None else []
            return time.monotonic() - max(self._answered, min(starts)) if starts else 0.0

    def silence(self) -> str:
        """The store that went silent and the last thing its calls said, for the line that ends the run."""
        with self._lock:
            waiting = sorted(self._waiting.values())
            where = self.where or (waiting[0][1] if waiting else "")
            return f"at {where or 'AWS'} ({first_line(self.problem) if self.problem else 'no reply yet'})"


health = _Health()

#: boto3's managed transfers (Beam's copy is one): their inner calls go to the client underneath, untimed.
_TRANSFERS = {"copy", "upload_file", "upload_fileobj", "download_file", "download_fileobj"}


@contextmanager
def waiting_on(where: str) -> Iterator[None]:
    """A call to a store made through another client (LanceDB's own, for a database's listing and opening), timed
    as the S3 calls are, so the watch sees it wait: an answer counts as one, a failure says nothing."""
    seen = health  # the one its end is reported to
    token, start = seen.begin(where)
    answered: bool | None = None
    try:
        yield
        answered = True
    finally:
        seen.end(token, start, answered)


def _no_answer(exc: Exception) -> bool | None:
    """Whether a failed call got no answer from the store (True), got one (False), or says nothing of it (None)."""
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

    if isinstance(exc, ClientError):
        return (exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0) >= 500
    if isinstance(exc, ConnectionError | HTTPClientError):  # no connection, a timeout, a connection cut
        return True
    return None


class _Timed:
    """A boto3 client whose API calls report to `health`."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self._operations = set(client.meta.method_to_api_mapping) | _TRANSFERS
        self._where = client.meta.endpoint_url

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if name not in self._operations:
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            seen = health  # the one its end is reported to
            token, start = seen.begin(self._where)
            try:
                result = attribute(*args, **kwargs)
            except Exception as exc:
                silent = _no_answer(exc)
                seen.end(token, start, None if silent is None else not silent, f"{type(exc).__name__}: {exc}")
                if getattr(exc, "response", {}) is None:  # a timeout's: Beam's wrapper reads response.get(...)
                    exc.response = {}  # and, failing on None, said "'NoneType' object has no attribute 'get'"
                raise
            seen.end(token, start, True)
            return result

        return call


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
                self._clients[key] = _Timed(self._boto3.session.Session().client(**settings))
            return self._clients[key]


def share() -> None:
    """Make Beam's S3 filesystem in this process share its clients (once; nothing where the aws extra is missing)."""
    try:
        from apache_beam.io.aws.clients.s3 import boto3_client
    except ImportError:
        return
    if boto3_client.boto3 is not None and not isinstance(boto3_client.boto3, _SharedClients):
        boto3_client.boto3 = _SharedClients(boto3_client.boto3)


def watch(patience_s: float, give_up: Callable[[str], None]) -> None:
    """From a daemon thread: call `give_up(line)` once this process's S3 calls have gone `patience_s` seconds
    without an answer."""

    def run() -> None:
        while True:
            time.sleep(min(5.0, patience_s / 10))
            silent = health.silent_for()
            if silent >= patience_s:
                give_up(
                    f"the object store {health.silence()} has not answered for {silent:.0f} s "
                    f"(--raee_store_patience {patience_s:g}): the run stops; the next one removes what it staged "
                    "(retry later)"
                )
                return

    threading.Thread(target=run, name="raee-store-watch", daemon=True).start()
