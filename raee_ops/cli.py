"""The `raee-ops` console script. Commands parse options and hand over to a pipeline; unknown options are
Beam pipeline options (e.g. `--runner`, `--direct_num_workers 2`) and are passed through untouched."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from raee_ops.errors import RaeeConfigError, RaeeRunError
from raee_ops.tasks import Task, get_task, load_task_file

BEAM_ARGS = {"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": ["-h", "--help"]}


def _tasks(names: tuple[str, ...], files: tuple[str, ...]) -> list[Task]:
    return [get_task(n) for n in names] + [load_task_file(f) for f in files]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """RAEE batch classification: export a backbone, build exit metadata, classify with early exits."""


@cli.command("export-onnx", context_settings=BEAM_ARGS)
@click.option(
    "--model",
    "model_spec",
    required=True,
    help="Preset (smollm2-135m, gemma3-270m), a .gguf file, or a Hugging Face model directory.",
)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Artifacts directory.")
@click.option("--task", "task_names", multiple=True, help="Preset task to export a head for (repeatable).")
@click.option(
    "--task-file",
    "task_files",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="JSON task file (name, template, label_names, verbalizer); repeatable.",
)
@click.option(
    "--embedder",
    "embedders",
    multiple=True,
    type=click.Choice(["minilm"]),
    help="Also export a retrieval embedder into the artifacts.",
)
@click.option("--max-length", default=256, show_default=True, help="Longest prompt in tokens the runtime accepts.")
@click.option(
    "--verify/--no-verify",
    default=True,
    show_default=True,
    help="Check every layer of the chained ONNX segments against the PyTorch model.",
)
@click.pass_context
def export_onnx(
    ctx: click.Context,
    model_spec: str,
    out_dir: str,
    task_names: tuple[str, ...],
    task_files: tuple[str, ...],
    embedders: tuple[str, ...],
    max_length: int,
    verify: bool,
) -> None:
    """Export MODEL into per-layer ONNX segments plus one head per task."""
    from pipelines.export import run_export

    tasks = _tasks(task_names, task_files)
    if not tasks:
        raise RaeeConfigError("give at least one --task or --task-file")
    manifest = run_export(
        model_spec,
        Path(out_dir),
        tasks,
        verify=verify,
        embedders=list(embedders),
        max_length=max_length,
        beam_args=ctx.args,
    )
    click.echo(f"exported {manifest.num_layers} layers, tasks {', '.join(manifest.tasks)} -> {out_dir}")


@cli.command("build-db", context_settings=BEAM_ARGS)
@click.option("--artifacts", required=True, type=click.Path(file_okay=False), help="Exported artifacts.")
@click.option("--task", "task_name", required=True, help="Task name in the artifacts.")
@click.option("--input", "inputs", required=True, multiple=True, help="Labelled Parquet file or glob (repeatable).")
@click.option("--db", "db_uri", required=True, help="LanceDB URI (a local directory or object-store URI).")
@click.option("--table", default=None, help="Table name (default: the task name).")
@click.option(
    "--embedder",
    default="backbone",
    show_default=True,
    type=click.Choice(["backbone", "minilm"]),
    help="Retrieval key embedding.",
)
@click.option("--mode", default="overwrite", show_default=True, type=click.Choice(["overwrite", "append"]))
@click.option("--errors", "errors_dir", default=None, help="Where rejected rows go (default: <db>/_errors/<table>).")
@click.pass_context
def build_db(
    ctx: click.Context,
    artifacts: str,
    task_name: str,
    inputs: tuple[str, ...],
    db_uri: str,
    table: str | None,
    embedder: str,
    mode: str,
    errors_dir: str | None,
) -> None:
    """Run labelled rows through every layer and store their exit information in LanceDB."""
    from pipelines.build_db import run_build_db

    summary = run_build_db(
        Path(artifacts),
        task_name,
        list(inputs),
        db_uri,
        table or task_name,
        embedder,
        mode,
        errors_dir,
        beam_args=ctx.args,
    )
    click.echo(summary.render())


@cli.command("classify", context_settings=BEAM_ARGS)
@click.option("--artifacts", required=True, type=click.Path(file_okay=False), help="Exported artifacts.")
@click.option("--task", "task_name", required=True, help="Task name in the artifacts.")
@click.option("--db", "db_uri", required=True, help="LanceDB URI holding the exit-metadata table.")
@click.option("--table", default=None, help="Table name (default: the task name).")
@click.option("--input", "input_glob", required=True, help="Parquet file or glob to classify.")
@click.option("--output", "output_dir", required=True, help="Directory for predictions-*.parquet and errors.")
@click.option(
    "--k",
    default=10,
    show_default=True,
    help="Neighbours for the paper's rules (raee*) and knn-vote; fused and probe-fused use the k fitted on the "
    "reference table.",
)
@click.option(
    "--strategy",
    default=None,
    help="Exit strategy: probe-fused (default), probe-conf, raee-probe, probe-best, probe-last, probe:N, key-lr, "
    "knn-vote, fused, raee (the paper's rule), raee-counts, raee-cal, full, full-cal or layer:N.",
)
@click.pass_context
def classify(
    ctx: click.Context,
    artifacts: str,
    task_name: str,
    db_uri: str,
    table: str | None,
    input_glob: str,
    output_dir: str,
    k: int,
    strategy: str | None,
) -> None:
    """Classify Parquet rows, running each only up to its retrieval-predicted exit layer."""
    from pipelines.classify import run_classify

    summary = run_classify(
        Path(artifacts), task_name, db_uri, table or task_name, input_glob, output_dir, k, strategy, beam_args=ctx.args
    )
    click.echo(summary.render())


@cli.command("evaluate", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--artifacts", required=True, type=click.Path(file_okay=False), help="Exported artifacts.")
@click.option("--task", "task_name", default=None, help="Task name in the artifacts.")
@click.option(
    "--task-file",
    default=None,
    type=click.Path(dir_okay=False),
    help="JSON task file of a task already exported into the artifacts (instead of --task).",
)
@click.option("--db", "db_uri", required=True, help="LanceDB URI holding the exit-metadata table.")
@click.option("--table", default=None, help="Table name (default: the task name).")
@click.option("--input", "input_path", required=True, help="Labelled Parquet file or glob to score.")
@click.option("--report", "report_dir", required=True, help="Directory for report.json, report.md, report.png.")
@click.option("--k", default=10, show_default=True, help="Neighbours for the paper's rules (raee*).")
@click.option(
    "--strategy",
    "strategies",
    multiple=True,
    help="Strategy to score (repeatable; default: every named strategy). layer:N works too.",
)
def evaluate_cmd(
    artifacts: str,
    task_name: str | None,
    task_file: str | None,
    db_uri: str,
    table: str | None,
    input_path: str,
    report_dir: str,
    k: int,
    strategies: tuple[str, ...],
) -> None:
    """Score every layer, the full model, the oracle and each exit strategy on labelled rows, in-process."""
    from raee_ops.evaluate import evaluate, exported_task, write_report
    from schemas.manifest import load_manifest

    if (task_name is None) == (task_file is None):
        raise RaeeConfigError("give exactly one of --task or --task-file")
    if task_file:
        task_name = exported_task(load_manifest(artifacts), load_task_file(task_file))
    report = evaluate(Path(artifacts), task_name, db_uri, table or task_name, input_path, k, list(strategies) or None)
    out = write_report(report, report_dir)
    full, name = report["full"], report["full"]["metric_name"]
    click.echo(f"evaluated {report['rows']} rows ({report['rejected']} rejected); full {name} {full['metric']:.4f}")
    for strategy, s in report["strategies"].items():
        exit_layer = f"{s['mean_exit_layer']:.2f}/{report['num_layers']}"
        click.echo(f"  {strategy}: {name} {s['metric']:.4f}, mean exit layer {exit_layer}")
    click.echo(f"report: {out}")


def main() -> None:
    try:
        cli(standalone_mode=False)
    except RaeeConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except RaeeRunError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
