"""Parquet inputs in a pipeline: files read and validated on workers (raee_ops/inputs.py), and Arrow tables
written through Beam's file sink.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import apache_beam as beam
import pyarrow as pa

from raee_ops import storage
from raee_ops.inputs import read_validated_file
from raee_ops.tasks import Task

ERRORS = "errors"


class ReadValidated(beam.DoFn):
    """A Parquet path -> valid rows as small tables (main output) and rejected rows (`errors` output); `contents`:
    each path's content digest when the run began (commit.Job.contents), which the file must still hold."""

    def __init__(
        self, task: Task, need_label: bool, schema: pa.Schema, contents: dict[str, str], filesystem: dict[str, Any]
    ) -> None:
        self.task, self.need_label, self.schema, self.filesystem = task, need_label, schema, filesystem
        self.contents = contents

    def setup(self) -> None:
        storage.on_worker(self.filesystem)

    def process(self, path: str) -> Iterator[pa.Table | beam.pvalue.TaggedOutput[Literal["errors"], pa.Table]]:
        for checked in read_validated_file(path, self.task, self.need_label, self.contents[path], self.schema):
            if checked.valid.num_rows:
                yield checked.valid
            if checked.errors.num_rows:
                yield beam.pvalue.TaggedOutput(ERRORS, checked.errors)


def read_validated(pipeline: beam.Pipeline, contents: dict[str, str], task: Task, need_label: bool, schema: pa.Schema):
    """(valid tables, error tables) of the files `contents` names (path: content digest) read in their common
    `schema` (check_inputs); valid tables are reshuffled so every worker gets a share."""
    reader = ReadValidated(task, need_label, schema, contents, storage.carry(pipeline.options))
    read = (
        pipeline
        | "Files" >> beam.Create(list(contents))
        | "ReadValidate" >> beam.ParDo(reader).with_outputs(ERRORS, main="valid")
    )
    return read.valid | "Spread" >> beam.Reshuffle(), read[ERRORS]


def first_shard(prefix: str) -> str:
    """The name of the first file write_tables writes under `prefix` (Beam's shard template)."""
    return f"{prefix}-00000-of-00001.parquet"


def write_tables(pcoll, label: str, prefix: str, schema: pa.Schema):
    """Arrow tables to Parquet through Beam's file sink: temp files, renamed into place at finalize."""
    return pcoll | label >> beam.io.WriteToParquetBatched(prefix, schema=schema, file_name_suffix=".parquet")
