import numpy as np
import pytest

from raee_ops.errors import RaeeConfigError
from raee_ops.exit_policy import raee, raee_counts, resolve


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
    assert resolve("layer:1", 6).exits(empty, 6).tolist() == [1, 1, 1]
    assert resolve("full", 6).exits(empty, 6).tolist() == [6, 6, 6]
    assert not resolve("full", 6).needs_retrieval and resolve("raee", 6).needs_retrieval
    for bad in ("layer:0", "layer:7", "layer:x", "fastest"):
        with pytest.raises(RaeeConfigError):
            resolve(bad, 6)
