import pyarrow as pa
import pytest

from raee_ops.errors import RaeeConfigError
from raee_ops.rows import ROW_ID, check_columns, validate
from raee_ops.tasks import get_task
from schemas.tables import ERRORS_SCHEMA

SST2, RTE = get_task("sst2"), get_task("rte")


def test_single_text_rows_and_labels():
    table = pa.table(
        {
            "id": ["a", "b", "c", "d", "e", "f", None],
            "text": ["good", None, "  ", "fine", "ok", "nice", "x"],
            "label": [1, 0, 0, None, 5, 0, 1],
        }
    )
    out = validate(table, SST2, source="f.parquet", need_label=True)
    assert out.valid.column(ROW_ID).to_pylist() == ["a", "f", "row:f.parquet:6"]
    assert out.valid.column("label").type == pa.int32()
    assert out.errors.schema == ERRORS_SCHEMA
    reasons = dict(zip(out.errors.column("id").to_pylist(), out.errors.column("reason").to_pylist(), strict=True))
    assert reasons["b"] == "text is null"
    assert reasons["c"] == "text is empty or whitespace"
    assert reasons["d"] == "label is null"
    assert reasons["e"].startswith("label is not one of")
    assert out.valid.num_rows + out.errors.num_rows == table.num_rows


def test_string_labels_map_to_indices_and_classify_ignores_labels():
    table = pa.table({"text": ["a", "b", "c"], "label": ["positive", "negative", "meh"]})
    out = validate(table, SST2, source="s", need_label=True, first_row=10)
    assert out.valid.column("label").to_pylist() == [1, 0]
    assert out.errors.column("id").to_pylist() == ["row:s:12"]
    assert validate(table, SST2, source="s", need_label=False).valid.num_rows == 3


def test_pair_task_needs_text_pair():
    table = pa.table({"text": ["p", "p", "p"], "text_pair": ["h", None, ""], "label": [0, 1, 0]})
    out = validate(table, RTE, source="r", need_label=True)
    assert out.valid.num_rows == 1
    assert out.errors.column("reason").to_pylist() == [
        "text_pair is null",
        "text_pair is empty or whitespace",
    ]


def test_non_string_text_rejects_every_row():
    out = validate(pa.table({"text": [1, 2], "label": [0, 1]}), SST2, source="n", need_label=True)
    assert out.valid.num_rows == 0
    assert set(out.errors.column("reason").to_pylist()) == {"text column has type int64, expected string"}


def test_missing_columns_are_run_level():
    with pytest.raises(RaeeConfigError, match="text_pair"):
        check_columns(pa.schema([("text", pa.string()), ("label", pa.int64())]), RTE, True, "x.parquet")
    with pytest.raises(RaeeConfigError, match="label"):
        check_columns(pa.schema([("text", pa.string())]), SST2, True, "x.parquet")
    check_columns(pa.schema([("text", pa.string())]), SST2, False, "x.parquet")
