"""Progress of long work where it runs: one refreshing line on a terminal (done/total, rate, ETA) and the same
count as a Beam counter, which remote runners (Dataflow, Flink) show in their job metrics.

Nothing is written when the stream is not a terminal: scheduled jobs' logs stay as they were, and the counters
and each command's closing summary carry the numbers there.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TextIO

from raee_ops import logs

#: Beam counter namespace of every raee-ops counter (progress, rows out and rejected, exit layers).
NAMESPACE = "raee"
#: Prefix of the counters of rows that left at each layer (`exit_counter`), which classify checks its outputs against.
EXIT_COUNTER = "exit_layer_"


def exit_counter(layer: int) -> str:
    """The Beam counter of the rows that left at `layer` (0: answered without running one)."""
    return f"{EXIT_COUNTER}{int(layer):03d}"


def counter_layer(name: str) -> int | None:
    """The layer an `exit_counter` name counts; None for another counter."""
    return int(name.removeprefix(EXIT_COUNTER)) if name.startswith(EXIT_COUNTER) else None


#: Seconds between two redraws of a progress line.
REFRESH_SECONDS = 0.5
#: Seconds between two lines of a worker's progress.
PROGRESS_SECONDS = 10.0


def interactive(stream: TextIO) -> bool:
    """Whether a person is watching: the stream is a terminal, and the command was not told -q."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and not logs.quiet()


def clock(seconds: float) -> str:
    """Tenths of a second under a minute, else H:MM:SS."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class Progress:
    """Work counted in units (rows, segments): `advance` as units finish; the line ends itself at `total`.

    `counter` names a Beam counter in NAMESPACE that every `advance` also increments (a no-op outside a Beam
    worker), so a remote run reports the same number in its metrics.
    """

    def __init__(
        self, label: str, total: int, unit: str = "rows", counter: str | None = None, stream: TextIO | None = None
    ) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.stream = stream if stream is not None else logs.stream()
        self.show = interactive(self.stream)
        self.counter = None
        if counter:
            from apache_beam.metrics import Metrics

            self.counter = Metrics.counter(NAMESPACE, counter)
        self.done = 0
        self.started = time.perf_counter()
        self.drawn = float("-inf")  # the first unit is drawn at once
        self.open = False

    def line(self) -> str:
        """`label: done/total unit, rate unit/s, ETA ...`: no ETA before the first unit, time taken after the last."""
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        rate = self.done / elapsed
        text = f"{self.label}: {self.done}/{self.total} {self.unit}, {rate:.1f} {self.unit}/s"
        if self.done >= self.total:
            return f"{text}, done in {clock(elapsed)}"
        return f"{text}, ETA {clock((self.total - self.done) / rate)}" if self.done else text

    def advance(self, units: int = 1) -> None:
        self.done += units
        if self.counter is not None:
            self.counter.inc(units)
        now = time.perf_counter()
        if self.show and (now - self.drawn >= REFRESH_SECONDS or self.done >= self.total):
            self.drawn = now
            self.stream.write("\r\033[K" + self.line())
            self.open = True
            if self.done >= self.total:
                self.close()
            self.stream.flush()

    def close(self) -> None:
        """End the line (a worker that got only part of the total ends its own)."""
        if self.open:
            self.stream.write("\n")
            self.stream.flush()
            self.open = False


@dataclass
class WorkerProgress:
    """Rows this worker has finished, a line of its own every PROGRESS_SECONDS so long runs show they move. Not
    `Progress`: a worker knows no total, and several share one terminal."""

    rows: int = 0
    started: float = field(default_factory=time.perf_counter)
    shown: float = 0.0

    def add(self, rows: int, what: str) -> None:
        self.rows += rows
        now = time.perf_counter()
        if now - self.shown >= PROGRESS_SECONDS and interactive(logs.stream()):  # logs get the summary instead
            self.shown = now
            rate = self.rows / max(now - self.started, 1e-9)
            print(  # over a refreshing progress line of the same process (evaluate's), which redraws below it
                f"\r\033[K  {what}: {self.rows} rows done by worker {os.getpid()} ({rate:.1f} rows/s)",
                file=logs.stream(),
                flush=True,
            )


@contextmanager
def phase(label: str, stream: TextIO | None = None) -> Iterator[None]:
    """A driver step without units (a LanceDB commit, an index build, a fit): its name while it runs, then how
    long it took, or that it failed."""
    stream = stream if stream is not None else logs.stream()
    if not interactive(stream):
        yield
        return
    stream.write(f"{label} ...")
    stream.flush()
    started, outcome = time.perf_counter(), "failed"
    try:
        yield
        outcome = "done"
    finally:
        stream.write(f"\r\033[K{label}: {outcome} in {clock(time.perf_counter() - started)}\n")
        stream.flush()
