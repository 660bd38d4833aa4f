"""Tiny hand-built ONNX segment artifacts (numpy weights, onnx.helper graphs) for runtime and pipeline tests.

They follow the exporter's contract (manifest, segment signatures, right padding, padding-invariant layers)
without torch, so these tests run in seconds and do not wait on the exporter. Layers mix tokens through a
masked mean, so padding mistakes change results.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from onnx import TensorProto, helper, numpy_helper
from raee_ops.schemas.manifest import (
    MANIFEST_NAME,
    EmbedderEntry,
    FileRef,
    Manifest,
    ModelInfo,
    Segments,
    TaskEntry,
    TokenizerInfo,
    sealed,
    write_manifest,
)
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from raee_ops.key_names import DEFAULT_KEY
from raee_ops.tasks import PRESETS

HIDDEN, LAYERS, MAX_LENGTH, EMBED_DIM = 8, 3, 64, 6
#: The tiny sentence embedder is stored under the default key's name, so build-db runs without --embedder use it.
KEY = DEFAULT_KEY
WORDS = "good bad great awful fine movie plot boring fun dull the a is was it cat sat on mat dog".split()


def _tokenizer(path: Path) -> int:
    text = " ".join(t.template + " " + " ".join(t.verbalizer) for t in PRESETS.values())
    words = set(re.findall(r"\w+|[^\w\s]", text))
    vocab = ["[PAD]", "[UNK]", "[BOS]", *sorted(words | set(WORDS) | set("():?\n"))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 2)])
    tok.save(str(path))
    return len(vocab)


def _graph(path: Path, name: str, inputs, outputs, nodes, weights: dict[str, np.ndarray]) -> None:
    inits = [numpy_helper.from_array(w.astype(np.float32), k) for k, w in weights.items()]
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _io(name: str, dtype: int, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def _masked_mean(hidden: str, mask: str, out: str) -> list[onnx.NodeProto]:
    n = helper.make_node
    return [
        n("Cast", [mask], ["m"], to=TensorProto.FLOAT),
        n("Unsqueeze", ["m", "axis2"], ["m3"]),
        n("Mul", [hidden, "m3"], ["hm"]),
        n("ReduceSum", ["hm", "axis1"], ["s"], keepdims=1),
        n("ReduceSum", ["m3", "axis1"], ["c"], keepdims=1),
        n("Div", ["s", "c"], [out]),
    ]


def make_artifacts(directory: Path, seed: int = 0) -> Path:
    """Write manifest, tokenizer, embed, layers, sst2/rte heads and an embedder (named as the default key) into
    `directory`."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = _tokenizer(directory / "tokenizer.json")
    ids, mask = (
        _io("input_ids", TensorProto.INT64, ["B", "T"]),
        _io("attention_mask", TensorProto.INT64, ["B", "T"]),
    )
    hid = _io("hidden_states", TensorProto.FLOAT, ["B", "T", HIDDEN])
    axes = {"axis1": np.array([1]), "axis2": np.array([2])}
    axis_inits = [numpy_helper.from_array(v.astype(np.int64), k) for k, v in axes.items()]
    n = helper.make_node

    _graph(
        directory / "embed.onnx",
        "embed",
        [ids, mask],
        [hid],
        [n("Gather", ["E", "input_ids"], ["hidden_states"])],
        {"E": rng.normal(size=(vocab, HIDDEN))},
    )
    layers = []
    for i in range(LAYERS):
        name = f"layer_{i:03d}.onnx"
        nodes = [
            *_masked_mean("hidden_states", "attention_mask", "pooled"),
            n("MatMul", ["hidden_states", "W"], ["a"]),
            n("MatMul", ["pooled", "V"], ["b"]),
            n("Add", ["a", "b"], ["ab"]),
            n("Tanh", ["ab"], ["t"]),
            n("Add", ["t", "hidden_states"], ["hidden_states_out"]),
        ]
        out = _io("hidden_states_out", TensorProto.FLOAT, ["B", "T", HIDDEN])
        weights = {"W": rng.normal(size=(HIDDEN, HIDDEN)), "V": rng.normal(size=(HIDDEN, HIDDEN))}
        _graph(directory / name, "layer", [hid, mask], [out], nodes, weights)
        model = onnx.load(str(directory / name))
        model.graph.initializer.extend(axis_inits)
        onnx.save(model, str(directory / name))
        layers.append(FileRef.of(directory, name))

    tasks = {}
    for task in ("sst2", "rte"):
        preset = PRESETS[task]
        head_in = _io("hidden_states", TensorProto.FLOAT, ["B", HIDDEN])
        logits = _io("logits", TensorProto.FLOAT, ["B", len(preset.label_names)])
        _graph(
            directory / f"head_{task}.onnx",
            "head",
            [head_in],
            [logits],
            [n("MatMul", ["hidden_states", "C"], ["logits"])],
            {"C": rng.normal(size=(HIDDEN, len(preset.label_names)))},
        )
        tasks[task] = TaskEntry(
            preset.template,
            list(preset.label_names),
            list(preset.verbalizer),
            list(range(len(preset.label_names))),
            FileRef.of(directory, f"head_{task}.onnx"),
        )

    emb = _io("embedding", TensorProto.FLOAT, ["B", EMBED_DIM])
    nodes = [
        n("Gather", ["F", "input_ids"], ["h"]),
        *_masked_mean("h", "attention_mask", "p3"),
        n("Squeeze", ["p3", "axis1"], ["p"]),
        n("LpNormalization", ["p"], ["embedding"], axis=1, p=2),
    ]
    _graph(
        directory / f"embedder_{KEY}.onnx",
        KEY,
        [ids, mask],
        [emb],
        nodes,
        {"F": rng.normal(size=(vocab, EMBED_DIM))},
    )
    model = onnx.load(str(directory / f"embedder_{KEY}.onnx"))
    model.graph.initializer.extend(axis_inits)
    onnx.save(model, str(directory / f"embedder_{KEY}.onnx"))

    tok = FileRef.of(directory, "tokenizer.json")
    manifest = Manifest(
        model=ModelInfo(source="tiny", architecture="tiny-segments", fingerprint=f"tiny-{seed}"),
        num_layers=LAYERS,
        hidden_size=HIDDEN,
        readout="last",
        padding_side="right",
        max_length=MAX_LENGTH,
        tokenizer=TokenizerInfo(file=tok.file, sha256=tok.sha256, pad_id=0),
        segments=Segments(embed=FileRef.of(directory, "embed.onnx"), layers=layers),
        tasks=tasks,
        embedders={
            KEY: EmbedderEntry(
                KEY,
                FileRef.of(directory, f"embedder_{KEY}.onnx"),
                tok,
                dim=EMBED_DIM,
                max_length=MAX_LENGTH,
            )
        },
    )
    write_manifest(directory, manifest)
    return directory


@pytest.fixture(scope="session")
def segment_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_artifacts(tmp_path_factory.mktemp("segments") / "artifacts")


def write_labelled(path: Path, ids: list, texts: list, labels: list) -> Path:
    """An input file of the pipelines' shape: id, text, an int64 label (None where the row should be rejected)."""
    pq.write_table(pa.table({"id": ids, "text": texts, "label": pa.array(labels, pa.int64())}), path)
    return path


def reexported(artifacts: Path, into: Path, edit: Callable[[dict], None]) -> Path:
    """A copy of `artifacts` in `into` whose manifest `edit` changed and that is sealed again: another export of
    the same files, as export-onnx would write it (an edit without the seal is refused before anything it tests)."""
    shutil.copytree(artifacts, into)
    manifest = json.loads((into / MANIFEST_NAME).read_text())
    edit(manifest)
    (into / MANIFEST_NAME).write_text(sealed(manifest))
    return into
