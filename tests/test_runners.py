"""Both pipelines on real multi-process and portable runners, so nothing depends on in-process state."""

import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from apache_beam.portability.api import beam_job_api_pb2, beam_job_api_pb2_grpc
from cli_runs import one_error_line, raee_ops
from raee_ops.pipelines import options
from raee_ops.pipelines.build_db import run_build_db
from raee_ops.pipelines.classify import run_classify
from segment_artifacts import segment_artifacts  # noqa: F401 - fixture
from test_pipelines import labelled

from raee_ops import batches, storage
from raee_ops.errors import NotShared, RaeeConfigError, RetryLater, StoreUnavailable, VersionRemoved
from raee_ops.processes import alive, descendants

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


def test_local_worker_processes_share_the_cores(monkeypatch):
    """The local runner's N worker processes each sized ONNX Runtime's pool to every core (2 on 2 cores: a classify
    took 34-38 s, not 28-33 s); they now share the cores, an explicit count still wins, and runners whose workers
    run elsewhere (or in this process) keep a worker's own cores."""
    from raee_ops.runtime import default_threads
    from raee_ops.settings import worker_settings

    monkeypatch.delenv("RAEE_INTRA_OP_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    processes = ["--direct_running_mode", "multi_processing"]
    assert worker_settings([*processes, "--direct_num_workers", "2"]).threads == max(1, min(8, cores // 2))
    assert worker_settings([*processes, "--direct_num_workers", "0"]).threads == 1  # a process per core
    assert worker_settings([*processes]).threads == default_threads()  # one worker process: every core
    given = ["--direct_num_workers", "2", "--raee_intra_op_threads", "3"]
    assert worker_settings([*processes, *given]).threads == 3
    assert worker_settings(["--direct_num_workers", "2", "--direct_running_mode", "multi_threading"]).threads is None
    direct = "apache_beam.runners.direct.direct_runner.DirectRunner"
    for spelling in ("directrunner", "Direct", "SwitchingDirectRunner", "FnApiRunner", direct):  # as Beam reads names
        assert worker_settings(["--runner", spelling, *processes, "--direct_num_workers", "2"]).threads is not None
    for remote in (
        ["--runner", "PortableRunner", "--job_endpoint", "localhost:1"],
        ["--runner", "apache_beam.runners.portability.portable_runner.PortableRunner", "--job_endpoint", "localhost:1"],
        ["--runner", "BundleBasedDirectRunner"],  # runs in this process: its pool is every core
        ["--runner", "apache_beam.runners.nosuch.DirectRunner"],  # not a path Beam imports
    ):
        assert worker_settings([*remote, *processes, "--direct_num_workers", "2"]).threads is None


def test_a_local_worker_tells_its_command_from_a_later_process_given_its_pid():
    """Workers watch their command by pid: one reused by another process while they were not looking (they look
    each second) kept them computing for nobody; the process's start time tells the two apart."""
    from raee_ops.pipelines.local_worker import command_running

    from raee_ops.processes import started

    me = started(os.getpid())
    assert isinstance(me, int) and me == started(os.getpid())
    assert command_running(os.getpid(), me)
    assert not command_running(os.getpid(), me - 1)  # the same pid, another process
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    assert started(gone.pid) is None and not command_running(gone.pid, me)


@pytest.mark.parametrize("running_mode", ["multi_processing", "multi_threading"])
def test_local_workers_say_as_much_as_their_command(segment_artifacts, tmp_path, running_mode):  # noqa: F811
    """The local runner's workers share the command's stderr: Beam's worker processes logged their start and stop
    at INFO there and printed a failed bundle's traceback, whatever -q or the default said (44 lines from a -q run,
    400 from a failed one), and the failed run's line said "RuntimeError: Traceback (most recent call last):", the
    workers' error being their traceback; its worker threads printed the traceback too (169 lines). A failure is
    one line naming the worker's exception; -q prints nothing; -v shows the traceback."""
    train = labelled(tmp_path / "train.parquet", 8, 0, "t", bad=False)
    args = ["build-db", "--artifacts", segment_artifacts, "--task", "sst2", "--input", train, "--db", tmp_path / "db"]
    args += ["--direct_num_workers", "2", "--direct_running_mode", running_mode]
    failed = raee_ops(*args, fault="load:build-db", mode="raise")
    line = one_error_line(failed)
    assert failed.returncode == 1 and line.startswith(
        "error: build-db pipeline failed in a Beam worker: InjectedFault: "
    )
    shown = raee_ops(*args, "-v", fault="load:build-db", mode="raise")
    assert shown.returncode == 1 and "Traceback (most recent call last)" in shown.stderr
    assert "injected fault at load:build-db" in line and not (tmp_path / "db" / "sst2.lance").exists()
    done = raee_ops(*args, "-q")
    assert done.returncode == 0 and done.stderr == "" and done.stdout == ""


@pytest.mark.parametrize("death", ["each-at-start", "one-at-start", "mid-bundle"])
def test_a_local_worker_that_dies_ends_the_run_with_how_it_ended(segment_artifacts, tmp_path, death):  # noqa: F811
    """A worker process killed before it connected (out of memory while importing) hung the run for ever: Beam's
    handler waited for its answers. So did one killed while the other still started: the job failed at once, Beam's
    close ended the control stream of connected workers only, and the other connected after it and waited for an end
    nobody sent. One killed mid-bundle ended the run with Beam's "RuntimeError: Channel closed prematurely.", naming
    nothing. Each ends with exit 1 and the worker's end, and no table."""
    train = labelled(tmp_path / "train.parquet", 8, 0, "t", bad=False)
    args = ["build-db", "--artifacts", segment_artifacts, "--task", "sst2", "--input", train, "--db", tmp_path / "db"]
    args += ["--direct_num_workers", "2", "--direct_running_mode", "multi_processing"]
    if death == "one-at-start":
        failed = kill_the_later_worker_as_it_starts([str(a) for a in args])
    else:
        failed = raee_ops(*args, fault={"each-at-start": "worker:start", "mid-bundle": "batch:build-db"}[death])
    assert failed.returncode == 1 and one_error_line(failed) == (
        "error: build-db pipeline failed in a Beam worker: LocalWorkerError: a worker process of the local runner "
        "was killed by SIGKILL (out of memory, or killed from outside) before its work was done"
    )
    assert not (tmp_path / "db" / "sst2.lance").exists()


def kill_the_later_worker_as_it_starts(args: list[str]) -> subprocess.CompletedProcess:
    """The command run with SIGKILL sent to the later of its two local workers as soon as both are seen."""
    driver = subprocess.Popen([sys.executable, "-m", "raee_ops", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while len(workers := worker_processes(driver.pid)) < 2:
            assert driver.poll() is None and time.monotonic() < deadline, driver.stderr.read()
            time.sleep(0.02)
        os.kill(max(workers), signal.SIGKILL)
        stdout, stderr = driver.communicate(timeout=90)
    finally:
        for pid in worker_processes(driver.pid):  # a hung run's, before the driver they are known by goes
            os.kill(pid, signal.SIGKILL)
        driver.kill()
    return subprocess.CompletedProcess(args, driver.returncode, stdout.decode(), stderr.decode())


@pytest.mark.parametrize(
    ("stop", "status", "rows", "ready", "frozen"),
    [
        (signal.SIGINT, 130, 8, lambda pid: True, False),  # an SDK worker started, still importing Beam
        (signal.SIGTERM, -signal.SIGTERM, 8, lambda pid: True, False),
        (signal.SIGKILL, -signal.SIGKILL, 300, lambda pid: connected(pid), False),  # at work, not starting
        # every process under the driver stopped (SIGSTOP: swapped out, a debugger): a stopped worker's shell held the
        # terminated driver for ever, and a stopped worker outlived it (stall sweep F5)
        (signal.SIGTERM, -signal.SIGTERM, 8, lambda pid: True, True),
    ],
    ids=["int", "term", "kill", "term-stopped"],
)
def test_a_signal_to_the_driver_alone_stops_the_multi_process_workers(
    segment_artifacts,  # noqa: F811
    tmp_path,
    stop,
    status,
    rows,
    ready,
    frozen,
):
    """A scheduler's signal reaches the driver, not its worker processes (a terminal's reaches the whole group). A
    SIGINT while they started hung the run, the runner waiting for workers that waited for its closed servers; after
    a SIGTERM they lived on, waiting. Now the driver stops them: exit 130 (or the SIGTERM's status), no worker left,
    no table. A SIGKILL, which the driver cannot see, left them computing for minutes (sweep B, session 65), holding
    its stderr open (a parent reading it waited for them), then each printed two tracebacks there (its lost
    connection logged CRITICAL, then uncaught) and aborted: they end once it is gone, without a word."""
    train = labelled(tmp_path / "train.parquet", rows, 0, "t", bad=False)
    args = ["build-db", "--artifacts", segment_artifacts, "--task", "sst2", "--input", train, "--db", tmp_path / "db"]
    args += ["--direct_num_workers", "2", "--direct_running_mode", "multi_processing"]
    driver = subprocess.Popen(
        [sys.executable, "-m", "raee_ops", *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 120
        while not (workers := [pid for pid in worker_processes(driver.pid) if ready(pid)]):
            assert driver.poll() is None and time.monotonic() < deadline, driver.stderr.read()
            time.sleep(0.1)
        for pid in descendants(driver.pid) if frozen else ():
            os.kill(pid, signal.SIGSTOP)
        driver.send_signal(stop)
        _, stderr = driver.communicate(timeout=60)
    finally:
        driver.kill()
    assert driver.returncode == status and ("error: interrupted" in stderr) == (stop == signal.SIGINT), stderr[-2000:]
    assert "Traceback" not in stderr and "Aborted" not in stderr, stderr[-2000:]
    deadline = time.monotonic() + 20
    while any(map(alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.2)  # SIGTERM'd, or ending themselves; init reaps them
    assert not [pid for pid in workers if alive(pid)], "a worker outlived its interrupted run"
    assert not (tmp_path / "db" / "sst2.lance").exists()


def connected(pid: int) -> bool:
    """Whether process `pid` holds a socket (an SDK worker: once connected to its runner)."""
    try:
        return any(os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:") for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False


def test_a_worker_started_after_the_signal_is_stopped_too():
    """The runner unwinding a signal joins its worker threads; one that started its worker process after the
    driver stopped the others waited on it forever (once in a loaded `make test`: the run hung). Here the main thread
    plays that runner: interrupted, it starts a process and waits for it, which must be stopped in well under its
    60 s; once the block is left, nothing is stopped any more."""
    assert threading.current_thread() is threading.main_thread(), "signal handlers run in the main thread only"
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # the handler _Interrupts replaces
    try:
        interrupts = options._Interrupts(local_workers=True)
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt), interrupts:
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)  # the handler raises here
            finally:
                late = subprocess.Popen(["sleep", "60"])
                assert wait_or_explain(late, interrupts) == -signal.SIGTERM
    finally:
        signal.signal(signal.SIGINT, previous)
    assert interrupts.seen and time.monotonic() - started < 10
    after = subprocess.Popen(["sleep", "1"])
    assert after.wait(timeout=30) == 0


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowed Ctrl-C, as meant
def test_a_ctrl_c_swallowed_in_the_job_stops_the_run_as_the_job_ends(monkeypatch):
    """The job ran on to its end, and so did the run, to build-db's fit (minutes on a large table) before its commit
    noticed (check_held): it stops as the job ends. The transform meets the Ctrl-C where Python cannot raise it, in
    the main thread, where the local runner runs it."""
    import apache_beam as beam
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    from raee_ops.faults import ENV, MODE_ENV, fault_point

    monkeypatch.setenv(ENV, "swallow")
    monkeypatch.setenv(MODE_ENV, "swallowed-interrupt")
    pipeline = beam.Pipeline(runner=FnApiRunner())
    _ = pipeline | beam.Create([1]) | beam.Map(lambda x: (fault_point("swallow"), x)[1])
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # the handler _Interrupts replaces
    try:
        with pytest.raises(KeyboardInterrupt):
            options.run_pipeline(pipeline, "test")
    finally:
        signal.signal(signal.SIGINT, previous)


def wait_or_explain(process: subprocess.Popen, interrupts: options._Interrupts) -> int:
    """The process's exit code within 30 s; past that, killed, and a failure saying what the reaper saw (this test
    failed once in a loaded `make test` and never again since: the next failure says why)."""
    try:
        return process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        reapers = [t.name for t in threading.enumerate() if t.name == "raee-reap-workers"]
        pytest.fail(
            f"pid {process.pid} not stopped in 30 s: signal noted {interrupts.seen}, reaper threads alive {reapers}, "
            f"processes under this one {descendants(os.getpid())}"
        )


def worker_processes(parent: int) -> list[int]:
    """The Python SDK workers under `parent` (its children: each shell execs its worker), from /proc."""
    found = []
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"raee_ops.pipelines.local_worker" in cmdline and parent_of(pid) == parent:
                found.append(pid)
        except (OSError, ValueError):  # ended meanwhile
            continue
    return found


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])  # "pid (name) state ppid …"


def test_portable_runner_loopback(segment_artifacts, tmp_path, job_endpoint):  # noqa: F811
    run_both(
        segment_artifacts,
        tmp_path,
        ["--runner", "PortableRunner", "--job_endpoint", job_endpoint, "--environment_type", "LOOPBACK"],
    )


def loopback(job_endpoint: str) -> list[str]:
    return ["--runner", "PortableRunner", "--job_endpoint", job_endpoint, "--environment_type", "LOOPBACK"]


def job_states(job_endpoint: str) -> dict[str, str]:
    """Every job the job service knows, by id: its state's name."""
    with grpc.insecure_channel(job_endpoint) as channel:
        jobs = beam_job_api_pb2_grpc.JobServiceStub(channel).GetJobs(beam_job_api_pb2.GetJobsRequest(), timeout=30)
    return {j.job_id: beam_job_api_pb2.JobState.Enum.Name(j.state) for j in jobs.job_info}


def test_a_portable_job_longer_than_the_job_server_timeout_runs_to_its_end(
    segment_artifacts,  # noqa: F811
    tmp_path,
    job_endpoint,
    monkeypatch,
):
    """--job_server_timeout bounds the job service's requests, not the run: Beam's streams of the job's state
    had it as their deadline, so a healthy job outliving it failed the run (exit 1) and ran on."""
    loaded = batches.BatchWork._runtime

    def slow(handler):
        time.sleep(6)  # the workers run in this process (LOOPBACK)
        return loaded(handler)

    monkeypatch.setattr(batches.BatchWork, "_runtime", slow)
    train = labelled(tmp_path / "train.parquet", 8, 0, "t", bad=False)
    args = [*loopback(job_endpoint), "--job_server_timeout", "3"]
    build = run_build_db(
        segment_artifacts, "sst2", [str(train)], str(tmp_path / "db"), "sst2", "backbone", "overwrite", None, args
    )
    assert (build.rows_in, build.written) == (8, 8)


@pytest.mark.parametrize(
    ("mode", "status", "stderr"), [("interrupt", 130, "error: interrupted\n"), ("terminate", -signal.SIGTERM, "")]
)
def test_ctrl_c_or_sigterm_cancels_the_job_on_the_job_service(
    segment_artifacts,  # noqa: F811
    tmp_path,
    job_endpoint,
    mode,
    status,
    stderr,
):
    """A Ctrl-C or a scheduler's SIGTERM while the driver waits cancels the job it submitted: left running, it went
    on writing into the run's staging folders after the command had ended."""
    before = job_states(job_endpoint)
    train = labelled(tmp_path / "train.parquet", 8, 0, "t", bad=False)
    build = ["build-db", "--artifacts", segment_artifacts, "--task", "sst2", "--input", train]
    run = raee_ops(*build, "--db", tmp_path / "db", *loopback(job_endpoint), fault="load:build-db", mode=mode)
    # 130, not SIGABRT: LOOPBACK's worker threads in the driver outlive it, and aborted the interpreter's teardown
    assert run.returncode == status and run.stderr == stderr, (run.returncode, run.stderr)
    ours = {job: state for job, state in job_states(job_endpoint).items() if job not in before}
    assert list(ours.values()) == ["CANCELLED"]


def test_a_job_failed_on_the_job_service_names_the_workers_error(segment_artifacts, tmp_path, job_endpoint):  # noqa: F811
    """Beam's exception for a job that failed on a job service says only "Error running pipeline."; the worker's
    exception is in the job's messages, and the line names it as the local runner's does."""
    train = labelled(tmp_path / "train.parquet", 8, 0, "t", bad=False)
    build = ["build-db", "--artifacts", segment_artifacts, "--task", "sst2", "--input", train]
    run = raee_ops(*build, "--db", tmp_path / "db", *loopback(job_endpoint), fault="load:build-db", mode="raise")
    line = one_error_line(run)  # LOOPBACK's workers, in this process, printed their tracebacks above it
    assert run.returncode == 1 and line.startswith(
        "error: build-db pipeline failed in a Beam worker: InjectedFault: injected fault at load:build-db"
    ), line


def test_runner_settings_are_checked_before_the_run_makes_anything(tmp_path, tiny_llama_dir):
    """What Beam finds only once a run has begun, having made the run's folders: a portable runner without its job
    service or worker pool, an unknown environment (exit 1 "in a Beam worker", or an internal error of two lines);
    a job service that does not answer (Beam waited its --job_server_timeout, then said "FutureTimeoutError") or is
    not one (a worker pool's port). The checks that need no network come first: a wrong option is exit 2 at once,
    not a retry. And a command that runs in this process took runner options and ignored them (evaluate ran
    everything here)."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        nobody = f"127.0.0.1:{free.getsockname()[1]}"
    classify = ["classify", "--artifacts", tmp_path / "art", "--task", "sst2", "--db", tmp_path / "db"]
    classify += ["--input", tmp_path / "q.parquet", "--output", tmp_path / "out", "--runner", "PortableRunner"]
    for extra, said in (
        ([], "--runner PortableRunner needs --job_endpoint"),
        (["--job_endpoint", nobody, "--environment_type", "EXTERNAL"], "EXTERNAL needs --environment_config"),
        (["--job_endpoint", nobody, "--environment_type", "EXTRNAL"], "Unknown environment type: EXTRNAL"),
        (["--job_endpoint", nobody, "--environment_type", "LOOPBACK"], "the artifacts folder"),  # no network first
    ):
        run = raee_ops(*classify, *extra)
        assert run.returncode == 2 and said in one_error_line(run), run.stderr
    export = ["export-onnx", "--model", tiny_llama_dir, "--task", "sst2", "--runner", "PortableRunner"]
    export += ["--environment_type", "LOOPBACK", "--job_endpoint"]
    run = raee_ops(*export, nobody, "--out", f"{tmp_path}/x/.")  # not a Path: it drops the "."
    assert run.returncode == 2 and "name the export's own folder" in one_error_line(run)
    started = time.monotonic()
    run = raee_ops(*export, nobody, "--out", tmp_path / "x")
    assert run.returncode == 75 and f"the job service at --job_endpoint {nobody} did not answer" in one_error_line(run)
    assert time.monotonic() - started < 40
    not_a_job_service = grpc.server(ThreadPoolExecutor(1))  # a gRPC server without the job API: a pool's port
    port = not_a_job_service.add_insecure_port("127.0.0.1:0")
    not_a_job_service.start()
    try:
        run = raee_ops(*export, f"127.0.0.1:{port}", "--out", tmp_path / "x")
    finally:
        not_a_job_service.stop(None)
    assert run.returncode == 2 and "answers, but not as a Beam job service (UNIMPLEMENTED" in one_error_line(run)
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler) as web:
        threading.Thread(target=web.serve_forever, daemon=True).start()
        # a web server's port (the object store's endpoint, copied by mistake), which gRPC calls UNAVAILABLE: was 75
        with pytest.raises(RaeeConfigError, match="answers, but not as a Beam job service .UNAVAILABLE: "):
            options.check_job_service(["--runner", "PortableRunner", "--job_endpoint", f"127.0.0.1:{web.server_port}"])
        web.shutdown()
    options.check_job_service(["--job_endpoint", nobody])  # the local runner ignores it: so does the check
    evaluate = ["evaluate", "--artifacts", tmp_path / "art", "--task", "sst2", "--db", tmp_path / "db"]
    evaluate += ["--input", tmp_path / "q.parquet", "--report", tmp_path / "report"]
    for extra in (["--runner", "PortableRunner"], ["--direct_num_workers", "2"]):
        run = raee_ops(*evaluate, *extra)
        assert run.returncode == 2 and f"{extra[0]}: this command runs in this process" in one_error_line(run)
    assert sorted(tmp_path.iterdir()) == []


def test_a_lost_job_service_is_named_as_such():
    """A job service gone mid-run failed the run as "in a Beam worker: _MultiThreadedRendezvous:
    <_MultiThreadedRendezvous of RPC that terminated with:", the line ending there; here a call to a port nothing
    listens on gives the same kind of error."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = beam_job_api_pb2_grpc.JobServiceStub(channel)
    with pytest.raises(grpc.RpcError) as lost:
        stub.GetState(beam_job_api_pb2.GetJobStateRequest(job_id="x"), timeout=5)
    line = options.failure("classify", lost.value)
    assert line.startswith("classify pipeline failed: the job service stopped answering (UNAVAILABLE: "), line
    assert options._own_exit(lost.value, line) is RetryLater  # an outage, as before the run's work: exit 75
    assert (
        options.failure("classify", ValueError("bad\nmore"))
        == "classify pipeline failed in a Beam worker: ValueError: bad"
    )
    # a worker's failed gRPC call (its worker pool gone) in the job's messages: grpc's repr says nothing on its
    # first line ("<_InactiveRpcError of RPC that terminated with:", all the line said)
    traceback = "Traceback (most recent call last):\n  File ...\ngrpc._channel._InactiveRpcError: <_InactiveRpcError "
    traceback += 'of RPC that terminated with:\n\tstatus = StatusCode.UNAVAILABLE\n\tdetails = "failed to connect to '
    traceback += 'all addresses; last error: 127.0.0.1:2: Connection refused"\n\tdebug_error_string = "x"\n>'
    assert options._raised([traceback]) == (
        "_InactiveRpcError: a gRPC call failed (UNAVAILABLE: failed to connect to all addresses; last error: "
        "127.0.0.1:2: Connection refused)"
    )


def test_a_workers_retry_later_is_the_runs_exit_code_from_workers_of_their_own_too():
    """A prune under the run, or the store not answering, in a worker: exit 75, as in the driver. Workers in
    processes or threads of their own report only their traceback, whose last line a name not ending in "Error"
    did not match (review M: a pruned version was exit 1 there, and a worker's Busy read "RuntimeError:
    Traceback (most recent call last):")."""
    traceback = "Traceback (most recent call last):\n  File ...\n  File ...\nraee_ops.errors.VersionRemoved: table "
    traceback += "'sst2': version 2, which this run read, was removed meanwhile (prune --grace 0 ...); run again\n"
    line = options.failure("classify", RuntimeError(traceback))
    assert line == (
        "classify pipeline failed in a Beam worker: VersionRemoved: table 'sst2': version 2, which this run read, "
        "was removed meanwhile (prune --grace 0 ...); run again"
    )
    assert options._own_exit(RuntimeError(traceback), line) is VersionRemoved
    in_process = RuntimeError("wrapped")
    in_process.__cause__ = StoreUnavailable("cannot reach S3")
    assert options._own_exit(in_process, options.failure("build-db", in_process)) is StoreUnavailable
    cycle = ValueError("a message naming in a Beam worker: VersionRemoved: x")
    cycle.__context__ = KeyError("k")
    cycle.__context__.__context__ = cycle  # a chain that loops ends, and a message is not a worker's exception
    assert options._own_exit(cycle, options.failure("classify", cycle)) is None


def test_a_worker_elsewhere_says_which_local_location_it_cannot_see(tmp_path, monkeypatch):
    """A worker on another machine or in a container missed a local --input or --artifacts the command had checked,
    and the run said they changed or vanished mid-run (exit 75: a scheduler retried it for ever). The command's place
    (`storage.carry`) tells the cases apart; test_object_store runs it through a real worker pool."""
    gone, there = tmp_path / "gone", tmp_path
    monkeypatch.setattr(storage, "_launched_from", storage.here())  # a worker beside the command
    assert storage.unseen(str(gone), "--input") is None  # gone there: it went during the run
    monkeypatch.setattr(storage, "_launched_from", "another-host/boot/1")
    assert "--input " + str(gone) + " is not there for the workers" in str(storage.unseen(str(gone), "--input"))
    assert storage.unseen(str(there), "--artifacts") is None and storage.unseen("s3://b/x", "--db") is None
    traceback = "Traceback (most recent call last):\n  File ...\nraee_ops.errors.NotShared: --input /x is not there\n"
    line = options.failure("classify", RuntimeError(traceback))
    assert line.endswith("in a Beam worker: NotShared: --input /x is not there")
    assert options._own_exit(RuntimeError(traceback), line) is NotShared  # exit 2
