"""A test hook that makes a run kill itself at a named point, so tests can prove a kill at any moment loses nothing.

`RAEE_FAULT=<point>` (or `<point>@N`: at the N-th time the point is reached in this process) sends SIGKILL to
the process when it gets there: no cleanup, no `finally`, exactly what a scheduler's kill or an OOM does. Points:

- `batch:classify`, `batch:build-db`, `batch:evaluate`: after a worker finished a batch (use @N to die mid-run)
- `publish:predictions-*.parquet`: classify has published its predictions but not its errors or `_SUCCESS`
- `publish:_errors-*.parquet`: both are published, `_SUCCESS` is not
- `publish:_SUCCESS`: `_SUCCESS` is written, the list of what was being published not yet removed
- `leftovers`: a run removed one file of what an unfinished run left (use @N to die midway)
- `view`: build-db's first job of two (a large new table) has staged its sample, whose rows chose the probes' view;
  the other rows not run yet
- `fit`: build-db is about to fit its probes and policies, its job's rows staged (its claims held, nothing written)
- `commit:errors`: build-db has staged its errors and fitted, not committed the table
- `commit:table`: build-db has committed the table but not yet its index or published its errors
- `export:segment`: export-onnx wrote a segment (use @N to die mid-export)
- `export:move`: the export is complete in its temporary folder, not yet moved into place
- `export:aside`: the new export has swapped places with the previous one, which is not yet removed (where the
  filesystem cannot swap two folders: the previous export is moved aside, the new one not yet in its place)
- `export:publish`: on an object store, the new export's files are copied over the old one's, its manifest not yet
- `rollback:restored`: rollback has restored the version, not yet put the table's errors folder in step with it
- `prune:cut`: prune has removed the table's old versions (@2: and its companion's), not yet what it reports
- `worker:start`: a worker process of the local runner (multi_processing) starts, not yet connected to its job
- `load:classify`, `load:build-db`, `load:evaluate`: a worker is loading the model (with RAEE_FAULT_MODE=raise: a
  failed job)

`RAEE_FAULT_MODE=raise` raises `InjectedFault` there instead of killing: a worker's failure, not a kill;
`RAEE_FAULT_MODE=interrupt` sends SIGINT: a Ctrl-C; `RAEE_FAULT_MODE=terminate` sends SIGTERM: a scheduler's stop;
`RAEE_FAULT_MODE=swallowed-interrupt` (`swallowed-terminate`) sends SIGINT (SIGTERM) where Python cannot raise what
its handler raises and goes on (in the main thread, where handlers run; LanceDB's client, opening a table, once met
a Ctrl-C so).
Unset (always, outside tests), `fault_point` is one dictionary look-up.
"""

from __future__ import annotations

import os
import signal
import time

ENV, MODE_ENV = "RAEE_FAULT", "RAEE_FAULT_MODE"
_seen: dict[str, int] = {}


class InjectedFault(RuntimeError):
    """Raised at a fault point under RAEE_FAULT_MODE=raise."""


class _Swallows:
    """Sends `signum` as it is collected: what its handler raises lands in __del__, where Python prints it as
    "Exception ignored" and goes on, as code a library runs where it cannot raise does."""

    def __init__(self, signum: int) -> None:
        self.signum = signum

    def __del__(self) -> None:
        os.kill(os.getpid(), self.signum)
        time.sleep(1)  # the handler runs in the main thread between two bytecodes: here, at once


def fault_point(name: str) -> None:
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    point, _, nth = wanted.partition("@")
    if point != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] >= int(nth or 1):
        mode = os.environ.get(MODE_ENV)
        if mode == "raise":
            raise InjectedFault(f"injected fault at {name}")
        signals = {"interrupt": signal.SIGINT, "terminate": signal.SIGTERM}
        if mode in ("swallowed-interrupt", "swallowed-terminate"):
            _Swallows(signals[mode.removeprefix("swallowed-")])  # collected at once: its __del__ meets the signal
            return
        os.kill(os.getpid(), signals.get(mode or "", signal.SIGKILL))
