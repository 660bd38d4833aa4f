import dataclasses

import numpy as np
import pytest

from raee_ops import exit_policy, probe_policy
from raee_ops.errors import RaeeConfigError
from raee_ops.exit_policy import Context, Neighbours, resolve
from raee_ops.readout import describe


def _wrap(fn):
    """Call a strategy's exit rule on a bare B×k×L correctness matrix (all k neighbours used)."""

    def call(correct, num_layers):
        b, k = correct.shape[:2]
        nb = Neighbours(
            correct,
            np.ones((b, k), np.float32),
            np.zeros((b, k), np.int64),
            np.zeros((b, k, num_layers, 2), np.float32),
        )
        return fn(nb, Context(num_layers, 2, k=max(k, 1)))

    return call


raee, raee_counts = _wrap(exit_policy.raee), _wrap(exit_policy.raee_counts)


def m(*rows):
    """B=1 query with neighbours given as strings of 0/1 per layer."""
    return np.array([[[c == "1" for c in r] for r in rows]])


def test_raee_normalizes_each_neighbour_to_one_vote():
    # neighbour A correct at 1..3 (1/3 each), B and C only at 4: layer 4 wins with 2 votes.
    assert raee(m("1110", "0001", "0001"), 4).tolist() == [4]


def test_counts_variant_does_not_normalize():
    # unnormalized: layer 1 gets 3 votes (A, B, C), layer 4 gets 1.
    assert raee_counts(m("1111", "1000", "1000", "0000"), 4).tolist() == [1]
    # normalized: A spreads 1/4, B 1, C 1 at layer 1 = 2.25; empty D votes last = 1.25.
    assert raee(m("1111", "1000", "1000", "0000"), 4).tolist() == [1]
    # counts [2, 2, 2, 2] tie -> 1; normalized [2/3, 2/3, 2/3, 2] -> 4.
    assert raee_counts(m("1110", "1110", "0001", "0001"), 4).tolist() == [1]
    assert raee(m("1110", "1110", "0001", "0001"), 4).tolist() == [4]


def test_neighbour_correct_nowhere_votes_last_layer():
    assert raee(m("0000", "0000", "0100"), 4).tolist() == [4]
    assert raee_counts(m("0000"), 4).tolist() == [4]


def test_ties_go_to_the_earlier_layer():
    assert raee(m("0100", "0010"), 4).tolist() == [2]
    assert raee(m("0110"), 4).tolist() == [2]


def test_batch_rows_are_independent_and_one_based():
    correct = np.array([[[1, 0, 0], [1, 0, 0]], [[0, 0, 1], [0, 1, 0]]], bool)
    assert raee(correct, 3).tolist() == [1, 2]


def test_no_neighbours_exits_last():
    assert raee(np.zeros((2, 0, 5), bool), 5).tolist() == [5, 5]


def test_resolve_fixed_and_full_and_errors():
    empty = np.zeros((3, 0, 6), bool)
    assert _wrap(resolve("layer:1", 6).exits)(empty, 6).tolist() == [1, 1, 1]
    assert _wrap(resolve("full", 6).exits)(empty, 6).tolist() == [6, 6, 6]
    assert not resolve("full", 6).needs_retrieval and resolve("raee", 6).needs_retrieval
    for bad in ("layer:0", "layer:7", "layer:x", "layer:²", "probe:１", "fastest"):
        with pytest.raises(RaeeConfigError):
            resolve(bad, 6)
    with pytest.raises(RaeeConfigError, match="write it probe:3"):  # a second name of probe:3, a job of its own
        resolve("probe:03", 6)


def _policy(
    num_layers: int,
    bias_first_layer: float = 0.0,
    k: int = 2,
    alpha: float = 0.0,
    epsilon: float = 0.0,
    tau: float | None = None,
):
    from raee_ops.calibration import FusedPolicy

    bias = np.zeros((num_layers, 2))
    bias[0] = [0.0, bias_first_layer]
    return FusedPolicy(
        k=k,
        alpha=alpha,
        epsilon=epsilon,
        bias=bias.tolist(),
        loo_accuracy=0.0,
        loo_mean_exit=0.0,
        loo_queries=0,
        tau=tau,
    )


def _neighbours(labels, layer_says):
    """Neighbours whose head says `layer_says[j][l]` (a label) at layer l, with given labels."""
    says = np.array([layer_says])
    logprobs = np.where(np.eye(2, dtype=bool)[says], 0.0, -5.0).astype(np.float32)  # 1×k×L×2
    labels = np.array([labels])
    return Neighbours(says == labels[..., None], np.ones(labels.shape, np.float32), labels, logprobs)


def test_fused_exit_uses_calibrated_correctness_and_the_fitted_k():
    # both neighbours have label 1; layer 1 says 0 for both (wrong), layers 2 and 3 say 1.
    nb = _neighbours([1, 1], [[0, 1, 1], [0, 1, 1]])
    ctx = Context(3, 2, k=10, policy=_policy(3))
    assert exit_policy.fused_exit(nb, ctx).tolist() == [2]
    # a bias that flips layer 1 towards label 1 makes layer 1 correct for both: exit there.
    ctx = Context(3, 2, k=10, policy=_policy(3, bias_first_layer=10.0))
    assert exit_policy.fused_exit(nb, ctx).tolist() == [1]
    # the paper's rule on raw correctness is unaffected by calibration
    assert exit_policy.raee(nb, ctx).tolist() == [2]


def test_answers_apply_the_exit_layer_bias_and_the_vote():
    nb = _neighbours([1, 1], [[1, 1], [1, 1]])
    logits = np.array([[1.0, 0.0]])
    ctx = Context(2, 2, k=2, policy=_policy(2, bias_first_layer=3.0))
    assert exit_policy.head_answer(logits, np.array([1]), nb, ctx).argmax() == 0
    assert exit_policy.calibrated_answer(logits, np.array([1]), nb, ctx).argmax() == 1  # bias at layer 1
    assert exit_policy.calibrated_answer(logits, np.array([2]), nb, ctx).argmax() == 0  # no bias at layer 2
    voted = exit_policy.fused_answer(logits, np.array([2]), nb, Context(2, 2, 2, _policy(2, alpha=0.75)))
    assert voted.argmax() == 1 and voted.sum() == pytest.approx(1.0)


def test_fused_answers_from_retrieval_alone_where_the_neighbours_agree_enough():
    agree = _neighbours([1, 1], [[0, 0, 1], [0, 0, 1]])
    split = _neighbours([1, 0], [[0, 0, 1], [0, 0, 0]])
    nb = Neighbours(
        *(
            np.concatenate([getattr(agree, f), getattr(split, f)])
            for f in ("correct", "similarity", "labels", "logprobs")
        )
    )
    ctx = Context(3, 2, k=2, policy=_policy(3, tau=0.9))
    exits = exit_policy.fused_exit(nb, ctx)
    assert exits.tolist() == [0, 3]  # unanimous neighbours: no layer; a split vote: the layer both get right
    logits = np.array([[5.0, 0.0], [5.0, 0.0]])  # the head says label 0 wherever it ran
    answer = exit_policy.fused_answer(logits, exits, nb, ctx)
    assert answer.argmax(axis=1).tolist() == [1, 0]  # exit 0 answers with the vote; the other with its head
    assert exit_policy.fused_exit(nb, Context(3, 2, k=2, policy=_policy(3, tau=None))).min() >= 1


def test_policy_strategies_refuse_a_table_without_a_policy():
    assert resolve(None, 4).name == exit_policy.DEFAULT_STRATEGY
    nb = _neighbours([1], [[1, 1]])
    with pytest.raises(RaeeConfigError, match="no fitted policy"):
        resolve("fused", 2).exits(nb, Context(2, 2, k=1))


# -- probe strategies -------------------------------------------------------------------------------------------


def _probe_policy(k=2, epsilon=0.0, alpha=0.0, beta=0.5, tau=None, t=None, conf_t=0.9, shrink=1.0, curve=None):
    from raee_ops.probe_policy import ProbePolicy

    return ProbePolicy(
        k, epsilon, alpha, beta, tau, t, conf_t, "accuracy", 0, 0.0, 0.0, 0.0, 0.0, 0.0, shrink=shrink, curve=curve
    )


def _with_probes(nb: Neighbours, probe_says, key_probs) -> Neighbours:
    """The same neighbours whose probes say `probe_says[j][l]` (a label) at layer l; the inputs' key probe."""
    import dataclasses

    probe_correct = np.array([probe_says]) == nb.labels[..., None]
    return dataclasses.replace(nb, probe_correct=probe_correct, key_logprobs=np.log(np.array([key_probs])))


def _probes(best_layer: int):
    from raee_ops.probes import ProbeSet

    return ProbeSet("mean", [], None, best_layer, [], 0.0, "accuracy", 4, {}, label_counts=[1, 3])


def test_raee_probe_votes_with_the_probes_correctness_not_the_heads():
    # heads right only at layer 3; probes right from layer 1
    nb = _with_probes(_neighbours([1, 1], [[0, 0, 1], [0, 0, 1]]), [[1, 1, 1], [1, 1, 1]], [0.5, 0.5])
    ctx = Context(3, 2, k=2)
    assert exit_policy.raee(nb, ctx).tolist() == [3]
    assert exit_policy.raee_probe(nb, ctx).tolist() == [1]
    with pytest.raises(RaeeConfigError, match="no probe answers"):
        exit_policy.raee_probe(_neighbours([1], [[1, 1, 1]]), ctx)


def test_probe_fused_exits_where_the_neighbours_probes_are_right_or_at_0_when_key_and_vote_agree():
    # neighbours' probes are right from layer 2 on
    nb = _with_probes(_neighbours([1, 1], [[0, 0, 0], [0, 0, 0]]), [[0, 1, 1], [0, 1, 1]], [0.3, 0.7])
    ctx = Context(3, 2, k=10, probe_policy=_probe_policy(tau=None))
    assert exit_policy.probe_fused_exit(nb, ctx).tolist() == [2]
    assert "tau=never t=never;" in ctx.probe_policy.settings()  # as the README names them (it said tau=None)
    never = dataclasses.replace(ctx.probe_policy, conf_t=probe_policy.NEVER_CONFIDENT)
    assert "probe-conf t=never;" in never.settings()  # it said t=1.01
    # key probe 0.7 for label 1, vote 1.0: mixed half-half 0.85 -> exit 0 at tau 0.8, not at tau 0.9
    assert exit_policy.probe_fused_exit(nb, Context(3, 2, 10, probe_policy=_probe_policy(tau=0.8))).tolist() == [0]
    assert exit_policy.probe_fused_exit(nb, Context(3, 2, 10, probe_policy=_probe_policy(tau=0.9))).tolist() == [2]
    # a wide epsilon takes layer 1 although its probe accuracy is lower
    assert exit_policy.probe_fused_exit(nb, Context(3, 2, 10, probe_policy=_probe_policy(epsilon=1.0))).tolist() == [1]


def test_probe_fused_answers_with_the_probe_the_vote_and_the_key_probe():
    nb = _with_probes(_neighbours([1, 1], [[0, 0], [0, 0]]), [[1, 1], [1, 1]], [0.9, 0.1])
    probe_logits = np.log(np.array([[0.8, 0.2], [0.8, 0.2]]))
    exits = np.array([2, 0])
    ctx = Context(2, 2, 10, probe_policy=_probe_policy(alpha=0.0, beta=0.0))
    answer = exit_policy.probe_fused_answer(probe_logits[:1].repeat(2, 0), exits, _stack(nb, nb), ctx)
    np.testing.assert_allclose(answer, [[0.8, 0.2], [0.9, 0.1]])  # the probe; exit 0: the key probe
    ctx = Context(2, 2, 10, probe_policy=_probe_policy(alpha=0.5, beta=1.0))
    answer = exit_policy.probe_fused_answer(probe_logits, exits, _stack(nb, nb), ctx)
    np.testing.assert_allclose(answer, [[0.4, 0.6], [0.0, 1.0]], atol=1e-6)  # half vote; exit 0: the vote alone


def _stack(a: Neighbours, b: Neighbours) -> Neighbours:
    fields = ("correct", "similarity", "labels", "logprobs", "probe_correct", "key_logprobs")
    return Neighbours(*(np.concatenate([getattr(a, f), getattr(b, f)]) for f in fields))


def test_fixed_probe_strategies_and_baselines_without_layers():
    nb = _with_probes(_neighbours([1, 1, 0], [[0, 0, 0, 0]] * 3), [[1, 1, 1, 1]] * 3, [0.2, 0.8])
    ctx = Context(4, 2, k=3, probes=_probes(best_layer=3), probe_policy=_probe_policy(conf_t=0.9))
    assert resolve("probe-best", 4).exits(nb, ctx).tolist() == [3]
    assert resolve("probe-last", 4).exits(nb, ctx).tolist() == [4]
    assert resolve("probe:2", 4).exits(nb, ctx).tolist() == [2] and resolve("probe:2", 4).reads == "probe"
    assert resolve("layer:2", 4).reads == "head"
    conf = resolve("probe-conf", 4)
    assert conf.exits(nb, ctx).tolist() == [4] and conf.threshold(ctx) == 0.9 and not conf.needs_retrieval
    for name in ("key-lr", "knn-vote", "majority"):
        assert resolve(name, 4).exits(nb, ctx).tolist() == [0]
    zeros = np.zeros((1, 2))
    np.testing.assert_allclose(exit_policy.key_answer(zeros, np.array([0]), nb, ctx), [[0.2, 0.8]])
    np.testing.assert_allclose(
        exit_policy.prior_answer(np.zeros((2, 2)), np.array([0, 0]), nb, ctx), [[0.25, 0.75]] * 2
    )
    assert not resolve("majority", 4).needs_retrieval and resolve("majority", 4).needs_probes()
    np.testing.assert_allclose(exit_policy.vote_answer(zeros, np.array([0]), nb, ctx), [[1 / 3, 2 / 3]], atol=1e-5)
    with pytest.raises(RaeeConfigError, match="no probe heads"):
        resolve("probe-best", 4).exits(nb, Context(4, 2, k=3))
    with pytest.raises(RaeeConfigError):
        resolve("probe:5", 4)


def test_probe_fused_shrinks_the_neighbours_curve_toward_the_whole_references():
    # neighbours' probes are right from layer 2 on; over the whole reference layer 3 is far better
    nb = _with_probes(_neighbours([1, 1], [[0, 0, 0], [0, 0, 0]]), [[0, 1, 1], [0, 1, 1]], [0.5, 0.5])
    reference = (0.2, 0.5, 1.0)

    def exit_at(shrink: float) -> int:
        policy = _probe_policy(shrink=shrink, curve=reference)
        return exit_policy.probe_fused_exit(nb, Context(3, 2, 10, probe_policy=policy)).tolist()[0]

    assert exit_at(1.0) == 2  # the neighbours alone: layer 2 ties layer 3 among them
    assert exit_at(0.5) == 3  # half-way: 0.5*1 + 0.5*1.0 at layer 3 beats 0.5*1 + 0.5*0.5 at layer 2
    assert exit_at(0.0) == 3  # the reference alone: its best layer for every row
    assert exit_policy.probe_fused_exit(nb, Context(3, 2, 10, probe_policy=_probe_policy(shrink=0.0))).tolist() == [2]


def test_every_strategy_reads_no_more_neighbours_than_it_fetches():
    """classify fetches `strategy.neighbours(ctx)` per row; evaluate fetches more for all strategies at once: a
    strategy reading past its fetch answers otherwise in the two (raee-cal fetched the fitted k, read --k)."""
    rng = np.random.default_rng(0)
    rows, k_max, layers, labels = 6, 12, 4, 3
    labels_of = rng.integers(0, labels, (rows, k_max))
    nb = Neighbours(
        rng.random((rows, k_max, layers)) < 0.5,
        np.sort(rng.random((rows, k_max)).astype(np.float32), axis=1)[:, ::-1],
        labels_of,
        np.log(rng.dirichlet(np.ones(labels), (rows, k_max, layers))).astype(np.float32),
        rng.random((rows, k_max, layers)) < 0.5,
        np.log(rng.dirichlet(np.ones(labels), rows)),
    )
    from raee_ops.calibration import FusedPolicy

    policy = FusedPolicy(
        k=3,
        alpha=0.3,
        epsilon=0.05,
        bias=np.zeros((layers, labels)).tolist(),
        loo_accuracy=0.0,
        loo_mean_exit=0.0,
        loo_queries=0,
        tau=0.7,
    )
    ctx = Context(
        layers,
        labels,
        k=7,
        policy=policy,
        probes=_probes(best_layer=2),
        probe_policy=_probe_policy(k=5, tau=0.6, t=0.9),
    )
    logits = rng.normal(size=(rows, labels))
    for name, strategy in exit_policy.STRATEGIES.items():
        fetched = nb.top(strategy.neighbours(ctx))
        exits = strategy.exits(nb, ctx)
        np.testing.assert_array_equal(strategy.exits(fetched, ctx), exits, err_msg=name)
        np.testing.assert_allclose(
            strategy.answer(logits, exits, fetched, ctx), strategy.answer(logits, exits, nb, ctx), err_msg=name
        )


def test_strategies_whose_rows_exit_at_depths_of_their_own():
    """What classify warns a GPU run about: retrieved exits or a probe's early stop, not a fixed depth and not the
    baselines that run no layer."""
    ctx = Context(4, 2, k=3)
    per_row = {name for name, s in exit_policy.STRATEGIES.items() if s.exits_per_row(ctx)}
    assert per_row == {"raee", "raee-counts", "raee-cal", "fused", "raee-probe", "probe-conf", "probe-fused"}
    assert not resolve("probe:3", 4).exits_per_row(ctx) and not resolve("layer:2", 4).exits_per_row(ctx)


def test_only_strategies_running_layers_or_a_layer_key_run_the_backbone():
    """Rows over max_length are refused only where the backbone runs them: every strategy but the key baselines,
    which run it too on a table keyed by the backbone's first layers."""
    embedder_key, layer_key = Context(4, 2, k=3), Context(4, 2, k=3, key_depth=1)
    no_backbone = {name for name, s in exit_policy.STRATEGIES.items() if not s.runs_backbone(embedder_key)}
    assert no_backbone == {"key-lr", "knn-vote", "majority"}
    assert all(s.runs_backbone(layer_key) for s in exit_policy.STRATEGIES.values() if s.needs_retrieval)
    assert not resolve("majority", 4).runs_backbone(layer_key)  # it retrieves nothing, so computes no key


def test_the_default_answers_the_most_common_label_where_nothing_it_reads_does_better():
    """Fitted on reference rows whose probes, key and neighbours all point away from the truth (WNLI's flipped
    pairs), no setting beats answering every row with the most common label: the default answers that, at exit 0,
    its left-out numbers are that label's, and build-db warns; with probes that read the truth it does not."""
    from raee_ops.probe_policy import fit_probe_policy
    from raee_ops.reference import Reference

    rng = np.random.default_rng(0)
    n, layers = 200, 4
    labels = (rng.random(n) < 0.3).astype(np.int64)  # 70% label 0
    vectors = rng.normal(size=(n, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)

    def says(answers: np.ndarray, confidence: float = 0.9) -> np.ndarray:
        return np.log(np.where(np.eye(2, dtype=bool)[answers], confidence, 1 - confidence))

    wrong = says(1 - labels)
    flipped = fit_probe_policy(vectors, labels, np.repeat(wrong[:, None], layers, 1), wrong, 2, "accuracy")
    assert flipped.majority and flipped.loo_metric == pytest.approx(0.7, abs=0.05) and flipped.loo_mean_exit == 0
    assert flipped.within(layer_price=0.0).majority  # every cost's choice falls back alike
    probes = _probes(best_layer=1)
    nb = _with_probes(_neighbours([1, 1], [[0] * layers] * 2), [[1] * layers] * 2, [0.1, 0.9])
    ctx = Context(layers, 2, k=2, probes=probes, probe_policy=flipped)
    assert exit_policy.probe_fused_exit(nb, ctx).tolist() == [0]
    assert resolve("probe-fused", layers).neighbours(ctx) == 0  # classify computes no key and searches nothing
    for key_depth in (0, 2):  # nor runs a layer: a prompt over max_length is answered, not refused
        assert not resolve("probe-fused", layers).runs_backbone(dataclasses.replace(ctx, key_depth=key_depth))
    assert not resolve("probe-fused", layers).exits_per_row(ctx)  # so classify does not warn a GPU run about exits
    np.testing.assert_allclose(exit_policy.probe_fused_answer(np.zeros((1, 2)), np.array([0]), nb, ctx), [[0.25, 0.75]])
    assert "answers every row with the most common label" in flipped.settings()
    assert Reference(None, None, None, probes, flipped).render()[-1].startswith("warning: on the reference rows")
    right = says(labels)
    read = fit_probe_policy(vectors, labels, np.repeat(right[:, None], layers, 1), wrong, 2, "accuracy")
    assert not read.majority and read.loo_metric > 0.95 and read.floor[0] == pytest.approx(flipped.floor[0])
    assert resolve("probe-fused", layers).neighbours(Context(layers, 2, k=2, probe_policy=read)) == read.k
    assert resolve("probe-fused", layers).runs_backbone(Context(layers, 2, k=2, probe_policy=read))
    assert resolve("probe-fused", layers).exits_per_row(Context(layers, 2, k=2, probe_policy=read))
    assert not Reference(None, None, None, probes, read).render()[-1].startswith("warning")
    # priced so that only answering at exit 0, from the misleading key, is affordable: it falls back too, but the
    # data is not why, and the line says what is (it had blamed the data, naming no cost)
    priced = read.within(layer_price=1000.0)
    assert priced.majority and priced.best_elsewhere() > 0.95 and flipped.best_elsewhere() is None
    assert "at this cost nothing did better" in priced.settings()
    warned = Reference(None, None, None, probes, priced).render()[-1]
    assert warned.startswith("warning: on the reference rows") and "a lower --layer-price" in warned, warned
    assert "a lower --layer-price" not in Reference(None, None, None, probes, flipped).render()[-1]
    assert probes.majority_metric() == pytest.approx(0.75)  # info's figure: label counts 1 and 3
    with pytest.raises(RaeeConfigError, match="keeps no label counts"):
        dataclasses.replace(probes, label_counts=None).label_prior()


def test_the_default_classify_runs_is_the_rule_build_db_fits_it_for():
    """build-db scores every probe-fused setting with probe_policy.fused_trials, a vectorised copy of the rule that
    classify runs (probe_fused_exit, the confidence stop, probe_fused_answer). On the same rows, every setting of
    the grid gives the same answers and exits both ways: a change to one copy that the other lacks would fit
    settings for a rule classify does not run."""
    from raee_ops.probe_policy import Found, confident_exits, fused_trials

    rng = np.random.default_rng(7)
    rows, k, layers, labels = 60, 4, 5, 3
    probs = rng.dirichlet(np.full(labels, 0.4), size=(rows, layers))  # Q×L×C, each row's own probes
    found = Found(
        probs,
        rng.dirichlet(np.full(labels, 0.4), size=rows),
        rng.integers(0, labels, (rows, k)),
        -np.sort(-rng.uniform(0.2, 1.0, (rows, k)), axis=1),
        rng.random((rows, k, layers)) < np.linspace(0.3, 0.9, layers),
    )
    reference_curve = rng.uniform(0.3, 0.9, layers)
    trials = fused_trials(found, reference_curve, rng.integers(0, labels, rows), "accuracy", labels, ks=[k])
    nb = Neighbours(
        np.zeros((rows, k, layers), bool),
        found.similarity,
        found.labels,
        np.zeros((rows, k, layers, labels)),
        found.correct,
        np.log(found.key_probs),
    )
    assert len(trials) > 1000 and len({t.mean_exit for t in trials}) > 20  # the grid, with exits of every kind
    for trial in trials:
        _, shrink, epsilon, alpha, beta, tau, t = trial.settings
        policy = _probe_policy(k, epsilon, alpha, beta, tau, t, shrink=shrink, curve=tuple(reference_curve))
        ctx = Context(layers, labels, k, probe_policy=policy)
        exits = confident_exits(probs.max(axis=2), exit_policy.probe_fused_exit(nb, ctx), t)  # classify's stop
        at_exit = np.log(probs[np.arange(rows), np.maximum(exits, 1) - 1])
        answers = exit_policy.probe_fused_answer(at_exit, exits, nb, ctx).argmax(axis=1)
        assert answers.tolist() == trial.pred.tolist(), trial.settings
        assert exits.mean() == trial.mean_exit, trial.settings


def test_the_fused_rule_classify_runs_is_the_one_build_db_fits_it_for():
    """As for the default: calibration.fused_trials scores every `fused` setting at once for build-db's fit, and
    classify runs fused_exit and fused_answer; on the same rows every setting gives the same answers and exits."""
    from raee_ops.calibration import FusedPolicy, calibrated_correct, fused_trials

    rng = np.random.default_rng(3)
    rows, k, layers, labels = 50, 5, 4, 3
    nb_labels = rng.integers(0, labels, (rows, k))
    nb_logprobs = np.log(rng.dirichlet(np.full(labels, 0.5), size=(rows, k, layers)))
    similarity = -np.sort(-rng.uniform(0.2, 1.0, (rows, k)), axis=1)
    own = np.log(rng.dirichlet(np.full(labels, 0.5), size=(rows, layers)))  # Q×L×C, each row's own head
    bias = rng.normal(0, 0.5, (layers, labels))
    neighbours = (nb_labels, similarity, calibrated_correct(nb_logprobs, nb_labels, bias))
    trials = fused_trials(neighbours, own + bias, rng.integers(0, labels, rows), "accuracy", labels, [k])
    nb = Neighbours(np.zeros((rows, k, layers), bool), similarity, nb_labels, nb_logprobs)
    assert len({t.mean_exit for t in trials}) > 5  # exits of every kind, exit 0 among them
    for trial in trials:
        _, alpha, epsilon, tau = trial.settings
        policy = FusedPolicy(k, alpha, epsilon, bias.tolist(), 0.0, 0.0, rows, tau)
        ctx = Context(layers, labels, k, policy=policy)
        exits = exit_policy.fused_exit(nb, ctx)
        at_exit = own[np.arange(rows), np.maximum(exits, 1) - 1]
        answers = exit_policy.fused_answer(at_exit, exits, nb, ctx).argmax(axis=1)
        assert answers.tolist() == trial.pred.tolist(), trial.settings
        assert exits.mean() == trial.mean_exit, trial.settings


def test_classify_states_the_settings_each_strategy_reads():
    """probe-conf reads one threshold of the probe policy (it printed all of probe-fused's), key-lr no --k."""
    policy = dataclasses.replace(_probe_policy(), conf_t=probe_policy.NEVER_CONFIDENT)
    conf = describe(resolve("probe-conf", 3), None, policy, None, "k=10")
    assert ": t=never; layer budget" in conf and "k=" not in conf and "shrink" not in conf
    fused = describe(resolve("probe-fused", 3), None, policy, None, "k=10")
    assert "k=2 shrink=" in fused and "probe-conf t=never; layer budget" in fused
    assert describe(resolve("knn-vote", 3), None, policy, None, "k=10") == "k=10"
    assert describe(resolve("key-lr", 3), None, policy, None, "k=10") == "the probe on the retrieval key"
    assert describe(resolve("probe-best", 3), None, policy, None, "k=10") == "no retrieval"
