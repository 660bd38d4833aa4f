"""Settings of the probe strategies, fitted by build-db on the reference rows only (leave-one-out, task metric).

`probe-fused` (the default): a row's neighbours' out-of-fold probe accuracy curve picks the earliest layer within
epsilon of their best; a row leaves before it at the first layer whose probe is at least t confident; a row runs
no layer at all when its key probe mixed with the neighbours' label vote is at least tau confident. `probe-conf`:
no retrieval, the first layer whose probe is at least conf_t confident.

Both take the setting whose leave-one-out score, less `layer_price` for each share of the layers it runs on average
(exit 0 counting as none), is highest, among those within `layer_budget` of the layers (the cheapest among equals). The
price is the product's exchange rate between compute and the task's metric, a user setting (build-db --layer-price,
default DEFAULT_LAYER_PRICE: a tenth of the layers must buy a point of the metric); the budget a hard cap (build-db
--layer-budget, default none). A price spends layers where they pay: on a task whose answer only forms deep in the
backbone (SmolLM2's NLI pairs: best probe at about two thirds of the layers) it runs deeper, on one the first layers
already answer it runs less, where a fixed budget cut every task at the same share. The default price was set on
reference rows only: over the 24 reference tables of the quality bench (8 tasks, 3 presets), it is the smallest round
price whose choices run at most 35% of the layers on average, the product's cost target (on those tables' left-out
reference rows 0.1 ran 32%, 0.05 40%). Not the zero-shot fused policy's one-standard-error rule: fitting on one half of
the sst2 and trec reference rows and scoring on the other (SmolLM2, 500 rows, 20 splits; reference rows only), one SE
gave up 3-4 points against the best setting to save a fifth of the layers. Leave-one-out mean exits matched the exits
measured on held-out rows within about a layer in the benchmark, so the cost holds where it is spent.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, NamedTuple

import numpy as np

from raee_ops.calibration import (
    EPSILON_GRID,
    K_GRID,
    C,
    Trial,
    earliest_within,
    frontier,
    group_count,
    label_vote,
    left_out,
    loo_neighbours,
    loo_queries,
    mix,
    neighbour_accuracy,
    neighbour_depths,
    not_before_key,
    reaches,
    scored_trials,
    within_budget,
)
from raee_ops.errors import RaeeConfigError
from raee_ops.metrics import METRICS, accuracy, scores

ALPHA_GRID = (0.0, 0.25, 0.5)  # weight of the neighbours' vote in the answer at a layer
BETA_GRID = (0.0, 0.5, 1.0)  # weight of the vote in the exit-0 answer; the rest is the key probe's
TAU_GRID = (0.7, 0.8, 0.9, 0.95, None)  # None: every row runs at least one layer
T_GRID = (0.8, 0.9, 0.95, 0.99, None)  # None: no confidence exit before the retrieval-picked layer
#: Weight of the neighbours' accuracy curve against the whole reference's (shrinkage: ten neighbours' curve is noisy;
#: 0 exits every row at the reference's own earliest layer within epsilon of its best, i.e. probe-best at 0).
SHRINK_GRID = (0.0, 0.5, 1.0)
#: Share of the layers the fitted settings may run on average on the reference rows (see the module docstring).
DEFAULT_LAYER_BUDGET = 1.0
#: Metric a setting must gain for running all the layers on average rather than none (see the module docstring).
DEFAULT_LAYER_PRICE = 0.1
#: Budgets (at the table's price) and prices (within the table's budget) evaluate scores the default at and info
#: lists, besides the table's own (any other may be asked for).
SHOWN_BUDGETS = (0.1, 0.2, 0.35, 0.5, 0.75, 1.0)
SHOWN_PRICES = (0.0, 0.05, 0.1, 0.2, 0.3)
NEVER_CONFIDENT = 1.01  # a probe-conf threshold no probability reaches: every row leaves at the last layer
CONF_GRID = (0.6, 0.7, 0.8, 0.9, 0.95, 0.99, NEVER_CONFIDENT)


#: The probe-fused settings in the order a Point stores them.
SETTING_NAMES = ("k", "shrink", "epsilon", "alpha", "beta", "tau", "t")


#: Folds and shuffles of the left-out reference rows behind a fit's Estimate.
ESTIMATE_FOLDS, ESTIMATE_SHUFFLES = 5, 2


class Estimate(NamedTuple):
    """The default's choice and probe-best's layer, each made as build-db makes it on ESTIMATE_FOLDS - 1 folds of the
    left-out reference rows and scored on the other fold (the mean over every fold of ESTIMATE_SHUFFLES shuffles).
    build-db's own score of the default is that of the best of ~13,500 settings on the rows that chose it, so it
    flatters the default; probe-best's out-of-fold score is the best of a few dozen layers, much less so. This
    scores both choices alike (bench/nested.py: on the quality bench it never favoured the default, and came nearer
    the gap on scored rows than build-db's own numbers on two presets of three)."""

    metric: float  # the default's task metric
    mean_exit: float  # the layers its choices ran on average (exit 0 counting as none)
    probe_best: float  # probe-best's task metric


class Point(NamedTuple):
    """A setting on a fit's cost/score frontier, as the table stores it: its leave-one-out mean exit layer, metric
    and accuracy, and the settings (probe-fused: k, shrink, epsilon, alpha, beta, tau, t; probe-conf: conf_t)."""

    mean_exit: float
    score: float
    accuracy: float
    settings: tuple


def _points(trials: list[Trial], settings: Callable[[Any], tuple] = tuple) -> tuple[Point, ...]:
    """The frontier of a fit's trials, as the table stores it."""
    return tuple(Point(t.mean_exit, t.score, t.accuracy, settings(t.settings)) for t in frontier(trials))


def _shown(threshold: float | None) -> float | str:
    """A confidence threshold as printed: `never` for one no row reaches."""
    return "never" if threshold in (None, NEVER_CONFIDENT) else threshold


@dataclass(frozen=True)
class ProbePolicy:
    k: int
    epsilon: float
    alpha: float
    beta: float
    tau: float | None
    t: float | None
    conf_t: float
    metric: str
    loo_queries: int
    loo_metric: float
    loo_accuracy: float
    loo_mean_exit: float
    conf_metric: float
    conf_mean_exit: float
    shrink: float = 1.0  # tables built before the shrinkage existed used the neighbours' curve alone
    curve: tuple[float, ...] | None = None  # the whole reference's out-of-fold probe accuracy per layer
    layer_budget: float | None = None  # the share of layers the settings were chosen within (None: older tables)
    layer_price: float = 0.0  # the metric each share of the layers cost in that choice (0: older tables' rule)
    loo_groups: int | None = None  # reference groups left out whole (build-db --group-column); None: single rows
    #: The fits' cost/score frontiers (probe-fused, probe-conf), cheapest first; None: tables built before them.
    frontier: tuple[Point, ...] | None = None
    conf_frontier: tuple[Point, ...] | None = None
    #: The metric and accuracy of answering every left-out reference row with the reference's most common label
    #: (None: tables built before they were kept).
    floor: tuple[float, float] | None = None
    #: The chosen settings scored no better than that floor on the left-out reference rows: probe-fused answers every
    #: row with that label at exit 0 (the cheapest among equals: what it reads does not predict these labels, as on
    #: WNLI's flipped pairs), and the loo_* fields are the floor's.
    majority: bool = False
    #: The choice cross-validated on the reference rows (None: tables built before it, or another cost's settings).
    estimate: Estimate | None = None

    def __post_init__(self) -> None:  # read back from JSON, the tuples are lists
        if self.estimate is not None:
            object.__setattr__(self, "estimate", Estimate(*self.estimate))
        if self.curve is not None:
            object.__setattr__(self, "curve", tuple(self.curve))
        if self.floor is not None:
            object.__setattr__(self, "floor", tuple(self.floor))
        for name in ("frontier", "conf_frontier"):
            points = getattr(self, name)
            if points is not None:
                object.__setattr__(self, name, tuple(Point(m, s, a, tuple(st)) for m, s, a, st in points))

    def to_dict(self) -> dict:
        """Plain JSON values (the tuples as lists), as the table stores them and reports show them."""
        return json.loads(json.dumps(asdict(self)))

    def shown_costs(self) -> list[ProbePolicy]:
        """The settings at each of SHOWN_BUDGETS, then of SHOWN_PRICES (none for tables built before frontiers)."""
        if self.frontier is None:
            return []
        return [self.within(budget) for budget in SHOWN_BUDGETS] + [self.within(layer_price=p) for p in SHOWN_PRICES]

    def by_budget(self) -> list[dict[str, float]]:
        """The default's leave-one-out score and mean exit at each of shown_costs (none for older tables)."""
        return [
            {
                "layer_budget": p.layer_budget,
                "layer_price": p.layer_price,
                "metric": p.loo_metric,
                "mean_exit": p.loo_mean_exit,
            }
            for p in self.shown_costs()
        ]

    def within(self, layer_budget: float | None = None, layer_price: float | None = None) -> ProbePolicy:
        """The settings build-db fits with `layer_budget` and `layer_price` (None: the table's): another cost target
        for one run, chosen from the stored frontiers with no refit."""
        if self.frontier is None or self.conf_frontier is None or self.curve is None:
            raise RaeeConfigError("this table stores no settings for other layer budgets: rebuild it with build-db")
        own_budget = 1.0 if self.layer_budget is None else self.layer_budget
        budget = own_budget if layer_budget is None else layer_budget
        price = self.layer_price if layer_price is None else layer_price
        point, conf = (choose(front, budget, price, len(self.curve)) for front in (self.frontier, self.conf_frontier))
        own = (budget, price) == (own_budget, self.layer_price)  # the estimate is of the table's own cost's choice
        chosen = _chosen(point, conf, self.floor)
        return replace(self, **chosen, layer_budget=budget, layer_price=price, estimate=self.estimate if own else None)

    def best_elsewhere(self) -> float | None:
        """Where the chosen settings answer the most common label but settings at another layer budget or price
        scored better than it: the best of them (their cost, not the data, ruled them out). None otherwise."""
        if not self.majority or self.frontier is None or self.floor is None:
            return None
        best = max(point.score for point in self.frontier)
        return best if best > self.floor[0] else None

    def settings(self) -> str:
        majority = ""
        if self.majority:
            why = "these settings did no better" if self.best_elsewhere() is None else "at this cost nothing did better"
            majority = f"; answers every row with the most common label: {why}"
        tau, t, conf_t = (_shown(value) for value in (self.tau, self.t, self.conf_t))
        return (
            f"k={self.k} shrink={self.shrink} epsilon={self.epsilon} alpha={self.alpha} beta={self.beta} "
            f"tau={tau} t={t}; probe-conf t={conf_t}; {self._cost()}{majority}"
        )

    def estimate_line(self) -> str | None:
        """The Estimate as build-db and info print it (None where the table keeps none)."""
        e = self.estimate
        if e is None:
            return None
        gap = 100 * (e.probe_best - e.metric)
        advice = "; classify --strategy probe-best where accuracy matters more than cost" if gap > 1 else ""
        return (
            f"the default's choice cross-validated on the reference rows (made on {ESTIMATE_FOLDS - 1} of "
            f"{ESTIMATE_FOLDS} folds of them, scored on the other; {ESTIMATE_SHUFFLES} shuffles): {self.metric} "
            f"{e.metric:.3f}, mean exit layer {e.mean_exit:.2f}; probe-best chosen alike {e.probe_best:.3f} "
            f"({gap:+.1f} points){advice}"
        )

    def conf_settings(self) -> str:
        """probe-conf's one setting, as classify prints it: it reads none of the others."""
        return f"t={_shown(self.conf_t)}; {self._cost()}"

    def _cost(self) -> str:
        return f"layer budget {self.layer_budget}, layer price {self.layer_price}"

    def validation(self) -> str:
        return left_out(self.loo_queries, self.loo_groups)

    def exit_curve(self, neighbours_curve: np.ndarray) -> np.ndarray:
        """B×L accuracy curve the exit is picked on: the neighbours' shrunk toward the whole reference's."""
        if self.curve is None or self.shrink == 1.0:
            return neighbours_curve
        return shrunk(neighbours_curve, np.asarray(self.curve), self.shrink)


def shrunk(neighbours_curve: np.ndarray, reference_curve: np.ndarray, shrink: float) -> np.ndarray:
    """B×L: each row's neighbours' accuracy curve moved toward the whole reference's L (weight 1 - shrink)."""
    return shrink * neighbours_curve + (1.0 - shrink) * reference_curve[None, :]


def confident_exits(confidence: np.ndarray, upper: np.ndarray, t: float | None, key_depth: int = 0) -> np.ndarray:
    """First 1-based layer from `key_depth` up to each row's `upper` exit whose probe confidence (N×L top
    probability) reaches t; rows never that confident leave at `upper` (0 stays 0). The runtime's stop rule, on
    precomputed arrays: on a layer-N table rows start at N, after the layers of their key, so a row confident only
    before N runs on, as classify runs it (0: no layer key, every layer is checked)."""
    upper = np.asarray(upper, np.int32)
    if t is None:
        return upper
    layers = np.arange(1, confidence.shape[1] + 1)
    ok = reaches(confidence, t) & (layers[None, :] <= upper[:, None]) & (layers[None, :] >= key_depth)
    return np.where(ok.any(axis=1), np.argmax(ok, axis=1) + 1, upper).astype(np.int32)


class Found(NamedTuple):
    """What the probe-fused rule reads of Q rows: their own probes (Q×L×C probabilities) and key probe (Q×C), and
    their nearest reference rows' labels (Q×k), similarities (Q×k) and out-of-fold probe correctness (Q×k×L)."""

    probs: np.ndarray
    key_probs: np.ndarray
    labels: np.ndarray
    similarity: np.ndarray
    correct: np.ndarray


def fused_trials(
    found: Found,
    reference_curve: np.ndarray,
    truth: np.ndarray,
    metric_name: str,
    num_labels: int,
    ks: Sequence[int] = K_GRID,
    key_depth: int = 0,
) -> list[Trial]:
    """Every probe-fused setting's answers and mean exit on these rows, scored against `truth`: on the reference
    rows left out, what build-db fits on; on labelled rows, what evaluate's hindsight bound reads."""
    rows = np.arange(len(truth))
    confidence = found.probs.max(axis=2)
    grid = []
    for k in ks:
        neighbours_curve = neighbour_accuracy(found.correct[:, :k], found.similarity[:, :k])
        vote = label_vote(found.labels[:, :k], found.similarity[:, :k], num_labels)
        at_zero = {beta: mix(found.key_probs, vote, beta) for beta in BETA_GRID}
        for shrink, epsilon, t in itertools.product(SHRINK_GRID, EPSILON_GRID, T_GRID):
            curve = shrunk(neighbours_curve, reference_curve, shrink)
            upper = earliest_within(curve, epsilon)
            exits = not_before_key(confident_exits(confidence, upper, t, key_depth), key_depth)
            at_exit = found.probs[rows, exits - 1]
            answers = {alpha: mix(at_exit, vote, alpha).argmax(axis=1) for alpha in ALPHA_GRID}
            for alpha, beta, tau in itertools.product(ALPHA_GRID, BETA_GRID, TAU_GRID):
                zero = np.zeros(len(rows), bool) if tau is None else reaches(at_zero[beta].max(axis=1), tau)
                pred = np.where(zero, at_zero[beta].argmax(axis=1), answers[alpha])
                cost = float(np.where(zero, key_depth, exits).mean())
                grid.append(((k, shrink, epsilon, alpha, beta, tau, t), pred, cost))
    return scored_trials(grid, truth, metric_name, num_labels)


class LeftOut(NamedTuple):
    """The probe-fused grid on the reference rows left out one at a time (or by group), as build-db fits it: the rows
    scored (`queries`, their labels `truth`), their own out-of-fold probes (Q×L×C), the whole reference's out-of-fold
    probe accuracy per layer, and every setting's Trial."""

    queries: np.ndarray
    truth: np.ndarray
    probs: np.ndarray
    curve: np.ndarray
    trials: list[Trial]


def reference_trials(
    vectors: np.ndarray,
    labels: np.ndarray,
    probe_logprobs: np.ndarray,
    key_logprobs: np.ndarray,
    metric_name: str,
    seed: int = 0,
    groups: np.ndarray | None = None,
    key_depth: int = 0,
) -> LeftOut:
    """Every probe-fused setting scored on the reference rows left out (fit_probe_policy's arguments)."""
    n, _, num_labels = probe_logprobs.shape
    queries = loo_queries(n, np.random.default_rng(seed))
    truth = labels[queries]
    probs = np.exp(probe_logprobs[queries])  # Q×L×C, each query's own out-of-fold probes
    correct = probe_logprobs.argmax(axis=2) == labels[:, None]
    curve = correct.mean(axis=0)
    ks = neighbour_depths(n)
    top, sims = loo_neighbours(vectors, queries, max(ks), groups)
    found = Found(probs, np.exp(key_logprobs[queries]), labels[top], sims, correct[top])
    trials = fused_trials(found, curve, truth, metric_name, num_labels, ks, key_depth)
    return LeftOut(queries, truth, probs, curve, trials)


def estimate_splits(rows: int, groups: np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(rows to choose on, rows to score on): ESTIMATE_FOLDS folds of each of ESTIMATE_SHUFFLES shuffles; with
    `groups` (one per row), each group whole in one fold."""
    index = np.arange(rows) if groups is None else np.unique(groups, return_inverse=True)[1]
    out = []
    for seed in range(ESTIMATE_SHUFFLES):
        fold = np.random.default_rng(seed).permutation(index.max() + 1 if rows else 0)[index] % ESTIMATE_FOLDS
        out += [(fold != k, fold == k) for k in range(ESTIMATE_FOLDS)]
    return out


def estimate(
    left: LeftOut,
    num_labels: int,
    metric_name: str,
    layer_budget: float,
    layer_price: float,
    majority_label: int,
    groups: np.ndarray | None = None,
) -> Estimate | None:
    """The Estimate of a fit's choice from its left-out rows' trials: settings chosen at the fit's budget and price,
    falling back to `majority_label` where they score no better than it, as build-db chooses; probe-best's layer
    the best on the same rows. `groups`: the left-out rows' groups, each kept in one fold. None with fewer rows (or
    groups) than folds."""
    splits = estimate_splits(len(left.truth), groups)
    if any(not scored.any() for _, scored in splits):
        return None
    metric = METRICS[metric_name]
    answers = np.array([t.pred for t in left.trials], np.int16)  # settings × rows, as scored_trials counts them
    layer_answers = left.probs.argmax(axis=2).T  # layers × rows
    majority = np.full(len(left.truth), majority_label)
    default, depth, best = [], [], []
    for fit, scored in splits:
        truth = left.truth[fit]
        on_fit = scores(metric_name, truth, answers[:, fit], num_labels)
        trials = [
            Trial(float(v), 0.0, t.mean_exit, t.settings, a)
            for v, t, a in zip(on_fit, left.trials, answers, strict=True)
        ]
        pick = choose(frontier(trials), layer_budget, layer_price, len(layer_answers))
        pred, cost = pick.pred, pick.mean_exit
        if pick.score <= metric(truth, majority[fit], num_labels):
            pred, cost = majority, 0.0
        default.append(metric(left.truth[scored], pred[scored], num_labels))
        depth.append(cost)
        layer = int(np.argmax(scores(metric_name, truth, layer_answers[:, fit], num_labels)))
        best.append(metric(left.truth[scored], layer_answers[layer, scored], num_labels))
    return Estimate(float(np.mean(default)), float(np.mean(depth)), float(np.mean(best)))


def fit_probe_policy(
    vectors: np.ndarray,
    labels: np.ndarray,
    probe_logprobs: np.ndarray,
    key_logprobs: np.ndarray,
    num_labels: int,
    metric_name: str,
    seed: int = 0,
    layer_budget: float = DEFAULT_LAYER_BUDGET,
    groups: np.ndarray | None = None,
    key_depth: int = 0,
    layer_price: float = DEFAULT_LAYER_PRICE,
) -> ProbePolicy:
    """vectors N×D normalized, labels N, probe_logprobs N×L×C and key_logprobs N×C out of fold (out of group
    with `groups`, N ints: rows of a query's group are never its neighbours). `key_depth`: a layer key's N, which
    every row runs (exit 0 included) and leaves at the earliest, as classify runs it."""
    metric = METRICS[metric_name]
    num_layers = probe_logprobs.shape[1]
    left_out = reference_trials(vectors, labels, probe_logprobs, key_logprobs, metric_name, seed, groups, key_depth)
    queries, truth, probs, reference_curve, trials = left_out
    confidence = probs.max(axis=2)
    front = _points(trials)
    chosen = choose(front, layer_budget, layer_price, num_layers)

    conf_trials, rows = [], np.arange(len(queries))
    for conf_t in CONF_GRID:
        exits = confident_exits(confidence, np.full(len(rows), num_layers), conf_t)
        pred = probs[rows, exits - 1].argmax(axis=1)
        conf_trials.append(
            Trial(metric(truth, pred, num_labels), accuracy(truth, pred), float(exits.mean()), conf_t, pred)
        )
    conf_front = _points(conf_trials, lambda conf_t: (conf_t,))
    conf = choose(conf_front, layer_budget, layer_price, num_layers)
    # every row's label, as build-db's ProbeSet.label_counts counts them: the label the fall-back answers
    majority = np.full(len(truth), np.bincount(labels, minlength=num_labels).argmax())
    floor = (float(metric(truth, majority, num_labels)), float(accuracy(truth, majority)))
    query_groups = None if groups is None else groups[queries]
    cross_validated = estimate(
        left_out, num_labels, metric_name, layer_budget, layer_price, int(majority[0]), query_groups
    )
    return ProbePolicy(
        **_chosen(chosen, conf, floor),
        metric=metric_name,
        loo_queries=len(queries),
        curve=tuple(round(float(x), 6) for x in reference_curve),
        layer_budget=layer_budget,
        layer_price=layer_price,
        loo_groups=group_count(groups),
        frontier=front,
        conf_frontier=conf_front,
        floor=floor,
        estimate=cross_validated,
    )


#: Random halvings of the scored rows for the hindsight bound's held-out estimate, each used both ways.
HALVINGS = 20


class Hindsight(NamedTuple):
    """The default's grid on labelled rows, within the policy's layer budget and at its price. `best`: the setting
    that scores best (less the price of its layers) on all of them, chosen on those same rows: an upper bound, and
    an optimistic one, since the best of thousands of settings on a few hundred rows is partly luck. `held_out`: a
    setting chosen the same way on one random half of the rows, scored on the other half (the mean over HALVINGS
    halvings, both ways): what choosing on rows of the scored distribution is worth on rows the choice did not see.
    `default_held_out`: the fitted default scored on the same halves, which is what `held_out` compares with. Both
    None on a single row, which has no halves."""

    best: Point
    held_out: float | None
    default_held_out: float | None


def hindsight(
    found: Found,
    policy: ProbePolicy,
    truth: np.ndarray,
    default_pred: np.ndarray,
    metric_name: str,
    ks: Sequence[int],
    key_depth: int = 0,
    seed: int = 0,
) -> Hindsight | None:
    """The default's grid chosen on these labelled rows as build-db chooses (Hindsight), against the
    default's own answers `default_pred`. None for tables built before policies kept their reference curve and
    budget."""
    num_layers = found.probs.shape[1]
    if policy.curve is None or policy.layer_budget is None:
        return None
    metric = METRICS[metric_name]
    num_labels = found.probs.shape[2]
    trials = fused_trials(found, np.asarray(policy.curve), truth, metric_name, num_labels, ks, key_depth)
    affordable = [t for t in trials if t.mean_exit <= policy.layer_budget * num_layers + 1e-9]
    if not affordable:  # a layer key deeper than the budget: every setting costs more; the cheapest
        affordable = [min(trials, key=lambda t: t.mean_exit)]
    best = choose(frontier(affordable), 1.0, policy.layer_price, num_layers)
    # one candidate per distinct answer vector at the cost of its cheapest setting, cheapest first (argmax keeps the
    # first of equal values)
    distinct = {t.pred.tobytes(): t for t in sorted(affordable, key=lambda t: -t.mean_exit)}
    candidates = sorted(distinct.values(), key=lambda t: t.mean_exit)
    answers = np.array([t.pred for t in candidates], np.int16)  # candidates × rows
    price = policy.layer_price / num_layers * np.array([t.mean_exit for t in candidates])
    picked, default = [], []
    for fit, scored in _halvings(len(truth), seed):
        choice = answers[int(np.argmax(scores(metric_name, truth[fit], answers[:, fit], num_labels) - price))]
        picked.append(metric(truth[scored], choice[scored], num_labels))
        default.append(metric(truth[scored], default_pred[scored], num_labels))
    held_out, default_held_out = (float(np.mean(m)) if m else None for m in (picked, default))
    return Hindsight(Point(best.mean_exit, best.score, best.accuracy, best.settings), held_out, default_held_out)


def _halvings(rows: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(rows to choose on, rows to score on): HALVINGS random halvings, each both ways; none of a single row, whose
    halves would hold no row."""
    rng = np.random.default_rng(seed)
    out: list[tuple[np.ndarray, np.ndarray]] = []
    if rows < 2:
        return out
    for _ in range(HALVINGS):
        order = rng.permutation(rows)
        first, second = np.sort(order[: rows // 2]), np.sort(order[rows // 2 :])
        out += [(first, second), (second, first)]
    return out


def choose(front: Sequence[C], layer_budget: float, layer_price: float, num_layers: int) -> C:
    """The point of `front` a budget (share of the layers) and a price (metric per share) choose."""
    return within_budget(front, layer_budget * num_layers, layer_price / num_layers)


def _chosen(point: Point, conf: Point, floor: tuple[float, float] | None) -> dict[str, Any]:
    """A policy's fields set by the frontier points chosen for probe-fused and probe-conf, and whether probe-fused
    answers the most common label instead (its point scoring no better than that `floor`: metric, accuracy)."""
    k, shrink, epsilon, alpha, beta, tau, t = point.settings
    majority = floor is not None and point.score <= floor[0]
    score, accuracy_, mean_exit = (*floor, 0.0) if majority else (point.score, point.accuracy, point.mean_exit)
    return {
        "k": int(k),
        "shrink": shrink,
        "epsilon": epsilon,
        "alpha": alpha,
        "beta": beta,
        "tau": tau,
        "t": t,
        "conf_t": conf.settings[0],
        "loo_metric": score,
        "loo_accuracy": accuracy_,
        "loo_mean_exit": mean_exit,
        "conf_metric": conf.score,
        "conf_mean_exit": conf.mean_exit,
        "majority": majority,
    }


def budgeted(
    policy: ProbePolicy | None, layer_budget: float | None, layer_price: float | None = None
) -> ProbePolicy | None:
    """The table's probe policy, or with a run's --layer-budget or --layer-price the settings the table keeps for
    them (the other one the table's)."""
    if policy is None or (layer_budget is None and layer_price is None):
        return policy
    return policy.within(layer_budget, layer_price)


def refuse_cost_options(
    strategies: Sequence[str], applies: bool, layer_budget: float | None, layer_price: float | None
) -> None:
    """A run's --layer-budget or --layer-price given where none of its `strategies` has a cost (`applies`) is
    refused."""
    whose = f"{strategies[0]!r} has none" if len(strategies) == 1 else f"none of {', '.join(strategies)} has one"
    for option, value in (("--layer-budget", layer_budget), ("--layer-price", layer_price)):
        if value is not None and not applies:
            raise RaeeConfigError(f"{option} sets probe-fused's and probe-conf's cost; {whose}")
