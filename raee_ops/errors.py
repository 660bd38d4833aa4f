"""Errors that end a run with one clear line and a non-zero exit (bad configuration, not bad rows)."""


class RaeeConfigError(Exception):
    """A run-level problem: missing files, checksum or fingerprint mismatch, wrong columns, bad options."""


class ArtifactError(RaeeConfigError):
    """Exported artifacts are missing, incomplete or do not match their manifest."""


class RaeeRunError(Exception):
    """Work failed inside a pipeline worker (its traceback is in Beam's log); the run ends with exit code 1."""


class MissingDependency(RaeeConfigError, ImportError):
    """An optional package the command needs is not installed; the message names the extra that installs it."""
