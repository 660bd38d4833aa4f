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


def test_fused_policy_uses_informative_neighbours_and_exits_early_when_layers_agree():
    rng = np.random.default_rng(1)
    n, num_layers = 300, 4
    labels = rng.integers(0, 2, n)
    # keys cluster by label: neighbours are informative
    centers = rng.normal(size=(2, 16))
    vectors = centers[labels] + rng.normal(0, 0.3, (n, 16))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    # every layer is an equally weak reader (60%): nothing to gain from depth
    noisy = np.where(rng.random((n, num_layers)) < 0.6, labels[:, None], 1 - labels[:, None])
    logprobs = log_softmax(np.stack([noisy == 0, noisy == 1], -1).astype(float) * 2.0)
    policy = fit_fused_policy(vectors, labels, logprobs, 2)
    assert policy.alpha > 0  # the vote helps
    assert policy.loo_accuracy > 0.9
    assert policy.loo_mean_exit < 2.0  # no reason to go deep
    assert np.asarray(policy.bias).shape == (num_layers, 2)
