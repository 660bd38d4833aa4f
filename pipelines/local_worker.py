"""A worker process of the local runner's `--direct_running_mode multi_processing`: Beam's SDK worker, saying as
much as the command that started it, whose stderr it shares. Beam's own worker logged every start, stop and
failure at INFO there, and printed each failed bundle's traceback, whatever -q or the default asked for; the run's
`error:` line names the failure, and -v shows all of it. It ends when that command is gone.

    python -m raee_ops.pipelines.local_worker VERBOSITY COMMAND_PID
"""

from __future__ import annotations

import os
import sys
import threading
import time

from raee_ops import logs

#: How often a worker checks that the command that started it still runs.
WATCH_EVERY_S = 1.0


def main(argv: list[str]) -> None:
    verbosity, command = int(argv[1]), int(argv[2])
    logs.configure(verbosity)  # before Beam's import, which logs its own warnings
    from apache_beam.runners.worker import sdk_worker_main

    threading.Thread(target=_end_without, args=(command,), name="raee-watch-command", daemon=True).start()

    with logs.library_prints_hidden():
        sdk_worker_main.main(argv)


def _end_without(command: int) -> None:
    """End this process once the command is gone: a command killed outright (SIGKILL, where nothing of its own
    runs) left its workers computing their bundles for minutes, for nobody, beside the scheduler's retry."""
    from raee_ops.storage import alive  # after Beam's import (main): it imports Beam

    while alive(command):
        time.sleep(WATCH_EVERY_S)
    os._exit(1)


if __name__ == "__main__":
    main(sys.argv)
