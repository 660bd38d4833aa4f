"""classify: Parquet rows -> retrieve neighbours' exit information -> run each row to its exit layer.

The run claims its output folder (a second live run on it is refused), stages predictions and errors in a
run-private `_temporary/<run id>/`, checks rows in = predicted + rejected there, then publishes both and writes
`_SUCCESS` last (see raee_ops/commit.py). A folder with `_SUCCESS` is complete: refused as an output, unless its
marker names this very job (settings and input files), which is then done already (a scheduler's retry of a run
killed after it finished); one without it is an unfinished run's, and the next run removes what it left.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.metrics.metric import MetricsFilter
from raee_ops.pipelines.inference import Infer
from raee_ops.pipelines.options import check_job_service, make_pipeline, run_pipeline
from raee_ops.pipelines.sources import first_shard, read_validated, write_tables
from raee_ops.schemas.manifest import check_outside_artifacts, load_manifest
from raee_ops.schemas.tables import ERRORS_SCHEMA, PREDICTION_FIELDS

from raee_ops import storage
from raee_ops.batches import Classify
from raee_ops.commit import SUCCESS, claim_output, completed, job_of, unseen_staging
from raee_ops.errors import CountMismatch, RaeeConfigError, TooManyRejected
from raee_ops.exit_policy import DEFAULT_K, check_k, refuse_head, refuse_unanswerable, resolve, unfitted
from raee_ops.inputs import check_inputs, count_rows, input_files, reading, refuse_reading_own_output
from raee_ops.probe_policy import refuse_cost_options
from raee_ops.progress import NAMESPACE, counter_layer
from raee_ops.readout import describe
from raee_ops.report import WRITING, check_outside_outputs
from raee_ops.retrieval import (
    check_table_contents,
    checked_table,
    neighbours_asked,
    other_metric,
    table_context,
)
from raee_ops.rows import output_columns
from raee_ops.runtime import CUDA_SUB_BATCH
from raee_ops.settings import worker_settings
from raee_ops.tasks import task_of

log = logging.getLogger(__name__)
#: The prefixes of what a run publishes in its --output folder, besides `_SUCCESS`. The errors' is `_`-prefixed, so
#: that a reader of the whole folder (pyarrow, pandas, Spark skip `_` and `.` names) gets the predictions: with
#: `errors-*` it got the errors' schema, and every prediction column missing, without a word.
PREDICTIONS, ERRORS = "predictions", "_errors"
OUTPUTS = (f"{PREDICTIONS}-*.parquet", f"{ERRORS}-*.parquet")
#: Names of the files a run writes there (shards numbered as Beam numbers them), which no --input may match.
OUTPUT_NAMES = (SUCCESS, first_shard(PREDICTIONS), first_shard(ERRORS))
#: What a folder to write must not hold, unless an unfinished classify left it there: anything a reader of the
#: whole folder takes (every name not `_`- or `.`-prefixed, files and sub-folders: the user's own Parquet files mixed
#: with the predictions, and the first one's schema taken for all) and an evaluate's mark of its report.
OTHERS = ("[!_.]*", WRITING)


@dataclass(frozen=True)
class ClassifySummary:
    strategy: str
    settings: str
    num_layers: int
    rows_in: int
    predicted: int
    rejected: int
    exit_counts: dict[int, int]
    output_dir: str
    beam_exit_counts: dict[int, int] | None = field(default=None)
    table_version: int | None = None
    key_depth: int = 0  # a layer-N table's N: rows that retrieve ran those layers for their key
    done: bool = False  # the output folder held this very job's complete output: nothing was run

    @property
    def mean_exit(self) -> float:
        total = sum(self.exit_counts.values())
        return sum(layer * n for layer, n in self.exit_counts.items()) / total if total else float("nan")

    def render(self) -> str:
        balance = "ok" if self.rows_in == self.predicted + self.rejected else "MISMATCH"
        exits = " ".join(f"{layer}:{n}" for layer, n in sorted(self.exit_counts.items())) or "-"
        if self.beam_exit_counts is None:
            counters = "not reported by this runner"
        else:
            counters = "agree" if self.beam_exit_counts == self.exit_counts else f"DIFFER {self.beam_exit_counts}"
        done = ["already done: the output holds this job's complete output (same settings and inputs)"]
        return "\n".join(
            [
                *(done if self.done else []),
                f"classify with {self.strategy} ({self.settings}; {self.num_layers} layers)",
                f"rows in: {self.rows_in}  predicted: {self.predicted}  rejected: {self.rejected}  "
                f"(in = predicted + rejected: {balance})",
                f"mean exit layer: {self._mean_exit_text()} of {self.num_layers}",
                f"exits per layer (0: answered {self._zero_cost()}): {exits}",
                *([] if self.done else [f"beam exit counters: {counters}"]),  # no pipeline ran to count them
                f"table version read: {self.table_version}",
                f"outputs: {self.output_dir}",
            ]
        )

    def _mean_exit_text(self) -> str:
        return "- (no row predicted)" if math.isnan(self.mean_exit) else f"{self.mean_exit:.2f}"

    def _zero_cost(self) -> str:
        plural = "s" if self.key_depth > 1 else ""
        return f"after the key's {self.key_depth} layer{plural}" if self.key_depth else "without running a layer"

    def check(self, max_rejected: float) -> None:
        """Refuse a published run whose rejected share is over `max_rejected` (exit code 4)."""
        where = f"outputs are complete in {self.output_dir}, see its {ERRORS}-*.parquet"
        TooManyRejected.check(self.rejected, self.rows_in, max_rejected, where)


def exit_counts_from_files(files: list[str]) -> dict[int, int]:
    if not files:
        return {}
    exits = pa.concat_arrays(
        [storage.read_parquet(f, columns=["exit_layer"]).column(0).combine_chunks() for f in files]
    )
    counts = pc.value_counts(exits)
    return {int(v["values"]): int(v["counts"]) for v in counts.to_pylist()}


def beam_exit_counts(result) -> dict[int, int] | None:
    try:
        counters = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]
    except (NotImplementedError, KeyError, AttributeError):
        return None
    exits = {}
    for c in counters:
        layer = counter_layer(c.key.metric.name)
        if layer is not None:
            exits[layer] = exits.get(layer, 0) + int(c.committed if c.committed is not None else c.attempted)
    return exits if counters else None  # a runner that reports no counters at all cannot be compared


def run_classify(
    artifacts,
    task_name: str,
    db_uri: str,
    table: str,
    inputs: list[str],
    output_dir: str,
    k: int,
    strategy: str | None,
    beam_args: list[str] | tuple[str, ...] = (),
    layer_budget: float | None = None,
    layer_price: float | None = None,
) -> ClassifySummary:
    """`layer_budget`, `layer_price`: the probe strategies' settings the table keeps for that share of the layers
    and that price, not its own."""
    settings = worker_settings(beam_args, db_uri)
    storage.check_scheme(output_dir, "--output")
    storage.check_outside(output_dir, "--output", db_uri)
    check_outside_artifacts(output_dir, "--output")
    check_outside_outputs(output_dir, "--output")
    manifest = load_manifest(artifacts)
    task = task_of(manifest, task_name)
    chosen = resolve(strategy, manifest.num_layers)
    refuse_head([chosen], manifest.label_word_head)
    strategy = chosen.name
    check_k(k)
    opened, expected = checked_table(db_uri, table, manifest, task_name, str(artifacts), settings.db_storage_options)
    version, table_schema, embedder = opened.version, opened.schema, expected.embedder
    reads_rows = chosen.needs_retrieval or chosen.needs_probes() or chosen.needs_policy
    table_rows = check_table_contents(
        opened, expected, chosen.needs_probes(), f"table {table!r} in {db_uri}", reads_rows
    )
    refuse_cost_options([strategy], chosen.needs_probe_policy, layer_budget, layer_price)
    ctx = table_context(table_schema, manifest.num_layers, len(task.label_names), k, layer_budget, layer_price)
    if chosen.needs_policy and ctx.policy is None:
        raise unfitted("fitted policy", f"table {table!r}", strategy)
    refuse_unanswerable([chosen], ctx.probes, f"table {table!r} in {db_uri}")
    note = other_metric(ctx, task.metric_name, f"table {table!r} in {db_uri}")
    if note and (chosen.needs_policy or chosen.needs_probe_policy):  # only then does the run read the policies
        log.warning(note)
    if settings.provider == "cuda" and chosen.exits_per_row(ctx):
        log.warning(
            "strategy %s exits row by row, which saves a GPU little: a call of %d rows costs about as much as its "
            "deepest row's, and on an H200 the default ran about as fast as the full model; for speed on GPUs run a "
            "fixed depth (--strategy probe-best) (README: Runners, Dataflow and GPUs)",
            strategy,
            CUDA_SUB_BATCH,
        )
    described = describe(chosen, ctx.policy, ctx.probe_policy, ctx.probes, neighbours_asked(k, table_rows))
    found = input_files(inputs)
    refuse_reading_own_output(found, inputs, output_dir, OUTPUT_NAMES, "--output")
    files = [m.path for m in found]
    identity = {"fingerprint": manifest.fingerprint, "task": task_name, "db": storage.resolved(db_uri), "table": table}
    job = job_of(
        identity | {"k": k, "strategy": strategy, "layer_budget": layer_budget, "layer_price": layer_price}, found
    )

    def already_done(done: dict[str, Any]) -> ClassifySummary:
        return ClassifySummary(
            strategy,
            # as the table version it read had them: an append since may have refitted the table's
            done.get("described") or f"the settings of table version {done['table_version']}, not recorded",
            manifest.num_layers,
            done["rows_in"],
            done["predicted"],
            done["rejected"],
            {int(layer): n for layer, n in done["exit_counts"].items()},
            output_dir,
            table_version=done["table_version"],
            key_depth=ctx.key_depth,
            done=True,
        )

    done = completed(output_dir, job)
    if done is not None:
        return already_done(done)
    with reading(job.contents):  # a refusal of a file replaced since its digest is the change's
        schema, rows_in = check_inputs(files, task, need_label=False)
    clash = [f.name for f in PREDICTION_FIELDS if f.name in schema.names]
    if clash:
        every = " (as every input has)" if len(files) > 1 else ""  # inputs share their columns (check_inputs)
        raise RaeeConfigError(
            f"{files[0]}: has column(s) {', '.join(clash)}{every}, which classify adds: rename or drop them"
        )

    output_schema = pa.schema(list(output_columns(schema, task)) + PREDICTION_FIELDS)
    answering = Classify(
        str(artifacts),
        task,
        embedder,
        db_uri,
        table,
        k,
        strategy,
        output_schema,
        version,
        layer_budget,
        layer_price,
        storage_options=settings.db_storage_options,
        checked=manifest,
        **settings.runtime(),
    )
    check_job_service(beam_args)  # the last check, the only one over the network: then the run makes its folders
    with claim_output(output_dir, OUTPUTS, "--output", job, refused=OTHERS) as claim:
        if claim.done is not None:  # another run of this job finished while this one waited for the claim
            return already_done(claim.done)
        if k != DEFAULT_K and not chosen.reads_k():  # said once the run goes ahead; --k is part of the job as given
            log.warning("--k %d is not read by strategy %s (its settings below say what it reads)", k, strategy)
        pipeline = make_pipeline(
            beam_args,
            command="classify",
            artifacts=str(artifacts),
            task=task_name,
            db=db_uri,
            table=table,
            strategy=strategy,
        )
        valid, invalid = read_validated(pipeline, job.contents, task, need_label=False, schema=schema)
        rows, failed = valid | "Infer" >> Infer(answering)
        write_tables(rows, "WritePredictions", claim.staging_of(PREDICTIONS), output_schema)
        errors = (invalid, failed) | "Errors" >> beam.Flatten()
        write_tables(errors, "WriteErrors", claim.staging_of(ERRORS), ERRORS_SCHEMA)
        result = run_pipeline(pipeline, "classify")

        predicted, prediction_files = count_rows(claim.staging_of(OUTPUTS[0]))
        rejected, _ = count_rows(claim.staging_of(OUTPUTS[1]))
        summary = ClassifySummary(
            strategy,
            described,
            manifest.num_layers,
            rows_in,
            predicted,
            rejected,
            exit_counts_from_files(prediction_files),
            output_dir,
            beam_exit_counts(result),
            version,
            ctx.key_depth,
        )
        if rows_in != predicted + rejected or summary.beam_exit_counts not in (None, summary.exit_counts):
            raise CountMismatch(
                f"rows in {rows_in} != predicted {predicted} + rejected {rejected} (or Beam's exit counters "
                f"{summary.beam_exit_counts} differ): nothing published to {output_dir}"
                + unseen_staging(rows_in, predicted + rejected, "--output")
            )
        claim.publish(
            {
                "command": "classify",
                "job": job.digest,
                "settings": job.settings,
                "inputs": job.inputs,
                "rows_in": rows_in,
                "predicted": predicted,
                "rejected": rejected,
                "exit_counts": summary.exit_counts,
                "table_version": version,
                "described": described,
            }
        )
    return summary
