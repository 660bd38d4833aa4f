"""A worker process of the local runner's `--direct_running_mode multi_processing`: Beam's SDK worker, saying as
much as the command that started it, whose stderr it shares. Beam's own worker logged every start, stop and
failure at INFO there, and printed each failed bundle's traceback, whatever -q or the default asked for; the run's
`error:` line names the failure, and -v shows all of it.

    python -m raee_ops.pipelines.local_worker VERBOSITY
"""

from __future__ import annotations

import sys

from raee_ops import logs


def main(argv: list[str]) -> None:
    verbosity = int(argv[1])
    logs.configure(verbosity)  # before Beam's import, which logs its own warnings
    from apache_beam.runners.worker import sdk_worker_main

    with logs.library_prints_hidden():
        sdk_worker_main.main(argv)


if __name__ == "__main__":
    main(sys.argv)
