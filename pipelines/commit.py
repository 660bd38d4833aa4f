"""Run-private staging and all-or-nothing publishing for the local filesystem, safe against kills and concurrent runs.

A run claims the place it writes (an output folder, a table's work folder) with an exclusive `flock` on that
directory: the kernel drops the lock when the process dies, however it dies, so a killed run never blocks the
next one, and a second live run is refused (`Busy`, exit 75) instead of mixing its files with the first's.
Under the claim, a run stages everything in `_temporary/<run id>/` (readers such as pyarrow datasets skip
`_`-prefixed names), publishes by renaming staged files into place, and writes the `_SUCCESS` marker last.
Whatever an earlier killed run left (staging, published files without a marker) is removed by the next run that
claims the place, which names what it removed.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raee_ops import logs
from raee_ops.errors import Busy, RaeeConfigError
from raee_ops.faults import fault_point

TEMPORARY = "_temporary"
SUCCESS = "_SUCCESS"


def new_run_id() -> str:
    """Sortable and unique across hosts and processes."""
    return time.strftime("%Y%m%dT%H%M%S") + f"-{socket.gethostname()}-{os.getpid()}"


def say(message: str) -> None:
    if not logs.quiet():
        print(message, file=sys.stderr, flush=True)


@contextmanager
def locked(directory: Path, what: str, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on `directory` (created if missing) for the block; refuse if another run holds it,
    or with `wait`, wait for it (for short critical sections)."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise Busy(f"another run is writing {what} ({directory}); retry when it has finished") from exc
            raise
        yield
    finally:
        os.close(fd)  # releases the lock


def remove_leftovers(paths: Sequence[Path], where: Path) -> None:
    if not paths:
        return
    for path in paths:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    names = ", ".join(sorted(p.name for p in paths))
    say(f"removed what an earlier, unfinished run left in {where}: {names}")


@dataclass(frozen=True)
class OutputClaim:
    """A claimed output folder: stage into `staging`, then `publish`."""

    folder: Path
    staging: Path
    patterns: tuple[str, ...]

    def publish(self, marker: dict[str, Any]) -> list[Path]:
        """Move the staged files matching `patterns` into the folder (pattern by pattern), then write `_SUCCESS`
        with `marker` and the published file names; returns the published paths."""
        published = []
        for pattern in self.patterns:
            for staged in sorted(self.staging.glob(pattern)):
                target = self.folder / staged.name
                os.replace(staged, target)
                published.append(target)
            fault_point(f"publish:{pattern}")
        marker = marker | {"files": [p.name for p in published]}
        write_atomically(self.folder / SUCCESS, json.dumps(marker, indent=1, sort_keys=True))
        return published


def write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    partial.write_text(text)
    os.replace(partial, path)


@contextmanager
def claim_output(folder: str | Path, patterns: Sequence[str], what: str) -> Iterator[OutputClaim]:
    """Claim an output folder for one run: refuse a folder that holds a complete output (`_SUCCESS`) or is being
    written by a live run; remove an unfinished run's leftovers; on exit remove this run's staging."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RaeeConfigError(f"{what} {folder} exists and is not a directory")
    with locked(folder, what):
        if (folder / SUCCESS).exists():
            raise RaeeConfigError(
                f"{folder} already holds a complete output ({SUCCESS} present); choose another {what} or delete it"
            )
        stale = [p for pattern in patterns for p in folder.glob(pattern)] + [folder / TEMPORARY]
        remove_leftovers([p for p in stale if p.exists()], folder)
        staging = folder / TEMPORARY / new_run_id()
        staging.mkdir(parents=True)
        try:
            yield OutputClaim(folder, staging, tuple(patterns))
        finally:
            shutil.rmtree(folder / TEMPORARY, ignore_errors=True)


@contextmanager
def claim_work_dir(work: Path, what: str) -> Iterator[Path]:
    """Claim a work folder that several runs share over time (a table's); yield this run's private staging
    directory inside it, removing earlier runs' staging first."""
    with locked(work, what):
        remove_leftovers([p for p in work.iterdir() if p.is_dir()], work)
        staging = work / new_run_id()
        staging.mkdir()
        try:
            yield staging
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def reclaim_siblings(pattern: str) -> None:
    """Remove directories matching `pattern` that no live run holds (a killed export's temporary folder):
    each run holds a lock on its own temporary directory for as long as it lives."""
    for path in map(Path, glob.glob(pattern)):
        try:
            with locked(path, "a temporary folder"):
                shutil.rmtree(path)
        except Busy:
            continue
        say(f"removed what an earlier, unfinished run left: {path}")
