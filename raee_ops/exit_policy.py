"""Exit strategies: neighbours' exit information (B×k×L booleans) -> one 1-based exit layer per input.

Each strategy is one function in `STRATEGIES`; `layer:N` is parsed by `resolve`. Strategies never run the
model, so they are tested on hand-made matrices.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np

from raee_ops.errors import RaeeConfigError

#: (layer_correct B×k×L bool, num_layers) -> exit layers B, 1-based.
StrategyFn = Callable[[np.ndarray, int], np.ndarray]


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


def raee(correct: np.ndarray, num_layers: int) -> np.ndarray:
    """The paper: P(l) ∝ Σ_j c_j(l)/|c_j|, each neighbour spreading one vote over its correct layers."""
    return _argmax_exit(_votes(correct, num_layers, normalize=True))


def raee_counts(correct: np.ndarray, num_layers: int) -> np.ndarray:
    """Unnormalized variant: every correct (neighbour, layer) pair counts one."""
    return _argmax_exit(_votes(correct, num_layers, normalize=False))


def full(correct: np.ndarray, num_layers: int) -> np.ndarray:
    """No early exit: the last layer, the baseline RAEE is compared against."""
    return np.full(len(correct), num_layers, dtype=np.int32)


def fixed_layer(layer: int, correct: np.ndarray, num_layers: int) -> np.ndarray:
    """`layer:N`: every input exits at layer N, for sweeps over static exits."""
    return np.full(len(correct), layer, dtype=np.int32)


STRATEGIES: dict[str, StrategyFn] = {"raee": raee, "raee-counts": raee_counts, "full": full}


@dataclass(frozen=True)
class Strategy:
    name: str
    fn: StrategyFn
    needs_retrieval: bool

    def exits(self, correct: np.ndarray, num_layers: int) -> np.ndarray:
        return self.fn(correct, num_layers)


def resolve(name: str, num_layers: int) -> Strategy:
    """A strategy by name, `layer:N` (1-based) included; an unknown name is a run-level error."""
    if name.startswith("layer:"):
        raw = name.split(":", 1)[1]
        if not raw.isdigit() or not 1 <= int(raw) <= num_layers:
            raise RaeeConfigError(f"strategy {name!r}: N must be an integer in 1..{num_layers}")
        return Strategy(name, partial(fixed_layer, int(raw)), False)
    if name not in STRATEGIES:
        raise RaeeConfigError(f"unknown strategy {name!r}; choose {', '.join(STRATEGIES)} or layer:N")
    return Strategy(name, STRATEGIES[name], name != "full")
