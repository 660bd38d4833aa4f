import ast
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import raee_ops.schemas
from raee_ops.onnx_export import stored_graphs
from segment_artifacts import KEY, segment_artifacts  # noqa: F401 - fixture

from raee_ops.runtime import (
    STORED_GRAPHS,
    SUB_BATCH,
    DeviceChain,
    PromptTooLong,
    SegmentRuntime,
    open_session,
    pool_states,
)

WORDS = "good bad great awful fine movie plot boring fun dull".split()


@pytest.fixture(scope="module")
def runtime(segment_artifacts):  # noqa: F811
    return SegmentRuntime(segment_artifacts)


def prompts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    task = "Review: {}\nSentiment (negative or positive):"
    return [task.format(" ".join(rng.choice(WORDS, size=rng.integers(1, 12)))) for _ in range(n)]


def test_run_to_exit_matches_all_layers_at_each_rows_exit(runtime):
    batch = prompts(SUB_BATCH + 9)  # crosses a sub-batch boundary
    exits = np.random.default_rng(1).integers(1, runtime.num_layers + 1, size=len(batch))
    every = runtime.all_layers_pooled("sst2", batch)[0]
    early = runtime.run_to_exit_pooled("sst2", batch, exits).logits
    np.testing.assert_allclose(early, every[exits - 1, np.arange(len(batch))], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("io_binding", [False, True])
def test_rows_per_call_change_no_answer(segment_artifacts, io_binding):  # noqa: F811
    """CUDA runs 128 rows per ONNX call, the CPU 32: a row's logits, pooled states and exit must not depend on how
    many rows share its call (nor on the padding its longer neighbours bring)."""
    batch = prompts(SUB_BATCH + 9, seed=8)
    exits = np.random.default_rng(3).integers(0, 4, size=len(batch))
    readouts = []
    for size in (5, SUB_BATCH, 128):
        runtime = SegmentRuntime(segment_artifacts, io_binding=io_binding, sub_batch=size)
        assert runtime.sub_batch == size
        readouts.append(runtime.run_to_exit_pooled("sst2", batch, exits.clip(0, runtime.num_layers)))
    for got in readouts[1:]:
        np.testing.assert_array_equal(got.exits, readouts[0].exits)
        np.testing.assert_allclose(got.logits, readouts[0].logits, atol=1e-5, rtol=0)
        np.testing.assert_allclose(got.pooled.astype(np.float32), readouts[0].pooled.astype(np.float32), atol=1e-2)


class CountingTokenizer:
    """A tokenizer that records the prompts it is asked to encode."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.asked = tokenizer, []

    def encode_batch(self, prompts: list[str], add_special_tokens: bool) -> list[Any]:
        self.asked.append(list(prompts))
        return self.tokenizer.encode_batch(prompts, add_special_tokens=add_special_tokens)


def test_a_batch_checked_for_length_is_not_tokenized_again_to_run(segment_artifacts):  # noqa: F811
    """BatchWork.run's length check, then the layers on the rows that fit: one tokenizing. Inside `reusing` only
    prompts it was not given are tokenized; outside it every call tokenizes (a bench pass pays for its own)."""
    runtime, fresh = SegmentRuntime(segment_artifacts), SegmentRuntime(segment_artifacts)
    counting = runtime.tokenizer = CountingTokenizer(runtime.tokenizer)
    first, second = prompts(12, seed=4), prompts(3, seed=5)
    exits = np.full(8, runtime.num_layers)
    with runtime.reusing(runtime.encoded_by_prompt(first)):
        got = runtime.run_to_exit_pooled("sst2", first[:8], exits)
        assert counting.asked == [first]
        assert runtime.encode([second[0], first[0]]) == fresh.encode([second[0], first[0]])
        assert counting.asked[1:] == [[second[0]]]
    np.testing.assert_array_equal(got.logits, fresh.run_to_exit_pooled("sst2", first[:8], exits).logits)
    runtime.encode(first[:2])
    assert counting.asked[2:] == [first[:2]]


@pytest.mark.parametrize("io_binding", [False, True])
def test_rows_that_left_riding_along_change_no_answer(segment_artifacts, io_binding):  # noqa: F811
    """On CUDA a batch is compacted only once few of its rows still run (compact_below): rows that left ride along
    uncounted. Compacting at every exit, at half, or never reads every row out once, at the same layer, the same."""
    batch = prompts(SUB_BATCH + 9, seed=9)
    num_layers = SegmentRuntime(segment_artifacts).num_layers
    exits = np.random.default_rng(4).integers(0, num_layers + 1, size=len(batch))
    states = SegmentRuntime(segment_artifacts).run_to_exit_pooled("sst2", batch, np.full(len(batch), 1)).pooled
    ordered = np.sort(states[:, 0, 0].astype(np.float32))
    gap = int(np.argmax(np.diff(ordered)))
    threshold = (ordered[gap] + ordered[gap + 1]) / 2  # far from every row's value: no row near the cut

    def stop(layer: int, pooled: np.ndarray) -> np.ndarray:
        return np.full(len(pooled), layer == 1) & (pooled[:, 0, 0].astype(np.float32) > threshold)

    readouts = []
    for share in (1.0, 0.5, 0.0):
        runtime = SegmentRuntime(segment_artifacts, io_binding=io_binding, compact_below=share)
        readouts.append(runtime.run_to_exit_pooled("sst2", batch, exits, stop))
    first = readouts[0]
    assert (
        ((first.exits == 1) & (exits > 1)).any()
        and (first.exits[exits == 0] == 0).all()
        and (first.exits <= exits).all()
    )
    for got in readouts[1:]:
        np.testing.assert_array_equal(got.exits, first.exits)
        np.testing.assert_allclose(got.logits, first.logits, atol=1e-5, rtol=0)
        np.testing.assert_allclose(got.pooled.astype(np.float32), first.pooled.astype(np.float32), atol=1e-2)


def test_exit_zero_rows_run_no_layer_and_leave_the_others_unchanged(runtime, monkeypatch):
    batch = prompts(12, seed=3)
    exits = np.array([0, 2, 0, 1, 3, 0, 2, 2, 0, 1, 3, 0])[: len(batch)].clip(0, runtime.num_layers)
    expected = runtime.run_to_exit_pooled("sst2", [batch[i] for i in np.flatnonzero(exits)], exits[exits > 0]).logits
    embedded = []
    real_embed = runtime.embed_batch
    monkeypatch.setattr(runtime, "embed_batch", lambda ids, mask: embedded.append(len(ids)) or real_embed(ids, mask))
    out = runtime.run_to_exit_pooled("sst2", batch, exits).logits
    assert sum(embedded) == np.count_nonzero(exits)  # exit-0 rows never reach the backbone
    assert not out[exits == 0].any()
    np.testing.assert_allclose(out[exits > 0], expected, rtol=1e-5, atol=1e-5)
    assert not runtime.run_to_exit_pooled("sst2", batch[:3], np.zeros(3, int)).logits.any()
    with pytest.raises(ValueError, match="0.."):
        runtime.run_to_exit_pooled("sst2", batch[:1], np.array([-1]))


def test_padded_batch_equals_rows_alone(runtime):
    batch = prompts(5, seed=2)
    together = runtime.all_layers_pooled("sst2", batch)[0]
    alone = np.concatenate([runtime.all_layers_pooled("sst2", [p])[0] for p in batch], axis=1)
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-5)
    assert runtime.run_to_exit_pooled("sst2", [], np.array([], int)).logits.shape == (0, 2)


def test_overlong_prompts_are_refused_not_truncated(runtime):
    with pytest.raises(PromptTooLong):
        runtime.run_to_exit_pooled("sst2", ["good " * 200], np.array([1]))
    with pytest.raises(ValueError):
        runtime.run_to_exit_pooled("sst2", prompts(1), np.array([runtime.num_layers + 1]))


def test_backbone_key_is_mean_embedding_of_raw_text(runtime):
    ids, lengths = runtime.pad(runtime.encode(["good movie"]))
    mean = runtime.embed(ids, runtime.mask_of(lengths, ids.shape[1]))[0].mean(axis=0)
    np.testing.assert_allclose(runtime.key("backbone", ["good movie"])[0], mean / np.linalg.norm(mean), rtol=1e-5)
    pair = runtime.key("backbone", ["good"], ["movie"])
    np.testing.assert_allclose(pair, runtime.key("backbone", ["good movie"]), rtol=1e-6)
    assert runtime.key(KEY, ["good movie", "bad"]).shape == (2, runtime.manifest.embedders[KEY].dim)


def test_embedder_keys_of_a_mixed_length_batch_are_each_rows_own_key(runtime):
    """The key sub-batches run length-sorted; each key must still land on its own row."""
    counts = [1, 40, 3, 25, 2, 60, 7]
    texts = [" ".join(["word"] * n) + f" {i}" for i, n in enumerate(counts * 6)]
    batch = runtime.key(KEY, texts)
    alone = np.concatenate([runtime.key(KEY, [text]) for text in texts])
    np.testing.assert_allclose(batch, alone, atol=1e-5, rtol=0)
    assert len({tuple(np.round(row, 4)) for row in batch}) >= len(counts)  # keys differ by length: not one key


def test_runtime_and_pipelines_do_not_import_torch_transformers_or_sklearn():
    """scikit-learn is imported only inside the probe fit: classify applies probes with numpy."""
    code = (
        "import sys\n"
        "import raee_ops.runtime, raee_ops.retrieval, raee_ops.exit_policy, raee_ops.rows, raee_ops.cli\n"
        "import raee_ops.probes, raee_ops.readout, raee_ops.pipelines.inference, raee_ops.pipelines.build_db\n"
        "import raee_ops.pipelines.classify\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'sklearn'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_core_modules_never_import_the_pipelines():
    """The Beam pipelines are shells over the core (raee_ops/, schemas/): a core module importing one of them ran
    build-db's handler by hand (evaluate) or reached into a pipeline for the errors folder (rollback, prune). Only
    the CLI, which starts the pipelines, imports them."""
    folders = {Path(raee_ops.__file__).parent, Path(raee_ops.schemas.__file__).parent}  # apart, installed editable
    core = [p for folder in folders for p in folder.glob("*.py") if p.name not in ("cli.py", "__main__.py")]
    assert len(core) > 20
    found = []
    for path in core:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [alias.name for alias in node.names] if isinstance(node, ast.Import | ast.ImportFrom) else []
            found += [f"{path.name}: {name}" for name in names if "pipelines" in name.split(".")]
    assert not found, found


def test_every_session_of_a_process_shares_one_thread_pool(segment_artifacts):  # noqa: F811
    """A pool per session meant threads × sessions OS threads in one worker; the shared pool keeps its size."""
    script = (
        "import os, sys, numpy as np\n"
        "os.sched_getaffinity = lambda pid: set(range(8))  # the machine's 2 cores would cut the pool to 2\n"
        "from raee_ops.runtime import SegmentRuntime, process_thread_pool\n"
        "before = len(os.listdir('/proc/self/task'))\n"
        "rt = SegmentRuntime(sys.argv[1], intra_op_threads=3)\n"
        "prompt = 'Review: good\\nSentiment (negative or positive):'\n"
        "rt.run_to_exit_pooled('sst2', [prompt] * 4, np.full(4, rt.num_layers))\n"
        "print(len(rt.layer_sessions) + 1, len(os.listdir('/proc/self/task')) - before, process_thread_pool(5))\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(segment_artifacts)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    sessions, new_threads, pool = map(int, out.stdout.split()[-3:])
    assert sessions >= 3 and pool == 3  # the first size wins
    assert new_threads <= pool + 1  # the pool's workers (and at most one helper thread), not one pool per session


def test_a_pool_larger_than_the_cores_is_cut_to_them():
    """--raee_intra_op_threads is set where the command starts, which cannot know a worker's cores; 1000 threads on
    2 cores stalled a run. A worker cuts its pool to its own cores, saying so."""
    script = (
        "import logging, os\n"
        "logging.basicConfig()\n"
        "os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:1])\n"
        "from raee_ops.runtime import process_thread_pool\n"
        "print(process_thread_pool(1000), len(os.listdir('/proc/self/task')))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    pool, threads = map(int, out.stdout.split())
    assert pool == 1 and threads < 20, out.stdout
    assert "1000 ONNX Runtime threads asked for, more than the process's cores (1): the pool gets 1" in out.stderr


def test_every_session_of_a_process_allocates_from_one_arena(tmp_path):
    """A session's own arena stays at the peak of its largest run, so a chain of ~30 segment sessions held ~30 peaks
    (build-db on long RTE pairs was killed for memory); through open_session they share one. Ten sessions that each
    need a 32 MB intermediate must grow the process by about one of them, not ten."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 1024, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [8])
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["x", "xt"], ["scores"]),  # 8×1024×1024 float32: 32 MB
        helper.make_node("ReduceMean", ["scores"], ["y"], axes=[1, 2], keepdims=0),
    ]
    model = helper.make_model(helper.make_graph(nodes, "big", [x], [y]), opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(model, str(tmp_path / "big.onnx"))
    script = (  # resident memory now, not the peak: a child's peak starts at its parent's size when forked
        "import sys, numpy as np\n"
        "from raee_ops.runtime import open_session\n"
        "rss = lambda: int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) // 1024\n"
        "sessions = [open_session(sys.argv[1], 1) for _ in range(10)]\n"
        "x = np.ones((8, 1024, 4), np.float32)\n"
        "sessions[0].run(None, {'x': x})\n"
        "before = rss()\n"
        "for s in sessions[1:]:\n"
        "    s.run(None, {'x': x})\n"
        "print(rss() - before)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "big.onnx")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[-1]) < 100  # MB the nine other sessions added: 32 here, 290 with an arena each


def test_onnx_runtime_prints_its_own_log_lines_only_from_v_on(tmp_path):
    """ORT's C++ core prints to the process's stderr, past Python: a row failing in a graph printed ORT's red error
    line above the summary of an exit-0 run, the row's reason already in the errors output."""
    import onnx
    from onnx import TensorProto, helper

    table = helper.make_tensor("table", TensorProto.FLOAT, [4, 2], [0.0] * 8)
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [1])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 2])
    graph = helper.make_graph([helper.make_node("Gather", ["table", "ids"], ["out"])], "g", [ids], [out], [table])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(tmp_path / "g.onnx"))
    script = (
        "import sys, numpy as np\n"
        "from raee_ops import logs\n"
        "logs.configure(int(sys.argv[2]))\n"
        "from raee_ops.runtime import open_session\n"
        "try:\n"
        "    open_session(sys.argv[1], 1).run(None, {'ids': np.array([9], np.int64)})\n"
        "except Exception as exc:\n"
        "    print('raised', type(exc).__name__)\n"
    )
    for verbosity, shown in ((0, False), (-1, False), (1, True), (2, True)):
        run = [sys.executable, "-c", script, str(tmp_path / "g.onnx"), str(verbosity)]
        done = subprocess.run(run, capture_output=True, text=True)
        assert done.stdout.strip() == "raised InvalidArgument", done.stderr
        assert ("[E:onnxruntime" in done.stderr) == shown, done.stderr


@pytest.mark.parametrize("artifacts", ["segment_artifacts", "tiny_llama_artifacts"])
def test_io_binding_chain_reads_out_what_the_host_chain_does(artifacts, request):
    """The CUDA path (states kept as OrtValues between layers, to the host only where rows leave or a stop rule
    reads them) run on the CPU provider: the same logits, pooled states and exits as the numpy chain."""
    directory = request.getfixturevalue(artifacts)
    host, bound = SegmentRuntime(directory), SegmentRuntime(directory, io_binding=True)
    assert bound._device is not None and host._device is None
    batch = prompts(SUB_BATCH + 5, seed=4)
    exits = np.random.default_rng(2).integers(0, host.num_layers + 1, size=len(batch))
    exits[:3] = host.num_layers  # some rows run every layer with no one leaving before the last

    def stop(layer: int, pooled: np.ndarray) -> np.ndarray:
        return pooled[:, 0, 0] > np.median(pooled[:, 0, 0]) if layer == 2 else np.zeros(len(pooled), bool)

    for rule in (None, stop):
        want = host.run_to_exit_pooled("sst2", batch, exits, rule)
        got = bound.run_to_exit_pooled("sst2", batch, exits, rule)
        np.testing.assert_array_equal(got.exits, want.exits)
        np.testing.assert_allclose(got.logits, want.logits, atol=1e-5, rtol=0)
        np.testing.assert_allclose(got.pooled.astype(np.float32), want.pooled.astype(np.float32), atol=1e-2, rtol=0)


def test_the_stored_graphs_are_what_their_builder_writes():
    """The package's graphs are generated files: a change to the builder without rewriting them is caught here."""
    import onnx

    for name, build in stored_graphs.BUILDERS.items():
        stored = onnx.load(str(STORED_GRAPHS / f"{name}.onnx"))
        assert stored.SerializeToString() == build().SerializeToString(), (
            f"rewrite {name}.onnx: {stored_graphs.__doc__}"
        )


def test_the_device_graphs_pool_and_compact_as_numpy_does():
    """What a device chain reads out and keeps (run here on the CPU provider through IO binding): the pooled states
    of ragged rows (a row of one token, rows padded by several), and rows kept with their columns cut."""
    chain = DeviceChain("cpu", open_session)
    rng = np.random.default_rng(5)
    hidden = rng.standard_normal((6, 9, 16)).astype(np.float32)
    lengths = np.array([9, 3, 1, 6, 2, 9])
    mask = (np.arange(9)[None, :] < lengths[:, None]).astype(np.int64)
    pos = np.array([8, 2, 0, 5, 0, 4])  # last tokens, a CLS-like first one, a mask token inside the row
    states = chain.put(hidden)
    np.testing.assert_allclose(chain.pool(states, chain.put(mask), pos), pool_states(hidden, mask, pos), atol=1e-6)
    keep = np.array([True, False, True, True, False, False])
    np.testing.assert_array_equal(chain.compact(states, keep, 6).numpy(), hidden[keep, :6])
    np.testing.assert_array_equal(chain.compact(states, ~keep, 9).numpy(), hidden[~keep])


def test_the_gpu_bench_loads_where_beam_lancedb_and_torch_are_not():
    """bench/gpu.py measures on a GPU machine without a package index: no Beam, LanceDB, torch or scikit-learn, its
    runtime loaded through a stand-in for the few Beam names raee_ops.storage imports. The stand-in lacked one
    (FileSystem), so the measurement failed at its first line."""
    absent = "import sys\nfor name in ('apache_beam', 'lancedb', 'torch', 'transformers', 'sklearn'):\n"
    absent += "    sys.modules[name] = None\nimport gpu\nfrom raee_ops.runtime import SegmentRuntime\n"
    bench = Path(__file__).resolve().parents[1] / "bench"
    run = subprocess.run([sys.executable, "-c", absent], cwd=bench, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
