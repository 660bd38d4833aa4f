"""The runtime and both pipelines on a real exported backbone (the exporter's tiny Llama)."""

import glob

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from raee_ops.pipelines.build_db import run_build_db
from raee_ops.pipelines.classify import run_classify
from test_pipelines import labelled, sentences

from raee_ops.runtime import SegmentRuntime
from raee_ops.tasks import PRESETS


def test_compaction_and_padding_on_exported_segments(tiny_llama_artifacts):
    runtime = SegmentRuntime(tiny_llama_artifacts)
    prompts = [PRESETS["sst2"].render(t) for t in sentences(9, 7)]
    every = runtime.all_layers_pooled("sst2", prompts)[0]
    exits = np.random.default_rng(0).integers(1, runtime.num_layers + 1, size=len(prompts))
    early = runtime.run_to_exit_pooled("sst2", prompts, exits).logits
    np.testing.assert_allclose(early, every[exits - 1, np.arange(len(prompts))], rtol=1e-4, atol=1e-4)
    alone = np.concatenate([runtime.all_layers_pooled("sst2", [p])[0] for p in prompts[:3]], axis=1)
    np.testing.assert_allclose(every[:, :3], alone, rtol=1e-4, atol=1e-4)


def test_build_and_classify_pair_task(tiny_llama_artifacts, tmp_path):
    texts = sentences(12, 8)
    table = pa.table(
        {
            "id": [f"p{i}" for i in range(13)],
            "text": texts + ["fine"],
            "text_pair": texts[::-1] + [None],
            "label": [0, 1] * 6 + [0],
        }
    )
    pq.write_table(table, tmp_path / "rte.parquet")
    build = run_build_db(
        tiny_llama_artifacts,
        "rte",
        [str(tmp_path / "rte.parquet")],
        str(tmp_path / "db"),
        "rte",
        "backbone",
        "overwrite",
        None,
    )
    assert (build.rows_in, build.written, build.rejected) == (13, 12, 1)
    summary = run_classify(
        tiny_llama_artifacts,
        "rte",
        str(tmp_path / "db"),
        "rte",
        [str(tmp_path / "rte.parquet")],
        str(tmp_path / "out"),
        3,
        "raee",
    )
    assert (summary.predicted, summary.rejected) == (12, 1)
    predictions = pq.read_table(glob.glob(str(tmp_path / "out" / "predictions-*.parquet"))[0])
    assert set(predictions.column("exit_layer").to_pylist()) <= set(
        range(1, SegmentRuntime(tiny_llama_artifacts).num_layers + 1)
    )
    sst2 = run_build_db(
        tiny_llama_artifacts,
        "sst2",
        [str(labelled(tmp_path / "sst2.parquet", 6, 2, "s"))],
        str(tmp_path / "db"),
        "sst2",
        "backbone",
        "overwrite",
        None,
    )
    assert (sst2.rows_in, sst2.written, sst2.rejected) == (11, 7, 4)  # null, blank, bad/null label
