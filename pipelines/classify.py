"""classify: Parquet rows -> retrieve neighbours' exit information -> run each row to its exit layer.

Outputs go through Beam's file sinks (temp files renamed at finalize), so `predictions-*.parquet` and
`errors-*.parquet` appear complete or not at all. An output directory that already holds either is refused
(pick a new directory or delete the old files): replacing in place could mix two runs' shards.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.metrics.metric import MetricsFilter

from pipelines.inference import NAMESPACE, ClassifyHandler, Infer
from pipelines.options import make_pipeline
from pipelines.sources import check_inputs, count_rows, expand_inputs, read_validated, task_of, write_tables
from raee_ops.errors import RaeeConfigError
from raee_ops.exit_policy import resolve
from raee_ops.readout import describe
from raee_ops.retrieval import (
    check_meta,
    check_table_probes,
    expected_meta,
    open_table,
    table_policy,
    table_probe_policy,
)
from schemas.manifest import load_manifest
from schemas.tables import ERRORS_SCHEMA, PREDICTION_FIELDS, TableMeta


@dataclass(frozen=True)
class ClassifySummary:
    strategy: str
    settings: str
    num_layers: int
    rows_in: int
    predicted: int
    rejected: int
    exit_counts: dict[int, int]
    output_dir: str
    beam_exit_counts: dict[int, int] | None = field(default=None)

    @property
    def mean_exit(self) -> float:
        total = sum(self.exit_counts.values())
        return sum(layer * n for layer, n in self.exit_counts.items()) / total if total else float("nan")

    def render(self) -> str:
        balance = "ok" if self.rows_in == self.predicted + self.rejected else "MISMATCH"
        exits = " ".join(f"{layer}:{n}" for layer, n in sorted(self.exit_counts.items())) or "-"
        if self.beam_exit_counts is None:
            counters = "not reported by this runner"
        else:
            counters = "agree" if self.beam_exit_counts == self.exit_counts else f"DIFFER {self.beam_exit_counts}"
        return "\n".join(
            [
                f"classify with {self.strategy} ({self.settings}; {self.num_layers} layers)",
                f"rows in: {self.rows_in}  predicted: {self.predicted}  rejected: {self.rejected}  "
                f"(in = predicted + rejected: {balance})",
                f"mean exit layer: {self.mean_exit:.2f} of {self.num_layers}",
                f"exits per layer (0: retrieval alone, no layer run): {exits}",
                f"beam exit counters: {counters}",
                f"outputs: {self.output_dir}",
            ]
        )


def refuse_existing_outputs(output_dir: str) -> None:
    old = glob.glob(os.path.join(output_dir, "predictions-*")) + glob.glob(os.path.join(output_dir, "errors-*"))
    if old:
        raise RaeeConfigError(f"{output_dir} already holds classify outputs; remove them or choose another --output")


def exit_counts_from_files(files: list[str]) -> dict[int, int]:
    if not files:
        return {}
    exits = pa.concat_arrays([pq.read_table(f, columns=["exit_layer"]).column(0).combine_chunks() for f in files])
    counts = pc.value_counts(exits)
    return {int(v["values"]): int(v["counts"]) for v in counts.to_pylist()}


def beam_exit_counts(result) -> dict[int, int] | None:
    try:
        counters = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]
    except (NotImplementedError, KeyError, AttributeError):
        return None
    exits = {}
    for c in counters:
        if c.key.metric.name.startswith("exit_layer_"):
            layer = int(c.key.metric.name.rsplit("_", 1)[1])
            exits[layer] = exits.get(layer, 0) + int(c.committed if c.committed is not None else c.attempted)
    return exits if counters else None  # a runner that reports no counters at all cannot be compared


def run_classify(
    artifacts,
    task_name: str,
    db_uri: str,
    table: str,
    input_glob: str,
    output_dir: str,
    k: int,
    strategy: str | None,
    beam_args: list[str] | tuple[str, ...] = (),
) -> ClassifySummary:
    manifest = load_manifest(artifacts)
    task = task_of(manifest, task_name)
    chosen = resolve(strategy, manifest.num_layers)
    strategy = chosen.name
    if k < 1:
        raise RaeeConfigError(f"--k must be at least 1, got {k}")
    table_schema = open_table(db_uri, table).schema
    meta = TableMeta.decode(table_schema)
    embedder = meta.embedder if meta else "backbone"
    if embedder != "backbone" and embedder not in manifest.embedders:
        raise RaeeConfigError(f"table {table!r} was keyed with embedder {embedder!r}, not in {artifacts}")
    expected = expected_meta(manifest, task_name, embedder)
    check_meta(meta, expected, f"table {table!r} in {db_uri}")
    check_table_probes(open_table(db_uri, table), expected, chosen.needs_probes(), f"table {table!r} in {db_uri}")
    policy = table_policy(table_schema)
    if chosen.needs_policy and policy is None:
        raise RaeeConfigError(f"strategy {strategy!r} needs a fitted policy; rebuild table {table!r} with build-db")
    settings = describe(chosen, policy, table_probe_policy(table_schema), k)
    files = expand_inputs([input_glob])
    schema, rows_in = check_inputs(files, task, need_label=False)
    clash = [f.name for f in PREDICTION_FIELDS if f.name in schema.names]
    if clash:
        raise RaeeConfigError(f"input already has column(s) {', '.join(clash)} that classify adds")
    refuse_existing_outputs(output_dir)
    os.makedirs(output_dir, exist_ok=True)

    output_schema = pa.schema(list(schema) + PREDICTION_FIELDS)
    handler = ClassifyHandler(str(artifacts), task, embedder, db_uri, table, k, strategy, output_schema)
    pipeline = make_pipeline(beam_args)
    valid, invalid = read_validated(pipeline, files, task, need_label=False)
    rows, failed = valid | "Infer" >> Infer(handler)
    write_tables(rows, "WritePredictions", os.path.join(output_dir, "predictions"), output_schema)
    errors = (invalid, failed) | "Errors" >> beam.Flatten()
    write_tables(errors, "WriteErrors", os.path.join(output_dir, "errors"), ERRORS_SCHEMA)
    result = pipeline.run()
    if result.wait_until_finish() != "DONE":
        raise RuntimeError(f"classify pipeline ended in state {result.state}")

    predicted, prediction_files = count_rows(os.path.join(output_dir, "predictions-*.parquet"))
    rejected, _ = count_rows(os.path.join(output_dir, "errors-*.parquet"))
    return ClassifySummary(
        strategy,
        settings,
        manifest.num_layers,
        rows_in,
        predicted,
        rejected,
        exit_counts_from_files(prediction_files),
        output_dir,
        beam_exit_counts(result),
    )
