"""Top-k retrieval from LanceDB exit tables: exact scan vs vector indexes, latency and recall@k; and raee-ops's own
exact search of a table read into memory (what classify runs below INDEX_MIN_ROWS), at every size.

Keys are synthetic (seeded Gaussian mixture, so neighbours cluster as real sentence embeddings do) and
the table has the real exit-table schema, so each hit carries the per-layer metadata classify reads.
HNSW is left out: on 2 cores its build took ~85 s at 100k rows already, far past budget at 1M.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from typing import Any

import lancedb
import numpy as np
import pyarrow as pa
from common import parse_args, timer, write_result
from lancedb.index import IvfFlat, IvfPq
from raee_ops.schemas.tables import exit_table_schema, fixed_list

from raee_ops.layer_key import unit_rows
from raee_ops.retrieval import INDEX_MIN_ROWS, KMEANS_ITERATIONS, PROBE_SHARE, InMemory, index_partitions

DIM, K, NUM_QUERIES = 384, 10, 200
NUM_LAYERS, NUM_LABELS, NUM_CLUSTERS = 12, 2, 1024
CHUNK = 100_000
SEED = 0
#: Single-query latency runs until all queries are done or this many seconds pass (flat at 1M is slow).
LATENCY_BUDGET_S, MIN_LATENCY_QUERIES = 30.0, 20
#: IVF_PQ: 8 dims per sub-vector (48 bytes a row); refine re-ranks refine×k candidates on full vectors.
PQ_SUB_VECTORS = 48
#: (fraction of partitions probed, refine factor) per index: a fast and a high-recall setting; at 1M rows
#: PQ recall plateaus at 0.75 with refine ×10 whatever nprobes, so PQ also gets a deeper refine.
SETTINGS: dict[str, list[tuple[float, int | None]]] = {
    "ivf_flat": [(share, None) for share in sorted({0.05, 0.2, PROBE_SHARE})],  # classify's share among them
    "ivf_pq": [(0.05, 10), (0.2, 10), (0.2, 50)],
}
#: What raee_ops.retrieval.Retriever reads per hit, plus id to score recall.
RESULT_COLUMNS = ["id", "label", "layer_correct", "layer_logprobs", "_distance"]


class Mixture:
    """Seeded Gaussian mixture: cluster centres with per-cluster spread, so density is uneven."""

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.centres = rng.standard_normal((NUM_CLUSTERS, DIM), dtype=np.float32)
        self.spread = rng.uniform(0.5, 1.5, NUM_CLUSTERS).astype(np.float32)
        self.weights = rng.dirichlet(np.full(NUM_CLUSTERS, 2.0))

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        cluster = rng.choice(NUM_CLUSTERS, size=n, p=self.weights)
        noise = rng.standard_normal((n, DIM), dtype=np.float32)
        return self.centres[cluster] + self.spread[cluster, None] * noise, cluster


def _batch(rng: np.random.Generator, start: int, keys: np.ndarray, cluster: np.ndarray) -> pa.RecordBatch:
    """Rows shaped like a real exit table; metadata is random but the label follows the cluster."""
    n = len(keys)
    logits = rng.standard_normal((n, NUM_LAYERS, NUM_LABELS), dtype=np.float32)
    logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    pred = logprobs.argmax(-1).astype(np.int32)
    label = (cluster % NUM_LABELS).astype(np.int32)
    correct = pred == label[:, None]
    first = np.where(correct.any(1), correct.argmax(1) + 1, 0).astype(np.int32)
    schema = exit_table_schema(DIM, NUM_LAYERS, NUM_LABELS)
    lists = {
        "vector": keys,
        "layer_pred": pred,
        "layer_correct": correct,
        "layer_prob": np.exp(np.take_along_axis(logprobs, label[:, None, None], -1)),
        "layer_logprobs": logprobs,
        "probe_correct": correct,  # probe columns: shaped like the head's, their values do not matter here
        "probe_logprobs": logprobs,
    }
    plain = {
        "id": pa.array(np.arange(start, start + n).astype(str)),
        "label": pa.array(label),
        "first_correct_layer": pa.array(first, mask=first == 0),
        "group_id": pa.nulls(n, pa.string()),  # every row a group of its own
    }
    return pa.record_batch(
        [plain[f.name] if f.name in plain else fixed_list(lists[f.name], f) for f in schema], schema=schema
    )


def build_table(db: lancedb.DBConnection, rows: int, queries: np.ndarray) -> tuple[Any, np.ndarray, np.ndarray, float]:
    """Write the table chunk by chunk, keeping exact cosine top-k per query, so 1M rows never sit in RAM."""
    mixture, rng = Mixture(SEED), np.random.default_rng(SEED + rows)
    unit_queries = unit_rows(queries)
    best_sim = np.full((len(queries), K), -np.inf, dtype=np.float32)
    best_id = np.zeros((len(queries), K), dtype=np.int64)

    def chunks() -> Iterator[pa.RecordBatch]:
        nonlocal best_sim, best_id
        for start in range(0, rows, CHUNK):
            keys, cluster = mixture.sample(rng, min(CHUNK, rows - start))
            sims = unit_queries @ unit_rows(keys).T
            top = np.argpartition(-sims, K - 1, axis=1)[:, :K]
            all_sim = np.concatenate([best_sim, np.take_along_axis(sims, top, 1)], axis=1)
            all_id = np.concatenate([best_id, top + start], axis=1)
            order = np.argsort(-all_sim, axis=1)[:, :K]
            best_sim, best_id = np.take_along_axis(all_sim, order, 1), np.take_along_axis(all_id, order, 1)
            yield _batch(rng, start, keys, cluster)
            print(f"  wrote {start + len(keys):,}/{rows:,} rows", flush=True)

    schema = exit_table_schema(DIM, NUM_LAYERS, NUM_LABELS)
    with timer() as t:
        table = db.create_table(f"keys_{rows}", pa.RecordBatchReader.from_batches(schema, chunks()))
    return table, best_id, best_sim, t.s


def _query(table: Any, vectors: np.ndarray, nprobes: int | None, refine: int | None) -> Any:
    query = table.search(vectors).distance_type("cosine").limit(K).select(RESULT_COLUMNS)
    if nprobes is None:
        return query.bypass_vector_index()
    query = query.nprobes(nprobes)
    return query.refine_factor(refine) if refine else query


def measure(
    table: Any, queries: np.ndarray, truth: np.ndarray, nprobes: int | None = None, refine: int | None = None
) -> dict[str, Any]:
    """Latency one query per call (time-boxed), throughput and recall@k from one call with all queries."""
    latencies: list[float] = []
    started = time.perf_counter()
    for q in queries:
        if len(latencies) >= MIN_LATENCY_QUERIES and time.perf_counter() - started > LATENCY_BUDGET_S:
            break
        with timer() as t:
            _query(table, q, nprobes, refine).to_arrow()
        latencies.append(t.s * 1e3)
    with timer() as t:
        hits = _query(table, queries, nprobes, refine).to_arrow()
    found = hits["id"].to_numpy(zero_copy_only=False).astype(np.int64)
    query_index = hits["query_index"].to_numpy()
    recall = np.mean([np.isin(truth[i], found[query_index == i]).mean() for i in range(len(queries))])
    return {
        "p50_ms": float(np.percentile(latencies, 50)),
        "p95_ms": float(np.percentile(latencies, 95)),
        "latency_queries": len(latencies),
        "batch_qps": len(queries) / t.s,
        "recall_at_k": float(recall),
    }


def in_memory(table: Any, queries: np.ndarray, truth_sims: np.ndarray) -> dict[str, Any]:
    """raee-ops's exact search as Retriever runs it below INDEX_MIN_ROWS: the keys and the exit columns classify
    reads, read once (timed as its build), then searched on ONNX Runtime. Recall counts a hit as found when its
    similarity reaches the k-th exact one (ties at the k-th may return either row)."""
    with timer() as load:
        memory = InMemory.read(table, ["label", "layer_correct", "layer_logprobs", "probe_correct"])
    latencies = []
    for q in queries[: max(MIN_LATENCY_QUERIES, 50)]:
        with timer() as t:
            memory.search(q[None], K, NUM_LAYERS, NUM_LABELS)
        latencies.append(t.s * 1e3)
    with timer() as t:
        found = memory.search(queries, K, NUM_LAYERS, NUM_LABELS)
    recall = float(np.mean(found.similarity >= truth_sims[:, -1:] - 1e-5))
    return {
        "method": "in-memory",
        "params": f"exact, ONNX Runtime MatMul + TopK; {memory.nbytes / 2**20:,.0f} MB held",
        "build_s": load.s,
        "memory_mb": memory.nbytes / 2**20,
        "p50_ms": float(np.percentile(latencies, 50)),
        "p95_ms": float(np.percentile(latencies, 95)),
        "latency_queries": len(latencies),
        "batch_qps": len(queries) / t.s,
        "recall_at_k": recall,
    }


def bench_size(db: lancedb.DBConnection, rows: int, queries: np.ndarray) -> dict[str, Any]:
    print(f"== {rows:,} rows", flush=True)
    table, truth, truth_sims, ingest_s = build_table(db, rows, queries)
    runs = [{"method": "flat", "params": "exact scan", "build_s": None, **measure(table, queries, truth)}]
    runs.append(in_memory(table, queries, truth_sims))
    print(
        f"  in-memory: recall {runs[1]['recall_at_k']:.3f}, read in {runs[1]['build_s']:.1f}s "
        f"({runs[1]['memory_mb']:.0f} MB), {runs[1]['batch_qps']:.0f} q/s batched",
        flush=True,
    )
    print(f"  flat: recall {runs[0]['recall_at_k']:.3f}, p50 {runs[0]['p50_ms']:.1f} ms", flush=True)
    partitions = index_partitions(rows)  # build-db's own rule
    configs = {
        "ivf_flat": IvfFlat(distance_type="cosine", num_partitions=partitions, max_iterations=KMEANS_ITERATIONS),
        "ivf_pq": IvfPq(
            distance_type="cosine",
            num_partitions=partitions,
            num_sub_vectors=PQ_SUB_VECTORS,
            max_iterations=KMEANS_ITERATIONS,
        ),
    }
    for method, config in configs.items():
        print(f"  building {method} ({partitions} partitions)...", flush=True)
        with timer() as t:
            table.create_index("vector", config=config, replace=True)
        print(f"  {method} built in {t.s:.1f}s", flush=True)
        for fraction, refine in SETTINGS[method]:
            nprobes = max(1, round(partitions * fraction))
            params = f"{partitions} partitions, nprobes {nprobes}"
            if refine:
                params += f", {PQ_SUB_VECTORS} sub-vectors, refine ×{refine}"
            run = {
                "method": method,
                "params": params,
                "build_s": t.s,
                "nprobes": nprobes,
                "refine_factor": refine,
                **measure(table, queries, truth, nprobes, refine),
            }
            print(
                f"  {method} nprobes {nprobes} refine {refine}: recall {run['recall_at_k']:.3f}, "
                f"p50 {run['p50_ms']:.1f} ms, "
                f"{run['batch_qps']:.0f} q/s batched",
                flush=True,
            )
            runs.append(run)
    return {"rows": rows, "ingest_s": ingest_s, "runs": runs}


def main() -> None:
    args = parse_args(__doc__ or "")
    sizes = [10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000]
    queries, _ = Mixture(SEED).sample(np.random.default_rng(SEED + 1), NUM_QUERIES)
    with tempfile.TemporaryDirectory(prefix="raee-bench-") as tmp:
        db = lancedb.connect(tmp)
        results = [bench_size(db, rows, queries) for rows in sizes]
    write_result(
        "retrieval",
        {
            "k": K,
            "dim": DIM,
            "metric": "cosine",
            "num_queries": NUM_QUERIES,
            "clusters": NUM_CLUSTERS,
            "kmeans_iterations": KMEANS_ITERATIONS,
            "index_min_rows": INDEX_MIN_ROWS,
            "probe_share": PROBE_SHARE,
            "sizes": results,
        },
        quick=args.quick,
    )


if __name__ == "__main__":
    main()
