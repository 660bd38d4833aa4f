"""Per-layer probe heads: multinomial logistic regression on a layer's pooled hidden state, fitted by build-db.

Small backbones read through their label-word head are near chance on most tasks; a linear probe on the same
hidden states is not (issue 9). build-db fits one probe per layer and one on the retrieval key (the answer of rows
that run no layer) on the reference rows only, standardized, L2, the strength and the view (which input form the
backbone reads, prompt or bare input, and which pooling, token mean or readout token) chosen together by k-fold
cross-validation. The per-layer answers
stored for each reference row are out-of-fold (cross-fitted), so a neighbour never vouches for a layer with an
answer the probe memorized.

Probes are plain float32 arrays serialized as JSON + base64 into the exit table's metadata, never pickles: a
database must not be able to run code in a worker. Applying one is a matmul and a softmax (numpy only); fitting
imports scikit-learn (build time only).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from raee_ops.calibration import log_softmax
from raee_ops.errors import RaeeConfigError
from raee_ops.key_names import layer_depth
from raee_ops.metrics import METRICS
from raee_ops.schemas.tables import FORMS, POOLINGS, VIEWS_STAGED, decode_array, encode_array, stored_fields

#: What a probe can read: an input form's pooled states, every form × pooling, in the order build-db stages them
#: (a form's poolings together, as one runtime pass returns them). The prompt's keep their plain pooling names.
VIEWS = tuple(pooling if form == "prompt" else f"{form}-{pooling}" for form in FORMS for pooling in POOLINGS)
PROMPT_VIEWS = VIEWS[: len(POOLINGS)]
assert len(VIEWS) == VIEWS_STAGED


def view_form(view: str) -> str:
    """The input form (schemas.tables.FORMS) a view's states come from."""
    return FORMS[VIEWS.index(view) // len(POOLINGS)]


def table_views(embedder: str) -> tuple[str, ...]:
    """The views a new table's probes choose among: a layer-N key's table only the prompt's, since the key's layers
    are the first layers its rows run, on the prompt (build-db's workers run no other form for it)."""
    return PROMPT_VIEWS if layer_depth(embedder) else VIEWS


FOLDS = 5
#: Inverse L2 strength on standardized features, one for every layer: with the view, the pair with the lowest
#: out-of-fold log-loss over SELECTION_LAYERS layers spread over the depth (every layer would triple the fit time
#: for the same choice); the key probe gets its own.
C_GRID = (0.003, 0.03, 0.3)
SELECTION_LAYERS = 8
#: Rows used to choose the view and C (a seeded subsample of the fit rows on larger tables).
CV_ROWS = 2000
#: Rows the probes are fitted and cross-fitted on: a hash-of-id sample of larger tables; the other rows are
#: answered by the final probes, which never saw them (out-of-sample, as honest as out-of-fold).
FIT_ROWS = 10_000
MAX_ITER = 200


@dataclass(frozen=True)
class Probe:
    """One standardized linear softmax head: log_softmax(((x - mean) / scale) @ weight + bias)."""

    weight: np.ndarray  # D×C
    bias: np.ndarray  # C
    mean: np.ndarray  # D
    scale: np.ndarray  # D
    c: float

    def log_probs(self, x: np.ndarray) -> np.ndarray:
        return log_softmax(((np.asarray(x, np.float32) - self.mean) / self.scale) @ self.weight + self.bias)

    def to_dict(self) -> dict:
        return {name: encode_array(getattr(self, name)) for name in ("weight", "bias", "mean", "scale")} | {"c": self.c}

    @classmethod
    def from_dict(cls, raw: dict) -> Probe:
        stored_fields(cls, raw, "probe heads")
        return cls(**{k: decode_array(v) for k, v in raw.items() if k != "c"}, c=float(raw["c"]))


@dataclass(frozen=True)
class ProbeSet:
    """Every layer's probe and the key probe, with what they were fitted on (checked before use)."""

    pooling: str  # the view (one of VIEWS), named `pooling` since tables were first built with the two prompt views
    layers: list[Probe]
    key: Probe
    best_layer: int  # 1-based: the layer whose probe scores best out-of-fold on the reference (task metric)
    oof_metric: list[float]  # per layer, out-of-fold on the fit rows: the probe curve
    key_oof_metric: float
    metric: str
    fit_rows: int
    identity: dict  # the exit table's TableMeta fields, plus its row count
    #: The reference rows per label, every row of the table (not only the fit sample): `majority`'s answer, and
    #: probe-fused's where it falls back, which the policy's floor counts alike (None: tables built before it).
    label_counts: list[int] | None = None

    @property
    def form(self) -> str:
        """The input form the backbone must read for these probes (schemas.tables.FORMS)."""
        return view_form(self.pooling)

    @property
    def view_index(self) -> int:
        """Where the view sits in staged states ...×VIEWS×H."""
        return VIEWS.index(self.pooling)

    @property
    def pool_index(self) -> int:
        """Where the view sits in one pass's pooled states ...×POOLINGS×H (of the input in `form`)."""
        return self.view_index % len(POOLINGS)

    def label_prior(self) -> np.ndarray:
        """Each label's share of the reference rows: what a model that learned nothing answers (`majority`)."""
        if self.label_counts is None:
            raise RaeeConfigError("this table keeps no label counts: rebuild it with this version's build-db")
        counts = np.asarray(self.label_counts, np.float32)
        return counts / counts.sum()

    def majority_metric(self) -> float:
        """The task metric of answering every reference row with the most common label."""
        counts = np.asarray(self.label_counts)
        labels = np.repeat(np.arange(len(counts)), counts)
        return float(METRICS[self.metric](labels, np.full(len(labels), counts.argmax()), len(counts)))

    def layer_log_probs(self, pooled: np.ndarray, layers: np.ndarray) -> np.ndarray:
        """B×C log-probs of rows' pooled states B×POOLINGS×H (a pass over the input in `form`), each through the
        probe of its 1-based layer."""
        layers = np.asarray(layers)
        out = np.zeros((len(layers), self.key.bias.shape[0]), np.float32)
        for layer in np.unique(layers[layers > 0]):
            rows = layers == layer
            out[rows] = self.layers[layer - 1].log_probs(pooled[rows, self.pool_index])
        return out

    def every_layer(self, staged: np.ndarray) -> np.ndarray:
        """L×B×C log-probs from every layer's staged states L×B×VIEWS×H (build-db's and evaluate's all-layer pass)."""
        return np.stack([p.log_probs(staged[i, :, self.view_index]) for i, p in enumerate(self.layers)])

    def to_json(self) -> bytes:
        raw = asdict(self) | {"layers": [p.to_dict() for p in self.layers], "key": self.key.to_dict()}
        return json.dumps(raw).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> ProbeSet:
        d = stored_fields(cls, json.loads(raw), "probe heads")
        return cls(**d | {"layers": [Probe.from_dict(p) for p in d["layers"]], "key": Probe.from_dict(d["key"])})


def check_probes(probes: ProbeSet | None, identity: dict, where: str) -> ProbeSet:
    """Refuse probes fitted for other artifacts, task, embedder or table contents, in one line. A field the probes'
    build-db did not record yet (None: the task's fingerprint before it was recorded) is checked without, as the
    table's own identity is (`check_meta`): an earlier release's table stays usable."""
    if probes is None:
        raise RaeeConfigError(f"{where} has no probe heads: rebuild it with this version's build-db")
    fitted = {k: probes.identity.get(k) for k in identity}
    diffs = [f"{k} {fitted[k]!r} (expected {v!r})" for k, v in identity.items() if fitted[k] not in (v, None)]
    if diffs:
        raise RaeeConfigError(f"probe heads of {where} were fitted for something else: {'; '.join(diffs)}")
    return probes


def fit_share(table_rows: int) -> float:
    return min(1.0, FIT_ROWS / max(table_rows, 1))


def in_fit_sample(ids: list[str], share: float) -> np.ndarray:
    """Rows whose id hashes below `share`: a sample that stays the same for a row however the table grows (append
    shrinks the share, so the new sample's old rows are a subset of the old sample)."""
    if share >= 1.0:
        return np.ones(len(ids), bool)
    u = [int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "big") / 2.0**64 for i in ids]
    return np.asarray(u) < share


@dataclass(frozen=True)
class Fitted:
    probes: ProbeSet
    oof: np.ndarray  # N×L×C out-of-fold log-probs of the fit rows
    key_oof: np.ndarray  # N×C


def fit_probes(
    features: np.ndarray,
    keys: np.ndarray,
    labels: np.ndarray,
    num_labels: int,
    metric_name: str,
    identity: dict,
    views: tuple[str, ...] = VIEWS,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> Fitted:
    """Probes on fit rows: features N×L×len(views)×H, keys N×D, labels N; with `groups` (N ints) the folds
    keep each group whole, so no row's out-of-fold answer comes from a probe fitted on its near-copies."""
    n, num_layers = features.shape[:2]
    if features.shape[2] != len(views):
        raise ValueError(f"features hold {features.shape[2]} views, {len(views)} named ({', '.join(views)})")
    folds, cv, cv_folds = _plan(labels, seed, groups)
    every = len(cv) == n  # no copy of the states then
    p, c, chosen_on = _view_and_c(features if every else features[cv], labels[cv], cv_folds, num_labels)
    reuse = chosen_on if every else {}

    layers, oof = [], np.zeros((n, num_layers, num_labels), np.float32)
    for layer in range(num_layers):
        x = features[:, layer, p]
        oof[:, layer] = reuse[layer] if layer in reuse else _cross_fit(x, labels, folds, num_labels, c)
        layers.append(_fit(x, labels, num_labels, c))
    key, key_oof = fit_key_probe(keys, labels, num_labels, seed, groups)
    pooling = views[p]
    metric = METRICS[metric_name]
    curve = [metric(labels, oof[:, layer].argmax(1), num_labels) for layer in range(num_layers)]
    probes = ProbeSet(
        pooling=pooling,
        layers=layers,
        key=key,
        best_layer=int(np.argmax(curve)) + 1,
        oof_metric=[float(v) for v in curve],
        key_oof_metric=float(metric(labels, key_oof.argmax(1), num_labels)),
        metric=metric_name,
        fit_rows=n,
        identity=identity,
    )
    return Fitted(probes, oof, key_oof)


def choose_view(
    features: np.ndarray,
    labels: np.ndarray,
    num_labels: int,
    views: tuple[str, ...] = VIEWS,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> str:
    """The view fit_probes would choose on these rows (features N×L×len(views)×H): build-db's first pass on a
    sample of a large table chooses it there, so that the other rows run only the chosen view's input form."""
    _, cv, cv_folds = _plan(labels, seed, groups)
    chosen_on = features if len(cv) == len(labels) else features[cv]
    return views[_view_and_c(chosen_on, labels[cv], cv_folds, num_labels)[0]]


def _view_and_c(
    features: np.ndarray, labels: np.ndarray, folds: np.ndarray, num_labels: int
) -> tuple[int, float, dict[int, np.ndarray]]:
    """(view index, C, the selection layers' out-of-fold log-probs): the pair with the lowest out-of-fold log-loss
    averaged over a spread of layers."""
    scored = selection_layers(features.shape[1])
    trials: dict[tuple[int, float], tuple[float, dict[int, np.ndarray]]] = {}
    for p, c in itertools.product(range(features.shape[2]), C_GRID):
        oofs = {layer: _cross_fit(features[:, layer, p], labels, folds, num_labels, c) for layer in scored}
        trials[p, c] = (float(np.mean([_log_loss(o, labels) for o in oofs.values()])), oofs)
    p, c = min(trials, key=lambda pc: trials[pc][0])
    return p, c, trials[p, c][1]


def selection_layers(num_layers: int) -> list[int]:
    """0-based layers the pooling and C are chosen on: SELECTION_LAYERS spread from the first to the last."""
    return sorted({round(i) for i in np.linspace(0, num_layers - 1, min(SELECTION_LAYERS, num_layers))})


def fit_key_probe(
    keys: np.ndarray, labels: np.ndarray, num_labels: int, seed: int = 0, groups: np.ndarray | None = None
) -> tuple[Probe, np.ndarray]:
    """The key's probe (C by cross-validation, on the rows the layers' C is chosen on) and its out-of-fold
    log-probs N×C: what answers at exit 0, and what a user's own logistic regression on an embedding scores (the
    benches read it as build-db fits it)."""
    folds, cv, cv_folds = _plan(labels, seed, groups)
    c, oof = _choose_c(keys[cv], labels[cv], cv_folds, num_labels)
    if len(cv) != len(labels):
        oof = _cross_fit(keys, labels, folds, num_labels, c)
    return _fit(keys, labels, num_labels, c), oof


def _plan(labels: np.ndarray, seed: int, groups: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(every row's fold, the rows C and the view are chosen on: at most CV_ROWS, seeded, and their folds)."""
    n = len(labels)
    cv = np.sort(np.random.default_rng(seed).choice(n, CV_ROWS, replace=False)) if n > CV_ROWS else np.arange(n)
    folds = _folds(labels, n, seed, groups)
    cv_folds = folds if len(cv) == n else _folds(labels[cv], len(cv), seed, None if groups is None else groups[cv])
    return folds, cv, cv_folds


def _log_loss(log_probs: np.ndarray, y: np.ndarray) -> float:
    return float(-log_probs[np.arange(len(y)), y].mean())


def _folds(labels: np.ndarray, n: int, seed: int, groups: np.ndarray | None = None) -> np.ndarray:
    """Fold index per row, stratified by label (a round-robin over each label's shuffled rows); with `groups`,
    per group instead (a round-robin over the shuffled groups, each whole in one fold), unstratified."""
    rng = np.random.default_rng(seed)
    group_index = None if groups is None else np.unique(groups, return_inverse=True)[1]
    if group_index is not None and group_index.max() + 1 < n:
        order = rng.permutation(group_index.max() + 1)
        return ((np.argsort(order) + rng.integers(FOLDS)) % FOLDS)[group_index].astype(np.int64)
    fold = np.zeros(n, np.int64)
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        fold[rows] = (np.arange(len(rows)) + rng.integers(FOLDS)) % FOLDS
    return fold


def _choose_c(x: np.ndarray, y: np.ndarray, folds: np.ndarray, num_labels: int) -> tuple[float, np.ndarray]:
    """The C with the lowest out-of-fold log-loss, and its out-of-fold log-probs."""
    best: tuple[float, float, np.ndarray] | None = None
    for c in C_GRID:
        oof = _cross_fit(x, y, folds, num_labels, c)
        loss = _log_loss(oof, y)
        if best is None or loss < best[0]:
            best = (loss, c, oof)
    assert best is not None
    return best[1], best[2]


def _cross_fit(x: np.ndarray, y: np.ndarray, folds: np.ndarray, num_labels: int, c: float) -> np.ndarray:
    """Out-of-fold log-probs N×C: each fold answered by a probe fitted on the other folds."""
    out = np.zeros((len(y), num_labels), np.float32)
    for f in np.unique(folds):
        held = folds == f
        out[held] = _fit(x[~held], y[~held], num_labels, c).log_probs(x[held])
    return out


def load_solver() -> None:
    """Load scikit-learn and its BLAS now, before build-db's job: loading it after the job, under an address-space
    limit (`ulimit -v`) with the job's memory taken, OpenBLAS retried a failing allocation in native code for ever,
    where the fit's SIGTERM handler could not run. Before the job a SIGTERM ends the process at once."""
    _thread_pools()


@functools.cache
def _thread_pools() -> Any:
    """The BLAS/OpenMP pools loaded once scikit-learn is: found once per process (threadpoolctl's
    `threadpool_limits` scans every loaded library on each call, 30-60 ms, more than a small probe's fit)."""
    import sklearn.linear_model  # noqa: F401 - loads the pools to find
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _fit(x: np.ndarray, y: np.ndarray, num_labels: int, c: float) -> Probe:
    """One standardized L2 multinomial logistic regression (scikit-learn, imported here: build time only)."""
    from sklearn.linear_model import LogisticRegression

    x = np.asarray(x, np.float32)
    mean = x.mean(axis=0)
    scale = np.maximum(x.std(axis=0), 1e-6)
    z = (x - mean) / scale
    weight = np.zeros((x.shape[1], num_labels), np.float32)
    bias = np.full(num_labels, -30.0, np.float32)  # a label absent from the fit rows is never predicted
    present = np.unique(y)
    if len(present) == 1:
        bias[present[0]] = 0.0
    else:
        # One BLAS/OpenMP thread: a probe is a small problem (SmolLM2: 500 rows x 576, ~10 iterations), where
        # waking a thread pool for every product cost 15-35x the fit itself on 2 busy cores.
        with _thread_pools().limit(limits=1):
            model = LogisticRegression(C=c, max_iter=MAX_ITER, tol=1e-3).fit(z, y)
        coef, intercept = model.coef_, model.intercept_
        if len(present) == 2:  # scikit-learn gives binary problems one row: the second class against the first
            coef, intercept = np.stack([-coef[0] / 2, coef[0] / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
        weight[:, present] = coef.T
        bias[present] = intercept
    return Probe(weight, bias, mean.astype(np.float32), scale.astype(np.float32), c)
