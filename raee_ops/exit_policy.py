"""Exit strategies: what retrieval found -> one 1-based exit layer per input, and how to answer there.

Exit 0 means the row is answered without an exit layer: from its key and neighbours (`fused`, `probe-fused`, and
the baselines `key-lr` and `knn-vote`) or from the label prior (`majority`); it runs no layer beyond those of a
`layer-N` key, which every row runs.

A strategy is mainly two small functions: `exits` picks the layer before any layer runs (from the neighbours only),
`answer` turns what is read at that layer into label probabilities (optionally with the neighbours); its other
fields say what it needs (neighbours, probes, a fitted policy) and reads. It reads
either the label-word head (`reads="head"`), the layer's probe head (`reads="probe"`, raee_ops.probes) or no layer
at all (`reads="none"`: the baselines answered from retrieval alone); a
`stop` threshold lets a row leave before its exit where its probe is that confident. Each strategy is one entry
in `STRATEGIES`; `layer:N` and `probe:N` are parsed by `resolve`. Strategies never run the model, so they are
tested on hand-made arrays. The paper's rule stays unchanged as `raee`.
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
    mix,
    neighbour_accuracy,
    reaches,
    retrieval_only,
    softmax,
)
from raee_ops.errors import RaeeConfigError
from raee_ops.probe_policy import ProbePolicy
from raee_ops.probes import ProbeSet

DEFAULT_STRATEGY = "probe-fused"
#: Neighbours a run reads where its strategy takes --k and none is given.
DEFAULT_K = 10


def check_k(k: int) -> None:
    """--k, the neighbours the paper's rules read, as classify and evaluate refuse it."""
    if k < 1:
        raise RaeeConfigError(f"--k must be at least 1, got {k}")


@dataclass(frozen=True)
class Neighbours:
    """The k nearest reference rows of B inputs, nearest first."""

    correct: np.ndarray  # B×k×L bool, as stored by build-db
    similarity: np.ndarray  # B×k cosine similarity
    labels: np.ndarray  # B×k int
    logprobs: np.ndarray  # B×k×L×C
    probe_correct: np.ndarray | None = None  # B×k×L bool, the probes' out-of-fold answers (tables with probes)
    key_logprobs: np.ndarray | None = None  # B×C, the key probe on the B inputs' own keys (tables with probes)

    def top(self, k: int) -> Neighbours:
        probe = None if self.probe_correct is None else self.probe_correct[:, :k]
        return Neighbours(
            self.correct[:, :k],
            self.similarity[:, :k],
            self.labels[:, :k],
            self.logprobs[:, :k],
            probe,
            self.key_logprobs,
        )

    def probe(self) -> np.ndarray:
        if self.probe_correct is None:
            raise RaeeConfigError("this table has no probe answers: rebuild it with this version's build-db")
        return self.probe_correct

    def key_probs(self) -> np.ndarray:
        if self.key_logprobs is None:
            raise RaeeConfigError("this table has no key probe: rebuild it with this version's build-db")
        return np.exp(self.key_logprobs)

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
    probes: ProbeSet | None = None  # idem
    probe_policy: ProbePolicy | None = None  # idem
    key_depth: int = 0  # a layer-N key's N: rows that retrieve run N layers for it, so leave at N at the earliest

    def fitted(self) -> FusedPolicy:
        if self.policy is None:
            raise unfitted("fitted policy")
        return self.policy

    def fitted_probes(self) -> ProbeSet:
        if self.probes is None:
            raise unfitted("probe heads")
        return self.probes

    def fitted_probe_policy(self) -> ProbePolicy:
        if self.probe_policy is None:
            raise unfitted("probe policy")
        return self.probe_policy


def unfitted(what: str, where: str = "this table", reader: str | None = None) -> RaeeConfigError:
    """The one line for a table without what a strategy (`reader`) reads: built by an earlier build-db, or one that
    had nothing to fit it on."""
    need = f", which strategy {reader!r} reads" if reader else ""
    return RaeeConfigError(f"{where} has no {what}{need}: rebuild it with this version's build-db")


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


def raee_probe(nb: Neighbours, ctx: Context) -> np.ndarray:
    """The paper's rule on the probes' out-of-fold correctness instead of the label-word head's."""
    return _argmax_exit(_votes(nb.top(ctx.k).probe(), ctx.num_layers, normalize=True))


def probe_fused_exit(nb: Neighbours, ctx: Context) -> np.ndarray:
    """0 where the key probe mixed with the neighbours' label vote is tau confident, else the earliest layer whose
    similarity-weighted out-of-fold probe accuracy among the neighbours (shrunk toward the whole reference's) is
    within epsilon of the best layer's."""
    policy = ctx.fitted_probe_policy()
    if policy.majority:
        return np.zeros(len(nb.labels), np.int32)
    top = nb.top(policy.k)
    if top.labels.shape[1] == 0:
        return np.full(len(top.labels), ctx.num_layers, np.int32)
    exits = earliest_within(policy.exit_curve(neighbour_accuracy(top.probe(), top.similarity)), policy.epsilon)
    if policy.tau is None:
        return exits
    zero = mix(nb.key_probs(), label_vote(top.labels, top.similarity, ctx.num_labels), policy.beta)
    return np.where(reaches(zero.max(axis=1), policy.tau), 0, exits).astype(np.int32)


def none(nb: Neighbours, ctx: Context) -> np.ndarray:
    """Exit 0 for every row: baselines answered without an exit layer."""
    return np.zeros(len(nb.correct), np.int32)


def best_probe_layer(nb: Neighbours, ctx: Context) -> np.ndarray:
    """The single layer whose probe scored best out of fold on the reference (chosen by build-db)."""
    return np.full(len(nb.correct), ctx.fitted_probes().best_layer, np.int32)


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


def probe_fused_answer(logits: np.ndarray, exits: np.ndarray, nb: Neighbours, ctx: Context) -> np.ndarray:
    """The exit layer's probe mixed with the neighbours' vote (weight alpha); rows that ran no layer answer with
    the key probe mixed with the vote (weight beta); where the settings did not beat the reference's most common
    label, that label's shares (`majority`)."""
    policy = ctx.fitted_probe_policy()
    if policy.majority:
        return prior_answer(logits, exits, nb, ctx)
    top = nb.top(policy.k)
    if top.labels.shape[1] == 0:
        return softmax(logits)
    vote = label_vote(top.labels, top.similarity, ctx.num_labels)
    at_zero = mix(nb.key_probs(), vote, policy.beta)
    return np.where((exits == 0)[:, None], at_zero, mix(softmax(logits), vote, policy.alpha))


def key_answer(logits: np.ndarray, exits: np.ndarray, nb: Neighbours, ctx: Context) -> np.ndarray:
    """`key-lr`: the key probe (logistic regression on the retrieval key) alone."""
    return nb.key_probs()


def vote_answer(logits: np.ndarray, exits: np.ndarray, nb: Neighbours, ctx: Context) -> np.ndarray:
    """`knn-vote`: the k nearest reference rows' similarity-weighted label vote alone."""
    top = nb.top(ctx.k)
    return label_vote(top.labels, top.similarity, ctx.num_labels)


def prior_answer(logits: np.ndarray, exits: np.ndarray, nb: Neighbours, ctx: Context) -> np.ndarray:
    """`majority`: every row the reference's label shares, so its most common label: the floor a model must beat."""
    return np.tile(ctx.fitted_probes().label_prior(), (len(exits), 1))


def _policy_k(ctx: Context) -> int:
    return ctx.fitted().k


def _fell_back(ctx: Context) -> bool:
    """probe-fused answers every row with the most common label (its fit beat that nowhere): no key, no layer."""
    return ctx.probe_policy is not None and ctx.probe_policy.majority


def _probe_policy_k(ctx: Context) -> int:
    return 0 if _fell_back(ctx) else ctx.fitted_probe_policy().k


def _conf_t(ctx: Context) -> float | None:
    return ctx.fitted_probe_policy().conf_t


def _fused_t(ctx: Context) -> float | None:
    return ctx.fitted_probe_policy().t


@dataclass(frozen=True)
class Strategy:
    name: str
    exits: ExitFn
    answer: AnswerFn = head_answer
    needs_retrieval: bool = True
    needs_policy: bool = False
    reads: str = "head"  # "head": the label-word head at the exit layer; "probe": that layer's probe head; "none"
    k: Callable[[Context], int] | None = None  # neighbours to fetch; None: --k
    stop: Callable[[Context], float | None] | None = None  # probe confidence at which a row leaves early
    needs_probe_policy: bool = False
    layerless: Callable[[Context], bool] | None = None  # whether the table's fit runs no row through any layer
    reads_key_probe: bool = False  # answers with the probe on the retrieval key (probe-reading strategies may too)
    reads_label_counts: bool = False  # answers with the reference's label counts, kept with the probes

    def neighbours(self, ctx: Context) -> int:
        """How many neighbours to fetch for this strategy."""
        if not self.needs_retrieval:
            return 0
        return self.k(ctx) if self.k else ctx.k

    def reads_k(self) -> bool:
        """Whether a run's --k sets how many neighbours it reads (not for a fitted k, one neighbour, or none)."""
        return self.needs_retrieval and self.k is None

    def threshold(self, ctx: Context) -> float | None:
        return self.stop(ctx) if self.stop else None

    def answerable(self, probes: ProbeSet | None) -> bool:
        """Whether a table with these probes holds what this strategy answers with: `majority` reads the label
        counts build-db keeps with the probes, which tables built before it lack."""
        return not self.reads_label_counts or (probes is not None and probes.label_counts is not None)

    def needs_probes(self) -> bool:
        return self.reads == "probe" or self.reads_key_probe or self.reads_label_counts

    def form(self, ctx: Context) -> str:
        """The input form (FORMS) its layers read: the probes' for a strategy reading them, else the prompt
        (the label-word head's, and a layer key's)."""
        return ctx.fitted_probes().form if self.reads == "probe" else "prompt"

    def needs_head(self) -> bool:
        """Reads the label-word head: at its exit, or through the fused policy fitted on the head's answers."""
        return self.reads == "head" or self.needs_policy

    def runs_layers(self, ctx: Context) -> bool:
        """Runs rows to an exit layer: every strategy that reads a layer, but a probe-fused that fell back."""
        return self.reads != "none" and not (self.layerless and self.layerless(ctx))

    def runs_backbone(self, ctx: Context) -> bool:
        """Runs its rows' prompts through backbone layers, to an exit or for a layer key: only then must a prompt
        fit max_length. key-lr and knn-vote on an embedder's key never run one, nor a probe-fused that fell back."""
        return self.runs_layers(ctx) or bool(self.neighbours(ctx) and ctx.key_depth)

    def exits_per_row(self, ctx: Context) -> bool:
        """Runs layers to a depth that differs row by row (retrieved, or a probe confident enough): what saves a
        CPU compute, and a GPU little, where a call costs about the same for one deep row as for all of them."""
        return self.runs_layers(ctx) and (self.needs_retrieval or self.stop is not None)


def refuse_head(strategies: list[Strategy], label_word_head: bool) -> None:
    """A backbone without a label-word head (a bare encoder) serves only strategies that never read one; refused
    at the start of a run, in one line."""
    reading = [s.name for s in strategies if s.needs_head()]
    if reading and not label_word_head:
        allowed = [name for name, s in STRATEGIES.items() if not s.needs_head()]
        raise RaeeConfigError(
            f"strategy {', '.join(reading)} reads the label-word head, which this backbone does not have (a bare "
            f"encoder, read through its probe heads only); choose {', '.join(allowed)} or probe:N"
        )


def refuse_unanswerable(strategies: list[Strategy], probes: ProbeSet | None, where: str) -> None:
    """A strategy the table cannot answer with (`majority` on a table built before it) is refused at the start of a
    run, in one line."""
    missing = [s.name for s in strategies if not s.answerable(probes)]
    if missing:
        raise RaeeConfigError(
            f"strategy {', '.join(missing)} reads the label counts build-db keeps with the probes, which {where} "
            "lacks: rebuild it with this version's build-db"
        )


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in [
        Strategy("raee", raee),
        Strategy("raee-counts", raee_counts),
        Strategy("full", full, needs_retrieval=False),
        Strategy("full-cal", full, calibrated_answer, needs_retrieval=False, needs_policy=True),
        Strategy("raee-cal", raee_calibrated, calibrated_answer, needs_policy=True),  # the paper's rule: --k
        Strategy("fused", fused_exit, fused_answer, needs_policy=True, k=_policy_k),
        Strategy("raee-probe", raee_probe, reads="probe"),
        Strategy("probe-best", best_probe_layer, needs_retrieval=False, reads="probe"),
        Strategy("probe-last", full, needs_retrieval=False, reads="probe"),
        Strategy("probe-conf", full, needs_retrieval=False, reads="probe", stop=_conf_t, needs_probe_policy=True),
        Strategy(
            "probe-fused",
            probe_fused_exit,
            probe_fused_answer,
            reads="probe",
            k=_probe_policy_k,
            stop=_fused_t,
            needs_probe_policy=True,
            layerless=_fell_back,
        ),
        Strategy("key-lr", none, key_answer, k=lambda ctx: 1, reads="none", reads_key_probe=True),
        Strategy("knn-vote", none, vote_answer, reads="none"),
        Strategy("majority", none, prior_answer, needs_retrieval=False, reads="none", reads_label_counts=True),
    ]
}


def resolve(name: str | None, num_layers: int) -> Strategy:
    """A strategy by name (None: the default), `layer:N` (1-based) included; unknown names are run-level
    errors."""
    name = name or DEFAULT_STRATEGY
    if name.startswith(("layer:", "probe:")):
        kind, raw = name.split(":", 1)
        if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= num_layers:  # isdigit alone: '²', '１'
            raise RaeeConfigError(f"strategy {name!r}: N must be an integer in 1..{num_layers}")
        if raw != str(int(raw)):  # one spelling per strategy: the name is the job's identity and the report's row
            raise RaeeConfigError(f"strategy {name!r}: write it {kind}:{int(raw)}")
        reads = "head" if kind == "layer" else "probe"
        return Strategy(name, partial(fixed_layer, int(raw)), needs_retrieval=False, reads=reads)
    if name not in STRATEGIES:
        raise RaeeConfigError(f"unknown strategy {name!r}; choose {', '.join(STRATEGIES)}, layer:N or probe:N")
    return STRATEGIES[name]
