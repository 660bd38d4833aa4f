"""How long build-db's probe fit takes at its row cap, and the probe policy on a 100k-row table.

Synthetic features in SmolLM2's shape (30 layers, every view, hidden 576; a weak label signal) at probes.FIT_ROWS
fit rows, MiniLM-sized keys; then the probe policy's leave-one-out fit over 100,000 rows. Larger tables fit their
probes on a FIT_ROWS sample, so this is the fit's cost for any table from FIT_ROWS rows up.
"""

from __future__ import annotations

import sys

import numpy as np
from common import parse_args, timer, write_result

from raee_ops.layer_key import unit_rows
from raee_ops.probe_policy import fit_probe_policy
from raee_ops.probes import CV_ROWS, FIT_ROWS, VIEWS, fit_probes

LAYERS, HIDDEN, KEY_DIM, TABLE_ROWS, SEED = 30, 576, 384, 100_000, 0


def main() -> int:
    args = parse_args(__doc__ or "")
    rows, table_rows = (2000, 20_000) if args.quick else (FIT_ROWS, TABLE_ROWS)
    rng = np.random.default_rng(SEED)
    labels = rng.integers(0, 2, rows)
    direction = rng.normal(size=(LAYERS, len(VIEWS), HIDDEN)).astype(np.float32)
    features = np.empty((rows, LAYERS, len(VIEWS), HIDDEN), np.float16)
    for start in range(0, rows, 1000):
        part = slice(start, start + 1000)
        noise = rng.normal(size=(len(labels[part]), LAYERS, len(VIEWS), HIDDEN))
        features[part] = noise + 0.05 * (2 * labels[part, None, None, None] - 1) * direction
    keys = rng.normal(size=(rows, KEY_DIM)).astype(np.float32)
    with timer() as probes_s:
        fitted = fit_probes(features, keys, labels, 2, "accuracy", {})
    vectors = unit_rows(rng.normal(size=(table_rows, KEY_DIM)).astype(np.float32))
    uniform = np.log(np.full((table_rows, LAYERS, 2), 0.5, np.float32))
    with timer() as policy_s:
        fit_probe_policy(vectors, rng.integers(0, 2, table_rows), uniform, uniform[:, 0], 2, "accuracy")
    payload = {
        "fit_rows": rows,
        "fit_row_cap": FIT_ROWS,
        "cv_rows": min(CV_ROWS, rows),
        "layers": LAYERS,
        "views": len(VIEWS),
        "hidden": HIDDEN,
        "probe_fit_s": round(probes_s.s, 1),
        "pooling": fitted.probes.pooling,
        "policy_table_rows": table_rows,
        "policy_fit_s": round(policy_s.s, 1),
    }
    print(payload, flush=True)
    write_result("probe-fit", payload, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
