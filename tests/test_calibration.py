import numpy as np
import pytest

from raee_ops.calibration import (
    earliest_within,
    fit_fused_policy,
    label_vote,
    log_softmax,
    neighbour_accuracy,
    prior_bias,
)


def _biased_layers(n: int = 400, num_layers: int = 3, seed: int = 0):
    """Layer signal grows with depth; every layer is pushed towards label 0 by a constant offset."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    signal = np.stack([(1.0 + layer) * (2 * labels - 1) + rng.normal(0, 1.5, n) for layer in range(num_layers)], 1)
    logits = np.stack([-signal / 2 + 4.0, signal / 2], axis=-1)  # N×L×2, offset favours label 0
    return labels, log_softmax(logits)


def test_prior_bias_removes_a_constant_label_bias():
    labels, logprobs = _biased_layers()
    raw_rate = (np.argmax(logprobs, -1) == 1).mean(axis=0)
    bias = prior_bias(logprobs, labels, 2)
    fixed_rate = (np.argmax(logprobs + bias, -1) == 1).mean(axis=0)
    assert (raw_rate < 0.2).all()  # the raw layers almost never say label 1
    assert np.abs(fixed_rate - labels.mean()).max() < 0.1
    raw_acc = (np.argmax(logprobs, -1) == labels[:, None]).mean(axis=0)
    fixed_acc = (np.argmax(logprobs + bias, -1) == labels[:, None]).mean(axis=0)
    assert (fixed_acc > raw_acc + 0.2).all()


def test_neighbour_accuracy_exit_and_vote():
    correct = np.array([[[0, 1, 1], [1, 1, 1]]], bool)
    sim = np.array([[1.0, 0.0]])
    acc = neighbour_accuracy(correct, sim)
    assert acc[0] == pytest.approx([0.0, 1.0, 1.0], abs=1e-5)
    assert earliest_within(acc, 0.0).tolist() == [2]
    assert earliest_within(np.array([[0.7, 0.75, 0.8]]), 0.05).tolist() == [2]
    vote = label_vote(np.array([[1, 0, 1]]), np.array([[0.5, 0.5, -0.3]]), 2)
    assert vote[0, 1] == pytest.approx(0.5, abs=1e-4)


def _clustered_keys(labels: np.ndarray, spread: float, rng: np.random.Generator) -> np.ndarray:
    centers = rng.normal(size=(labels.max() + 1, 16))
    vectors = centers[labels] + rng.normal(0, spread, (len(labels), 16))
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _readers(labels: np.ndarray, right: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """N×L×2 log-probs of layers that read the label correctly with probability right[l]."""
    said = np.where(rng.random((len(labels), len(right))) < right, labels[:, None], 1 - labels[:, None])
    return log_softmax(np.stack([said == 0, said == 1], -1).astype(float) * 2.0)


def test_fused_policy_answers_from_retrieval_alone_when_neighbours_are_decisive():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 300)
    vectors = _clustered_keys(labels, 0.3, rng)  # neighbours share the query's label
    logprobs = _readers(labels, np.full(4, 0.6), rng)  # every layer is an equally weak reader
    policy = fit_fused_policy(vectors, labels, logprobs, 2)
    assert policy.tau is not None
    assert policy.loo_accuracy > 0.9
    assert policy.loo_mean_exit < 0.5  # nearly every row skips the backbone
    # the stored bias is each layer's label-prior correction: its mean predicted distribution is the prior
    shifted = np.exp(logprobs + np.asarray(policy.bias)[None])
    mean = (shifted / shifted.sum(axis=2, keepdims=True)).mean(axis=0)  # L×C
    prior = (np.bincount(labels, minlength=2) + 1.0) / (len(labels) + 2.0)
    np.testing.assert_allclose(mean, np.tile(prior, (4, 1)), atol=1e-4)


def test_fused_policy_runs_the_layers_when_neighbours_know_nothing():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 300)
    vectors = _clustered_keys(rng.integers(0, 2, 300), 0.3, rng)  # clusters unrelated to the label
    logprobs = _readers(labels, np.array([0.5, 0.55, 0.7, 0.95]), rng)  # only the last layer reads well
    policy = fit_fused_policy(vectors, labels, logprobs, 2)
    assert policy.loo_accuracy > 0.85
    assert policy.loo_mean_exit > 3.0


def test_fused_policy_is_fitted_to_the_task_metric_not_to_accuracy():
    rng = np.random.default_rng(3)
    labels = (rng.random(400) < 0.1).astype(np.int64)  # 90% label 0
    vectors = _clustered_keys(rng.integers(0, 2, 400), 0.3, rng)  # uninformative neighbours: they vote majority
    signal = np.stack([rng.normal(0, 1, 400), 2 * labels - 1 + rng.normal(0, 1, 400)], 1)
    logprobs = log_softmax(np.stack([-signal, signal], -1) / 2)  # layer 2 carries a real but noisy signal
    by_accuracy = fit_fused_policy(vectors, labels, logprobs, 2, "accuracy")
    by_mcc = fit_fused_policy(vectors, labels, logprobs, 2, "matthews_corr")
    assert by_accuracy.loo_mean_exit < 0.5  # accuracy is content with the majority vote and skips the layers
    assert by_mcc.metric == "matthews_corr" and by_mcc.loo_metric > 0.05
    assert by_mcc.loo_mean_exit > 1.0  # the task metric needs layer 2's signal


def test_loo_neighbours_in_chunks_equal_a_full_sort(monkeypatch):
    from raee_ops import calibration

    monkeypatch.setattr(calibration, "LOO_CHUNK", 7)  # several chunks and a ragged last one
    rng = np.random.default_rng(4)
    vectors = rng.normal(size=(60, 8))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = rng.choice(60, 30, replace=False)
    top, sims = calibration.loo_neighbours(vectors, queries, 5)
    full = vectors[queries] @ vectors.T
    full[np.arange(30), queries] = -np.inf
    np.testing.assert_array_equal(top, np.argsort(-full, axis=1)[:, :5])
    np.testing.assert_allclose(sims, -np.sort(-full, axis=1)[:, :5])
    assert not (top == queries[:, None]).any()


def test_prior_bias_from_a_row_sample_matches_all_rows(monkeypatch):
    from raee_ops import calibration

    labels, logprobs = _biased_layers(n=6000)
    everything = prior_bias(logprobs, labels, 2)
    monkeypatch.setattr(calibration, "BIAS_ROWS", 1500)
    sampled = prior_bias(logprobs, labels, 2)
    assert np.abs(sampled - everything).max() < 0.15
    assert np.abs(everything).max() > 1.0  # a real bias was there to estimate


def test_cheapest_within_takes_the_cheapest_of_the_settings_close_enough_to_the_best():
    from raee_ops.calibration import Trial, cheapest_within

    none = np.zeros(0)
    trials = [
        Trial(0.80, 0.8, 9.0, "deep", none),
        Trial(0.80, 0.8, 6.0, "tie", none),
        Trial(0.79, 0.79, 2.0, "near", none),
    ]
    assert cheapest_within(trials, 0.0).settings == "tie"  # the best score; the cheaper of the two equals
    assert cheapest_within(trials, 0.01).settings == "near"
    assert cheapest_within(trials, 0.005).settings == "tie"


def test_the_frontier_holds_the_most_accurate_affordable_setting_of_every_budget():
    from raee_ops.calibration import Trial, frontier, within_budget

    none = np.zeros(0)
    trials = [
        Trial(0.90, 0.9, 20.0, "deep", none),
        Trial(0.85, 0.85, 9.0, "mid", none),
        Trial(0.85, 0.85, 12.0, "mid, dearer", none),
        Trial(0.80, 0.8, 15.0, "worse and dearer", none),
        Trial(0.7, 0.7, 1.0, "x", none),
    ]
    front = frontier(trials)
    assert [t.settings for t in front] == ["x", "mid", "deep"]  # cheapest first, each better than every cheaper one
    assert within_budget(front, 10.0).settings == "mid"  # deep is better but over the budget
    assert within_budget(front, 30.0).settings == "deep"
    assert within_budget(front, 0.5).settings == "x"  # nothing affordable: the cheapest
    # a price per layer: the point whose score less its layers' price is highest, within the budget
    assert within_budget(front, 30.0, 0.004).settings == "deep"  # 0.90 - 0.080 > 0.85 - 0.036 > 0.7 - 0.004
    assert within_budget(front, 30.0, 0.01).settings == "mid"  # 0.85 - 0.09 > 0.90 - 0.2, 0.7 - 0.01
    assert within_budget(front, 30.0, 0.2).settings == "x"  # layers too dear for any gain here
    assert within_budget(front, 10.0, 0.004).settings == "mid"  # the budget still caps what the price would buy
