"""Runs where the data lives: every location on an S3-compatible server (moto, on 127.0.0.1), each command a fresh
process (Beam's filesystems keep the first options a process sets, so only a fresh one shows a missing option),
and workers in their own processes that share no disk with the driver."""

from __future__ import annotations

import contextlib
import functools
import http.client
import http.server
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import cli_runs
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_runs import one_error_line
from segment_artifacts import segment_artifacts  # noqa: F401 - fixture
from test_pipelines import labelled
from test_runners import job_endpoint  # noqa: F401 - fixture

from raee_ops.commit import CLAIM, SUCCESS, TEMPORARY
from raee_ops.errors import RaeeConfigError, StoreUnavailable
from raee_ops.retrieval import connect, table_names

boto3 = pytest.importorskip("boto3", reason="the aws extra (apache-beam[aws]) runs the object-store tests")
pytest.importorskip("moto.server", reason="moto[server] (dev extra) runs the object-store tests")

BUCKET = "raee-test"
KEYS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}
#: No AWS settings from the environment: every run must get them from its options.
NO_AWS_ENV = {k: None for k in os.environ if k.startswith("AWS_")}


def raee_ops(
    *args: str | Path, env: dict[str, str | None], cwd: Path, fault: str | None = None
) -> subprocess.CompletedProcess:
    """The CLI in its own process with `env` added to (None: removed from) this one's, in `cwd`; `fault`: the point
    where it kills itself (raee_ops.faults)."""
    return cli_runs.raee_ops(*args, env=env, cwd=cwd, fault=fault)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        assert process.poll() is None and time.monotonic() < deadline, f"{what} did not start"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)


@contextlib.contextmanager
def moto_server(**env: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """A moto S3 server on 127.0.0.1 (`env` added to its environment): its endpoint and process."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=os.environ | env,
    )
    try:
        wait_for_port(port, server, "moto server")
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.send_signal(signal.SIGCONT)  # one a test stopped
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def s3():
    """An S3 server on 127.0.0.1 with one bucket; (endpoint, boto3 client)."""
    with moto_server() as (endpoint, _):
        client = boto3.client("s3", endpoint_url=endpoint, **KEYS)
        client.create_bucket(Bucket=BUCKET)
        yield endpoint, client


def s3_args(endpoint: str) -> list[str]:
    return [
        "--s3_endpoint_url",
        endpoint,
        "--s3_access_key_id",
        KEYS["aws_access_key_id"],
        "--s3_secret_access_key",
        KEYS["aws_secret_access_key"],
        "--s3_region_name",
        KEYS["region_name"],
    ]


def keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def upload_dir(client, local: Path, prefix: str) -> str:
    for path in sorted(local.iterdir()):
        client.upload_file(str(path), BUCKET, f"{prefix}/{path.name}")
    return f"s3://{BUCKET}/{prefix}"


def read_parquet(client, prefix: str) -> pa.Table:
    found = [k for k in keys(client, prefix) if k.endswith(".parquet")]
    tables = [pq.read_table(io.BytesIO(client.get_object(Bucket=BUCKET, Key=k)["Body"].read())) for k in found]
    return pa.concat_tables(tables) if tables else pa.table({"id": pa.array([], pa.string())})


def private_env(root: Path) -> tuple[dict[str, str | None], Path]:
    """A run whose temp folder, worker cache and working directory are its own (checked empty afterwards)."""
    for name in ("tmp", "cwd"):
        (root / name).mkdir(parents=True, exist_ok=True)
    env = NO_AWS_ENV | {"TMPDIR": str(root / "tmp"), "RAEE_CACHE_DIR": str(root / "cache")}
    return env, root / "cwd"


def test_export_build_classify_evaluate_all_on_s3(s3, tiny_llama_dir, tmp_path):
    """Every path is s3:// (inputs, artifacts, database, outputs, errors, report); nothing is written to the local
    disk but the worker cache."""
    endpoint, client = s3
    base = f"s3://{BUCKET}/e2e"
    train = labelled(tmp_path / "train.parquet", 24, 0, "t")
    client.upload_file(str(train), BUCKET, "e2e/in/train.parquet")
    for part in range(2):
        queries = labelled(tmp_path / f"q{part}.parquet", 6, part + 1, f"q{part}-", bad=part == 0)
        client.upload_file(str(queries), BUCKET, f"e2e/in/q-{part}.parquet")
    env, cwd = private_env(tmp_path / "run")
    opts = s3_args(endpoint)
    art, db = f"{base}/artifacts", f"{base}/db"

    # No MiniLM key (tens of MB through moto, whose S3 is slow): the tables are keyed by the backbone's embedding.
    export = ["export-onnx", "--model", tiny_llama_dir, "--task", "sst2", "--out", art, "--max-length", "64"]
    export += ["--embedder", "none"]
    done = raee_ops(*export, *opts, env=env, cwd=cwd)
    assert done.returncode == 0, done.stderr
    assert "e2e/artifacts/manifest.json" in keys(client, "e2e/artifacts/")
    assert [k for k in keys(client, "e2e/") if "/.artifacts.tmp-" in k] == []
    # killed while publishing over it: no manifest, the mark; once the dead run's claims are released (as an
    # operator does; else exit 75 for 10 minutes), the rerun replaces it
    (tmp_path / "killed-tmp").mkdir()  # a killed run leaves its local scratch folder: in a temp folder of its own
    killed_env = env | {"RAEE_FAULT": "export:publish", "TMPDIR": str(tmp_path / "killed-tmp")}
    killed = raee_ops(*export, *opts, env=killed_env, cwd=cwd)
    assert killed.returncode == -9
    names = keys(client, "e2e/")
    assert "e2e/artifacts/_PUBLISHING" in names and "e2e/artifacts/manifest.json" not in names
    for claim in [k for k in names if CLAIM in k]:
        client.delete_object(Bucket=BUCKET, Key=claim)
    done = raee_ops(*export, *opts, env=env, cwd=cwd)
    assert done.returncode == 0, done.stderr
    names = keys(client, "e2e/")
    assert "e2e/artifacts/manifest.json" in names and not [k for k in names if "_PUBLISHING" in k or CLAIM in k]

    build = ["build-db", "--artifacts", art, "--task", "sst2", "--db", db, "--input", f"{base}/in/train.parquet"]
    build += ["--embedder", "backbone"]
    done = raee_ops(*build, *opts, env=env, cwd=cwd)
    assert done.returncode == 0, done.stderr
    assert "rows in: 29  written: 24  rejected: 5  (in = written + rejected: ok)" in done.stdout
    assert read_parquet(client, "e2e/db/_errors/sst2/").num_rows == 5
    assert [k for k in keys(client, "e2e/db/_raee-work/")] == []  # staging and claim gone

    out = f"{base}/out"
    # raee-probe retrieves from the table and runs layers on every row, so the overlong prompt is refused; the
    # default, fitted on these chance-level rows, may answer every row with the most common label and run none
    classify = [
        "classify",
        "--artifacts",
        art,
        "--task",
        "sst2",
        "--db",
        db,
        "--output",
        out,
        "--strategy",
        "raee-probe",
    ]
    done = raee_ops(*classify, "--input", f"{base}/in/q-*.parquet", *opts, env=env, cwd=cwd)
    assert done.returncode == 0, done.stderr
    predicted, rejected = read_parquet(client, "e2e/out/predictions-"), read_parquet(client, "e2e/out/_errors-")
    assert (predicted.num_rows, rejected.num_rows) == (14, 3)  # classify needs no label: 3 of the 5 bad rows
    assert f"rows in: 17  predicted: {predicted.num_rows}  rejected: {rejected.num_rows}" in done.stdout
    names = [k.removeprefix("e2e/out/") for k in keys(client, "e2e/out/")]
    assert SUCCESS in names and not [n for n in names if n.startswith((TEMPORARY, CLAIM))], names

    again = raee_ops(*classify, "--input", f"{base}/in/q-*.parquet", *opts, env=env, cwd=cwd)  # a retry: done
    assert again.returncode == 0 and "already done" in again.stdout and "rows in: 17" in again.stdout
    # an input uploaded again, the same bytes (a new modification time): the same job, done; other rows of its size
    # in its place: another job (its ETag tells them, as a local file's SHA-256 does)
    client.upload_file(str(tmp_path / "q1.parquet"), BUCKET, "e2e/in/q-1.parquet")
    again = raee_ops(*classify, "--input", f"{base}/in/q-*.parquet", *opts, env=env, cwd=cwd)
    assert again.returncode == 0 and "already done" in again.stdout, again.stderr
    replaced = labelled(tmp_path / "r1.parquet", 6, 2, "r1-", bad=False)
    assert replaced.stat().st_size == (tmp_path / "q1.parquet").stat().st_size
    client.upload_file(str(replaced), BUCKET, "e2e/in/q-1.parquet")
    other = raee_ops(*classify, "--input", f"{base}/in/q-*.parquet", *opts, env=env, cwd=cwd)
    assert other.returncode == 2 and f"another job ({base}/in/q-1.parquet: changed since)" in one_error_line(other)
    client.upload_file(str(tmp_path / "q1.parquet"), BUCKET, "e2e/in/q-1.parquet")
    other = raee_ops(*classify, "--input", f"{base}/in/q-*.parquet", "--k", "3", *opts, env=env, cwd=cwd)
    assert other.returncode == 2 and "of another job (its --k was 10, this run's 3)" in one_error_line(other)

    evaluate = ["evaluate", "--artifacts", art, "--task", "sst2", "--db", db, "--report", f"{base}/report"]
    client.put_object(Bucket=BUCKET, Key="e2e/report/_CLAIM-killed-run", Body=b"{}")  # a kill moments ago
    held = raee_ops(*evaluate, "--input", f"{base}/in/train.parquet", *opts, env=env, cwd=cwd, fault="load:evaluate")
    assert held.returncode == 75 and "another run is writing --report" in one_error_line(held)  # told before the
    # work (where the model loads, a failure is injected: exit 1), not after it
    client.delete_object(Bucket=BUCKET, Key="e2e/report/_CLAIM-killed-run")  # what an operator does for a dead run
    done = raee_ops(*evaluate, "--input", f"{base}/in/train.parquet", *opts, env=env, cwd=cwd)
    assert done.returncode == 0, done.stderr
    assert {"e2e/report/report.json", "e2e/report/report.md", "e2e/report/predictions.parquet"} <= set(
        keys(client, "e2e/report/")
    )
    info = raee_ops("info", "--db", db, "--json", *opts, env=env, cwd=cwd)
    assert info.returncode == 0 and '"rows": 24' in info.stdout, info.stderr

    # rebuilt (version 2), then pruned: version 1's objects leave the bucket, version 2 reads whole
    done = raee_ops(*build, *opts, env=env, cwd=cwd)
    assert done.returncode == 0, done.stderr
    before = keys(client, "e2e/db/sst2")
    prune = ["prune", "--db", db, "--table", "sst2", "--keep", "1", "--grace", "0"]
    done = raee_ops(*prune, *opts, env=env, cwd=cwd)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("table sst2: removed version 1; kept version 2\n"), done.stdout
    assert len(keys(client, "e2e/db/sst2")) < len(before)
    info = raee_ops("info", "--db", db, "--table", "sst2", "--json", *opts, env=env, cwd=cwd)
    assert info.returncode == 0, info.stderr
    assert [v["version"] for v in json.loads(info.stdout)["tables"][0]["versions"]] == [2]

    assert list(cwd.iterdir()) == []  # no `s3:` folder or anything else beside the runs
    left = [p.name for p in (tmp_path / "run" / "tmp").rglob("*")]
    assert set(left) <= {".ses"}, left  # `.ses`: a 51-byte session id ONNX Runtime keeps in TMPDIR
    assert list((tmp_path / "run" / "cache").iterdir())  # the artifacts were fetched into the worker cache


def test_missing_options_and_live_claims_are_refused(s3, segment_artifacts, tmp_path):  # noqa: F811
    endpoint, client = s3
    art = upload_dir(client, segment_artifacts, "refused/artifacts")
    env, cwd = private_env(tmp_path)
    args = ["classify", "--artifacts", art, "--task", "sst2", "--db", f"s3://{BUCKET}/refused/db"]
    args += ["--input", f"s3://{BUCKET}/refused/in/*.parquet", "--output", f"s3://{BUCKET}/refused/out"]
    typo = raee_ops(*args, "--s3_endpoint_urll", endpoint, env=env, cwd=cwd)
    assert typo.returncode == 2 and "did you mean Beam's --s3_endpoint_url" in one_error_line(typo)
    gcs = raee_ops(*args[:-1], "gs://somewhere/out", *s3_args(endpoint), env=env, cwd=cwd)
    if gcs.returncode == 2 and "raee-ops's gcp extra" in gcs.stderr:  # the gcp extra is not installed here
        assert "gs:// filesystem is not installed" in one_error_line(gcs)

    client.put_object(Bucket=BUCKET, Key="refused/db/_raee-work/sst2/_CLAIM-live-run", Body=b"{}")
    train = labelled(tmp_path / "train.parquet", 8, 0, "t", bad=False)
    client.upload_file(str(train), BUCKET, "refused/in/train.parquet")
    build = ["build-db", "--artifacts", art, "--task", "sst2", "--db", f"s3://{BUCKET}/refused/db"]
    busy = raee_ops(*build, "--input", f"s3://{BUCKET}/refused/in/train.parquet", *s3_args(endpoint), env=env, cwd=cwd)
    assert busy.returncode == 75 and "another run is writing table 'sst2'" in one_error_line(busy)
    prefix, store = f"s3://{BUCKET}/refused/in", s3_args(endpoint)
    run = raee_ops(*build, "--input", prefix, *store, env=env, cwd=cwd)
    assert run.returncode == 2 and f"a folder; give its files or a glob ({prefix}/*.parquet)" in one_error_line(run)
    run = raee_ops(*build, "--input", f"{prefix}/**", "--errors", f"{prefix}/errors", *store, env=env, cwd=cwd)
    assert run.returncode == 2 and f"--input {prefix}/** matches what this run writes" in one_error_line(run)
    gone = raee_ops("info", "--db", "s3://no-such-bucket/db", *s3_args(endpoint), env=env, cwd=cwd)
    assert gone.returncode == 2 and "--db s3://no-such-bucket/db: no bucket 'no-such-bucket'" in one_error_line(gone)
    for command in (["info"], ["prune", "--keep", "1"]):  # a typo'd prefix said "no tables", exit 0, every night
        typo = raee_ops(*command, "--db", f"s3://{BUCKET}/refused/dbb", *s3_args(endpoint), env=env, cwd=cwd)
        line = one_error_line(typo)
        assert typo.returncode == 2 and line.endswith(
            f"no LanceDB database at s3://{BUCKET}/refused/dbb (no object under that prefix)"
        )
    # Beam's S3 client would retry these for minutes, silently: each is one line, at once, and a store that does
    # not answer (or answers 503) is a scheduler's retry (75), not a configuration to mend (2)
    elsewhere = s3_args(f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    run = raee_ops(*args, *elsewhere, env=env, cwd=cwd)
    assert run.returncode == 75 and "cannot reach S3 at http://127.0.0.1:" in one_error_line(run)
    assert one_error_line(run).endswith("(retry later)")
    run = raee_ops("info", "--db", f"s3://{BUCKET}/refused/db", *elsewhere, env=env, cwd=cwd)  # LanceDB's retries
    assert run.returncode == 75 and "cannot reach S3 at http://127.0.0.1:" in one_error_line(run)
    with failing_store() as failing:
        run = raee_ops(*args, *s3_args(failing), env=env, cwd=cwd)
    assert run.returncode == 75 and f"S3 at {failing} is failing (503); retry later" in one_error_line(run)
    assert time.monotonic() - started < 60
    run = raee_ops(*args[:-1], f"s3://{BUCKET}", *s3_args(endpoint), env=env, cwd=cwd)
    assert run.returncode == 2 and "give a folder inside the bucket" in one_error_line(run)
    run = raee_ops(*args, *s3_args("minio:9000"), env=env, cwd=cwd)  # no scheme: botocore refuses the endpoint
    assert run.returncode == 2 and "cannot reach S3 at minio:9000" in one_error_line(run)
    run = raee_ops(*args[:-1], "s3://no-such-bucket/out", *s3_args(endpoint), env=env, cwd=cwd)
    assert run.returncode == 2 and "no bucket 'no-such-bucket'" in one_error_line(run)
    assert list(cwd.iterdir()) == []


def test_the_databases_store_refusing_says_why_and_its_outage_is_a_retry(tmp_path):
    """LanceDB's store errors are a kilobyte-long Rust dump: the line keeps their cause, however deep in it (refused
    credentials, which the pre-run check cannot tell from a policy refusing HEAD), and a connection nobody takes
    is the outage a scheduler's retry mends (75), not configuration (2)."""
    env, cwd = private_env(tmp_path)
    with moto_server(INITIAL_NO_AUTH_ACTION_COUNT="0") as (endpoint, _):  # a store that checks its keys
        run = raee_ops("info", "--db", f"s3://{BUCKET}/db", *s3_args(endpoint), env=env, cwd=cwd)
    assert run.returncode == 2, run.stderr
    refused = "InvalidAccessKeyId: The AWS Access Key Id you provided does not exist in our records."
    assert one_error_line(run).endswith(refused)
    nobody = {"aws_endpoint": f"http://127.0.0.1:{free_port()}", "allow_http": "true", "aws_access_key_id": "k"}
    nobody |= {"aws_secret_access_key": "s", "aws_region": "us-east-1"}
    with pytest.raises(StoreUnavailable, match=r"Connection refused \(retry later\)$"):
        table_names(connect(f"s3://{BUCKET}/db", nobody))
    plain_http = {k: v for k, v in nobody.items() if k != "allow_http"}  # AWS_ENDPOINT_URL alone: LanceDB says only
    with pytest.raises(RaeeConfigError, match=r"BadScheme \(an http:// endpoint: pass it as --s3_endpoint_url"):
        table_names(connect(f"s3://{BUCKET}/db", plain_http))


@contextlib.contextmanager
def failing_store() -> Iterator[str]:
    """An S3 endpoint on 127.0.0.1 that answers every request 503 Slow Down, as a store under strain does."""

    class SlowDown(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_PUT = do_POST = do_HEAD  # noqa: N815

        def log_message(self, *_: object) -> None:
            pass

    with serving(SlowDown) as endpoint:
        yield endpoint


@contextlib.contextmanager
def serving(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 answering with `handler`, in a thread: its endpoint."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def failing_uploads(endpoint: str, deletes: bool = False) -> Iterator[str]:
    """An S3 endpoint on 127.0.0.1 in front of `endpoint` that answers every upload but a claim's (and with `deletes`,
    every delete) 500 Internal Server Error, as a store failing under a job's writes does; every other request passes
    through."""
    target = urllib.parse.urlsplit(endpoint)

    class Front(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            query = urllib.parse.urlsplit(self.path).query
            upload = self.command == "PUT" or "upload" in query  # a multipart upload's calls too
            if upload and CLAIM not in self.path or deletes and (self.command == "DELETE" or "delete" in query):
                self.send_response(500)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            connection = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
            connection.request(self.command, self.path, body, dict(self.headers))
            reply = connection.getresponse()
            data = reply.read()
            connection.close()
            self.send_response(reply.status)
            for name, value in reply.getheaders():  # a HEAD's length is the object's
                if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(name, value)
            self.send_header("Content-Length", reply.headers.get("Content-Length", "0") if not data else str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD  # noqa: N815

        def log_message(self, *_: object) -> None:
            pass

    with serving(Front) as front:
        yield front


@functools.cache
def hidden_from_pools() -> bool:
    """Whether `private_worker_pool` can hide the test's files from its workers (`unshare` lets it mount over them)."""
    return (
        bool(shutil.which("unshare"))
        and subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0
    )


def private_worker_pool(port: int, root: Path) -> subprocess.Popen:
    """Beam's external worker pool; its workers are processes with their own temp folder and cache, and where
    `unshare` allows, a private mount (a tmpfs) over the test session's whole temp folder, where every file the
    driver made lies, so they cannot read those files either (the checkout and its venv stay visible, wherever
    they are)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # workers run `python`
    command = [sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main", "--service_port", str(port)]
    if hidden_from_pools():
        hidden = shlex.quote(str(root.parent))  # pytest's base temp folder: every test's and fixture's files
        mount = f'mount -t tmpfs none {hidden} && mkdir -p {hidden}/worker && exec "$@"'
        command = ["unshare", "-rm", "sh", "-c", mount, "sh", *command]
        env |= {"TMPDIR": f"{root.parent}/worker", "RAEE_CACHE_DIR": f"{root.parent}/worker/cache"}
    else:
        (root / "worker").mkdir()
        env |= {"TMPDIR": str(root / "worker"), "RAEE_CACHE_DIR": str(root / "worker" / "cache")}
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.runners
def test_relative_locations_reach_workers_that_run_in_another_folder(segment_artifacts, job_endpoint, tmp_path):  # noqa: F811
    """Beam's external worker pool runs its workers in its own working directory, where relative --artifacts, --db
    and --output were resolved: a relative --output ran the whole job into the workers' folder and ended with exit
    3, a relative --artifacts failed the job. The driver makes every local location absolute before the run."""
    shutil.copytree(segment_artifacts, tmp_path / "art")
    labelled(tmp_path / "train.parquet", 8, 0, "t", bad=False)
    labelled(tmp_path / "q.parquet", 6, 1, "q", bad=False)
    (tmp_path / "pool").mkdir()
    port = free_port()
    env = os.environ | {"PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    pool = subprocess.Popen(
        [sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main", "--service_port", str(port)],
        cwd=tmp_path / "pool",
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, pool, "worker pool")
        runner = ["--runner", "PortableRunner", "--job_endpoint", job_endpoint, "--environment_type", "EXTERNAL"]
        runner += ["--environment_config", f"localhost:{port}"]
        common = ["--artifacts", "art", "--task", "sst2", "--db", "db", *runner]
        done = raee_ops("build-db", *common, "--input", "train.parquet", "--errors", "rejected", env={}, cwd=tmp_path)
        assert done.returncode == 0 and "rows in: 8  written: 8" in done.stdout, done.stderr
        done = raee_ops("classify", *common, "--input", "q.parquet", "--output", "out", env={}, cwd=tmp_path)
        assert done.returncode == 0 and (tmp_path / "out" / SUCCESS).is_file(), done.stderr
        assert "rows in: 6  predicted: 6  rejected: 0" in done.stdout
        assert list((tmp_path / "pool").iterdir()) == []  # nothing written where the workers run
    finally:
        pool.terminate()
        pool.wait(timeout=30)


@pytest.mark.runners
def test_portable_runner_with_an_external_worker_pool(s3, segment_artifacts, job_endpoint, tmp_path):  # noqa: F811
    """build-db and classify with workers in other processes that read everything from the S3 server."""
    endpoint, client = s3
    art = upload_dir(client, segment_artifacts, "pool/artifacts")
    client.upload_file(str(labelled(tmp_path / "train.parquet", 24, 0, "t")), BUCKET, "pool/in/train.parquet")
    client.upload_file(str(labelled(tmp_path / "q.parquet", 12, 1, "q")), BUCKET, "pool/in/q.parquet")
    port = free_port()
    pool = private_worker_pool(port, tmp_path)
    try:
        wait_for_port(port, pool, "worker pool")
        runner = ["--runner", "PortableRunner", "--job_endpoint", job_endpoint, "--environment_type", "EXTERNAL"]
        runner += ["--environment_config", f"localhost:{port}", *s3_args(endpoint)]
        env, cwd = private_env(tmp_path / "driver")
        db = f"s3://{BUCKET}/pool/db"
        build = ["build-db", "--artifacts", art, "--task", "sst2", "--db", db]
        done = raee_ops(*build, "--input", f"s3://{BUCKET}/pool/in/train.parquet", *runner, env=env, cwd=cwd)
        assert done.returncode == 0, done.stderr
        assert "rows in: 29  written: 24  rejected: 5" in done.stdout
        classify = ["classify", "--artifacts", art, "--task", "sst2", "--db", db, "--strategy", "raee", "--k", "4"]
        classify += ["--input", f"s3://{BUCKET}/pool/in/q.parquet", "--output", f"s3://{BUCKET}/pool/out"]
        done = raee_ops(*classify, *runner, env=env, cwd=cwd)
        assert done.returncode == 0, done.stderr
        assert "rows in: 17  predicted: 14  rejected: 3  (in = predicted + rejected: ok)" in done.stdout
        assert read_parquet(client, "pool/out/predictions-").num_rows == 14
        assert not (tmp_path / "driver" / "cache").exists()  # the driver fetched nothing: the workers did
        if hidden_from_pools():  # local files the workers cannot see: configuration (2), where a retry (75) was said
            classify[classify.index("--output") + 1] += "-local"
            for option, local in (("--input", tmp_path / "q.parquet"), ("--artifacts", segment_artifacts)):
                given = list(classify)
                given[given.index(option) + 1] = local
                done = raee_ops(*given, *runner, env=env, cwd=cwd)
                said = (
                    f"NotShared: {option} {local} is not there for the workers, which run elsewhere than this command"
                )
                assert done.returncode == 2 and said in one_error_line(done), done.stderr
            assert keys(client, "pool/out-local") == []
    finally:
        pool.terminate()
        pool.wait(timeout=30)


def test_claims_on_an_object_store(s3, monkeypatch):
    """A live claim refuses a second run, and a look before long work (evaluate's, which claims its report at the
    end: a retry within a killed run's claim's lapse evaluated everything, then exited 75); a claim not renewed
    within STALE_S is a dead run's and is removed."""
    from raee_ops import commit, storage
    from raee_ops.errors import Busy

    endpoint, client = s3
    storage.configure(s3_args(endpoint))
    place = f"s3://{BUCKET}/claims/out"
    commit.check_unclaimed(place, "--output")
    with commit.claim_output(place, ["predictions-*.parquet"], "--output") as claim:
        storage.write_bytes(claim.staging_of("predictions-0.parquet"), b"x")
        with pytest.raises(Busy, match="another run is writing --output") as busy:
            with commit.claim_output(place, ["predictions-*.parquet"], "--output"):
                pass
        assert "s after its last renewal; deleting it releases the place now" in str(busy.value)  # what to do
        with pytest.raises(Busy, match="another run is writing --report"):
            commit.check_unclaimed(place, "--report")
        claim.publish({"command": "test"})
    commit.check_unclaimed(place, "--output")
    assert keys(client, "claims/out/") == ["claims/out/_SUCCESS", "claims/out/predictions-0.parquet"]
    client.put_object(Bucket=BUCKET, Key="claims/work/_CLAIM-dead-run", Body=b"{}")
    client.put_object(Bucket=BUCKET, Key="claims/work/dead-run/rows-0.parquet", Body=b"x")
    monkeypatch.setattr(commit, "STALE_S", 0.0)  # every other claim is now older than the limit
    with commit.claim_work_dir(f"s3://{BUCKET}/claims/work", "table 't'", commit.new_run_id()) as staging:
        assert [k for k in keys(client, "claims/work/") if "dead-run" in k] == []
        storage.write_bytes(storage.join(staging, "rows-1.parquet"), b"y")
    assert keys(client, "claims/work/") == []


def test_a_run_whose_claim_lapsed_publishes_nothing(s3, monkeypatch):
    """A run whose claim went unrenewed for STALE_S (the store unreachable, the driver stalled) may have lost its
    place to another run, which removes a claim that old and writes there: it published over that run's complete
    output, both exiting 0. Now it refuses (Busy, exit 75) and publishes nothing; a run renewing its claim publishes."""
    from raee_ops import commit, storage
    from raee_ops.errors import Busy

    endpoint, client = s3
    storage.configure(s3_args(endpoint))
    monkeypatch.setattr(commit._Beat, "LAPSE_S", 0.5)
    for heartbeat, lapses in ((0.05, False), (3600.0, True)):
        monkeypatch.setattr(commit, "HEARTBEAT_S", heartbeat)
        place = f"s3://{BUCKET}/lapse/{lapses}"
        theirs = f"{place}/_temporary/the-run-that-took-over/predictions-0.parquet"
        with commit.claim_output(place, ["predictions-*.parquet"], "--output") as claim:
            storage.write_bytes(claim.staging_of("predictions-0.parquet"), b"x")
            time.sleep(1.0)
            if lapses:
                storage.write_bytes(theirs, b"y")  # the run that took the place over, staging
                with pytest.raises(Busy, match="another run may have taken it over"):
                    claim.publish({"command": "test"})
            else:
                claim.publish({"command": "test"})
        found = [k for k in keys(client, f"lapse/{lapses}/") if not k.split("/")[-1].startswith("_CLAIM")]
        published = [k for k in found if "/_temporary/" not in k]
        assert published == ([] if lapses else [f"lapse/{lapses}/_SUCCESS", f"lapse/{lapses}/predictions-0.parquet"])
        # a run that lost its place leaves the staging there (it removed the other run's, which then failed: stall
        # sweep F2); the next run removes its own
        assert storage.exists(theirs) == lapses and len(found) - len(published) == (2 if lapses else 0)


def test_a_lapsed_claim_is_notput_back(s3, monkeypatch):
    """A run stalled past its claim's life, whose claim the run that took the place over removed, wrote it back on
    its first beat once resumed: a third run was refused as long as the lapsed one lived on. It renews no more."""
    from raee_ops import commit, storage

    endpoint, client = s3
    storage.configure(s3_args(endpoint))
    clock = [0.0]
    monkeypatch.setattr(commit, "_now", lambda: clock[0])
    monkeypatch.setattr(commit, "HEARTBEAT_S", 0.05)
    monkeypatch.setattr(commit._Beat, "LAPSE_S", 10.0)
    claim = f"s3://{BUCKET}/beat/_CLAIM-stalled"
    storage.write_bytes(claim, b"{}")
    beat = commit._Beat(claim)
    try:
        time.sleep(0.3)
        assert not beat.gone() and keys(client, "beat/") == ["beat/_CLAIM-stalled"]  # renewed, not lapsed
        clock[0] += 11.0  # stopped for longer than its claim lives ...
        beat.thread.join(timeout=10)  # its first beat since sees it
        storage.delete([claim])  # ... and taken over meanwhile
        time.sleep(0.3)
        assert beat.gone() and keys(client, "beat/") == []
    finally:
        beat.end()


def test_a_table_or_export_whose_claim_lapsed_commits_nothing(
    s3,
    segment_artifacts,  # noqa: F811
    tiny_llama_dir,
    tmp_path,
    monkeypatch,
):
    """As classify's output: a build-db, a prune or an export whose claim went unrenewed (here: at once) may have
    lost the table or --out to another run, and commits nothing (Busy, exit 75): before, it committed its table or
    manifest over that run's. The checks come last, after the fit, the errors or the copies, which take the time."""
    from raee_ops.pipelines.build_db import run_build_db
    from raee_ops.pipelines.export import run_export

    from raee_ops import commit, storage
    from raee_ops.errors import Busy
    from raee_ops.settings import worker_settings
    from raee_ops.tasks import get_task
    from raee_ops.versions import prune

    endpoint, client = s3
    storage.configure(s3_args(endpoint))
    monkeypatch.setattr(commit._Beat, "LAPSE_S", 0.0)
    train = labelled(tmp_path / "train.parquet", 24, 0, "t", bad=False)
    with pytest.raises(Busy, match="another run may have taken it over"):
        run_build_db(
            str(segment_artifacts),
            "sst2",
            [str(train)],
            f"s3://{BUCKET}/lapsed/db",
            "sst2",
            "backbone",
            "overwrite",
            None,
            beam_args=s3_args(endpoint),
        )
    assert [k for k in keys(client, "lapsed/db/") if ".lance/" in k] == []
    monkeypatch.setattr(commit._Beat, "LAPSE_S", 3600.0)
    db = f"s3://{BUCKET}/lapsed/db"
    run_build_db(
        str(segment_artifacts), "sst2", [str(train)], db, "sst2", "backbone", "overwrite", None, s3_args(endpoint)
    )
    monkeypatch.setattr(commit._Beat, "LAPSE_S", 0.0)
    with pytest.raises(Busy, match="another run may have taken it over"):
        prune(db, "sst2", 1, timedelta(0), storage_options=worker_settings(s3_args(endpoint), db).db_storage_options)
    with pytest.raises(Busy, match="another run may have taken it over"):
        run_export(
            str(tiny_llama_dir), f"s3://{BUCKET}/lapsed/art", [get_task("sst2")], False, [], 64, s3_args(endpoint)
        )
    assert "lapsed/art/manifest.json" not in keys(client, "lapsed/art/")


@pytest.mark.filterwarnings("ignore:Possible nested set:FutureWarning")  # pytest resets raee_ops.storage's filter
def test_an_input_glob_skips_the_stores_folder_markers(s3, tmp_path):
    """A zero-byte `prefix/` key (a console's "create folder") matched `prefix/*` and was read as a Parquet file of
    0 bytes, refusing the run; a local folder is not a file either."""
    from raee_ops import inputs, storage

    endpoint, client = s3
    storage.configure(s3_args(endpoint))
    client.put_object(Bucket=BUCKET, Key="marked/", Body=b"")
    client.put_object(Bucket=BUCKET, Key="marked/a.parquet", Body=b"x")
    for pattern in ("marked/*", "marked/**"):
        found = [m.path for m in inputs.input_files([f"s3://{BUCKET}/{pattern}"])]
        assert found == [f"s3://{BUCKET}/marked/a.parquet"], pattern
    # a prefix named with glob characters: a pattern below it read another prefix's files, exit 0 (recheck, session 66)
    client.put_object(Bucket=BUCKET, Key="g/dir[1]/a.parquet", Body=b"x")
    client.put_object(Bucket=BUCKET, Key="g/dir1/b.parquet", Body=b"y")
    with pytest.raises(RaeeConfigError, match=r"folder s3://.*/g/dir\[1\] has glob .*/g/dir\[\[\]1\]/\*.parquet\)"):
        inputs.input_files([f"s3://{BUCKET}/g/dir[1]/*.parquet"])
    found = [m.path for m in inputs.input_files([f"s3://{BUCKET}/g/dir[[]1]/*.parquet"])]
    assert found == [f"s3://{BUCKET}/g/dir[1]/a.parquet"]
    assert [m.path for m in inputs.input_files([f"s3://{BUCKET}/g/dir*/b.parquet"])] == [
        f"s3://{BUCKET}/g/dir1/b.parquet"
    ]


def test_s3_operations_share_one_client_per_setting_set(s3, monkeypatch):
    """Beam's S3 filesystem asks for a client at every operation; building one costs ~0.4 s, so the same settings
    get the same client, and other settings (another region) their own."""
    import boto3

    from raee_ops import storage

    endpoint, client = s3
    made = []
    real = boto3.session.Session.client
    monkeypatch.setattr(boto3.session.Session, "client", lambda *a, **kw: made.append(kw) or real(*a, **kw))
    for region in ("ap-south-1", "eu-west-1"):  # regions no other test uses: their clients are made here
        storage.configure([*s3_args(endpoint)[:-1], region])
        place = f"s3://{BUCKET}/shared/{region}"
        storage.write_bytes(f"{place}/a", b"a")
        assert storage.exists(f"{place}/a") and storage.read_bytes(f"{place}/a") == b"a"
        assert storage.children(place) == ["a"]
        storage.delete([f"{place}/a"])
        assert not storage.exists(f"{place}/a")
    assert [kw["region_name"] for kw in made] == ["ap-south-1", "eu-west-1"]


def test_an_s3_export_folder_keeps_what_is_not_the_export(s3, segment_artifacts):  # noqa: F811
    """A re-export replaces its s3:// --out whole: a database may not be built in it, and one found there (or any
    object its manifest does not list) refuses the export, before the model loads."""
    from raee_ops.schemas.manifest import check_outside_artifacts

    from raee_ops import storage
    from raee_ops.export_place import check_out

    endpoint, client = s3
    storage.configure(s3_args(endpoint))
    art = upload_dir(client, segment_artifacts, "kept/artifacts")
    check_out(art)  # an earlier export alone: replaced
    with pytest.raises(RaeeConfigError, match=f"--db {art}/lancedb: inside the artifacts folder {art};"):
        check_outside_artifacts(f"{art}/lancedb", "--db")
    client.put_object(Bucket=BUCKET, Key="kept/artifacts/lancedb/sst2.lance/_versions/1.manifest", Body=b"x")
    with pytest.raises(RaeeConfigError, match=f"--out {art} holds lancedb, not part of the export there"):
        check_out(art)


def test_an_s3_export_killed_while_publishing_excuses_only_an_exports_files(s3, segment_artifacts):  # noqa: F811
    """An export killed while publishing on S3 leaves its mark, the old export without its manifest, new files among
    them and its claim: a rerun replaces that. The mark let it replace anything else there too (the user's notes),
    and a killed classify's `_PUBLISHING` (its list of names) counted as the mark."""
    from raee_ops.schemas.manifest import load_manifest

    from raee_ops import storage
    from raee_ops.commit import EXPORT_MARK
    from raee_ops.errors import ArtifactError, ArtifactsChanged
    from raee_ops.export_place import check_out

    endpoint, client = s3
    storage.configure(s3_args(endpoint))
    prefix = "killed/artifacts"
    art = upload_dir(client, segment_artifacts, prefix)
    client.delete_object(Bucket=BUCKET, Key=f"{prefix}/manifest.json")
    for name, body in (("_PUBLISHING", EXPORT_MARK), ("layer_007.onnx", b"new"), (f"{CLAIM}x", b"{}")):
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/{name}", Body=body)
    check_out(art)
    # a run reading the folder meanwhile: exit 75 while the export's claim lives (it was exit 2, "not an exported
    # artifacts directory"), then 2, saying what mends it
    with pytest.raises(ArtifactsChanged, match=f"an export-onnx is publishing the artifacts at {art} now"):
        load_manifest(art)
    client.delete_object(Bucket=BUCKET, Key=f"{prefix}/{CLAIM}x")
    with pytest.raises(ArtifactError, match="publishing there was stopped midway .*; run export-onnx again"):
        load_manifest(art)
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/notes.txt", Body=b"mine")
    with pytest.raises(RaeeConfigError, match=f"--out {art} holds notes.txt, not part of the export there"):
        check_out(art)
    client.delete_object(Bucket=BUCKET, Key=f"{prefix}/notes.txt")
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/_PUBLISHING", Body=b'["predictions-00000-of-00001.parquet"]')
    with pytest.raises(RaeeConfigError, match=f"--out {art} holds files that are not an export"):
        check_out(art)
    # --artifacts naming a classify output folder while it publishes: configuration, not an export to wait for
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/{CLAIM}y", Body=b"{}")
    with pytest.raises(ArtifactError, match=f"no manifest.json in {art}: not an exported artifacts directory"):
        load_manifest(art)


def test_an_s3_export_keeps_files_written_into_out_while_it_ran(s3, segment_artifacts, tmp_path, monkeypatch):  # noqa: F811
    """Publishing on S3 removed every file the new export did not have: one written into --out while the export
    ran was deleted without a word. --out is checked again as publishing starts (refused, nothing changed there),
    and only files of an export's names are removed (the old export's head that the new one lacks; a file written
    during the copy stays)."""
    from dataclasses import replace

    from raee_ops.schemas.manifest import load_manifest

    from raee_ops import export_place, storage

    endpoint, client = s3
    storage.configure(s3_args(endpoint))
    manifest = load_manifest(segment_artifacts)
    manifest = replace(manifest, tasks={"sst2": manifest.tasks["sst2"]})  # head_rte.onnx: the old export's only
    late = upload_dir(client, segment_artifacts, "late/out")
    client.put_object(Bucket=BUCKET, Key="late/out/notes.txt", Body=b"mine")
    before = keys(client, "late/out/")
    with pytest.raises(RaeeConfigError, match=f"--out {late} holds notes.txt, not part of the export there .* ran"):
        export_place.publish_remote(upload_dir(client, segment_artifacts, "late/work"), late, manifest)
    assert keys(client, "late/out/") == before

    during = upload_dir(client, segment_artifacts, "during/out")
    put = client.put_object
    monkeypatch.setattr(export_place, "fault_point", lambda _: put(Bucket=BUCKET, Key="during/out/notes.txt"))
    export_place.publish_remote(upload_dir(client, segment_artifacts, "during/work"), during, manifest)
    names = {k.rsplit("/", 1)[1] for k in keys(client, "during/out/")}
    assert names == {ref.file for ref in manifest.file_refs()} | {"manifest.json", "notes.txt"}


def test_a_scheme_without_its_filesystem_names_the_extra():
    from raee_ops import storage
    from raee_ops.errors import RaeeConfigError

    with pytest.raises(RaeeConfigError, match="unsupported scheme hdfs://"):
        storage.check_scheme("hdfs://nn/data/*.parquet", "--input")
    # short of its '//': a folder named 's3:' or 'file:' in the working directory took the run's files, exit 0
    for half, scheme in (("file:/tmp/errors", "file"), ("s3:/bucket/out", "s3"), ("S3:bucket/out", "S3")):
        with pytest.raises(RaeeConfigError, match=f"--errors {half}: write {scheme}://… .a local folder named so"):
            storage.check_scheme(half, "--errors")
    for fine in ("file:///tmp/errors", "./s3:/x", "out/s3:/x", "files:/x"):
        storage.check_scheme(fine, "--output")
    try:
        import google.cloud.storage  # noqa: F401
    except ImportError:
        with pytest.raises(RaeeConfigError, match=r"pip install 'apache-beam\[gcp\]>=.*' \(raee-ops's gcp extra\)"):
            storage.check_scheme("gs://bucket/out", "--output")


def test_workers_fetch_artifacts_into_a_checked_cache(s3, segment_artifacts, tmp_path, monkeypatch):  # noqa: F811
    from raee_ops.schemas.manifest import load_manifest

    from raee_ops import storage
    from raee_ops.artifacts import local_artifacts
    from raee_ops.errors import ArtifactError, ArtifactsChanged

    endpoint, client = s3
    storage.configure(s3_args(endpoint))
    art = upload_dir(client, segment_artifacts, "cache/artifacts")
    monkeypatch.setenv("RAEE_CACHE_DIR", str(tmp_path / "cache"))
    fetched = local_artifacts(art)
    manifest = load_manifest(fetched)
    assert fetched.parent == tmp_path / "cache" and fetched.name.startswith(manifest.fingerprint[:16])
    layer = fetched / manifest.segments.layers[0].file
    layer.write_bytes(b"damaged")  # a damaged cache entry is fetched again
    assert local_artifacts(art) == fetched and load_manifest(fetched) == manifest
    client.put_object(Bucket=BUCKET, Key=f"cache/artifacts/{layer.name}", Body=b"tampered")
    shutil.rmtree(tmp_path / "cache")
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        local_artifacts(art)
    # the same mismatch from an export republished while the worker fetched (the manifest replaced after it was
    # read): not damage but a retry, exit 75
    fetch = storage.download

    def republished_meanwhile(source: str, target: str) -> None:
        client.put_object(Bucket=BUCKET, Key="cache/artifacts/manifest.json", Body=b"{}")
        fetch(source, target)

    monkeypatch.setattr(storage, "download", republished_meanwhile)
    shutil.rmtree(tmp_path / "cache")
    with pytest.raises(ArtifactsChanged, match="replaced while this worker fetched them.*checksum mismatch"):
        local_artifacts(art)


def test_worker_settings_come_from_the_options(s3, monkeypatch):
    from raee_ops.settings import worker_settings

    endpoint, _ = s3
    monkeypatch.setenv("RAEE_PROVIDER", "cuda")  # read here, on the launching machine, and carried to workers
    monkeypatch.delenv("RAEE_INTRA_OP_THREADS", raising=False)
    keys = ["--s3_access_key_id", "testing", "--s3_secret_access_key", "testing"]
    settings = worker_settings(
        ["--s3_endpoint_url", endpoint, "--s3_region_name", "eu-west-1", "--raee_intra_op_threads", "2", *keys]
        + ["--raee_db_storage_option", "aws_region=us-east-2", "--raee_db_storage_option", "timeout=30s"],
        f"s3://{BUCKET}/db",
    )
    assert (settings.provider, settings.threads) == ("cuda", 2)
    assert settings.db_storage_options == {
        "aws_endpoint": endpoint,
        "aws_access_key_id": "testing",
        "aws_secret_access_key": "testing",
        "aws_region": "us-east-2",
        "allow_http": "true",
        "timeout": "30s",
    }
    assert settings.filesystem["s3_endpoint_url"] == endpoint
    with pytest.raises(RaeeConfigError, match=f"--db s3://{BUCKET}: give a folder inside the bucket"):
        worker_settings(["--s3_endpoint_url", endpoint, *keys], f"s3://{BUCKET}")  # Beam would retry it for minutes
    # LanceDB resolves '..' and %-escapes, drops what follows '#' or '?' and strips spaces at the ends; Beam's
    # filesystems do not: the table's claim (and its errors) would lie elsewhere ('db#x': a table nobody could open)
    url = "LanceDB reads it as part of a URL"
    spellings = [("q/../db", "without '.', '..' or empty"), ("d%20b", f"without '%' .{url}"), ("db#x", "without '#'")]
    spellings += [("db?x=1", f"without '[?]' .{url}"), ("db ", "without spaces at its ends")]
    for spelling, problem in spellings:
        with pytest.raises(RaeeConfigError, match=problem):
            worker_settings(["--s3_endpoint_url", endpoint, *keys], f"s3://{BUCKET}/{spelling}")
    assert worker_settings([], "/local/db").db_storage_options == {}


@pytest.mark.parametrize(
    "env, args, problem",
    [
        ({"RAEE_PROVIDER": "gpu"}, [], "RAEE_PROVIDER='gpu' in the environment: expected cpu or cuda"),
        ({"RAEE_INTRA_OP_THREADS": "abc"}, [], "RAEE_INTRA_OP_THREADS='abc' in the environment: expected a whole"),
        ({"RAEE_INTRA_OP_THREADS": "0"}, [], "RAEE_INTRA_OP_THREADS='0' in the environment: expected a whole number"),
        ({"RAEE_INTRA_OP_THREADS": "99999999999"}, [], "RAEE_INTRA_OP_THREADS='99999999999' in the environment"),
        ({}, ["--raee_intra_op_threads", "0"], "--raee_intra_op_threads must be from 1 to 1024, got 0"),
        ({}, ["--raee_intra_op_threads", "99999999999"], "must be from 1 to 1024, got 99999999999"),
        ({}, ["--raee_intra_op_threads", "2000"], "must be from 1 to 1024, got 2000"),
    ],
)
def test_settings_from_the_environment_are_checked_as_the_options_are(monkeypatch, env, args, problem):
    from raee_ops.settings import worker_settings

    for name in ("RAEE_PROVIDER", "RAEE_INTRA_OP_THREADS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(RaeeConfigError, match=re.escape(problem)):
        worker_settings(args, "/local/db")


def classify_on_s3(s3, artifacts, tmp_path, prefix: str) -> tuple[Any, list[str], dict[str, str], Path]:
    """A table of 16 rows built under `prefix` in the bucket, and the classify of 40 rows (5 bad) into
    `<prefix>/out`: (the S3 client, the command's arguments, its environment, its working folder)."""
    from raee_ops.pipelines.build_db import run_build_db

    endpoint, client = s3
    art = upload_dir(client, artifacts, f"{prefix}/artifacts")
    client.upload_file(
        str(labelled(tmp_path / "train.parquet", 16, 0, "t", bad=False)), BUCKET, f"{prefix}/train.parquet"
    )
    client.upload_file(str(labelled(tmp_path / "q.parquet", 40, 3, "q")), BUCKET, f"{prefix}/q.parquet")
    env, cwd = private_env(tmp_path)
    db, opts = f"s3://{BUCKET}/{prefix}/db", s3_args(endpoint)
    train = [f"s3://{BUCKET}/{prefix}/train.parquet"]
    run_build_db(art, "sst2", train, db, "sst2", "backbone", "overwrite", None, opts)  # in this process: quicker
    args = ["classify", "--artifacts", art, "--task", "sst2", "--db", db]
    args += ["--input", f"s3://{BUCKET}/{prefix}/q.parquet"]
    return client, [*args, "--output", f"s3://{BUCKET}/{prefix}/out", *opts], env, cwd


def rerun_publishes_every_row_once(client, args, env, cwd, out: str) -> subprocess.CompletedProcess:
    """The claims a stopped run left in `out` (a prefix in the bucket) deleted, as an operator does for a run known
    to be dead, the run again: exit 0, and its 40 rows (5 bad) each published once. The rerun."""
    names = [k.removeprefix(out) for k in keys(client, out)]
    assert SUCCESS not in names, names
    for claim in [n for n in names if n.startswith(CLAIM)]:
        client.delete_object(Bucket=BUCKET, Key=f"{out}{claim}")
    rerun = raee_ops(*args, env=env, cwd=cwd)
    assert rerun.returncode == 0, rerun.stderr
    ids = read_parquet(client, f"{out}predictions-").column("id").to_pylist()
    ids += read_parquet(client, f"{out}_errors-").column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 45
    return rerun


def test_a_classify_killed_on_s3_blocks_its_output_until_its_claim_is_released(s3, segment_artifacts, tmp_path):  # noqa: F811
    """Killed mid-publish: no `_SUCCESS`, and the dead run's claim stays (a rerun within STALE_S is refused with
    75, as test_missing_options_and_live_claims_are_refused shows); once the claim is deleted, the rerun removes
    the leftovers and publishes every row once."""
    client, args, env, cwd = classify_on_s3(s3, segment_artifacts, tmp_path, "killed")
    killed = raee_ops(*args, env=env | {"RAEE_FAULT": "publish:predictions-*.parquet"}, cwd=cwd)
    assert killed.returncode == -9
    assert [k for k in keys(client, "killed/out/") if CLAIM in k]
    rerun = rerun_publishes_every_row_once(client, args, env, cwd, "killed/out/")
    assert "removed what an earlier, unfinished run left" in rerun.stderr
    names = [k.removeprefix("killed/out/") for k in keys(client, "killed/out/")]
    assert SUCCESS in names and not [n for n in names if n.startswith((TEMPORARY, CLAIM))], names


def test_a_classify_stopped_on_s3_by_sigterm_releases_its_claim(s3, segment_artifacts, tmp_path):  # noqa: F811
    """A scheduler's SIGTERM mid-run: its claim stayed, so the retry was refused with 75 for up to STALE_S (sweep,
    session 66), where a Ctrl-C's released it. The claim goes with the job cancelled; the retry runs at once."""
    client, args, env, cwd = classify_on_s3(s3, segment_artifacts, tmp_path, "termed")
    stopped = raee_ops(*args, env=env | {"RAEE_FAULT": "batch:classify", "RAEE_FAULT_MODE": "terminate"}, cwd=cwd)
    assert stopped.returncode == -15, stopped.stderr
    names = [k.removeprefix("termed/out/") for k in keys(client, "termed/out/")]
    assert SUCCESS not in names and not [n for n in names if n.startswith(CLAIM)], names
    rerun_publishes_every_row_once(client, args, env, cwd, "termed/out/")


def test_a_build_db_stopped_on_s3_by_sigterm_while_it_fits_releases_its_claim(s3, segment_artifacts, tmp_path):  # noqa: F811
    """A scheduler's SIGTERM while build-db fits (outside its job, minutes on a large table): its table's claim
    stayed, so the retry was refused with 75 for up to STALE_S. The driver only reads and computes there: the claim
    goes, nothing is committed, and the retry builds the table at once."""
    endpoint, client = s3
    art = upload_dir(client, segment_artifacts, "fitterm/artifacts")
    client.upload_file(str(labelled(tmp_path / "train.parquet", 20, 0, "t", bad=False)), BUCKET, "fitterm/t.parquet")
    env, cwd = private_env(tmp_path)
    db = f"s3://{BUCKET}/fitterm/db"
    args = ["build-db", "--artifacts", art, "--task", "sst2", "--db", db, "--input", f"s3://{BUCKET}/fitterm/t.parquet"]
    args += ["--embedder", "backbone", *s3_args(endpoint)]
    stopped = raee_ops(*args, env=env | {"RAEE_FAULT": "fit", "RAEE_FAULT_MODE": "terminate"}, cwd=cwd)
    assert stopped.returncode == -15, stopped.stderr
    names = keys(client, "fitterm/db/")
    assert not [n for n in names if CLAIM in n] and not [n for n in names if n.startswith("fitterm/db/sst2.lance")]
    rerun = raee_ops(*args, env=env, cwd=cwd)
    assert rerun.returncode == 0, rerun.stderr
    assert "rows in: 20  written: 20  rejected: 0  (in = written + rejected: ok)" in rerun.stdout
    assert not [n for n in keys(client, "fitterm/db/") if CLAIM in n]


def test_a_store_failing_a_workers_upload_ends_the_run_with_75(s3, segment_artifacts, tmp_path):  # noqa: F811
    """The store answers the job's shard uploads 500 (past botocore's retries, Beam's S3ClientError in the worker):
    the run ended with exit 1, a failure a scheduler does not retry, where the README promises 75 for a store
    failing in a worker (sweep, session 71). Nothing is published; the retry, once the store is well, publishes
    every row once."""
    client, args, env, cwd = classify_on_s3(s3, segment_artifacts, tmp_path, "failing")
    endpoint = args[args.index("--s3_endpoint_url") + 1]
    with failing_uploads(endpoint) as front:
        run = raee_ops(*[front if a == endpoint else a for a in args], env=env, cwd=cwd)
    assert run.returncode == 75, run.stderr
    assert re.search(r"in a Beam worker: S3ClientError: .*\(500\)", one_error_line(run))
    # its deletes failing too, the driver's release of its claim fails (after the job's failure): 75 as well
    with failing_uploads(endpoint, deletes=True) as front:
        run = raee_ops(*[front if a == endpoint else a for a in args], env=env, cwd=cwd)
    assert run.returncode == 75, run.stderr
    assert one_error_line(run).startswith("error: the object store is failing (retry later): ")
    rerun_publishes_every_row_once(client, args, env, cwd, "failing/out/")  # its claim left: not deleted


def test_a_store_that_stops_answering_mid_run_ends_it_with_75(segment_artifacts, tmp_path):  # noqa: F811
    """The store stops answering once the run has claimed its output (a partition; here the server is stopped, so
    connections are taken and never answered): botocore's timeouts and retries under Beam's seven retries had the run
    hang for half an hour or more, and again removing its staging. It ends once the driver's calls have gone
    --raee_store_patience seconds unanswered, exit 75, nothing published; a rerun publishes every row once."""
    from raee_ops.pipelines.build_db import run_build_db

    env, cwd = private_env(tmp_path)
    with moto_server() as (endpoint, server):
        client = boto3.client("s3", endpoint_url=endpoint, **KEYS)
        client.create_bucket(Bucket=BUCKET)
        client.upload_file(str(labelled(tmp_path / "q.parquet", 40, 3, "q")), BUCKET, "in/q.parquet")
        db = str(tmp_path / "db")
        train = labelled(tmp_path / "train.parquet", 16, 0, "t", bad=False)
        run_build_db(str(segment_artifacts), "sst2", [str(train)], db, "sst2", "backbone", "overwrite", None)
        args = ["classify", "--artifacts", segment_artifacts, "--task", "sst2", "--db", db]
        args += ["--input", f"s3://{BUCKET}/in/q.parquet", "--output", f"s3://{BUCKET}/out", *s3_args(endpoint)]
        ended = threading.Event()

        def stop_the_store_once_claimed() -> None:
            while not ended.wait(0.05):
                if any(CLAIM in k for k in keys(client, "out/")):
                    server.send_signal(signal.SIGSTOP)
                    return

        watcher = threading.Thread(target=stop_the_store_once_claimed, daemon=True)
        watcher.start()
        started = time.monotonic()
        try:
            run = raee_ops(*args, "--raee_store_patience", "5", env=env, cwd=cwd)
        finally:
            ended.set()
            watcher.join()
            server.send_signal(signal.SIGCONT)
        assert run.returncode == 75, run.stderr
        assert re.search(rf"the object store at {endpoint} \(.*\) has not answered for \d+ s", one_error_line(run))
        assert time.monotonic() - started < 60  # botocore alone waits 60 s for a reply
        rerun_publishes_every_row_once(client, args, env, cwd, "out/")  # the stopped run's claim: as after a kill


def test_calls_that_get_no_answer_are_timed_and_named_as_beam_can_read_them(monkeypatch):
    """A store that takes connections and never answers (a TCP listener that never replies): the call is counted as
    unanswered from its start, the watch gives up once that lasts its patience, naming the endpoint and the call's
    error; and the timeout reaches Beam's S3 wrapper with a response it can read: Beam read `response.get(...)` off
    botocore's None and turned every timeout into "'NoneType' object has no attribute 'get'"."""
    from apache_beam.io.aws.clients.s3.boto3_client import get_http_error_code
    from botocore.config import Config

    from raee_ops import s3_clients

    monkeypatch.setattr(s3_clients, "health", s3_clients._Health())
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        quick = Config(read_timeout=1, retries={"total_max_attempts": 1})
        client = s3_clients._Timed(boto3.client("s3", endpoint_url=endpoint, config=quick, **KEYS))
        given_up: list[str] = []
        s3_clients.watch(1.5, given_up.append)  # past the call's 1 s timeout: its error is known by then
        with pytest.raises(Exception, match="Read timeout") as timed_out:
            client.head_object(Bucket=BUCKET, Key="k")
        assert get_http_error_code(timed_out.value) is None  # Beam's retry filter reads None as retryable
        deadline = time.monotonic() + 10
        while not given_up and time.monotonic() < deadline:
            time.sleep(0.1)
    assert s3_clients.health.silent_for() >= 1.5
    assert given_up and f"the object store at {endpoint} (ReadTimeoutError: Read timeout" in given_up[0], given_up


def _waits(call: str, endpoint: str) -> None:
    """`call` against `endpoint`: a database listing through LanceDB's client, or a managed copy through the timed
    boto3 client; whatever it raises once the test's listener closes is beside the point."""
    from botocore.config import Config

    from raee_ops import retrieval, s3_clients

    with contextlib.suppress(Exception):
        if call == "lancedb":
            store = {"aws_endpoint": endpoint, "allow_http": "true", "aws_region": "us-east-1"}
            retrieval.table_names(retrieval.connect(f"s3://{BUCKET}/db", store | {"aws_access_key_id": "k"}))
        else:
            quick = Config(read_timeout=30, retries={"total_max_attempts": 1})
            client = s3_clients._Timed(boto3.client("s3", endpoint_url=endpoint, config=quick, **KEYS))
            client.copy({"Bucket": BUCKET, "Key": "a"}, BUCKET, "b")


@pytest.mark.parametrize("call", ["lancedb", "copy"])
def test_the_watch_sees_lancedb_and_managed_copies_wait_too(monkeypatch, call):
    """Calls the timed S3 client does not make: LanceDB's own client (a database's listing and opening, which it
    retried for twelve minutes on a stopped store: info, rollback, prune, a classify opening its table) and boto3's
    managed copy (publishing on S3), whose inner calls go to the client underneath. The watch sees both wait."""
    from raee_ops import s3_clients

    monkeypatch.setattr(s3_clients, "health", s3_clients._Health())
    given_up: list[str] = []
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        s3_clients.watch(1.0, given_up.append)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        threading.Thread(target=_waits, args=(call, endpoint), daemon=True).start()
        deadline = time.monotonic() + 10
        while not given_up and time.monotonic() < deadline:
            time.sleep(0.1)
    assert given_up and "(no reply yet) has not answered for" in given_up[0], given_up
