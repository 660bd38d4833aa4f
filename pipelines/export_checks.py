"""What an export-onnx request must fit that is known before torch loads (its and transformers' imports take ~20 s,
the model minutes): --out can be replaced whole (export_place), --model's files are there, the embedders exist, the
job service answers. Torch-free, so the CLI refuses a typo in a second; run_export checks the same before it loads
anything.
"""

from __future__ import annotations

from collections.abc import Sequence

from raee_ops.onnx_export.model_source import resolve
from raee_ops.pipelines.options import check_job_service

from raee_ops import storage
from raee_ops.errors import RaeeConfigError
from raee_ops.export_place import check_out
from raee_ops.key_names import embedder_depth


def check_before_loading(model_spec: str, out_dir: str, embedders: Sequence[str], beam_args: Sequence[str]) -> None:
    """Refuse the request's --out, embedders (their packaged configs) or --model (its files, not its config) with
    one line; `beam_args` carry the object store's settings."""
    storage.configure(beam_args)
    check_out(out_dir)
    if len(set(embedders)) != len(embedders):
        raise RaeeConfigError(f"embedder names must be distinct: {', '.join(embedders)}")
    for name in embedders:
        embedder_depth(name)
    resolve(model_spec)
    check_job_service(beam_args)
