"""Task metrics: accuracy everywhere, plus the metric each benchmark is usually reported with."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Metric = Callable[[np.ndarray, np.ndarray, int], float]


def accuracy(y_true: np.ndarray, y_pred: np.ndarray, num_labels: int = 2) -> float:
    return float(np.mean(y_true == y_pred)) if len(y_true) else float("nan")


def matthews(y_true: np.ndarray, y_pred: np.ndarray, num_labels: int = 2) -> float:
    """Multi-class Matthews correlation (Gorodkin's R_K); 0 when a side is constant."""
    cells = np.asarray(y_true, np.int64) * num_labels + np.asarray(y_pred, np.int64)
    confusion = np.bincount(cells, minlength=num_labels * num_labels).reshape(num_labels, num_labels).astype(np.float64)
    n, correct = confusion.sum(), np.trace(confusion)
    true_counts, pred_counts = confusion.sum(axis=1), confusion.sum(axis=0)
    numerator = correct * n - true_counts @ pred_counts
    denominator = np.sqrt((n * n - pred_counts @ pred_counts) * (n * n - true_counts @ true_counts))
    return float(numerator / denominator) if denominator > 0 else 0.0


def _f1(y_true: np.ndarray, y_pred: np.ndarray, cls: int) -> float:
    tp = np.sum((y_pred == cls) & (y_true == cls))
    predicted, actual = np.sum(y_pred == cls), np.sum(y_true == cls)
    return float(2 * tp / (predicted + actual)) if predicted + actual else 0.0


def f1_positive(y_true: np.ndarray, y_pred: np.ndarray, num_labels: int = 2) -> float:
    return _f1(y_true, y_pred, 1)


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, num_labels: int = 2) -> float:
    """The mean F1 over the labels the rows hold or the answers name (scikit-learn's macro average): a label that
    is neither has no F1 (0/0), and counted as 0 it capped rows lacking one of 6 labels at 5/6, however answered."""
    labels = np.union1d(y_true, y_pred)
    return float(np.mean([_f1(y_true, y_pred, c) for c in labels])) if len(labels) else 0.0


METRICS: dict[str, Metric] = {
    "accuracy": accuracy,
    "matthews_corr": matthews,
    "f1": f1_positive,
    "macro_f1": macro_f1,
}
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
