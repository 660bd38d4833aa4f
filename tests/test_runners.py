"""Both pipelines on real multi-process and portable runners, so nothing depends on in-process state."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
from raee_ops.pipelines.build_db import run_build_db
from raee_ops.pipelines.classify import run_classify
from segment_artifacts import segment_artifacts  # noqa: F401 - fixture
from test_pipelines import labelled

pytestmark = pytest.mark.runners


@pytest.fixture(scope="session")
def job_endpoint(tmp_path_factory):
    port_file = tmp_path_factory.mktemp("jobservice") / "port"
    service = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "apache_beam.runners.portability.local_job_service_main",
            "--port",
            "0",
            "--port_file",
            str(port_file),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            assert service.poll() is None and time.monotonic() < deadline, "job service did not start"
            time.sleep(0.2)
        yield f"localhost:{port_file.read_text().strip().rsplit(':', 1)[-1]}"
    finally:
        service.terminate()
        service.wait(timeout=30)


def run_both(artifacts: Path, root: Path, args: list[str]) -> None:
    train = labelled(root / "train.parquet", 24, 0, "t")
    build = run_build_db(artifacts, "sst2", [str(train)], str(root / "db"), "sst2", "backbone", "overwrite", None, args)
    assert (build.rows_in, build.written, build.rejected) == (29, 24, 5)
    queries = labelled(root / "q.parquet", 12, 1, "q")
    summary = run_classify(
        artifacts, "sst2", str(root / "db"), "sst2", [str(queries)], str(root / "out"), 4, "raee", args
    )
    assert (summary.rows_in, summary.predicted, summary.rejected) == (17, 14, 3)
    assert sum(summary.exit_counts.values()) == 14


def test_multi_processing_direct_runner(segment_artifacts, tmp_path):  # noqa: F811
    run_both(
        segment_artifacts,
        tmp_path,
        ["--direct_num_workers", "2", "--direct_running_mode", "multi_processing"],
    )


def test_portable_runner_loopback(segment_artifacts, tmp_path, job_endpoint):  # noqa: F811
    run_both(
        segment_artifacts,
        tmp_path,
        ["--runner", "PortableRunner", "--job_endpoint", job_endpoint, "--environment_type", "LOOPBACK"],
    )
