"""Reference-size scaling (issue 9): how accuracy and mean exit layer move as the reference set grows.

sst2: 500 / 2,000 / 10,000 / 50,000 reference rows drawn (seed 0) from train, nested (each size extends the
smaller ones, so the curve shows the size and not a new draw), one fixed test set (all 872 validation rows). Every
size gets its own table from `raee-ops build-db` (probes, their pooling and C, and the probe policy fitted on that
reference alone; nothing is tuned on validation), then `raee_ops.evaluate` scores the default `probe-fused`,
`key-lr`, `knn-vote` and `probe-best` on the same rows.

SST-2's train split is ~67k phrases cut from ~7k sentences: under plain leave-one-out a reference row's nearest
neighbours are often phrases of its own sentence, which vouch for it as no new sentence's neighbours can, and the
more rows the more so. Each reference row's group is the longest train row containing its text (`sentence_groups`),
given to build-db as `--group-column`; every size is also built without groups, and that table's default is
scored beside it (`probe-fused (no groups)`), so the run shows what the grouping is worth.

Backbone `minilm-l6`: build-db runs every reference row through every layer, and it is the only preset for which
50,000 rows do that in minutes on 2 cores; the result states the measured build-db time beside what the decoder
presets' measured segment throughput (bench/results/speed-*.json, when present) implies for the same rows.
Like the other benches it skips (exit 0) on a machine without the datasets; a data folder without sst2's train and
validation splits is an error (exit 2).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from common import RESULTS_DIR, require_data, timer, write_result
from quality import BENCH, EMBEDDER, SEED, K, ensure_artifacts, raee_ops, read_checked

from raee_ops.calibration import loo_neighbours
from raee_ops.evaluate import evaluate
from raee_ops.runtime import SegmentRuntime
from raee_ops.tasks import get_task

PRESET, TASK = "minilm-l6", "sst2"
SIZES, QUICK_SIZES = (500, 2_000, 10_000, 50_000), (500, 2_000)
METHODS = ("probe-fused", "key-lr", "knn-vote", "probe-best")
#: The default fitted on the same reference rows without --group-column, scored beside the others.
UNGROUPED = "probe-fused (no groups)"
GROUP_COLUMN = "sentence"
#: A phrase whose first words open more train rows than this is too common to place in one sentence: its own group.
MAX_CANDIDATES = 2000
#: Decoder presets whose measured throughput through every segment says what 50,000 rows would cost them.
OTHER_PRESETS = ("smollm2-135m", "gemma3-270m")
#: Reference rows whose nearest neighbour is checked for being a phrase of the same sentence.
SIBLING_QUERIES = 500
#: Test rows timed through every layer of this backbone, the same measure as the speed bench's `segments`.
RATE_ROWS = 256


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help=f"sizes {', '.join(map(str, QUICK_SIZES))} only")
    return parser.parse_args()


def require_sst2() -> tuple[Path, Path]:
    """(train, validation) of sst2; without a data folder the benches' skip, without the splits one `error:` line."""
    root = require_data()
    files = root / TASK / "train.parquet", root / TASK / "validation.parquet"
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        shown = ", ".join(missing)
        print(f"error: scaling needs the sst2 dataset; missing {shown} (set RAEE_DATA_DIR)", file=sys.stderr)
        sys.exit(2)
    return files


def nested_samples(train: pa.Table, sizes: tuple[int, ...]) -> dict[int, pa.Table]:
    """Seeded reference sets, each the first n rows of one permutation (so smaller sets lie inside larger ones),
    in file order."""
    order = np.random.default_rng(SEED).permutation(train.num_rows)
    return {n: train.take(pa.array(np.sort(order[:n]))) for n in sizes}


def sentence_groups(texts: list[str]) -> list[str]:
    """Each text's group: the index of the longest text containing it (lower-cased, whole words), found among the
    texts that share its first (up to) four words; a text is its own group when none does or when its opening is
    too common to tell."""
    lowered = [" ".join(t.lower().split()) for t in texts]
    words = [t.split() for t in lowered]
    starts: dict[tuple[str, ...], list[int]] = {}
    for row, w in enumerate(words):
        for n in range(1, 5):
            for j in range(len(w) - n + 1):
                starts.setdefault(tuple(w[j : j + n]), []).append(row)
    root = np.arange(len(texts))
    for row, w in enumerate(words):
        candidates = starts.get(tuple(w[:4]), []) if w else []
        if len(candidates) > MAX_CANDIDATES:
            continue
        padded = f" {lowered[row]} "
        for other in candidates:
            if len(lowered[other]) > len(lowered[root[row]]) and padded in f" {lowered[other]} ":
                root[row] = other
    for _ in range(8):  # a phrase's longest container may itself sit inside a longer row: follow to the top
        root = root[root]
    return [f"s{r}" for r in root]


def segment_rate(artifacts: Path, test: Path) -> dict[str, Any]:
    """This backbone's rows/s through every layer (segments only, as the speed bench's `segments`), on test prompts,
    with the load average while it ran (other jobs on the machine slow it down)."""
    runtime = SegmentRuntime(artifacts)
    texts = pq.read_table(test).column("text").to_pylist()[:RATE_ROWS]
    prompts = [get_task(TASK).render(t, suffix=runtime.suffix) for t in texts]
    runtime.all_layers_pooled(TASK, prompts[:32])  # warm-up
    with timer() as took:
        runtime.all_layers_pooled(TASK, prompts)
    return {"segments_rows_per_s": len(prompts) / took.s, "rows": len(prompts), "load_avg_1min": os.getloadavg()[0]}


def decoder_estimates(rows: int) -> dict[str, Any]:
    """What `rows` reference rows through every layer would take the decoder presets, from their measured segment
    throughput (the speed bench's `segments` method), where a result exists."""
    out = {}
    for preset in OTHER_PRESETS:
        path = RESULTS_DIR / f"speed-{preset}.json"
        if not path.is_file():
            continue
        doc = json.loads(path.read_text())
        rate = next((m["rows_per_s"] for m in doc["result"]["methods"] if m["method"] == "segments"), None)
        if rate:
            out[preset] = {"segments_rows_per_s": rate, "estimated_minutes": rows / rate / 60, "measured": doc["date"]}
    return out


def sibling_share(reference: pa.Table, db: Path) -> float:
    """Share of SIBLING_QUERIES sampled reference rows whose nearest other reference row (by the table's keys) is a
    sub- or super-phrase of it: SST-2's train split holds many phrases cut from the same sentences, which makes a
    reference row's neighbours look more reliable under leave-one-out than they are for a new sentence."""
    keys = lancedb.connect(str(db)).open_table(TASK).to_arrow().select(["id", "vector"])
    lowered = (t.strip().lower() for t in reference["text"].to_pylist())
    text_of = dict(zip(map(str, reference["id"].to_pylist()), lowered, strict=True))
    texts = [text_of[str(i)] for i in keys["id"].to_pylist()]
    vectors = np.stack(keys["vector"].to_numpy(zero_copy_only=False)).astype(np.float32)
    queries = np.random.default_rng(SEED).choice(len(texts), min(SIBLING_QUERIES, len(texts)), replace=False)
    nearest = loo_neighbours(vectors, queries, 1)[0][:, 0]  # build-db's own leave-one-out neighbours
    return float(np.mean([texts[q] in texts[n] or texts[n] in texts[q] for q, n in zip(queries, nearest, strict=True)]))


def one_size(artifacts: Path, reference: pa.Table, test: Path) -> dict[str, Any]:
    n = reference.num_rows
    work = BENCH / "scaling" / str(n)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    pq.write_table(reference, work / "reference.parquet")
    print(f"[{n}] build-db", flush=True)
    args = ["--artifacts", str(artifacts), "--task", TASK, "--input", str(work / "reference.parquet")]
    args += ["--embedder", EMBEDDER]
    with timer() as built:
        raee_ops("build-db", *args, "--db", str(work / "db"), "--group-column", GROUP_COLUMN)
    raee_ops("build-db", *args, "--db", str(work / "db-no-groups"))
    with timer() as scored:
        report = evaluate(artifacts, TASK, str(work / "db"), TASK, [str(test)], K, list(METHODS)).report
    plain = evaluate(artifacts, TASK, str(work / "db-no-groups"), TASK, [str(test)], K, ["probe-fused"]).report
    report["strategies"][UNGROUPED] = plain["strategies"]["probe-fused"]
    methods = {
        name: {
            "accuracy": s["accuracy"],
            "metric": s["metric"],
            "mean_exit_layer": s["mean_exit_layer"],
            "layer_share": s["mean_exit_layer"] / report["num_layers"],
            "retrieval_only_share": s["retrieval_only_share"],
        }
        for name, s in report["strategies"].items()
    }
    shown = ", ".join(f"{m} {v['accuracy']:.3f} @ {v['mean_exit_layer']:.2f}" for m, v in methods.items())
    print(f"[{n}] build-db {built.s:.0f}s; {shown}", flush=True)
    probes, policy = report["probes"], report["probe_policy"]
    return {
        "reference_rows": n,
        "build_db_s": built.s,
        "evaluate_s": scored.s,
        "test_rows": report["rows"],
        "probe_fit_rows": probes["fit_rows"],
        "probe_pooling": probes["pooling"],
        "probe_best_layer": probes["best_layer"],
        "probe_policy": {k: policy[k] for k in ("k", "epsilon", "alpha", "beta", "tau", "t")},
        "loo_queries": policy["loo_queries"],
        "default_reference_estimate": {"accuracy": policy["loo_metric"], "mean_exit_layer": policy["loo_mean_exit"]},
        "loo_groups": policy["loo_groups"],
        "ungrouped_reference_estimate": {
            "accuracy": plain["probe_policy"]["loo_metric"],
            "mean_exit_layer": plain["probe_policy"]["loo_mean_exit"],
        },
        "sibling_share": sibling_share(reference, work / "db"),
        "methods": methods,
    }


def payload(rows: list[dict[str, Any]], sizes: tuple[int, ...], rate: dict[str, Any]) -> dict[str, Any]:
    """The result so far: written after every size, so a run stopped early still shows the sizes it finished."""
    largest, target = rows[-1], max(SIZES)
    why = (
        f"through every layer {PRESET} ran {rate['segments_rows_per_s']:.0f} rows/s here (segments only, load avg "
        f"{rate['load_avg_1min']:.1f} on {os.cpu_count()} cores), so {target:,} reference rows take "
        f"~{target / rate['segments_rows_per_s'] / 60:.0f} min of layers; build-db did {largest['reference_rows']:,} "
        f"rows (layers, MiniLM key, probe and policy fits, commit) in {largest['build_db_s'] / 60:.1f} min"
    )
    estimates = decoder_estimates(target)
    if estimates:
        why += "; at their segment throughput in the speed bench the decoders would need " + ", ".join(
            f"{p} ~{e['estimated_minutes']:.0f} min ({e['segments_rows_per_s']:.1f} rows/s)"
            for p, e in estimates.items()
        )
    return {
        "preset": PRESET,
        "task": TASK,
        "embedder": EMBEDDER,
        "k": K,
        "seed": SEED,
        "methods": [*METHODS, UNGROUPED],
        "sampling": "nested seeded samples of the train split; test: the whole validation split; everything fitted "
        f"by build-db on the reference alone, with --group-column {GROUP_COLUMN} (each row's longest containing "
        f"train row) unless marked (no groups)",
        "why_this_backbone": why,
        "segment_rate": rate,
        "decoder_estimates": estimates,
        "planned_sizes": list(sizes),
        "complete": len(rows) == len(sizes),
        "sizes": rows,
    }


def main() -> int:
    args = parse()
    train_file, test_file = require_sst2()
    sizes = QUICK_SIZES if args.quick else SIZES
    artifacts = ensure_artifacts(PRESET)
    train = read_checked(train_file, TASK)
    train = train.append_column(GROUP_COLUMN, pa.array(sentence_groups(train.column("text").to_pylist())))
    rate = segment_rate(artifacts, test_file)
    rows: list[dict[str, Any]] = []
    for reference in nested_samples(train, sizes).values():
        rows.append(one_size(artifacts, reference, test_file))
        write_result("scaling", payload(rows, sizes, rate), args.quick)
    print(rows and payload(rows, sizes, rate)["why_this_backbone"], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
