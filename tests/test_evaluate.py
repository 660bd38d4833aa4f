"""evaluate on tiny segment artifacts: the report agrees with an independent all-layers run and with itself."""

import dataclasses
import json
import threading
from dataclasses import replace
from pathlib import Path

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_runs import raee_ops
from raee_ops.pipelines.build_db import run_build_db
from raee_ops.schemas.manifest import load_manifest
from raee_ops.schemas.tables import flat_values
from segment_artifacts import KEY, segment_artifacts  # noqa: F401 - fixture
from test_pipelines import BAD_IDS, labelled

from raee_ops.commit import locked
from raee_ops.errors import RaeeConfigError
from raee_ops.evaluate import evaluate, exported_task, strategy_rows
from raee_ops.exit_policy import STRATEGIES
from raee_ops.report import render_markdown, write_report
from raee_ops.runtime import SegmentRuntime
from raee_ops.tasks import PRESETS, Task


@pytest.fixture(scope="module")
def evaluated(segment_artifacts, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("evaluate")
    train = labelled(root / "train.parquet", 30, 0, "t", bad=False)
    run_build_db(segment_artifacts, "sst2", [str(train)], str(root / "db"), "sst2", KEY, "overwrite", None)
    held_out = labelled(root / "test.parquet", 25, 1, "q")
    evaluation = evaluate(segment_artifacts, "sst2", str(root / "db"), "sst2", [str(held_out)], k=5)
    return root, held_out, evaluation


def test_report_matches_an_independent_all_layers_run(segment_artifacts, evaluated):  # noqa: F811
    _, held_out, evaluation = evaluated
    report = evaluation.report
    table = pq.read_table(held_out)
    good = [i for i, row_id in enumerate(table.column("id").to_pylist()) if row_id not in BAD_IDS]
    texts = [table.column("text")[i].as_py() for i in good]
    labels = np.array([table.column("label")[i].as_py() for i in good])
    logits = SegmentRuntime(segment_artifacts).all_layers_pooled("sst2", [PRESETS["sst2"].render(t) for t in texts])[0]
    expected = [float(np.mean(layer.argmax(axis=1) == labels)) for layer in logits]

    assert report["rows"] == 25 and report["rejected"] == len(BAD_IDS)
    assert {e["id"] for e in report["rejected_rows"]} == set(BAD_IDS)
    assert report["num_layers"] == 3 and len(report["per_layer_metric"]) == 3
    assert report["per_layer_accuracy"] == pytest.approx(expected)
    assert report["full"]["accuracy"] == report["per_layer_accuracy"][-1]
    assert report["full"]["metric_name"] == "accuracy"
    oracle = float((np.stack([layer.argmax(axis=1) for layer in logits]) == labels).any(axis=0).mean())
    assert report["oracle_accuracy"] == pytest.approx(oracle)  # right at some layer: 1 where one layer was not
    assert report["best_layer"]["accuracy"] == max(report["per_layer_accuracy"])


def test_raee_exits_where_the_papers_vote_over_the_nearest_rows_says(segment_artifacts, evaluated):  # noqa: F811
    """The paper's rule, computed here from the table's own rows: each of a query's 5 nearest reference rows (cosine
    over the stored keys) spreads one vote over the layers whose label-word head it got right (one right nowhere
    votes for the last), and the row exits at the most voted layer, the earliest of equals."""
    root, held_out, evaluation = evaluated
    stored = lancedb.connect(str(root / "db")).open_table("sst2").to_arrow()
    vectors = flat_values(stored, "vector").reshape(stored.num_rows, -1)
    correct = flat_values(stored, "layer_correct").reshape(stored.num_rows, -1).astype(float)  # N×L
    rows = strategy_rows(evaluation.predictions, "raee")
    table = pq.read_table(held_out)
    text_of = dict(zip(table.column("id").to_pylist(), table.column("text").to_pylist(), strict=True))
    keys = SegmentRuntime(segment_artifacts).key(KEY, [text_of[i] for i in rows["id"].to_pylist()])
    nearest = np.argsort(-(keys @ vectors.T), axis=1)[:, :5]
    votes = np.zeros((len(keys), correct.shape[1]))
    for query, neighbours in enumerate(nearest):
        for right in correct[neighbours]:
            if right.any():
                votes[query] += right / right.sum()
            else:
                votes[query, -1] += 1.0
    assert rows["exit_layer"].to_pylist() == (votes.argmax(axis=1) + 1).tolist()
    assert len(set(rows["exit_layer"].to_pylist())) > 1  # so a wrong column or vote would show


def test_strategies_are_consistent(evaluated):
    report = evaluated[2].report
    strategies = report["strategies"]
    assert list(strategies) == list(STRATEGIES) and report["default_strategy"] == "probe-fused"
    assert strategies["full"]["accuracy"] == report["full"]["accuracy"]
    assert strategies["full"]["mean_exit_layer"] == 3 and strategies["full"]["ideal_speedup"] == 1
    assert strategies["full-cal"]["accuracy"] == report["full_calibrated"]["accuracy"]
    for s in strategies.values():
        histogram = s["exit_histogram"]  # rows per exit layer 0..L
        assert len(histogram) == 4 and sum(histogram) == report["rows"]
        assert s["retrieval_only_share"] == pytest.approx(histogram[0] / report["rows"])
        assert s["mean_exit_layer"] == pytest.approx(np.dot(histogram, np.arange(4)) / report["rows"])
        if s["mean_exit_layer"] > 0:
            assert s["ideal_speedup"] == pytest.approx(3 / s["mean_exit_layer"])
    assert set(report["policy"]) >= {"k", "alpha", "epsilon", "tau", "metric", "loo_metric", "loo_mean_exit"}
    assert report["neighbour_vote"]["k"] == report["policy"]["k"] and report["k"] == 5


def test_a_k_beyond_the_table_is_reported_as_the_rows_it_reads(segment_artifacts, evaluated):  # noqa: F811
    """A search finds at most the table's 30 rows: --k 50 reads 30, and the report says so."""
    root, held_out, _ = evaluated
    report = evaluate(segment_artifacts, "sst2", str(root / "db"), "sst2", [str(held_out)], k=50, strategies=["raee"])
    assert (report.report["k"], report.report["k_asked"], report.report["table_rows"]) == (30, 50, 30)
    markdown = render_markdown(report.report)
    assert "k=30 (--k 50; the table holds 30 rows) for the paper's rules" in markdown
    assert "label vote of the k=30 (--k 50; the table holds 30 rows) nearest neighbours" in markdown  # knn-vote's


def test_predictions_are_the_rows_behind_every_number(evaluated):
    """predictions.parquet holds each scored row once per strategy (the baselines' too), and every strategy's
    accuracy and exits per layer in the report are counted from its rows there."""
    _, held_out, evaluation = evaluated
    report, predictions = evaluation.report, evaluation.predictions
    scored = {row_id for row_id in pq.read_table(held_out).column("id").to_pylist() if row_id not in BAD_IDS}
    assert json.loads(predictions.schema.metadata[b"label_names"]) == PRESETS["sst2"].label_names
    names = predictions.column("strategy").unique().to_pylist()
    assert set(names) == set(report["strategies"]) and predictions.num_rows == len(names) * report["rows"]
    for name, s in report["strategies"].items():
        rows = strategy_rows(predictions, name)
        assert set(rows["id"].to_pylist()) == scored and rows.num_rows == report["rows"]
        right = rows["prediction"].to_numpy() == rows["label"].to_numpy()
        assert float(right.mean()) == pytest.approx(s["accuracy"], abs=1e-12)
        assert np.bincount(rows["exit_layer"].to_numpy(), minlength=4).tolist() == s["exit_histogram"]


def test_write_report_and_strategy_override(segment_artifacts, evaluated, tmp_path):  # noqa: F811
    root, held_out, evaluation = evaluated
    report = evaluation.report
    out = Path(write_report(evaluation, str(tmp_path / "report")))
    assert json.loads((out / "report.json").read_text())["rows"] == 25
    assert "| fused |" in (out / "report.md").read_text()
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert pq.read_table(out / "predictions.parquet").equals(evaluation.predictions)
    fixed = evaluate(
        segment_artifacts, "sst2", str(root / "db"), "sst2", [str(held_out)], 5, ["layer:1", "raee"]
    ).report
    assert list(fixed["strategies"]) == ["layer:1", "raee"]
    assert fixed["strategies"]["layer:1"]["accuracy"] == report["per_layer_accuracy"][0]


def test_two_reports_into_one_folder_never_mix(evaluated, tmp_path):
    evaluation = evaluated[2]
    out = tmp_path / "report"
    write_report(evaluation, str(out))
    other = replace(evaluation, report=evaluation.report | {"rows": 7})
    with locked(str(out), "--report"):  # another run is writing its report there
        writer = threading.Thread(target=write_report, args=(other, str(out)))
        writer.start()
        writer.join(1.0)
        assert writer.is_alive() and json.loads((out / "report.json").read_text())["rows"] == 25  # it waits
    writer.join()
    assert json.loads((out / "report.json").read_text())["rows"] == 7
    assert "7 rows scored" in (out / "report.md").read_text()


def test_a_report_replaces_only_an_evaluates_files(evaluated, tmp_path):
    """A --report folder holding someone's predictions.parquet or report.md had them overwritten without a word.
    They are refused, untouched; a killed evaluate's files (its marker beside them) and a complete report's are
    replaced."""
    evaluation = evaluated[2]
    theirs = tmp_path / "data"
    theirs.mkdir()
    (theirs / "predictions.parquet").write_bytes(b"mine")
    (theirs / "report.md").write_text("my notes")
    with pytest.raises(RaeeConfigError, match="holds report.md, predictions.parquet that evaluate did not write"):
        write_report(evaluation, str(theirs))
    assert (theirs / "predictions.parquet").read_bytes() == b"mine" and (theirs / "report.md").read_text() == "my notes"
    (theirs / "report.json").write_text('{"rows": 3}')  # a JSON of someone else's is no evaluate report either
    with pytest.raises(RaeeConfigError, match="evaluate did not write"):
        write_report(evaluation, str(theirs))
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "report.md").write_text("half")
    (killed / "_WRITING").write_bytes(b"")
    write_report(evaluation, str(killed))
    write_report(evaluation, str(killed))  # a complete report's folder
    assert sorted(p.name for p in killed.iterdir()) == sorted(
        ["report.md", "report.png", "predictions.parquet", "report.json"]
    )


def test_task_file_must_be_exported_as_described(segment_artifacts):  # noqa: F811
    manifest = load_manifest(segment_artifacts)
    assert exported_task(manifest, PRESETS["rte"]) == "rte"
    with pytest.raises(RaeeConfigError, match="not exported"):
        exported_task(manifest, Task("topics", "Text: {text}\nTopic:", ["a", "b"], ["good", "bad"]))
    with pytest.raises(RaeeConfigError, match="differs from the one exported in the artifacts in its template"):
        exported_task(manifest, Task("sst2", "Text: {text}\nSentiment:", ["negative", "positive"], ["bad", "good"]))
    # an export from before tasks carried their metric scores sst2 by accuracy: a file asking for f1 was accepted,
    # and the report then scored accuracy (review L)
    with pytest.raises(RaeeConfigError, match="in its metric: 'f1' against 'accuracy' .name the exported metric in"):
        exported_task(manifest, dataclasses.replace(PRESETS["sst2"], metric="f1"))
    assert exported_task(manifest, PRESETS["sst2"]) == "sst2"


def test_cli_writes_the_report_and_exits_2_on_a_missing_column(segment_artifacts, evaluated, tmp_path):  # noqa: F811
    root, held_out, _ = evaluated
    pq.write_table(pa.table({"text": ["good"]}), tmp_path / "nolabel.parquet")

    def run(input_path, report_dir):
        args = [
            "--artifacts",
            str(segment_artifacts),
            "--task",
            "sst2",
            "--db",
            str(root / "db"),
            "--input",
            str(input_path),
            "--report",
            str(report_dir),
            "--strategy",
            "raee",
        ]
        return raee_ops("evaluate", *args, **fault)

    fault = {"fault": "load:evaluate", "mode": "raise"}  # its workers serve evaluate: their progress said "build-db"
    failed = run(held_out, tmp_path / "failed")
    assert failed.returncode == 1 and "InjectedFault: injected fault at load:evaluate" in failed.stderr
    fault = {}
    ok = run(held_out, tmp_path / "ok")
    assert ok.returncode == 0, ok.stderr
    assert "evaluate:" not in ok.stderr  # no progress line when stderr is not a terminal (tests/test_progress.py)
    assert (tmp_path / "ok" / "report.json").exists() and (tmp_path / "ok" / "report.png").exists()
    missing = run(tmp_path / "nolabel.parquet", tmp_path / "bad")
    assert missing.returncode == 2
    assert "missing column(s) label" in missing.stderr and not (tmp_path / "bad").exists()


def test_rows_the_table_holds_are_counted_and_warned_of(segment_artifacts, evaluated, tmp_path):  # noqa: F811
    """Scoring the reference rows themselves reported every strategy at 1.0 without a word (the README's S3 recipe
    did): rows whose nearest reference row has their key are counted and warned of."""
    root, held_out, evaluation = evaluated
    train = root / "train.parquet"
    texts = set(pq.read_table(train).column("text").to_pylist())
    scored = pq.read_table(held_out).filter(
        pa.compute.is_in(pq.read_table(held_out)["id"], evaluation.predictions["id"])
    )
    assert evaluation.report["reference_copies"] == sum(t in texts for t in scored.column("text").to_pylist())
    args = ["--artifacts", str(segment_artifacts), "--task", "sst2", "--db", str(root / "db"), "--strategy", "full"]
    run = raee_ops("evaluate", *args, "--input", str(train), "--report", str(tmp_path / "report"), "--k", "50")
    assert run.returncode == 0, run.stderr
    assert "note: k=30 (--k 50; the table holds 30 rows)" in run.stdout  # said in the report only
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["reference_copies"] == report["rows"] == 30
    assert "warning: 30 of the 30 scored rows have a row of table 'sst2' with the same key" in run.stdout
    assert "**Warning:** 30 of the 30 scored rows" in (tmp_path / "report" / "report.md").read_text()
    assert "Warning" not in render_markdown(evaluation.report | {"reference_copies": 0})


def test_nothing_to_evaluate_says_why(segment_artifacts, evaluated, tmp_path):  # noqa: F811
    """Every row rejected: evaluate writes no report, so its one line names the commonest reasons (it named none:
    the user could not tell why); an input of no rows says so, not that its 0 rows were rejected."""
    root = str(evaluated[0] / "db")
    blank = tmp_path / "blank.parquet"
    pq.write_table(pa.table({"text": ["", " ", None], "label": [0, 1, 0]}), blank)
    with pytest.raises(RaeeConfigError, match=r"were rejected \(2 × text is empty or whitespace; 1 × text is null\)$"):
        evaluate(segment_artifacts, "sst2", root, "sst2", [str(blank)], k=5)
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string()), "label": pa.array([], pa.int64())}), empty)
    with pytest.raises(RaeeConfigError, match=f"nothing to evaluate: {empty} holds no rows$"):
        evaluate(segment_artifacts, "sst2", root, "sst2", [str(empty)], k=5)


def test_one_scored_row_is_reported(segment_artifacts, evaluated, tmp_path):  # noqa: F811
    """One row left to score (one given, or the rest rejected): the hindsight's halvings split it into an empty
    half, and evaluate ended with an internal error, exit 1 (sweep, session 71). The report says one row has no
    halves; every other number is that row's."""
    root = str(evaluated[0] / "db")
    one = tmp_path / "one.parquet"
    pq.write_table(pa.table({"text": ["a fine film", "", None], "label": [1, 0, 1]}), one)
    evaluation = evaluate(segment_artifacts, "sst2", root, "sst2", [str(one)], k=5)
    report = evaluation.report
    assert report["rows"] == 1 and report["rejected"] == 2
    hindsight = report["default_hindsight"]
    assert hindsight["held_out_metric"] is None and hindsight["default_held_out_metric"] is None
    for name, scores in report["strategies"].items():  # that row's: right or wrong, as its prediction was
        (answer,) = strategy_rows(evaluation.predictions, name)["prediction"].to_pylist()
        assert scores["accuracy"] == float(answer == 1), name
    default = strategy_rows(evaluation.predictions, report["default_strategy"])["prediction"].to_pylist()
    assert hindsight["metric"] in (0.0, 1.0) and report["baselines"]["default"]["accuracy"] == float(default == [1])
    assert "one scored row has no halves" in render_markdown(report)
