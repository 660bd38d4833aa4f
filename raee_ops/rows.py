"""Arrow-level input validation: split a table into rows the model can take and rejected rows with a reason.

Row-level problems (null/blank text, missing pair, bad label, a text column of the wrong type in one file)
reject rows and the run goes on; missing required columns are a run-level `RaeeConfigError` raised before any
work. Prompts longer than the artifacts' max_length are rejected later, by the inference step, since only the
tokenizer knows their length (they are never truncated: the readout token is at the end of the prompt).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raee_ops.errors import RaeeConfigError
from raee_ops.tasks import Task
from schemas.tables import ERRORS_SCHEMA, ID, LABEL, TEXT, TEXT_PAIR

#: Internal column carried beside validated rows: the row's id, or its position "row:<file>:<n>".
ROW_ID = "_row_id"


def required_columns(task: Task, need_label: bool) -> list[str]:
    return [TEXT] + ([TEXT_PAIR] if task.is_pair else []) + ([LABEL] if need_label else [])


def check_columns(schema: pa.Schema, task: Task, need_label: bool, source: str) -> None:
    """Refuse an input that lacks a required column, before any row is processed."""
    missing = [c for c in required_columns(task, need_label) if c not in schema.names]
    if missing:
        raise RaeeConfigError(
            f"{source}: missing column(s) {', '.join(missing)} for task {task.name!r} (has: {', '.join(schema.names)})"
        )


def errors_table(ids: list[str] | pa.Array, reasons: list[str]) -> pa.Table:
    return pa.Table.from_arrays([pa.array(ids, pa.string()), pa.array(reasons, pa.string())], schema=ERRORS_SCHEMA)


@dataclass(frozen=True)
class Validated:
    valid: pa.Table
    errors: pa.Table


def row_ids(table: pa.Table, source: str, first_row: int) -> pa.Array:
    """The `id` column as strings where present and non-null, else the row's position in its file."""
    positions = pa.array([f"row:{source}:{n}" for n in range(first_row, first_row + table.num_rows)], pa.string())
    if ID not in table.column_names:
        return positions
    ids = pc.cast(table.column(ID), pa.string())
    return pc.if_else(pc.is_null(ids), positions, ids).combine_chunks()


def _text_reasons(table: pa.Table, column: str) -> list[tuple[np.ndarray, str]]:
    values = table.column(column)
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        return [(np.ones(table.num_rows, bool), f"{column} column has type {values.type}, expected string")]
    null = pc.is_null(values).to_numpy(zero_copy_only=False)
    blank = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(values), ""), False).to_numpy(zero_copy_only=False)
    return [(null, f"{column} is null"), (blank, f"{column} is empty or whitespace")]


def label_indices(table: pa.Table, task: Task) -> tuple[pa.Array, list[tuple[np.ndarray, str]]]:
    """Labels as int32 indices into the task's labels (ints or label names accepted), plus bad-label masks."""
    values = table.column(LABEL).combine_chunks()
    names = task.label_names
    if pa.types.is_integer(values.type):
        index = pc.cast(values, pa.int64())
    elif pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        index = pc.index_in(values, value_set=pa.array(names, values.type))
    else:
        whole = np.ones(table.num_rows, bool)
        return pa.nulls(table.num_rows, pa.int32()), [(whole, f"label column has type {values.type}")]
    null = pc.is_null(values).to_numpy(zero_copy_only=False)
    raw = pc.fill_null(index, -1).to_numpy(zero_copy_only=False)
    outside = ~null & ((raw < 0) | (raw >= len(names)))
    reason = f"label is not one of {names} or 0..{len(names) - 1}"
    return pa.array(np.clip(raw, 0, None).astype(np.int32)), [(null, "label is null"), (outside, reason)]


def validate(table: pa.Table, task: Task, *, source: str, need_label: bool, first_row: int = 0) -> Validated:
    """Valid rows (with `_row_id`, and `label` as int32 indices when labels are needed) and errors."""
    check_columns(table.schema, task, need_label, source)
    checks = _text_reasons(table, TEXT)
    if task.is_pair:
        checks += _text_reasons(table, TEXT_PAIR)
    if need_label:
        labels, label_checks = label_indices(table, task)
        checks += label_checks
        table = table.set_column(table.schema.get_field_index(LABEL), LABEL, labels)
    reasons = np.full(table.num_rows, None, dtype=object)
    for mask, reason in checks:
        reasons[mask & (reasons == None)] = reason  # noqa: E711 - elementwise on an object array
    ids = row_ids(table, source, first_row)
    bad = reasons != None  # noqa: E711
    valid = table.append_column(ROW_ID, ids).filter(pa.array(~bad))
    errors = errors_table(ids.filter(pa.array(bad)), list(reasons[bad]))
    return Validated(valid, errors)
