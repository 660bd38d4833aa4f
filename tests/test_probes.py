"""Probe heads on hand-made features: out-of-fold honesty (grouped too), plain-array storage, identity checks, the fit
sample."""

import json
from dataclasses import replace

import numpy as np
import pytest

from raee_ops.calibration import loo_neighbours
from raee_ops.errors import RaeeConfigError
from raee_ops.probe_policy import (
    ESTIMATE_FOLDS,
    ESTIMATE_SHUFFLES,
    HALVINGS,
    Found,
    ProbePolicy,
    _halvings,
    confident_exits,
    estimate_splits,
    fit_probe_policy,
    hindsight,
)
from raee_ops.probes import VIEWS, ProbeSet, _folds, check_probes, fit_probes, in_fit_sample
from raee_ops.tasks import PRESETS

IDENTITY = {"fingerprint": "f", "task": "sst2", "rows": 80}


def features(
    n: int, layers: int, hidden: int, labels: np.ndarray, signal: float, seed: int = 0, view: str = "mean"
) -> np.ndarray:
    """N×L×VIEWS×H: noise, plus the label along one direction in one view, stronger at later layers."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, layers, len(VIEWS), hidden))
    x[:, :, VIEWS.index(view), 0] += signal * (2 * labels[:, None] - 1) * np.arange(layers)[None, :]
    return x.astype(np.float16)


def test_out_of_fold_answers_are_not_what_a_memorizing_probe_says_in_sample():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 80)  # no signal at all: 80 rows, 300 noise dimensions
    x = features(80, 2, 300, labels, signal=0.0)
    keys = rng.normal(size=(80, 8)).astype(np.float32)
    fitted = fit_probes(x, keys, labels, 2, "accuracy", IDENTITY)
    in_sample = fitted.probes.every_layer(x.transpose(1, 0, 2, 3)).argmax(axis=2) == labels
    out_of_fold = fitted.oof.argmax(axis=2).T == labels
    assert in_sample.mean(axis=1).min() >= 0.85  # the probe memorizes its fit rows
    assert out_of_fold.mean(axis=1).max() <= 0.7  # what it says about rows it did not see is near chance
    assert (in_sample.mean(axis=1) - out_of_fold.mean(axis=1)).min() >= 0.2
    assert max(fitted.probes.oof_metric) <= 0.7


@pytest.mark.parametrize("view, form, pool_index", [("mean", "prompt", 0), ("bare-readout", "bare", 1)])
def test_probes_find_a_signal_and_choose_its_view_and_layer(view, form, pool_index):
    labels = np.random.default_rng(1).integers(0, 2, 120)
    x = features(120, 4, 16, labels, signal=0.8, seed=1, view=view)
    keys = np.random.default_rng(2).normal(size=(120, 8)).astype(np.float32)
    fitted = fit_probes(x, keys, labels, 2, "accuracy", IDENTITY)
    assert fitted.probes.pooling == view  # the view the signal is in: which input form classify must run
    assert (fitted.probes.form, fitted.probes.pool_index) == (form, pool_index)
    assert fitted.probes.oof_metric[-1] >= 0.9 and fitted.probes.oof_metric[0] <= 0.7
    assert fitted.probes.best_layer >= 3
    assert fitted.probes.key_oof_metric <= 0.75  # the keys carry no signal


def test_probes_round_trip_as_plain_arrays_and_refuse_other_tables():
    labels = np.random.default_rng(3).integers(0, 3, 60)
    x = features(60, 2, 6, labels, signal=0.5, seed=3)
    keys = np.random.default_rng(4).normal(size=(60, 5)).astype(np.float32)
    probes = fit_probes(x, keys, labels, 3, "macro_f1", IDENTITY).probes
    raw = probes.to_json()
    assert b"pickle" not in raw and raw.startswith(b"{")
    again = ProbeSet.from_json(raw)
    pooled = x.transpose(1, 0, 2, 3).astype(np.float32)
    np.testing.assert_array_equal(again.every_layer(pooled), probes.every_layer(pooled))
    np.testing.assert_array_equal(again.key.log_probs(keys), probes.key.log_probs(keys))
    assert check_probes(again, IDENTITY, "t") is again
    with pytest.raises(RaeeConfigError, match="fitted for something else: rows 80 \\(expected 81\\)"):
        check_probes(again, IDENTITY | {"rows": 81}, "t")
    with pytest.raises(RaeeConfigError, match="no probe heads"):
        check_probes(None, IDENTITY, "t")
    # probes fitted before the task's fingerprint was recorded (an earlier release's table) are checked without it,
    # as the table's identity is; one that recorded another is refused
    assert check_probes(again, IDENTITY | {"task_fingerprint": "tf"}, "t") is again
    told = ProbeSet.from_json(
        fit_probes(x, keys, labels, 3, "macro_f1", IDENTITY | {"task_fingerprint": "tf"}).probes.to_json()
    )
    with pytest.raises(RaeeConfigError, match="task_fingerprint 'tf' \\(expected 'tg'\\)"):
        check_probes(told, IDENTITY | {"task_fingerprint": "tg"}, "t")


def test_fit_sample_of_a_grown_table_is_a_subset_of_the_old_one():
    ids = [f"row{i}" for i in range(5000)]
    big, small = in_fit_sample(ids, 0.5), in_fit_sample(ids, 0.2)
    assert not (small & ~big).any()
    assert 0.15 < small.mean() < 0.25 and 0.45 < big.mean() < 0.55
    assert in_fit_sample(ids[:3], 1.0).all()


def test_confident_exits_stop_at_the_first_confident_layer_up_to_the_upper_bound():
    confidence = np.array([[0.5, 0.95, 0.99], [0.5, 0.6, 0.7], [0.99, 0.99, 0.99], [0.9, 0.9, 0.9]])
    upper = np.array([3, 3, 0, 1])
    assert confident_exits(confidence, upper, 0.9).tolist() == [2, 3, 0, 1]
    assert confident_exits(confidence, upper, None).tolist() == upper.tolist()
    assert confident_exits(confidence, np.array([1, 2, 3, 3]), 0.99).tolist() == [1, 2, 1, 3]


def _reference_rows(n: int, seed: int) -> tuple[np.random.Generator, np.ndarray, np.ndarray]:
    """A seeded generator, n binary labels and n normalized random keys."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    vectors = rng.normal(size=(n, 8))
    return rng, labels, vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_probe_policy_is_fitted_on_the_reference_and_prefers_cheap_settings():
    n, layers = 200, 4
    _, labels, vectors = _reference_rows(n, 5)
    # every layer's probe is right and confident: the cheapest settings leave at layer 1 or run no layer
    probs = np.full((n, layers, 2), 0.02)
    probs[np.arange(n), :, labels] = 0.98
    key = np.full((n, 2), 0.5)
    policy = fit_probe_policy(vectors, labels, np.log(probs), np.log(key), 2, "accuracy")
    assert policy.loo_metric == 1.0 and policy.loo_mean_exit == 1.0
    assert policy.conf_metric == 1.0 and policy.conf_mean_exit == 1.0


def _deeper_is_better(n: int, layers: int, seed: int) -> tuple[np.ndarray, ...]:
    """Reference rows whose probes are right on a growing share of rows with depth, never confident."""
    rng, labels, vectors = _reference_rows(n, seed)
    probs = np.full((n, layers, 2), 0.4)
    right = rng.random((n, 1)) < np.linspace(0.5, 1.0, layers)[None, :]
    answer = np.where(right, labels[:, None], 1 - labels[:, None])
    probs[np.arange(n)[:, None], np.arange(layers)[None, :], answer] = 0.6
    return vectors, labels, np.log(probs), np.log(np.full((n, 2), 0.5))


def test_probe_policy_takes_the_most_accurate_setting_within_the_layer_budget():
    vectors, labels, probe_lp, key_lp = _deeper_is_better(200, 10, 6)
    fitted = {
        b: fit_probe_policy(vectors, labels, probe_lp, key_lp, 2, "accuracy", layer_budget=b, layer_price=0.0)
        for b in (0.1, 0.35, 0.5, 0.75, 1.0)
    }
    assert fitted[0.5].loo_mean_exit <= 5.0 and fitted[0.5].layer_budget == 0.5
    assert fitted[1.0].loo_mean_exit > 5.0 and fitted[1.0].loo_metric > fitted[0.5].loo_metric
    # the table keeps the frontier: any budget's settings, as build-db would fit them, from the stored policy
    stored = ProbePolicy(**json.loads(json.dumps(fitted[0.35].to_dict())))
    assert stored == fitted[0.35]
    assert len({fitted[b].loo_mean_exit for b in fitted}) >= 3  # the budgets chose different settings
    for budget, policy in fitted.items():  # the cross-validated estimate is of the table's own cost's choice only
        assert stored.within(budget) == replace(policy, estimate=policy.estimate if budget == 0.35 else None)


def test_a_layer_price_spends_layers_only_where_they_buy_the_metric():
    """build-db --layer-price: the setting whose reference score less the price per share of the layers is highest;
    a dearer price never runs more layers, price 0 is the most accurate, and the stored frontier gives any price's
    choice without a refit."""
    layers = 10
    vectors, labels, probe_lp, key_lp = _deeper_is_better(200, layers, 6)
    prices = (0.0, 0.2, 0.5, 0.7, 10.0)
    fitted = {p: fit_probe_policy(vectors, labels, probe_lp, key_lp, 2, "accuracy", layer_price=p) for p in prices}
    front = fitted[0.0].frontier
    assert fitted[0.0].loo_metric == max(point.score for point in front)
    for price, policy in fitted.items():
        values = [point.score - price * point.mean_exit / layers for point in front]
        assert policy.loo_metric - price * policy.loo_mean_exit / layers == pytest.approx(max(values))
        own = policy.estimate if price == 0.0 else None  # the estimate is of the table's own cost's choice only
        assert policy.layer_price == price and fitted[0.0].within(1.0, price) == replace(policy, estimate=own)
    exits = [fitted[p].loo_mean_exit for p in prices]
    assert exits == sorted(exits, reverse=True) and exits[0] > exits[-1]  # dearer layers: fewer of them
    assert fitted[10.0].loo_mean_exit == front[0].mean_exit  # nothing is worth that price: the cheapest point
    assert len(set(exits)) >= 3  # the prices chose different settings


def test_the_cross_validated_estimate_is_not_flattered_by_the_grid_as_the_left_out_score_is():
    """Answers no probe or key predicts: the best of the grid's ~13,500 settings on the rows that chose it scores
    above chance (build-db's left-out score); the choice made on four fifths of those rows and scored on the fifth
    (the Estimate) scores about chance, as probe-best's does."""
    gaps = []
    for seed in range(3):
        rng, labels, vectors = _reference_rows(300, seed)
        probe_lp = np.log(rng.dirichlet([1, 1], size=(300, 6)))
        key_lp = np.log(rng.dirichlet([1, 1], size=300))
        policy = fit_probe_policy(vectors, labels, probe_lp, key_lp, 2, "accuracy", layer_price=0.0)
        assert abs(policy.estimate.metric - 0.5) < 0.06 and abs(policy.estimate.probe_best - 0.5) < 0.06
        gaps.append(policy.loo_metric - policy.estimate.metric)
    assert min(gaps) > 0.02 and np.mean(gaps) > 0.05
    # where depth does pay, the estimate finds it too
    vectors, labels, probe_lp, key_lp = _deeper_is_better(300, 6, 0)
    policy = fit_probe_policy(vectors, labels, probe_lp, key_lp, 2, "accuracy", layer_price=0.0)
    assert policy.estimate.metric > 0.98 and policy.estimate.probe_best == 1.0 and policy.estimate.mean_exit > 5.5
    # with groups, no group is both chosen on and scored on
    groups = np.arange(300) // 3
    assert all(not set(groups[fit]) & set(groups[scored]) for fit, scored in estimate_splits(300, groups))
    assert len(estimate_splits(300, groups)) == ESTIMATE_FOLDS * ESTIMATE_SHUFFLES


def test_a_table_without_a_frontier_refuses_another_budget():
    n, layers = 60, 3
    _, labels, vectors = _reference_rows(n, 7)
    probs = np.full((n, layers, 2), 0.5)
    policy = fit_probe_policy(vectors, labels, np.log(probs), np.log(probs[:, 0]), 2, "accuracy")
    older = replace(policy, frontier=None, conf_frontier=None)  # as tables built before frontiers read back
    with pytest.raises(RaeeConfigError, match="rebuild it with build-db"):
        older.within(0.5)


def test_a_layer_keys_layers_count_against_the_budget_and_no_row_leaves_before_them():
    """With a layer-3 key every row runs 3 layers, answered at exit 0 or not: the fit counts them."""
    n, layers = 200, 10
    _, labels, vectors = _reference_rows(n, 8)
    probs = np.full((n, layers, 2), 0.02)  # every layer right and confident: alone, the fit leaves at layer 1
    probs[np.arange(n), :, labels] = 0.98
    args = (vectors, labels, np.log(probs), np.log(np.full((n, 2), 0.5)), 2, "accuracy")
    plain, keyed = fit_probe_policy(*args), fit_probe_policy(*args, key_depth=3)
    assert plain.loo_mean_exit == 1.0
    assert keyed.loo_mean_exit == 3.0 and keyed.loo_metric == 1.0


def _copies(n: int, seed: int, copies: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n rows in groups of `copies` near-copies (same label, almost the same 64-d key); labels random across
    groups, so a row's label says nothing about any other group's."""
    rng = np.random.default_rng(seed)
    group_keys = rng.normal(size=(n // copies, 64))
    keys = np.repeat(group_keys, copies, axis=0) + rng.normal(0, 1e-2, (n, 64))
    labels = np.repeat(rng.integers(0, 2, n // copies), copies)
    return labels, keys / np.linalg.norm(keys, axis=1, keepdims=True), np.arange(n) // copies


def test_leave_one_group_out_keeps_near_copies_from_vouching_for_each_other():
    n, layers = 400, 4
    labels, vectors, groups = _copies(n, 7, copies=4)
    top, _ = loo_neighbours(vectors, np.arange(n), 5, groups)
    assert not (groups[top] == groups[:, None]).any()
    nearest = loo_neighbours(vectors, np.arange(n), 3)[0]
    assert (groups[nearest] == groups[:, None]).all()  # plain: the copies are nearest

    # the probes know nothing (a coin flip at every layer); the copies' labels are the only signal, and a false one
    probs = np.full((n, layers, 2), 0.5)
    key = np.full((n, 2), 0.5)
    args = (vectors, labels, np.log(probs), np.log(key), 2, "accuracy")
    plain, grouped = fit_probe_policy(*args), fit_probe_policy(*args, groups=groups)
    assert plain.loo_metric >= 0.95  # the copies' vote looks perfect ...
    assert grouped.loo_metric <= 0.7  # ... and is worth nothing for a row that has no copy in the table


def test_grouped_folds_keep_groups_whole_so_out_of_fold_answers_stay_honest():
    n = 120
    labels, _, groups = _copies(n, 8, copies=2)
    rng = np.random.default_rng(9)
    x = np.repeat(rng.normal(size=(n // 2, 2, len(VIEWS), 200)), 2, axis=0).astype(np.float16)  # twins, no signal
    keys = rng.normal(size=(n, 4)).astype(np.float32)
    folds = _folds(labels, n, 0, groups)
    assert (folds[::2] == folds[1::2]).all() and len(set(folds.tolist())) == 5
    assert _folds(labels, n, 0, np.arange(n)).tolist() == _folds(labels, n, 0).tolist()  # all singletons: as before
    plain = fit_probes(x, keys, labels, 2, "accuracy", IDENTITY)
    grouped = fit_probes(x, keys, labels, 2, "accuracy", IDENTITY, groups=groups)
    assert min(plain.probes.oof_metric) >= 0.8  # the twin was in the other folds 4 times in 5: memorized
    assert max(grouped.probes.oof_metric) <= 0.7


def test_the_bare_form_is_the_input_alone_with_the_pair_on_its_own_line():
    assert PRESETS["sst2"].render(" a fine film ", suffix=" <mask>", form="bare") == "a fine film <mask>"
    assert PRESETS["rte"].render("A cat sat.", " A cat is sitting. ", form="bare") == "A cat sat.\nA cat is sitting."
    assert PRESETS["rte"].render("A cat sat.", "A cat is sitting.").startswith("Premise: A cat sat.\nHypothesis:")


def test_the_held_out_hindsight_is_not_fooled_by_settings_right_by_luck():
    """On rows whose every signal is noise, the best of the grid's settings scored on the rows it was chosen on
    looks far better than chance; chosen on half and scored on the other half it is at chance, like the default."""
    rows, layers, k = 120, 6, 10
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 2, rows)
    found = Found(
        rng.dirichlet([1.0, 1.0], size=(rows, layers)),
        rng.dirichlet([1.0, 1.0], size=rows),
        rng.integers(0, 2, (rows, k)),
        np.sort(rng.random((rows, k)), axis=1)[:, ::-1],
        rng.random((rows, k, layers)) < 0.5,
    )
    curve = tuple(np.full(layers, 0.5))
    policy = ProbePolicy(
        10, 0.0, 0.0, 0.5, None, None, 0.9, "accuracy", 0, 0, 0, 0, 0, 0, curve=curve, layer_budget=1.0
    )
    default_pred = rng.integers(0, 2, rows)
    bound = hindsight(found, policy, truth, default_pred, "accuracy", [5, 10])
    assert bound.best.score >= 0.6  # the luckiest of thousands of settings on 120 rows
    assert abs(bound.held_out - 0.5) < 0.06 and bound.held_out < bound.best.score - 0.07
    halves = [np.mean(truth[s] == default_pred[s]) for _, s in _halvings(rows, 0)]
    assert bound.default_held_out == pytest.approx(np.mean(halves))
    assert len(halves) == 2 * HALVINGS and all(len(f) + len(s) == rows for f, s in _halvings(rows, 0))
