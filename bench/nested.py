"""Can the reference rows alone tell where the default loses to probe-best (issue 9's -1 point goal)?

build-db's leave-one-out score of the default is the score of the best of ~13,500 settings on the rows that chose it, so
it is optimistic; probe-best's out-of-fold score is the best of a few dozen layers, much less so. Nested
cross-validation scores the choice itself: on each quality-bench reference table (bench/quality.py runs first and leaves
them in .bench/quality-<preset>), the default's settings are chosen as build-db chooses them (the table's layer budget
and price) on four fifths of the left-out reference rows and scored on the other fifth, over ESTIMATE_FOLDS folds and
ESTIMATE_SHUFFLES shuffles; probe-best's layer likewise (raee_ops.probe_policy.estimate, which build-db runs on every
table it fits; tables built before it keep none, so the bench recomputes it). The per-layer probe answers are the
table's own out-of-fold ones, the key probe's refitted as build-db fits it (the tables are keyed by MiniLM: no layer
key). A setting's cost on a fold is its mean exit over all the left-out rows (a Trial keeps no per-row exits); a choice
scoring no better than the most common label falls back to it, as build-db's does. No validation or test row is read for
the estimate; the quality bench's scored figures (bench/results/quality-<preset>.json) are shown beside it for
comparison only.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import lancedb
import numpy as np
from common import RESULTS_DIR, parse_args, write_result
from quality import PRESETS, QUICK_TASKS, TASKS, work_dir
from raee_ops.schemas.tables import flat_values

from raee_ops.calibration import frontier
from raee_ops.metrics import METRICS
from raee_ops.probe_policy import ESTIMATE_FOLDS, ESTIMATE_SHUFFLES, choose, estimate, reference_trials
from raee_ops.probes import fit_key_probe
from raee_ops.retrieval import table_probe_policy


def nested_task(preset: str, task: str) -> dict[str, Any] | None:
    """One reference table's default and probe-best: as build-db scored them, and chosen on folds and scored on
    the rest."""
    db = work_dir(preset, task) / "db"
    if not db.is_dir():
        return None
    table = lancedb.connect(str(db)).open_table(task).to_arrow()
    policy = table_probe_policy(table.schema)
    if policy is None:
        return None
    labels = table["label"].to_numpy().astype(np.int64)
    vectors = flat_values(table, "vector").reshape(table.num_rows, -1).astype(np.float32)
    num_layers = len(policy.curve)
    probe_lp = flat_values(table, "probe_logprobs").reshape(table.num_rows, num_layers, -1)
    num_labels = probe_lp.shape[2]
    _, key_oof = fit_key_probe(vectors, labels, num_labels)
    left = reference_trials(vectors, labels, probe_lp, key_oof, policy.metric)
    metric = METRICS[policy.metric]
    chosen = choose(frontier(left.trials), policy.layer_budget, policy.layer_price, num_layers)  # as build-db chooses
    majority = int(np.bincount(labels, minlength=num_labels).argmax())
    nested = estimate(left, num_labels, policy.metric, policy.layer_budget, policy.layer_price, majority)
    assert nested is not None, "a quality-bench table has hundreds of rows"
    layer_pred = left.probs.argmax(axis=2)  # Q×L
    curve = [metric(left.truth, layer_pred[:, j], num_labels) for j in range(num_layers)]
    return {
        "task": task,
        "metric": policy.metric,
        "num_layers": num_layers,
        "rows": int(len(left.truth)),
        "default_loo": chosen.score,
        "default_loo_check": policy.loo_metric,
        "default_loo_mean_exit": chosen.mean_exit,
        "default_nested": nested.metric,
        "default_nested_mean_exit": nested.mean_exit,
        "probe_best_oof": float(max(curve)),
        "probe_best_nested": nested.probe_best,
    }


def scored(preset: str) -> dict[str, dict[str, float]]:
    """The quality bench's scored default and probe-best per task, where its results are here."""
    path = RESULTS_DIR / f"quality-{preset}.json"
    if not path.is_file():
        return {}
    tasks = json.loads(path.read_text())["result"]["tasks"]
    return {
        t["task"]: {
            name: t["baselines"][name]["score"] for name in ("default", "probe-best") if t["baselines"].get(name)
        }
        for t in tasks
    }


def main() -> int:
    args = parse_args(__doc__ or "")
    presets = {}
    for preset in PRESETS:
        rows = [row for task in (QUICK_TASKS if args.quick else TASKS) if (row := nested_task(preset, task))]
        if not rows:
            print(f"[{preset}] no quality-bench tables in {work_dir(preset, '*').parent}: skipped", flush=True)
            continue
        found = scored(preset)
        for row in rows:
            row["scored"] = found.get(row["task"])
            print(f"[{preset}/{row['task']}] {json.dumps({k: v for k, v in row.items() if k != 'task'})}", flush=True)
        presets[preset] = {"tasks": rows}
    if not presets:
        print("nested: no quality-bench tables (run bench/quality.py first): nothing written", flush=True)
        return 0
    shuffles = list(range(ESTIMATE_SHUFFLES))
    write_result("nested", {"folds": ESTIMATE_FOLDS, "seeds": shuffles, "presets": presets}, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
