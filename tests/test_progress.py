"""Progress lines: shown on a terminal, silent otherwise, and counted as Beam counters in workers."""

import io
import os
import tempfile

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pytest
from apache_beam.metrics.metric import MetricsFilter
from raee_ops.pipelines.inference import Infer
from raee_ops.pipelines.options import make_pipeline

from raee_ops import progress
from raee_ops.batches import BatchWork, Outcome
from raee_ops.progress import NAMESPACE, Progress, clock, phase


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_quiet_when_the_stream_is_not_a_terminal():
    stream = io.StringIO()
    bar = Progress("evaluate", 3, stream=stream)
    for _ in range(3):
        bar.advance()
    bar.close()
    with phase("build-db: committing", stream=stream):
        pass
    assert stream.getvalue() == ""


def test_a_terminal_sees_done_total_rate_eta_and_the_end(monkeypatch):
    monkeypatch.setattr(progress, "REFRESH_SECONDS", 0.0)
    stream = Terminal()
    bar = Progress("export-onnx", 4, "segments", stream=stream)
    bar.advance()
    assert "export-onnx: 1/4 segments, " in stream.getvalue() and " segments/s, ETA " in stream.getvalue()
    bar.advance(3)
    last = stream.getvalue().split("\r\033[K")[-1]
    assert last.startswith("export-onnx: 4/4 segments, ") and ", done in " in last and last.endswith("s\n")
    bar.close()  # already ended at the total: no second newline
    assert stream.getvalue().count("\n") == 1


def test_redraws_are_throttled(monkeypatch):
    monkeypatch.setattr(progress, "REFRESH_SECONDS", 3600.0)
    stream = Terminal()
    bar = Progress("evaluate", 100, stream=stream)
    for _ in range(99):
        bar.advance()
    assert stream.getvalue().count("evaluate:") == 1  # the first line only, until the total
    bar.advance()
    assert stream.getvalue().count("evaluate:") == 2 and "100/100 rows" in stream.getvalue()


def test_phase_on_a_terminal_says_when_it_ends_or_fails():
    stream = Terminal()
    with phase("build-db: committing 30 rows to LanceDB", stream=stream):
        assert stream.getvalue() == "build-db: committing 30 rows to LanceDB ..."
    assert stream.getvalue().endswith("\r\033[Kbuild-db: committing 30 rows to LanceDB: done in 0.0s\n")
    failed = Terminal()
    with pytest.raises(OSError), phase("build-db: fitting", stream=failed):
        raise OSError("disk full")
    assert "build-db: fitting: failed in " in failed.getvalue()


def test_a_real_pseudo_terminal_counts_as_a_terminal():
    leader, follower = os.openpty()
    with os.fdopen(follower, "w") as tty:
        bar = Progress("evaluate", 2, stream=tty)
        bar.advance(2)
    shown = os.read(leader, 4096).decode()
    os.close(leader)
    assert "evaluate: 2/2 rows" in shown


def test_clock():
    assert (clock(4.24), clock(75), clock(3 * 3600 + 61)) == ("4.2s", "0:01:15", "3:01:01")


class Units(beam.DoFn):
    def setup(self) -> None:
        self.progress = Progress("units", 5, "units", counter="units_done")

    def process(self, element: int):
        self.progress.advance(element)
        yield element


def test_workers_count_the_same_units_as_beam_counters(monkeypatch, tmp_path):
    """...and leave no folder in the temporary folder: Beam made one per pipeline, removed only once run() ended
    (every run killed, or refused before its run, left one)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    pipeline = make_pipeline([])
    assert not list(tmp_path.iterdir())
    _ = pipeline | beam.Create([1, 2, 2]) | beam.ParDo(Units())
    result = pipeline.run()
    result.wait_until_finish()
    counters = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE).with_name("units_done"))["counters"]
    assert sum(c.committed for c in counters) == 5


class Exits(BatchWork):
    """Each row answered at the exit layer its text names, and one row rejected per batch: no model."""

    def __init__(self) -> None:  # no artifacts: `run` stands in for the model
        pass

    def load(self) -> None:
        return None

    def run(self, table: pa.Table, model: None) -> Outcome:
        exits = pa.array([int(text) for text in table.column("text").to_pylist()], pa.int32())
        return Outcome(pa.table({"exit_layer": exits}), pa.table({"reason": ["bad"]}))

    def exit_layers(self, rows: pa.Table) -> np.ndarray:
        return rows.column("exit_layer").to_numpy()


def test_the_handler_counts_rows_out_rows_rejected_and_exit_layers():
    """The counters a remote runner's job page shows come from the engine's handler, around the work's own run."""
    pipeline = make_pipeline([])
    _ = pipeline | beam.Create([pa.table({"text": ["0", "2", "2"]})]) | Infer(Exits())
    result = pipeline.run()
    result.wait_until_finish()
    counters = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]
    ours = {c.key.metric.name: c.committed for c in counters if c.key.metric.name.startswith(("rows_", "exit_"))}
    assert ours == {"rows_out": 3, "rows_rejected": 1, "exit_layer_000": 1, "exit_layer_002": 2}


def test_a_workers_line_in_the_same_process_clears_the_progress_line_first(monkeypatch):
    """evaluate runs its workers in-process: their "rows done" line was printed into the middle of its progress
    line (`evaluate: 128/150 rows, … ETA 2.9s  evaluate: 150 rows done by worker …`)."""

    from raee_ops import logs

    monkeypatch.setattr(progress, "REFRESH_SECONDS", 0.0)
    stream = Terminal()
    monkeypatch.setattr(logs, "stream", lambda: stream)
    Progress("evaluate", 150, stream=stream).advance(128)
    progress.WorkerProgress(shown=float("-inf")).add(150, "evaluate")
    first, worker = stream.getvalue().split("\n")[0].split("\r\033[K")[-2:]
    assert first.startswith("evaluate: 128/150 rows") and worker.startswith("  evaluate: 150 rows done by worker")
