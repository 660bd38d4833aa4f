"""Beam pipeline construction shared by every pipeline: options checked before any work, the run ended with one
clear error.

The DirectRunner of recent Beam first tries to download and start the Prism runner; this machine (and many
batch hosts) have no internet, so a local run goes straight to the FnApiRunner that DirectRunner falls back to.
`--direct_num_workers` and `--direct_running_mode` keep working; any other runner name is passed through.

Arguments a command does not know must be Beam pipeline options: anything else (a misspelt `--moed`) is a usage
error naming the closest valid option, never a warning Beam logs while the run goes on with defaults.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import gc
import logging
import os
import re
import signal
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from functools import cache
from typing import Any

import apache_beam as beam
import grpc
from apache_beam.options.pipeline_options import (
    DirectOptions,
    PipelineOptions,
    PortableOptions,
    StandardOptions,
    WorkerOptions,
)
from apache_beam.portability.api import beam_job_api_pb2
from apache_beam.runners.portability import portable_runner
from apache_beam.runners.runner import PipelineState
from raee_ops.pipelines.local_runner import CHANNEL_CLOSED, failed_worker, local_runner

from raee_ops import logs
from raee_ops.commit import end_terminated, note_interrupt
from raee_ops.errors import (
    STORE_FAILED,
    NotShared,
    RaeeConfigError,
    RaeeRunError,
    RetryLater,
    StoreUnavailable,
    exhausted,
    first_line,
)
from raee_ops.processes import descendants
from raee_ops.settings import RaeeOptions, is_local_runner

log = logging.getLogger(__name__)


#: How long a job service has to answer before the run starts: Beam waited --job_server_timeout (60 s by default,
#: more where given) and then failed with "FutureTimeoutError", naming neither the service nor the cause.
JOB_SERVICE_WAIT_S = 10.0


#: gRPC's word for a port that answered, but not in HTTP/2 (a web server's, the object store's endpoint): not an outage.
_NOT_GRPC = "Failed parsing HTTP/2"
#: A job service's answer to the driver's call when it is gone or stalled: an outage a retry mends (exit 75), before
#: the run's work (check_job_service) as during it.
_SERVICE_LOST = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def check_job_service(beam_args: Sequence[str]) -> None:
    """A portable runner's job service must answer, as a job service, before the run makes anything (called after
    the checks that need no network: a wrong option is exit 2 at once, not a retry). One that does not answer is an
    outage a scheduler's retry mends (exit 75), as for an object store; one that answers as something else (a
    worker pool's port) is configuration (2). Other runners ignore --job_endpoint, and so does this check."""
    options = PipelineOptions(list(beam_args))
    endpoint = options.view_as(PortableOptions).job_endpoint
    runner = options.view_as(StandardOptions).runner
    if not endpoint or endpoint == "embed" or is_local_runner(runner):  # "embed": Beam starts one in this process
        return
    from apache_beam.portability.api import beam_job_api_pb2_grpc
    from apache_beam.runners.runner import create_runner

    if not isinstance(create_runner(runner), portable_runner.PortableRunner):
        return
    with grpc.insecure_channel(endpoint) as channel:
        try:
            jobs = beam_job_api_pb2_grpc.JobServiceStub(channel)
            jobs.GetJobs(beam_job_api_pb2.GetJobsRequest(), timeout=JOB_SERVICE_WAIT_S)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            said = f"{code.name}: {first_line(exc.details() or '')}" if code else first_line(exc)
            if code in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNAUTHENTICATED) or _NOT_GRPC in said:
                raise RaeeConfigError(
                    f"--job_endpoint {endpoint} answers, but not as a Beam job service ({said})"
                ) from None
            raise RetryLater(
                f"the job service at --job_endpoint {endpoint} did not answer ({said}); retry later"
            ) from None


def _subclasses(cls: type) -> Iterable[type]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


class _Refusing(argparse.ArgumentParser):
    """Reports a bad value as an exception (one line for the CLI), not as argparse's usage dump and exit."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ValueError(message)


@cache
def _beam_parser() -> argparse.ArgumentParser:
    parser = _Refusing(allow_abbrev=False, add_help=False)
    # each options class once, in definition order (ours among them: imported above)
    for cls in dict.fromkeys([*_subclasses(PipelineOptions), RaeeOptions]):
        try:
            cls._add_argparse_args(parser)
        except argparse.ArgumentError:  # an option two classes both declare: the first one stands
            log.debug("duplicate pipeline option in %s", cls.__name__)
    return parser


def unknown_args(
    beam_args: Sequence[str],
    command_options: Iterable[str],
    runs_pipeline: bool = True,
    elsewhere: Mapping[str, Sequence[str]] | None = None,
) -> str | None:
    """None when every argument is a Beam pipeline option with a value it takes, else one line naming the first
    unknown one and the closest option of the command or of Beam (or the other commands that have it: `elsewhere`,
    option → command names), or the bad value. A command that runs no pipeline (`runs_pipeline` False) takes no
    runner option: it would run in this process whatever they said."""
    try:
        known, unknown = _beam_parser().parse_known_args(list(beam_args))
    except ValueError as exc:
        return f"bad Beam pipeline option: {exc}"
    if not unknown:
        where = None if runs_pipeline else _runner_option(beam_args)
        if where:
            return f"{where}: this command runs in this process, not on a runner (runner options are for the pipelines)"
        return _given_once(beam_args) or _own_record(known) or _bad_value(known, beam_args)
    first = unknown[0]
    if not first.startswith("-"):
        return f"unexpected argument {first!r}"
    name, elsewhere = first.split("=", 1)[0], elsewhere or {}
    if name in elsewhere:
        return f"no such option: {name} ({_of_others(elsewhere[name])})"
    return (
        f"no such option: {name}{_closest(name, command_options, elsewhere)}; options this command does not know "
        "must be Beam pipeline options"
    )


def _closest(name: str, command_options: Iterable[str], elsewhere: Mapping[str, Sequence[str]]) -> str:
    """The hint for a misspelt option: the closest of the command's own, of another command's (`--moed` on classify is
    build-db's `--mode`) and of Beam's, said whose (`--moed` named `--zone`, a Dataflow option, as if classify's);
    the command's own first of equally close ones."""
    recorded = {f"--raee_{name}" for name in RECORDED}  # never to give: not to suggest either
    beam = [o for o in _beam_parser()._option_string_actions if o.startswith("--") and o not in recorded]
    candidates = [(o, o) for o in command_options]
    candidates += [(o, f"{o}, {_of_others(commands)}") for o, commands in elsewhere.items()]
    candidates += [(o, f"the pipeline option {o}" if o.startswith("--raee_") else f"Beam's {o}") for o in beam]
    bare = name.lstrip("-")  # the dashes every option shares made `--foo` look 60% like `--out`
    score, said = max(
        ((difflib.SequenceMatcher(None, bare, o.lstrip("-")).ratio(), said) for o, said in candidates),
        key=lambda c: c[0],
    )
    return f" (did you mean {said}?)" if score >= 0.6 else ""


def _of_others(commands: Sequence[str]) -> str:
    listed = " and ".join([", ".join(commands[:-1]), commands[-1]] if len(commands) > 1 else commands)
    return f"an option of {listed}, not of this command"


def _given_once(beam_args: Sequence[str]) -> str | None:
    """As for the command's own options: a Beam option that takes one value given twice (argparse keeps the last: a
    job template's value and an override, which one ran must not be a guess) or as an empty string (an unset
    variable), or a flag given with its opposite. Options that gather values (`--experiments`) may repeat."""
    actions = _beam_parser()._option_string_actions
    seen: dict[str, str] = {}
    for i, arg in enumerate(beam_args):
        name, eq, inline = arg.partition("=")
        action = actions.get(name) if arg.startswith("--") else None
        if not isinstance(action, argparse._StoreAction | argparse._StoreConstAction):
            continue
        value = inline if eq else (beam_args[i + 1] if i + 1 < len(beam_args) else None)
        if isinstance(action, argparse._StoreAction) and value is not None and not value.strip():
            return f"{name} is empty (an unset variable?); give a value or leave the option out"
        earlier = seen.get(action.dest)
        if earlier is not None and (isinstance(action, argparse._StoreAction) or earlier != name):
            return f"{name} given twice; give it once" if earlier == name else f"{earlier} and {name}: give one"
        seen[action.dest] = name
    return None


#: The RaeeOptions make_pipeline sets from the command's own options, after the caller's: one given was dropped.
RECORDED = ("command", "artifacts", "task", "db", "table", "strategy")


def _own_record(options: argparse.Namespace) -> str | None:
    given = [name for name in RECORDED if getattr(options, f"raee_{name}", None) is not None]
    if not given:
        return None
    instead = "" if given[0] == "command" else f"; give --{given[0]}"
    return (
        f"--raee_{given[0]} is raee-ops's record of the command's own options, not one to give (it would be "
        f"ignored){instead}"
    )


@cache
def _runner_options() -> frozenset[str]:
    """The Beam options that say where and how a pipeline runs (runner, job service, workers)."""
    parser = argparse.ArgumentParser(add_help=False)
    for cls in (StandardOptions, PortableOptions, DirectOptions, WorkerOptions):
        cls._add_argparse_args(parser)
    return frozenset(name for name in parser._option_string_actions if name.startswith("--"))


def _runner_option(beam_args: Sequence[str]) -> str | None:
    return next((a.split("=", 1)[0] for a in beam_args if a.split("=", 1)[0] in _runner_options()), None)


def _bad_value(options: argparse.Namespace, beam_args: Sequence[str]) -> str | None:
    """What Beam would only find once the run has begun, having made the run's folders: a runner it cannot make,
    a portable runner's missing job service or worker environment, a negative worker count."""
    runner = getattr(options, "runner", None)
    if not is_local_runner(runner):
        from apache_beam.runners.runner import create_runner

        try:
            made = create_runner(runner)
        except (ValueError, ImportError, AttributeError, TypeError) as exc:
            return f"--runner {runner}: {exc}"
        if isinstance(made, portable_runner.PortableRunner):
            return _bad_portable(made, PipelineOptions(list(beam_args)))
    workers = getattr(options, "direct_num_workers", None)
    if workers is not None and workers < 0:
        return f"--direct_num_workers must be 0 (every core) or more, got {workers}"
    return None


def _bad_portable(runner: portable_runner.PortableRunner, options: PipelineOptions) -> str | None:
    """A portable runner's settings as Beam checks them when the run starts (it failed as "in a Beam worker", or as
    an internal error of two lines)."""
    from apache_beam.options.pipeline_options_validator import PipelineOptionsValidator
    from apache_beam.transforms.environments import Environment

    portable = options.view_as(PortableOptions)
    if type(runner) is portable_runner.PortableRunner and not portable.job_endpoint:
        return "--runner PortableRunner needs --job_endpoint (the job service's host:port)"
    if portable.environment_type == "EXTERNAL" and not portable.environment_config:
        return "--environment_type EXTERNAL needs --environment_config (the worker pool's host:port)"
    problems = PipelineOptionsValidator(options, runner).validate()
    if problems:
        return f"--runner {type(runner).__name__}: {first_line(problems[0])}"
    try:
        Environment.from_options(portable)
    except (ValueError, TypeError) as exc:
        return f"--environment_type {portable.environment_type}: {first_line(exc)}"
    return None


def make_pipeline(beam_args: Sequence[str] = (), **settings: str | None) -> beam.Pipeline:
    """A pipeline with the caller's Beam options and the project's settings (`raee_*` pipeline options)."""
    extra = [f"--raee_{key}={value}" for key, value in settings.items() if value is not None]
    options = PipelineOptions(list(beam_args) + extra)
    runner_name = options.view_as(StandardOptions).runner
    local = is_local_runner(runner_name)
    pipeline = beam.Pipeline(runner=local_runner(), options=options) if local else beam.Pipeline(options=options)
    # Beam's folder for cross-language transforms, which these pipelines have none of, removed only once run() ends:
    # each run killed, or refused before its run, left one in the temporary folder
    os.rmdir(pipeline.local_tempdir)
    return pipeline


class _Terminated(BaseException):
    """A SIGTERM while a job runs: unwinds to run_pipeline, which cancels the job, then ends as SIGTERM ends a
    process."""


class _Interrupts:
    """Notes a SIGINT while the block runs (in the main thread; elsewhere there is nothing to note), then raises it
    as Python would; a SIGTERM raises _Terminated, so that the job is cancelled before the process ends. With
    `local_workers` (the local runner's, in processes of their own) either first stops them: a signal sent to this
    process alone (a scheduler's, not a terminal's) never reaches them. Interrupted, the runner waited for them to
    end (a SIGINT while they started hung the run); terminated, they outlived the run, waiting for its servers."""

    #: How often, once signalled, the local runner's workers are stopped again until the block is left.
    REAP_EVERY_S = 0.2

    def __init__(self, local_workers: bool = False) -> None:
        self.seen = False
        self.terminated = False
        self._left = threading.Event()
        main = threading.current_thread() is threading.main_thread()
        # only Python's own handling (or a command's, which notes it) is replaced: an ignored SIGINT (a `cmd &` job,
        # `trap '' INT`) stays so
        self._previous = signal.getsignal(signal.SIGINT)
        self._sigint = main and self._previous in (signal.default_int_handler, note_interrupt)
        self._sigterm = main and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        self._local_workers = local_workers

    def __enter__(self) -> None:
        if self._sigint:
            signal.signal(signal.SIGINT, self._note)
        if self._sigterm:
            signal.signal(signal.SIGTERM, self._terminated)

    def __exit__(self, *exc: object) -> None:
        self._left.set()
        if self._sigint:
            signal.signal(signal.SIGINT, self._previous)
        if self._sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def _note(self, signum: int, frame: object) -> None:
        self.seen = True
        self._reap()
        self._previous(signum, frame)

    def _terminated(self, signum: int, frame: object) -> None:
        self.terminated = True
        self._reap()
        raise _Terminated

    def _reap(self) -> None:
        """Stop the workers now and, from a daemon thread, again and again until the block is left: the runner
        unwinding the signal joins its worker threads, and one that started a worker after the first stop waited
        on it forever (a SIGINT while workers started, under load: the run hung)."""
        if not self._local_workers:
            return
        stop_local_workers()
        threading.Thread(target=self._reap_until_left, name="raee-reap-workers", daemon=True).start()

    def _reap_until_left(self) -> None:
        while not self._left.wait(self.REAP_EVERY_S):
            stop_local_workers()

    def stop_workers(self) -> None:
        """Stop the local runner's workers: at the signal, and again once the job is cancelled, since the runner's
        threads may have started another worker in between (it outlived a terminated run, holding its stderr)."""
        if self._local_workers:
            stop_local_workers()


def stop_local_workers() -> None:
    """Stop the local runner's worker processes: this process's descendants. A stopped one (SIGSTOP) acts on the
    SIGTERM only once continued, so each is continued too, as systemd does: a stopped worker's shell held a
    terminated run for ever, and a stopped worker outlived its command (stall sweep F5)."""
    for pid in descendants(os.getpid()):
        for sent in (signal.SIGTERM, signal.SIGCONT):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sent)


def run_pipeline(pipeline: beam.Pipeline, what: str):
    """Run to completion; any failure (a worker's exception, a job that ends FAILED or CANCELLED) becomes one
    RaeeRunError line, the traceback going to the log. A job the driver stops waiting for (Ctrl-C, SIGTERM, a
    failure while waiting) is cancelled first, so it does not go on writing into the run's folders."""
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    interrupted = _Interrupts(local_workers=isinstance(pipeline.runner, FnApiRunner))
    result = None
    gc.freeze()  # the imports and the pipeline live until exit: spare the collector (and the exit) walking them
    try:
        with interrupted, logs.library_prints_hidden():
            result = pipeline.run()
            _streams_without_deadline(result)
            state = result.wait_until_finish()
    except KeyboardInterrupt:
        _cancel(result, what)
        interrupted.stop_workers()
        raise
    except _Terminated:
        _end_terminated(result, what, interrupted)
        raise
    except Exception as exc:
        if interrupted.terminated:  # raised in a transform the local runner runs in this thread, which wraps it
            _end_terminated(result, what, interrupted)
        _cancel(result, what)
        if interrupted.seen:  # Ctrl-C reaches the runner's threads too, which report it as their own failure
            raise KeyboardInterrupt from exc
        log.debug("%s pipeline failed", what, exc_info=True)
        line = failure(what, exc, result)
        own = _own_exit(exc, line)  # a prune under the run, the store not answering (run again); a path unseen
        raise (own or RaeeRunError)(line) from exc
    if interrupted.terminated:  # its _Terminated swallowed where it landed (a library's code that cannot raise): the
        _end_terminated(result, what, interrupted)  # job ran on to its end, and the run must not go on to publish
    if interrupted.seen:  # a KeyboardInterrupt swallowed likewise: stopped now, not after build-db's fit (check_held)
        raise KeyboardInterrupt
    if state != "DONE":
        raise RaeeRunError(f"{what} pipeline ended in state {state}")
    return result


def _kinds(cls: type[RetryLater]) -> dict[str, type[RetryLater]]:
    return {cls.__name__: cls} | {name: kind for sub in cls.__subclasses__() for name, kind in _kinds(sub).items()}


#: The worker failures that end the run with their own exit code (raee_ops.errors), by name, as a worker of its own
#: reports only its traceback: those a rerun cures, and a location the workers cannot see.
OWN_EXITS = _kinds(RetryLater) | {NotShared.__name__: NotShared}
WORKER = " in a Beam worker: "


def _own_exit(exc: BaseException, line: str) -> type[RetryLater | NotShared] | None:
    """The kind of RetryLater (or NotShared) a worker's failure was, if it was one: in this process, an exception in
    the chain Beam wrapped it in; in workers of their own, the exception the failure's line names first."""
    if isinstance(exc, grpc.Call) and exc.code() in _SERVICE_LOST:  # the job service lost mid-run (`failure`)
        return RetryLater
    seen: set[int] = set()
    chained: BaseException | None = exc
    while chained is not None and id(chained) not in seen:
        if isinstance(chained, (RetryLater, NotShared)):
            return type(chained)
        seen.add(id(chained))
        chained = chained.__cause__ or chained.__context__
    if STORE_FAILED.search(line):  # a worker's call the store failed (a shard's upload): it ended the run with 1
        return StoreUnavailable
    named = line.split(WORKER, 1)[1].split(":", 1)[0] if WORKER in line else ""
    return OWN_EXITS.get(named)


def failure(what: str, exc: Exception, result: Any = None) -> str:
    """The line of a failed run: a job service's lost call names the service and its status (its first line was
    "<_MultiThreadedRendezvous of RPC that terminated with:"), a job that failed on a job service the worker's error
    from the job's messages (Beam's exception says only "Error running pipeline."), a failure in workers of their
    own the exception their traceback ends with (or how one died mid-bundle), anything else the worker's error."""
    if isinstance(exc, grpc.RpcError) and isinstance(exc, grpc.Call):
        return f"{what} pipeline failed: the job service stopped answering ({exc.code().name}: {exc.details()})"
    traced = first_line(exc).startswith("Traceback (most recent call last)") and _raised([str(exc)])
    cause = _job_error(result) or traced or f"{type(exc).__name__}: {first_line(exc)}"
    if cause == CHANNEL_CLOSED:  # a local worker died mid-bundle: how it ended says more
        cause = failed_worker() or cause
    ran_out = exhausted(cause)  # not a bug: the worker's disk, its open files
    mend = f"; {ran_out[1]}, then run again" if ran_out else ""
    return f"{what} pipeline failed{WORKER}{cause}{mend}"


#: The last line of a Python traceback: the exception's name (its module's dotted path dropped) and its message.
_RAISED = re.compile(
    rf"^(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*(?:Error|Exception|Fault|Exit|Interrupt)\w*|{'|'.join(OWN_EXITS)}): (.+)$",
    re.M,
)


def _job_error(result: Any) -> str | None:
    """The worker's exception in a failed portable job's error messages (their tracebacks), as `Name: message`."""
    texts = [
        m.message_response.message_text
        for m in getattr(result, "_messages", ())
        if m.HasField("message_response")
        and m.message_response.importance == beam_job_api_pb2.JobMessage.JOB_MESSAGE_ERROR
    ]
    return _raised(texts)


def _raised(texts: Iterable[str]) -> str | None:
    """The last exception the tracebacks in `texts` end with, as `Name: message`: in a job's error messages, or in
    the error of workers in processes or threads of their own (`--direct_running_mode`), which is their traceback."""
    raised = [(name, message, text) for text in texts for name, message in _RAISED.findall(text)]
    if not raised:
        return None
    name, message, text = raised[-1]
    call = _GRPC_CALL.search(text) if message.startswith("<_") else None  # grpc's repr: its first line says nothing
    return f"{name}: a gRPC call failed ({call[1]}: {call[2]})" if call else f"{name}: {first_line(message)}"


#: A failed gRPC call's status and details in grpc's repr of it (a worker's call to its worker pool, say).
_GRPC_CALL = re.compile(r'status = StatusCode\.(\w+)\s+details = "([^"]*)"')


def _end_terminated(result: Any, what: str, interrupted: _Interrupts) -> None:
    """A SIGTERM's end: the job cancelled and the local workers stopped, then `end_terminated`."""
    _cancel(result, what)
    interrupted.stop_workers()
    end_terminated()


def _streams_without_deadline(result: Any) -> None:
    """Beam opens a job service's state and message streams with --job_server_timeout as their deadline, so a
    job running longer is reported failed (DEADLINE_EXCEEDED) while it runs on, though the option's own help says
    it does not bound the run. Reopen both without one (the timeout still bounds the job service's requests); a
    broken message stream, which carries only the job's logs, ends quietly instead of in a thread's traceback."""
    if not isinstance(result, portable_runner.PipelineResult) or not hasattr(result, "_job_service"):
        return  # a local run has finished by now; another Beam's result is waited on as it comes
    service, job = result._job_service, result._job_id
    result._state_stream = service.GetStateStream(beam_job_api_pb2.GetJobStateRequest(job_id=job))
    result._message_stream = _quiet(service.GetMessageStream(beam_job_api_pb2.JobMessagesRequest(job_id=job)))


def _quiet(messages: Iterable[Any]) -> Iterator[Any]:
    try:
        yield from messages
    except grpc.RpcError as exc:  # the state stream reports the job service's failure, in one line
        log.debug("job message stream ended: %s", exc)


def _cancel(result: Any, what: str) -> None:
    """Cancel a job still running on a job service or cluster; best effort, since the reason the run stops (a
    Ctrl-C, a lost job service) must not be hidden by a failed cancel."""
    if result is None:
        return  # nothing submitted, or a local run, which stopped with this process's own call
    try:
        if PipelineState.is_terminal(result.state):  # a local run's result (DONE), or a job that ended anyway
            return
        result.cancel()  # a job service's, or a cluster's (Dataflow's result cancels its job the same way)
        log.info("%s: cancelled the Beam job it stopped waiting for", what)
    except Exception:
        log.debug("%s: cancelling the Beam job failed", what, exc_info=True)
