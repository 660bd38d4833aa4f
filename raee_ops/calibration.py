"""Training-free corrections fitted on the reference table only: per-layer label bias and the fused policy.

Intermediate layers read through the output head lean heavily to one label. `prior_bias` finds, per layer,
the additive logit offset that makes the layer's mean predicted distribution on the reference rows match the
reference label prior (no training, no validation data). `fit_fused_policy` then chooses k, the weight of the
neighbours' label vote, the exit tolerance and the vote agreement at which a row skips the backbone entirely,
by leave-one-out on the reference table scored with the task's metric, with the one-standard-error rule: among
settings whose LOO score is within one (bootstrap) standard error of the best, the one that runs the fewest
layers wins.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple, Protocol, TypeVar

import numpy as np

from raee_ops.metrics import METRICS, Metric, bootstrap_se, scores

K_GRID = (5, 10, 20, 30)
ALPHA_GRID = (0.0, 0.25, 0.5, 0.75)
EPSILON_GRID = (0.0, 0.02, 0.05, 0.1, 0.2)
#: Retrieval-only exit: answer with the neighbours' vote, running no layer, when its top share reaches tau.
TAU_GRID = (0.6, 0.7, 0.8, 0.9, 1.0, None)
MAX_LOO_QUERIES = 2000
LOO_CHUNK = 100
BIAS_ROWS = 20_000
BOOTSTRAP = 200


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.exp(log_softmax(x, axis))


def prior_bias(
    logprobs: np.ndarray, labels: np.ndarray, num_labels: int, iterations: int = 100, seed: int = 0
) -> np.ndarray:
    """L×C offsets so that each layer's mean predicted distribution over N×L×C logprobs equals the prior.

    The prior counts every label; the mean prediction is taken over at most BIAS_ROWS seeded rows (an L×C
    estimate needs no more), and the fixed-point iteration stops once no offset moves by more than 1e-6.
    """
    prior = np.bincount(labels, minlength=num_labels).astype(np.float64) + 1.0
    log_prior = np.log(prior / prior.sum())
    if len(logprobs) > BIAS_ROWS:
        logprobs = logprobs[np.random.default_rng(seed).choice(len(logprobs), BIAS_ROWS, replace=False)]
    bias = np.zeros(logprobs.shape[1:], np.float64)
    for _ in range(iterations):
        mean = softmax(logprobs + bias).mean(axis=0)
        step = log_prior - np.log(np.maximum(mean, 1e-12))
        bias += step
        if np.abs(step).max() < 1e-6:
            break
    return (bias - bias.mean(axis=1, keepdims=True)).astype(np.float32)


def calibrated_correct(logprobs: np.ndarray, labels: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Per-layer correctness (…×L) after the bias correction, for logprobs …×L×C and labels …."""
    return np.argmax(logprobs + bias, axis=-1) == labels[..., None]


def similarity_weights(similarity: np.ndarray) -> np.ndarray:
    """Neighbour weights: cosine similarity floored at zero (an opposite neighbour gets no say)."""
    return np.maximum(similarity, 0.0) + 1e-6


def neighbour_accuracy(correct: np.ndarray, similarity: np.ndarray) -> np.ndarray:
    """B×L similarity-weighted share of neighbours each layer gets right (B×k×L correct, B×k similarity)."""
    w = similarity_weights(similarity)
    return np.einsum("bk,bkl->bl", w, correct.astype(np.float64)) / w.sum(axis=1, keepdims=True)


def earliest_within(accuracy: np.ndarray, epsilon: float) -> np.ndarray:
    """1-based earliest layer whose estimated accuracy is within epsilon of that input's best layer."""
    good = accuracy >= accuracy.max(axis=1, keepdims=True) - epsilon - 1e-12
    return (np.argmax(good, axis=1) + 1).astype(np.int32)


def not_before_key(exits: np.ndarray, key_depth: int) -> np.ndarray:
    """Exits as rows of a layer-N table leave: none before N, which they ran for their key; exit 0 stays 0."""
    return np.where(exits > 0, np.maximum(exits, key_depth), exits)


def label_vote(labels: np.ndarray, similarity: np.ndarray, num_labels: int) -> np.ndarray:
    """B×C similarity-weighted distribution of the neighbours' labels (kNN-LM style)."""
    w = similarity_weights(similarity)
    vote = np.zeros((labels.shape[0], num_labels), np.float64)
    np.add.at(vote, (np.repeat(np.arange(labels.shape[0]), labels.shape[1]), labels.ravel()), w.ravel())
    return vote / vote.sum(axis=1, keepdims=True)


def reaches(probs: np.ndarray, threshold: float) -> np.ndarray:
    """Where a probability reaches a confidence threshold, one rounding error below it included: the one comparison
    the fits and classify share, so the settings build-db picks are for the rule classify runs."""
    return probs >= threshold - 1e-9


def mix(probs: np.ndarray, vote: np.ndarray, weight: float) -> np.ndarray:
    """A distribution mixed with the neighbours' vote, `weight` the vote's share."""
    return (1.0 - weight) * probs + weight * vote


def fuse(calibrated_logits: np.ndarray, vote: np.ndarray, alpha: float) -> np.ndarray:
    """Mix the exit layer's calibrated head distribution with the neighbours' vote."""
    return mix(softmax(calibrated_logits), vote, alpha)


def loo_queries(n: int, rng: np.random.Generator) -> np.ndarray:
    """The reference rows a leave-one-out fit scores: all of them, or a seeded sample of MAX_LOO_QUERIES."""
    return rng.choice(n, size=MAX_LOO_QUERIES, replace=False) if n > MAX_LOO_QUERIES else np.arange(n)


def neighbour_depths(rows: int) -> list[int]:
    """The k of the grid a table of `rows` rows is fitted over (a row's neighbours are the others)."""
    return [k for k in K_GRID if k < rows] or [max(rows - 1, 1)]


def retrieval_only(vote: np.ndarray, tau: float | None) -> np.ndarray:
    """B bool: rows whose neighbours agree so strongly (top vote share >= tau) that no layer needs to run."""
    if tau is None:
        return np.zeros(len(vote), bool)
    return reaches(vote.max(axis=1), tau)


class FittedPolicy(Protocol):
    """What build-db reports of a policy it has just fitted (FusedPolicy, probe_policy.ProbePolicy)."""

    metric: str
    loo_metric: float | None
    loo_mean_exit: float

    def validation(self) -> str: ...

    def settings(self) -> str: ...


def fit_line(name: str, policy: FittedPolicy) -> str:
    """`name (validation, metric): settings; left-out metric m, mean exit layer e`, as build-db prints each fit."""
    p = policy
    return (
        f"{name} ({p.validation()}, {p.metric}): {p.settings()}; "
        f"left-out {p.metric} {p.loo_metric:.3f}, mean exit layer {p.loo_mean_exit:.2f}"
    )


@dataclass(frozen=True)
class FusedPolicy:
    """Settings of the `fused` strategy, chosen on the reference table and stored in its metadata.

    tau None: every row runs at least one layer (tables built before the retrieval-only exit load this way).
    """

    k: int
    alpha: float
    epsilon: float
    bias: list[list[float]]
    loo_accuracy: float
    loo_mean_exit: float
    loo_queries: int
    tau: float | None = None
    metric: str = "accuracy"
    loo_metric: float | None = None
    loo_groups: int | None = None  # reference groups left out whole (build-db --group-column); None: single rows

    def to_dict(self) -> dict:
        return asdict(self)

    def validation(self) -> str:
        return left_out(self.loo_queries, self.loo_groups)

    def settings(self) -> str:
        """The fitted settings in one line, as build-db and classify print them."""
        tau = "never" if self.tau is None else self.tau
        return f"k={self.k} alpha={self.alpha} epsilon={self.epsilon} tau={tau}"

    @property
    def bias_array(self) -> np.ndarray:
        return np.asarray(self.bias, np.float32)


def group_count(groups: np.ndarray | None) -> int | None:
    """How many groups the leave-one-group-out fits left out whole (`groups`: 0-based codes); None without groups."""
    return None if groups is None else int(groups.max()) + 1


def left_out(queries: int, groups: int | None) -> str:
    """How a policy's settings were scored, for build-db's summary."""
    return f"{f'leave-one-group-out, {groups} groups' if groups else 'leave-one-out'}, on {queries} rows"


class Trial(NamedTuple):
    """One setting's leave-one-out outcome."""

    score: float
    accuracy: float
    mean_exit: float
    settings: Any
    pred: np.ndarray


def cheapest_within(trials: list[Trial], tolerance: float) -> Trial:
    """The cheapest trial (fewest layers) scoring within `tolerance` of the best; 0: the best, the cheapest of
    equals."""
    best = max(t.score for t in trials)
    return min((t for t in trials if t.score >= best - tolerance - 1e-12), key=lambda t: (t.mean_exit, -t.score))


class Costed(Protocol):
    """A setting's outcome with its cost: a Trial, or a frontier point a table stores."""

    @property
    def mean_exit(self) -> float: ...

    @property
    def score(self) -> float: ...


C = TypeVar("C", bound=Costed)


def frontier(trials: Sequence[Trial]) -> list[Trial]:
    """The trials that score above every cheaper one, cheapest first (the cheapest of equals): the most any budget
    buys. What build-db keeps of a fit, so a run can choose another budget without refitting."""
    kept: list[Trial] = []
    for trial in sorted(trials, key=lambda t: (t.mean_exit, -t.score)):
        if not kept or trial.score > kept[-1].score:
            kept.append(trial)
    return kept


def within_budget(front: Sequence[C], max_mean_exit: float, price_per_layer: float = 0.0) -> C:
    """The frontier point whose mean exit is within the budget and whose score less `price_per_layer` per layer it
    runs is highest (0: the best scoring; the cheapest of equals); the cheapest point when none is affordable."""
    affordable = [point for point in front if point.mean_exit <= max_mean_exit + 1e-9]
    if not affordable:
        return front[0]
    return max(affordable, key=lambda p: (p.score - price_per_layer * p.mean_exit, -p.mean_exit))


def one_se_choice(trials: list[Trial], metric: Metric, truth: np.ndarray, num_labels: int, seed: int) -> Trial:
    """The cheapest trial (fewest layers) scoring within one bootstrap standard error of the best."""
    best = max(trials, key=lambda t: t.score)
    se = bootstrap_se(lambda rows: metric(truth[rows], best.pred[rows], num_labels), len(truth), BOOTSTRAP, seed)
    return cheapest_within(trials, se)


def loo_neighbours(
    vectors: np.ndarray, queries: np.ndarray, depth: int, groups: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Q×depth nearest rows (and similarities, nearest first) of each query row, itself left out, and with
    `groups` (N ints) every row of its group too: a phrase cut from the same sentence as the query (or a copy of
    it) would vouch for the query as no new input's neighbour can. Exact, in chunks of queries so a million-row
    table needs a few hundred MB, not a Q×N matrix; a query with fewer than `depth` rows outside its group gets
    its nearest same-group rows at similarity -inf, which weigh next to nothing."""
    tops, sims_out = [], []
    for start in range(0, len(queries), LOO_CHUNK):
        chunk = queries[start : start + LOO_CHUNK]
        sims = vectors[chunk] @ vectors.T
        if groups is not None:
            sims[groups[chunk][:, None] == groups[None, :]] = -np.inf
        sims[np.arange(len(chunk)), chunk] = -np.inf  # leave the query itself out
        part = np.argpartition(-sims, depth - 1, axis=1)[:, :depth]
        part_sims = np.take_along_axis(sims, part, axis=1)
        order = np.argsort(-part_sims, axis=1, kind="stable")
        tops.append(np.take_along_axis(part, order, axis=1))
        sims_out.append(np.take_along_axis(part_sims, order, axis=1))
    return np.concatenate(tops), np.concatenate(sims_out)


def scored_trials(
    grid: list[tuple[Any, np.ndarray, float]], truth: np.ndarray, metric_name: str, num_labels: int
) -> list[Trial]:
    """Trials of a grid's (settings, answers, mean exit), every setting's metric and accuracy counted at once."""
    answers = np.array([pred for _, pred, _ in grid], np.int16)  # settings × rows
    values, right = (scores(name, truth, answers, num_labels) for name in (metric_name, "accuracy"))
    return [
        Trial(float(value), float(accuracy_), cost, settings, pred)
        for (settings, pred, cost), value, accuracy_ in zip(grid, values, right, strict=True)
    ]


def fused_trials(
    neighbours: tuple[np.ndarray, np.ndarray, np.ndarray],
    own_logits: np.ndarray,
    truth: np.ndarray,
    metric_name: str,
    num_labels: int,
    ks: Sequence[int],
    key_depth: int = 0,
) -> list[Trial]:
    """Every `fused` setting's answers and mean exit on Q rows, scored against `truth`: the rule fused_exit and
    fused_answer run (raee_ops.exit_policy), over the grid at once. `neighbours`: their labels, similarities and
    calibrated per-layer correctness (Q×k, Q×k, Q×k×L); `own_logits`: each row's calibrated head at every layer."""
    top_labels, top_sims, correct = neighbours
    grid = []
    for k in ks:
        accuracy_by_layer = neighbour_accuracy(correct[:, :k], top_sims[:, :k])
        vote = label_vote(top_labels[:, :k], top_sims[:, :k], num_labels)
        by_vote = {tau: retrieval_only(vote, tau) for tau in TAU_GRID}
        for epsilon in EPSILON_GRID:
            exits = not_before_key(earliest_within(accuracy_by_layer, epsilon), key_depth)
            at_exit = own_logits[np.arange(len(truth)), exits - 1]
            fused = {alpha: np.argmax(fuse(at_exit, vote, alpha), axis=1) for alpha in ALPHA_GRID}
            for alpha, tau in itertools.product(ALPHA_GRID, TAU_GRID):
                pred = np.where(by_vote[tau], vote.argmax(axis=1), fused[alpha])
                cost = float(np.where(by_vote[tau], key_depth, exits).mean())
                grid.append(((k, alpha, epsilon, tau), pred, cost))
    return scored_trials(grid, truth, metric_name, num_labels)


def fit_fused_policy(
    vectors: np.ndarray,
    labels: np.ndarray,
    logprobs: np.ndarray,
    num_labels: int,
    metric_name: str = "accuracy",
    seed: int = 0,
    groups: np.ndarray | None = None,
    key_depth: int = 0,
) -> FusedPolicy:
    """Leave-one-out on the reference rows (vectors N×D normalized, labels N, logprobs N×L×C; with `groups`,
    leave-one-group-out), scored with the task's metric so that a skewed task does not collapse to its majority
    label. `key_depth`: a layer key's N, which every row runs and leaves at the earliest."""
    metric = METRICS[metric_name]
    n = len(labels)
    bias = prior_bias(logprobs, labels, num_labels)
    rng = np.random.default_rng(seed)
    queries = loo_queries(n, rng)
    ks = neighbour_depths(n)
    top, top_sims = loo_neighbours(vectors, queries, max(ks), groups)
    truth = labels[queries]
    neighbours = (labels[top], top_sims, calibrated_correct(logprobs[top], labels[top], bias))
    own_logits = logprobs[queries] + bias  # Q×L×C, the query's own calibrated head at every layer
    trials = fused_trials(neighbours, own_logits, truth, metric_name, num_labels, ks, key_depth)
    chosen = one_se_choice(trials, metric, truth, num_labels, seed)
    k, alpha, epsilon, tau = chosen.settings
    return FusedPolicy(
        k=k,
        alpha=alpha,
        epsilon=epsilon,
        bias=bias.tolist(),
        loo_accuracy=chosen.accuracy,
        loo_mean_exit=chosen.mean_exit,
        loo_queries=len(queries),
        tau=tau,
        metric=metric_name,
        loo_metric=chosen.score,
        loo_groups=group_count(groups),
    )
