"""Task metrics: accuracy everywhere, plus the metric each benchmark is usually reported with."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Metric = Callable[[np.ndarray, np.ndarray, int], float]
#: A metric of confusion counts ...×C×C (true label × answer), one score per leading index: how build-db scores
#: thousands of settings' answers at once (`scores`).
OfCounts = Callable[[np.ndarray], np.ndarray]


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_labels: int = 2) -> np.ndarray:
    """Counts ...×C×C of answers `y_pred` (...×N: any leading axes, one matrix per row of answers) against `y_true`
    (N); C is num_labels, or more where a label is larger."""
    y_true, y_pred = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
    c = max(num_labels, int(max(y_true.max(initial=-1), y_pred.max(initial=-1))) + 1)
    answers = y_pred.reshape(-1, y_pred.shape[-1])
    cells = np.arange(len(answers))[:, None] * c * c + y_true[None, :] * c + answers
    counts = np.bincount(cells.ravel(), minlength=len(answers) * c * c)
    return counts.reshape(*y_pred.shape[:-1], c, c).astype(np.float64)


def _accuracy(counts: np.ndarray) -> np.ndarray:
    n = counts.sum(axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.trace(counts, axis1=-2, axis2=-1) / n  # no rows: nan


def _matthews(counts: np.ndarray) -> np.ndarray:
    """Multi-class Matthews correlation (Gorodkin's R_K); 0 when a side is constant."""
    n, correct = counts.sum(axis=(-2, -1)), np.trace(counts, axis1=-2, axis2=-1)
    true_counts, pred_counts = counts.sum(axis=-1), counts.sum(axis=-2)
    numerator = correct * n - (true_counts * pred_counts).sum(axis=-1)
    denominator = np.sqrt((n * n - (pred_counts**2).sum(axis=-1)) * (n * n - (true_counts**2).sum(axis=-1)))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / denominator, 0.0)


def _f1s(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each label's F1 ...×C, and whether the rows hold or the answers name it (0/0 where neither)."""
    tp = np.diagonal(counts, axis1=-2, axis2=-1)
    seen = counts.sum(axis=-1) + counts.sum(axis=-2)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(seen > 0, 2 * tp / seen, 0.0), seen > 0


def _f1_positive(counts: np.ndarray) -> np.ndarray:
    return _f1s(counts)[0][..., 1]


def _macro_f1(counts: np.ndarray) -> np.ndarray:
    """The mean F1 over the labels the rows hold or the answers name (scikit-learn's macro average): a label that
    is neither has no F1 (0/0), and counted as 0 it capped rows lacking one of 6 labels at 5/6, however answered."""
    f1, seen = _f1s(counts)
    present = seen.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(present > 0, f1.sum(axis=-1) / present, 0.0)


OF_COUNTS: dict[str, OfCounts] = {
    "accuracy": _accuracy,
    "matthews_corr": _matthews,
    "f1": _f1_positive,
    "macro_f1": _macro_f1,
}


#: Answers counted at once by `scores` (its confusion cells are 8 bytes each).
SCORED_CELLS = 1 << 22


def scores(metric_name: str, y_true: np.ndarray, y_pred: np.ndarray, num_labels: int) -> np.ndarray:
    """The metric of every row of answers y_pred (...×N) against y_true (N), at once (SCORED_CELLS at a time)."""
    of, answers = OF_COUNTS[metric_name], np.asarray(y_pred).reshape(-1, np.shape(y_pred)[-1])
    step = max(1, SCORED_CELLS // max(answers.shape[1], 1))
    parts = [of(confusion(y_true, answers[i : i + step], num_labels)) for i in range(0, len(answers), step)]
    return np.concatenate(parts or [np.zeros(0)]).reshape(np.shape(y_pred)[:-1])


def _one(name: str) -> Metric:
    """The metric `name` of one row of answers."""
    of = OF_COUNTS[name]

    def metric(y_true: np.ndarray, y_pred: np.ndarray, num_labels: int = 2) -> float:
        return float(of(confusion(y_true, y_pred, num_labels)))

    metric.__name__ = metric.__qualname__ = name
    return metric


METRICS: dict[str, Metric] = {name: _one(name) for name in OF_COUNTS}
accuracy, matthews, f1_positive, macro_f1 = (METRICS[n] for n in ("accuracy", "matthews_corr", "f1", "macro_f1"))
#: Metrics of a two-label task only (the F1 of label 1, the positive class).
BINARY_METRICS = ("f1",)
#: Resamples of the scored rows behind a paired difference's standard error.
BOOTSTRAP_ROUNDS = 1000


def paired_difference(
    y_true: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    metric: Metric,
    num_labels: int,
    rounds: int = BOOTSTRAP_ROUNDS,
    seed: int = 0,
) -> tuple[float, float]:
    """metric(a) - metric(b) on the same rows, and its standard error: the spread of that difference over `rounds`
    bootstrap resamples of the rows, each method scored on the same resample. Why paired: two methods' scores on
    300 rows each move by a few points with the rows drawn, mostly together; their difference moves less, and a
    goal on the difference is judged by how much."""
    y_true, a, b = (np.asarray(v) for v in (y_true, a, b))

    def difference(rows: np.ndarray) -> float:
        return metric(y_true[rows], a[rows], num_labels) - metric(y_true[rows], b[rows], num_labels)

    return difference(np.arange(len(y_true))), bootstrap_se(difference, len(y_true), rounds, seed)


def bootstrap_se(statistic: Callable[[np.ndarray], float], n: int, rounds: int, seed: int) -> float:
    """The spread of `statistic` (of the row indices it is given) over `rounds` resamples of n rows with
    replacement: a standard error for any metric, accuracy's and the others alike."""
    rng = np.random.default_rng(seed)
    # one resample at a time: all at once would hold rounds × rows indices
    return float(np.std([statistic(rng.integers(0, n, n)) for _ in range(rounds)], ddof=1))
