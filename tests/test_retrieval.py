from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
from raee_ops.schemas.tables import TableMeta, exit_table_schema

from raee_ops import retrieval
from raee_ops.errors import RaeeConfigError, RaeeError
from raee_ops.exit_table import commit
from raee_ops.retrieval import Retriever, table_names


class PagedDB:
    """A catalogue that returns its tables two at a time, as remote LanceDB catalogues page them."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.uri = "paged"  # a local database's, as DBConnection.uri names it

    def list_tables(self, page_token: str | None = None) -> SimpleNamespace:
        start = int(page_token or 0)
        end = start + 2
        return SimpleNamespace(tables=self.names[start:end], page_token=str(end) if end < len(self.names) else None)


def test_table_names_follow_every_page():
    names = [f"t{i}" for i in range(5)]
    assert table_names(PagedDB(names)) == set(names)


def _exit_table(rows: int, seed: int = 0) -> tuple[pa.Table, np.ndarray]:
    """Exit-table rows with clustered 16-d keys (uneven density, as real keys), and the keys."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(32, 16))
    keys = (centres[rng.integers(0, 32, rows)] + rng.normal(0, 0.4, (rows, 16))).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    schema = exit_table_schema(16, 3, 2)
    meta = TableMeta("fp", "sst2", "minilm", 3, ["negative", "positive"]).encode()
    columns = {
        "id": pa.array([f"r{i}" for i in range(rows)]),
        "label": pa.array(rng.integers(0, 2, rows), pa.int32()),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(keys.ravel()), 16),
        "layer_pred": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(rows * 3, np.int32)), 3),
        "layer_correct": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(rows * 3, bool)), 3),
        "layer_prob": pa.FixedSizeListArray.from_arrays(pa.array(np.full(rows * 3, 0.5, np.float32)), 3),
        "layer_logprobs": pa.FixedSizeListArray.from_arrays(pa.array(np.full(rows * 6, -0.7, np.float32)), 6),
        "first_correct_layer": pa.array(np.zeros(rows, np.int32)),
        "probe_correct": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(rows * 3, bool)), 3),
        "probe_logprobs": pa.FixedSizeListArray.from_arrays(pa.array(np.full(rows * 6, -0.7, np.float32)), 6),
        "group_id": pa.nulls(rows, pa.string()),
    }
    return pa.table(columns, schema=schema.with_metadata(meta)), keys


def test_large_tables_get_an_ann_index_that_keeps_recall_and_small_ones_stay_exact(tmp_path, monkeypatch):
    monkeypatch.setattr(retrieval, "INDEX_MIN_ROWS", 3000)
    small, _ = _exit_table(500)
    assert commit(str(tmp_path), "small", small) == (500, False, 1)
    assert Retriever(str(tmp_path), "small").nprobes is None

    table, keys = _exit_table(4000, seed=1)
    assert commit(str(tmp_path), "large", table)[:2] == (4000, True)
    retriever = Retriever(str(tmp_path), "large")
    assert retriever.nprobes == round(retrieval.index_partitions(4000) * retrieval.PROBE_SHARE)
    queries = keys[:200] + np.random.default_rng(2).normal(0, 0.05, (200, 16)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    found = retriever.search(queries, 10).similarity
    exact = -np.sort(-(queries @ keys.T), axis=1)[:, :10]
    assert np.mean(np.abs(found - exact) < 1e-4) > 0.9  # recall@10 by similarity: the index finds the true ones


def test_small_tables_are_searched_in_memory_as_lancedb_scans_them(tmp_path, monkeypatch):
    table, keys = _exit_table(600, seed=3)
    rng = np.random.default_rng(4)
    for name, size in (("layer_correct", 3), ("probe_correct", 3), ("layer_logprobs", 6)):
        values = rng.random(600 * size) < 0.5 if "correct" in name else rng.normal(size=600 * size).astype(np.float32)
        column = pa.FixedSizeListArray.from_arrays(pa.array(values), size)
        table = table.set_column(table.schema.get_field_index(name), table.schema.field(name), column)
    commit(str(tmp_path), "t", table)
    queries = keys[:50] + rng.normal(0, 0.1, (50, 16)).astype(np.float32)
    in_memory = Retriever(str(tmp_path), "t")
    found = in_memory.search(queries, 10)
    assert in_memory._memory is not None  # read once, on the first search
    monkeypatch.setattr(retrieval, "INDEX_MIN_ROWS", 100)  # the same table through LanceDB's exact scan
    scanned = Retriever(str(tmp_path), "t").search(queries, 10)
    np.testing.assert_allclose(found.similarity, scanned.similarity, atol=1e-5)
    for field in ("labels", "correct", "probe_correct", "logprobs"):
        np.testing.assert_array_equal(getattr(found, field), getattr(scanned, field))
    assert in_memory.search(queries, 1000).labels.shape == (50, 600)  # k past the table: every row


@pytest.mark.parametrize("lancedb_search", [True, False])
def test_a_key_that_finds_no_neighbours_is_its_rows_failure_not_the_tables(tmp_path, monkeypatch, lancedb_search):
    """LanceDB finds no neighbours for a key that is not finite: the search named the table damaged, a raee-ops
    error that fails the whole job, where the batch's rows retried one by one reject that row alone. A small
    table's search in memory gave such a key NaN neighbours, answered as any other's: the same failure now."""
    if lancedb_search:
        monkeypatch.setattr(retrieval, "INDEX_MIN_ROWS", 100)
    table, keys = _exit_table(300)
    commit(str(tmp_path), "t", table)
    queries = keys[:4].copy()
    queries[2] = np.nan
    retriever = Retriever(str(tmp_path), "t")
    with pytest.raises(ValueError, match="neighbours found for a key, not 5 .a key that is not finite") as failed:
        retriever.search(queries, 5)
    assert not isinstance(failed.value, RaeeError)
    assert retriever.search(queries[[0, 1, 3]], 5).labels.shape == (3, 5)


def test_a_table_of_another_key_or_task_is_told_so_not_that_its_fingerprint_differs():
    """Appending with another --embedder told the key's fingerprint too, as if the same key had been exported
    otherwise; a fingerprint is told only where its subject (the key, the task) matched."""
    keyed = TableMeta("f", "sst2", "minilm-2-int8", 3, ["a", "b"], "tf", key_fingerprint="k1")
    backbone = TableMeta("f", "sst2", "backbone", 3, ["a", "b"], "tf")
    with pytest.raises(RaeeConfigError) as told:
        retrieval.check_meta(keyed, backbone, "table 't'")
    assert "embedder 'minilm-2-int8' (expected 'backbone')" in str(told.value)
    assert "key_fingerprint" not in str(told.value)
    reexported = TableMeta("f", "sst2", "minilm-2-int8", 3, ["a", "b"], "tf", key_fingerprint="k2")
    with pytest.raises(RaeeConfigError, match="key_fingerprint 'k1' .expected 'k2': the key embedder was exported"):
        retrieval.check_meta(keyed, reexported, "table 't'")
    other_task = TableMeta("f", "sst5", "minilm-2-int8", 3, ["a", "b"], "tf5", key_fingerprint="k1")
    with pytest.raises(RaeeConfigError) as told:
        retrieval.check_meta(keyed, other_task, "table 't'")
    assert "task 'sst2' (expected 'sst5')" in str(told.value) and "task_fingerprint" not in str(told.value)
    with pytest.raises(RaeeConfigError, match="not an exit table built by raee-ops build-db"):
        retrieval.check_meta(None, keyed, "table 't'")
    other_export = TableMeta("g", "sst2", "minilm-2-int8", 3, ["a", "b"], "tf", key_fingerprint="k1")
    with pytest.raises(
        RaeeConfigError, match="fingerprint 'f' .expected 'g': the table was built from other artifacts"
    ):
        retrieval.check_meta(keyed, other_export, "table 't'")  # two hashes alone said neither which nor what to do
