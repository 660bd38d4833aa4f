"""A warm parent for CLI runs: it imports the packages the commands import (PRELOADED: ~4 s in a fresh interpreter;
with `export` as its argument, export-onnx's too) once, then forks one child per request, and the child runs
`python -m raee_ops` as a fresh process would from there on — its own argv, environment, folder, stdout/stderr
files and exit status.

Protocol on stdin/stdout, one JSON line each: a request {"args", "env", "cwd", "stdout", "stderr"} is answered
{"pid"} once the child runs and {"status"} (a `subprocess`-style return code: -N when killed by signal N) when
it ends. Nothing runs in this process between requests, so no thread or lock is mid-operation at a fork.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import signal
import sys
import warnings

#: What the commands import from other packages (Beam and LanceDB are most of a fresh start). Not ONNX Runtime:
#: its import starts a thread, and a child forked after it hangs or aborts at exit, joining a thread it lacks. Not
#: Beam's RunInference either: it imports torch, which raee-ops hides from it (pipelines/inference.py).
PRELOADED = (
    "apache_beam",
    "apache_beam.io.parquetio",
    "apache_beam.options.pipeline_options",
    "apache_beam.runners.direct.direct_runner",
    "apache_beam.runners.portability.portable_runner",
    "boto3",
    "click",
    "lancedb",
    "numpy",
    "pyarrow.compute",
    "pyarrow.dataset",
    "pyarrow.parquet",
    "sklearn.linear_model",
    "threadpoolctl",
    "tokenizers",
)
#: export-onnx's own, for a parent that runs only export-onnx (torch and transformers: ~15 s of a tiny export's 20).
EXPORT = ("torch", "transformers", "onnx", "raee_ops.onnx_export.loader")


def preload(export: bool) -> None:
    """Import PRELOADED (and EXPORT for export-onnx's parent) with logging and Lance's log level set as a default
    run sets them (Lance reads the latter once)."""
    os.environ.setdefault("LANCEDB_LOG", "error")
    from raee_ops import logs

    logs.configure(0)
    for module in PRELOADED + (EXPORT if export else ()):
        importlib.import_module(module)
    assert "onnxruntime" not in sys.modules, "a preloaded module imports ONNX Runtime"
    assert export or "torch" not in sys.modules, "a preloaded module imports torch"
    # LanceDB resets its runtime in a forked child and says so on every fork: nothing is running here to fork.
    warnings.filterwarnings("ignore", message="lancedb fork support is experimental")


def reply(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def serve() -> dict:
    """Fork a child per request; returns (in the child only) the request it is to run."""
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            return request
        reply({"pid": pid})
        _, status = os.waitpid(pid, 0)
        reply({"status": os.waitstatus_to_exitcode(status)})
    sys.exit(0)


def become(request: dict) -> None:
    """Turn this forked child into `python -m raee_ops ARGS` started in `cwd` with `env`."""
    for fd, path, mode in (
        (0, os.devnull, os.O_RDONLY),
        (1, request["stdout"], os.O_WRONLY),
        (2, request["stderr"], os.O_WRONLY),
    ):
        target = os.open(path, mode | (os.O_CREAT | os.O_TRUNC if fd else 0), 0o644)
        os.dup2(target, fd)
        os.close(target)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C is live, as in a terminal
    import tempfile

    tempfile.tempdir = None  # TMPDIR is read again
    sys.argv = ["raee-ops", *request["args"]]
    sys.path[0] = request["cwd"]  # what `python -m` puts first


if __name__ == "__main__":
    preload(export=sys.argv[1:] == ["export"])
    # What the imports made is never garbage: leave it out of every child's collections, which would otherwise
    # walk (and copy, page by page) the whole inherited heap — at exit alone ~0.4 s a run.
    gc.freeze()
    become(serve())
    import runpy

    runpy.run_module("raee_ops", run_name="__main__", alter_sys=True)
