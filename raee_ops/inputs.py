"""Parquet inputs, read where they are (local or object storage): expand and check them on the driver (run-level
errors before any work), and read and validate them as small Arrow tables, the elements every later step works on
(pipelines/sources.py reads them so on workers; evaluate in its own process).

A file whose footer cannot be read is refused on the driver before any work (exit 2, the file named). A file
whose data cannot be decoded past some point (a corrupt page, or one failing its stored CRC checksum) keeps the
rows read before it; the rows of the row group that could not be read become error rows naming the file, and the
next row group is read as usual.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from functools import cache
from typing import BinaryIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystem import FileMetadata

from raee_ops import storage
from raee_ops.commit import some
from raee_ops.errors import InputChanged, RaeeConfigError, not_utf8, one_line
from raee_ops.rows import (
    ROW_ID,
    Validated,
    as_text,
    check_columns,
    errors_table,
    is_binary,
    is_string,
    is_text,
    nan_ids_as_null,
    positions,
    row_ids,
    validate,
    without_views,
)
from raee_ops.schemas.tables import ID, TEXT, TEXT_PAIR
from raee_ops.tasks import Task

#: Rows per element; RunInference then batches several elements into one model call.
ROWS_PER_ELEMENT = 16


def expand_inputs(patterns: Sequence[str]) -> list[str]:
    return [m.path for m in input_files(patterns)]


def input_files(patterns: Sequence[str]) -> list[FileMetadata]:
    """Every file of every pattern (path, size, modification time), each file once; a pattern that matches nothing
    is an error (a typo must not silently drop an input)."""
    files: dict[Hashable, FileMetadata] = {}
    for pattern in patterns:
        storage.check_scheme(pattern, "--input")
        # a folder: an object store lists every key under a prefix, `_SUCCESS` and backups too
        if _names_folder(pattern) or (pattern.endswith("/") and not storage.is_local(pattern)):
            folder = pattern.rstrip("/")
            raise RaeeConfigError(f"--input {pattern}: a folder; give its files or a glob ({folder}/*.parquet)")
        # an object store's folder markers (zero-byte `prefix/` keys that consoles and tools make) are folders
        matched = [m for m in _matched(pattern) if not m.path.endswith("/")]
        refuse_glob_folder(pattern)
        if storage.is_local(pattern):  # first: a link to nothing matches nothing, and is better named as what it is
            refuse_unreadable(pattern)
        if not matched:
            raise RaeeConfigError(f"--input {pattern}: no such file (no Parquet files match)")
        if pattern.endswith("/"):  # Beam's local match drops the `/`: `data.parquet/`, no folder, read the file
            named = some([m.path for m in matched])
            raise RaeeConfigError(f"--input {pattern}: ends in / but names files ({named}), not folders; drop the /")
        for m in matched:  # a file once, however named (a link to it, another route): read twice otherwise
            shown = not_utf8(m.path)
            if shown:  # Beam cannot encode the name to read the file
                raise RaeeConfigError(
                    f"--input {shown}: a file name that is not UTF-8, which Beam cannot read: rename it"
                )
            files.setdefault(storage.identity(m.path), m)
    return list(files.values())


def _names_folder(pattern: str) -> bool:
    """An input that is a folder: as spelt, where that is no pattern; locally also where it is one (a folder named
    `dir[1]`: as a pattern it matches nothing, or another folder's files)."""
    return (storage.is_local(pattern) or not storage.is_pattern(pattern)) and storage.is_dir(pattern)


def _matched(pattern: str) -> list[FileMetadata]:
    """The files a pattern matches; a name holding glob characters that names a file is that file (a user's
    `data[1].parquet`: as a pattern it matches nothing), refused where as a pattern it matches others too."""
    found = storage.match_metadata(pattern)
    if storage.is_pattern(pattern) and storage.is_file(pattern):
        named = storage.metadata(pattern)
        others = [m.path for m in found if m.path != named.path]
        if others:  # which the user meant would be a guess, and a wrong one drops rows without a word
            raise RaeeConfigError(
                f"--input {pattern}: names a file, and as a pattern matches {some(others)} too; for that file alone "
                f"write each glob character as [c] ({storage.escaped(pattern)}), or rename it"
            )
        return [named]
    return found


def refuse_glob_folder(pattern: str) -> None:
    """Refuse a pattern below a folder (an object-store prefix) whose name holds glob characters
    (`dir[1]/*.parquet`), unless it names a file as spelt: a pattern reads them as a pattern too, so it matched
    nothing, or another folder's files (`dir1/`) with exit 0. Each written as `[c]` (`dir[[]1]`), they stand for
    themselves."""
    local = storage.is_local(pattern)
    path = os.path.abspath(storage.local_path(pattern)) if local else pattern
    parts = path.rsplit("/", 1)[0].split("/")
    named = [end for end in range(len(parts), 0, -1) if storage.is_pattern(parts[end - 1])]  # the innermost first
    if not named or storage.is_file(path):  # no store call for an input whose folders are plain
        return
    for end in named:
        folder = "/".join(parts[:end])
        if storage.is_dir(folder if local else storage.escaped(folder)):
            escaped = "/".join([*parts[: end - 1], storage.escaped(parts[end - 1])])
            raise RaeeConfigError(
                f"--input {pattern}: the folder {folder} has glob characters in its name, which a pattern reads as "
                f"a pattern; write each as [c] ({escaped}{path[len(folder) :]}) or rename the folder"
            )


def refuse_unreadable(pattern: str) -> None:
    """Refuse a local pattern that names or matches what is not a regular file (storage.unreadable_matches)."""
    unreadable = storage.unreadable_matches(pattern)
    if unreadable:
        path = unreadable[0]
        dangling = os.path.islink(path) and not os.path.exists(path)
        kind = f"a link to nothing ({os.readlink(path)})" if dangling else "a named pipe, socket or device"
        raise RaeeConfigError(f"--input {pattern}: {path} is not a file that can be read: {kind}")


def refuse_reading_own_output(
    found: Sequence[FileMetadata], patterns: Sequence[str], folder: str, written: Sequence[str], what: str
) -> None:
    """Refuse, before any work, a folder of Parquet outputs (a dataset readers take whole, subfolders included) that
    holds an input file, at any depth: they would mix; and one whose files an input pattern matches
    (refuse_matched_outputs)."""
    held = [m.path for m in found if storage.within(m.path, folder)]
    if held:
        raise RaeeConfigError(f"{what} {folder} holds the input {held[0]}; write the outputs to a folder of their own")
    refuse_matched_outputs(patterns, folder, written, what)


def refuse_matched_outputs(patterns: Sequence[str], folder: str, written: Sequence[str], what: str) -> None:
    """Refuse, before any work, a folder to write whose files (`written`: names of the kind the run writes there) an
    input pattern matches, as spelt or through the links either names: the same command run again (a scheduler's
    retry) would read the first run's outputs as input."""
    for pattern in patterns:
        spellings = ((pattern, folder), (storage.resolved_pattern(pattern), storage.resolved(folder)))
        read = [n for n in written for glob, where in spellings if storage.matches(glob, storage.join(where, n))]
        if read:
            raise RaeeConfigError(
                f"--input {pattern} matches what this run writes to {what} {folder} ({read[0]}), which the same "
                "command run again would read as input; write the outputs where the inputs do not match"
            )


#: A file key is the start of the file's SHA-256 (hex).
FILE_KEY_CHARS, SHA256_HEX = 16, 64


def file_key(path: str) -> str:
    """The key of a file's id-less rows: its content digest, so another spelling of the path gives the same ids.
    Not kept across reads: a process outliving one run (a worker pool's) must not key a file rewritten at the same
    path by its old content, which would give new rows the ids of old ones."""
    with storage.open_read(path) as handle:
        return storage.sha256_stream(handle)[:FILE_KEY_CHARS]


def _lazy_key(path: str, content: str | None = None) -> Callable[[], str]:
    """`path`'s file_key, on first use only. A local file's is the start of its SHA-256, the content digest the run
    took already (`content`: checked to hold before and after the read); any other is hashed then (a second full
    read, from object storage a download: not for a file whose rows all carry ids)."""
    if content is not None and storage.is_local(path) and len(content) == SHA256_HEX:
        return lambda: content[:FILE_KEY_CHARS]
    return cache(lambda: file_key(path))


def open_parquet(handle: BinaryIO) -> pq.ParquetFile:
    """An input file whose pages are checked against the CRC checksums their writer stored (where it stored them):
    a page damaged on disk or in transit can decode, silently, to other text; it is an unreadable row group."""
    return pq.ParquetFile(handle, page_checksum_verification=True)


def check_inputs(files: Sequence[str], task: Task, need_label: bool) -> tuple[pa.Schema, int]:
    """Every file's columns and the total row count, from footers only; and the one schema all files' rows are read
    as (`common_schema`)."""
    schema, rows = None, 0
    for path in files:
        try:
            with storage.open_read(path) as handle:
                meta = open_parquet(handle).metadata
        except (OSError, pa.ArrowInvalid, UnicodeDecodeError) as exc:  # the last: a column name not in UTF-8
            raise RaeeConfigError(f"{path}: not a readable Parquet file ({exc})") from exc
        counts = [meta.row_group(group).num_rows for group in range(meta.num_row_groups)]
        if min(counts, default=0) < 0 or sum(counts) != meta.num_rows:  # rows read by group would not add up
            raise RaeeConfigError(
                f"{path}: not a readable Parquet file (a damaged footer: it counts {meta.num_rows} rows, its row "
                f"groups {', '.join(map(str, counts))})"
            )
        file_schema = without_views(meta.schema.to_arrow_schema().remove_metadata())  # as validate reads it
        check_columns(file_schema, task, need_label, path)
        schema = file_schema if schema is None else common_schema(schema, file_schema, files[0], path)
        rows += meta.num_rows
    return schema, rows


def common_schema(first: pa.Schema, other: pa.Schema, first_path: str, path: str) -> pa.Schema:
    """The schema rows of both are read as: files written by different tools (pandas, polars, Spark) may order their
    columns differently, mark them required or not, and store text as string or large_string and integers at
    other widths; the first's column order, every column nullable and of the wider type. Different columns, or a
    column of another kind (numbers in one file, text in the other), are refused: a guess would change values."""
    if set(first.names) != set(other.names):
        missing, extra = sorted(set(first.names) - set(other.names)), sorted(set(other.names) - set(first.names))
        differ = "; ".join(
            f"{what}: {', '.join(names)}" for what, names in (("lacks", missing), ("adds", extra)) if names
        )
        raise RaeeConfigError(f"{path}: its columns differ from {first_path}'s ({differ}); inputs must share them")
    fields = []
    for field in first:
        theirs = other.field(field.name).type
        common = _common_type(field.type, theirs, text=field.name in (TEXT, TEXT_PAIR))
        if common is None:
            raise RaeeConfigError(
                f"{path}: column {field.name!r} is {theirs} there and {field.type} in {first_path}; inputs must "
                f"share each column's kind{_apart(field.type, theirs)}"
            )
        fields.append(pa.field(field.name, common))
    return pa.schema(fields)


def _common_type(a: pa.DataType, b: pa.DataType, text: bool = False) -> pa.DataType | None:
    """The type holding every value of `a` and `b` unchanged (None: no such type): the wider of two string, binary,
    integer or floating-point types; in a `text` column (what the model reads, decoded from bytes row by row and
    written out as strings, rows.py) binary where strings meet bytes; a column of nulls takes the other's; a
    dictionary-encoded one (pandas' categoricals) meets the other as its values' type. Other columns keep strings
    and bytes apart: written out as bytes, a text id could no longer hold its row's position."""
    if a == b or pa.types.is_null(b):
        return a
    if pa.types.is_null(a):
        return b
    if pa.types.is_dictionary(a) or pa.types.is_dictionary(b):
        return _common_type(*(t.value_type if pa.types.is_dictionary(t) else t for t in (a, b)), text=text)
    kinds = (is_text,) if text else (is_string, is_binary)
    if not any(kind(a) and kind(b) for kind in (*kinds, pa.types.is_integer, pa.types.is_floating)):
        return None
    if pa.uint64() in (a, b) and any(pa.types.is_signed_integer(t) for t in (a, b)):  # Arrow would make it int64
        return None
    unified = pa.unify_schemas([pa.schema([("c", a)]), pa.schema([("c", b)])], promote_options="permissive")
    return unified.field("c").type


def _apart(a: pa.DataType, b: pa.DataType) -> str:
    """Why two number columns meet in no type, for the refusal's line (empty for other kinds)."""
    whole = [pa.types.is_integer(t) for t in (a, b)]
    if all(whole):
        return ": no Arrow type holds every uint64 and every signed integer; write one type in every file"
    if any(whole) and any(pa.types.is_floating(t) for t in (a, b)):
        return (
            ": whole numbers would change as they meet floating point (an id 1 would read as 1.0); pandas writes a "
            "whole-number column with a missing value as floating point: write one type in every file"
        )
    return ""


def as_read(table: pa.Table, schema: pa.Schema | None) -> pa.Table:
    """A file's rows in the inputs' common schema (None: as they are)."""
    if schema is None or table.schema == schema:
        return table
    return table.select(schema.names).cast(schema)


def file_keys(
    path: str, group_column: str | None = None, schema: pa.Schema | None = None, content: str | None = None
) -> tuple[pa.Array, pa.Array | None]:
    """The ids the rows of one file get (id column, else positions), read on the driver for duplicate checks, and with
    `group_column` that column as strings in the same order (null: the row is a group of its own); one read, in the
    inputs' common `schema` (check_inputs; None: the file's own) as the pipeline reads the rows: a float32 id is
    another string once widened to float64, and two files' ids may only meet there. A row group that cannot be
    decoded gives no ids: its rows are rejected when the pipeline reads them. `content`: its digest as the job took
    it, whose start keys a local file's id-less rows (_lazy_key)."""
    with storage.open_read(path) as handle:
        parquet = open_parquet(handle)
        columns = [c for c in dict.fromkeys((ID, group_column)) if c and c in parquet.schema_arrow.names]
        ids, names, first, key = [], [], 0, _lazy_key(path, content)
        for group in range(parquet.num_row_groups):
            size = parquet.metadata.row_group(group).num_rows
            try:
                table = parquet.read_row_group(group, columns=columns) if columns else pa.table({"_": pa.nulls(size)})
            except (OSError, pa.ArrowException):
                table = None
            if table is not None:
                table = nan_ids_as_null(_columns_as_read(table, schema))
                ids.append(row_ids(table, key() if _positional(table) else "", first)[0])
                if group_column:
                    names.append(_group_names(table.column(group_column).combine_chunks(), path, group_column, first))
            first += size
    return concat_strings(ids), concat_strings(names) if group_column else None


def _columns_as_read(table: pa.Table, schema: pa.Schema | None) -> pa.Table:
    """Some of a file's columns in the inputs' common schema (None: as they are), as `as_read` reads them all."""
    if schema is None:
        return table
    fields = [schema.field(f.name) if f.name in schema.names else f for f in table.schema]  # an id-less file's "_"
    return table.cast(pa.schema(fields))


def concat_strings(arrays: list[pa.Array]) -> pa.Array:
    """String arrays as one (none: an empty one)."""
    return pa.concat_arrays(arrays) if arrays else pa.array([], pa.string())


def _group_names(values: pa.Array, path: str, column: str, first_row: int) -> pa.Array:
    """A group column's values as the strings the table stores; text or bytes that are not UTF-8 are refused here, on
    the driver before any work, since every row's group is known before its row is read."""
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    if is_text(values.type):
        names, undecodable = as_text(values)
        if undecodable.any():
            row = first_row + int(undecodable.argmax())
            raise RaeeConfigError(
                f"{path}: --group-column {column!r} holds a value that is not valid UTF-8 (row {row}, counting from "
                "0); group keys are stored as text"
            )
        return names.cast(pa.string())
    if pa.types.is_floating(values.type):  # NaN is a missing group, as null is: not one group of every NaN row
        values = pc.if_else(pc.is_nan(values), pa.nulls(len(values), values.type), values)
        values = pc.add(values, pa.scalar(0.0, values.type))  # -0.0 is 0.0's group, not one of its own ("-0")
    try:
        return pc.cast(values, pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise RaeeConfigError(f"{path}: --group-column {column!r} has type {values.type}, not a group key") from exc


def read_validated_file(
    path: str,
    task: Task,
    need_label: bool,
    content: str,
    schema: pa.Schema | None = None,
    rows: int = ROWS_PER_ELEMENT,
) -> Iterator[Validated]:
    """One file, `rows` rows at a time, in the inputs' common `schema` (check_inputs; None: the file's own),
    validated; a row group that cannot be decoded becomes error rows. The file must hold `content` (its
    storage.content_digest when the run began) before and after it is read, or the run ends (InputChanged): a file
    replaced meanwhile gave other rows than the job's, published as its own with exit 0. A file in object storage
    is hashed once more (file_key: a download) only where some row's id is its position; a local one never is."""
    unchanged(path, content)
    with reading({path: content}, Exception):
        with storage.open_read(path) as handle:
            yield from _read_validated_groups(open_parquet(handle), path, task, need_label, schema, rows, content)
    unchanged(path, content)


def unchanged(path: str, content: str) -> None:
    """Refuse a file whose content digest is no longer `content` (a local file is read whole: ~1 s a GB). One that
    cannot be read says so: gone, or its store not answering, which a retry may outlast as well."""
    now = storage.content_digest(path)
    if now == storage.UNREADABLE and (unseen := storage.unseen(path, "--input")):
        raise unseen
    if now == storage.UNREADABLE:
        raise InputChanged(
            f"--input {path} could not be read again to check it still holds what the run began with (it vanished, "
            "or its store did not answer); nothing was published or committed: run again once it can be read"
        )
    if now != content:
        raise InputChanged(
            f"--input {path} changed while the run read it (its content digest is not the one the run began with; "
            "an object uploaded again in parts of another size has another too); nothing was published or "
            "committed: run again once it stays put"
        )


@contextmanager
def reading(contents: dict[str, str], errors: type[Exception] = RaeeConfigError) -> Iterator[None]:
    """Reads of inputs whose content digests (path: digest) were taken first: a failure of what a read found (a
    refusal of its columns or ids, a file the read could not parse) is, where a file changed meanwhile, that change
    (InputChanged, a retry), not a fault of the new content's."""
    try:
        yield
    except errors:
        for path, content in contents.items():
            unchanged(path, content)
        raise


def _positional(table: pa.Table) -> bool:
    """Whether some row's id is its position: no `id` column, or a null in it (a NaN is one, nan_ids_as_null)."""
    return ID not in table.column_names or nan_ids_as_null(table).column(ID).null_count > 0


def _read_validated_groups(
    parquet: pq.ParquetFile,
    path: str,
    task: Task,
    need_label: bool,
    schema: pa.Schema | None,
    rows: int,
    content: str,
) -> Iterator[Validated]:
    first, key = 0, _lazy_key(path, content)
    for group in range(parquet.num_row_groups):
        size, done, problem = parquet.metadata.row_group(group).num_rows, 0, None
        batches = parquet.iter_batches(batch_size=rows, row_groups=[group])
        while done < size:
            try:
                batch = next(batches)
            except StopIteration:  # a corrupt page can decode to fewer rows than the footer counts, silently
                problem = f"its pages held {done} of the {size} rows the footer counts"
                break
            except (OSError, pa.ArrowException) as exc:  # corrupt data: the rest of this row group is lost
                problem = f"{type(exc).__name__}: {one_line(str(exc))}"  # a reason is one line
                break
            table = as_read(pa.Table.from_batches([batch]).replace_schema_metadata(None), schema)
            keyed = key() if _positional(table) else ""  # "": no row here is keyed by position
            yield validate(table, task, source=path, file_key=keyed, need_label=need_label, first_row=first + done)
            done += table.num_rows
        if problem is not None:  # the rest of the row group, as the footer counts it
            reason = f"unreadable Parquet data (row group {group}): {problem}"[:500]
            ids = _unread_ids(parquet, group, schema, done, key, first)
            errors = errors_table(ids, [reason] * len(ids), [path] * len(ids))
            yield Validated(pa.table({ROW_ID: pa.array([], pa.string())}), errors)
        first += size


def _unread_ids(
    parquet: pq.ParquetFile, group: int, schema: pa.Schema | None, done: int, key: Callable[[], str], first: int
) -> pa.Array:
    """Names for the rows of row `group` from `done` on, which could not be read: their ids, as validate reads them,
    where the id column decodes alone (the damage lay in another column's pages: they were named by position,
    though their ids were there), else their positions."""
    size = parquet.metadata.row_group(group).num_rows
    try:
        table = parquet.read_row_group(group, columns=[ID]) if ID in parquet.schema_arrow.names else None
    except (OSError, pa.ArrowException):
        table = None
    if table is None or table.num_rows != size:
        return positions(key(), first + done, size - done)
    table = as_read(table, pa.schema([schema.field(ID)]) if schema is not None else None)
    table = nan_ids_as_null(table.cast(without_views(table.schema)).slice(done))
    return row_ids(table, key() if _positional(table) else "", first + done)[0]


def count_rows(pattern: str) -> tuple[int, list[str]]:
    """Rows in the Parquet files matching `pattern` (footers only), and the files."""
    files = storage.match(pattern)
    return sum(storage.parquet_rows(f) for f in files), files
