"""End to end on tiny segment artifacts: build-db, then classify, every row accounted for."""

import dataclasses
import glob
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from cli_runs import raee_ops
from raee_ops.pipelines import build_db
from raee_ops.pipelines import classify as classify_pipeline
from raee_ops.pipelines.build_db import run_build_db
from raee_ops.pipelines.classify import run_classify
from raee_ops.schemas.manifest import load_manifest
from raee_ops.schemas.tables import RUN_META_KEY
from segment_artifacts import KEY, reexported, segment_artifacts, write_labelled  # noqa: F401 - fixture

from raee_ops import batches, inputs, storage, tasks
from raee_ops.commit import job_of
from raee_ops.errors import InputChanged, RaeeConfigError, VersionRemoved
from raee_ops.inputs import file_key, read_validated_file
from raee_ops.retrieval import (
    _NOT_FOUND,
    Retriever,
    _rooted,
    check_table_contents,
    expected_meta,
    open_table,
)
from raee_ops.rows import ROW_ID
from raee_ops.runtime import SegmentRuntime
from raee_ops.storage import content_digest
from raee_ops.tasks import PRESETS
from raee_ops.versions import prune, rollback

CAPTURE = {"capture_output": True, "text": True, "check": False}
WORDS = "good bad great awful fine movie plot boring fun dull".split()
BAD_IDS = {
    "null": "text is null",
    "blank": "text is empty or whitespace",
    "badlabel": "label is not one of",
    "long": "over max_length 64 (never truncated: the answer is read at its end; export-onnx --max-length raises",
    "nolabel": "label is null",
}


def sentences(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(1, 10))) for _ in range(n)]


def labelled(path: Path, n: int, seed: int, prefix: str, bad: bool = True) -> Path:
    rng = np.random.default_rng(seed)
    ids, texts, labels = [f"{prefix}{i}" for i in range(n)], sentences(n, seed), list(rng.integers(0, 2, n))
    if bad:
        ids += list(BAD_IDS)
        texts += [None, "   ", "good", "good " * 100, "fine"]
        labels += [0, 1, 7, 1, None]
    return write_labelled(path, ids, texts, labels)


@pytest.fixture(scope="module")
def built(segment_artifacts, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("built")
    train = labelled(root / "train.parquet", 30, 0, "t")
    summary = run_build_db(
        segment_artifacts, "sst2", [str(train)], str(root / "db"), "sst2", "backbone", "overwrite", None
    )
    return root, summary


def classify(artifacts, root, out, strategy="raee", inputs=None, k=5, task="sst2", table="sst2", args=()):
    inputs = inputs or str(labelled(root / f"in-{out}.parquet", 20, 1, "q"))
    summary = run_classify(artifacts, task, str(root / "db"), table, [inputs], str(root / out), k, strategy, list(args))
    predictions = pa.concat_tables([pq.read_table(f) for f in sorted(glob.glob(str(root / out / "pred*")))])
    errors = pa.concat_tables([pq.read_table(f) for f in sorted(glob.glob(str(root / out / "_errors*")))])
    return summary, predictions, errors


def build(artifacts: str, db: str, rows: Path, mode: str = "overwrite", table: str = "t", key: str = KEY):
    """build-db of `rows` into `db`'s `table`, the sst2 task, key and options as most tests here take them."""
    return run_build_db(artifacts, "sst2", [str(rows)], db, table, key, mode, None)


def check_errors(errors: pa.Table) -> None:
    reasons = dict(zip(errors.column("id").to_pylist(), errors.column("reason").to_pylist(), strict=True))
    for row_id, reason in BAD_IDS.items():
        if row_id in reasons:
            assert reason in reasons[row_id]


def test_build_db_accounts_for_every_row(built):
    root, summary = built
    assert (summary.rows_in, summary.written, summary.rejected, summary.table_rows) == (35, 30, 5, 30)
    errors = pq.read_table(glob.glob(str(root / "db" / "_errors" / "sst2" / "errors-*.parquet"))[0])
    assert sorted(errors.column("id").to_pylist()) == sorted(BAD_IDS)
    check_errors(errors)
    assert "in = written + rejected: ok" in summary.render()
    assert "fused policy (leave-one-out, on 30 rows, accuracy): k=" in summary.render()


def test_build_db_fits_to_the_metric_the_export_records_for_its_task(segment_artifacts, tmp_path, caplog):  # noqa: F811
    """An export records its task's metric (a task file's own, or its label count's): build-db fits the policies
    to it. An export from before tasks carried one is scored as it was then, by the task's name (`built` above:
    sst2, accuracy)."""
    other = reexported(
        segment_artifacts, tmp_path / "artifacts", lambda m: m["tasks"]["sst2"].update(metric="matthews_corr")
    )
    train = labelled(tmp_path / "train.parquet", 30, 0, "t", bad=False)
    summary = run_build_db(
        str(other), "sst2", [str(train)], str(tmp_path / "db"), "sst2", "backbone", "overwrite", None
    )
    assert "fused policy (leave-one-out, on 30 rows, matthews_corr): k=" in summary.render()
    queries = labelled(tmp_path / "q.parquet", 3, 1, "q", bad=False)
    for artifacts, out in ((other, "o1"), (segment_artifacts, "o2")):  # the second scores by accuracy: noted
        caplog.clear()
        run_classify(str(artifacts), "sst2", str(tmp_path / "db"), "sst2", [str(queries)], str(tmp_path / out), 5, None)
        noted = "policies were fitted for matthews_corr, and the task is scored by accuracy" in caplog.text
        assert noted == (artifacts == segment_artifacts), caplog.text
    exported = load_manifest(segment_artifacts)
    entry = dataclasses.replace(exported.tasks["sst2"], metric=None)
    assert tasks.task_of(dataclasses.replace(exported, tasks={"cola": entry}), "cola").metric_name == "matthews_corr"
    assert tasks.task_of(dataclasses.replace(exported, tasks={"mine": entry}), "mine").metric_name == "accuracy"


def test_an_overwrite_keeps_a_shared_errors_folders_other_files(segment_artifacts, tmp_path):  # noqa: F811
    shared, db = tmp_path / "errors", str(tmp_path / "db")
    train = str(labelled(tmp_path / "t.parquet", 12, 3, "t"))
    for table in ("one", "two"):
        run_build_db(segment_artifacts, "sst2", [train], db, table, "backbone", "overwrite", str(shared))
    assert len(pa.concat_tables(pq.read_table(f) for f in shared.glob("errors-*.parquet"))) == 2 * len(BAD_IDS)
    run_build_db(segment_artifacts, "sst2", [train], db, "one", "backbone", "overwrite", None)  # its own folder
    run_build_db(segment_artifacts, "sst2", [train], db, "one", "backbone", "overwrite", None)
    assert len(list((tmp_path / "db" / "_errors" / "one").glob("errors-*.parquet"))) == 1


def test_the_errors_folder_holds_the_rejected_rows_of_the_runs_the_current_version_holds(segment_artifacts, tmp_path):  # noqa: F811
    """Read whole, the table's errors folder is the rejected rows of the runs whose rows the table holds, each once:
    a rollback past an overwrite brought the rows back and not their rejected rows (the overwrite had removed
    them), and an append rolled back and run again left its rejected rows there twice. Others wait in _replaced/
    until prune removes the last version that holds their runs."""
    db, folder = str(tmp_path / "db"), tmp_path / "db" / "_errors" / "t"

    def build(name, mode):
        data = str(labelled(tmp_path / f"{name}.parquet", 8, 3, name))
        run_build_db(segment_artifacts, "sst2", [data], db, "t", KEY, mode, None)
        return {p.name for p in folder.glob("errors-*.parquet")}

    def state():  # (the folder's files, those set aside), as names
        return {p.name for p in folder.glob("errors-*.parquet")}, {p.name for p in folder.glob("_replaced/*")}

    a = build("a", "overwrite")  # version 1
    b = build("b", "append") - a  # 2
    rollback(db, "t", 1)  # 3
    assert state() == (a, b)
    rollback(db, "t", 2)  # 4
    assert state() == (a | b, set())
    c = build("c", "overwrite")  # 5
    assert state() == (c, a | b)
    rollback(db, "t", 4)  # 6: a's and b's rows, and their rejected rows (they were gone for good)
    assert state() == (a | b, c)
    assert ds.dataset(str(folder)).count_rows() == 2 * len(BAD_IDS)  # _replaced/ is skipped
    rollback(db, "t", 1)  # 7
    again = build("b", "append") - a  # 8: b's job run again, after a rollback past its first run
    assert state() == (a | again, b | c)  # b's first run's rejected rows were there twice
    assert ds.dataset(str(folder)).count_rows() == 2 * len(BAD_IDS)
    prune(db, "t", 1, timedelta(0))  # no version left holds b's first run or c
    assert state() == (a | again, set())


def test_another_databases_rejected_rows_in_a_tables_folder_are_never_set_aside(segment_artifacts, tmp_path):  # noqa: F811
    """Another database's build-db given `<db>/_errors/t` as --errors before table t existed (allowed then: no
    table's folder yet) wrote its rejected rows there; t's build-db then set them aside as a replaced run's, and a
    prune deleted them, exit 0 each time. Only files of runs some version of t recorded are set aside."""
    db, folder = str(tmp_path / "db"), tmp_path / "db" / "_errors" / "t"
    other = str(labelled(tmp_path / "other.parquet", 8, 4, "o"))
    run_build_db(segment_artifacts, "sst2", [other], str(tmp_path / "db2"), "t", KEY, "overwrite", str(folder))
    theirs = {p.name for p in folder.glob("errors-*.parquet")}
    assert theirs
    mine = set()
    for name in ("a", "b"):
        data = str(labelled(tmp_path / f"{name}.parquet", 8, 3, name))
        run_build_db(segment_artifacts, "sst2", [data], db, "t", KEY, "overwrite", None)
        mine = {p.name for p in folder.glob("**/errors-*.parquet")} - theirs - mine
    prune(db, "t", 1, timedelta(0))
    assert {p.name for p in folder.glob("errors-*.parquet")} == theirs | mine  # a's set aside, then pruned
    assert not list(folder.glob("_replaced/*"))
    # a run whose own version is pruned while an append's version still holds its rows is still t's: set aside
    # when an overwrite replaces them (the daily append, then prune, then overwrite)
    data = str(labelled(tmp_path / "c.parquet", 8, 5, "c"))
    run_build_db(segment_artifacts, "sst2", [data], db, "t", KEY, "append", None)
    prune(db, "t", 1, timedelta(0))  # b's own version goes; c's holds b's rows and c's
    data = str(labelled(tmp_path / "d.parquet", 8, 6, "d"))
    run_build_db(segment_artifacts, "sst2", [data], db, "t", KEY, "overwrite", None)
    assert len({p.name for p in folder.glob("errors-*.parquet")} - theirs) == 1  # d's alone, beside theirs


def test_the_errors_folder_after_an_earlier_release_and_whichever_errors_folder_a_run_names(
    segment_artifacts,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    """Versions an earlier release wrote record no lineage: a rollback to one deleted newer runs' rejected rows (it
    took the earlier rule, an overwrite's older runs' files removed); the run record keeps the fields that release
    reads (it refused the table, exit 1, on an unknown one). The table's own folder named with --errors is its own
    folder, and it follows the current version when a run writes its rows elsewhere."""
    db, folder = str(tmp_path / "db"), tmp_path / "db" / "_errors" / "t"

    def build(name, mode, errors=None):
        data = str(labelled(tmp_path / f"{name}.parquet", 8, 3, name))
        run_build_db(segment_artifacts, "sst2", [data], db, "t", KEY, mode, errors)
        return {p.name for p in folder.glob("**/errors-*.parquet")}

    def state():
        return {p.name for p in folder.glob("errors-*.parquet")}, {p.name for p in folder.glob("_replaced/*")}

    with monkeypatch.context() as earlier:  # versions as the earlier release wrote them
        fields = lambda r: {k: v for k, v in asdict(r).items() if k != "lineage"}  # noqa: E731
        earlier.setattr(build_db.RunRecord, "metadata", lambda r: {RUN_META_KEY: json.dumps(fields(r)).encode()})
        new = classmethod(lambda cls, run, mode, job, rejected, base: cls(run, mode, job, rejected))
        earlier.setattr(build_db.RunRecord, "new", new)
        a = build("a", "overwrite")  # version 1
        b = build("b", "append") - a  # 2
    c = build("c", "append") - a - b  # 3: which runs it holds is not known (its base's are not)
    d = build("d", "overwrite") - a - b - c  # 4
    assert state() == (d, a | b | c)
    assert set(json.loads(lancedb.connect(db).open_table("t").schema.metadata[RUN_META_KEY])) == {
        "run_id",
        "mode",
        "job",
        "rejected",
    }
    rollback(db, "t", 1)  # 5: an overwrite the earlier release recorded holds its own run's rows
    assert state() == (a, b | c | d)
    rollback(db, "t", 4)  # 6: d's rejected rows were deleted for good here
    assert state() == (d, a | b | c)
    e = build("e", "overwrite", str(folder)) - a - b - c - d  # the own folder, named: d's moved aside as before
    assert state() == (e, a | b | c | d)
    build("f", "overwrite", str(tmp_path / "elsewhere"))  # rows elsewhere: the own folder holds none of f's runs
    assert state() == (set(), a | b | c | d | e)
    for inside in ("sub", "_replaced"):  # the own folder would show another folder's rows, or lose its own
        with pytest.raises(RaeeConfigError, match="is inside the table's own errors folder"):
            build("g", "append", str(folder / inside))
    rollback(db, "t", 2)  # an append of that release: its own run's files back, none set aside
    g = build("g", "append") - a - b - c - d - e  # onto it: which runs it holds is not known either
    prune(db, "t", 1, timedelta(0))  # kept every set-aside file: a guessed lineage had it delete a's for good
    shown, aside = state()
    assert b | g <= shown and shown | aside == a | b | c | d | e | g


def test_classify_raee_predicts_valid_rows_and_rejects_bad(segment_artifacts, built):  # noqa: F811
    root, _ = built
    summary, predictions, errors = classify(segment_artifacts, root, "raee")
    assert (summary.rows_in, summary.predicted, summary.rejected) == (25, 22, 3)  # labels are not needed
    assert sorted(errors.column("id").to_pylist()) == ["blank", "long", "null"]
    check_errors(errors)
    assert set(predictions.column_names) >= {"id", "text", "label", "prediction", "exit_layer", "confidence"}
    whole = pq.read_table(root / "raee")  # the folder read whole is its predictions (it was the errors' columns)
    assert whole.column_names == predictions.column_names and whole.num_rows == summary.predicted
    assert sum(summary.exit_counts.values()) == summary.predicted
    assert summary.beam_exit_counts == summary.exit_counts  # Beam's counters, the cross-check, agree
    text = summary.render()
    assert "rows in: 25  predicted: 22  rejected: 3" in text and "mean exit layer:" in text
    assert "classify with raee (k=5; 3 layers)" in text


@pytest.mark.parametrize("strategy", ["key-lr", "knn-vote"])
def test_strategies_that_run_no_layer_answer_rows_over_max_length(segment_artifacts, built, strategy):  # noqa: F811
    """Only the backbone refuses a prompt over max_length (its readout is at the end); the key truncates, so a
    strategy answering from the key alone answers such a row instead of rejecting it."""
    root, _ = built
    summary, predictions, errors = classify(segment_artifacts, root, f"no-layer-{strategy}", strategy=strategy, k=50)
    assert (summary.rows_in, summary.predicted, summary.rejected) == (25, 23, 2)
    # what it read, as the run says it: the key's probe ignores --k; the vote has the table's 30 rows, not 50
    expected = {"key-lr": "the probe on the retrieval key", "knn-vote": "k=30 (--k 50; the table holds 30 rows)"}
    assert summary.settings == expected[strategy]
    assert sorted(errors.column("id").to_pylist()) == ["blank", "null"]
    long = predictions.filter(pc.equal(predictions.column("id"), "long"))
    assert long.column("exit_layer").to_pylist() == [0]


def test_default_strategy_uses_the_policy_fitted_at_build_time(segment_artifacts, built):  # noqa: F811
    from raee_ops.retrieval import Retriever

    root, _ = built
    policy = Retriever(str(root / "db"), "sst2").policy
    assert policy is not None and policy.loo_queries == 30 and len(policy.bias) == 3
    summary, predictions, _ = classify(segment_artifacts, root, "fused", strategy="fused")
    assert summary.strategy == "fused" and summary.predicted == 22
    assert policy.settings() in summary.settings  # the table's fitted settings, not defaults (their effect: below)
    summary, _, _ = classify(segment_artifacts, root, "default", strategy=None)
    retriever = Retriever(str(root / "db"), "sst2")
    probe_policy, probes = retriever.probe_policy, retriever.probes
    assert summary.strategy == "probe-fused"
    assert summary.settings.endswith(
        f"{probe_policy.settings()}; probes: {probes.pooling} view, run on the {probes.form} input"
    )


def test_rows_answered_from_retrieval_alone_are_written_with_exit_0(segment_artifacts, built, tmp_path):  # noqa: F811
    import dataclasses

    from raee_ops.schemas.tables import POLICY_META_KEY

    from raee_ops.exit_table import commit
    from raee_ops.retrieval import Retriever

    root, _ = built
    data = lancedb.connect(str(root / "db")).open_table("sst2").to_arrow()
    policy = dataclasses.replace(Retriever(str(root / "db"), "sst2").policy, tau=0.0)  # every vote is decisive
    meta = (data.schema.metadata or {}) | {POLICY_META_KEY: json.dumps(policy.to_dict()).encode()}
    commit(str(tmp_path / "db"), "sst2", data.replace_schema_metadata(meta))
    inputs = str(labelled(tmp_path / "in.parquet", 20, 1, "q"))
    summary, predictions, errors = classify(segment_artifacts, tmp_path, "out", strategy="fused", inputs=inputs)
    assert (summary.rows_in, summary.predicted, summary.rejected) == (25, 22, 3)
    assert summary.exit_counts == {0: 22} and summary.mean_exit == 0.0
    assert set(predictions.column("exit_layer").to_pylist()) == {0}
    assert "tau=0.0" in summary.render()


def test_full_equals_all_layers_and_layer1_exits_first(segment_artifacts, built):  # noqa: F811
    root, _ = built
    _, full, _ = classify(segment_artifacts, root, "full", strategy="full")
    runtime = SegmentRuntime(segment_artifacts)
    task = PRESETS["sst2"]
    prompts = [task.render(t) for t in full.column("text").to_pylist()]
    logits = runtime.all_layers_pooled("sst2", prompts)[0]
    assert full.column("exit_layer").to_pylist() == [3] * full.num_rows
    assert full.column("prediction").to_pylist() == logits[-1].argmax(1).tolist()
    _, first, _ = classify(segment_artifacts, root, "layer1", strategy="layer:1")
    first = first.sort_by("id")
    prompts = [task.render(t) for t in first.column("text").to_pylist()]
    assert set(first.column("exit_layer").to_pylist()) == {1}
    assert first.column("prediction").to_pylist() == runtime.all_layers_pooled("sst2", prompts)[0][0].argmax(1).tolist()


def test_mismatched_tables_and_run_level_errors_fail_before_work(segment_artifacts, built, tmp_path):  # noqa: F811
    root, _ = built
    with pytest.raises(RaeeConfigError, match="task 'sst2'"):
        classify(segment_artifacts, root, "rte", task="rte", inputs=str(root / "train.parquet"))
    tampered = reexported(segment_artifacts, tmp_path / "tampered", lambda m: m["model"].update(fingerprint="other"))
    with pytest.raises(RaeeConfigError, match="fingerprint"):
        classify(tampered, root, "tampered")
    with pytest.raises(RaeeConfigError, match="unknown strategy"):
        classify(segment_artifacts, root, "nostrategy", strategy="fastest")
    with pytest.raises(RaeeConfigError, match="already holds"):  # another job's (the same again is done)
        classify(segment_artifacts, root, "raee-again", strategy="full")
        classify(segment_artifacts, root, "raee-again", strategy="raee")
    (tampered / "layer_001.onnx").write_bytes(b"junk")
    with pytest.raises(RaeeConfigError, match="checksum"):
        classify(tampered, root, "junk")
    assert not (root / "nostrategy").exists() and not (root / "junk").exists()


def test_missing_columns_exit_2_through_the_cli(segment_artifacts, tmp_path):  # noqa: F811
    pq.write_table(pa.table({"text": ["good"]}), tmp_path / "nolabel.parquet")
    args = ["--artifacts", segment_artifacts, "--task", "sst2", "--input", tmp_path / "nolabel.parquet"]
    run = raee_ops("build-db", *args, "--db", tmp_path / "db")
    assert run.returncode == 2
    assert "error:" in run.stderr and "missing column(s) label" in run.stderr
    assert not (tmp_path / "db").exists()


def test_append_adds_new_ids_and_refuses_present_ones(segment_artifacts, tmp_path):  # noqa: F811
    db = str(tmp_path / "db")
    first = labelled(tmp_path / "a.parquet", 6, 3, "a", bad=False)
    run_build_db(segment_artifacts, "sst2", [str(first)], db, "t", KEY, "overwrite", None)
    more = labelled(tmp_path / "b.parquet", 4, 4, "b", bad=False)
    appended = run_build_db(segment_artifacts, "sst2", [str(more)], db, "t", KEY, "append", None)
    assert appended.table_rows == 10 and not appended.done
    again = run_build_db(segment_artifacts, "sst2", [str(more)], db, "t", KEY, "append", None)  # a scheduler's retry
    assert again.done and again.version == appended.version and "already done" in again.render()
    with pytest.raises(RaeeConfigError, match="append refused: 6 id"):  # not the input the current version came from
        run_build_db(segment_artifacts, "sst2", [str(first)], db, "t", KEY, "append", None)
    overlapping = labelled(tmp_path / "b2.parquet", 5, 4, "b", bad=False)  # `more` and one row more
    with pytest.raises(RaeeConfigError, match="append refused: 4 id"):
        run_build_db(segment_artifacts, "sst2", [str(overlapping)], db, "t", KEY, "append", None)
    write_labelled(more, [f"b{i}" for i in range(4)], sentences(4, 9), [0, 1, 0, 1])  # the same ids, other rows
    with pytest.raises(RaeeConfigError, match="append refused: 4 id"):
        run_build_db(segment_artifacts, "sst2", [str(more)], db, "t", KEY, "append", None)
    run_build_db(segment_artifacts, "sst2", [str(first)], db, "u", KEY, "overwrite", None)
    with pytest.raises(RaeeConfigError, match="append refused: 6 id"):  # not an append's job: not done
        run_build_db(segment_artifacts, "sst2", [str(first)], db, "u", KEY, "append", None)
    with pytest.raises(RaeeConfigError, match="embedder"):
        run_build_db(
            segment_artifacts,
            "sst2",
            [str(labelled(tmp_path / "c.parquet", 2, 5, "c", bad=False))],
            db,
            "t",
            "backbone",
            "append",
            None,
        )
    summary = run_classify(segment_artifacts, "sst2", db, "t", [str(more)], str(tmp_path / "out"), 3, "raee")
    assert summary.predicted == 4


def test_an_output_already_done_says_the_settings_it_was_made_with(segment_artifacts, tmp_path):  # noqa: F811
    """The table changed since (an append): a retry's `already done` printed the settings of the table's current
    version beside the counts and version of the one the output was made from."""
    db = str(tmp_path / "db")
    build(segment_artifacts, db, labelled(tmp_path / "a.parquet", 6, 3, "a", bad=False))
    rows, out = str(labelled(tmp_path / "q.parquet", 3, 5, "q", bad=False)), str(tmp_path / "out")
    first = run_classify(segment_artifacts, "sst2", db, "t", [rows], out, 10, "raee")
    assert "k=6 (--k 10; the table holds 6 rows)" in first.settings
    build(segment_artifacts, db, labelled(tmp_path / "b.parquet", 4, 4, "b", bad=False), "append")
    again = run_classify(segment_artifacts, "sst2", db, "t", [rows], out, 10, "raee")
    assert again.done and (again.settings, again.table_version) == (first.settings, first.table_version)


def test_append_refuses_a_table_replaced_before_it_held_the_table(segment_artifacts, tmp_path, monkeypatch):  # noqa: F811
    """Another run replaces the table (another key) between an append's first look and its claim: the append
    must see that under the claim and stop, not merge rows of two keys into the other run's table."""
    db = str(tmp_path / "db")
    build(segment_artifacts, db, labelled(tmp_path / "a.parquet", 6, 3, "a", bad=False))
    other = labelled(tmp_path / "o.parquet", 8, 6, "o", bad=False)
    real = build_db.claim_work_dir

    def replaced_first(*args, **kwargs):
        monkeypatch.setattr(build_db, "claim_work_dir", real)  # the other run, and the append's own claim after it
        run_build_db(segment_artifacts, "sst2", [str(other)], db, "t", "backbone", "overwrite", None)
        return real(*args, **kwargs)

    monkeypatch.setattr(build_db, "claim_work_dir", replaced_first)
    more = labelled(tmp_path / "b.parquet", 4, 4, "b", bad=False)
    with pytest.raises(RaeeConfigError, match="replaced since this run began, does not match this run: embedder"):
        run_build_db(segment_artifacts, "sst2", [str(more)], db, "t", KEY, "append", None)
    assert Retriever(db, "t").meta.embedder == "backbone"
    assert lancedb.connect(db).open_table("t").count_rows() == 8


def test_pair_task_rejects_missing_pairs(segment_artifacts, tmp_path):  # noqa: F811
    texts = sentences(8, 6)
    table = pa.table({"text": texts, "text_pair": texts[::-1][:6] + [None, " "], "label": [0, 1] * 4})
    pq.write_table(table, tmp_path / "rte.parquet")
    summary = run_build_db(
        segment_artifacts,
        "rte",
        [str(tmp_path / "rte.parquet")],
        str(tmp_path / "db"),
        "rte",
        "backbone",
        "overwrite",
        None,
    )
    assert (summary.written, summary.rejected) == (6, 2)
    errors = pq.read_table(glob.glob(str(tmp_path / "db" / "_errors" / "rte" / "*.parquet"))[0])
    key = file_key(str(tmp_path / "rte.parquet"))  # id-less rows are keyed by the file's content, not its path
    assert errors.column("id").to_pylist() == [f"row:{key}:6", f"row:{key}:7"]
    assert errors.column("file").to_pylist() == [str(tmp_path / "rte.parquet")] * 2


def test_predictions_of_an_input_without_ids_carry_the_ids_its_errors_use(segment_artifacts, built):  # noqa: F811
    """Beam writes predictions in shards of its own order: without an id a row could not be joined back to its
    input. Such rows get `row:<file key>:<n>`, as their errors do, so predictions and errors cover the input once."""
    root, _ = built
    texts = [*sentences(6, 9), None, "  ", *sentences(3, 10)]
    path = root / "no-ids.parquet"
    pq.write_table(pa.table({"text": texts}), path)
    summary, predictions, errors = classify(segment_artifacts, root, "no-ids", strategy="full", inputs=str(path))
    key = file_key(str(path))
    assert predictions.column_names[0] == "id" and predictions.schema.field("id").type == pa.string()
    assert sorted(predictions.column("id").to_pylist()) == sorted(f"row:{key}:{n}" for n in [*range(6), 8, 9, 10])
    assert sorted(errors.column("id").to_pylist()) == [f"row:{key}:6", f"row:{key}:7"]
    by_id = dict(zip(predictions.column("id").to_pylist(), predictions.column("text").to_pylist(), strict=True))
    assert all(by_id[f"row:{key}:{n}"] == texts[n] for n in [*range(6), 8, 9, 10])
    assert (summary.predicted, summary.rejected) == (9, 2)
    pq.write_table(pa.table({"id": ["a", None, "c"], "text": sentences(3, 11)}), path)  # a text id column's null
    _, predictions, _ = classify(segment_artifacts, root, "null-id", strategy="full", inputs=str(path))
    assert sorted(predictions.column("id").to_pylist()) == ["a", "c", f"row:{file_key(str(path))}:1"]
    pq.write_table(pa.table({"id": [7, None, 9], "text": sentences(3, 11)}), path)  # a number id column's null
    summary, predictions, errors = classify(
        segment_artifacts, root, "null-number-id", strategy="full", inputs=str(path)
    )
    assert predictions.schema.field("id").type == pa.int64() and sorted(predictions.column("id").to_pylist()) == [7, 9]
    assert errors.column("id").to_pylist() == [f"row:{file_key(str(path))}:1"]
    assert errors.column("reason").to_pylist() == [
        "id is null (an id column of int64 cannot hold the row's position in its place)"
    ]
    assert (summary.predicted, summary.rejected) == (2, 1)
    pq.write_table(pa.table({"id": pa.nulls(3), "text": sentences(3, 11)}), path)  # a column of no id at all
    summary, predictions, _ = classify(segment_artifacts, root, "null-typed-id", strategy="full", inputs=str(path))
    assert predictions.schema.field("id").type == pa.string() and summary.predicted == 3
    assert sorted(predictions.column("id").to_pylist()) == [f"row:{file_key(str(path))}:{n}" for n in range(3)]


def test_a_file_is_hashed_only_where_a_row_is_keyed_by_its_position_once_per_read(tmp_path, monkeypatch):
    """Hashing reads the whole file again (from object storage, a second download): not for rows with ids, once
    for a file read 2 rows at a time; and again on the next read, so a file rewritten at the same path (in a
    process serving many runs) is keyed by its new content, never its old one's. A local file is never hashed
    again: its key is the start of the SHA-256 the run took of it already, checked before and after the read."""
    key = file_key(str(write_labelled(tmp_path / "mixed.parquet", [None], ["good"], [1])))
    hashed = []
    monkeypatch.setattr(inputs, "file_key", lambda path: hashed.append(path) or f"k{len(hashed)}")
    with_ids = write_labelled(tmp_path / "ids.parquet", ["a", "b"], ["good", "bad"], [1, 0])
    mixed = write_labelled(tmp_path / "mixed.parquet", ["a", None, None, "d"], ["good", "bad", "fun", "dull"], [1] * 4)

    def ids(path: Path, content: str) -> list[list[str]]:
        return [
            t.valid[ROW_ID].to_pylist() for t in read_validated_file(str(path), PRESETS["sst2"], True, content, rows=2)
        ]

    assert ids(with_ids, content_digest(str(with_ids))) == [["a", "b"]] and hashed == []
    content = content_digest(str(mixed))
    local = f"row:{content[:16]}"  # the same key a hash of the file gives (as file_key gave the one-row file's)
    assert len(key) == 16 and key != content[:16]
    assert ids(mixed, content) == [["a", f"{local}:1"], [f"{local}:2", "d"]] and hashed == []
    assert inputs.file_keys(str(mixed), content=content)[0].to_pylist() == ["a", f"{local}:1", f"{local}:2", "d"]
    # a digest that is no local SHA-256 (an object store's checksum): hashed, once a read
    monkeypatch.setattr(inputs.storage, "is_local", lambda path: False)
    monkeypatch.setattr(inputs, "unchanged", lambda path, content: None)
    assert ids(mixed, "s3:etag") == [["a", "row:k1:1"], ["row:k1:2", "d"]] and hashed == [str(mixed)]
    assert ids(mixed, "s3:etag") == [["a", "row:k2:1"], ["row:k2:2", "d"]] and hashed == [str(mixed)] * 2
    assert inputs.file_keys(str(mixed))[0].to_pylist() == ["a", "row:k3:1", "row:k3:2", "d"]
    floats = tmp_path / "floats.parquet"  # NaN is no id, as null is (sweep S: two NaN ids were one id twice)
    pq.write_table(
        pa.table({"id": [1.0, float("nan"), float("nan")], "text": ["a", "b", "c"], "label": [1] * 3}), floats
    )
    assert inputs.file_keys(str(floats))[0].to_pylist() == ["1", "row:k4:1", "row:k4:2"]
    # and as the rows are read: they were keyed 'row::1' (no file key), so two files' NaN rows shared an id
    assert ids(floats, "s3:etag") == [["1", "row:k5:1"], ["row:k5:2"]]
    monkeypatch.undo()
    assert file_key(str(mixed)) == content[:16]


def test_the_duplicate_check_reads_ids_as_the_rows_are_stored_in_the_inputs_common_schema(segment_artifacts, tmp_path):  # noqa: F811
    """Ids that only become equal widened (float32 0.1 is 0.10000000149011612 as float64) were checked in each
    file's own type, so a float32 file and a float64 one built a table holding ids twice (exit 0); the check's ids
    are the stored ones for every type the inputs' common schema widens."""
    singles = np.array([0.1, 1000.1, 2000.1, 3000.1], np.float32)
    pairs = {
        "float32/float64": (pa.array(singles), pa.array(singles[:2].astype(np.float64).tolist() + [0.5, 1.5])),
        "float16/float32": (pa.array(singles[:2].astype(np.float16)), pa.array([0.1, 0.2], pa.float32())),
        "int32/int64": (pa.array([1, 2], pa.int32()), pa.array([3, 4], pa.int64())),
        "uint32/int16": (pa.array([5, 6], pa.uint32()), pa.array([-1, 7], pa.int16())),
        "string/large_string": (pa.array(["a", "b"]), pa.array(["c", "d"], pa.large_string())),
        "binary/large_binary": (pa.array([b"e", b"f"]), pa.array([b"g", b"h"], pa.large_binary())),
        "categorical/string": (pa.array(["i", "j"]).dictionary_encode(), pa.array(["k", "l"])),
    }
    for name, (first, second) in pairs.items():
        files = []
        for part, ids in (("a", first), ("b", second)):
            files.append(str(tmp_path / f"{name.replace('/', '-')}-{part}.parquet"))
            rows = {"id": ids, "text": ["good"] * len(ids), "label": pa.array([1] * len(ids), pa.int64())}
            pq.write_table(pa.table(rows), files[-1])
        if name == "float32/float64":
            args = (segment_artifacts, "sst2", files, str(tmp_path / "db"), "t", KEY, "overwrite", None)
            with pytest.raises(RaeeConfigError, match=r"2 id\(s\) occur more than once .*0\.10000000149011612"):
                run_build_db(*args)
        schema, _ = inputs.check_inputs(files, PRESETS["sst2"], need_label=True)
        for path in files:
            stored = [
                t.valid[ROW_ID].to_pylist()
                for t in read_validated_file(path, PRESETS["sst2"], True, content_digest(path), schema)
            ]
            assert inputs.file_keys(path, None, schema)[0].to_pylist() == sum(stored, []), name


def test_text_files_beside_bytes_files_are_read_together_row_by_row(tmp_path):
    """A string text file and a binary one (sweep A, session 65: refused, exit 2): their text read together as
    bytes, each row decoded as its file alone would be, a row that is not UTF-8 rejected with its reason. Other
    columns keep strings and bytes apart (recheck: a text id read as bytes could not hold its row's position)."""
    strings = tmp_path / "a.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["good", "bad"], "label": [1, 0]}), strings)
    raw = pa.table({"id": ["c", "d"], "text": pa.array([b"fine", b"\xff"], pa.large_binary()), "label": [1, 0]})
    pq.write_table(raw, tmp_path / "b.parquet")
    files = [str(strings), str(tmp_path / "b.parquet")]
    schema, rows = inputs.check_inputs(files, PRESETS["sst2"], need_label=True)
    assert (schema.field("text").type, schema.field("id").type, rows) == (pa.large_binary(), pa.string(), 4)
    read = [
        checked
        for path in files
        for checked in read_validated_file(path, PRESETS["sst2"], True, content_digest(path), schema)
    ]
    assert sum((t.valid[ROW_ID].to_pylist() for t in read), []) == ["a", "b", "c"]
    assert sum((t.valid["text"].to_pylist() for t in read), []) == ["good", "bad", "fine"]
    assert [e for t in read for e in t.errors.to_pylist()] == [
        {"id": "d", "reason": "text is not valid UTF-8", "file": files[1]}
    ]


@pytest.mark.filterwarnings("ignore:Possible nested set:FutureWarning")  # pytest resets raee_ops.storage's filter
def test_an_input_named_with_glob_characters_is_that_file(tmp_path):
    """`--input 'data[1].parquet'` (a file that exists) was read as a pattern: "no such file", exit 2 (sweep A,
    session 65). A name that names no file is still a pattern; one that names a file and, as a pattern, matches
    others too is refused (recheck: the others were dropped, exit 0); so is a folder so named (it was "no such
    file"), and a pattern below it is refused unless escaped; a `file://` pattern still matches (recheck: exit 1)."""
    named = write_labelled(tmp_path / "data[1].parquet", ["a"], ["good"], [1])
    assert [m.path for m in inputs.input_files([str(named)])] == [str(named)]
    other = write_labelled(tmp_path / "data2.parquet", ["b"], ["bad"], [0])
    assert [m.path for m in inputs.input_files([str(tmp_path / "data[23].parquet")])] == [str(other)]
    assert [m.path for m in inputs.input_files([f"file://{tmp_path}/data*.parquet"])] == [str(other), str(named)]
    shutil.copy(other, tmp_path / "data1.parquet")
    with pytest.raises(RaeeConfigError, match=r"data\[1\].parquet: names a file, and as a pattern matches .*data1"):
        inputs.input_files([str(named)])
    with pytest.raises(
        RaeeConfigError, match=r"for that file alone write each glob character as \[c\] \(.*data\[\[\]1\]"
    ):
        inputs.input_files([str(named)])  # the message gave no escaped form (recheck, session 66)
    assert [m.path for m in inputs.input_files([storage.escaped(str(named))])] == [str(named)]
    (tmp_path / "dir[1]").mkdir()
    with pytest.raises(RaeeConfigError, match=r"dir\[1\]: a folder; give its files or a glob"):
        inputs.input_files([str(tmp_path / "dir[1]")])
    with pytest.raises(RaeeConfigError, match=r"/nothing/: no such file"):  # was called a folder (sweep B, s68)
        inputs.input_files([f"{tmp_path}/nothing/"])
    with pytest.raises(RaeeConfigError, match=r"data2.parquet/: ends in / but names files \(.*data2.parquet\), not"):
        inputs.input_files([f"{other}/"])  # Beam's match dropped the `/` and read the file
    # a pattern below that folder read another folder's files (`dir1/`), exit 0 (sweep A); escaped, it reads it
    inside = write_labelled(tmp_path / "dir[1]" / "in.parquet", ["c"], ["fine"], [1])
    (tmp_path / "dir1").mkdir()
    write_labelled(tmp_path / "dir1" / "x.parquet", ["d"], ["other"], [0])
    with pytest.raises(RaeeConfigError, match=r"folder .*dir\[1\] has glob characters .*dir\[\[\]1\]/\*.parquet\)"):
        inputs.input_files([f"{tmp_path}/dir[1]/*.parquet"])
    assert [m.path for m in inputs.input_files([f"{tmp_path}/dir[[]1]/*.parquet", str(inside)])] == [str(inside)]
    # in a process of its own: pytest resets warning filters per test
    quiet = "from raee_ops import storage; import sys; print(len(storage.match(sys.argv[1])))"
    run = subprocess.run([sys.executable, "-W", "error", "-c", quiet, f"{tmp_path}/dir[[]1]/*.parquet"], **CAPTURE)
    assert run.stdout == "1\n" and "Warning" not in run.stderr, run.stderr  # Python's FutureWarning on `[[`
    (tmp_path / "gone[1].parquet").symlink_to(tmp_path / "gone.parquet")
    with pytest.raises(RaeeConfigError, match=r"gone\[1\].parquet is not a file that can be read: a link to nothing"):
        inputs.input_files([str(tmp_path / "gone[1].parquet")])


def test_inputs_read_each_local_file_once_and_refuse_what_is_not_a_file(tmp_path):
    """A link to an input is that input (its rows were read twice, under the same ids), a hard link too (sweep S: a
    glob matching a file and its hard link read it twice, exit 0); a link to nothing that a glob matches was skipped
    by Beam's glob without a word, and a named pipe hung the run reading it: both refused."""
    data = tmp_path / "data"
    data.mkdir()
    real = write_labelled(data / "a.parquet", ["a"], ["good"], [1])
    (data / "b.parquet").symlink_to(real.name)
    os.link(real, data / "hard.parquet")
    assert [m.path for m in inputs.input_files([f"{data}/*.parquet", str(real)])] == [str(real)]
    (data / "hard.parquet").unlink()
    (data / "c.parquet").symlink_to(tmp_path / "gone.parquet")
    for pattern in (f"{data}/*.parquet", str(data / "c.parquet")):  # named alone, it was "no such file"
        with pytest.raises(RaeeConfigError, match=r"c.parquet is not a file that can be read: a link to nothing \("):
            inputs.input_files([pattern])
    (data / "c.parquet").unlink()
    (data / "sub").mkdir()
    os.mkfifo(data / "sub" / "d.parquet")
    for pattern in (f"{data}/**.parquet", str(data / "sub" / "d.parquet")):
        with pytest.raises(RaeeConfigError, match=r"d.parquet is not a file that can be read: a named pipe"):
            inputs.input_files([pattern])


def test_a_rewritten_file_gets_its_new_contents_key(tmp_path):
    path = write_labelled(tmp_path / "f.parquet", [None], ["good"], [1])
    before = file_key(str(path))
    write_labelled(path, [None], ["bad"], [0])
    assert file_key(str(path)) != before


def test_a_file_must_hold_the_bytes_its_job_was_taken_from_before_and_after_it_is_read(tmp_path):
    path = labelled(tmp_path / "a.parquet", 4, 3, "a", bad=False)
    other = labelled(tmp_path / "b.parquet", 4, 4, "b", bad=False)
    with pytest.raises(InputChanged, match=f"--input {path} changed while the run read it"):
        next(read_validated_file(str(path), PRESETS["sst2"], True, content_digest(str(other))))
    reading = read_validated_file(str(path), PRESETS["sst2"], True, content_digest(str(path)), rows=2)
    assert next(reading).valid[ROW_ID].to_pylist() == ["a0", "a1"]
    os.replace(other, path)  # replaced while it is read: what is read is the old file, no longer the input
    with pytest.raises(InputChanged) as refused:
        list(reading)
    assert refused.value.exit_code == 75
    gone = read_validated_file(str(path), PRESETS["sst2"], True, content_digest(str(path)), rows=2)
    next(gone)
    path.unlink()  # gone (or its store not answering): said so, not "changed"
    with pytest.raises(InputChanged, match=f"--input {path} could not be read again to check it still holds"):
        list(gone)


def test_a_replacement_that_cannot_be_read_as_the_first_is_the_change_not_a_failure(tmp_path, monkeypatch):
    """Replaced between the before-check and the read by a file without the text column (or a cut-short one): the
    read failed (exit 1, a worker's KeyError; the driver's checks, exit 2), where the cause is the change (75)."""
    path = labelled(tmp_path / "a.parquet", 4, 3, "a", bad=False)
    listed = storage.metadata(str(path))
    first = content_digest(str(path))
    pq.write_table(pa.table({"words": ["x"]}), path)  # another file in its place, of another size
    job = job_of({}, [listed])  # its size as hashed, not as listed (a retry of the same job was another)
    assert job.inputs[0][1:] == [path.stat().st_size, content_digest(str(path))]
    digests = iter([first])
    monkeypatch.setattr(storage, "content_digest", lambda p: next(digests, None) or content_digest(p))
    with pytest.raises(InputChanged):  # the worker's before-check saw the first file, its read the second
        list(read_validated_file(str(path), PRESETS["sst2"], True, first))
    with pytest.raises(InputChanged):  # the driver's: missing column(s) text
        with inputs.reading({str(path): first}):
            inputs.check_inputs([str(path)], PRESETS["sst2"], need_label=True)
    with pytest.raises(RaeeConfigError, match="missing column"):  # unchanged since: the file's own fault
        with inputs.reading({str(path): content_digest(str(path))}):
            inputs.check_inputs([str(path)], PRESETS["sst2"], need_label=True)


def test_a_driver_refusal_of_what_a_replaced_input_holds_is_the_change(segment_artifacts, tmp_path, monkeypatch):  # noqa: F811
    """build-db's own refusals of the input's columns and rows (a --group-column it lacks, one row to overwrite
    with) sat outside the checks that tell a replaced file's fault from the change: exit 2, where it is 75."""
    path, swapped, db = tmp_path / "a.parquet", tmp_path / "one.parquet", str(tmp_path / "db")
    real_checks = build_db.check_inputs

    def replaced_first(*args: object, **kwargs: object) -> object:
        os.replace(swapped, path)  # the job took the first file's digest; its checks read this one
        return real_checks(*args, **kwargs)

    monkeypatch.setattr(build_db, "check_inputs", replaced_first)
    for group in ("topic", None):
        pq.write_table(
            pq.read_table(labelled(path, 6, 3, "a", bad=False)).append_column("topic", pa.array(["x", "y"] * 3)), path
        )
        labelled(swapped, 1, 3, "b", bad=False)  # no topic column, one row
        with pytest.raises(InputChanged):
            run_build_db(segment_artifacts, "sst2", [str(path)], db, "t", KEY, "overwrite", None, group_column=group)
    monkeypatch.undo()
    with pytest.raises(RaeeConfigError, match="--group-column 'topic': no such column"):  # unchanged: its own fault
        run_build_db(segment_artifacts, "sst2", [str(path)], db, "t", KEY, "overwrite", None, group_column="topic")


def test_an_input_replaced_while_the_run_reads_it_ends_the_run_for_a_retry(segment_artifacts, tmp_path, monkeypatch):  # noqa: F811
    """A scheduler's second attempt fetches the input anew while the first still runs: rows of other content (as
    many, so the counts balanced) were published as the job's with exit 0, its marker naming the first content, and
    an append's ids, checked on the file as it was, went into the table twice. Now the run ends for a retry (75)
    with nothing published, and the retry is the new content's job."""
    db = str(tmp_path / "db")
    build(segment_artifacts, db, labelled(tmp_path / "a.parquet", 6, 3, "a", bad=False))
    path = labelled(tmp_path / "new.parquet", 4, 4, "b", bad=False)
    swapped = labelled(tmp_path / "swapped.parquet", 4, 3, "a", bad=False)  # ids a0..a3: in the table already

    def swap(_: object) -> None:
        shutil.copy(swapped, tmp_path / "fetching")
        os.replace(tmp_path / "fetching", path)

    def swapped_once_read(*args: object) -> object:  # the ids the append checks are the first file's, then it goes
        read = real_keys(*args)
        swap(None)
        return read

    real_keys = build_db.file_keys
    monkeypatch.setattr(build_db, "file_keys", swapped_once_read)
    monkeypatch.setattr(classify_pipeline, "check_job_service", swap)  # the driver's last check
    with pytest.raises(InputChanged):
        run_build_db(segment_artifacts, "sst2", [str(path)], db, "t", KEY, "append", None)
    table = lancedb.connect(db).open_table("t")
    assert table.count_rows() == 6 and len(set(table.to_arrow()["id"].to_pylist())) == 6
    labelled(path, 4, 4, "b", bad=False)
    out = tmp_path / "out"
    with pytest.raises(InputChanged):
        run_classify(segment_artifacts, "sst2", db, "t", [str(path)], str(out), 3, "raee")
    assert not (out / "_SUCCESS").exists() and not glob.glob(str(out / "pred*"))
    monkeypatch.undo()
    summary = run_classify(segment_artifacts, "sst2", db, "t", [str(path)], str(out), 3, "raee")
    assert not summary.done and sorted(pq.read_table(out).column("id").to_pylist()) == [f"a{i}" for i in range(4)]


def test_a_gpu_run_of_a_row_by_row_strategy_is_told_a_fixed_depth_runs_faster(segment_artifacts, built, caplog):  # noqa: F811
    """On a GPU a call costs what its deepest row costs (bench/gpu.py): the driver says so for a strategy whose rows
    exit at depths of their own, and not for a fixed depth. Without a GPU here the workers run on the CPU."""
    root, _ = built
    for strategy, warned in (("raee", True), ("probe-best", False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="raee_ops.pipelines.classify"):
            summary, _, _ = classify(
                segment_artifacts, root, f"gpu-{strategy}", strategy, args=["--raee_provider=cuda"]
            )
        assert ("--strategy probe-best" in caplog.text) == warned, caplog.text
        assert (summary.rows_in, summary.predicted, summary.rejected) == (25, 22, 3)


def test_a_k_the_strategy_does_not_read_is_said(segment_artifacts, built, caplog):  # noqa: F811
    """--k given to a strategy with a fitted k, or with no retrieval, went unused without a word."""
    root, _ = built
    for strategy, warned in (("probe-best", True), ("raee", False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="raee_ops.pipelines.classify"):
            classify(segment_artifacts, root, f"k-{strategy}", strategy, k=7)
        assert ("--k 7 is not read by strategy probe-best" in caplog.text) == warned, caplog.text


@pytest.mark.parametrize(
    ("first", "other", "common"),
    [
        (pa.string(), pa.large_string(), pa.large_string()),
        (pa.int32(), pa.int64(), pa.int64()),
        (pa.uint32(), pa.int32(), pa.int64()),
        (pa.uint64(), pa.uint8(), pa.uint64()),
        (pa.null(), pa.string(), pa.string()),
        (pa.dictionary(pa.int32(), pa.string()), pa.string(), pa.string()),
        (pa.uint64(), pa.int64(), None),  # Arrow's int64 cannot hold every uint64
        (pa.int64(), pa.string(), None),
        (pa.float32(), pa.float64(), pa.float64()),
        (pa.float64(), pa.int64(), None),  # an id 1 would read as "1.0"
        (pa.string(), pa.binary(), None),  # as bytes, a text id could not hold its row's position
    ],
)
def test_files_of_one_kind_of_column_are_read_in_the_wider_type(first, other, common):
    """A refusal of two number columns says why they cannot meet (it said they were of another kind, sweep A,
    session 65)."""
    a = pa.schema([pa.field("id", first, nullable=pa.types.is_null(first)), pa.field("text", pa.string())])
    b = pa.schema([pa.field("text", pa.string()), pa.field("id", other)])
    if common is None:
        why = {
            (pa.uint64(), pa.int64()): ": no Arrow type holds every uint64 and every signed integer",
            (pa.float64(), pa.int64()): r": whole numbers would change as they meet floating point .* pandas writes",
        }.get((first, other), "$")
        with pytest.raises(
            RaeeConfigError, match=f"column 'id' is {other} there and {first} in a.parquet; .*kind{why}"
        ):
            inputs.common_schema(a, b, "a.parquet", "b.parquet")
    else:
        assert inputs.common_schema(a, b, "a.parquet", "b.parquet") == pa.schema(
            [("id", common), ("text", pa.string())]
        )


def test_a_version_pruned_while_a_run_reads_it_is_a_retry_not_damage(segment_artifacts, tmp_path):  # noqa: F811
    """prune --grace 0 between classify opening its table version and reading it (sweep K): the run said the
    table's files were damaged, "restore them, or rebuild it", exit 2, which a scheduler does not retry; the table
    was whole, and a rerun reads its current version."""
    db = str(tmp_path / "db")
    for seed in (0, 1):
        train = labelled(tmp_path / f"t{seed}.parquet", 12, seed, f"t{seed}", bad=False)
        run_build_db(segment_artifacts, "sst2", [str(train)], db, "sst2", "backbone", "overwrite", None)
    pinned = open_table(db, "sst2", 1)
    assert prune(db, "sst2", 1, timedelta(0)).removed == [1]
    expected = expected_meta(load_manifest(segment_artifacts), "sst2", "backbone")
    with pytest.raises(VersionRemoved, match="version 1, which this run read, was removed meanwhile"):
        check_table_contents(pinned, expected, True, "table 'sst2'")
    check_table_contents(open_table(db, "sst2"), expected, True, "table 'sst2'")


def test_files_lost_under_a_search_are_damage_not_a_retry(segment_artifacts, tmp_path):  # noqa: F811
    """A data file gone while its version is still the table's (a lost upload, a hand deletion): the one line for
    unreadable files, exit 2, as the driver's check says it; evaluate said "internal error: RuntimeError: lance
    error: Not found" (review M), and the lost file's path is said as on disk. Never exit 75: a rerun would not mend
    it."""
    db = str(tmp_path / "db")
    train = labelled(tmp_path / "t.parquet", 12, 0, "t", bad=False)
    run_build_db(segment_artifacts, "sst2", [str(train)], db, "sst2", "backbone", "overwrite", None)
    retriever = Retriever(db, "sst2")
    for data in (tmp_path / "db" / "sst2.lance" / "data").iterdir():
        data.unlink()
    with pytest.raises(
        RaeeConfigError, match="table 'sst2' in .* cannot be read .damaged or incomplete files"
    ) as raised:
        retriever.search(np.ones((1, retriever.table.schema.field("vector").type.list_size), np.float32), 3)
    assert not isinstance(raised.value, VersionRemoved)
    # the lost file as it is on disk: LanceDB's reader gives it less its leading slash
    assert f"Not found: {tmp_path / 'db' / 'sst2.lance' / 'data'}/" in str(raised.value), raised.value
    (tmp_path / "db" / "sst2.lance" / "data").rmdir()  # the whole data folder gone: the same path
    with pytest.raises(RaeeConfigError, match=f"Not found: {tmp_path / 'db' / 'sst2.lance' / 'data'}/"):
        retriever.search(np.ones((1, retriever.table.schema.field("vector").type.list_size), np.float32), 3)
    key = "Not found: tmp/raee-no-such-folder/db/t.lance/data/a.lance"  # an object store's, in a bucket named tmp
    assert _NOT_FOUND.sub(_rooted, key) == key


def test_a_version_pruned_before_the_workers_read_it_ends_the_run_for_a_retry(segment_artifacts, tmp_path, monkeypatch):  # noqa: F811
    """The same prune after the driver's checks, before a worker opens the version (review L): the job failed, exit
    1, "Version 3 no longer exists. Was it cleaned up?". Now exit 75, nothing published, and a rerun completes."""
    db = str(tmp_path / "db")
    for seed in (0, 1):
        train = labelled(tmp_path / f"t{seed}.parquet", 12, seed, f"t{seed}", bad=False)
        run_build_db(segment_artifacts, "sst2", [str(train)], db, "sst2", "backbone", "overwrite", None)
    queries = labelled(tmp_path / "q.parquet", 3, 2, "q", bad=False)

    def pruned_first(*args, **kwargs):
        rollback(db, "sst2", 1)  # the driver read version 2, which this makes replaced, then removes
        prune(db, "sst2", 1, timedelta(0))
        return Retriever(*args, **kwargs)

    monkeypatch.setattr(batches, "Retriever", pruned_first)
    with pytest.raises(VersionRemoved, match="was removed meanwhile") as raised:
        run_classify(segment_artifacts, "sst2", db, "sst2", [str(queries)], str(tmp_path / "out"), 5, None)
    assert raised.value.exit_code == 75 and not (tmp_path / "out" / "_SUCCESS").exists()
    monkeypatch.undo()
    summary = run_classify(segment_artifacts, "sst2", db, "sst2", [str(queries)], str(tmp_path / "out"), 5, None)
    assert summary.rows_in == summary.predicted == 3
