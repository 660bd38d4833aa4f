"""The IVF index on real keys, where classify's share of partitions probed (PROBE_SHARE) is chosen:
bench/retrieval.py measures build-db's index rule (IVF_FLAT, √rows/4 partitions) on synthetic keys, a Gaussian
mixture, but real sentence keys crowd into a narrow cone and split into partitions worse. Here: the default key of
every text in the shared datasets (every file of every task, its test splits included, ~118k rows, past
INDEX_MIN_ROWS where build-db indexes a table), a seeded set of them left out as queries, the table indexed by
build-db's own `build_index`, and recall@k against an exact search at classify's share and around it, as classify
queries (cosine, nprobes).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from common import parse_args, require_data, timer, write_result
from quality import ensure_artifacts

from raee_ops.calibration import label_vote
from raee_ops.key_names import DEFAULT_KEY
from raee_ops.retrieval import INDEX_MIN_ROWS, KMEANS_ITERATIONS, PROBE_SHARE, build_index, index_partitions
from raee_ops.runtime import SegmentRuntime

PRESET = "smollm2-135m"  # only its export's copy of the key is used
K, SEED = 10, 0
NUM_QUERIES, QUICK_QUERIES = 1000, 300
SHARES = sorted({0.05, 0.1, 0.2, 0.3, 0.4, 0.5, PROBE_SHARE})
CHUNK = 8192


def shared_rows(data: Path) -> tuple[list[str], list[str | None], list[str], np.ndarray]:
    """(text, pair, file, answer) of every row of every dataset file, files in name order; the answer is the row's
    label within its file's task, one number 0.. per (file's task, label), so a vote across tasks never conflates
    them."""
    texts: list[str] = []
    pairs: list[str | None] = []
    files: list[str] = []
    answers = []
    tasks = {}
    for path in sorted(data.glob("*/*.parquet")):
        table = pq.read_table(path, columns=["text", "text_pair", "label"])
        texts += table.column("text").to_pylist()
        pairs += table.column("text_pair").to_pylist()
        files += [f"{path.parent.name}/{path.name}"] * table.num_rows
        offset = tasks.setdefault(path.parent.name, 100 * len(tasks))
        answers.append(offset + table.column("label").to_numpy())
    return texts, pairs, files, np.unique(np.concatenate(answers), return_inverse=True)[1]


def keys_of(runtime: SegmentRuntime, texts: list[str], pairs: list[str | None]) -> np.ndarray:
    parts = []
    for start in range(0, len(texts), CHUNK):
        parts.append(runtime.key(DEFAULT_KEY, texts[start : start + CHUNK], pairs[start : start + CHUNK]))
        print(f"  keys {start + len(parts[-1]):,}/{len(texts):,}", flush=True)
    return np.concatenate(parts)


def exact(queries: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each query's top-k rows (positions in `keys`) and their cosine similarities, best first (unit vectors)."""
    rows, sims = [], []
    for start in range(0, len(queries), 256):
        block = queries[start : start + 256] @ keys.T
        top = np.argpartition(-block, K - 1, axis=1)[:, :K]
        top_sims = np.take_along_axis(block, top, 1)
        order = np.argsort(-top_sims, axis=1)
        rows.append(np.take_along_axis(top, order, 1))
        sims.append(np.take_along_axis(top_sims, order, 1))
    return np.concatenate(rows), np.concatenate(sims)


def voted(answers: np.ndarray, similarity: np.ndarray) -> np.ndarray:
    """Each query's label vote over its B×k neighbours' answers, weighted as classify's knn-vote weighs them."""
    return label_vote(answers, similarity, int(answers.max()) + 1).argmax(axis=1)


def probed(
    table: Any,
    queries: np.ndarray,
    nprobes: int,
    truth: tuple[np.ndarray, np.ndarray],
    answers: np.ndarray,
    asked: np.ndarray,
) -> dict[str, Any]:
    """Recall@k at `nprobes` as classify queries: a hit counts when its similarity reaches the exact k-th one (ties
    at the k-th may return either row), so recall is found ∩ true top-k over k; how often the hits' label vote names
    what the exact top-k's names, and how often each names the query's own label (knn-vote's accuracy, either way)."""
    with timer() as t:
        hits = (
            table.search(list(queries), vector_column_name="vector")
            .metric("cosine")
            .limit(K)
            .nprobes(nprobes)
            .select(["id", "_distance"])
            .to_arrow()
            .sort_by([("query_index", "ascending"), ("_distance", "ascending")])
        )
    rows, sims = truth
    found = hits["id"].to_numpy().reshape(len(queries), K)  # k hits each, as classify's Retriever checks
    similarity = 1.0 - hits["_distance"].to_numpy().reshape(len(queries), K)
    per_query = np.minimum((similarity >= sims[:, -1:] - 1e-4).sum(axis=1), K) / K
    exact_vote, index_vote = voted(answers[rows], sims), voted(answers[found], similarity)
    return {
        "nprobes": nprobes,
        "recall_at_k": float(per_query.mean()),
        "queries_below_0_9": int((per_query < 0.9).sum()),
        "vote_agreement": float(np.mean(exact_vote == index_vote)),
        "vote_accuracy": float(np.mean(index_vote == answers[asked])),
        "exact_vote_accuracy": float(np.mean(exact_vote == answers[asked])),
        "batch_qps": len(queries) / t.s,
    }


def main() -> int:
    args = parse_args(__doc__ or "")
    data = require_data()
    runtime = SegmentRuntime(ensure_artifacts(PRESET))
    texts, pairs, files, answers = shared_rows(data)
    print(f"{len(texts):,} texts from {len(set(files))} files; key {DEFAULT_KEY}", flush=True)
    with timer() as keyed:
        keys = keys_of(runtime, texts, pairs)
    rng = np.random.default_rng(SEED)
    order = rng.permutation(len(keys))
    asked = order[: QUICK_QUERIES if args.quick else NUM_QUERIES]
    kept = np.sort(order[len(asked) :])
    rows = len(kept)
    schema = pa.schema([pa.field("id", pa.int64()), pa.field("vector", pa.list_(pa.float32(), keys.shape[1]))])
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(keys[kept].ravel()), keys.shape[1])
    rows_top, sims_top = exact(keys[asked], keys[kept])
    truth = (kept[rows_top], sims_top)  # positions among all rows, as the table's ids
    with tempfile.TemporaryDirectory(prefix="raee-bench-") as tmp:
        table = lancedb.connect(tmp).create_table("keys", pa.table([pa.array(kept), vectors], schema=schema))
        with timer() as built:
            indexed = build_index(table)
        if not indexed:
            print(f"{rows:,} rows is under INDEX_MIN_ROWS {INDEX_MIN_ROWS:,}: build-db would not index it")
            return 1
        partitions = index_partitions(rows)
        runs = []
        for share in SHARES:
            nprobes = max(1, round(partitions * share))
            run = {"share": share, **probed(table, keys[asked], nprobes, truth, answers, asked)}
            print(
                f"  share {share}: nprobes {run['nprobes']}, recall@{K} {run['recall_at_k']:.4f}, "
                f"{run['queries_below_0_9']} queries under 0.9, vote agreement {run['vote_agreement']:.4f}, "
                f"vote accuracy {run['vote_accuracy']:.4f} (exact {run['exact_vote_accuracy']:.4f}), "
                f"{run['batch_qps']:.0f} q/s",
                flush=True,
            )
            runs.append(run)
    by_file = {name: files.count(name) for name in sorted(set(files))}
    payload = {
        "preset": PRESET,
        "key": DEFAULT_KEY,
        "k": K,
        "seed": SEED,
        "rows": rows,
        "queries": len(asked),
        "files": by_file,
        "keys_s": keyed.s,
        "index_build_s": built.s,
        "partitions": partitions,
        "kmeans_iterations": KMEANS_ITERATIONS,
        "probe_share": PROBE_SHARE,
        "runs": runs,
    }
    write_result("index-recall", payload, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
