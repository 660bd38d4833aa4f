"""How much a command says: third-party noise (Beam's "apitools not found", Lance's Rust warnings) is hidden
unless asked for with -v, so an error is one `error:` line and a summary is the first thing a command prints.

Call `configure` before Beam or LanceDB are imported: Lance reads its log level from the environment once.
"""

from __future__ import annotations

import logging
import os
import sys

#: Our own packages (all under raee_ops): their warnings show by default; everything else only from -v on.
OWN = ("raee_ops",)

_verbosity = 0


def configure(verbosity: int) -> None:
    """-1 quiet (errors only), 0 default (our warnings), 1 info from everyone (-v), 2 debug (-vv)."""
    global _verbosity
    _verbosity = verbosity
    # Beam logs a failed worker's whole traceback at ERROR: by default the run's one `error:` line says it all
    third_party = {-1: logging.CRITICAL, 0: logging.CRITICAL, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    own = logging.ERROR if verbosity < 0 else min(third_party, logging.WARNING)
    os.environ.setdefault("LANCEDB_LOG", {-1: "error", 0: "error", 1: "info"}.get(verbosity, "debug"))
    if verbosity < 0 or (verbosity == 0 and not sys.stderr.isatty()):  # transformers' tqdm bars, in logs
        os.environ.setdefault("TQDM_DISABLE", "1")
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger().setLevel(third_party)
    for name in OWN:
        logging.getLogger(name).setLevel(own)


def quiet() -> bool:
    """-q: print nothing but errors (the exit code tells the outcome)."""
    return _verbosity < 0


def verbose() -> bool:
    return _verbosity > 0
