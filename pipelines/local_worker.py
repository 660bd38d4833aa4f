"""A worker process of the local runner's `--direct_running_mode multi_processing`: Beam's SDK worker, saying as
much as the command that started it, whose stderr it shares. Beam's own worker logged every start, stop and
failure at INFO there, and printed each failed bundle's traceback, whatever -q or the default asked for; the run's
`error:` line names the failure, and -v shows all of it. It ends when that command is gone.

    python -m raee_ops.pipelines.local_worker VERBOSITY COMMAND_PID
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from functools import partial

from raee_ops import logs

#: How often a worker checks that the command that started it still runs.
WATCH_EVERY_S = 1.0
#: How long a worker that failed waits to see its command gone before it reports: a command killed outright closes
#: its connections while it exits, before /proc shows it ended, so a worker's lost connection could be reported
#: (a CRITICAL traceback in that command's stderr, a scheduler's log) as a failure of a command still running.
GONE_WITHIN_S = 2.0


def main(argv: list[str]) -> None:
    verbosity, command = int(argv[1]), int(argv[2])
    logs.configure(verbosity)  # before Beam's import, which logs its own warnings
    from apache_beam.runners.worker import sdk_worker_main

    from raee_ops.faults import fault_point
    from raee_ops.processes import started

    fault_point("worker:start")  # before it connects: Beam's handler waited for it for ever
    running = partial(command_running, command, started(command))
    # its connection to a command gone is no failure to report: that command's stderr, a scheduler's log, had two
    # tracebacks from each worker after a SIGKILL
    logging.getLogger(sdk_worker_main.__name__).addFilter(
        lambda record: running() if record.levelno < logging.ERROR else _outlives(running)
    )
    threading.Thread(target=_end_without, args=(running,), name="raee-watch-command", daemon=True).start()

    failed = None
    with logs.library_prints_hidden():
        try:
            sdk_worker_main.main(argv)
        except Exception as exc:
            if not _outlives(running):
                os._exit(1)  # not a traceback, then SIGABRT from native threads at teardown, to a stderr nobody reads
            failed = exc
    if failed is not None:
        traceback.print_exception(failed)
    _exit(1 if failed else 0)


def _exit(status: int) -> None:
    """End now, skipping the interpreter's teardown: a worker whose job ended while its bundle ran (the job failed
    in another worker) tore down with ONNX Runtime's threads at work, and printed "terminate called without an
    active exception" into the command's stderr, under its one error line, as it aborted."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def command_running(command: int, born: int | None) -> bool:
    """Whether the command that started this worker (process `command`, started at `born`) still runs: not a
    later process given its pid once it was gone."""
    from raee_ops.processes import alive, started

    return alive(command) and started(command) == born


def _outlives(running: Callable[[], bool]) -> bool:
    """Whether the command still runs GONE_WITHIN_S from now (a failure to report), not only at this instant."""
    deadline = time.monotonic() + GONE_WITHIN_S
    while running():
        if time.monotonic() >= deadline:
            return True
        time.sleep(0.05)
    return False


def _end_without(running: Callable[[], bool]) -> None:
    """End this process once the command is gone: a command killed outright (SIGKILL, where nothing of its own
    runs) left its workers computing their bundles for minutes, for nobody, beside the scheduler's retry."""
    while running():
        time.sleep(WATCH_EVERY_S)
    os._exit(1)


if __name__ == "__main__":
    main(sys.argv)
