"""`export-onnx`: a Beam pipeline with one element per segment (embed, each layer, each task head).

Workers load the model once (DoFn.setup), export their segment into a local scratch file and write it to the
run's temporary folder beside `--out` (`.<out>.tmp-<run id>`, a local folder or an object-store prefix) under a
name that carries its sha256 (`<file>.sha256-<digest>`), so the driver learns every segment's digest from the
names it lists there, with nothing shared between workers and driver but that folder. The driver then adds the
tokenizer and embedders, verifies, writes manifest.json and publishes: locally by renaming the folder into place
(a failed export never leaves a manifest behind or replaces a good export); on an object store by moving the
files beside the old ones with the old manifest removed first and the new one written last (a reader in between
finds no manifest and refuses the folder). The run holds its temporary folder while it lives (see commit.py), so
the next export to the same place removes what a killed one left and never a live one's.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import apache_beam as beam
from raee_ops.onnx_export.loader import LoadedModel, load_model, model_config
from raee_ops.onnx_export.optimize import METHOD as OPTIMIZE_METHOD
from raee_ops.onnx_export.optimize import graph_report
from raee_ops.onnx_export.quantize import quantize_layers
from raee_ops.onnx_export.segments import SegmentJob, export_job
from raee_ops.onnx_export.tokenizer_file import save_tokenizer
from raee_ops.onnx_export.verbalizer import label_token_ids
from raee_ops.onnx_export.verify import verify_export
from raee_ops.pipelines.export_checks import check_before_loading
from raee_ops.pipelines.options import make_pipeline, run_pipeline
from raee_ops.schemas.manifest import (
    EmbedderEntry,
    FileRef,
    Manifest,
    ModelInfo,
    Segments,
    TaskEntry,
    TokenizerInfo,
    write_manifest,
)

from raee_ops import storage
from raee_ops.commit import (
    hold,
    new_run_id,
    reclaim_siblings,
    scratch_folder,
)
from raee_ops.errors import RaeeConfigError
from raee_ops.export_place import move_into_place, publish_remote, put_back
from raee_ops.faults import fault_point
from raee_ops.progress import Progress, phase
from raee_ops.tasks import Task

TOKENIZER_FILE = "tokenizer.json"
#: Between a staged segment's file name and its sha256, until the driver publishes it under its own name.
DIGEST = ".sha256-"


class ExportSegmentFn(beam.DoFn):
    def __init__(
        self, model_spec: str, work_dir: str, total: int, filesystem: dict[str, Any], optimize: bool = True
    ) -> None:
        self.model_spec = model_spec
        self.optimize = optimize
        self.work_dir = work_dir
        self.total = total
        self.filesystem = filesystem

    def setup(self) -> None:
        storage.on_worker(self.filesystem)
        self.loaded: LoadedModel = load_model(self.model_spec)
        self.progress = Progress("export-onnx", self.total, "segments", counter="segments_exported")

    def teardown(self) -> None:
        if hasattr(self, "progress"):  # not when loading the model failed
            self.progress.close()

    def process(self, job: SegmentJob) -> Iterator[str]:
        with scratch_folder("segment-scratch") as scratch:  # this worker's own disk
            local = Path(scratch) / job.file
            export_job(self.loaded.adapter, job, local, self.optimize)
            ref = FileRef.of(Path(scratch), job.file)
            storage.upload(str(local), storage.join(self.work_dir, f"{job.file}{DIGEST}{ref.sha256}"))
        fault_point("export:segment")
        self.progress.advance()
        yield job.file


def export_segments(
    model_spec: str, work: str, jobs: Sequence[SegmentJob], beam_args: Sequence[str], optimize: bool = True
) -> dict[str, FileRef]:
    """Run the Beam pipeline; returns the FileRef of every exported file, keyed by file name, read from the
    names of the staged files (renamed to their own names here)."""
    pipeline = make_pipeline(beam_args, command="export-onnx")
    export = ExportSegmentFn(model_spec, work, len(jobs), storage.carry(pipeline.options), optimize)
    _ = pipeline | "Segments" >> beam.Create(list(jobs)) | "Export" >> beam.ParDo(export)
    run_pipeline(pipeline, "segment export")  # the model loaded on the driver: a failure is the worker's own
    refs = {}
    for staged in storage.match(storage.join(work, f"*{DIGEST}*")):
        file, digest = storage.name(staged).rsplit(DIGEST, 1)
        if file not in refs:  # a retried bundle may have written a segment twice: either copy is whole
            storage.rename([(staged, storage.join(work, file))])
            refs[file] = FileRef(file, digest)
        else:  # not published with the folder: the next export would find a file its manifest does not list
            storage.delete([staged])
    missing = [job.file for job in jobs if job.file not in refs]
    if missing:
        raise RaeeConfigError(f"export pipeline did not produce {', '.join(missing)}")
    return refs


def _head_file(task: Task) -> str:
    return f"head_{re.sub(r'[^A-Za-z0-9_.-]', '_', task.name)}.onnx"


def _jobs(num_layers: int, tasks: Sequence[Task], label_ids: dict[str, list[int]]) -> list[SegmentJob]:
    """Embed, every layer, and a head per task that has label token ids (none on a head-less backbone)."""
    jobs = [SegmentJob("embed", "embed.onnx")]
    jobs += [SegmentJob("layer", f"layer_{i:03d}.onnx", index=i) for i in range(num_layers)]
    jobs += [
        SegmentJob("head", _head_file(t), label_token_ids=tuple(label_ids[t.name]))
        for t in tasks
        if t.name in label_ids
    ]
    return jobs


def _check_request(model_spec: str, tasks: Sequence[Task], max_length: int) -> None:
    """What the request must fit beyond export_checks' (--out, --model's files, the embedders) that is known before
    the model loads (minutes) and the segments export: the tasks and --max-length (the model's config alone)."""
    names = [t.name for t in tasks]
    if len(set(names)) != len(names) or len({_head_file(t) for t in tasks}) != len(tasks):
        raise RaeeConfigError(f"task names must be distinct: {', '.join(names)}")
    with phase("export-onnx: reading the model's config"):
        limit = getattr(model_config(model_spec), "max_position_embeddings", None)
    if max_length < 1 or (limit is not None and max_length > limit):
        raise RaeeConfigError(f"--max-length {max_length} must be between 1 and the model's limit {limit}")


def _export_embedders(names: Sequence[str], work: Path, optimize: bool) -> dict[str, EmbedderEntry]:
    if not names:
        return {}
    from raee_ops.onnx_export.embedder import export_embedder

    return {name: export_embedder(name, work, optimize) for name in names}


def _optimization(files: Path, manifest: Manifest) -> dict[str, Any]:
    """The manifest's record of the optimized graphs (layers and embedders), read from the stored files."""
    stored = [ref.file for ref in manifest.segments.layers] + [e.model.file for e in manifest.embedders.values()]
    return {"method": OPTIMIZE_METHOD, "graphs": {file: graph_report(files / file) for file in stored}}


def fusion_table(manifest: Manifest) -> str:
    """One line per stored graph, runs of consecutive identical layers folded: node count and fused op counts."""
    if manifest.optimization is None:
        return "graphs stored as exported (--no-optimize)"
    groups: list[list[str]] = []  # [first file, last file, row]
    for file, report in manifest.optimization["graphs"].items():
        fused = ", ".join(f"{op} {count}" for op, count in report["fused"].items()) or "none"
        row = f"{report['nodes']:>5} nodes  fused: {fused}"
        if groups and groups[-1][2] == row:
            groups[-1][1] = file
        else:
            groups.append([file, file, row])
    labels = [first if first == last else f"{first}..{last}" for first, last, _ in groups]
    width = max(map(len, labels))
    return "\n".join(f"{label:<{width}}  {group[2]}" for label, group in zip(labels, groups, strict=True))


def run_export(
    model_spec: str,
    out_dir: str,
    tasks: list[Task],
    verify: bool,
    embedders: list[str],
    max_length: int,
    beam_args: list[str],
    quantize: str | None = None,
    optimize: bool = True,
    prechecked: bool = False,
) -> Manifest:
    """Export, verify and publish the segments (`prechecked`: the caller ran `check_before_loading` on the same
    request, as the CLI does before torch's import; its job-service probe is not repeated)."""
    out_dir = storage.absolute(str(out_dir)).rstrip("/")  # the workers' working directory is not this one
    if not prechecked:
        check_before_loading(model_spec, out_dir, embedders, beam_args)
    _check_request(model_spec, tasks, max_length)
    with phase("export-onnx: loading the model"):
        loaded = load_model(model_spec)
    adapter = loaded.adapter
    # a head-less backbone has no label words to read: no verbalizer check, no head segments
    label_ids = {t.name: label_token_ids(adapter.tokenizer, t) for t in tasks} if adapter.label_word_head else {}
    parent, name, local = storage.parent(out_dir), storage.name(out_dir), storage.is_local(out_dir)
    storage.mkdirs(parent)
    if local:
        put_back(out_dir)
    for leftover in (".tmp-", ".old-"):
        reclaim_siblings(parent, f".{name}{leftover}")
    work = storage.join(parent, f".{name}.tmp-{new_run_id()}")
    try:
        with (
            hold(work, "a temporary export folder"),  # held while this run lives
            scratch_folder("export-scratch") as scratch,  # the driver's own files, if not local
        ):
            files = Path(storage.local_path(work) if local else scratch)
            jobs = _jobs(adapter.num_layers, tasks, label_ids)
            refs = export_segments(model_spec, work, jobs, beam_args, optimize)
            save_tokenizer(adapter.tokenizer, files / TOKENIZER_FILE)
            tokenizer_ref = FileRef.of(files, TOKENIZER_FILE)
            tok = adapter.tokenizer
            manifest = Manifest(
                model=ModelInfo(
                    source=loaded.source, architecture=type(loaded.model).__name__, fingerprint=loaded.fingerprint
                ),
                num_layers=adapter.num_layers,
                hidden_size=adapter.hidden_size,
                readout=adapter.readout,
                padding_side=adapter.padding_side,
                max_length=max_length,
                tokenizer=TokenizerInfo(
                    file=tokenizer_ref.file,
                    sha256=tokenizer_ref.sha256,
                    pad_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
                    mask_token=tok.mask_token,
                    mask_token_id=tok.mask_token_id,
                ),
                segments=Segments(embed=refs[jobs[0].file], layers=[refs[j.file] for j in jobs if j.kind == "layer"]),
                tasks={
                    t.name: TaskEntry(
                        template=t.template,
                        label_names=list(t.label_names),
                        verbalizer=list(t.verbalizer),
                        label_token_ids=label_ids.get(t.name, []),
                        head=refs.get(_head_file(t)),
                        metric=t.metric_name,
                    )
                    for t in tasks
                },
                embedders=_export_embedders(embedders, files, optimize),
                label_word_head=adapter.label_word_head,
            )
            if not local:  # the checks and the fusion record below read the segments from a local folder
                for file in sorted(refs):
                    storage.download(storage.join(work, file), str(files / file))
            if verify:
                with phase("export-onnx: verifying every layer against PyTorch"):
                    manifest = replace(manifest, verify=verify_export(files, manifest, adapter, tasks))
            if quantize == "int8":  # after the fp32 check against PyTorch; checked against fp32 itself
                with phase("export-onnx: quantizing the layers to int8"):
                    manifest = quantize_layers(files, manifest, tasks, adapter.prompt_suffix)
            if optimize:  # read from the graphs as stored (int8 ones included)
                manifest = replace(manifest, optimization=_optimization(files, manifest))
            if not local:  # what the driver wrote or changed joins the workers' segments in the temporary folder
                for ref in sorted(set(manifest.file_refs()) - set(refs.values()), key=lambda r: r.file):
                    storage.upload(str(files / ref.file), storage.join(work, ref.file))
            fault_point("export:move")
            if local:
                write_manifest(files, manifest)
                move_into_place(work, out_dir)
            else:
                publish_remote(work, out_dir, manifest)
    finally:  # a failed run's folder, or what a published one left (a retried bundle's second copy)
        storage.delete([work])
    return manifest
