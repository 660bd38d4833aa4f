"""`export-onnx`: a Beam pipeline with one element per segment (embed, each layer, each task head).

Workers load the model once (DoFn.setup) and write their segment into a temporary directory beside the
output; the driver then adds the tokenizer and embedders, verifies, writes manifest.json last and moves the
directory into place, so a failed export never leaves a manifest behind or replaces a good export. The run
holds a lock on its temporary directory while it lives, so the next export to the same place removes what a
killed one left (its `.<out>.tmp-*` folder) and never a live one's.
"""

from __future__ import annotations

import glob
import json
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import apache_beam as beam

from onnx_export.loader import LoadedModel, load_model
from onnx_export.quantize import quantize_layers
from onnx_export.segments import export_segment
from onnx_export.tokenizer_file import save_tokenizer
from onnx_export.verbalizer import label_token_ids
from onnx_export.verify import verify_export
from pipelines.commit import locked, reclaim_siblings
from pipelines.options import make_pipeline, run_pipeline
from raee_ops.errors import RaeeConfigError
from raee_ops.faults import fault_point
from raee_ops.progress import Progress, phase
from raee_ops.tasks import Task
from schemas.manifest import (
    EmbedderEntry,
    FileRef,
    Manifest,
    ModelInfo,
    Segments,
    TaskEntry,
    TokenizerInfo,
    write_manifest,
)

TOKENIZER_FILE = "tokenizer.json"
REFS_FILE = ".segment-refs.json"


@dataclass(frozen=True)
class SegmentJob:
    """One file to export: kind is embed, layer (with index) or head (with the task's label token ids)."""

    kind: str
    file: str
    index: int = 0
    label_token_ids: tuple[int, ...] = ()


class ExportSegmentFn(beam.DoFn):
    def __init__(self, model_spec: str, work_dir: str, total: int) -> None:
        self.model_spec = model_spec
        self.work_dir = work_dir
        self.total = total

    def setup(self) -> None:
        self.loaded: LoadedModel = load_model(self.model_spec)
        self.progress = Progress("export-onnx", self.total, "segments", counter="segments_exported")

    def teardown(self) -> None:
        if hasattr(self, "progress"):  # not when loading the model failed
            self.progress.close()

    def process(self, job: SegmentJob) -> Iterator[tuple[str, FileRef]]:
        adapter = self.loaded.adapter
        modules = {
            "embed": adapter.embed_segment,
            "layer": lambda: adapter.layer_segment(job.index),
            "head": lambda: adapter.head_segment(job.label_token_ids),
        }
        directory = Path(self.work_dir)
        export_segment(
            modules[job.kind](), job.kind, adapter.hidden_size, directory / job.file, dynamo=type(adapter).dynamo
        )
        fault_point("export:segment")
        self.progress.advance()
        yield job.file, FileRef.of(directory, job.file)


def _write_refs(refs: dict[str, FileRef], path: str) -> None:
    Path(path).write_text(json.dumps({name: asdict(ref) for name, ref in refs.items()}))


def export_segments(
    model_spec: str, work: Path, jobs: Sequence[SegmentJob], beam_args: Sequence[str]
) -> dict[str, FileRef]:
    """Run the Beam pipeline; returns the FileRef of every exported file, keyed by file name."""
    refs_path = work / REFS_FILE
    pipeline = make_pipeline(beam_args, command="export-onnx")
    _ = (
        pipeline
        | "Segments" >> beam.Create(list(jobs))
        | "Export" >> beam.ParDo(ExportSegmentFn(model_spec, str(work), len(jobs)))
        | "Collect" >> beam.combiners.ToDict()
        | "WriteRefs" >> beam.Map(_write_refs, str(refs_path))
    )
    run_pipeline(pipeline, "segment export")  # the model loaded on the driver: a failure is the worker's own
    refs = {name: FileRef(**ref) for name, ref in json.loads(refs_path.read_text()).items()}
    refs_path.unlink()
    missing = [job.file for job in jobs if job.file not in refs]
    if missing:
        raise RaeeConfigError(f"export pipeline did not produce {', '.join(missing)}")
    return refs


def _head_file(task: Task) -> str:
    return f"head_{re.sub(r'[^A-Za-z0-9_.-]', '_', task.name)}.onnx"


def _jobs(num_layers: int, tasks: Sequence[Task], label_ids: dict[str, list[int]]) -> list[SegmentJob]:
    jobs = [SegmentJob("embed", "embed.onnx")]
    jobs += [SegmentJob("layer", f"layer_{i:03d}.onnx", index=i) for i in range(num_layers)]
    jobs += [SegmentJob("head", _head_file(t), label_token_ids=tuple(label_ids[t.name])) for t in tasks]
    return jobs


def _check_request(loaded: LoadedModel, tasks: Sequence[Task], max_length: int) -> None:
    names = [t.name for t in tasks]
    if len(set(names)) != len(names) or len({_head_file(t) for t in tasks}) != len(tasks):
        raise RaeeConfigError(f"task names must be distinct: {', '.join(names)}")
    limit = getattr(loaded.model.config, "max_position_embeddings", None)
    if max_length < 1 or (limit is not None and max_length > limit):
        raise RaeeConfigError(f"--max-length {max_length} must be between 1 and the model's limit {limit}")


def _move_into_place(work: Path, out_dir: Path) -> None:
    """Replace out_dir by work; an existing export is only moved aside once work is complete. Exports to the
    same place take turns here (the parent's lock), so two at once both end with a complete export."""
    with locked(out_dir.parent, f"the folder of {out_dir}", wait=True):
        if not out_dir.exists():
            work.rename(out_dir)
            return
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        out_dir.rename(old / out_dir.name)
        work.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)  # a concurrent run may have reclaimed it


def _export_embedders(names: Sequence[str], work: Path) -> dict[str, EmbedderEntry]:
    if not names:
        return {}
    from onnx_export.embedder import export_embedder

    return {name: export_embedder(name, work) for name in names}


def run_export(
    model_spec: str,
    out_dir: Path,
    tasks: list[Task],
    verify: bool,
    embedders: list[str],
    max_length: int,
    beam_args: list[str],
    quantize: str | None = None,
) -> Manifest:
    with phase("export-onnx: loading the model"):
        loaded = load_model(model_spec)
    adapter = loaded.adapter
    _check_request(loaded, tasks, max_length)
    label_ids = {t.name: label_token_ids(adapter.tokenizer, t) for t in tasks}
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise RaeeConfigError(f"--out {out_dir} exists and is not a directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for leftover in (".tmp-", ".old-"):
        reclaim_siblings(str(out_dir.parent / f".{glob.escape(out_dir.name)}{leftover}*"))
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        with locked(work, "a temporary export folder"):  # held while this run lives
            jobs = _jobs(adapter.num_layers, tasks, label_ids)
            refs = export_segments(model_spec, work, jobs, beam_args)
            save_tokenizer(adapter.tokenizer, work / TOKENIZER_FILE)
            tokenizer_ref = FileRef.of(work, TOKENIZER_FILE)
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
                        label_token_ids=label_ids[t.name],
                        head=refs[_head_file(t)],
                    )
                    for t in tasks
                },
                embedders=_export_embedders(embedders, work),
            )
            if verify:
                with phase("export-onnx: verifying every layer against PyTorch"):
                    manifest = replace(manifest, verify=verify_export(work, manifest, adapter, tasks))
            if quantize == "int8":  # after the fp32 check against PyTorch; checked against fp32 itself
                with phase("export-onnx: quantizing the layers to int8"):
                    manifest = quantize_layers(work, manifest, tasks, adapter.prompt_suffix, adapter.int8_keep_fp32)
            write_manifest(work, manifest)
            fault_point("export:move")
            _move_into_place(work, out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return manifest
