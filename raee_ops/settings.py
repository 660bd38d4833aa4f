"""A run's own settings, given as pipeline options (so a runner's job page and templates see them) and resolved on
the launching machine: the workers' ONNX Runtime provider and threads, LanceDB's storage options for an object-store
database, how long the driver waits on a store that does not answer. Every command reads them here, pipelines and
the commands that run none (evaluate, info, rollback, prune) alike.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, S3Options, StandardOptions

from raee_ops import storage
from raee_ops.errors import RaeeConfigError

PROVIDERS = ("cpu", "cuda")
#: Beam's local runners (DirectRunner and what it runs), whose workers all run on the launching machine, as
#: `is_local_runner` reads their names.
LOCAL_RUNNERS = ("direct", "switchingdirect", "fnapi")
#: The same by module path, as `--runner` may also name them (exactly: Beam imports the path).
LOCAL_RUNNER_PATHS = (
    "apache_beam.runners.direct.direct_runner.DirectRunner",
    "apache_beam.runners.direct.direct_runner.SwitchingDirectRunner",
    "apache_beam.runners.portability.fn_api_runner.FnApiRunner",
)
#: Most ONNX Runtime threads per worker process: far above any machine's cores per process, far below what stalls.
MAX_THREADS = 1024
#: Seconds the driver waits on an object store that answers none of its calls before it ends the run (exit 75).
STORE_PATIENCE_S = 300.0


class RaeeOptions(PipelineOptions):
    """The project's own settings as pipeline options, so a runner (Dataflow's job page, templates) sees them."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--raee_command", default=None, help="raee-ops command that built this pipeline.")
        parser.add_argument("--raee_artifacts", default=None, help="Exported artifacts.")
        parser.add_argument("--raee_task", default=None, help="Task name.")
        parser.add_argument("--raee_db", default=None, help="LanceDB URI.")
        parser.add_argument("--raee_table", default=None, help="Exit-metadata table.")
        parser.add_argument("--raee_strategy", default=None, help="Exit strategy (classify).")
        parser.add_argument(
            "--raee_provider",
            default=None,
            choices=PROVIDERS,
            help="ONNX Runtime provider on workers (default: RAEE_PROVIDER on the launching machine, else cpu).",
        )
        parser.add_argument(
            "--raee_intra_op_threads",
            type=int,
            default=None,
            help="Threads of ONNX Runtime's one intra-op pool per worker process, shared by all its sessions "
            "(default: RAEE_INTRA_OP_THREADS on the launching machine, else the worker's cores, up to 8).",
        )
        parser.add_argument(
            "--raee_db_storage_option",
            action="append",
            default=None,
            metavar="KEY=VALUE",
            help="LanceDB storage option for an object-store --db (repeatable), e.g. aws_region=eu-west-1; "
            "for s3:// the --s3_* options give the defaults.",
        )
        parser.add_argument(
            "--raee_store_patience",
            type=float,
            default=None,
            metavar="SECONDS",
            help=f"End the command with exit 75 once the object store has not answered the driver's calls for this "
            f"long (default {STORE_PATIENCE_S:g}).",
        )


@dataclass(frozen=True)
class WorkerSettings:
    """What workers need besides the data, resolved on the launching machine and carried by the batch work (so a
    worker never depends on its own environment): ONNX Runtime provider and threads, LanceDB storage options."""

    provider: str | None = None
    threads: int | None = None
    db_storage_options: dict[str, str] = field(default_factory=dict)
    filesystem: dict[str, Any] = field(default_factory=dict)  # the run's options, for the workers' filesystems

    def runtime(self) -> dict[str, Any]:
        """Keyword arguments of the batch work (batches.BatchWork)."""
        return {"threads": self.threads, "providers": self.provider, "filesystem": self.filesystem}


def _s3_storage_options(options: PipelineOptions) -> dict[str, str]:
    """LanceDB's names for the S3 settings Beam's S3 filesystem was given, so one set of --s3_* options serves
    the files and the database."""
    s3 = options.view_as(S3Options)
    pairs = {
        "aws_endpoint": s3.s3_endpoint_url,
        "aws_access_key_id": s3.s3_access_key_id,
        "aws_secret_access_key": s3.s3_secret_access_key,
        "aws_session_token": s3.s3_session_token,
        "aws_region": s3.s3_region_name,
    }
    found = {key: value for key, value in pairs.items() if value}
    if (s3.s3_endpoint_url or "").startswith("http://"):
        found["allow_http"] = "true"
    return found


def _read_as_url(db_uri: str) -> str | None:
    """What in an object-store location LanceDB reads as a URL's, not as the key's: it decodes %-escapes, drops what
    follows '#' or '?' and strips spaces at the ends (a build-db given db#x wrote its table under db and exited 0;
    a rollback given db?x=1 took no claim of the table's)."""
    if db_uri != db_uri.strip():
        return "spaces at its ends (LanceDB strips them)"
    found = [c for c in "%#?" if c in db_uri]
    if found:
        return f"{found[0]!r} (LanceDB reads it as part of a URL: %-escapes decoded, what follows # or ? dropped)"
    return None


def worker_settings(beam_args: Sequence[str], db_uri: str | None = None) -> WorkerSettings:
    """Configure this process's filesystems for the run and resolve the settings workers get; an object-store
    database must answer (LanceDB would retry it without a word)."""
    options = storage.configure(beam_args)
    if db_uri:
        storage.check_scheme(db_uri, "--db")
        problem = None if storage.is_local(db_uri) else _read_as_url(db_uri)
        if problem:  # Beam's filesystems take the key as written: the table in one place, its claim in another
            raise RaeeConfigError(f"--db {db_uri!r}: write the location without {problem}")
    raee = options.view_as(RaeeOptions)
    explicit = {}
    for pair in raee.raee_db_storage_option or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise RaeeConfigError(f"--raee_db_storage_option {pair!r}: expected KEY=VALUE")
        explicit[key] = value
    derived = _s3_storage_options(options) if db_uri and storage.scheme(db_uri) == "s3" else {}
    threads = _threads(raee.raee_intra_op_threads) or _local_process_share(options)
    provider = raee.raee_provider or _environ("RAEE_PROVIDER")
    if provider not in (None, *PROVIDERS):
        raise RaeeConfigError(_env_problem("RAEE_PROVIDER", " or ".join(PROVIDERS)))
    return WorkerSettings(provider, threads, derived | explicit, storage.carry(options))


def store_patience(beam_args: Sequence[str]) -> float:
    """--raee_store_patience: how long the driver waits on an object store that does not answer (s3_clients.watch)."""
    given = PipelineOptions(list(beam_args)).view_as(RaeeOptions).raee_store_patience
    if given is None:
        return STORE_PATIENCE_S
    if not 0 < given < 10**7:  # nan fails both
        raise RaeeConfigError(
            f"--raee_store_patience must be a number of seconds above 0 and below 10000000, got {given}"
        )
    return given


def _threads(option: int | None) -> int | None:
    """--raee_intra_op_threads, else RAEE_INTRA_OP_THREADS, from 1 to MAX_THREADS: checked here, as one line
    naming where it came from, since workers fail on a count past C's int and stall on thousands of threads."""
    if option is None:
        raw = _environ("RAEE_INTRA_OP_THREADS")
        if raw is None:
            return None
        if not (raw.isascii() and raw.isdigit() and 1 <= int(raw) <= MAX_THREADS):
            raise RaeeConfigError(_env_problem("RAEE_INTRA_OP_THREADS", f"a whole number from 1 to {MAX_THREADS}"))
        return int(raw)
    if not 1 <= option <= MAX_THREADS:
        raise RaeeConfigError(f"--raee_intra_op_threads must be from 1 to {MAX_THREADS}, got {option}")
    return option


def is_local_runner(name: str | None) -> bool:
    """Whether `--runner name` is one of Beam's local runners, read as Beam reads it (any case, `Runner` optional,
    or Beam's own module path: `directrunner` and `apache_beam.runners.direct.direct_runner.DirectRunner` were taken
    for remote ones, and their workers each sized their pool to every core)."""
    return name is None or name in LOCAL_RUNNER_PATHS or name.lower().removesuffix("runner") in LOCAL_RUNNERS


def _local_process_share(options: PipelineOptions) -> int | None:
    """ONNX Runtime threads for each of the local runner's worker processes (multi_processing): this machine's cores
    (as a worker sizes its pool by default) shared among them, not every core each, which oversubscribes them
    (bench/workers.py times both, and one process). Elsewhere a worker's own cores are its default."""
    direct = options.view_as(DirectOptions)
    if not is_local_runner(options.view_as(StandardOptions).runner) or direct.direct_running_mode != "multi_processing":
        return None
    from raee_ops.runtime import default_threads

    return default_threads(direct.direct_num_workers)


def _environ(name: str) -> str | None:
    """A setting's default from the launching machine's environment (set but empty: unset)."""
    return os.environ.get(name, "").strip() or None


def _env_problem(name: str, expected: str) -> str:
    return f"{name}={os.environ[name]!r} in the environment: expected {expected} (or unset it)"
