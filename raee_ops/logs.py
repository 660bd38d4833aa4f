"""How much a command says: third-party noise (Beam's "apitools not found", Lance's Rust warnings) is hidden
unless asked for with -v, so an error is one `error:` line and a summary is the first thing a command prints.

Call `configure` before Beam or LanceDB are imported: Lance reads its log level from the environment once.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

#: Our own packages (all under raee_ops): their warnings show by default; everything else only from -v on.
OWN = ("raee_ops",)

_verbosity = 0
_stream: TextIO | None = None


def configure(verbosity: int) -> None:
    """-1 quiet (errors only), 0 default (our warnings), 1 info from everyone (-v), 2 debug (-vv)."""
    global _verbosity
    _verbosity = verbosity
    # Beam logs a failed worker's whole traceback at ERROR: by default the run's one `error:` line says it all
    third_party = {-1: logging.CRITICAL, 0: logging.CRITICAL, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    own = logging.ERROR if verbosity < 0 else min(third_party, logging.WARNING)
    os.environ.setdefault("LANCEDB_LOG", {-1: "error", 0: "error", 1: "info"}.get(verbosity, "debug"))
    if verbosity < 0 or (verbosity == 0 and not sys.stderr.isatty()):  # transformers' tqdm bars, in logs
        os.environ.setdefault("TQDM_DISABLE", "1")
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger().setLevel(third_party)
    for name in OWN:
        logging.getLogger(name).setLevel(own)
    for handler in logging.getLogger().handlers:  # Beam's worker sets the root level to INFO once it starts
        handler.addFilter(_Levels(own, third_party))


class _Levels(logging.Filter):
    """The levels `configure` set, kept where they are printed: whoever resets a logger's level later (Beam's SDK
    worker, in a local worker process) still prints nothing below them."""

    def __init__(self, own: int, third_party: int) -> None:
        super().__init__()
        self.own, self.third_party = own, third_party

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.name.split(".")[0] in OWN
        return record.levelno >= (self.own if ours else self.third_party)


def stream() -> TextIO:
    """Where this process's own lines go (progress, errors): stderr, the real one while `library_prints_hidden`."""
    return _stream if _stream is not None else sys.stderr


@contextmanager
def library_prints_hidden() -> Iterator[None]:
    """sys.stderr pointed away for the block, unless -v: Beam's SDK worker prints each failed bundle's traceback
    there, whatever the log level (its threads in this process under `--direct_running_mode multi_threading`, its
    processes under multi_processing: `raee_ops.pipelines.local_worker`). Our own lines (`stream`, and the logs
    `configure` set up) keep the real one."""
    global _stream
    if verbose() or _stream is not None:
        yield
        return
    _stream, sys.stderr = sys.stderr, open(os.devnull, "w")  # noqa: SIM115 - closed below
    try:
        yield
    finally:
        hidden, sys.stderr, _stream = sys.stderr, _stream, None
        hidden.close()


def verbosity() -> int:
    """What `configure` was given: worker processes a command starts are configured the same."""
    return _verbosity


def quiet() -> bool:
    """-q: print nothing but errors (the exit code tells the outcome)."""
    return _verbosity < 0


def verbose() -> bool:
    return _verbosity > 0
