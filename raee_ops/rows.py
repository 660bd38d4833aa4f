"""Arrow-level input validation: split a table into rows the model can take and rejected rows with a reason.

Row-level problems (null/blank text, text that is not valid UTF-8, missing pair, bad label) reject rows and the
run goes on; missing required columns, or columns of a type that cannot hold text or labels, are a run-level
`RaeeConfigError` raised before any work. Text may be string, dictionary-encoded string or binary (decoded as
UTF-8 row by row). Prompts longer than the artifacts' max_length are rejected later, by the inference step, since
only the tokenizer knows their length (they are never truncated: the readout token is at the end of the prompt).

A row's id is its `id` value, or for rows without one `row:<file key>:<n>`: its position in its file, keyed by the
file's content digest, so the same file gets the same ids however its path is spelt. Outputs of an input without an
`id` column carry these as their `id`.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raee_ops.errors import RaeeConfigError
from raee_ops.schemas.tables import ERRORS_SCHEMA, ID, LABEL, TEXT, TEXT_PAIR
from raee_ops.tasks import Task

#: Internal columns carried beside validated rows: the row's id, and the file it came from (for errors).
ROW_ID = "_row_id"
SOURCE = "_source"
INTERNAL = [ROW_ID, SOURCE]


#: Arrow's view types (as polars and newer Arrow writers store text) as the plain types every kernel here takes:
#: pyarrow cannot even filter a table with a string_view column.
_PLAIN = {pa.string_view(): pa.string(), pa.binary_view(): pa.binary()}


def without_views(schema: pa.Schema) -> pa.Schema:
    """`schema` with its view-typed columns as their plain types: what every input is read as."""
    return pa.schema([f.with_type(_PLAIN.get(f.type, f.type)) for f in schema], metadata=schema.metadata)


def is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def is_text(t: pa.DataType) -> bool:
    """A type whose values `as_text` reads as text: strings, bytes, their dictionaries, or nothing at all."""
    if pa.types.is_dictionary(t):
        return is_text(t.value_type)
    return pa.types.is_null(t) or is_string(t) or is_binary(t)  # null: a column with no value at all


def _is_label(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        return _is_label(t.value_type)
    return pa.types.is_null(t) or pa.types.is_integer(t) or is_string(t)


def _id_text(value: object) -> str:
    """An id arrow cannot cast to text, as text: bytes as `hex:<bytes>`, anything else (a UUID) as it prints."""
    return f"hex:{value.hex()}" if isinstance(value, bytes) else str(value)


def _ids_as_text(values: pa.Array) -> pa.Array:
    """Ids of a type that is not text (numbers, UUIDs, fixed-size bytes) as strings."""
    if not isinstance(values.type, pa.BaseExtensionType):  # a UUID's storage bytes would cast, unreadable
        try:
            return pc.cast(values, pa.string())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # fixed-size bytes: no cast to text
            pass
    return pa.array([None if v is None else _id_text(v) for v in values.to_pylist()], pa.string())


def _is_id(t: pa.DataType) -> bool:
    """Anything that reads as one string per row (ids are stored as text); not lists, structs or maps, nor true or
    false (two values: build-db refused the repeats as duplicate ids, classify's outputs could not be joined)."""
    if pa.types.is_dictionary(t):
        return _is_id(t.value_type)
    return not pa.types.is_nested(t) and not pa.types.is_boolean(t)


def required_columns(task: Task, need_label: bool) -> list[str]:
    return [TEXT] + ([TEXT_PAIR] if task.is_pair else []) + ([LABEL] if need_label else [])


def check_columns(schema: pa.Schema, task: Task, need_label: bool, source: str) -> None:
    """Refuse an input that lacks a required column, before any row is processed."""
    required = required_columns(task, need_label)
    missing = [c for c in required if c not in schema.names]
    if missing:
        raise RaeeConfigError(
            f"{source}: missing column(s) {', '.join(missing)} for task {task.name!r} (has: {', '.join(schema.names)})"
        )
    twice = sorted({c for c in schema.names if schema.names.count(c) > 1})
    if twice:  # which of them holds the rows' text (or ids) would be a guess
        raise RaeeConfigError(f"{source}: column(s) {', '.join(twice)} appear more than once; keep one of each")
    internal = [c for c in INTERNAL if c in schema.names]
    if internal:
        raise RaeeConfigError(f"{source}: column(s) {', '.join(internal)} are raee-ops' own; rename them in the input")
    for column in required + ([ID] if ID in schema.names else []):
        kind, ok = {LABEL: ("labels", _is_label), ID: ("ids", _is_id)}.get(column, ("text", is_text))
        if not ok(schema.field(column).type):
            raise RaeeConfigError(
                f"{source}: column {column!r} has type {schema.field(column).type}, which cannot hold {kind}"
            )


def errors_table(ids: list[str] | pa.Array, reasons: list[str], files: list[str] | pa.Array) -> pa.Table:
    return pa.Table.from_arrays(
        [pa.array(ids, pa.string()), pa.array(reasons, pa.string()), pa.array(files, pa.string())],
        schema=ERRORS_SCHEMA,
    )


def internal_errors(table: pa.Table, reasons: list[str]) -> pa.Table:
    """Error rows for every row of a validated table (which carries its ids and files)."""
    return errors_table(table.column(ROW_ID), reasons, table.column(SOURCE))


@dataclass(frozen=True)
class Validated:
    valid: pa.Table
    errors: pa.Table


def positions(file_key: str, first_row: int, rows: int) -> pa.Array:
    return pa.array([f"row:{file_key}:{n}" for n in range(first_row, first_row + rows)], pa.string())


def row_ids(table: pa.Table, file_key: str, first_row: int) -> tuple[pa.Array, np.ndarray]:
    """The `id` column as strings where present and non-null, else the row's position keyed by its file; and which
    rows' ids are bytes that are not UTF-8 (they are rejected, under `hex:<their bytes>`: an id must stay text)."""
    if ID not in table.column_names:
        return positions(file_key, first_row, table.num_rows), np.zeros(table.num_rows, bool)
    values = table.column(ID).combine_chunks()
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    undecodable = np.zeros(len(values), bool)
    if is_text(values.type):
        ids, undecodable = as_text(values)
        if undecodable.any():
            raw = values.cast(pa.large_binary()).to_pylist()  # bytes: a string-typed array would decode them
            ids = pa.array(
                [_id_text(b) if bad else v for b, v, bad in zip(raw, ids.to_pylist(), undecodable, strict=True)]
            )
        ids = ids.cast(pa.string())
    else:
        ids = _ids_as_text(values)
    if not ids.null_count:
        return ids, undecodable
    return pc.if_else(pc.is_null(ids), positions(file_key, first_row, table.num_rows), ids), undecodable


def _text_type(t: pa.DataType) -> pa.DataType:
    t = t.value_type if pa.types.is_dictionary(t) else t
    return pa.large_string() if pa.types.is_large_string(t) or pa.types.is_large_binary(t) else pa.string()


def text_columns(task: Task) -> list[str]:
    return [TEXT, TEXT_PAIR] if task.is_pair else [TEXT]


def validated_schema(schema: pa.Schema, task: Task) -> pa.Schema:
    """An input schema as validation leaves it: text columns decoded to strings, and an `id` column as `_text_ids`."""
    for column in text_columns(task):
        index = schema.get_field_index(column)
        schema = schema.set(index, schema.field(index).with_type(_text_type(schema.field(index).type)))
    return _text_ids(schema)


def _text_ids(schema: pa.Schema) -> pa.Schema:
    """`schema` with an `id` column of type null (no value at all, as pandas writes an all-None column) as a string
    one, and a dictionary-encoded text one (a pandas categorical) as its text: `output_rows` fills their nulls with
    the rows' positions as in any text `id` column, whichever other files a run reads beside them."""
    if ID not in schema.names:
        return schema
    t = schema.field(ID).type
    if pa.types.is_dictionary(t) and _holds_positions(t.value_type):
        t = t.value_type
    elif pa.types.is_null(t):
        t = pa.string()
    return schema.set(schema.get_field_index(ID), schema.field(ID).with_type(t))


def nan_ids_as_null(table: pa.Table) -> pa.Table:
    """A NaN in a float `id` column is no id (NaN equals nothing, not even itself: its prediction could not be
    joined back), so it is a null, rejected by `unjoinable` as one."""
    if ID not in table.column_names or not pa.types.is_floating(table.schema.field(ID).type):
        return table
    ids = table.column(ID)
    index = table.schema.get_field_index(ID)
    return table.set_column(index, table.field(ID), pc.if_else(pc.is_nan(ids), pa.scalar(None, ids.type), ids))


def output_columns(schema: pa.Schema, task: Task) -> pa.Schema:
    """The input columns as an output carries them (see `output_rows`): text decoded to strings, and for an input
    without an `id` column a string `id` first."""
    schema = validated_schema(schema, task)
    return schema if ID in schema.names else schema.insert(0, pa.field(ID, pa.string()))


def _holds_positions(t: pa.DataType) -> bool:
    """Whether an `id` column of type `t` can take a row's `row:<file key>:<n>` in place of a null."""
    return is_string(t)


def unjoinable(table: pa.Table) -> tuple[np.ndarray, str]:
    """Validated rows whose output `id` would be null, and why: a null (or NaN) in an `id` column of numbers or
    bytes, which cannot hold the row's position. classify rejects them (the errors name each by its
    position) rather than write a prediction nobody can join back to its row."""
    if ID not in table.column_names or _holds_positions(table.schema.field(ID).type):
        return np.zeros(table.num_rows, bool), ""
    kind = table.schema.field(ID).type
    missing = "null or NaN" if pa.types.is_floating(kind) else "null"
    reason = f"id is {missing} (an id column of {kind} cannot hold the row's position in its place)"
    return pc.is_null(table.column(ID)).to_numpy(zero_copy_only=False), reason


def output_rows(table: pa.Table) -> pa.Table:
    """Validated rows without the internal columns. Rows without an id get the `row:<file key>:<n>` that errors
    name them by, so every output row can be joined back to its input: an input without an `id` column gets one,
    and a null in a text `id` column is filled (a null in other `id` columns rejects its row: `unjoinable`)."""
    out = table.drop_columns(INTERNAL)
    if ID not in out.column_names:
        return out.add_column(0, ID, table.column(ROW_ID))
    ids = out.column(ID)
    if not ids.null_count or not _holds_positions(ids.type):
        return out
    filled = pc.if_else(pc.is_null(ids), table.column(ROW_ID).cast(ids.type), ids)
    return out.set_column(out.schema.get_field_index(ID), out.schema.field(ID), filled)


def as_text(values: pa.ChunkedArray | pa.Array) -> tuple[pa.Array, np.ndarray]:
    """A text column as a valid string array, and which rows were not valid UTF-8 (set to null here)."""
    values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    text = _text_type(values.type)
    raw = values.cast(pa.large_binary() if text == pa.large_string() else pa.binary())  # bytes, unchecked
    try:
        return raw.cast(text), np.zeros(len(raw), bool)
    except pa.ArrowInvalid:  # some row is not UTF-8: find which, one by one (only on this slow path)
        valid = np.array([v is None or _decodes(v) for v in raw.to_pylist()])
        kept = pc.if_else(pa.array(valid), raw, pa.nulls(len(raw), raw.type))
        return kept.cast(text), ~valid


def _decodes(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


#: Text made only of these shows nothing, so it is blank: whitespace (every Unicode space is a separator, Z, or a
#: control), controls (Cc: NUL, tabs), format characters (Cf: zero-width spaces and joiners, U+FEFF, soft hyphens),
#: the other default-ignorable code points Unicode says to render as nothing (the Hangul fillers, variation
#: selectors, the combining grapheme joiner, Khmer's inherent vowels, Mongolian's variation selectors, and the
#: code points Unicode reserves as default-ignorable: U+2065, U+FFF0..FFF8, the whole U+E0000..E0FFF tag and
#: selector block) and the braille blank, U+2800: the characters used to post a name or a message that looks empty.
_BLANK = (
    r"^[\p{Z}\p{Cc}\p{Cf}\x{034F}\x{115F}\x{1160}\x{17B4}\x{17B5}\x{180B}-\x{180F}\x{2065}\x{2800}\x{3164}"
    r"\x{FE00}-\x{FE0F}\x{FFA0}\x{FFF0}-\x{FFF8}\x{E0000}-\x{E0FFF}]*$"
)


def _text_reasons(table: pa.Table, column: str) -> tuple[pa.Table, list[tuple[np.ndarray, str]]]:
    """The table with `column` as valid strings, and the masks of rows to reject with their reasons."""
    values, undecodable = as_text(table.column(column))
    table = table.set_column(table.schema.get_field_index(column), column, values)
    null = pc.is_null(values).to_numpy(zero_copy_only=False) & ~undecodable
    blank = pc.fill_null(pc.match_substring_regex(values, _BLANK), False).to_numpy(zero_copy_only=False)
    reasons = [(undecodable, f"{column} is not valid UTF-8"), (null, f"{column} is null")]
    return table, reasons + [(blank, f"{column} is empty or whitespace")]


def label_indices(table: pa.Table, task: Task) -> tuple[pa.Array, list[tuple[np.ndarray, str]]]:
    """Labels as int32 indices into the task's labels (ints or label names accepted), plus bad-label masks."""
    values = table.column(LABEL).combine_chunks()
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    names = task.label_names
    undecodable = np.zeros(len(values), bool)
    if pa.types.is_integer(values.type):
        # unchecked: a uint64 past int64's range wraps to a negative index, outside the labels like any other
        index = pc.cast(values, pa.int64(), safe=False)
    elif is_string(values.type):
        # a name in another Unicode form is that name (`négatif` decomposed, NFD, was a row outside the labels):
        # the column's few distinct strings normalized here, since pyarrow 25's utf8_normalize gives NFD for any form
        values, undecodable = as_text(values)  # a name that is not UTF-8 is no name (decoding it failed the run)
        distinct = pc.unique(values)
        as_nfc = pa.array([v and unicodedata.normalize("NFC", v) for v in distinct.to_pylist()], values.type)
        nfc = pa.array([unicodedata.normalize("NFC", name) for name in names], values.type)
        index = pc.take(pc.index_in(as_nfc, value_set=nfc), pc.index_in(values, value_set=distinct))
    else:
        whole = np.ones(table.num_rows, bool)
        return pa.nulls(table.num_rows, pa.int32()), [(whole, f"label column has type {values.type}")]
    null = pc.is_null(values).to_numpy(zero_copy_only=False)
    raw = pc.fill_null(index, -1).to_numpy(zero_copy_only=False)
    outside = ~null & ((raw < 0) | (raw >= len(names)))
    reason = (  # a string column holds label names; an integer column, indices (a string "0" is neither)
        f"label is not one of the label names {names}"
        if is_string(values.type)
        else f"label is not one of the label indices 0..{len(names) - 1}"
    )
    checks = [(undecodable, "label is not valid UTF-8"), (null, "label is null"), (outside, reason)]
    return pa.array(np.clip(raw, 0, None).astype(np.int32)), checks


def validate(
    table: pa.Table, task: Task, *, source: str, file_key: str, need_label: bool, first_row: int = 0
) -> Validated:
    """Valid rows (with `_row_id` and `_source`, text as strings, and `label` as int32 indices when labels are
    needed) and errors."""
    read = _text_ids(without_views(table.schema))
    if read != table.schema:
        table = table.cast(read)
    check_columns(table.schema, task, need_label, source)
    table = nan_ids_as_null(table)
    checks = []
    for column in text_columns(task):
        table, column_checks = _text_reasons(table, column)
        checks += column_checks
    if need_label:
        labels, label_checks = label_indices(table, task)
        checks += label_checks
        table = table.set_column(table.schema.get_field_index(LABEL), LABEL, labels)
    ids, undecodable_ids = row_ids(table, file_key, first_row)
    checks.append((undecodable_ids, "id is not valid UTF-8"))
    reasons = np.full(table.num_rows, None, dtype=object)
    for mask, reason in checks:
        reasons[mask & (reasons == None)] = reason  # noqa: E711 - elementwise on an object array
    bad = reasons != None  # noqa: E711
    files = pa.array([source] * table.num_rows, pa.string())
    valid = table.append_column(ROW_ID, ids).append_column(SOURCE, files).filter(pa.array(~bad))
    errors = errors_table(ids.filter(pa.array(bad)), list(reasons[bad]), [source] * int(bad.sum()))
    return Validated(valid, errors)
