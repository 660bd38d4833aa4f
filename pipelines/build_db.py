"""build-db: labelled Parquet -> exit information for every row -> one LanceDB commit.

Workers write exit rows as Parquet shards into a staging directory (Beam file sink, complete or absent);
the driver then checks conservation (rows in = written + rejected) and commits all shards to LanceDB at once,
so a failed run leaves the table as it was. Staging is a local temporary directory: workers must share the
driver's filesystem (DirectRunner, PortableRunner with LOOPBACK).
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import apache_beam as beam
import lancedb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.inference import BuildHandler, Infer
from pipelines.options import make_pipeline
from pipelines.reference import assemble
from pipelines.sources import check_inputs, count_rows, expand_inputs, read_validated, task_of, write_tables
from raee_ops.calibration import FusedPolicy
from raee_ops.errors import RaeeConfigError
from raee_ops.retrieval import build_index, check_meta, expected_meta, index_partitions, open_table, table_meta
from raee_ops.rows import row_ids
from schemas.manifest import load_manifest
from schemas.tables import ERRORS_SCHEMA, FEATURES_SUFFIX, ID


@dataclass(frozen=True)
class BuildSummary:
    table: str
    mode: str
    rows_in: int
    written: int
    rejected: int
    table_rows: int
    errors_dir: str
    policy: FusedPolicy | None = None
    search: str = "exact search"
    probes: list[str] = field(default_factory=list)

    def render(self) -> str:
        balance = "ok" if self.rows_in == self.written + self.rejected else "MISMATCH"
        p = self.policy
        fitted = (
            f"fused policy (leave-one-out on {p.loo_queries} rows, {p.metric}): {p.settings()}; "
            f"LOO {p.metric} {p.loo_metric:.3f}, mean exit layer {p.loo_mean_exit:.2f}"
            if p
            else "fused policy: none (fewer than 2 rows)"
        )
        return "\n".join(
            [
                f"build-db {self.table} ({self.mode})",
                f"rows in: {self.rows_in}  written: {self.written}  rejected: {self.rejected}  "
                f"(in = written + rejected: {balance})",
                f"table rows: {self.table_rows} ({self.search})",
                fitted,
                *self.probes,
                f"errors: {self.errors_dir}",
            ]
        )


def default_errors_dir(db_uri: str, table: str) -> str:
    if "://" in db_uri and not db_uri.startswith("file://"):
        raise RaeeConfigError(f"--errors is required when --db is not a local directory ({db_uri})")
    return str(Path(db_uri.removeprefix("file://")) / "_errors" / table)


def input_ids(files: list[str]) -> pa.Array:
    """The ids rows will get (id column, else positions), read on the driver for append's check."""
    ids = []
    for path in files:
        has_id = ID in pq.ParquetFile(path).schema_arrow.names
        table = (
            pq.read_table(path, columns=[ID]) if has_id else pa.table({"_": pa.nulls(pq.read_metadata(path).num_rows)})
        )
        ids.append(row_ids(table, path, 0))
    return pa.concat_arrays(ids)


def refuse_duplicates(db_uri: str, table: str, files: list[str]) -> None:
    present = open_table(db_uri, table).to_arrow().column(ID)
    ids = input_ids(files)
    clash = ids.filter(pc.is_in(ids, value_set=present.combine_chunks()))
    if len(clash):
        shown = ", ".join(clash.to_pylist()[:5])
        raise RaeeConfigError(f"append refused: {len(clash)} id(s) already in table {table!r} (e.g. {shown})")


def run_build_db(
    artifacts: Path,
    task_name: str,
    inputs: list[str],
    db_uri: str,
    table: str,
    embedder: str,
    mode: str,
    errors_dir: str | None,
    beam_args: list[str] | tuple[str, ...] = (),
) -> BuildSummary:
    manifest = load_manifest(artifacts)
    task = task_of(manifest, task_name)
    if embedder != "backbone" and embedder not in manifest.embedders:
        raise RaeeConfigError(f"embedder {embedder!r} was not exported into {artifacts}")
    files = expand_inputs(inputs)
    _, rows_in = check_inputs(files, task, need_label=True)
    meta = expected_meta(manifest, task_name, embedder)
    if mode == "append":
        check_meta(table_meta(db_uri, table), meta, f"table {table!r} in {db_uri}")
        refuse_duplicates(db_uri, table, files)
    errors_dir = errors_dir or default_errors_dir(db_uri, table)
    os.makedirs(errors_dir, exist_ok=True)
    run_id = time.strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}"
    errors_prefix = os.path.join(errors_dir, f"errors-{run_id}")
    staging = tempfile.mkdtemp(prefix="raee-staging-")
    try:
        handler = BuildHandler(str(artifacts), task, embedder)
        schema = handler.schema(manifest)
        pipeline = make_pipeline(beam_args)
        valid, invalid = read_validated(pipeline, files, task, need_label=True)
        rows, failed = valid | "Infer" >> Infer(handler)
        write_tables(rows, "WriteStaging", os.path.join(staging, "rows"), schema)
        errors = (invalid, failed) | "Errors" >> beam.Flatten()
        write_tables(errors, "WriteErrors", errors_prefix, ERRORS_SCHEMA)
        result = pipeline.run()
        if result.wait_until_finish() != "DONE":
            raise RuntimeError(f"build-db pipeline ended in state {result.state}")
        written, shards = count_rows(os.path.join(staging, "rows*.parquet"))
        rejected, _ = count_rows(errors_prefix + "*.parquet")
        if rows_in != written + rejected:
            raise RuntimeError(f"rows in {rows_in} != written {written} + rejected {rejected}: not committing")
        previous = previous_rows(db_uri, table) if mode == "append" else (None, None)
        reference = assemble(shards, schema, task, meta, manifest.hidden_size, *previous)
        table_rows, indexed = commit(db_uri, table, reference.data, reference.features)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if mode == "overwrite":
        for old in glob.glob(os.path.join(errors_dir, "errors-*.parquet")):
            if not old.startswith(errors_prefix):
                os.remove(old)
    search = f"IVF_FLAT index, {index_partitions(table_rows)} partitions" if indexed else "exact search"
    return BuildSummary(
        table, mode, rows_in, written, rejected, table_rows, errors_dir, reference.policy, search, reference.render()
    )


def previous_rows(db_uri: str, name: str) -> tuple[pa.Table, pa.Table | None]:
    """What append builds on: the table's rows and its probes' feature rows (None for tables built without)."""
    try:
        features = open_table(db_uri, name + FEATURES_SUFFIX).to_arrow()
    except RaeeConfigError:
        features = None
    return open_table(db_uri, name).to_arrow(), features


def commit(db_uri: str, name: str, data: pa.Table, features: pa.Table | None = None) -> tuple[int, bool]:
    """The run's table write, a whole new table version; a large table then gets its ANN index (a second version:
    until it lands, searches scan exactly, so a failed index build leaves a correct table). (rows, indexed).
    The probes' feature rows are written first: the exit table never refers to feature rows that are not there
    (a run failing in between leaves extra feature rows, which append ignores)."""
    db = lancedb.connect(db_uri)
    if features is not None:
        db.create_table(name + FEATURES_SUFFIX, features, schema=features.schema, mode="overwrite")
    table = db.create_table(name, data, schema=data.schema, mode="overwrite")
    indexed = build_index(table)
    return table.count_rows(), indexed
