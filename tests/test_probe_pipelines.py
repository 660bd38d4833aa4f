"""Probe heads end to end on tiny segment artifacts: a task with a known signal, append refits, classify reads the
probes exactly as evaluate scores them, tables whose probes do not match are refused, and reference groups."""

import json
import os
import re
from pathlib import Path

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from raee_ops.pipelines import build_db as build_db_module
from raee_ops.pipelines.build_db import run_build_db
from raee_ops.pipelines.classify import run_classify
from raee_ops.schemas.manifest import load_manifest
from raee_ops.schemas.tables import (
    FEATURES_SUFFIX,
    GROUP,
    POLICY_META_KEY,
    PROBE_POLICY_META_KEY,
    PROBES_META_KEY,
)
from segment_artifacts import KEY, segment_artifacts, write_labelled  # noqa: F401 - fixture

from raee_ops import probes as probes_module
from raee_ops import reference as reference_module
from raee_ops import storage
from raee_ops.batches import LayerRows
from raee_ops.errors import RaeeConfigError
from raee_ops.evaluate import evaluate
from raee_ops.exit_policy import Context, Neighbours, resolve
from raee_ops.exit_table import claimed_append_base, commit, current_version
from raee_ops.faults import InjectedFault
from raee_ops.inputs import read_validated_file
from raee_ops.probe_policy import (
    DEFAULT_LAYER_BUDGET,
    DEFAULT_LAYER_PRICE,
    HALVINGS,
    NEVER_CONFIDENT,
    confident_exits,
)
from raee_ops.readout import answer_batch
from raee_ops.reference import Reference, assemble
from raee_ops.report import render_markdown, write_report
from raee_ops.retrieval import Retriever, expected_meta, table_names
from raee_ops.rows import ROW_ID
from raee_ops.runtime import SegmentRuntime
from raee_ops.tasks import PRESETS
from raee_ops.versions import rollback

NEUTRAL = "movie plot the a is was it cat sat on mat dog".split()


def signal_rows(path, n: int, seed: int, prefix: str):
    """Label 1 iff the text holds `good` (else `bad`), among 1-3 neutral words."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    texts = []
    for label in labels:
        words = list(rng.choice(NEUTRAL, size=rng.integers(1, 4)))
        words.insert(rng.integers(len(words) + 1), "good" if label else "bad")
        texts.append(" ".join(words))
    ids = [f"{prefix}{i}" for i in range(n)]
    return write_labelled(path, ids, texts, labels)


@pytest.fixture(scope="module")
def signal(segment_artifacts, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("signal")
    ref = signal_rows(root / "ref.parquet", 160, 0, "r")
    summary = run_build_db(segment_artifacts, "sst2", [str(ref)], str(root / "db"), "sst2", KEY, "overwrite", None)
    test = signal_rows(root / "test.parquet", 120, 1, "q")
    evaluation = evaluate(segment_artifacts, "sst2", str(root / "db"), "sst2", [str(test)], k=5)
    return root, summary, test, evaluation


def test_probes_beat_the_zero_shot_head_on_a_task_with_a_known_signal(signal):
    root, summary, _, evaluation = signal
    report = evaluation.report
    assert f"table `sst2` (version {report['table_version']}," in render_markdown(report)
    assert report["table_version"] == Retriever(str(root / "db"), "sst2").table.version  # the version it read, named
    base = report["baselines"]
    assert "probe heads (" in summary.render() and "probe policy (" in summary.render()
    estimate = Retriever(str(root / "db"), "sst2").probe_policy.estimate  # the choice scored on rows it was not made on
    assert f"probe-best chosen alike {estimate.probe_best:.3f}" in summary.render() and estimate.probe_best >= 0.85
    assert base["probe-best"]["accuracy"] >= 0.85
    assert base["probe-best"]["accuracy"] >= base["full"]["accuracy"] + 0.15
    assert base["default"]["accuracy"] >= base["full"]["accuracy"] + 0.15
    assert max(report["per_layer_probe_accuracy"]) > max(report["per_layer_accuracy"])
    assert set(base) == {
        "key-lr",
        "knn-vote",
        "majority",
        "probe-best",
        "probe-last",
        "full",
        "full-cal",
        "raee",
        "default",
    }
    assert base["default"]["accuracy"] >= base["majority"]["accuracy"] + 0.15 and "warning:" not in summary.render()
    # the default against each: the gap of the two metrics on the same rows, with its spread over resampled rows
    assert set(report["default_against"]) == set(base) - {"default"}
    for name, against in report["default_against"].items():
        assert against["difference"] == pytest.approx(base["default"]["metric"] - base[name]["metric"])
        assert against["standard_error"] > 0  # the default answers differently from each on some rows
    assert "default minus it" in render_markdown(report)


def test_classify_reads_probes_as_evaluate_scores_them(segment_artifacts, signal):  # noqa: F811
    root, _, test, evaluation = signal
    report = evaluation.report
    runtime = SegmentRuntime(segment_artifacts)
    retriever = Retriever(str(root / "db"), "sst2")
    probes = retriever.probes
    ctx = Context(3, 2, 5, retriever.policy, probes, retriever.probe_policy)
    texts = pq.read_table(test).column("text").to_pylist()
    prompts = [PRESETS["sst2"].render(t, form=probes.form) for t in texts]
    _, pooled = runtime.all_layers_pooled("sst2", prompts)
    every = np.stack([p.log_probs(pooled[i, :, probes.pool_index]) for i, p in enumerate(probes.layers)])  # L×B×C
    nb = Neighbours.none(len(prompts), 3, 2)
    for t in (0.6, 0.9, None):
        strategy = resolve("probe-conf", 3)
        ctx_t = Context(3, 2, 5, ctx.policy, probes, _with_conf(ctx.probe_policy, t))
        probs, exits = answer_batch(runtime, "sst2", prompts, strategy, nb, ctx_t)
        expected = confident_exits(np.exp(every).max(axis=2).T, np.full(len(prompts), 3), t)
        assert exits.tolist() == expected.tolist()
        np.testing.assert_allclose(probs, np.exp(every[exits - 1, np.arange(len(prompts))]), rtol=1e-3, atol=1e-4)
    labels = pq.read_table(test).column("label").to_numpy()
    summary = run_classify(segment_artifacts, "sst2", str(root / "db"), "sst2", [str(test)], str(root / "out"), 5, None)
    assert summary.strategy == "probe-fused" and summary.predicted == len(labels)
    predictions = pa.concat_tables([pq.read_table(f) for f in sorted((root / "out").glob("predictions-*"))])
    accuracy = float(np.mean(predictions.column("prediction").to_numpy() == predictions.column("label").to_numpy()))
    assert accuracy == pytest.approx(report["strategies"]["probe-fused"]["accuracy"], abs=1e-9)
    histogram = report["strategies"]["probe-fused"]["exit_histogram"]
    assert summary.exit_counts == {layer: n for layer, n in enumerate(histogram) if n}


def test_probes_that_read_the_bare_input_are_run_on_it_by_classify_and_evaluate(segment_artifacts, signal, tmp_path):  # noqa: F811
    """A table whose probes chose a bare-input view: classify renders rows bare for the strategies reading probes,
    evaluate reads the staged bare states, and both answer as those probes on bare states do (the probes here are
    the prompt's, relabelled: only the plumbing is under test)."""
    root, _, test, _ = signal
    data = lancedb.connect(str(root / "db")).open_table("sst2").to_arrow()
    raw = json.loads(data.schema.metadata[PROBES_META_KEY]) | {"pooling": "bare-mean"}
    db = str(tmp_path / "db")
    commit(db, "sst2", data.replace_schema_metadata(data.schema.metadata | {PROBES_META_KEY: json.dumps(raw).encode()}))
    probes = Retriever(db, "sst2").probes
    assert probes.form == "bare"
    rows = pq.read_table(test)
    runtime = SegmentRuntime(segment_artifacts)
    last = {}
    for form in ("bare", "prompt"):
        _, pooled = runtime.all_layers_pooled(
            "sst2", [PRESETS["sst2"].render(t, form=form) for t in rows["text"].to_pylist()]
        )
        last[form] = probes.layers[-1].log_probs(pooled[-1, :, 0]).argmax(axis=1)
    assert (last["bare"] != last["prompt"]).any()  # so reading the wrong form would show
    summary = run_classify(segment_artifacts, "sst2", db, "sst2", [str(test)], str(tmp_path / "out"), 5, "probe-last")
    assert summary.predicted == rows.num_rows
    assert "probes: bare-mean view, run on the bare input" in summary.render()
    predictions = pa.concat_tables([pq.read_table(f) for f in sorted((tmp_path / "out").glob("predictions-*"))])
    order = {row_id: i for i, row_id in enumerate(rows["id"].to_pylist())}
    expected = last["bare"][[order[i] for i in predictions["id"].to_pylist()]]
    assert predictions["prediction"].to_numpy().tolist() == expected.tolist()
    report = evaluate(segment_artifacts, "sst2", db, "sst2", [str(test)], k=5).report
    labels = rows["label"].to_numpy()
    assert report["probes"]["form"] == "bare"
    assert report["baselines"]["probe-last"]["accuracy"] == pytest.approx(float(np.mean(last["bare"] == labels)))


def test_another_layer_budget_or_price_runs_the_settings_the_table_keeps_for_it(segment_artifacts, signal, tmp_path):  # noqa: F811
    """--layer-budget and --layer-price: classify and evaluate run the settings build-db fitted for them (kept with
    the table, no refit); evaluate's sweep scores them as classify runs them, and the table's own as the default."""
    root, _, test, evaluation = signal
    report = evaluation.report
    db = str(root / "db")
    policy = Retriever(db, "sst2").probe_policy
    assert (policy.layer_budget, policy.layer_price) == (DEFAULT_LAYER_BUDGET, DEFAULT_LAYER_PRICE)
    sweep_rows = report["default_by_budget"]
    sweep = {(b["layer_budget"], b["layer_price"]): b for b in sweep_rows}
    own = report["strategies"]["probe-fused"]
    assert report["layer_cost"] == {"layer_budget": policy.layer_budget, "layer_price": policy.layer_price}
    assert "(--layer-budget, --layer-price)" not in render_markdown(report)
    table_own = sweep[policy.layer_budget, policy.layer_price]
    assert (table_own["accuracy"], table_own["mean_exit_layer"]) == (own["accuracy"], own["mean_exit_layer"])
    runs = {
        (0.1, 0.1): ({"layer_budget": 0.1}, policy.within(0.1)),
        (1.0, 0.0): ({"layer_price": 0.0}, policy.within(1.0, 0.0)),
        (1.0, 2.0): ({"layer_price": 2.0}, policy.within(1.0, 2.0)),
    }
    assert len({settings.loo_mean_exit for _, settings in runs.values()}) == 3  # each runs other settings
    for (budget, price), (option, settings) in runs.items():
        out = tmp_path / f"out-{budget}-{price}"
        summary = run_classify(segment_artifacts, "sst2", db, "sst2", [str(test)], str(out), 5, None, **option)
        assert settings.settings() in summary.render()
        predictions = pa.concat_tables([pq.read_table(f) for f in sorted(out.glob("predictions-*"))])
        right = predictions["prediction"].to_numpy() == predictions["label"].to_numpy()
        exits = predictions["exit_layer"].to_numpy()
        scored = evaluate(segment_artifacts, "sst2", db, "sst2", [str(test)], k=5, **option).report
        # the table's own policy is reported as it, this run's cost beside it (sweep U: the override was shown as
        # the table's, and the sweep "within the table's budget" ran within the override's)
        assert scored["probe_policy"] == report["probe_policy"] and scored["default_by_budget"] == sweep_rows
        assert scored["layer_cost"] == {"layer_budget": budget, "layer_price": price}
        assert f"at layer budget {budget}, layer price {price} (--layer-budget" in render_markdown(scored)
        for expected in (scored["strategies"]["probe-fused"], sweep.get((budget, price), {})):
            assert float(np.mean(right)) == pytest.approx(expected.get("accuracy", np.mean(right)), abs=1e-9)
            assert float(exits.mean()) == pytest.approx(expected.get("mean_exit_layer", exits.mean()), abs=1e-9)
    assert {(0.1, 0.1), (1.0, 0.0)} <= set(sweep)  # the sweep shows what those two runs ran
    for option in ({"layer_budget": 0.5}, {"layer_price": 0.2}):
        with pytest.raises(RaeeConfigError, match="'raee' has none"):
            run_classify(segment_artifacts, "sst2", db, "sst2", [str(test)], str(tmp_path / "x"), 5, "raee", **option)
    assert not (tmp_path / "x").exists()


def _with_conf(policy, t):
    import dataclasses

    return dataclasses.replace(policy, conf_t=NEVER_CONFIDENT if t is None else t)


def test_append_refits_the_probes_on_every_row(segment_artifacts, signal, tmp_path):  # noqa: F811
    db = str(tmp_path / "db")
    run_build_db(
        segment_artifacts,
        "sst2",
        [str(signal_rows(tmp_path / "a.parquet", 40, 2, "a"))],
        db,
        "t",
        KEY,
        "overwrite",
        None,
        layer_budget=0.5,
        layer_price=0.0,
    )
    built = Retriever(db, "t")
    before = built.probes
    base = claimed_append_base(db, "t", built.meta, pa.array([], pa.string()), "another job", {})
    assert base.views == (before.pooling,)  # the refit keeps the view: no other input form is run
    more = signal_rows(tmp_path / "b.parquet", 30, 3, "b")
    run_build_db(segment_artifacts, "sst2", [str(more)], db, "t", KEY, "append", None)
    after = Retriever(db, "t")
    assert before.fit_rows == 40 and after.probes.fit_rows == 70 and after.probes.identity["rows"] == 70
    assert after.probes.pooling == before.pooling
    assert not np.array_equal(after.probes.key.weight, before.key.weight)
    assert lancedb.connect(db).open_table("t" + FEATURES_SUFFIX).count_rows() == 70
    assert after.has_probe_answers
    # the append kept the layer budget and price the table was built with (it reset them to the defaults)
    kept = after.probe_policy
    assert (kept.layer_budget, kept.layer_price) == (0.5, 0.0)
    run_build_db(
        segment_artifacts,
        "sst2",
        [str(signal_rows(tmp_path / "c.parquet", 6, 4, "c"))],
        db,
        "t",
        KEY,
        "append",
        None,
        layer_price=0.2,
    )  # one given: that one changes
    kept = Retriever(db, "t").probe_policy
    assert (kept.layer_budget, kept.layer_price) == (0.5, 0.2)
    # a table of one row would have nothing to fit its probes on, nor keep for an append: refused, nothing written
    one = str(tmp_path / "one")
    with pytest.raises(RaeeConfigError, match="'t' would hold 1 row"):
        run_build_db(
            segment_artifacts,
            "sst2",
            [str(signal_rows(tmp_path / "c.parquet", 1, 4, "c"))],
            one,
            "t",
            KEY,
            "overwrite",
            None,
        )
    assert not os.path.exists(one)  # refused before any work, as exit 2 promises: nothing created
    # refused after its pipeline (an empty table and one row), with no row rejected: nothing left behind either, so
    # the next run has no 'earlier, unfinished run' to clean up after
    empty = pa.table(
        {"id": pa.array([], pa.string()), "text": pa.array([], pa.string()), "label": pa.array([], pa.int64())}
    )
    pq.write_table(empty, tmp_path / "empty.parquet")
    run_build_db(
        segment_artifacts, "sst2", [str(tmp_path / "empty.parquet")], one, "t", KEY, "overwrite", None, allow_empty=True
    )
    before = sorted(str(p.relative_to(one)) for p in Path(one).rglob("*"))
    with pytest.raises(RaeeConfigError, match="'t' would hold 1 row"):
        run_build_db(segment_artifacts, "sst2", [str(tmp_path / "c.parquet")], one, "t", KEY, "append", None)
    assert sorted(str(p.relative_to(one)) for p in Path(one).rglob("*")) == before


def test_the_hindsight_bound_scores_what_its_settings_score_and_no_less_than_the_default(
    segment_artifacts,  # noqa: F811
    signal,
    tmp_path,
):
    """evaluate's in-sample bound is the best setting of the default's grid on the scored rows within the budget:
    stored as a table's policy, its settings score exactly that through the strategy's own path, and the default's
    setting, when it stays within the budget on these rows, scores no more; nor does the held-out estimate."""
    root, _, test, evaluation = signal
    report = evaluation.report
    bound, default = report["default_hindsight"], report["baselines"]["default"]
    assert default["mean_exit_layer"] <= bound["layer_budget"] * report["num_layers"]  # so the default competes
    assert bound["metric"] >= default["metric"] >= 0 and bound["metric"] >= bound["held_out_metric"]
    assert bound["halvings"] == HALVINGS and bound["default_held_out_metric"] > 0.5  # the synthetic signal
    write_report(evaluation, str(tmp_path / "report"))
    assert "chosen on one random half and scored on the other" in (tmp_path / "report" / "report.md").read_text()
    data = lancedb.connect(str(root / "db")).open_table("sst2").to_arrow()
    policy = json.loads(data.schema.metadata[PROBE_POLICY_META_KEY]) | bound["settings"]
    commit(
        str(tmp_path / "db"),
        "sst2",
        data.replace_schema_metadata(data.schema.metadata | {PROBE_POLICY_META_KEY: json.dumps(policy).encode()}),
    )
    replayed = evaluate(segment_artifacts, "sst2", str(tmp_path / "db"), "sst2", [str(test)], k=5).report
    assert replayed["baselines"]["default"]["metric"] == pytest.approx(bound["metric"])
    assert replayed["baselines"]["default"]["mean_exit_layer"] == pytest.approx(bound["mean_exit_layer"])
    # a table built before policies kept their reference curve and budget has no bound, and one built before
    # probes kept their label counts no `majority`; it is still evaluated, and a named `majority` refused
    older = {key: value for key, value in policy.items() if key not in ("curve", "layer_budget", "frontier")}
    older.pop("conf_frontier")
    probes = {k: v for k, v in json.loads(data.schema.metadata[PROBES_META_KEY]).items() if k != "label_counts"}
    older_meta = {PROBE_POLICY_META_KEY: json.dumps(older).encode(), PROBES_META_KEY: json.dumps(probes).encode()}
    commit(str(tmp_path / "db"), "older", data.replace_schema_metadata(data.schema.metadata | older_meta))
    old = evaluate(segment_artifacts, "sst2", str(tmp_path / "db"), "older", [str(test)], k=5)
    assert old.report["default_hindsight"] is None and old.report["baselines"]["default"] is not None
    assert old.report["baselines"]["majority"] is None and report["baselines"]["majority"] is not None
    with pytest.raises(RaeeConfigError, match="strategy majority reads the label counts .* table 'older'"):
        evaluate(segment_artifacts, "sst2", str(tmp_path / "db"), "older", [str(test)], strategies=["majority"])
    with pytest.raises(RaeeConfigError, match="strategy majority reads the label counts"):
        run_classify(
            segment_artifacts, "sst2", str(tmp_path / "db"), "older", [str(test)], str(tmp_path / "o"), 5, "majority"
        )
    write_report(old, str(tmp_path / "older-report"))
    assert "with hindsight" not in (tmp_path / "older-report" / "report.md").read_text()


def test_tables_whose_probes_do_not_match_are_refused(segment_artifacts, signal, tmp_path):  # noqa: F811
    root, _, test, _ = signal
    data = lancedb.connect(str(root / "db")).open_table("sst2").to_arrow()
    raw = json.loads(data.schema.metadata[PROBES_META_KEY])
    raw["identity"]["fingerprint"] = "other-artifacts"
    commit(
        str(tmp_path / "db"),
        "sst2",
        data.replace_schema_metadata(data.schema.metadata | {PROBES_META_KEY: json.dumps(raw).encode()}),
    )
    with pytest.raises(RaeeConfigError, match="probe heads of table 'sst2'.*fingerprint 'other-artifacts'"):
        run_classify(
            segment_artifacts, "sst2", str(tmp_path / "db"), "sst2", [str(test)], str(tmp_path / "o"), 5, "raee"
        )
    with pytest.raises(RaeeConfigError, match="probe heads"):
        evaluate(segment_artifacts, "sst2", str(tmp_path / "db"), "sst2", [str(test)])
    # a table grown behind the probes' back (rows they were not fitted on)
    commit(str(tmp_path / "db"), "grown", pa.concat_tables([data, data.slice(0, 1)]))
    with pytest.raises(RaeeConfigError, match="rows 160 \\(expected 161\\)"):
        run_classify(
            segment_artifacts, "sst2", str(tmp_path / "db"), "grown", [str(test)], str(tmp_path / "o2"), 5, None
        )
    # a table without probes refuses the strategies that read them, not the others
    commit(
        str(tmp_path / "db"),
        "bare",
        data.replace_schema_metadata({k: v for k, v in data.schema.metadata.items() if k != PROBES_META_KEY}),
    )
    with pytest.raises(RaeeConfigError, match="no probe heads"):
        run_classify(
            segment_artifacts, "sst2", str(tmp_path / "db"), "bare", [str(test)], str(tmp_path / "o3"), 5, "probe-best"
        )
    assert (
        run_classify(
            segment_artifacts, "sst2", str(tmp_path / "db"), "bare", [str(test)], str(tmp_path / "o4"), 5, "raee"
        ).predicted
        == 120
    )
    # a newer release's table: a field this one does not know changes the fitted rule, so none of it is run
    newer = {
        PROBE_POLICY_META_KEY: json.dumps(json.loads(data.schema.metadata[PROBE_POLICY_META_KEY]) | {"gate": 1}),
        PROBES_META_KEY: json.dumps(json.loads(data.schema.metadata[PROBES_META_KEY]) | {"calibration": [1.0]}),
    }
    for key, what in (
        (PROBE_POLICY_META_KEY, "probe policy holds gate"),
        (PROBES_META_KEY, "probe heads holds calibration"),
    ):
        meta = data.schema.metadata | {key: newer[key].encode()}
        read = current_version(str(tmp_path / "db"), "newer")  # the second time round, the first's
        commit(str(tmp_path / "db"), "newer", data.replace_schema_metadata(meta), read=read)
        refusal = f"the table's {what}, which raee-ops .* does not know: a newer release built it"
        with pytest.raises(RaeeConfigError, match=refusal):
            run_classify(
                segment_artifacts, "sst2", str(tmp_path / "db"), "newer", [str(test)], str(tmp_path / "o5"), 5, None
            )
        with pytest.raises(RaeeConfigError, match=refusal):
            evaluate(segment_artifacts, "sst2", str(tmp_path / "db"), "newer", [str(test)])
    assert not (tmp_path / "o5").exists()


def test_groups_are_stored_kept_on_append_and_refused_when_unusable(segment_artifacts, tmp_path):  # noqa: F811
    rows = pq.read_table(signal_rows(tmp_path / "a.parquet", 40, 4, "a"))
    grouped = tmp_path / "grouped.parquet"
    pq.write_table(rows.append_column("sentence", pa.array([f"s{i // 2}" for i in range(40)])), grouped)
    db = str(tmp_path / "db")
    args = (segment_artifacts, "sst2", [str(grouped)], db, "t", KEY)
    summary = run_build_db(*args, "overwrite", None, group_column="sentence")
    assert "leave-one-group-out, 20 groups" in summary.render()
    stored = lancedb.connect(db).open_table("t").to_arrow()
    groups = dict(zip(stored["id"].to_pylist(), stored[GROUP].to_pylist(), strict=True))
    assert groups == {f"a{i}": f"s{i // 2}" for i in range(40)}

    more = signal_rows(tmp_path / "b.parquet", 10, 5, "b")
    renamed = tmp_path / "c.parquet"  # the same rows under other ids, for the second append below
    pq.write_table(pq.read_table(more).set_column(0, "id", pa.array([f"c{i}" for i in range(10)])), renamed)
    run_build_db(segment_artifacts, "sst2", [str(more)], db, "t", KEY, "append", None)
    stored = lancedb.connect(db).open_table("t").to_arrow()
    groups = dict(zip(stored["id"].to_pylist(), stored[GROUP].to_pylist(), strict=True))
    assert groups["a3"] == "s1" and groups["b0"] is None and len(groups) == 50
    document = tmp_path / "document.parquet"  # one new document's passages: one group, the table has the others
    passages = pq.read_table(signal_rows(tmp_path / "d.parquet", 10, 6, "d"))
    pq.write_table(passages.append_column("sentence", pa.array(["d"] * 10)), document)
    run_build_db(segment_artifacts, "sst2", [str(document)], db, "t", KEY, "append", None, group_column="sentence")
    assert lancedb.connect(db).open_table("t").count_rows() == 60

    # a table built before groups existed (no group_id column) still serves searches, and append adds the column
    before = lancedb.connect(db).open_table("t").to_arrow().drop_columns([GROUP])
    commit(db, "v1", before, lancedb.connect(db).open_table("t" + FEATURES_SUFFIX).to_arrow())
    keys = np.stack(before["vector"].to_numpy(zero_copy_only=False)[:3])
    assert Retriever(db, "v1").search(keys, 5).probe().shape == (3, 5, 3)
    run_build_db(segment_artifacts, "sst2", [str(renamed)], db, "v1", KEY, "append", None)
    after = lancedb.connect(db).open_table("v1").to_arrow()
    assert after.num_rows == 70 and after[GROUP].null_count == 70

    with pytest.raises(RaeeConfigError, match="--group-column 'sentense': no such column in .* \\(has: id, text"):
        run_build_db(*args, "overwrite", None, group_column="sentense")
    # the labels as groups: every fold left a label out, each probe scored 0 out of fold (sweep, session 71)
    with pytest.raises(RaeeConfigError, match="--group-column label: the labels themselves"):
        run_build_db(*args, "overwrite", None, group_column="label")
    one = tmp_path / "one.parquet"
    pq.write_table(rows.append_column("sentence", pa.array(["same"] * 40)), one)
    with pytest.raises(RaeeConfigError, match="puts all 40 rows in one group"):
        run_build_db(segment_artifacts, "sst2", [str(one)], db, "u", KEY, "overwrite", None, group_column="sentence")
    assert not (tmp_path / "db" / "u.lance").exists()  # refused before any work
    # one group only once a bad row of another is rejected: refused after the job, which lost that row with a
    # staged file the next run removed (sweep, session 71); it is kept where the line says, nothing else left
    rejected = pa.table(
        {"id": ["x0"], "text": pa.array([None], rows.schema.field("text").type), "label": rows["label"][:1]}
    ).append_column("sentence", pa.array(["other"]))
    pq.write_table(pa.concat_tables([pq.read_table(one), rejected]), one)
    with pytest.raises(RaeeConfigError, match="puts all 40 rows in one group") as refused:
        run_build_db(segment_artifacts, "sst2", [str(one)], db, "u", KEY, "overwrite", None, group_column="sentence")
    kept = re.search(r"; its rejected rows: (\S+)$", str(refused.value))
    assert kept and pq.read_table(kept[1])["id"].to_pylist() == ["x0"]
    assert list((tmp_path / "db" / "_errors" / "u").rglob("*.parquet")) == list(Path(kept[1]).glob("*.parquet"))
    assert not (tmp_path / "db" / "u.lance").exists()
    structs = tmp_path / "structs.parquet"
    pq.write_table(rows.append_column("sentence", pa.array([{"s": i // 2} for i in range(40)])), structs)
    with pytest.raises(RaeeConfigError, match="--group-column 'sentence' has type struct"):
        run_build_db(
            segment_artifacts, "sst2", [str(structs)], db, "u", KEY, "overwrite", None, group_column="sentence"
        )


def test_a_group_key_not_in_utf8_is_refused_naming_the_file_and_column(segment_artifacts, tmp_path):  # noqa: F811
    """A string group column holding bytes that are not UTF-8 failed as an internal error (exit 1), and a binary
    one was refused as 'has type binary, not a group key' though a binary column of UTF-8 values is read as text."""
    rows = pq.read_table(signal_rows(tmp_path / "a.parquet", 40, 4, "a"))
    names = [f"s{i // 2}".encode() for i in range(40)]
    raw = pa.array([*names[:39], b"\xff"], pa.binary())
    db = str(tmp_path / "db")
    for kind, values in {"string": pa.Array.from_buffers(pa.string(), 40, raw.buffers()), "binary": raw}.items():
        path = tmp_path / f"{kind}.parquet"
        pq.write_table(rows.append_column("sentence", values), path, row_group_size=30)
        refusal = f"{path}: --group-column 'sentence' holds a value that is not valid UTF-8 (row 39, counting from 0)"
        with pytest.raises(RaeeConfigError, match=re.escape(refusal)):
            run_build_db(
                segment_artifacts, "sst2", [str(path)], db, kind, KEY, "overwrite", None, group_column="sentence"
            )
        assert not (tmp_path / "db" / f"{kind}.lance").exists()  # refused before any work
    valid = tmp_path / "valid.parquet"
    pq.write_table(rows.append_column("sentence", pa.array(names, pa.binary())), valid)
    summary = run_build_db(
        segment_artifacts, "sst2", [str(valid)], db, "t", KEY, "overwrite", None, group_column="sentence"
    )
    assert "leave-one-group-out, 20 groups" in summary.render()
    stored = lancedb.connect(db).open_table("t").to_arrow()
    assert dict(zip(stored["id"].to_pylist(), stored[GROUP].to_pylist(), strict=True))["a3"] == "s1"


def test_the_label_counts_count_every_row_not_only_the_fit_sample(segment_artifacts, tmp_path, monkeypatch):  # noqa: F811
    """Over FIT_ROWS rows the probes are fitted on a sample; the label counts `majority` and the default's fall-back
    answer with count every row, as the policy's floor does, so both name the same most common label."""
    monkeypatch.setattr(probes_module, "FIT_ROWS", 30)
    rows = signal_rows(tmp_path / "a.parquet", 80, 2, "a")
    run_build_db(segment_artifacts, "sst2", [str(rows)], str(tmp_path / "db"), "t", KEY, "overwrite", None)
    probes = Retriever(str(tmp_path / "db"), "t").probes
    labels = pq.read_table(rows).column("label").to_numpy()
    assert probes.fit_rows < 80 and probes.label_counts == np.bincount(labels, minlength=2).tolist()


def test_append_reads_the_feature_rows_written_with_the_table_version_it_extends(segment_artifacts, tmp_path):  # noqa: F811
    """A rollback restores the exit table alone, and a run killed between its two writes leaves the companion one
    version ahead: either way append must refit on the states of the rows it extends, never on another version's
    states of the same ids."""
    db = str(tmp_path / "db")

    def build(rows, mode: str) -> None:
        run_build_db(segment_artifacts, "sst2", [str(rows)], db, "t", KEY, mode, None)

    def companion() -> pa.Table:
        features = lancedb.connect(db).open_table("t" + FEATURES_SUFFIX).to_arrow()
        return features.filter(pc.starts_with(features["id"], "a")).sort_by("id")

    build(signal_rows(tmp_path / "a.parquet", 40, 2, "a"), "overwrite")
    first, version = companion(), lancedb.connect(db).open_table("t").version
    build(signal_rows(tmp_path / "b.parquet", 40, 5, "a"), "overwrite")  # the same ids, other texts: other states
    second = companion()
    assert not second.equals(first)
    rollback(db, "t", version)
    build(signal_rows(tmp_path / "c.parquet", 20, 6, "c"), "append")
    assert companion().equals(first)
    # a run killed after writing the companion and before the table: its states are the companion's latest
    lancedb.connect(db).create_table("t" + FEATURES_SUFFIX, second, mode="overwrite")
    build(signal_rows(tmp_path / "d.parquet", 20, 7, "d"), "append")
    assert companion().equals(first)


def test_the_same_rows_fit_the_same_table_whatever_the_shards_order(segment_artifacts, tmp_path, monkeypatch):  # noqa: F811
    """The runner bundles rows into the staged shards (a multi-process or remote runner differently run to run), and
    the fits read rows by position (folds, samples): the same 270 rows fitted other policies under
    multi_processing than in process, and 5 of 90 answers differed. The driver reads the rows in id order: a new
    table, and an append (the table's rows, then the new ones), each with a sample of its rows fitted."""
    monkeypatch.setattr(probes_module, "FIT_ROWS", 30)  # the other rows are answered by the fitted probes
    rows = signal_rows(tmp_path / "rows.parquet", 60, 0, "r")
    task = PRESETS["sst2"]
    table = next(iter(read_validated_file(str(rows), task, True, storage.content_digest(str(rows)), rows=60))).valid
    work = LayerRows(str(segment_artifacts), task, "backbone")
    staged = work.run(table, work.load()).rows
    manifest = load_manifest(segment_artifacts)
    meta = expected_meta(manifest, "sst2", "backbone")

    def fitted(name: str, parts: list[pa.Table], base: Reference | None = None) -> Reference:
        shards = [str(tmp_path / f"{name}-{i}.parquet") for i in range(len(parts))]
        for part, shard in zip(parts, shards, strict=True):
            pq.write_table(part, shard)
        old = (base.data, base.features) if base else ()
        return assemble(shards, staged.schema, task, meta, manifest.hidden_size, *old)

    def same(one: Reference, other: Reference) -> bool:
        return one.data.equals(other.data, check_metadata=True) and one.features.equals(other.features)

    shuffled = staged.slice(12, 12).take([3, 1, 2, 0, *range(4, 12)])
    base = fitted("base", [staged.slice(0, 24), staged.slice(24, 12)])
    assert same(base, fitted("base-other", [staged.slice(24, 12), shuffled, staged.slice(0, 12)]))
    assert 0 < base.features.num_rows < 36  # a sample fitted
    grown = fitted("grown", [staged.slice(36)], base)
    assert same(
        grown, fitted("grown-other", [staged.slice(48), staged.slice(36, 12).take(list(range(11, -1, -1)))], base)
    )
    ids = table.column(ROW_ID).to_pylist()
    assert grown.data.column("id").to_pylist() == sorted(ids[:36]) + sorted(ids[36:])
    # the staged states read a few rows at a time, never a shard whole (0.8 GB a thousand SmolLM2 rows, 17 GB at
    # 20,000): the same tables
    parts, whole = [], storage.parquet_batches

    def counted(*args):
        for part in whole(*args):
            parts.append(part.num_rows)
            yield part

    monkeypatch.setattr(reference_module, "STATES_READ", 5)
    monkeypatch.setattr(storage, "parquet_batches", counted)
    small = fitted("small", [staged.slice(0, 24), staged.slice(24, 12)])
    assert same(base, small) and same(grown, fitted("small-grown", [staged.slice(36)], small))
    assert max(parts) == 5 and sum(parts) == 2 * 36 + 2 * 24  # each new row's states read twice: fit, answers


def test_a_reference_lacking_a_label_is_built_with_a_warning_naming_it(segment_artifacts, tmp_path):  # noqa: F811
    """A reference set with no row of some label built with exit 0 and no word, and its table can never answer
    that label (sweep, session 67); build-db's summary now names it. A reference holding every label says nothing."""
    texts = [f"review number {i} of the film" for i in range(12)]
    only_negative = write_labelled(tmp_path / "neg.parquet", [f"n{i}" for i in range(12)], texts, [0] * 12)
    summary = run_build_db(
        segment_artifacts, "sst2", [str(only_negative)], str(tmp_path / "db"), "sst2", KEY, "overwrite", None
    )
    warned = [line for line in summary.render().splitlines() if "no reference row has" in line]
    assert warned == [
        "warning: no reference row has label 'positive': the table holds nothing that answers it (the probes never "
        "saw one, no neighbour carries one); add rows so labelled (build-db --mode append)"
    ]
    both = write_labelled(tmp_path / "both.parquet", [f"b{i}" for i in range(12)], texts, [i % 2 for i in range(12)])
    summary = run_build_db(
        segment_artifacts, "sst2", [str(both)], str(tmp_path / "db2"), "sst2", KEY, "overwrite", None
    )
    assert "no reference row has" not in summary.render()


def _forms_run(monkeypatch) -> dict[str, int]:
    """Rows each input form's all-layer pass ran on, counted as the runtime's passes see them (the local runner
    runs the job in this process)."""
    counts: dict[str, int] = {"prompt": 0, "bare": 0}
    whole = SegmentRuntime.all_layers_pooled

    def counted(self, task: str, prompts):
        form = "prompt" if prompts and prompts[0].startswith("Review:") else "bare"
        counts[form] += len(prompts)
        return whole(self, task, prompts)

    monkeypatch.setattr(SegmentRuntime, "all_layers_pooled", counted)
    return counts


def test_a_large_new_table_runs_a_sample_in_every_form_and_the_other_rows_in_the_chosen_views_only(
    segment_artifacts,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    """build-db ran every input form on every row, though the probes read one: above TWO_PASSES_ABOVE rows a sample
    runs first in every form, its rows choose the view, the others run its form only (and the prompt, for the
    label-word head). Rows rejected in either pass are counted once; a sample of every row fits what one pass fits."""
    monkeypatch.setattr(build_db_module, "TWO_PASSES_ABOVE", 100)
    rows = signal_rows(tmp_path / "rows.parquet", 160, 0, "r")
    good = pq.read_table(rows)
    bad = pa.table({"id": ["x0", "x1"], "text": [None, "good " * 5000], "label": pa.array([1, 0], pa.int64())})
    pq.write_table(pa.concat_tables([good, bad]), rows)  # one rejected as read, one by the pass (too long)

    def build(name: str) -> tuple[object, pa.Table]:
        summary = run_build_db(
            segment_artifacts, "sst2", [str(rows)], str(tmp_path / name), "t", KEY, "overwrite", None
        )
        return summary, lancedb.connect(str(tmp_path / name)).open_table("t").to_arrow()

    monkeypatch.setattr(build_db_module, "CV_ROWS", 1000)  # a sample of every row: the one pass's choice exactly
    whole_sample, whole_table = build("whole")
    monkeypatch.setattr(build_db_module, "TWO_PASSES_ABOVE", 1000)
    one_pass, one_table = build("one")
    assert one_pass.passes is None and "two passes" in whole_sample.render()
    for summary in (whole_sample, one_pass):  # the sample's pass rejected the long row: once, with its reason
        assert (summary.rows_in, summary.written, summary.rejected) == (162, 160, 2)
    fitted = (PROBES_META_KEY, PROBE_POLICY_META_KEY, POLICY_META_KEY)  # the rest names the run
    assert whole_table.equals(one_table) and all(
        whole_table.schema.metadata[k] == one_table.schema.metadata[k] for k in fitted
    )
    # the sample's choice as the one pass makes it, above; here a prompt view, so the other rows run one form
    monkeypatch.setattr(build_db_module, "sample_view", lambda *_: "readout")
    monkeypatch.setattr(build_db_module, "TWO_PASSES_ABOVE", 100)
    monkeypatch.setattr(build_db_module, "CV_ROWS", 60)
    monkeypatch.setenv("RAEE_FAULT", "view")  # a failure between the two jobs: no table, no errors, a rerun whole
    monkeypatch.setenv("RAEE_FAULT_MODE", "raise")
    with pytest.raises(InjectedFault):
        build("two")
    assert "t" not in table_names(lancedb.connect(str(tmp_path / "two")))
    assert not list((tmp_path / "two" / "_errors" / "t").glob("errors-*.parquet"))
    monkeypatch.delenv("RAEE_FAULT")
    counts = _forms_run(monkeypatch)
    two, table = build("two")
    assert (two.rows_in, two.written, two.rejected) == (162, 160, 2)
    assert sorted(table.column("id").to_pylist()) == sorted(good.column("id").to_pylist())
    errors = pa.concat_tables(pq.read_table(f) for f in (tmp_path / "two" / "_errors" / "t").glob("errors-*.parquet"))
    assert sorted(errors.column("id").to_pylist()) == ["x0", "x1"]
    assert json.loads(table.schema.metadata[PROBES_META_KEY])["pooling"] == "readout"
    sampled = int(re.search(r"view \(readout\) chosen on a sample of (\d+) rows", two.render()).group(1))
    assert 30 < sampled < 100 and counts == {"prompt": 160, "bare": sampled}, counts
