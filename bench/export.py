"""ONNX export per preset through the CLI: wall time, artifact size by kind, the child's peak RSS, verification, and
the fusions the export found in each stored graph (the manifest's record).

Each export runs in its own child process (as a user would run it) into a fresh directory, and its peak RSS
comes from os.wait4 on that child alone, so presets never mask each other's memory peak.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from common import REPO_ROOT, parse_args, timer, write_result
from raee_ops.schemas.manifest import load_manifest

from raee_ops.key_names import DEFAULT_KEY

PRESETS = ("smollm2-135m", "gemma3-270m", "minilm-l6")
TASKS = ("sst2",)
EMBEDDER = DEFAULT_KEY
MB = 1024**2


def run_child(cmd: list[str]) -> tuple[int, float]:
    """Exit code and peak RSS in MB of one child process (Linux reports ru_maxrss in KiB)."""
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; stops Popen waiting again
    return proc.returncode, usage.ru_maxrss / 1024


def sizes_by_kind(out_dir: Path) -> dict[str, float]:
    """MB per kind of file the manifest vouches for: embed, layers, heads, tokenizer, embedders."""
    m = load_manifest(out_dir)
    kinds = {
        "embed": [m.segments.embed.file],
        "layers": [ref.file for ref in m.segments.layers],
        "heads": [t.head.file for t in m.tasks.values() if t.head],  # none on a bare encoder
        "tokenizer": [m.tokenizer.file],
        "embedders": [ref.file for e in m.embedders.values() for ref in (e.model, e.tokenizer)],
    }
    return {kind: round(sum((out_dir / f).stat().st_size for f in files) / MB, 2) for kind, files in kinds.items()}


def export_preset(preset: str) -> dict[str, Any]:
    out_dir = REPO_ROOT / ".bench" / f"artifacts-export-{preset}"
    shutil.rmtree(out_dir, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "raee_ops",
        "export-onnx",
        "--model",
        preset,
        "--out",
        str(out_dir),
        "--embedder",
        EMBEDDER,
    ]
    for task in TASKS:
        cmd += ["--task", task]
    print(f"export {preset}", flush=True)
    with timer() as t:
        rc, peak_rss_mb = run_child(cmd)
    if rc:
        return {
            "preset": preset,
            "wall_s": round(t.s, 1),
            "peak_rss_mb": round(peak_rss_mb),
            "passed": False,
            "error": f"export-onnx exited {rc}",
        }
    manifest = load_manifest(out_dir)
    diffs = (manifest.verify or {}).get("max_abs_diff") or []
    by_kind = sizes_by_kind(out_dir)
    return {
        "preset": preset,
        "num_layers": manifest.num_layers,
        "tasks": list(TASKS),
        "embedder": EMBEDDER,
        "wall_s": round(t.s, 1),
        "size_mb": round(sum(by_kind.values()), 2),
        "size_mb_by_kind": by_kind,
        "peak_rss_mb": round(peak_rss_mb),
        "verify_max_abs_diff": max(diffs) if diffs else None,
        "passed": bool((manifest.verify or {}).get("passed")),
        "optimization": manifest.optimization,
    }


def main() -> int:
    args = parse_args(__doc__ or "")
    presets = PRESETS[:1] if args.quick else PRESETS
    results = [export_preset(p) for p in presets]
    write_result("export", {"presets": results}, args.quick)
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
