"""Layer-N retrieval keys (`--embedder layer-N`): the runtime continues rows from the key's layers exactly as a
plain run would read them, build-db stores standardized keys and their standardization (kept on append), and
classify (prefix, continuation, clamped exits) answers exactly as evaluate scores the same table."""

from types import SimpleNamespace

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from raee_ops.pipelines.build_db import run_build_db
from raee_ops.pipelines.classify import run_classify
from raee_ops.schemas.tables import FEATURES, LAYER_KEY_META_KEY, POOLINGS, flat_values
from segment_artifacts import KEY, segment_artifacts  # noqa: F401 - fixture
from test_probe_pipelines import signal_rows
from test_runtime import prompts

from raee_ops.batches import LayerRows
from raee_ops.calibration import not_before_key
from raee_ops.errors import RaeeConfigError
from raee_ops.evaluate import evaluate, strategy_rows
from raee_ops.inputs import read_validated_file
from raee_ops.key_names import check_key, key_available, key_width, layer_depth
from raee_ops.layer_key import LayerKey
from raee_ops.probe_policy import confident_exits
from raee_ops.probes import PROMPT_VIEWS, VIEWS
from raee_ops.report import render_markdown
from raee_ops.retrieval import Retriever
from raee_ops.runtime import SUB_BATCH, SegmentRuntime
from raee_ops.storage import content_digest
from raee_ops.tasks import PRESETS

DEPTH = 2  # of the tiny artifacts' 3 layers: rows whose exit is 1 are read out at 2


def test_layer_key_specs_and_their_standardization():
    assert layer_depth("layer-3") == 3 and layer_depth("minilm") is None and layer_depth(None) is None
    for wrong in ("layer-x", "layer-0", "layer-03", "layer-²", "layer-３"):  # one spelling per key, no crash
        with pytest.raises(RaeeConfigError, match="positive integer in digits 0-9, without a leading zero"):
            layer_depth(wrong)  # `layer-03` was told to be a positive integer in digits, which it is
    states = np.random.default_rng(0).normal(size=(50, 8)) * np.array([1, 1, 1, 1, 1, 1, 1, 1000.0]) + 5.0
    key = LayerKey.fit(2, states)
    keys = key.apply(states)
    z = (states - states.mean(axis=0)) / states.std(axis=0)  # standardized on the reference, then unit rows
    np.testing.assert_allclose(keys, z / np.linalg.norm(z, axis=1, keepdims=True), atol=1e-5)
    assert np.abs(keys[:, -1]).mean() < 0.6  # the huge dimension no longer decides every cosine
    again = LayerKey.from_json(key.to_json())
    assert again.depth == 2
    np.testing.assert_array_equal(again.apply(states), keys)


def test_each_kind_of_key_its_names_width_and_availability():
    """key_names says, in one place, which names are keys and what each kind computes from."""
    for name in ("backbone", "layer-2", "minilm", "minilm-2-int8"):
        check_key(name)
    for wrong in ("minlm", "Backbone", "layer-02", "minilm-02"):
        with pytest.raises(RaeeConfigError, match="choose backbone|positive integer"):
            check_key(wrong)
    exported = SimpleNamespace(hidden_size=64, num_layers=4, embedders={"minilm-2": SimpleNamespace(dim=384)})
    assert [key_width(exported, name) for name in ("backbone", "layer-4", "minilm-2")] == [64, 64, 384]
    names = ("backbone", "layer-4", "layer-5", "minilm-2", "minilm")
    assert [key_available(exported, name) for name in names] == [True, True, False, True, False]


@pytest.mark.parametrize("io_binding", [False, True])
def test_rows_continue_from_the_keys_layers_as_a_plain_run_reads_them(segment_artifacts, io_binding):  # noqa: F811
    runtime = SegmentRuntime(segment_artifacts, io_binding=io_binding)
    batch = prompts(SUB_BATCH + 7, seed=6)
    exits = np.random.default_rng(4).integers(0, runtime.num_layers + 1, size=len(batch))
    start = runtime.prefix(batch, DEPTH)
    plain = runtime.run_to_exit_pooled("sst2", batch, np.full(len(batch), DEPTH))
    np.testing.assert_array_equal(start.pooled, plain.pooled)  # the key's states are the layer's states

    def stop(layer: int, pooled: np.ndarray) -> np.ndarray:
        return pooled[:, 0, 1] > 0.5 if layer == DEPTH else np.zeros(len(pooled), bool)

    for rule in (None, stop):
        got = runtime.run_to_exit_pooled("sst2", batch, exits, rule, runtime.prefix(batch, DEPTH))
        clamped = np.where((exits > 0) & (exits < DEPTH), DEPTH, exits)
        want = runtime.run_to_exit_pooled("sst2", batch, clamped, rule)
        np.testing.assert_array_equal(got.exits, want.exits)
        np.testing.assert_allclose(got.logits, want.logits, atol=1e-5, rtol=0)
        np.testing.assert_allclose(got.pooled.astype(np.float32), want.pooled.astype(np.float32), atol=1e-2, rtol=0)
        assert not got.logits[exits == 0].any() and not got.exits[exits == 0].any()


def test_the_stop_rule_is_checked_from_the_keys_layer_on_as_the_fit_and_evaluate_replay_it(segment_artifacts):  # noqa: F811
    """Rows of a layer-N table start after their key's N layers: a probe sure of them only before N does not stop
    them (classify ran them on while the fit and evaluate, checking every layer, counted them as leaving at N)."""
    runtime = SegmentRuntime(segment_artifacts)
    batch = prompts(12, seed=7)
    exits = np.full(len(batch), runtime.num_layers)

    def sure_at_layer_one(layer: int, pooled: np.ndarray) -> np.ndarray:
        return np.full(len(pooled), layer == 1)

    got = runtime.run_to_exit_pooled("sst2", batch, exits, sure_at_layer_one, runtime.prefix(batch, DEPTH))
    confidence = np.zeros((len(batch), runtime.num_layers))
    confidence[:, 0] = 1.0
    replayed = not_before_key(confident_exits(confidence, exits, 0.9, key_depth=DEPTH), DEPTH)
    np.testing.assert_array_equal(got.exits, replayed)
    assert (replayed == runtime.num_layers).all()


@pytest.fixture(scope="module")
def layer_table(segment_artifacts, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("layer_key")
    ref = signal_rows(root / "ref.parquet", 160, 0, "r")
    run_build_db(segment_artifacts, "sst2", [str(ref)], str(root / "db"), "sst2", f"layer-{DEPTH}", "overwrite", None)
    return root, ref


def test_build_db_stores_standardized_keys_and_classify_answers_as_evaluate_scores(
    segment_artifacts,  # noqa: F811
    layer_table,
):
    root, ref = layer_table
    retriever = Retriever(str(root / "db"), "sst2")
    assert retriever.key_depth == DEPTH and retriever.meta.embedder == f"layer-{DEPTH}"
    stored = retriever.table.to_arrow()
    keys = flat_values(stored, "vector").reshape(stored.num_rows, -1)
    runtime = SegmentRuntime(segment_artifacts)
    texts = pq.read_table(ref).column("text").to_pylist()
    ids = pq.read_table(ref).column("id").to_pylist()
    order = [ids.index(i) for i in stored.column("id").to_pylist()]
    raw = runtime.prefix([PRESETS["sst2"].render(texts[i]) for i in order], DEPTH).pooled[:, POOLINGS.index("mean")]
    wide = raw.astype(np.float64)
    z = (wide - wide.mean(axis=0)) / np.maximum(wide.std(axis=0), 1e-6)  # the reference's standardization
    np.testing.assert_allclose(keys, z / np.linalg.norm(z, axis=1, keepdims=True), atol=1e-4)
    own = retriever.search(raw[:8], 1)  # a query's raw state goes through the table's standardization
    np.testing.assert_allclose(own.similarity[:, 0], 1.0, atol=1e-4)

    test = signal_rows(root / "test.parquet", 120, 1, "q")
    evaluation = evaluate(segment_artifacts, "sst2", str(root / "db"), "sst2", [str(test)], k=5)
    report = evaluation.report
    summary = run_classify(segment_artifacts, "sst2", str(root / "db"), "sst2", [str(test)], str(root / "out"), 5, None)
    predictions = pa.concat_tables([pq.read_table(f) for f in sorted((root / "out").glob("predictions-*"))])
    accuracy = float(np.mean(predictions.column("prediction").to_numpy() == predictions.column("label").to_numpy()))
    evaluated = strategy_rows(evaluation.predictions, "probe-fused").select(["id", "prediction", "exit_layer"])
    assert evaluated.equals(predictions.select(["id", "prediction", "exit_layer"]).sort_by("id"))  # row by row
    assert summary.predicted == 120 and f"0: answered after the key's {DEPTH} layers" in summary.render()
    assert accuracy == pytest.approx(report["strategies"]["probe-fused"]["accuracy"], abs=1e-9)
    histogram = report["strategies"]["probe-fused"]["exit_histogram"]
    assert summary.exit_counts == {layer: n for layer, n in enumerate(histogram) if n}
    assert not any(summary.exit_counts.get(layer) for layer in range(1, DEPTH))  # read out at the key's layer
    default = report["strategies"]["probe-fused"]
    assert histogram[0] > 0  # rows answered at exit 0 ran the key's layers all the same
    assert default["mean_layers_run"] == pytest.approx(default["mean_exit_layer"] + DEPTH * histogram[0] / 120)
    # what a user would pick instead is shown at the layers it ran too: key-lr ran the key's (sweep U: at exit 0)
    assert report["baselines"]["key-lr"]["mean_layers_run"] == DEPTH
    row = next(line for line in render_markdown(report).splitlines() if line.startswith("| key-lr |"))
    assert row.split(" | ")[3] == f"{DEPTH:.4f}", row  # the baselines' table's "mean layers run"


def test_append_keeps_the_tables_standardization_and_a_too_deep_key_is_refused(
    segment_artifacts,  # noqa: F811
    layer_table,
    tmp_path,
):
    root, ref = layer_table
    db = str(tmp_path / "db")
    run_build_db(segment_artifacts, "sst2", [str(ref)], db, "t", f"layer-{DEPTH}", "overwrite", None)
    before = lancedb.connect(db).open_table("t").to_arrow()
    more = signal_rows(tmp_path / "more.parquet", 30, 5, "m")
    run_build_db(segment_artifacts, "sst2", [str(more)], db, "t", None, "append", None)
    after = lancedb.connect(db).open_table("t").to_arrow()
    assert after.schema.metadata[LAYER_KEY_META_KEY] == before.schema.metadata[LAYER_KEY_META_KEY]
    keys_after = _keys_by_id(after)
    for row_id, key in _keys_by_id(before).items():  # the rows it had keep their keys
        np.testing.assert_array_equal(keys_after[row_id], key)
    with pytest.raises(RaeeConfigError, match="has 3 layers"):
        run_build_db(segment_artifacts, "sst2", [str(ref)], db, "u", "layer-4", "overwrite", None)


def _keys_by_id(table: pa.Table) -> dict[str, np.ndarray]:
    keys = flat_values(table, "vector").reshape(table.num_rows, -1)
    return dict(zip(table.column("id").to_pylist(), keys, strict=True))


def test_a_layer_key_table_skips_the_bare_input_pass_its_probes_cannot_read(segment_artifacts, tmp_path):  # noqa: F811
    """Its probes read the prompt's views only, so build-db's workers stage zeros for the bare input's views instead
    of running every layer on it; a MiniLM-keyed table's workers run it, unless the caller reads only a prompt view
    (evaluate, on a table whose probes chose one)."""
    rows = signal_rows(tmp_path / "rows.parquet", 12, 0, "r")
    table = next(iter(read_validated_file(str(rows), PRESETS["sst2"], True, content_digest(str(rows))))).valid
    for embedder, views, bare_run in (("layer-2", None, False), (KEY, None, True), (KEY, ("mean",), False)):
        work = LayerRows(str(segment_artifacts), PRESETS["sst2"], embedder, views)
        staged = work.run(table, work.load()).rows
        views = flat_values(staged, FEATURES).reshape(12, 3, len(VIEWS), -1)
        assert views[:, :, : len(PROMPT_VIEWS)].all(axis=(0, 1)).any()  # the prompt's views: every row, every layer
        assert views[:, :, len(PROMPT_VIEWS) :].any() == bare_run
