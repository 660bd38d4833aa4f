"""A backbone without a label-word head (a bare BertModel, like the `minilm-l6` preset): exported and verified, build-db
stores its head answers as absent and fits the probes, probe strategies classify, head-reading ones are refused."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_runs import one_error_line, raee_ops
from raee_ops.pipelines.build_db import run_build_db
from raee_ops.pipelines.classify import run_classify
from raee_ops.pipelines.export import run_export
from raee_ops.schemas.tables import PROBES_META_KEY
from segment_artifacts import write_labelled
from test_probe_pipelines import signal_rows
from tiny_encoders import build_tiny_encoder

from raee_ops.errors import RaeeConfigError
from raee_ops.evaluate import evaluate
from raee_ops.exit_table import commit
from raee_ops.report import render_markdown
from raee_ops.retrieval import open_table
from raee_ops.runtime import SegmentRuntime
from raee_ops.tasks import PRESETS


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    root = tmp_path_factory.mktemp("bare")
    model = build_tiny_encoder("bert-bare", root / "model")
    artifacts = root / "artifacts"
    manifest = run_export(
        str(model), artifacts, [PRESETS["sst2"]], verify=True, embedders=[], max_length=64, beam_args=[]
    )
    ref = signal_rows(root / "ref.parquet", 160, 0, "r")
    summary = run_build_db(str(artifacts), "sst2", [str(ref)], str(root / "db"), "sst2", "backbone", "overwrite", None)
    test = signal_rows(root / "test.parquet", 80, 1, "q")
    return root, artifacts, manifest, summary, test


def test_export_says_there_is_no_head_and_build_db_fits_probes_only(bare):
    root, artifacts, manifest, summary, _ = bare
    ref = root / "ref.parquet"
    assert manifest.label_word_head is False and manifest.tasks["sst2"].head is None
    assert not list(artifacts.glob("head_*.onnx"))
    text = summary.render()
    assert "fused policy: none (the backbone has no label-word head" in text and "probe heads (" in text
    table = open_table(str(root / "db"), "sst2").to_arrow()
    assert not {"layer_pred", "layer_correct", "layer_prob", "layer_logprobs", "first_correct_layer"} & set(
        table.column_names
    )  # absent, not zeros
    assert table.column("probe_correct").null_count == 0 and table.num_rows == 160
    more = signal_rows(root / "more.parquet", 20, 5, "m")
    run_build_db(str(artifacts), "sst2", [str(more)], str(root / "grown"), "t", "backbone", "overwrite", None)
    appended = run_build_db(str(artifacts), "sst2", [str(ref)], str(root / "grown"), "t", "backbone", "append", None)
    assert appended.table_rows == 180 and "probe heads (" in appended.render()


def test_probe_strategies_work_and_zero_shot_numbers_are_absent(bare):
    root, artifacts, _, _, test = bare
    report = evaluate(str(artifacts), "sst2", str(root / "db"), "sst2", [str(test)], k=5).report
    assert report["full"] is None and report["per_layer_accuracy"] is None and report["oracle_metric"] is None
    assert {n for n, b in report["baselines"].items() if b is None} == {"full", "full-cal", "raee"}
    assert {"probe-fused", "probe-conf", "probe-best", "key-lr", "knn-vote"} <= set(report["strategies"])
    assert not {"raee", "full", "fused"} & set(report["strategies"])
    assert report["baselines"]["probe-best"]["accuracy"] >= 0.75  # the signal is learnt without any head
    assert "No label-word head" in render_markdown(report)
    summary = run_classify(str(artifacts), "sst2", str(root / "db"), "sst2", [str(test)], str(root / "out"), 5, None)
    predictions = pa.concat_tables([pq.read_table(f) for f in sorted((root / "out").glob("predictions-*"))])
    accuracy = float(np.mean(predictions.column("prediction").to_numpy() == predictions.column("label").to_numpy()))
    assert summary.strategy == "probe-fused" and summary.predicted == 80
    assert accuracy == pytest.approx(report["strategies"]["probe-fused"]["accuracy"], abs=1e-9)
    with pytest.raises(RaeeConfigError, match="label-word head"):
        evaluate(str(artifacts), "sst2", str(root / "db"), "sst2", [str(test)], strategies=["probe-fused", "layer:1"])


def on_table(bare, command: str, *options):
    """raee-ops `command` on the bare backbone's artifacts, table and test rows."""
    root, artifacts, _, _, test = bare
    return raee_ops(command, "--artifacts", artifacts, "--task", "sst2", "--db", root / "db", "--input", test, *options)


def test_head_reading_strategy_is_refused_at_the_start_with_exit_2(bare):
    out = bare[0] / "refused"
    run = on_table(bare, "classify", "--output", out, "--strategy", "raee")
    assert run.returncode == 2
    assert "strategy raee reads the label-word head" in one_error_line(run)
    assert not out.exists()  # refused before the run claimed its output


def test_evaluate_cli_reports_a_backbone_without_a_head(bare):
    report = bare[0] / "report"
    run = on_table(bare, "evaluate", "--report", report, "--strategy", "probe-fused")
    assert run.returncode == 0, run.stderr
    assert (
        "evaluated: rows in: 80  scored: 80  rejected: 0  (in = scored + rejected: ok); no label-word head"
        in run.stdout
    )
    assert "probe-fused: accuracy " in run.stdout and (report / "report.md").exists()


def test_probes_on_the_bare_input_run_no_prompt_pass_and_refuse_no_row_for_its_prompt(bare, tmp_path, monkeypatch):
    """A bare encoder's table whose probes read the bare input: nothing reads the prompt (no head, no layer key), so
    evaluate runs the bare input only, and a row whose prompt is over max_length but whose bare input fits is scored,
    as classify answers it (the probes here are the prompt's, relabelled: only the plumbing is under test)."""
    root, artifacts, manifest, _, test = bare
    data = open_table(str(root / "db"), "sst2").to_arrow()
    raw = json.loads(data.schema.metadata[PROBES_META_KEY]) | {"pooling": "bare-mean"}
    db = str(tmp_path / "db")
    commit(db, "sst2", data.replace_schema_metadata(data.schema.metadata | {PROBES_META_KEY: json.dumps(raw).encode()}))
    runtime, sst2 = SegmentRuntime(str(artifacts)), PRESETS["sst2"]
    rows = pq.read_table(test)
    texts = [*rows["text"].to_pylist(), " ".join(["good movie"] * 28)]
    inputs = write_labelled(
        tmp_path / "long.parquet", [*rows["id"].to_pylist(), "long"], texts, [*rows["label"].to_pylist(), 1]
    )
    prompts = {form: [sst2.render(t, suffix=runtime.suffix, form=form) for t in texts] for form in ("prompt", "bare")}
    lengths = {form: len(runtime.encode(rendered[-1:])[0]) for form, rendered in prompts.items()}
    assert lengths["bare"] <= manifest.max_length < lengths["prompt"], lengths
    read = []
    all_layers_pooled = SegmentRuntime.all_layers_pooled
    monkeypatch.setattr(
        SegmentRuntime,
        "all_layers_pooled",
        lambda self, task, batch: read.extend(batch) or all_layers_pooled(self, task, batch),
    )
    report = evaluate(str(artifacts), "sst2", db, "sst2", [str(inputs)], k=5).report
    assert report["rejected"] == 0 and report["probes"]["form"] == "bare"
    assert sorted(read) == sorted(prompts["bare"])  # once each, and no prompt
    summary = run_classify(str(artifacts), "sst2", db, "sst2", [str(inputs)], str(tmp_path / "out"), 5, None)
    assert summary.predicted == len(texts)
