"""Exit strategies: what retrieval found -> one 1-based exit layer per input, and how to answer there.

Exit 0 means the row is answered from retrieval alone and runs no layer (only `fused` does this).

A strategy is two small functions: `exits` picks the layer before any layer runs (from the neighbours only),
`answer` turns the head's logits at that layer into label probabilities (optionally with the neighbours).
Each strategy is one entry in `STRATEGIES`; `layer:N` is parsed by `resolve`. Strategies never run the model,
so they are tested on hand-made arrays. The paper's rule stays unchanged as `raee`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np

from raee_ops.calibration import (
    FusedPolicy,
    calibrated_correct,
    earliest_within,
    fuse,
    label_vote,
    neighbour_accuracy,
    retrieval_only,
    softmax,
)
from raee_ops.errors import RaeeConfigError

DEFAULT_STRATEGY = "fused"


@dataclass(frozen=True)
class Neighbours:
    """The k nearest reference rows of B inputs, nearest first."""

    correct: np.ndarray  # B×k×L bool, as stored by build-db
    similarity: np.ndarray  # B×k cosine similarity
    labels: np.ndarray  # B×k int
    logprobs: np.ndarray  # B×k×L×C

    def top(self, k: int) -> Neighbours:
        return Neighbours(self.correct[:, :k], self.similarity[:, :k], self.labels[:, :k], self.logprobs[:, :k])

    @classmethod
    def none(cls, rows: int, num_layers: int, num_labels: int) -> Neighbours:
        return cls(
            np.zeros((rows, 0, num_layers), bool),
            np.zeros((rows, 0), np.float32),
            np.zeros((rows, 0), np.int64),
            np.zeros((rows, 0, num_layers, num_labels), np.float32),
        )


@dataclass(frozen=True)
class Context:
    num_layers: int
    num_labels: int
    k: int  # neighbours for the paper's rules (--k)
    policy: FusedPolicy | None = None  # fitted on the reference table by build-db

    def fitted(self) -> FusedPolicy:
        if self.policy is None:
            raise RaeeConfigError("this table has no fitted policy: rebuild it with this version's build-db")
        return self.policy


ExitFn = Callable[[Neighbours, Context], np.ndarray]
AnswerFn = Callable[[np.ndarray, np.ndarray, Neighbours, Context], np.ndarray]


def _votes(correct: np.ndarray, num_layers: int, normalize: bool) -> np.ndarray:
    """B×L layer votes; a neighbour correct nowhere votes for the last layer, as does having no neighbours."""
    correct = np.asarray(correct, dtype=np.float64).reshape(correct.shape[0], -1, num_layers)
    hits = correct.sum(axis=2, keepdims=True)
    weights = correct / np.maximum(hits, 1.0) if normalize else correct
    votes = weights.sum(axis=1)
    votes[:, -1] += (hits[..., 0] == 0).sum(axis=1)
    votes[votes.sum(axis=1) == 0, -1] = 1.0  # no neighbours at all (empty table): do not exit early
    return votes


def _argmax_exit(votes: np.ndarray) -> np.ndarray:
    # np.argmax returns the first maximum: ties go to the earlier (cheaper) layer.
    return (np.argmax(votes, axis=1) + 1).astype(np.int32)


def raee(nb: Neighbours, ctx: Context) -> np.ndarray:
    """The paper: P(l) ∝ Σ_j c_j(l)/|c_j|, each neighbour spreading one vote over its correct layers."""
    return _argmax_exit(_votes(nb.top(ctx.k).correct, ctx.num_layers, normalize=True))


def raee_counts(nb: Neighbours, ctx: Context) -> np.ndarray:
    """Unnormalized variant: every correct (neighbour, layer) pair counts one."""
    return _argmax_exit(_votes(nb.top(ctx.k).correct, ctx.num_layers, normalize=False))


def raee_calibrated(nb: Neighbours, ctx: Context) -> np.ndarray:
    """The paper's rule on correctness recomputed through the per-layer bias correction."""
    top = nb.top(ctx.k)
    correct = calibrated_correct(top.logprobs, top.labels, ctx.fitted().bias_array)
    return _argmax_exit(_votes(correct, ctx.num_layers, normalize=True))


def fused_exit(nb: Neighbours, ctx: Context) -> np.ndarray:
    """Cost-aware: 0 (no layer at all) where the neighbours' label vote reaches the fitted agreement tau,
    else the earliest layer whose similarity-weighted calibrated neighbour accuracy is within the fitted
    epsilon of the best layer's."""
    policy = ctx.fitted()
    top = nb.top(policy.k)
    if top.labels.shape[1] == 0:
        return np.full(len(top.labels), ctx.num_layers, np.int32)
    correct = calibrated_correct(top.logprobs, top.labels, policy.bias_array)
    exits = earliest_within(neighbour_accuracy(correct, top.similarity), policy.epsilon)
    vote = label_vote(top.labels, top.similarity, ctx.num_labels)
    return np.where(retrieval_only(vote, policy.tau), 0, exits).astype(np.int32)


def full(nb: Neighbours, ctx: Context) -> np.ndarray:
    """No early exit: the last layer, the baseline RAEE is compared against."""
    return np.full(len(nb.correct), ctx.num_layers, dtype=np.int32)


def fixed_layer(layer: int, nb: Neighbours, ctx: Context) -> np.ndarray:
    """`layer:N`: every input exits at layer N, for sweeps over static exits."""
    return np.full(len(nb.correct), layer, dtype=np.int32)


def head_answer(logits: np.ndarray, exits: np.ndarray, nb: Neighbours, ctx: Context) -> np.ndarray:
    """The exit layer's head as it is."""
    return softmax(logits)


def calibrated_answer(logits: np.ndarray, exits: np.ndarray, nb: Neighbours, ctx: Context) -> np.ndarray:
    """The exit layer's head with that layer's label-bias correction."""
    return softmax(logits + ctx.fitted().bias_array[exits - 1])


def fused_answer(logits: np.ndarray, exits: np.ndarray, nb: Neighbours, ctx: Context) -> np.ndarray:
    """Calibrated head mixed with the neighbours' similarity-weighted label vote (fitted weight); rows that
    ran no layer (exit 0) answer with the vote alone."""
    policy = ctx.fitted()
    top = nb.top(policy.k)
    calibrated = logits + policy.bias_array[np.maximum(exits, 1) - 1]
    if top.labels.shape[1] == 0:
        return softmax(calibrated)
    vote = label_vote(top.labels, top.similarity, ctx.num_labels)
    return np.where((exits == 0)[:, None], vote, fuse(calibrated, vote, policy.alpha))


@dataclass(frozen=True)
class Strategy:
    name: str
    exits: ExitFn
    answer: AnswerFn = head_answer
    needs_retrieval: bool = True
    needs_policy: bool = False

    def neighbours(self, ctx: Context) -> int:
        """How many neighbours to fetch for this strategy."""
        if not self.needs_retrieval:
            return 0
        return ctx.fitted().k if self.needs_policy else ctx.k


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in [
        Strategy("raee", raee),
        Strategy("raee-counts", raee_counts),
        Strategy("full", full, needs_retrieval=False),
        Strategy("full-cal", full, calibrated_answer, needs_retrieval=False, needs_policy=True),
        Strategy("raee-cal", raee_calibrated, calibrated_answer, needs_policy=True),
        Strategy("fused", fused_exit, fused_answer, needs_policy=True),
    ]
}


def resolve(name: str | None, num_layers: int) -> Strategy:
    """A strategy by name (None: the default), `layer:N` (1-based) included; unknown names are run-level
    errors."""
    name = name or DEFAULT_STRATEGY
    if name.startswith("layer:"):
        raw = name.split(":", 1)[1]
        if not raw.isdigit() or not 1 <= int(raw) <= num_layers:
            raise RaeeConfigError(f"strategy {name!r}: N must be an integer in 1..{num_layers}")
        return Strategy(name, partial(fixed_layer, int(raw)), needs_retrieval=False)
    if name not in STRATEGIES:
        raise RaeeConfigError(f"unknown strategy {name!r}; choose {', '.join(STRATEGIES)} or layer:N")
    return STRATEGIES[name]
