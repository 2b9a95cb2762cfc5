import numpy as np
import pytest

from mods.selection.thresholds import keep_above, keep_below


def test_alpha_and_beta_are_strict_thresholds():
    scores = np.array([-1.0, 0.0, 0.5, 2.0])
    assert keep_above(scores, alpha=0.0).tolist() == [False, False, True, True]
    assert keep_below(scores, beta=0.0).tolist() == [True, False, False, False]


def test_fractions_pick_best_and_worst_with_stable_ties():
    scores = np.array([3.0, 1.0, 3.0, 2.0, np.nan])
    assert keep_above(scores, fraction=0.4).tolist() == [True, False, True, False, False]
    assert keep_below(scores, fraction=0.2).tolist() == [False, True, False, False, False]
    assert keep_above(scores, fraction=0.0).sum() == 0


def test_a_threshold_is_required():
    with pytest.raises(ValueError, match="alpha or fraction"):
        keep_above(np.zeros(3))
