"""The stored segments and the MiniLM key on ONNX Runtime's CUDA provider (issue 12's GPU measurement).

The device machine has no package index and takes at most 64 MiB per call, so this runs in two steps:

- `prepare` (here): per preset, the stored graphs with every large float weight stripped (shapes, fusions and all
  small constants kept; of the keys only the one timed, GPU_KEY), the tokenizers, the speed bench's 256 sst2 rows
  with the exits the default took on them in process here, and the default's host-side phases (retrieval, exit
  policy, answer) timed here; plus the onnxruntime-gpu wheel cut to fit: the C API library and TensorRT provider
  dropped, and the CUDA provider's kernels for chips other than sm_90 (H100/H200) zeroed, so the archive
  compresses to about 60 MB.
- `measure` (on the GPU machine, through bench/gpu_measure.sh, which sets up onnxruntime-gpu and this tree there;
  a device call carries `.gpu/ort.tar.xz` and one preset's archive, as both presets' would not fit in 64 MiB): the
  stripped weights refilled with seeded random values of the same shapes (speed does not depend on the values;
  answers do, so no accuracy is measured there), then, on CUDA, the full chain and the chain to the default's real
  exits, each with hidden states kept on the device (IO binding, the runtime's default on CUDA) and copied to the
  host after every layer; the key; probe-best (every row to the reference's best layer); the same chains on that
  machine's CPUs; and on CUDA the default's chain compacted at every exit, once under half its rows still run
  (the runtime's CUDA_COMPACT_BELOW) and never, and the rows per ONNX call from 32 to 256.

The default's rate on the GPU is composed, not run end to end: LanceDB is not on that machine, so the default's
host-side phases (retrieval, exit policy, answer) are this machine's, added to the key and the layers measured
there; the layers' time includes tokenizing the rows once, as a handler does (its length check, whose ids the layers
reuse). key-lr (the key and its probe, no layer and so no length check: what a user
could run instead) is composed the same way. Rows that the default's confidence rule lets leave early are replayed
at the layer they left, with a stop rule that reads every layer's states back to the host as the real one does.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np


def local_files_beam() -> None:
    """Where Beam is not installed (the GPU machine: no package index, 64 MiB per call), give `raee_ops.storage` the
    few Beam names it imports, over local files only; loading artifacts is all it does here, before any timing."""
    try:
        import apache_beam  # noqa: F401
    except ImportError:
        pass
    else:
        return
    import types

    class FileSystems:
        get_scheme = staticmethod(lambda uri: uri.split("://", 1)[0] if "://" in uri else None)
        join = staticmethod(os.path.join)
        split = staticmethod(os.path.split)
        exists = staticmethod(os.path.exists)
        open = staticmethod(lambda uri, compression_type=None: open(uri, "rb"))

    names = {
        "apache_beam.io.filesystem": {"CompressionTypes": types.SimpleNamespace(UNCOMPRESSED="uncompressed"),
                                      "FileMetadata": object, "FileSystem": object, "BeamIOError": OSError},
        "apache_beam.io.filesystems": {"FileSystems": FileSystems},
        "apache_beam.options.pipeline_options": {"PipelineOptions": dict, "S3Options": object},
    }  # fmt: skip
    for module in ("apache_beam", "apache_beam.io", "apache_beam.options", *names):
        sys.modules[module] = types.ModuleType(module)
        for attr, value in names.get(module, {}).items():
            setattr(sys.modules[module], attr, value)


local_files_beam()  # before common, which imports the runtime

from common import REPO_ROOT, fastest, git_info, timer, token_lengths, write_result  # noqa: E402

from raee_ops.key_names import GPU_KEY  # noqa: E402

PRESETS = ("smollm2-135m", "gemma3-270m")
TASK = "sst2"
BUNDLE = REPO_ROOT / ".gpu"  # carried to the device machine (ignored by git)
ORT_GPU = "onnxruntime-gpu==1.31.1"
SM = 90  # the device's compute capability (H100/H200)
#: Float initializers with at least this many elements are weights: stripped here, refilled there.
MIN_STRIPPED = 4096
PASSES = 5  # timed passes on the GPU, fastest kept (after one warm-up pass)
SUB_BATCHES = (32, 64, 128, 256)  # rows per ONNX call tried on CUDA


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    prep = sub.add_parser("prepare", help="here: write .gpu/<preset>.tar.xz and .gpu/ort.tar.xz")
    prep.add_argument("--preset", choices=PRESETS, action="append", help="repeatable; default: all")
    run = sub.add_parser("measure", help="on the GPU machine: time one prepared preset, write bench/results")
    run.add_argument("--preset", choices=PRESETS, required=True)
    run.add_argument("--work", type=Path, default=Path("/tmp/raee-gpu"))
    return parser.parse_args()


# -- prepare (here) -------------------------------------------------------------------------------------------


def strip_weights(src: Path, dst: Path) -> list[str]:
    """`src` saved to `dst` without the data of its large float initializers; returns their names."""
    import onnx

    model = onnx.load(str(src))
    names = []
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT and int(np.prod(init.dims)) >= MIN_STRIPPED:
            init.ClearField("raw_data")
            init.ClearField("float_data")
            names.append(init.name)
    onnx.save(model, str(dst))
    return names


def default_run(preset: str, artifacts: Path) -> dict[str, Any]:
    """The default strategy in process here on the speed bench's rows: per-row exits and its phase times."""
    import speed
    from common import require_data

    from raee_ops.exit_policy import DEFAULT_STRATEGY
    from raee_ops.readout import stop_rule
    from raee_ops.retrieval import Retriever
    from raee_ops.runtime import SegmentRuntime
    from raee_ops.tasks import get_task

    runtime = SegmentRuntime(artifacts)
    evaluation, reference, rows, warm = speed.bench_rows(runtime, require_data(), quick=False)
    db, table = str(speed.BENCH / f"speed-db-{preset}"), f"{TASK}_{reference.num_rows}"
    if not (Path(db) / f"{table}.lance").is_dir():
        db, table = speed.build_db(artifacts, preset, reference)
    retriever, task = Retriever(db, table), get_task(TASK)
    core = speed.Core(runtime, retriever, DEFAULT_STRATEGY, task)
    speed.timed(core.run, rows, warm)
    key_lr = speed.Core(runtime, retriever, "key-lr", task)  # what a user could run instead: the key and its probe
    speed.timed(key_lr.run, rows, warm)
    return {
        "strategy": DEFAULT_STRATEGY,
        "texts": rows.texts,
        "prompts": rows.rendered(core.form),
        "exits": core.exits.tolist(),
        "stops_early": stop_rule(core.strategy, core.context) is not None,
        "probe_best_layer": core.context.fitted_probes().best_layer,
        "cpu_phase_s": core.seconds,
        "cpu_rows_per_s": len(rows.prompts) / sum(core.seconds.values()),
        "key_lr_cpu_phase_s": key_lr.seconds,
    }


def prepare_preset(preset: str) -> Path:
    from quality import ensure_artifacts
    from raee_ops.schemas.manifest import load_manifest

    artifacts = ensure_artifacts(preset)
    stage = BUNDLE / preset
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    stripped = {}
    manifest = load_manifest(artifacts, verify_checksums=False)
    unused = {  # the keys the GPU run does not time: the archive must fit a device call beside onnxruntime-gpu
        ref.file
        for name, entry in manifest.embedders.items()
        if name != GPU_KEY
        for ref in (entry.model, entry.tokenizer)
    }
    for path in sorted(artifacts.iterdir()):
        if path.name in unused:
            continue
        if path.suffix == ".onnx":
            stripped[path.name] = strip_weights(path, stage / path.name)
        else:
            shutil.copy2(path, stage / path.name)
    run = default_run(preset, artifacts) | {"stripped": stripped, "git": git_info()}
    (stage / "run.json").write_text(json.dumps(run))
    out = BUNDLE / f"{preset}.tar.xz"
    with tarfile.open(out, "w:xz") as tar:
        tar.add(stage, arcname=preset)
    shutil.rmtree(stage)
    return out


def zero_other_archs(library: Path, keep: int) -> int:
    """Zero the payload of every cubin in `library`'s fat binaries built for a chip other than sm_`keep` (headers
    stay, so the loader still finds the sm_`keep` ones); returns the bytes zeroed. Layout: a fat binary is a
    16-byte header (magic 0xBA55ED50, version, header size, payload size) and entries, each a header (its size at
    offset 4, payload size at 8, architecture at 28) and a payload."""
    data = bytearray(library.read_bytes())
    magic, pos, zeroed = struct.pack("<I", 0xBA55ED50), 0, 0
    while (start := data.find(magic, pos)) >= 0:
        header, size = struct.unpack_from("<H", data, start + 6)[0], struct.unpack_from("<Q", data, start + 8)[0]
        if header != 16 or start + header + size > len(data):
            pos = start + 4
            continue
        entry, end = start + header, start + header + size
        while entry < end:
            entry_header, payload = struct.unpack_from("<IQ", data, entry + 4)
            if struct.unpack_from("<I", data, entry + 28)[0] != keep:
                data[entry + entry_header : entry + entry_header + payload] = bytes(payload)
                zeroed += payload
            entry += entry_header + payload
        pos = end
    library.write_bytes(bytes(data))
    return zeroed


def pack_onnxruntime_gpu() -> Path:
    """onnxruntime-gpu for the device's Python (3.12), cut to what the CUDA provider needs on sm_90."""
    out = BUNDLE / "ort.tar.xz"
    if out.is_file():
        return out
    wheels = BUNDLE / "wheel"
    shutil.rmtree(wheels, ignore_errors=True)
    platforms = [arg for tag in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64") for arg in ("--platform", tag)]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
         "--implementation", "cp", *platforms, "-d", str(wheels), ORT_GPU],
        check=True,
    )  # fmt: skip
    unpacked = wheels / "unpacked"
    shutil.unpack_archive(next(wheels.glob("*.whl")), unpacked, "zip")
    capi = unpacked / "onnxruntime" / "capi"
    for unused in [*capi.glob("libonnxruntime.so*"), *capi.glob("libonnxruntime_providers_tensorrt.so")]:
        unused.unlink()  # the C API library (Python loads the pybind module) and TensorRT
    zeroed = zero_other_archs(capi / "libonnxruntime_providers_cuda.so", SM)
    print(f"zeroed {zeroed / 1e6:.0f} MB of kernels for chips other than sm_{SM}")
    with tarfile.open(out, "w:xz", preset=9) as tar:
        for path in unpacked.iterdir():
            tar.add(path, arcname=path.name)
    shutil.rmtree(wheels)
    return out


# -- measure (on the GPU machine) -----------------------------------------------------------------------------


def unpack_preset(preset: str, work: Path) -> tuple[Path, dict[str, Any]]:
    """The preset's artifacts under `work`, weights refilled with seeded random values; and its run.json."""
    import onnx

    with tarfile.open(BUNDLE / f"{preset}.tar.xz") as tar:
        tar.extractall(work, filter="data")
    artifacts = work / preset
    run = json.loads((artifacts / "run.json").read_text())
    rng = np.random.default_rng(0)
    for file, names in run["stripped"].items():
        model, wanted = onnx.load(str(artifacts / file)), set(names)
        for init in model.graph.initializer:
            if init.name in wanted:
                values = rng.standard_normal(int(np.prod(init.dims)), dtype=np.float32) * np.float32(0.02)
                init.raw_data = values.tobytes()
        onnx.save(model, str(artifacts / file))
    return artifacts, run


def measure(preset: str, work: Path) -> dict[str, Any]:
    import onnxruntime as ort

    from raee_ops.runtime import SegmentRuntime

    ort.preload_dlls()  # CUDA and cuDNN from the machine's nvidia-* Python packages
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        sys.exit("error: this onnxruntime has no CUDAExecutionProvider")
    with timer() as t:
        artifacts, run = unpack_preset(preset, work)
    print(f"{preset}: artifacts rebuilt in {t.s:.0f} s", flush=True)
    texts, prompts, exits = run["texts"], run["prompts"], np.asarray(run["exits"])
    rows, num_cpus = len(prompts), len(os.sched_getaffinity(0))
    engines = {
        "cuda": SegmentRuntime(artifacts, providers="cuda", verify_checksums=False),
        "cuda-host-copies": SegmentRuntime(artifacts, providers="cuda", verify_checksums=False, io_binding=False),
        "cpu": SegmentRuntime(artifacts, providers="cpu", intra_op_threads=num_cpus, verify_checksums=False),
    }
    if engines["cuda"].layer_sessions[0].get_providers()[0] != "CUDAExecutionProvider":
        sys.exit("error: the layer sessions did not get the CUDA provider")
    full, best = np.full(rows, engines["cuda"].num_layers), np.full(rows, run["probe_best_layer"])
    keep_all = (lambda layer, pooled: np.zeros(len(pooled), bool)) if run["stops_early"] else None

    def timed(fn) -> tuple[Any, float]:
        fn()  # warm-up: sessions, kernels, allocator
        return fastest(fn, PASSES)

    def methods(rt: SegmentRuntime) -> tuple[Any, dict[str, float]]:
        """The full chain's readout, and the times of every method an engine and each rows-per-call size run."""
        output, full_s = timed(lambda: rt.run_to_exit_pooled(TASK, prompts, full))
        return output, {
            "full_s": full_s,
            "default_layers_s": timed(lambda: rt.run_to_exit_pooled(TASK, prompts, exits, keep_all))[1],
            "key_s": timed(lambda: rt.key(GPU_KEY, texts))[1],
            # what a user could run instead: every row to the layer whose probe scored best on the reference
            "probe_best_s": timed(lambda: rt.run_to_exit_pooled(TASK, prompts, best))[1],
        }

    results: dict[str, dict[str, float]] = {}
    outputs: dict[str, Any] = {}
    for name, rt in engines.items():
        outputs[name], results[name] = methods(rt)
        # the same exits with no rule reading the states: what reading them costs on this engine
        results[name]["default_layers_unread_s"] = timed(lambda rt=rt: rt.run_to_exit_pooled(TASK, prompts, exits))[1]
        print(f"{preset} {name}: {results[name]}", flush=True)
    # the CUDA chains against the CPU's on the same graphs and rows: the last layer's pooled states, and the head
    reference = outputs["cpu"]
    agreement = {
        name: {
            "pooled_max_rel_diff": float(
                np.abs(out.pooled.astype(np.float32) - reference.pooled.astype(np.float32)).max()
                / np.abs(reference.pooled.astype(np.float32)).max()
            ),
            "head_argmax_agreement": float(np.mean(out.logits.argmax(1) == reference.logits.argmax(1))),
        }
        for name, out in outputs.items()
        if name != "cpu"
    }
    print(f"{preset} against the CPU: {agreement}", flush=True)
    # a handler tokenizes its rows once (the length check, whose ids the layers reuse): the chains timed above did
    # it inside, so the preparing machine's tokenizing is left out of the default's host phases
    tokenize_s = timed(lambda: engines["cpu"].encode(prompts))[1]
    # the default's layers on CUDA as the runtime compacts its batches (compact_below), and at every exit or never
    cuda = engines["cuda"]
    used, compaction = cuda.compact_below, {}
    for share in sorted({1.0, used, 0.0}, reverse=True):
        cuda.compact_below = share
        compaction[str(share)] = timed(lambda: cuda.run_to_exit_pooled(TASK, prompts, exits, keep_all))[1]
    cuda.compact_below = used
    print(f"{preset} cuda, the default's layers by compaction: {compaction}", flush=True)
    host = {k: v for k, v in run["cpu_phase_s"].items() if k not in ("tokenize", "key", "layers")}
    key_lr_host = sum(v for k, v in run["key_lr_cpu_phase_s"].items() if k != "key")  # it runs no prompt
    # rows per ONNX call on CUDA, where a chain of small batches waits on kernel launches more than on arithmetic
    size_used, sweep = cuda.sub_batch, {}
    for size in SUB_BATCHES:
        cuda.sub_batch = size
        sweep[size] = methods(cuda)[1] | {
            "layer_runs": {"full": layer_runs(cuda, prompts, full), "default": layer_runs(cuda, prompts, exits)},
        }
        print(f"{preset} cuda, sub-batch {size}: {sweep[size]}", flush=True)
    cuda.sub_batch = size_used
    for r in [*results.values(), *sweep.values()]:
        whole = {
            "full": r["full_s"],
            "default": r["key_s"] + r["default_layers_s"] + sum(host.values()),
            "probe_best": r["probe_best_s"],
            "key_lr": r["key_s"] + key_lr_host,  # no length check (it runs no layer); its probe is in retrieval
        }
        for method, seconds in whole.items():
            r[f"{method}_rows_per_s"] = rows / seconds
            if method != "full":
                r[f"{method}_vs_full"] = whole["full"] / seconds
        r["default_s"], r["key_share"] = whole["default"], r["key_s"] / whole["default"]
    return {
        "preset": preset,
        "task": TASK,
        "rows": rows,
        "num_layers": engines["cuda"].num_layers,
        "mean_exit_layer": float(exits.mean()),
        "layer_runs": {
            "full": layer_runs(engines["cuda"], prompts, full),
            "default": layer_runs(engines["cuda"], prompts, exits),
        },
        "default_strategy": run["strategy"],
        "probe_best_layer": run["probe_best_layer"],
        "key": GPU_KEY,
        "stops_early": run["stops_early"],
        "gpu": _gpu_name(),
        "cpus_on_gpu_machine": num_cpus,
        "onnxruntime": ort.__version__,
        "cuda_use_tf32": engines["cuda"].layer_sessions[0].get_provider_options()["CUDAExecutionProvider"]["use_tf32"],
        "prepared_at": run["git"],
        "tokenize_s": tokenize_s,
        "host_phases_s_measured_here": host,
        "key_lr_host_s_measured_here": key_lr_host,
        "cpu_default_rows_per_s_measured_here": run["cpu_rows_per_s"],
        "passes": PASSES,
        "sub_batch": cuda.sub_batch,
        "compact_below": used,
        "default_layers_s_by_compact_below": compaction,
        "engines": results,
        "cuda_sub_batch_sweep": sweep,
        "agreement_with_cpu": agreement,
        "weights": "random (seeded) in the stored graphs' shapes: speed only, no accuracy",
    }


def layer_runs(runtime: Any, prompts: list[str], exits: np.ndarray) -> int:
    """Layer sessions run: each of the runtime's length-sorted batches runs to its deepest row's exit."""
    lengths, size = token_lengths(runtime, prompts), runtime.sub_batch
    running = np.flatnonzero(exits > 0)
    order = running[np.argsort(lengths[running], kind="stable")]
    return int(sum(exits[order[i : i + size]].max() for i in range(0, len(order), size)))


def _gpu_name() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True)  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def main() -> int:
    args = parse()
    if args.step == "prepare":
        BUNDLE.mkdir(exist_ok=True)
        for preset in args.preset or PRESETS:
            print(f"wrote {prepare_preset(preset)}", flush=True)
        print(f"wrote {pack_onnxruntime_gpu()}")
        return 0
    result = measure(args.preset, args.work)
    write_result(f"gpu-{args.preset}", result, quick=False, git=result["prepared_at"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
