import numpy as np
import pytest

from raee_ops.metrics import METRICS, accuracy, f1_positive, macro_f1, matthews, paired_difference, scores


def test_accuracy_and_f1_on_a_hand_counted_case():
    y = np.array([1, 1, 0, 0, 1])
    p = np.array([1, 0, 0, 1, 1])
    assert accuracy(y, p) == pytest.approx(0.6)
    # positive class: tp=2, predicted=3, actual=3 -> 2*2/6
    assert f1_positive(y, p) == pytest.approx(4 / 6)
    # negative class: tp=1, predicted=2, actual=2 -> 0.5; macro = (0.5 + 2/3) / 2
    assert macro_f1(y, p) == pytest.approx((0.5 + 4 / 6) / 2)
    # a third label neither held nor answered has no F1: the same mean, as scikit-learn's (it was 0, capping at 2/3)
    assert macro_f1(y, p, 3) == pytest.approx((0.5 + 4 / 6) / 2)
    assert macro_f1(y, np.where(p == 0, 2, p), 3) == pytest.approx((0 + 4 / 6 + 0) / 3)  # a label only answered


def test_matthews_matches_the_binary_formula_and_degenerate_cases():
    y = np.array([1, 1, 1, 0, 0, 0, 1, 0])
    p = np.array([1, 1, 0, 0, 0, 1, 1, 0])
    tp, tn, fp, fn = 3, 3, 1, 1
    expected = (tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert matthews(y, p) == pytest.approx(expected)
    assert matthews(y, np.ones_like(y)) == 0.0
    assert matthews(y, y) == pytest.approx(1.0)


def test_paired_difference_is_the_score_gap_with_the_bootstrap_spread_of_the_rows():
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 2, 400)
    assert paired_difference(truth, truth, truth, accuracy, 2) == (0.0, 0.0)  # the same answers never differ
    half_wrong = np.where(np.arange(400) % 2 == 0, truth, 1 - truth)
    gap, se = paired_difference(truth, truth, half_wrong, accuracy, 2)
    assert gap == 0.5
    assert se == pytest.approx(np.sqrt(0.25 / 400), rel=0.15)  # per-row differences 0 or 1, half each
    # paired: two methods wrong on the same rows differ by nothing however the rows are drawn
    same_mistakes = np.where(np.arange(400) % 3 == 0, 1 - truth, truth)
    assert paired_difference(truth, same_mistakes, same_mistakes.copy(), matthews, 2)[1] == 0.0
    shifted = np.where(np.arange(400) % 5 == 0, 1 - truth, truth)
    gap, se = paired_difference(truth, same_mistakes, shifted, matthews, 2, seed=3)
    assert gap == pytest.approx(matthews(truth, same_mistakes) - matthews(truth, shifted)) and 0 < se < 0.1


@pytest.mark.parametrize("num_labels", [2, 3, 6])
def test_every_metric_matches_scikit_learn_one_answer_set_or_thousands_at_once(num_labels):
    """build-db scores each of ~13,500 settings' answers on folds of the reference rows at once (`scores`): the same
    numbers as one at a time, and as scikit-learn's, degenerate answers (one label for every row) included."""
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    rng = np.random.default_rng(num_labels)
    truth = rng.integers(0, num_labels, 40)
    answers = rng.integers(0, num_labels, (300, 40))
    answers[:20] = answers[:20, :1]  # one label for every row
    answers[20] = truth
    reference = {
        "accuracy": accuracy_score,
        "matthews_corr": matthews_corrcoef,
        "macro_f1": lambda y, p: f1_score(y, p, average="macro", zero_division=0),
        "f1": lambda y, p: f1_score(y, p, zero_division=0),
    }
    for name, metric in METRICS.items():
        if name == "f1" and num_labels != 2:
            continue
        at_once = scores(name, truth, answers, num_labels)
        assert at_once.shape == (300,)
        one_by_one = [metric(truth, a, num_labels) for a in answers]
        assert at_once == pytest.approx(one_by_one, abs=1e-12)
        assert one_by_one == pytest.approx([reference[name](truth, a) for a in answers], abs=1e-9)
    assert scores("accuracy", truth, answers.reshape(3, 100, 40), num_labels).shape == (3, 100)
