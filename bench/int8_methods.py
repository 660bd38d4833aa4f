"""Why `--quantize int8` quantizes as it does: quantization methods side by side on one fp32 export's layers, each
checked exactly as the export checks its int8 layers (quantize.compare, on the verification prompts; no task data).

- per token, 7-bit weights: what the export ships;
- per token, 8-bit weights: one more bit, which x86 CPUs without VNNI overflow (see onnx_export/quantize.py);
- per batch: ONNX Runtime's dynamic quantization (one input scale per MatMul per batch, weights per channel), what
  the export used before.

Per method: the readout states' error relative to fp32 at the last layer, how often the tasks' zero-shot heads
answer as fp32's do there, and how far a row's states move when its batch is cut in two (per batch, a row's answer
depends on its companions). The README's figures on these choices come from here.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import quality
from common import parse_args, write_result
from raee_ops.onnx_export.quantize import (
    MAX_BATCH_DEPENDENCE,
    MAX_RELATIVE_ERROR,
    compare,
    quantize_matmuls,
    quantize_per_batch,
)
from raee_ops.schemas.manifest import load_manifest

from raee_ops.runtime import prompt_suffix
from raee_ops.tasks import get_task

PRESETS = ("smollm2-135m", "gemma3-270m")


METHODS: dict[str, Callable[[Path, Path], Any]] = {
    "per token, 7-bit weights (shipped)": quantize_matmuls,
    "per token, 8-bit weights": lambda source, target: quantize_matmuls(source, target, weight_levels=127),
    "per batch (onnxruntime quantize_dynamic, per-channel weights)": quantize_per_batch,
}


def check(artifacts: Path, work: Path, quantize: Callable[[Path, Path], Any]) -> dict[str, Any]:
    """One method's layers written under `work` and compared with the fp32 ones as the export compares them."""
    manifest = load_manifest(artifacts, verify_checksums=False)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    files = []
    for ref in manifest.segments.layers:
        target = work / Path(ref.file).name
        quantize(artifacts / ref.file, target)
        files.append(str(target.resolve()))  # absolute: `artifacts / file` is then the file itself
    tasks = [get_task(name) for name in manifest.tasks]
    result = compare(artifacts, manifest, files, tasks, prompt_suffix(manifest))
    shutil.rmtree(work)
    last = result["layers"][-1]
    return {
        "last_layer_relative_error": last["relative_error"],
        "last_layer_head_agreement": float(np.mean(list(last["head_agreement"].values()))),
        "batch_dependence": result["batch_dependence"],
        "relative_error_by_layer": [layer["relative_error"] for layer in result["layers"]],
    }


def main() -> int:
    args = parse_args(__doc__ or "")
    for preset in PRESETS[:1] if args.quick else PRESETS:
        artifacts = quality.ensure_artifacts(preset)
        methods = {}
        for name, quantize in METHODS.items():
            methods[name] = check(artifacts, quality.BENCH / f"int8-methods-{preset}", quantize)
            m = methods[name]
            print(
                f"{preset} {name}: last-layer error {m['last_layer_relative_error']:.3f}, head agreement "
                f"{m['last_layer_head_agreement']:.3f}, batch dependence {m['batch_dependence']:.2g}",
                flush=True,
            )
        payload = {
            "preset": preset,
            "prompts": "the export check's verification prompts, every bench task",
            "limits": {"max_relative_error": MAX_RELATIVE_ERROR, "max_batch_dependence": MAX_BATCH_DEPENDENCE},
            "methods": methods,
        }
        write_result(f"quant-methods-{preset}", payload, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
