"""build-db: labelled Parquet -> exit information for every row -> one LanceDB commit.

The run claims the table's work folder (`<db>/_raee-work/<table>/`; a second live run on the same table is refused).
Workers write each row's per-layer results (layer rows) as Parquet shards into this run's staging folder there, and
rejected rows into its staging in the errors folder (raee_ops/run_record.py). The driver checks conservation (rows
in = written + rejected) and its refusals (no rows to overwrite with, too many rejected), turns the layer rows into
exit rows (raee_ops/reference.py: probes fitted, policies chosen), commits the table in one LanceDB version
(raee_ops/exit_table.py: the table's refusals, append base and commit) and then publishes the errors, so a failed or
killed run leaves the table as it was. The next run removes a killed run's staging and settles its errors folder,
whichever --errors it is given itself. A large new table runs two jobs under the one claim (two_pass_share): a
sample in every input form, whose rows choose the probes' view, then the other rows in that view's form only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystem import FileMetadata
from raee_ops.pipelines.inference import Infer
from raee_ops.pipelines.options import check_job_service, make_pipeline, run_pipeline
from raee_ops.pipelines.sources import first_shard, read_validated, write_tables
from raee_ops.schemas.manifest import check_outside_artifacts, load_manifest
from raee_ops.schemas.tables import (
    ERRORS_SCHEMA,
    LABEL,
    TableMeta,
    table_name_problem,
)

from raee_ops import storage
from raee_ops.batches import LayerRows
from raee_ops.calibration import FusedPolicy, fit_line
from raee_ops.commit import (
    SUCCESS,
    check_held,
    claim_work_dir,
    job_of,
    new_run_id,
    released_on_sigterm,
    some,
    unseen_staging,
)
from raee_ops.errors import CountMismatch, RaeeConfigError, RaeeError, TooManyRejected
from raee_ops.exit_table import (
    claimed_append_base,
    commit,
    current_version,
    group_map,
    previous_rows,
    refuse_duplicate_ids,
    refuse_one_row,
    refuse_overwrite_with_nothing,
    refuse_replacing_foreign,
    remove_unfinished,
)
from raee_ops.faults import fault_point
from raee_ops.inputs import (
    check_inputs,
    concat_strings,
    count_rows,
    file_keys,
    input_files,
    reading,
    refuse_reading_own_output,
)
from raee_ops.key_names import BACKBONE, DEFAULT_KEY, LAYER_PREFIX, key_available, layer_depth
from raee_ops.probes import CV_ROWS, FOLDS, in_fit_sample, load_solver
from raee_ops.progress import phase
from raee_ops.reference import assemble, sample_view
from raee_ops.report import check_outside_outputs, is_evaluate_report
from raee_ops.retrieval import (
    check_meta,
    check_writable,
    expected_meta,
    index_partitions,
    kept_costs,
    open_table,
)
from raee_ops.rows import ROW_ID
from raee_ops.run_record import (
    ERRORS_FOLDER,
    RunRecord,
    default_errors_dir,
    errors_owner,
    foreign_parquet,
    forget_errors,
    in_step,
    keep_uncommitted,
    note_errors,
    publish,
    scope,
    staging_dir,
    tidy,
    work_dir,
)
from raee_ops.settings import worker_settings
from raee_ops.tasks import Task, task_of
from raee_ops.versions import recorded_runs, settle_errors

log = logging.getLogger(__name__)

#: New tables of more input rows run in two jobs (two_pass_share); below, the second job's start-up (seconds here,
#: minutes on a remote runner) would outweigh the input-form pass it saves on most rows.
TWO_PASSES_ABOVE = 10_000


@dataclass(frozen=True)
class BuildSummary:
    table: str
    mode: str
    rows_in: int
    written: int
    rejected: int
    table_rows: int
    errors_dir: str
    policy: FusedPolicy | None = None
    search: str = "exact search"
    version: int | None = None
    probes: list[str] = field(default_factory=list)
    no_policy: str = "fewer than 2 rows"  # why there is no fused policy
    done: bool = False  # an append retried after its commit: nothing left to do
    passes: str | None = None  # how a large new table's two passes went (two_pass_share)

    def render(self) -> str:
        if self.done:
            return (
                f"build-db {self.table} ({self.mode}): already done: table version {self.version} holds the rows of "
                f"this same job (settings and input files, {self.rows_in} rows), committed by an earlier run of it; "
                "nothing written\n"
                f"errors: {self.errors_dir}"
            )
        balance = "ok" if self.rows_in == self.written + self.rejected else "MISMATCH"
        fitted = fit_line("fused policy", self.policy) if self.policy else f"fused policy: none ({self.no_policy})"
        return "\n".join(
            [
                f"build-db {self.table} ({self.mode})",
                f"rows in: {self.rows_in}  written: {self.written}  rejected: {self.rejected}  "
                f"(in = written + rejected: {balance})",
                f"table rows: {self.table_rows} ({self.search}); table version {self.version}",
                fitted,
                *self.probes,
                *filter(None, [self.passes]),
                f"errors: {self.errors_dir}",
            ]
        )


def run_build_db(
    artifacts: str,
    task_name: str,
    inputs: list[str],
    db_uri: str,
    table: str,
    embedder: str | None,
    mode: str,
    errors_dir: str | None,
    beam_args: list[str] | tuple[str, ...] = (),
    max_rejected: float = 1.0,
    allow_empty: bool = False,
    layer_budget: float | None = None,
    group_column: str | None = None,
    layer_price: float | None = None,
) -> BuildSummary:
    problem = table_name_problem(table)  # the task's name by default, which a task file may spell freely
    if problem:
        raise RaeeConfigError(problem)
    if group_column == LABEL:  # every fold left a label out: no probe answered right out of fold
        raise RaeeConfigError(
            f"--group-column {LABEL}: the labels themselves; name the column that says which rows are near copies "
            "(a source document, a sentence paraphrased)"
        )
    settings = worker_settings(beam_args, db_uri)
    store = settings.db_storage_options
    if errors_dir:
        _refuse_errors_location(errors_dir, db_uri, table)
    check_outside_artifacts(db_uri, "--db")  # the default --errors lies in the database
    storage.check_folder(db_uri, "--db")
    check_writable(db_uri, table)
    manifest = load_manifest(artifacts)
    task = task_of(manifest, task_name)
    before = open_table(db_uri, table, storage_options=store).schema if mode == "append" else None
    existing = TableMeta.decode(before) if before is not None else None
    if mode == "overwrite":
        refuse_replacing_foreign(db_uri, table, store)
    embedder = embedder or (existing.embedder if existing else DEFAULT_KEY)
    layer_budget, layer_price = kept_costs(before, layer_budget, layer_price)
    if not key_available(manifest, embedder):
        raise RaeeConfigError(
            f"--embedder {embedder}: the backbone in {artifacts} has {manifest.num_layers} layers"
            if layer_depth(embedder)
            else f"embedder {embedder!r} was not exported into {artifacts} (export-onnx --embedder {embedder}, or "
            f"build-db --embedder {' or '.join([*manifest.embedders, BACKBONE, f'{LAYER_PREFIX}N'])})"
        )
    found = input_files(inputs)
    files = [m.path for m in found]
    # the inputs' content first: the driver's checks (ids among them) read what the workers must then find
    settings_used = {"fingerprint": manifest.fingerprint, "task": task_name, "embedder": embedder, "mode": mode}
    job = job_of(
        settings_used | {"group_column": group_column, "layer_budget": layer_budget, "layer_price": layer_price}, found
    )
    with reading(job.contents):  # a refusal of what a file replaced since its digest holds is the change's
        schema_in, rows_in = check_inputs(files, task, need_label=True)
        if group_column and schema_in is not None and group_column not in schema_in.names:
            raise RaeeConfigError(
                f"--group-column {group_column!r}: no such column in {files[0]} (has: {', '.join(schema_in.names)})"
            )
        if rows_in == 0 and mode == "overwrite":
            refuse_overwrite_with_nothing(table, allow_empty)
        if mode == "overwrite":  # before any work: after it, the run has made its folders
            refuse_one_row(table, rows_in)
    meta = expected_meta(manifest, task_name, embedder)
    if mode == "append":  # before the claim: a table build-db did not write was refused under it, as 'replaced'
        check_meta(existing, meta, f"table {table!r} in {db_uri}")
    with reading(job.contents):
        keys = [file_keys(f, group_column, schema_in, job.contents[f]) for f in files]
        ids = concat_strings([file_ids for file_ids, _ in keys])
        refuse_duplicate_ids(ids)
        group_of = group_map(ids, [names for _, names in keys], mode) if group_column else None
    run_id, where, work = new_run_id(), scope(db_uri, table), work_dir(db_uri, table)
    own_folder = default_errors_dir(db_uri, table)
    errors_dir = errors_dir or own_folder
    own_errors = storage.resolved(errors_dir) == storage.resolved(own_folder)
    _check_errors_folder(errors_dir, own_folder, own_errors, [first_shard(f"errors-{run_id}")], found, inputs)
    check_job_service(beam_args)  # the last check, the only one over the network: then the run makes its folders
    load_solver()
    with claim_work_dir(work, f"table {table!r}", run_id) as staging:
        remove_unfinished(db_uri, table, store)
        read = current_version(db_uri, table, store)  # a commit's version follows it (exit_table.commit)
        settle_errors(db_uri, table, errors_dir, own_errors, store)
        with reading(job.contents):  # ids the table holds already: those of a file replaced since they were read?
            base = claimed_append_base(db_uri, table, meta, ids, job.digest, store) if mode == "append" else None
        if base and base.done:
            if base.done.rejected is not None:  # None: recorded before rejected rows were counted
                done = f"table {table!r} version {base.version} holds this job's rows, committed by an earlier run"
                # the earlier run of this job committed them: a retry must not pass a result its limit fails
                TooManyRejected.check(base.done.rejected, rows_in, max_rejected, done)
            return BuildSummary(table, mode, rows_in, 0, 0, 0, errors_dir, version=base.version, done=True)
        note_errors(work, errors_dir, own_errors)
        names = {"artifacts": str(artifacts), "task": task_name, "db": db_uri, "table": table}
        job_run = partial(_layer_job, beam_args, names, job.contents, task, schema_in)
        runtime = {"checked": manifest, **settings.runtime()}
        layer_rows = partial(LayerRows, str(artifacts), task, embedder, **runtime)
        one_pass = layer_rows(base.views if base else None)  # every input form the table's views read
        schema = one_pass.schema(manifest)
        view, sample_errors, passes = None, None, None
        share = two_pass_share(rows_in, one_pass.forms) if base is None else None
        if share is not None:  # a sample in every input form first: its rows choose the view the others run
            sample = storage.join(staging, "sample-rows")  # not rows-*: Beam's sink deletes rows-*-of-N before writing
            job_run(one_pass, schema, sample, storage.join(staging, "sample-errors"), sampled=(share, True))
            sample_errors = pa.concat_tables(
                [storage.read_parquet(f) for f in count_rows(storage.join(staging, "sample-errors*.parquet"))[1]]
                or [ERRORS_SCHEMA.empty_table()]
            )
            sampled, sample_shards = count_rows(f"{sample}*.parquet")
            with phase(f"build-db: choosing the probes' view on {sampled} sample rows"), released_on_sigterm():
                view = sample_view(sample_shards, meta, manifest.hidden_size, group_of)
            fault_point("view")
            passes = (
                f"two passes: the probes' view ({view}) chosen on a sample of {sampled} rows run in every input form, "
                "the other rows run in its form only"
                if view
                else f"two passes: the sample of {sampled} rows could not choose the probes' view (under {FOLDS} rows, "
                "one label or one group): the other rows run in every input form"
            )
        rejects = staging_dir(errors_dir, where, run_id)  # on the errors folder's filesystem: published by a rename
        job_run(
            layer_rows((view,)) if view else one_pass,
            schema,
            storage.join(staging, "rows"),
            storage.join(rejects, f"errors-{run_id}"),
            sampled=(share, False) if share is not None else None,
            more_errors=sample_errors,
        )
        written, shards = count_rows(storage.join(staging, "*rows*.parquet"))
        rejected, _ = count_rows(storage.join(rejects, "errors-*.parquet"))
        if rows_in != written + rejected:
            raise CountMismatch(
                f"rows in {rows_in} != written {written} + rejected {rejected}: not committing"
                + unseen_staging(rows_in, written + rejected, "--db and --errors")
            )
        try:
            TooManyRejected.check(rejected, rows_in, max_rejected, f"table {table!r} left unchanged")
            if written == 0 and mode == "overwrite":
                refuse_overwrite_with_nothing(table, allow_empty)
            previous = previous_rows(db_uri, table, base.version, store) if base else (None, None)
            refuse_one_row(table, written + (previous[0].num_rows if previous[0] is not None else 0))
            # the fit refuses what only the rows written show (one group left once rows were rejected)
            with phase(f"build-db: fitting the probes and policies on {written} new rows"), released_on_sigterm():
                fault_point("fit")
                reference = assemble(
                    shards,
                    schema,
                    task,
                    meta,
                    manifest.hidden_size,
                    *previous,
                    label_word_head=manifest.label_word_head,
                    layer_budget=layer_budget,
                    layer_price=layer_price,
                    group_of=group_of,
                    view=view,
                )
        except RaeeError as refused:  # the rejected rows say why: kept, outside the errors output
            if rejected:
                refused.args = (f"{refused}; its rejected rows: {keep_uncommitted(errors_dir, where, run_id)}",)
            else:  # a refusal, not an unfinished run: nothing of it left for the next run to clean up
                storage.delete([rejects])
                forget_errors(work)
            tidy(errors_dir, where, own_errors)
            raise
        record = RunRecord.new(
            run_id, mode, job.digest, rejected, previous[0].schema if previous[0] is not None else None
        )
        fault_point("commit:errors")
        check_held(work)  # the fit may have run long: a lapsed claim's table may be another run's by now
        table_rows, indexed, version = commit(db_uri, table, reference.data, reference.features, store, record, read)
        publish(rejects, errors_dir)
        tidy(errors_dir, where, own_errors)
        # follows the version now current, wherever this run's rows went
        in_step(own_folder, record, True, partial(recorded_runs, db_uri, table, store))
        forget_errors(work)
    search = f"IVF_FLAT index, {index_partitions(table_rows)} partitions" if indexed else "exact search"
    return BuildSummary(
        table,
        mode,
        rows_in,
        written,
        rejected,
        table_rows,
        errors_dir,
        reference.policy,
        search,
        version,
        reference.render(),
        "fewer than 2 rows" if manifest.label_word_head else "the backbone has no label-word head to fit it on",
        passes=passes,
    )


def two_pass_share(rows_in: int, forms: set[str]) -> float | None:
    """The share of a new table's input rows build-db runs first in every input form (`forms`: those the table's
    views read), choosing the probes' view on them, so that the other rows run only the chosen view's form; None: one
    pass (every form for every row) where the views read one form or the rows are too few for the second job's
    start-up to pay."""
    if rows_in <= TWO_PASSES_ABOVE or len(forms) < 2:
        return None
    return CV_ROWS / rows_in


def _layer_job(
    beam_args: list[str] | tuple[str, ...],
    names: dict[str, str],
    contents: dict[str, str],
    task: Task,
    schema_in: pa.Schema,
    layer_rows: LayerRows,
    schema: pa.Schema,
    rows_at: str,
    errors_at: str,
    sampled: tuple[float, bool] | None = None,
    more_errors: pa.Table | None = None,
) -> None:
    """One build-db job: the inputs' valid rows -> layer rows staged at `rows_at`, rejected rows at `errors_at`.
    `sampled` (share, inside): only the rows whose id hashes below the share (inside) or not; the sample's job drops
    invalid rows (the other job rejects them, each once). `more_errors`: the sample's job's rejected rows."""
    pipeline = make_pipeline(beam_args, command="build-db", **names)
    valid, invalid = read_validated(pipeline, contents, task, need_label=True, schema=schema_in)
    if sampled is not None:
        valid = valid | "Sample" >> beam.Map(_sample_part, *sampled) | "NonEmpty" >> beam.Filter(len)
    rows, failed = valid | "Infer" >> Infer(layer_rows)
    write_tables(rows, "WriteStaging", rows_at, schema)
    rejected = [failed] if sampled and sampled[1] else [invalid, failed]
    if more_errors is not None and more_errors.num_rows:
        rejected.append(pipeline | "SampleErrors" >> beam.Create([more_errors]))
    errors = rejected | "Errors" >> beam.Flatten()
    write_tables(errors, "WriteErrors", errors_at, ERRORS_SCHEMA)
    run_pipeline(pipeline, "build-db")


def _sample_part(table: pa.Table, share: float, inside: bool) -> pa.Table:
    """The rows of `table` whose id hashes below `share` (probes.in_fit_sample: the probes' fit sample holds them),
    or the others."""
    inner = in_fit_sample(table.column(ROW_ID).to_pylist(), share)
    return table.filter(pa.array(inner if inside else ~inner))


def _refuse_errors_location(errors_dir: str, db_uri: str, table: str) -> None:
    """A given --errors where its files would mix with what others own: in the database but for the table's own
    default folder (an overwrite of another table empties that table's), in artifacts, or in another database's
    table's errors folder (whose build-db sets other runs' files aside and prunes them)."""
    storage.check_scheme(errors_dir, "--errors")
    storage.check_outside(errors_dir, "--errors", db_uri, storage.join(ERRORS_FOLDER, table))
    check_outside_artifacts(errors_dir, "--errors")
    owner = None if storage.within(errors_dir, db_uri) else errors_owner(errors_dir)
    if owner:
        raise RaeeConfigError(
            f"--errors {errors_dir}: inside the errors folder of table {owner[1]!r} in the database {owner[0]}, "
            "whose build-db sets other runs' files aside there and prunes them; choose a folder outside it"
        )


def _check_errors_folder(
    errors_dir: str, own_folder: str, own_errors: bool, shards: list[str], found: list[FileMetadata], inputs: list[str]
) -> None:
    """The run's errors folder (the table's own, however named, or a given one, which may hold other tables'
    files), refused before any work where this run's `shards` would mix with what is there or be read as input."""
    if not own_errors and storage.within(errors_dir, own_folder):
        raise RaeeConfigError(
            f"--errors {errors_dir} is inside the table's own errors folder {own_folder}, which holds its runs' files "
            "and sets some aside: give that folder itself (or leave --errors out), or one outside it"
        )
    storage.check_folder(errors_dir, "--errors")
    check_outside_outputs(errors_dir, "--errors")
    # a classify output (its _SUCCESS would not list our files) or an evaluate report (read whole, its predictions)
    there = [SUCCESS] if storage.exists(storage.join(errors_dir, SUCCESS)) else []
    there += ["report.json"] if is_evaluate_report(storage.join(errors_dir, "report.json")) else []
    if there:
        raise RaeeConfigError(
            f"--errors {errors_dir} holds another job's complete output ({some(there)}): choose another"
        )
    refuse_reading_own_output(found, inputs, errors_dir, shards, "--errors")
    foreign = foreign_parquet(errors_dir)
    if foreign:
        raise RaeeConfigError(
            f"--errors {errors_dir} holds {some(foreign)}, Parquet no build-db wrote there (a reader of the folder "
            "would take it with the rejected rows): choose another"
        )
