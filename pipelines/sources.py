"""Parquet inputs: expand and check them on the driver (run-level errors before any work), then read and
validate them on workers as small Arrow tables, the elements every later step works on."""

from __future__ import annotations

import glob
from collections.abc import Iterator, Sequence

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq

from raee_ops.errors import RaeeConfigError
from raee_ops.rows import check_columns, validate
from raee_ops.tasks import Task
from schemas.manifest import Manifest

ERRORS = "errors"
#: Rows per element; RunInference then batches several elements into one model call.
ROWS_PER_ELEMENT = 16


def task_of(manifest: Manifest, name: str) -> Task:
    """The task as exported: the artifacts, not the preset list, are the source of truth."""
    entry = manifest.task(name)
    return Task(
        name=name,
        template=entry.template,
        label_names=list(entry.label_names),
        verbalizer=list(entry.verbalizer),
    )


def expand_inputs(patterns: Sequence[str]) -> list[str]:
    files = sorted({f for pattern in patterns for f in (glob.glob(pattern) or [])})
    if not files:
        raise RaeeConfigError(f"no Parquet files match {', '.join(patterns)}")
    return files


def check_inputs(files: Sequence[str], task: Task, need_label: bool) -> tuple[pa.Schema, int]:
    """Every file's columns (same schema across files) and the total row count, from footers only."""
    schema, rows = None, 0
    for path in files:
        try:
            meta = pq.ParquetFile(path).metadata
        except (OSError, pa.ArrowInvalid) as exc:
            raise RaeeConfigError(f"{path}: not a readable Parquet file ({exc})") from exc
        file_schema = meta.schema.to_arrow_schema().remove_metadata()
        check_columns(file_schema, task, need_label, path)
        if schema is not None and not file_schema.equals(schema):
            raise RaeeConfigError(f"{path}: schema differs from {files[0]}; inputs must share one schema")
        schema, rows = file_schema, rows + meta.num_rows
    return schema, rows


class ReadValidated(beam.DoFn):
    """A Parquet path -> valid rows as small tables (main output) and rejected rows (`errors` output)."""

    def __init__(self, task: Task, need_label: bool) -> None:
        self.task, self.need_label = task, need_label

    def process(self, path: str) -> Iterator[pa.Table | beam.pvalue.TaggedOutput]:
        first = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=ROWS_PER_ELEMENT):
            table = pa.Table.from_batches([batch]).replace_schema_metadata(None)
            checked = validate(table, self.task, source=path, need_label=self.need_label, first_row=first)
            first += table.num_rows
            if checked.valid.num_rows:
                yield checked.valid
            if checked.errors.num_rows:
                yield beam.pvalue.TaggedOutput(ERRORS, checked.errors)


def read_validated(pipeline: beam.Pipeline, files: Sequence[str], task: Task, need_label: bool):
    """(valid tables, error tables); valid tables are reshuffled so every worker gets a share."""
    read = (
        pipeline
        | "Files" >> beam.Create(list(files))
        | "ReadValidate" >> beam.ParDo(ReadValidated(task, need_label)).with_outputs(ERRORS, main="valid")
    )
    return read.valid | "Spread" >> beam.Reshuffle(), read[ERRORS]


def write_tables(pcoll, label: str, prefix: str, schema: pa.Schema):
    """Arrow tables to Parquet through Beam's file sink: temp files, renamed into place at finalize."""
    return pcoll | label >> beam.io.WriteToParquetBatched(prefix, schema=schema, file_name_suffix=".parquet")


def count_rows(pattern: str) -> tuple[int, list[str]]:
    files = sorted(glob.glob(pattern))
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files), files
