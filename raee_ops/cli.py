"""The `raee-ops` console script. Commands parse options and hand over to a pipeline; options a command does not
know must be Beam pipeline options (e.g. `--runner`, `--direct_num_workers 2`), which are passed through; any
other is a usage error. Every failure ends with one `error:` line and the exit code in `raee_ops.errors`."""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import logging
import math
import os
import sys
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any, NoReturn

import click

from raee_ops import extras, logs
from raee_ops.errors import (
    STORE_FAILED,
    Interrupted,
    RaeeConfigError,
    RaeeError,
    StoreUnavailable,
    exhausted,
    first_line,
    not_utf8,
    one_line,
)
from raee_ops.exit_policy import DEFAULT_K, DEFAULT_STRATEGY, STRATEGIES
from raee_ops.key_names import DEFAULT_KEY, check_key, parse_embedder
from raee_ops.probe_policy import DEFAULT_LAYER_BUDGET, DEFAULT_LAYER_PRICE
from raee_ops.schemas.tables import table_name_problem
from raee_ops.tasks import Task, get_task, load_task_file

HELP = {"help_option_names": ["-h", "--help"]}
BEAM_ARGS = {"ignore_unknown_options": True, "allow_extra_args": True, **HELP}
#: Default --max-rejected: a run that rejects more than half its rows is noticed by its exit code (4).
MAX_REJECTED = 0.5


class Number(click.FloatRange):
    """A bounded, finite number: click's FloatRange lets `nan` through every bound (nan compares false to both),
    which would switch a guard off or store a budget of nan in a table, and `inf` through an open one, which JSON
    outputs (info --json, report.json) cannot hold."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number + 0.0  # -0 as 0: it is stored in tables and printed


class Duration(click.ParamType):
    """A length of time: a number and its unit (`90s`, `30m`, `12h`, `7d`), or `0`."""

    name = "duration"
    UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> timedelta:
        if isinstance(value, timedelta):
            return value
        text = str(value).strip()
        number, unit = (text, "s") if text == "0" else (text[:-1], text[-1:])
        try:
            amount = float(number)
        except ValueError:
            amount = math.nan
        if unit not in self.UNITS or not math.isfinite(amount) or amount < 0:
            self.fail(f"{value!r} is not a duration (a number and s, m, h or d: 90s, 30m, 12h, 7d; or 0)", param, ctx)
        try:
            return timedelta(seconds=amount * self.UNITS[unit])
        except OverflowError:  # past timedelta's 999,999,999 days
            self.fail(f"{value!r} is longer than any duration this can wait (999999999d)", param, ctx)


def share(low_open: bool = False) -> Number:
    """A share of something, 0..1."""
    return Number(0.0, 1.0, min_open=low_open)


#: A layer price: the task's metric (0..1) a setting must gain to run all the layers; 0 or more.
PRICE = Number(0.0, None)


def _table_name(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    problem = value and table_name_problem(value)
    if problem:
        raise click.BadParameter(problem, ctx, param)
    return value


max_rejected_option = click.option(
    "--max-rejected",
    default=MAX_REJECTED,
    show_default=True,
    type=share(),
    help="Largest share of input rows that may be rejected; above it the run exits with code 4.",
)

run_budget_option = click.option(
    "--layer-budget",
    default=None,
    type=share(low_open=True),
    help="Run probe-fused and probe-conf within this share of the layers instead of the table's own budget, with "
    "the settings build-db fitted for it (the table keeps them; no rebuild). Default: the table's.",
)

run_price_option = click.option(
    "--layer-price",
    default=None,
    type=PRICE,
    help="Choose probe-fused's and probe-conf's settings at this layer price instead of the table's (see build-db; "
    "the table keeps what any price buys; no rebuild). Default: the table's.",
)


def _absolute(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A local location made absolute here (`storage.absolute`), by every command alike: a pipeline's workers in
    processes of their own (a job service's worker pool) resolved a relative one against their own working
    directory, so a relative --output ran the whole job into the workers' folder and ended with exit 3."""
    from raee_ops import storage

    if not value:
        return value
    storage.refuse_half_url(value, param.opts[0])  # made absolute, `s3:/b/x` would be a local folder's path
    absolute = storage.absolute(value)
    _refuse_not_utf8(absolute, ctx, param)  # the working directory's name: `_utf8` read the value as given
    return absolute


artifacts_option = click.option(
    "--artifacts", required=True, type=click.Path(file_okay=False), callback=_absolute, help="Exported artifacts."
)


def db_option(help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """--db, as every command takes it."""
    return click.option("--db", "db_uri", required=True, callback=_absolute, help=help_text)


def _tasks(names: tuple[str, ...], files: tuple[str, ...]) -> list[Task]:
    return [get_task(n) for n in names] + [load_task_file(f) for f in files]


class BeamCommand(click.Command):
    """A command whose extra arguments must be Beam pipeline options, checked before click's own checks: a
    misspelt `--artifact` is reported as itself (with the closest option), not as a missing `--artifacts`. One
    that runs no pipeline (`runs_pipeline` False) takes no runner option."""

    def __init__(self, *args: Any, runs_pipeline: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.runs_pipeline = runs_pipeline

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            opts, extra, order = self.make_parser(ctx).parse_args(args=list(args))  # parses only: nothing checked yet
        except click.UsageError as exc:  # click's parser raises them without the command: its help, not ours
            exc.ctx = exc.ctx or ctx
            raise
        logs.configure(-1 if opts.get("quiet") else int(opts.get("verbose") or 0))  # before importing Beam
        help_option = self.get_help_option(ctx)  # --help parsed as click's own option, or left among the extras
        asks_help = help_option is not None and (opts.get(help_option.name or "") or set(extra) & set(help_option.opts))
        if not ctx.resilient_parsing and not asks_help:  # help needs no Beam (its import: ~4 s)
            from raee_ops.pipelines.options import unknown_args

            own = [o for p in self.params for o in p.opts]
            problem = unknown_args(extra, own, self.runs_pipeline, _options_elsewhere(self.name))
            if problem:
                raise click.UsageError(problem, ctx)
            _given_once(ctx, order)
            _not_empty(ctx, opts)
            _utf8(ctx, opts, extra)
        return super().parse_args(ctx, args)


def _options_elsewhere(command: str | None) -> dict[str, list[str]]:
    """The options of raee-ops's other commands, each with the commands that have it."""
    found: dict[str, list[str]] = {}
    for name, other in sorted(cli.commands.items()):
        for option in {o for p in other.params for o in p.opts} if name != command else ():
            found.setdefault(option, []).append(name)
    return found


def _not_empty(ctx: click.Context, opts: dict[str, Any]) -> None:
    """Refuse an option given as '' (a job template's unset variable): `--db ''` would build in the working
    directory, `--table ''` fall back to the task's table, `--errors ''` to the default folder."""
    for param in ctx.command.params:
        values = opts.get(param.name or "")
        if any(isinstance(v, str) and not v.strip() for v in (values if isinstance(values, list) else [values])):
            instead = "" if param.required else " or leave the option out"
            raise click.BadParameter(f"is empty (an unset variable?); give a value{instead}", ctx, param)


def _utf8(ctx: click.Context, opts: dict[str, Any], extra: list[str]) -> None:
    """Refuse a value that is not UTF-8: Beam cannot encode it, and the run failed with an internal error in a
    worker or on the driver, a folder already made."""
    for param in ctx.command.params:
        values = opts.get(param.name or "")
        for value in values if isinstance(values, list) else [values]:
            if isinstance(value, str):
                _refuse_not_utf8(value, ctx, param)
    for value in extra:
        shown = not_utf8(value)
        if shown:
            raise click.UsageError(f"{shown} is not UTF-8, which Beam cannot pass on", ctx)


def _refuse_not_utf8(value: str, ctx: click.Context, param: click.Parameter) -> None:
    shown = not_utf8(value)
    if shown:
        raise click.BadParameter(f"{shown} is not UTF-8, which Beam cannot pass on: rename it", ctx, param)


def _given_once(ctx: click.Context, order: list[click.Parameter]) -> None:
    """Refuse a one-value option given twice: click would keep the last silently (a job template's value and an
    override: which one ran must not be a guess). A bare flag repeated (`-q -q`) says the same thing twice."""
    for param in dict.fromkeys(order):
        if not isinstance(param, click.Option) or param.multiple or param.count:
            continue
        if param.is_flag and not param.secondary_opts:
            continue
        given = order.count(param)
        if given > 1:
            raise click.BadParameter(f"given {given} times; give it once", ctx, param)


def command(name: str, runs_pipeline: bool = True) -> Callable[[Callable[..., Any]], click.Command]:
    """A subcommand with -v/-q; extra arguments must be Beam pipeline options (the pipelines' runner and
    filesystem options; for a command that runs no pipeline, `runs_pipeline` False, the filesystem and database
    options)."""

    def wrap(fn: Callable[..., Any]) -> click.Command:
        @functools.wraps(fn)
        def run(*args: Any, verbose: int, quiet: bool, **kwargs: Any) -> Any:  # -v/-q: applied in parse_args
            from raee_ops.commit import interrupts_noted

            if _own_process:
                _watch_the_store()
            try:
                with interrupts_noted():
                    return fn(*args, **kwargs)
            except KeyboardInterrupt:  # before click turns it into an Abort, printing a blank line
                raise Interrupted("interrupted") from None

        run = click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")(run)
        run = click.option("-v", "--verbose", count=True, help="Show library logs (-vv: debug).")(run)
        return cli.command(name, cls=BeamCommand, context_settings=BEAM_ARGS, runs_pipeline=runs_pipeline)(run)

    return wrap


def echo(text: str) -> None:
    if not logs.quiet():
        click.echo(text)


def echo_json(document: object) -> None:
    """A --json document: what the user asked for, printed under -q too (which silences the summaries)."""
    click.echo(json.dumps(document, indent=2))


@click.group(context_settings=HELP)
@click.version_option(package_name="raee-ops", prog_name="raee-ops")
def cli() -> None:
    """RAEE batch classification: export a backbone, build exit metadata, classify with early exits."""


#: Whether this process is the `raee-ops` command's own (entry), which may end itself; in-process callers' is not.
_own_process = False


def _watch_the_store() -> None:
    """End the command with exit 75 once the object store has answered none of this process's calls for
    --raee_store_patience seconds: botocore's and Beam's retries had a run hang for half an hour and more, and then
    again removing its staging. Ending is a kill, which loses nothing; the next run removes what this one staged."""
    from raee_ops import s3_clients
    from raee_ops.pipelines.options import stop_local_workers
    from raee_ops.settings import store_patience

    def give_up(line: str) -> None:
        click.echo(f"error: {line}", file=logs.stream())  # while a run's library prints are hidden, too
        stop_local_workers()
        _end_now(StoreUnavailable.exit_code)

    s3_clients.watch(store_patience(beam_args()), give_up)


def beam_args() -> list[str]:
    """The Beam pipeline options of the running command (already checked by `command`)."""
    return list(click.get_current_context().args)


@command("export-onnx")
@click.option(
    "--model",
    "model_spec",
    required=True,
    help="Preset (smollm2-135m, gemma3-270m, minilm-l6: no label-word head), a .gguf file, or a Hugging Face model "
    "directory.",
)
@click.option(
    "--out", "out_dir", required=True, type=click.Path(file_okay=False), callback=_absolute, help="Artifacts directory."
)
@click.option("--task", "task_names", multiple=True, help="Preset task to export a head for (repeatable).")
@click.option(
    "--task-file",
    "task_files",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="JSON task file (name, template, label_names, verbalizer; optionally metric); repeatable.",
)
@click.option(
    "--embedder",
    "embedders",
    multiple=True,
    default=(DEFAULT_KEY,),
    show_default=True,
    callback=lambda ctx, param, value: _embedder_names(value),
    help=f"Retrieval embedder to export into the artifacts: `minilm-N` (MiniLM's first N layers; {DEFAULT_KEY} is "
    "build-db's default key), `minilm` (all six: the sentence embedding), either with `-int8` (its MatMuls in int8: "
    "faster on CPUs, no CUDA kernel), or `none`; repeatable.",
)
@click.option(
    "--max-length",
    default=256,
    show_default=True,
    type=click.IntRange(min=1),
    help="Longest prompt in tokens the runtime accepts.",
)
@click.option(
    "--verify/--no-verify",
    default=True,
    show_default=True,
    help="Check every layer of the chained ONNX segments against the PyTorch model.",
)
@click.option(
    "--optimize/--no-optimize",
    default=True,
    show_default=True,
    help="Store the layers and embedders optimized and fused (ORT transformer optimizer), verified as exported.",
)
@click.option(
    "--quantize",
    type=click.Choice(["int8"]),
    default=None,
    help="Run the layers' MatMuls in int8 (weights per channel, inputs per token), checked against fp32; for CPUs.",
)
def export_onnx(
    model_spec: str,
    out_dir: str,
    task_names: tuple[str, ...],
    task_files: tuple[str, ...],
    embedders: tuple[str, ...],
    max_length: int,
    verify: bool,
    optimize: bool,
    quantize: str | None,
) -> None:
    """Export MODEL into per-layer ONNX segments plus one head per task."""
    tasks = _tasks(task_names, task_files)  # before the pipeline's imports (torch, Beam: seconds)
    if not tasks:
        raise RaeeConfigError("give at least one --task or --task-file")
    extras.require("export", "export-onnx")
    from raee_ops.pipelines.export_checks import check_before_loading

    embedders = tuple(name for name in embedders if name != "none")
    check_before_loading(model_spec, out_dir.rstrip("/"), embedders, beam_args())  # before torch's ~20 s import
    from raee_ops.pipelines.export import fusion_table, run_export

    manifest = run_export(
        model_spec,
        out_dir,
        tasks,
        verify=verify,
        embedders=list(embedders),
        max_length=max_length,
        beam_args=beam_args(),
        quantize=quantize,
        optimize=optimize,
        prechecked=True,
    )
    echo(f"fusions per stored graph:\n{fusion_table(manifest)}")
    int8 = ", int8" if manifest.quantization else ""
    echo(
        f"exported {manifest.num_layers} layers, tasks {', '.join(manifest.tasks)} -> {out_dir} "
        f"(artifacts fingerprint {manifest.fingerprint}{int8})"
    )


def _embedder_names(values: tuple[str, ...]) -> tuple[str, ...]:
    """export-onnx --embedder's values: none alone, or distinct minilm[-N][-int8] names."""
    if "none" in values and len(values) > 1:
        raise click.BadParameter("`none` exports no embedder; give it alone")
    if len(set(values)) != len(values):
        raise click.BadParameter(f"names an embedder twice: {', '.join(values)}")
    for value in set(values) - {"none"}:
        try:
            parse_embedder(value)
        except RaeeConfigError as err:
            raise click.BadParameter(str(err)) from None
    return values


def _key_spec(value: str | None) -> str | None:
    """build-db --embedder's value: backbone, minilm[-N][-int8] or layer-N (whether these artifacts have it is
    build-db's check)."""
    if value is not None:
        try:
            check_key(value)
        except RaeeConfigError as err:
            raise click.BadParameter(str(err)) from None
    return value


@command("build-db")
@artifacts_option
@click.option("--task", "task_name", required=True, help="Task name in the artifacts.")
@click.option("--input", "inputs", required=True, multiple=True, help="Labelled Parquet file or glob (repeatable).")
@db_option("LanceDB URI (a local directory or object-store URI).")
@click.option("--table", default=None, callback=_table_name, help="Table name (default: the task name).")
@click.option(
    "--embedder",
    default=None,
    callback=lambda ctx, param, value: _key_spec(value),
    help="Retrieval key: `minilm-N` (the exported MiniLM embedder's first N layers, mean-pooled; `minilm`: all of "
    "it, the sentence embedding; either with `-int8`: as exported with int8 MatMuls), `layer-N` (the backbone's mean "
    "state after its first N layers, standardized on the table's rows: rows running further reuse those layers) or "
    f"`backbone` (the embedding segment's mean: cheapest, weakest neighbours). Default: {DEFAULT_KEY} for a new "
    "table, the table's own for --mode append.",
)
@click.option(
    "--mode",
    default="overwrite",
    show_default=True,
    type=click.Choice(["overwrite", "append"]),
    help="overwrite: the table is these rows (a new version; rollback restores the old); append: the table's rows and "
    "these, probes and policies refitted on all.",
)
@click.option(
    "--errors",
    "errors_dir",
    default=None,
    callback=_absolute,
    help="Where rejected rows go (default: <db>/_errors/<table>).",
)
@max_rejected_option
@click.option(
    "--allow-empty",
    is_flag=True,
    help="Let --mode overwrite replace the table with one of 0 rows (refused otherwise).",
)
@click.option(
    "--layer-budget",
    default=None,
    type=share(low_open=True),
    help="Share of the layers the fitted probe strategies may run at most on average on the reference rows (a hard "
    f"cap; 1: none). Default: {DEFAULT_LAYER_BUDGET:g} for a new table, the table's own for --mode append.",
)
@click.option(
    "--layer-price",
    default=None,
    type=PRICE,
    help="Metric the fitted probe strategies must gain on the reference rows for running all the layers rather than "
    "none: the setting whose metric less this price per share of the layers it runs is highest is chosen (0.1: a "
    f"tenth of the layers must buy a point; 0 puts accuracy first). Default: {DEFAULT_LAYER_PRICE:g} for a new table, "
    "the table's own for --mode append.",
)
@click.option(
    "--group-column",
    default=None,
    help="Input column whose equal values mark near-copies (phrases of one sentence, parts of one document): "
    "they never vouch for each other when the probes and policies are fitted (leave-one-group-out). Null: a "
    "group of its own.",
)
def build_db(
    artifacts: str,
    task_name: str,
    inputs: tuple[str, ...],
    db_uri: str,
    table: str | None,
    embedder: str | None,
    mode: str,
    errors_dir: str | None,
    max_rejected: float,
    allow_empty: bool,
    layer_budget: float | None,
    layer_price: float | None,
    group_column: str | None,
) -> None:
    """Run labelled rows through every layer and store their exit information in LanceDB."""
    from raee_ops.pipelines.build_db import run_build_db

    summary = run_build_db(
        artifacts,
        task_name,
        list(inputs),
        db_uri,
        table or task_name,
        embedder,
        mode,
        errors_dir,
        beam_args=beam_args(),
        max_rejected=max_rejected,
        allow_empty=allow_empty,
        layer_budget=layer_budget,
        layer_price=layer_price,
        group_column=group_column,
    )
    echo(summary.render())


@command("classify")
@artifacts_option
@click.option("--task", "task_name", required=True, help="Task name in the artifacts.")
@db_option("LanceDB URI holding the exit-metadata table.")
@click.option("--table", default=None, callback=_table_name, help="Table name (default: the task name).")
@click.option("--input", "inputs", required=True, multiple=True, help="Parquet file or glob to classify (repeatable).")
@click.option(
    "--output", "output_dir", required=True, callback=_absolute, help="Directory for predictions-*.parquet and errors."
)
@click.option(
    "--k",
    default=DEFAULT_K,
    show_default=True,
    type=click.IntRange(min=1),
    help="Neighbours for the paper's rules (raee*) and knn-vote; fused and probe-fused use the k fitted on the "
    "reference table.",
)
@click.option(
    "--strategy",
    help=f"Exit strategy: {DEFAULT_STRATEGY} (default), {', '.join(s for s in STRATEGIES if s != DEFAULT_STRATEGY)}, "
    "probe:N or layer:N (a fixed layer's probe or head; raee is the paper's rule).",
)
@run_budget_option
@run_price_option
@max_rejected_option
def classify(
    artifacts: str,
    task_name: str,
    db_uri: str,
    table: str | None,
    inputs: tuple[str, ...],
    output_dir: str,
    k: int,
    strategy: str | None,
    layer_budget: float | None,
    layer_price: float | None,
    max_rejected: float,
) -> None:
    """Classify Parquet rows, running each only up to its retrieval-predicted exit layer."""
    from raee_ops.pipelines.classify import run_classify

    summary = run_classify(
        artifacts,
        task_name,
        db_uri,
        table or task_name,
        list(inputs),
        output_dir,
        k,
        strategy,
        beam_args(),
        layer_budget=layer_budget,
        layer_price=layer_price,
    )
    echo(summary.render())
    summary.check(max_rejected)


@command("evaluate", runs_pipeline=False)
@artifacts_option
@click.option("--task", "task_name", default=None, help="Task name in the artifacts.")
@click.option(
    "--task-file",
    default=None,
    type=click.Path(dir_okay=False),
    help="JSON task file of a task already exported into the artifacts (instead of --task).",
)
@db_option("LanceDB URI holding the exit-metadata table.")
@click.option("--table", default=None, callback=_table_name, help="Table name (default: the task name).")
@click.option("--input", "inputs", required=True, multiple=True, help="Labelled Parquet file or glob (repeatable).")
@click.option(
    "--report",
    "report_dir",
    required=True,
    callback=_absolute,
    help="Directory for report.json, report.md, report.png and predictions.parquet (each row's answers).",
)
@click.option(
    "--k",
    default=DEFAULT_K,
    show_default=True,
    type=click.IntRange(min=1),
    help="Neighbours for the paper's rules (raee*) and knn-vote.",
)
@click.option(
    "--strategy",
    "strategies",
    multiple=True,
    help="Strategy to score (repeatable; default: every named strategy). layer:N works too.",
)
@run_budget_option
@run_price_option
def evaluate_cmd(
    artifacts: str,
    task_name: str | None,
    task_file: str | None,
    db_uri: str,
    table: str | None,
    inputs: tuple[str, ...],
    report_dir: str,
    k: int,
    strategies: tuple[str, ...],
    layer_budget: float | None,
    layer_price: float | None,
) -> None:
    """Score every layer, the full model, the oracle and each exit strategy on labelled rows, in-process (Beam
    options are accepted for the filesystem and database settings: --s3_endpoint_url, --raee_db_storage_option)."""
    from raee_ops import storage
    from raee_ops.evaluate import evaluate, exported_task
    from raee_ops.report import check_report_dir, copies_note, write_report
    from raee_ops.retrieval import neighbours_asked
    from raee_ops.schemas.manifest import load_manifest

    if (task_name is None) == (task_file is None):
        raise RaeeConfigError("give exactly one of --task or --task-file")
    storage.configure(beam_args())
    check_report_dir(report_dir, db_uri, inputs)
    if task_file:
        task_name = exported_task(load_manifest(artifacts), load_task_file(task_file))
    evaluation = evaluate(
        artifacts,
        task_name,
        db_uri,
        table or task_name,
        list(inputs),
        k,
        list(strategies) or None,
        beam_args(),
        layer_budget,
        layer_price,
    )
    out, report = write_report(evaluation, report_dir), evaluation.report
    full, name = report["full"], report["metric_name"]
    zero_shot = f"; full {name} {full['metric']:.4f}" if full else "; no label-word head"
    balance = f"rows in: {report['rows_in']}  scored: {report['rows']}  rejected: {report['rejected']}"
    echo(f"evaluated: {balance}  (in = scored + rejected: ok){zero_shot}")
    if report["k"] != report["k_asked"]:
        echo(f"note: {neighbours_asked(report['k_asked'], report['table_rows'])}")
    note = copies_note(report)
    if note:
        echo(f"warning: {note}")
    for strategy, s in report["strategies"].items():
        exit_layer = f"{s['mean_exit_layer']:.2f}/{report['num_layers']}"
        echo(f"  {strategy}: {name} {s['metric']:.4f}, mean exit layer {exit_layer}")
    echo(f"report: {out}")


@command("info", runs_pipeline=False)
@db_option("LanceDB URI (a local directory or object-store URI).")
@click.option("--table", default=None, callback=_table_name, help="Only this table (default: every table).")
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of text.")
def info_cmd(db_uri: str, table: str | None, as_json: bool) -> None:
    """Show each table's task, embedder, artifacts fingerprint, rows, version, index, fitted policy and versions
    (an object-store database takes the same --s3_* / --raee_db_storage_option options as the pipelines)."""
    from raee_ops.info import describe, render
    from raee_ops.settings import worker_settings

    info = describe(db_uri, table, worker_settings(beam_args(), db_uri).db_storage_options)
    if as_json:
        echo_json(info)
    else:
        echo(render(info))
    unreadable = [t["table"] for t in info["tables"] if t["unreadable"]]
    no_append = [t["table"] for t in info["tables"] if t["features_unreadable"]]
    problems = [f"table(s) {', '.join(unreadable)} in {db_uri} cannot be read"] if unreadable else []
    problems += [f"table(s) {', '.join(no_append)} in {db_uri} cannot be appended to"] if no_append else []
    if problems:  # shown above with the rest (the versions to roll back to among it); a health check sees exit 2
        raise RaeeConfigError(f"{'; '.join(problems)}: see above")


@command("rollback", runs_pipeline=False)
@db_option("LanceDB URI holding the table.")
@click.option("--table", required=True, callback=_table_name, help="Table to roll back.")
@click.option("--version", "version", required=True, type=int, help="Version to make current (see `info`).")
def rollback_cmd(db_uri: str, table: str, version: int) -> None:
    """Make an earlier version of a table current again, as a new version (nothing is deleted)."""
    from raee_ops.info import render
    from raee_ops.settings import worker_settings
    from raee_ops.versions import rollback

    info = rollback(db_uri, table, version, worker_settings(beam_args(), db_uri).db_storage_options)
    previous = info["previous"]
    if info["changed"]:
        done = f"restored (was version {previous})"
    else:
        done = "already current" + (f" (as version {previous})" if previous != version else "")
    echo(f"table {table}: version {version} {done}")
    echo(render({"db": db_uri, "tables": [info]}))


@command("prune", runs_pipeline=False)
@db_option("LanceDB URI holding the table.")
@click.option(
    "--table",
    default=None,
    callback=_table_name,
    help="Table whose old versions to remove (default: every exit table).",
)
@click.option(
    "--keep",
    required=True,
    type=click.IntRange(min=1),
    help="How many of the newest versions stay (a build-db makes one, and one more for its index).",
)
@click.option(
    "--grace",
    default="1d",
    show_default=True,
    type=Duration(),
    help="A version replaced less than this long ago stays too: a classify that began on it reads it till it ends "
    "(90s, 30m, 12h, 7d; 0 for none).",
)
@click.option("--dry-run", is_flag=True, help="Say what would be removed; remove nothing.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of text.")
def prune_cmd(db_uri: str, table: str | None, keep: int, grace: timedelta, dry_run: bool, as_json: bool) -> None:
    """Remove old versions of a table, or of every table build-db wrote (and their probe fit rows' versions none of
    the kept ones names), freeing their files: every build-db is a new version, and LanceDB keeps them all. The
    removed versions cannot be rolled back to."""
    from raee_ops.errors import Busy
    from raee_ops.settings import worker_settings
    from raee_ops.versions import prune, prune_all

    store = worker_settings(beam_args(), db_uri).db_storage_options
    if table is None:
        pruned, held, damaged = prune_all(db_uri, keep, grace, dry_run, store)
    else:
        pruned, held, damaged = [prune(db_uri, table, keep, grace, dry_run, store)], [], []
    as_dicts = [dataclasses.asdict(p) for p in pruned]
    skipped = held or damaged
    text = "\n".join(p.render() for p in pruned) or ("" if skipped else f"{db_uri}: no tables written by build-db")
    if as_json:
        echo_json({"db": db_uri, "tables": as_dicts})
    elif text:  # with every table held or damaged, the one line is the error's
        echo(text)
    if damaged:  # the others are pruned (printed above); a retry would not mend these
        held_too = f"; held by another run, not pruned: {', '.join(held)}" if held else ""
        others = ("the others would be (--dry-run)" if dry_run else "the others were") if pruned else "no other table"
        raise RaeeConfigError(f"not pruned, {others}: {'; '.join(damaged)}{held_too}")
    if held:  # the others are pruned; a scheduler's retry finds these free
        raise Busy(f"another run is writing table(s) {', '.join(held)} in {db_uri}: not pruned; retry later")


def _fail(message: str, code: int) -> NoReturn:
    """The one `error:` line: a message of several lines (a library's, inside ours) is joined into it."""
    click.echo("error: " + one_line(message), err=True)
    sys.exit(code)


def _end_now(code: int) -> NoReturn:
    """End the process with `code` without the interpreter's teardown: native threads still running there (a
    runner's LOOPBACK workers, ONNX Runtime's, Arrow's) made it abort (`terminate called without an active
    exception`, SIGABRT) instead of exiting with its code: an interrupted run (130), a finished classify, a refused
    build-db (2). Every `with` block has run by then, files are closed and claims are locks the kernel drops."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def entry() -> NoReturn:
    """The `raee-ops` process (console script, `python -m raee_ops`): main(), then `_end_now` with its exit code.
    In-process callers use main(), which raises SystemExit as usual."""
    global _own_process
    _own_process = True
    try:
        main()
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            _end_now(exc.code or 0)
        print(exc.code, file=sys.stderr)  # as Python reports a SystemExit with a message
        _end_now(1)
    _end_now(0)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; every failure is one `error:` line on stderr and its documented exit code."""
    try:
        cli.main(args=argv, prog_name="raee-ops", standalone_mode=False)
    except RaeeError as exc:
        logging.getLogger(__name__).debug("failed", exc_info=True)
        _fail(str(exc), exc.exit_code)
    except click.exceptions.Abort:  # Ctrl-C outside a command's body (click prints a blank line first)
        _fail("interrupted", 130)
    except click.exceptions.NoArgsIsHelpError as exc:  # a bare `raee-ops`: its help, as click would
        click.echo(exc.ctx.get_help(), err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:  # usage errors: bad or missing options (exit 2)
        ctx = getattr(exc, "ctx", None)
        _fail(f"{exc.format_message()} (see {ctx.command_path if ctx else 'raee-ops'} --help)", exc.exit_code)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EMFILE):  # not a bug: the line says where, what mends it
            _exhausted(exc.strerror, exc.filename)
        if not _path_given_wrong(exc):
            _unexpected(exc)
        logging.getLogger(__name__).debug("failed", exc_info=True)
        _fail(f"{exc.strerror or type(exc).__name__}: {exc.filename or exc}", 2)
    except Exception as exc:
        _unexpected(exc)
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as exc:  # a native library's panic (pyo3's PanicException): a Python traceback, no line
        _unexpected(exc)


#: What S3 and GCS clients say when credentials are wrong or lack a permission (boto's 403s, Beam's wrapping of them).
REFUSED = ("(403)", "Forbidden", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch")


def _refused_by_store(exc: Exception) -> bool:
    """Credentials the store refuses: configuration (exit 2), though they surface as the storage client's error."""
    return any(marker in str(exc) for marker in REFUSED)


def _path_given_wrong(exc: OSError) -> bool:
    """A location the user gave that cannot be used as given (no permission, a file for a folder, a read-only
    filesystem): configuration, exit 2, not a bug."""
    wrong = (PermissionError, FileExistsError, NotADirectoryError, IsADirectoryError)
    return isinstance(exc, wrong) or exc.errno == errno.EROFS


def _exhausted(said: str, where: str | None = None) -> NoReturn:
    """The line of a resource the run exhausted: where (a remedy "there" needs a place), and what mends it."""
    mend = (exhausted(said) or (said, "free space there"))[1]
    if not where and "there" in mend:
        where = "where this command writes (its outputs, the temporary folders beside them, TMPDIR)"
    _fail(f"{said}: {f'{where}: ' if where else ''}{mend}, then run again", 1)


def _unexpected(exc: BaseException) -> NoReturn:
    """An exception no check anticipated: credentials the store refuses (exit 2), a server error from it past its
    client's retries (75: a retry mends an outage), a resource run out (memory; disk or files in a library's own
    error, LanceDB's), else a bug."""
    if _refused_by_store(exc):
        logging.getLogger(__name__).debug("failed", exc_info=True)
        _fail(f"the object store refused access (check the credentials and permissions): {first_line(exc)}", 2)
    if STORE_FAILED.search(str(exc)):
        logging.getLogger(__name__).debug("failed", exc_info=True)
        _fail(f"the object store is failing (retry later): {first_line(exc)}", 75)
    ran_out = exhausted(f"{type(exc).__name__}: {exc}")  # a MemoryError may say nothing more
    if ran_out:
        logging.getLogger(__name__).debug("failed", exc_info=True)
        _exhausted(ran_out[0])
    _internal(exc)


def _internal(exc: BaseException) -> NoReturn:
    """A bug: still one line by default, the traceback with -v."""
    if logs.verbose():
        traceback.print_exception(exc)
    _fail(f"internal error: {type(exc).__name__}: {first_line(exc)} (run with -v for the traceback)", 1)


if __name__ == "__main__":
    entry()
