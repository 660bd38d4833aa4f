"""Beam's local runner as the pipelines use it: with `--direct_running_mode multi_processing`, its worker processes
run `local_worker` (which logs as the command does), and a worker that dies ends the run instead of hanging it.

Beam's own subprocess worker handler waited for a worker's answers for ever: a worker that died before it connected
(out of memory while importing, killed) left the command waiting, its exit code nowhere in sight for a scheduler;
one killed mid-bundle ended the run with "Channel closed prematurely.", which names nothing. Here the handler's
thread, seeing its worker end with a failure, answers every request the job makes of it, now or later, with that
end, as a worker reports its own failure, and the run's line names it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import traceback
from typing import Any

from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.portability import python_urns
from apache_beam.portability.api import beam_fn_api_pb2
from apache_beam.runners.portability import local_job_service
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.runners.portability.fn_api_runner.worker_handlers import (
    BeamFnControlServicer,
    SubprocessSdkWorkerHandler,
    WorkerHandler,
)

from raee_ops import logs

#: The environment of the local runner's worker processes, in place of Beam's SUBPROCESS_SDK.
LOCAL_WORKER_URN = "raee:env:local_worker:v1"


#: How this run's local workers that failed ended, the first first: where one died in a bundle, the job's own error
#: is Beam's "Channel closed prematurely.", which names nothing.
_failed_ends: list[str] = []

#: Beam's error where a worker's data channel broke mid-bundle.
CHANNEL_CLOSED = "RuntimeError: Channel closed prematurely."


def failed_worker() -> str | None:
    """How the first local worker of this run that failed ended, if one did."""
    return _failed_ends[0] if _failed_ends else None


class LocalWorkerError(RuntimeError):
    """A local worker process ended with a failure while the job still needed it."""


@WorkerHandler.register_environment(LOCAL_WORKER_URN, bytes)
class _LocalWorkerHandler(SubprocessSdkWorkerHandler):
    """Beam's subprocess worker handler, whose worker's failed end answers the job's requests of it with that
    failure, as a worker reports its own (the job's threads wait on those answers, and on nothing else that ends),
    and whose close reaches a worker that has not connected yet."""

    #: How often the requests of a worker that ended are answered again: one may be made as it ends.
    ANSWER_EVERY_S = 0.1

    def start_worker(self) -> None:
        self._closing = threading.Event()
        self.worker = local_job_service.SubprocessSdkWorker(
            self._worker_command_line, self.control_address, self.provision_info, self.worker_id
        )
        self.worker_thread = threading.Thread(name="run_worker", target=self._run, daemon=True)
        self.worker_thread.start()

    def _run(self) -> None:
        try:
            self.worker.run()
        except RuntimeError as exc:  # Beam's: "Worker subprocess exited with return code N"
            ended = _ended(str(exc))
            _failed_ends.append(f"{LocalWorkerError.__name__}: {ended}")
            try:  # a traceback, as a worker reports its failure: the run's line names its last line's exception
                raise LocalWorkerError(ended) from None
            except LocalWorkerError:
                self._answer_until_closed(traceback.format_exc())

    def _answer_until_closed(self, error: str) -> None:
        """Answer every request made of the worker with `error` until the handler closes: those waiting, those made
        later, and one made as the worker ended (the job may not have sent its first yet)."""
        connection = self.control_conn
        while True:
            for instruction, future in list(connection._futures_by_id.items()):
                if not future.is_done():
                    future.set(beam_fn_api_pb2.InstructionResponse(instruction_id=instruction, error=error))
            if self._closing.wait(self.ANSWER_EVERY_S):
                return

    def close(self) -> None:
        """Beam ends a worker's control stream only if it has connected: one still starting when the job failed in
        another worker (a second's import) connected after the close and waited for ever for an end nobody sent,
        and the run with it. Queued now, the end reaches it as it connects."""
        self._closing.set()
        if self.control_conn._state != BeamFnControlServicer.STARTED_STATE:
            self.control_conn.push(BeamFnControlServicer._DONE_MARKER)
        super().close()


def _ended(beams: str) -> str:
    """How the worker ended, from Beam's message: an exit status, or the signal that killed it."""
    code = beams.rsplit(" ", 1)[-1]
    try:
        status = int(code)
    except ValueError:
        return f"a worker process of the local runner failed: {beams}"
    if status == -signal.SIGKILL:  # Popen's -N: the shell execs the worker, so no shell's 128+N comes in between
        how = "was killed by SIGKILL (out of memory, or killed from outside)"
    elif -status in set(signal.Signals):
        how = f"was killed by {signal.Signals(-status).name}"
    else:
        how = f"exited with status {status} (its messages above say why)"
    return f"a worker process of the local runner {how} before its work was done"


def local_runner() -> FnApiRunner:
    """Beam's local runner, whose worker processes of their own run `local_worker` under our handler."""

    class LocalRunner(FnApiRunner):
        def run_via_runner_api(self, pipeline_proto: Any, options: PipelineOptions) -> Any:
            _failed_ends.clear()
            # exec: the worker is the shell's process, so no shell prints "Killed" to the command's stderr
            command = f"exec {sys.executable} -m raee_ops.pipelines.local_worker {logs.verbosity()} {os.getpid()}"
            for environment in pipeline_proto.components.environments.values():
                if environment.urn == python_urns.SUBPROCESS_SDK:  # the command of Beam's own worker
                    environment.urn, environment.payload = LOCAL_WORKER_URN, command.encode()
            return super().run_via_runner_api(pipeline_proto, options)

    return LocalRunner()
