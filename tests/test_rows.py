import unicodedata

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from raee_ops.schemas.tables import ERRORS_SCHEMA

from raee_ops.errors import RaeeConfigError
from raee_ops.rows import ROW_ID, check_columns, output_rows, unjoinable, validate
from raee_ops.tasks import Task, get_task

SST2, RTE = get_task("sst2"), get_task("rte")


def test_single_text_rows_and_labels():
    table = pa.table(
        {
            "id": ["a", "b", "c", "d", "e", "f", None],
            "text": ["good", None, "  ", "fine", "ok", "nice", "x"],
            "label": [1, 0, 0, None, 5, 0, 1],
        }
    )
    out = validate(table, SST2, source="f.parquet", file_key="k", need_label=True)
    assert out.valid.column(ROW_ID).to_pylist() == ["a", "f", "row:k:6"]
    assert out.valid.column("label").type == pa.int32()
    assert out.errors.schema == ERRORS_SCHEMA
    reasons = dict(zip(out.errors.column("id").to_pylist(), out.errors.column("reason").to_pylist(), strict=True))
    assert reasons["b"] == "text is null"
    assert reasons["c"] == "text is empty or whitespace"
    assert reasons["d"] == "label is null"
    assert reasons["e"] == "label is not one of the label indices 0..1"
    assert out.valid.num_rows + out.errors.num_rows == table.num_rows
    # a string label is a label name: "0" is neither a name nor, in a string column, an index
    named = pa.table({"text": ["a", "b"], "label": ["positive", "0"]})
    out = validate(named, SST2, source="f.parquet", file_key="k", need_label=True)
    assert out.valid.column("label").to_pylist() == [1]
    assert out.errors.column("reason").to_pylist() == ["label is not one of the label names ['negative', 'positive']"]


def test_a_label_name_in_another_unicode_form_is_that_label():
    """`négatif` decomposed (NFD: e and a combining accent) was rejected as outside the labels, though it shows
    the same; names match as Unicode's canonical equivalence says (NFC on both sides)."""
    task = Task(name="t", template="{text}", label_names=["négatif", "positif"], verbalizer=["no", "yes"])
    labels = [unicodedata.normalize("NFD", "négatif"), "négatif", "positif", "negatif"]
    out = validate(pa.table({"text": ["a"] * 4, "label": labels}), task, source="s", file_key="k", need_label=True)
    assert out.valid.column("label").to_pylist() == [0, 0, 1]
    assert out.errors.column("reason").to_pylist() == ["label is not one of the label names ['négatif', 'positif']"]


def test_a_label_that_is_not_utf8_rejects_its_row():
    """A string label column holding bytes that are not UTF-8 failed evaluate and build-db with UnicodeDecodeError
    (exit 1, the whole run); as in the text and id columns, it is that row's problem (an input fuzz sweep)."""
    labels = pa.array([b"\xffpositive", b"negative", None], pa.binary()).view(pa.string())
    table = pa.table({"id": ["a", "b", "c"], "text": ["x", "y", "z"], "label": labels})
    out = validate(table, SST2, source="s", file_key="k", need_label=True)
    assert out.valid.column("label").to_pylist() == [0]
    reasons = dict(zip(out.errors.column("id").to_pylist(), out.errors.column("reason").to_pylist(), strict=True))
    assert reasons == {"a": "label is not valid UTF-8", "c": "label is null"}


def test_string_labels_map_to_indices_and_classify_ignores_labels():
    table = pa.table({"text": ["a", "b", "c"], "label": ["positive", "negative", "meh"]})
    out = validate(table, SST2, source="s", file_key="s", need_label=True, first_row=10)
    assert out.valid.column("label").to_pylist() == [1, 0]
    assert out.errors.column("id").to_pylist() == ["row:s:12"]
    assert validate(table, SST2, source="s", file_key="s", need_label=False).valid.num_rows == 3


def test_pair_task_needs_text_pair():
    table = pa.table({"text": ["p", "p", "p"], "text_pair": ["h", None, ""], "label": [0, 1, 0]})
    out = validate(table, RTE, source="r", file_key="r", need_label=True)
    assert out.valid.num_rows == 1
    assert out.errors.column("reason").to_pylist() == [
        "text_pair is null",
        "text_pair is empty or whitespace",
    ]


def test_text_of_invisible_characters_only_is_blank():
    """Text of zero-width, format or control characters alone counted as text and got a prediction, and so did the
    other default-ignorable characters (a Hangul filler, a variation selector) and the braille blank; one of them
    beside visible text is still text, and so is a combining mark, which shows."""
    invisible = ["\u200b", "\u200c\u200d", "\u2060", "\ufeff", "\u00ad", "\u180e", "\x00", " \u200b\t\u3000\x7f"]
    invisible += ["\u3164", "\u115f\u1160", "\uffa0", "\ufe0f", "\U000e0100", "\u034f", "\u2800 \u2800", "\u17b4"]
    invisible += ["\u2065", "\ufff0", "\U000e0000", "\U000e01f0"]  # reserved default-ignorable: shown as nothing too
    texts = ["good", "a\u200b", "\u00a0", *invisible, "\u0301", "\u2764\ufe0f"]
    table = pa.table({"text": texts, "text_pair": ["h"] * len(texts), "label": [0] * len(texts)})
    for task in (SST2, RTE):
        out = validate(table, task, source="s", file_key="k", need_label=True)
        assert out.valid.column("text").to_pylist() == ["good", "a\u200b", "\u0301", "\u2764\ufe0f"]
        assert out.errors.column("reason").to_pylist() == ["text is empty or whitespace"] * (len(texts) - 4)
    pairs = table.set_column(0, "text", pa.array(["p"] * len(texts))).set_column(1, "text_pair", pa.array(texts))
    out = validate(pairs, RTE, source="s", file_key="k", need_label=True)
    assert out.valid.column("text_pair").to_pylist() == ["good", "a\u200b", "\u0301", "\u2764\ufe0f"]
    assert out.errors.column("reason").to_pylist() == ["text_pair is empty or whitespace"] * (len(texts) - 4)


def test_a_text_column_that_cannot_hold_text_is_run_level():
    with pytest.raises(RaeeConfigError, match="column 'text' has type int64, which cannot hold text"):
        check_columns(pa.schema([("text", pa.int64()), ("label", pa.int64())]), SST2, True, "n.parquet")
    with pytest.raises(RaeeConfigError, match="column 'label' has type double"):
        check_columns(pa.schema([("text", pa.string()), ("label", pa.float64())]), SST2, True, "n.parquet")


def test_dictionary_and_binary_text_are_text_and_invalid_utf8_is_a_row_error():
    text = pa.array(["good", "fine", "good"]).dictionary_encode()
    out = validate(pa.table({"text": text, "label": [1, 1, 0]}), SST2, source="d", file_key="d", need_label=True)
    assert out.valid.column("text").type == pa.string() and out.valid.num_rows == 3
    raw = pa.array([b"caf\xc3\xa9", b"\xff\xfe bad", None, b"ok"], pa.binary())
    table = pa.table({"id": ["a", "b", "c", "d"], "text": raw, "label": [1, 0, 1, 0]})
    out = validate(table, SST2, source="b", file_key="b", need_label=True)
    assert out.valid.column("text").to_pylist() == ["café", "ok"]
    reasons = dict(zip(out.errors.column("id").to_pylist(), out.errors.column("reason").to_pylist(), strict=True))
    assert reasons == {"b": "text is not valid UTF-8", "c": "text is null"}
    assert out.errors.column("file").to_pylist() == ["b", "b"]
    # a string column whose bytes are not UTF-8 (as a Parquet writer that does not check can leave it)
    bad = pa.Array.from_buffers(pa.string(), 2, raw.buffers()[:3])
    out = validate(pa.table({"text": bad, "label": [0, 1]}), SST2, source="s", file_key="s", need_label=True)
    assert out.valid.column("text").to_pylist() == ["café"]
    assert out.errors.column("reason").to_pylist() == ["text is not valid UTF-8"]


def test_view_typed_text_and_labels_are_text_and_a_label_past_int64_is_a_row_error():
    text = pa.array(["good", "fine", "dull"], pa.string_view())
    labels = pa.array(["positive", "negative", "meh"], pa.string_view())
    out = validate(pa.table({"text": text, "label": labels}), SST2, source="v", file_key="v", need_label=True)
    assert out.valid.column("text").to_pylist() == ["good", "fine"] and out.valid.column("label").to_pylist() == [1, 0]
    raw = pa.array([b"ok", b"\xff bad"], pa.binary_view())
    ids, extra = pa.array(["i", "j"], pa.string_view()), pa.array([b"x", b"y"], pa.binary_view())  # filtered along
    out = validate(pa.table({"id": ids, "text": raw, "x": extra}), SST2, source="b", file_key="b", need_label=False)
    assert out.valid.column("id").to_pylist() == ["i"] and out.valid.column("x").type == pa.binary()
    assert out.valid.column("text").to_pylist() == ["ok"] and out.errors.column("reason").to_pylist() == [
        "text is not valid UTF-8"
    ]
    huge = pa.array([1, 2**64 - 1, 2**63], pa.uint64())  # past int64: checked casts raised, failing the whole run
    out = validate(pa.table({"text": ["a", "b", "c"], "label": huge}), SST2, source="u", file_key="u", need_label=True)
    assert out.valid.column("label").to_pylist() == [1]
    assert [r.startswith("label is not one of") for r in out.errors.column("reason").to_pylist()] == [True, True]


def test_missing_columns_are_run_level():
    with pytest.raises(RaeeConfigError, match="text_pair"):
        check_columns(pa.schema([("text", pa.string()), ("label", pa.int64())]), RTE, True, "x.parquet")
    with pytest.raises(RaeeConfigError, match="label"):
        check_columns(pa.schema([("text", pa.string())]), SST2, True, "x.parquet")
    check_columns(pa.schema([("text", pa.string())]), SST2, False, "x.parquet")
    with pytest.raises(RaeeConfigError, match="x.parquet: column.s. text appear more than once"):
        check_columns(
            pa.schema([("id", pa.string()), ("text", pa.string()), ("text", pa.string())]), SST2, False, "x.parquet"
        )


@pytest.mark.parametrize("stored", [pa.binary(), pa.string()])  # a string column's bytes are not checked on write
def test_an_id_that_is_not_utf8_rejects_its_row_under_its_bytes(stored):
    ids = pa.array([b"a", b"\xff\xfe", None], pa.binary()).view(stored)
    out = validate(
        pa.table({"id": ids, "text": ["x", "y", "z"]}), SST2, source="b.parquet", file_key="k", need_label=False
    )
    assert out.valid.column(ROW_ID).to_pylist() == ["a", "row:k:2"]
    assert out.errors.to_pylist() == [{"id": "hex:fffe", "reason": "id is not valid UTF-8", "file": "b.parquet"}]


@pytest.mark.parametrize("kind", [pa.list_(pa.int64()), pa.bool_(), pa.dictionary(pa.int8(), pa.bool_())])
def test_an_id_column_of_lists_or_booleans_is_run_level(kind):
    """A bool id was read as the text true/false: build-db refused the repeats as duplicate ids."""
    with pytest.raises(RaeeConfigError, match=f"column 'id' has type {kind}, which cannot hold ids"):
        check_columns(pa.schema([("id", kind), ("text", pa.string())]), SST2, False, "l.parquet")


def test_uuid_and_fixed_size_ids_read_as_text():
    import uuid

    table = pa.table({"id": pa.array([uuid.UUID(int=1).bytes], pa.uuid()), "text": ["x"]})
    out = validate(table, SST2, source="u.parquet", file_key="k", need_label=False)
    assert out.valid.column(ROW_ID).to_pylist() == ["00000000-0000-0000-0000-000000000001"]
    table = pa.table({"id": pa.array([b"\xff\x00"], pa.binary(2)), "text": ["x"]})
    assert validate(table, SST2, source="f", file_key="k", need_label=False).valid.column(ROW_ID).to_pylist() == [
        "hex:ff00"
    ]


def test_a_nan_group_is_a_missing_group_as_null_is_and_minus_zero_is_zero(tmp_path):
    from raee_ops.inputs import file_keys

    path = tmp_path / "g.parquet"
    groups = [1.0, float("nan"), None, float("nan"), 0.0, -0.0]
    pq.write_table(pa.table({"id": ["a", "b", "c", "d", "e", "f"], "g": groups}), path)
    assert file_keys(str(path), "g")[1].to_pylist() == ["1", None, None, None, "0", "0"]


def test_a_categorical_text_id_is_filled_as_text_and_a_nan_id_is_a_missing_one():
    """A pandas categorical id holds text: its nulls are filled with the row's position as a string column's are
    (they were rejected, unless another file in the run made the column plain text). A NaN in a float id is no id:
    its prediction could never be joined back, so it is rejected as a null is, named by its position."""
    ids = pa.array(["a", None, "c"]).dictionary_encode()
    out = validate(pa.table({"id": ids, "text": ["x", "y", "z"]}), SST2, source="c", file_key="k", need_label=False)
    assert not unjoinable(out.valid)[0].any()
    assert output_rows(out.valid).column("id").to_pylist() == ["a", "row:k:1", "c"]
    floats = pa.table({"id": [1.5, float("nan"), None, 4.0], "text": ["w", "x", "y", "z"]})
    out = validate(floats, SST2, source="f", file_key="k", need_label=False)
    assert out.valid.column(ROW_ID).to_pylist() == ["1.5", "row:k:1", "row:k:2", "4"]
    rejected, reason = unjoinable(out.valid)
    assert rejected.tolist() == [False, True, True, False] and reason.startswith("id is null or NaN")
