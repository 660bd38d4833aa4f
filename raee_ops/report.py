"""evaluate's report: report.md, report.png, predictions.parquet and report.json written from an Evaluation, and
the checks that a --report folder can take them. Nothing here reads the model, the table or the strategies."""

from __future__ import annotations

import io
import json
import re
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raee_ops import storage
from raee_ops.commit import SHARD_ENDING, SUCCESS, check_held, check_unclaimed, hold, read_marker, some
from raee_ops.errors import RaeeConfigError
from raee_ops.evaluate import Evaluation
from raee_ops.extras import install_line
from raee_ops.inputs import refuse_matched_outputs
from raee_ops.metrics import BOOTSTRAP_ROUNDS
from raee_ops.retrieval import neighbours_asked
from raee_ops.schemas.manifest import check_outside_artifacts

#: Rejected rows shown in report.md (report.json lists them all).
SHOWN_REJECTED = 20
#: The report's files, in the order they are written (report.json last: it marks a complete report).
REPORT_FILES = ("report.md", "report.png", "predictions.parquet", "report.json")
_SHARD = re.compile(rf".+{SHARD_ENDING}")
#: Written before the report's files are replaced, removed once report.json is: files beside it are a killed
#: evaluate's, which the next may replace.
WRITING = "_WRITING"


def write_report(evaluation: Evaluation, directory: str) -> str:
    """report.md, report.png (the plot is skipped, with a note, when matplotlib is missing) and predictions.parquet,
    then report.json:
    written last, it marks a complete report; an earlier run's is removed first, so a run killed midway never leaves
    its report.md beside another run's report.json. The folder is claimed while writing: a second run waits for
    the first to finish (on an object store it is refused, exit 75), so two runs never mix their files."""
    out, report = str(directory), evaluation.report
    check_report_dir(out)
    markdown, png, predictions = render_markdown(report).encode(), io.BytesIO(), pa.BufferOutputStream()
    pq.write_table(evaluation.predictions, predictions)
    try:
        plot(report, png)
    except ImportError:
        print(
            f"evaluate: matplotlib is not installed ({install_line('report')}); report.png skipped",
            file=sys.stderr,
        )
    md_file, png_file, predictions_file, json_file = (storage.join(out, name) for name in REPORT_FILES)
    with hold(out, "--report", wait=True):
        check_held(out)
        storage.write_bytes(storage.join(out, WRITING), b"evaluate\n")  # an empty upload fails on some stores
        storage.delete([json_file])
        storage.write_bytes(md_file, markdown)
        if png.getvalue():
            storage.write_bytes(png_file, png.getvalue())
        else:  # an earlier run's plot is not this report's
            storage.delete([png_file])
        storage.write_bytes(predictions_file, predictions.getvalue().to_pybytes())
        storage.write_bytes(json_file, (json.dumps(report, indent=2) + "\n").encode())
        storage.delete([storage.join(out, WRITING)])
    return out


def check_outside_outputs(uri: str, what: str) -> None:
    """Refuse a location inside another job's output, a classify's (its `_SUCCESS`) or an evaluate report (its
    report.json): read whole (`pq.read_table('out/')` reads subfolders too), that folder would no longer read as its
    own (a report's JSON among a classify output's Parquet failed the read)."""
    for folder in storage.folders_up(uri)[1:]:
        for name, whose, ours in (
            (SUCCESS, "a classify output", lambda f: bool(read_marker(f))),  # not another tool's (Spark's is empty)
            ("report.json", "an evaluate report", lambda f: is_evaluate_report(storage.join(f, "report.json"))),
        ):
            if ours(folder):
                raise RaeeConfigError(
                    f"{what} {uri}: inside {folder}, {whose} ({name}), which would no longer read as its own: "
                    "choose a folder outside it"
                )


def check_report_dir(directory: str, db_uri: str | None = None, inputs: Sequence[str] = ()) -> None:
    """Before any work: evaluating takes long, and a --report that cannot be a folder (or lies in the database it
    reads, or in an artifacts folder a re-export replaces, or whose files the `inputs` would read) would only fail at
    the end, or on the next run."""
    storage.check_scheme(directory, "--report")
    if db_uri:
        storage.check_outside(directory, "--report", db_uri)
    if inputs:
        refuse_matched_outputs(inputs, directory, REPORT_FILES, "--report")
    check_outside_artifacts(directory, "--report")
    storage.check_folder(directory, "--report")
    refuse_others_files(directory)
    check_outside_outputs(directory, "--report")
    check_unclaimed(directory, "--report")


def refuse_others_files(directory: str) -> None:
    """A report replaces only an earlier evaluate's files (a complete report, whose report.json says so, or a
    killed run's): a folder holding a predictions.parquet or report.md of someone else's is refused, not
    overwritten; and one holding another command's output (a complete one's `_SUCCESS`, the shards Beam wrote:
    classify's predictions, build-db's errors) is refused, not written into: read whole, it would no longer read as
    theirs. An input beside the report is no output."""
    names = storage.children(directory)
    others = [n for n in names if n == SUCCESS or _SHARD.fullmatch(n)]
    if others:
        raise RaeeConfigError(
            f"--report {directory} holds {some(others)}, another command's output: choose a folder of its own"
        )
    there = [n for n in REPORT_FILES if n in names]
    if not there or WRITING in names or is_evaluate_report(storage.join(directory, "report.json")):
        return
    raise RaeeConfigError(
        f"--report {directory} holds {', '.join(there)} that evaluate did not write (no evaluate report.json): "
        "choose another folder"
    )


def is_evaluate_report(json_file: str) -> bool:
    """Whether `json_file` is a report evaluate wrote."""
    try:
        found = json.loads(storage.read_bytes(json_file))
    except (OSError, ValueError):  # missing, or not JSON
        return False
    return isinstance(found, dict) and {"default_strategy", "strategies", "baselines"} <= found.keys()


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    def cell(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows] + [""]


def _hindsight_section(r: dict[str, Any]) -> list[str]:
    bound = r["default_hindsight"]
    if bound is None:  # a table built before policies kept their reference curve and budget
        return []
    settings = " ".join(f"{key}={value}" for key, value in bound["settings"].items())
    return [
        "## The default's grid with hindsight",
        "",
        f"Settings of the default's grid chosen on these labelled rows, within layer budget {bound['layer_budget']} "
        f"at layer price {bound.get('layer_price', 0.0)} ({r['metric_name']}):",
        "",
        f"- chosen on all of them and scored on the same rows: {bound['metric']:.4f} (accuracy "
        f"{bound['accuracy']:.4f}) at mean exit {bound['mean_exit_layer']:.2f} ({settings}). An upper bound, and "
        "an optimistic one: the best of thousands of settings on these few rows is partly luck.",
        _halves_line(bound),
        "",
    ]


def _halves_line(bound: dict[str, Any]) -> str:
    if bound["held_out_metric"] is None:
        return "- chosen on one random half and scored on the other: one scored row has no halves."
    return (
        f"- chosen on one random half and scored on the other ({bound['halvings']} halvings, both ways): "
        f"{bound['held_out_metric']:.4f}, against {bound['default_held_out_metric']:.4f} for the default on the "
        "same halves: what half of these rows, as the rows to choose settings on instead of the reference rows, "
        "would be worth on rows the choice did not see."
    )


def _gap(against: dict[str, float] | None) -> str:
    return "–" if against is None else f"{against['difference']:+.3f} ± {against['standard_error']:.3f}"


def copies_note(r: dict[str, Any]) -> str | None:
    """The warning where scored rows are rows of the table (None: none are, or a report from before they were
    counted): evaluate prints it and report.md leads with it."""
    copies = r.get("reference_copies")
    if not copies:
        return None
    return (
        f"{copies} of the {r['rows']} scored rows have a row of table {r['table']!r} with the same key (the same text, "
        "most likely): they score what the table holds, not what it predicts; evaluate rows it does not hold"
    )


def render_markdown(r: dict[str, Any]) -> str:
    name, note = f"metric: {r['metric_name']}", copies_note(r)
    lines = [
        f"# Evaluation: {r['task']}",
        "",
        f"{r['rows']} row{'' if r['rows'] == 1 else 's'} scored, {r['rejected']} rejected; {r['num_layers']} layers; "
        f"table `{r['table']}` "
        f"(version {r['table_version']}, {r['embedder']} keys); {neighbours_asked(r['k_asked'], r['table_rows'])} "
        f"for the paper's rules; default strategy `{r['default_strategy']}`.",
        "",
        *([f"**Warning:** {note}.", ""] if note else []),
        "## Baselines",
        "",
    ]
    best, vote = r["best_layer"], r["neighbour_vote"]
    rows = [[f"neighbour vote (build-db's fitted k={vote['k']}, no layers)", vote["accuracy"], vote["metric"]]]
    if r["full"] is None:
        lines += ["No label-word head on this backbone: no zero-shot numbers (full, calibrated, oracle).", ""]
    else:
        rows = [
            ["full model (last layer)", r["full"]["accuracy"], r["full"]["metric"]],
            ["full, calibrated", r["full_calibrated"]["accuracy"], r["full_calibrated"]["metric"]],
            [
                f"label-word head's best layer on these rows, in hindsight (L{best['layer']})",
                best["accuracy"],
                best["metric"],
            ],
            ["oracle (any layer right)", r["oracle_accuracy"], r["oracle_metric"]],
            *rows,
        ]
    lines += _table(["method", "accuracy", name], rows)
    lines += ["## Against what a user would pick instead", ""]
    lines += [
        "All fitted on the same reference rows. key-lr: logistic regression on the retrieval key; knn-vote: the "
        f"label vote of the {neighbours_asked(r['k_asked'], r['table_rows'])} nearest neighbours; majority: the "
        "reference's most common label for every row (what a model that learned nothing scores); probe-best: the "
        "probe of the one layer that scored best out of fold on the reference; probe-last: the last layer's probe; "
        f"full / full-cal: the zero-shot label-word head; default: `{r['default_strategy']}`. Default minus it: the "
        f"difference in {r['metric_name']} on these rows, ± its standard error over {BOOTSTRAP_ROUNDS} resamples of "
        "the rows (both scored on each).",
        "",
    ]
    against = r.get("default_against") or {}
    lines += _table(
        ["baseline", "accuracy", name, "mean layers run", "default minus it"],
        [
            [b, *([v["accuracy"], v["metric"], v["mean_layers_run"]] if v else ["–"] * 3), _gap(against.get(b))]
            for b, v in r["baselines"].items()
        ],
    )
    if r["default_by_budget"]:
        lines += [
            "## The default at other layer budgets and prices",
            "",
            "Settings the table keeps for each budget (at the table's price) and price (within the table's budget), "
            "from build-db's fit on the reference rows, no refit; run one with classify --layer-budget or "
            f"--layer-price. The table's own: budget {r['probe_policy']['layer_budget']}, price "
            f"{r['probe_policy'].get('layer_price', 0.0)}.",
            "",
        ]
        lines += _table(
            [
                "layer budget",
                "layer price",
                "reference, left out",
                "reference mean exit",
                "accuracy",
                name,
                "mean layers run",
            ],
            [
                [
                    b["layer_budget"],
                    b.get("layer_price", 0.0),
                    b["reference_metric"],
                    b["reference_mean_exit"],
                    b["accuracy"],
                    b["metric"],
                    b["mean_layers_run"],
                ]
                for b in r["default_by_budget"]
            ],
        )
    lines += _hindsight_section(r)
    lines += ["## Strategies", ""]
    lines += _table(
        ["strategy", "accuracy", name, "mean exit layer", "ideal speed-up", "exits per layer (0..L)"],
        [
            [
                s,
                v["accuracy"],
                v["metric"],
                v["mean_exit_layer"],
                "–" if v["ideal_speedup"] is None else v["ideal_speedup"],
                " ".join(map(str, v["exit_histogram"])),
            ]
            for s, v in r["strategies"].items()
        ],
    )
    p = r["probes"]
    lines += [
        "## Per layer",
        "",
        f"The label-word head and the probe head ({p['pooling']} pooling, fitted on {p['fit_rows']} reference rows; "
        f"reference out-of-fold {name} in the last column).",
        "",
    ]
    absent = ["–"] * r["num_layers"]
    lines += _table(
        ["layer", "head accuracy", f"head {name}", "probe accuracy", f"probe {name}", f"probe reference {name}"],
        [
            [i + 1, *values]
            for i, values in enumerate(
                zip(
                    r["per_layer_accuracy"] or absent,
                    r["per_layer_metric"] or absent,
                    r["per_layer_probe_accuracy"],
                    r["per_layer_probe_metric"],
                    p["reference_oof_metric"],
                    strict=True,
                )
            )
        ],
    )
    lines += [
        "## Table policies (fitted by build-db)",
        "",
        json.dumps(r["policy"]) if r["policy"] else "fused policy: none (no label-word head)",
        "",
        json.dumps({k: v for k, v in r["probe_policy"].items() if not k.endswith("frontier")}),
        "",
    ]
    cost, own = r["layer_cost"], r["probe_policy"]
    if (cost["layer_budget"], cost["layer_price"]) != (own["layer_budget"], own.get("layer_price", 0.0)):
        lines += [
            f"This run scored the probe strategies at layer budget {cost['layer_budget']}, layer price "
            f"{cost['layer_price']} (--layer-budget, --layer-price): the settings the table keeps for them.",
            "",
        ]
    if r["rejected_rows"]:
        lines += [f"## Rejected rows (first {min(SHOWN_REJECTED, r['rejected'])} of {r['rejected']})", ""]
        lines += _table(["id", "reason"], [[e["id"], e["reason"]] for e in r["rejected_rows"][:SHOWN_REJECTED]])
    return "\n".join(lines)


def plot(r: dict[str, Any], path: io.BytesIO) -> None:
    """Accuracy by layer (label-word head and probe) with each baseline at its mean layers run, and where each
    strategy exits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = np.arange(1, r["num_layers"] + 1)
    exit_layers = np.arange(0, r["num_layers"] + 1)
    fig, (curve, hist) = plt.subplots(1, 2, figsize=(13, 4.5))
    if r["per_layer_accuracy"]:
        curve.plot(layers, r["per_layer_accuracy"], "o-", color="black", label="label-word head by layer")
    curve.plot(layers, r["per_layer_probe_accuracy"], "s-", color="tab:blue", label="probe head by layer")
    for i, (name, b) in enumerate(r["baselines"].items()):
        if b is None:  # reads a label-word head this backbone does not have
            continue
        curve.plot(b["mean_layers_run"], b["accuracy"], "D", markersize=8, color=f"C{i}", mfc="none", label=name)
    width = 0.8 / max(len(r["strategies"]), 1)
    for i, (name, s) in enumerate(r["strategies"].items()):
        hist.bar(exit_layers - 0.4 + (i + 0.5) * width, s["exit_histogram"], width, color=f"C{i}", label=name)
    curve.set(xlabel="layer (mean layers run)", ylabel="accuracy", title=f"{r['task']}: accuracy against layers")
    hist.set(xlabel="exit layer (0: retrieval only)", ylabel="rows", title="exit layers per strategy")
    curve.legend(fontsize=7)
    hist.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
