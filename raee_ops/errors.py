"""Errors that end a run with one clear `error:` line and a documented exit code (bad configuration, failed
pipelines, unbalanced counts — never bad rows, which go to the errors output).

Exit codes: 0 complete and balanced; 1 the pipeline failed; 2 usage or configuration (nothing was changed);
3 rows in != rows out + rows rejected (nothing was published); 4 outputs are complete but more rows were
rejected than --max-rejected allows; 75 retry later (another run holds the output or table, or the object store
did not answer); 130 interrupted.
"""

import re

#: botocore's message for a call the store answered with a server error (its status, or S3's code for one) past its
#: retries: an outage a retry mends (exit 75), wherever it surfaces (a worker's upload, the driver's delete).
STORE_FAILED = re.compile(r"An error occurred \((5\d\d|InternalError|ServiceUnavailable|SlowDown)\) when calling")
#: What a run's own work can exhaust, as every error it surfaces in says it (Python's OSError, LanceDB's RuntimeError
#: or panic "... (os error 28)", a worker's failure line), and what mends it: neither a bug nor configuration (exit 1).
EXHAUSTED = {
    "No space left on device": "free space there",
    "Disk quota exceeded": "free space there",
    "Too many open files": "raise the open-file limit (ulimit -n)",
} | dict.fromkeys(
    # Python's, numpy's ("MemoryError: Unable to allocate ..."), ONNX Runtime's C++ allocator's, the system's
    # (ENOMEM), the loader's mapping a library (an ImportError)
    ("MemoryError", "bad_alloc", "Cannot allocate memory", "failed to map segment from shared object"),
    "give the command and its workers more memory",
)


def exhausted(text: str) -> tuple[str, str] | None:
    """The resource `text` says ran out, and its remedy."""
    return next(((said, mend) for said, mend in EXHAUSTED.items() if said in text), None)


class RaeeError(Exception):
    """Base: every raee-ops error carries the exit code the CLI ends with."""

    exit_code = 1


class RaeeConfigError(RaeeError):
    """A run-level problem: missing files, checksum or fingerprint mismatch, wrong columns, bad options."""

    exit_code = 2


class ArtifactError(RaeeConfigError):
    """Exported artifacts are missing, incomplete or do not match their manifest."""


class RaeeRunError(RaeeError):
    """Work failed inside a pipeline worker or the job failed (its traceback is in the log with -v)."""

    exit_code = 1


class CountMismatch(RaeeError):
    """Rows in != rows out + rows rejected after the pipeline: nothing is published or committed."""

    exit_code = 3


class TooManyRejected(RaeeError):
    """Outputs are complete and balanced, but the rejected share is over --max-rejected."""

    exit_code = 4

    @classmethod
    def check(cls, rejected: int, rows_in: int, max_rejected: float, outcome: str) -> None:
        """Refuse a run whose rejected share is over `max_rejected`; `outcome` says what became of its outputs."""
        share = rejected / rows_in if rows_in else 0.0
        if share > max_rejected:
            raise cls(
                f"{rejected} of {rows_in} rows rejected (a share of {share:.3g}), over --max-rejected "
                f"{max_rejected:g}: {outcome}"
            )


class RetryLater(RaeeError):
    """Nothing was changed and the same command may well succeed later: a scheduler's retry is the remedy."""

    exit_code = 75


class Busy(RetryLater):
    """Another run is writing the same output folder or table."""


class VersionRemoved(RetryLater):
    """The table version a run reads was removed meanwhile (a prune): nothing is damaged, and a rerun reads the
    version that is current then. From a worker too, it ends the run with this exit code (pipelines.options)."""


class CommitConflict(RetryLater):
    """A writer outside raee-ops's claims (or a run that took the table over once this run stalled past its claim)
    committed to the table between this run's read and its commit: the version this run meant to write was not
    made, and a rerun writes it (retrieval.committing)."""


class Overtaken(RetryLater):
    """Another run committed to the table between the version this run read under its claim and this run's own
    commit: this run's claim had lapsed (stalled past its life), or a writer outside the claims committed. The other
    version is made current again and this run's is not kept (retrieval.keep_theirs); a rerun builds on it."""


class StoreUnavailable(RetryLater):
    """The object store did not answer (no connection, a timeout, a server error): before any work, or under a
    worker reading the table."""


class ArtifactsChanged(RetryLater):
    """An export replaced the artifacts while the run loaded them (a republish, a blue/green link switched): neither
    export is wrong, and a rerun reads the one in place by then (and refuses it where the table was built from
    another)."""


class InputChanged(RetryLater):
    """An input file's bytes are not those the run began with (replaced or rewritten while it ran, by another run
    or a fetch): rows read from it would be published as the job's. A rerun, once it stays put, is the new
    content's job."""


class Interrupted(RaeeError):
    """Ctrl-C (SIGINT) during a command: left as a kill leaves things."""

    exit_code = 130


class NotShared(RaeeConfigError):
    """A worker that runs elsewhere than the command (another machine, a container) cannot see a local location the
    command saw: configuration (exit 2), where a location gone mid-run would be a retry's (ArtifactsChanged,
    InputChanged): retried, it fails the same way every time. From a worker too (pipelines.options)."""


class MissingDependency(RaeeConfigError, ImportError):
    """An optional package the command needs is not installed; the message names the extra that installs it."""


def one_line(text: str) -> str:
    """A message of several lines (a library's) joined into one: an `error:` line, an errors output's reason."""
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def first_line(exc: BaseException | str) -> str:
    """A library's message (an exception's, or its text already cleaned) cut to its first non-empty line, at most 300
    characters: every `error:` the CLI prints is one line, and what follows the first line of a library's message is
    detail (a traceback, a debug dump)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else "" if isinstance(exc, str) else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def not_utf8(value: str) -> str | None:
    """A value holding bytes that are not UTF-8 (a file name's, which Python holds as surrogates), spelt printable
    (those bytes as \\xNN); None for one that is UTF-8. Beam cannot encode such a value to pass it on."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return None
