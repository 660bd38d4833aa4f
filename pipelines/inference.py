"""RunInference over raee_ops/batches.py: the engine batches elements, shares each worker's loaded model and keeps
latency metrics; the handler runs a batch's work and counts rows out, rows rejected and exit layers.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa

from raee_ops.batches import BatchWork, Loaded, Outcome
from raee_ops.progress import NAMESPACE, exit_counter


def _beam_inference_base():
    """Beam's `base` imports its GPU ModelManager, which imports torch whenever torch is installed (the export
    extra); we never use it, so hide torch during that import to keep inference processes torch-free."""
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError, which base.py tolerates
    try:
        from apache_beam.ml.inference import base
    finally:
        if hide:
            del sys.modules["torch"]
    if base.resource is None and os.name == "posix":  # the same failed import also skipped `resource`
        base.resource = importlib.import_module("resource")
    return base


_base = _beam_inference_base()
ModelHandler, RunInference = _base.ModelHandler, _base.RunInference

#: Elements (small tables) per model call: up to 128 rows with inputs.ROWS_PER_ELEMENT = 16.
MAX_ELEMENTS_PER_BATCH = 8


class WorkHandler(ModelHandler[pa.Table, Outcome, Loaded]):
    """A thin shell: `load_model` and `run_inference` are the work's `load` and `run`; Beam's counters count what
    came out."""

    def __init__(self, work: BatchWork) -> None:
        super().__init__()
        self.work = work

    def load_model(self) -> Loaded:
        return self.work.load()

    def run_inference(
        self, batch: Sequence[pa.Table], model: Loaded, inference_args: dict[str, Any] | None = None
    ) -> Iterable[Outcome]:
        outcome = self.work.run(pa.concat_tables(batch), model)
        beam.metrics.Metrics.counter(NAMESPACE, "rows_rejected").inc(outcome.errors.num_rows)
        beam.metrics.Metrics.counter(NAMESPACE, "rows_out").inc(outcome.rows.num_rows)
        exits = self.work.exit_layers(outcome.rows)
        if exits is not None:
            for layer, count in zip(*np.unique(exits, return_counts=True), strict=True):
                beam.metrics.Metrics.counter(NAMESPACE, exit_counter(layer)).inc(int(count))
        return [outcome]

    def batch_elements_kwargs(self) -> dict[str, Any]:
        return {"min_batch_size": 1, "max_batch_size": MAX_ELEMENTS_PER_BATCH}

    def get_metrics_namespace(self) -> str:
        return NAMESPACE

    def get_num_bytes(self, batch: Sequence[pa.Table]) -> int:
        return sum(t.nbytes for t in batch)


def split_outcome(outcome: Outcome):
    yield outcome.rows
    yield beam.pvalue.TaggedOutput("errors", outcome.errors)


class Infer(beam.PTransform):
    """Valid tables -> (result tables, error tables): rejected rows with their reasons, never rows of a failed batch."""

    def __init__(self, work: BatchWork) -> None:
        super().__init__()
        self.handler = WorkHandler(work)

    def expand(self, tables):
        results = tables | "RunInference" >> RunInference(self.handler)
        split = results | "Split" >> beam.FlatMap(split_outcome).with_outputs("errors", main="rows")
        nonempty = split.errors | "NonEmptyErrors" >> beam.Filter(lambda t: t.num_rows > 0)
        return split.rows | "NonEmptyRows" >> beam.Filter(lambda t: t.num_rows > 0), nonempty
