"""Evaluation metrics on hand-made cases with known answers (molmo_core.eval.metrics, formats)."""
import numpy as np
import pytest

from molmo_core.eval.formats import get_format, molmo2_points, molmo_v1_points
from molmo_core.eval.metrics import (clock_from_text, count_details, count_from_text, in_mask, match_points,
                                     paired_bootstrap, score_clock, score_count, score_point_bench, score_pointing)


def _masks(shape, *boxes):
    """bool (n, H, W) with one filled box (x0, y0, x1, y1 inclusive) per mask."""
    out = np.zeros((len(boxes), *shape), bool)
    for m, (x0, y0, x1, y1) in zip(out, boxes):
        m[y0:y1 + 1, x0:x1 + 1] = True
    return out


# --------------------------------------------------------------------------- pointing

def test_empty_ground_truth_scores_one_without_predictions_and_zero_with():
    none = score_pointing([], [], masks=np.zeros((0, 8, 8), bool))
    assert (none.precision, none.recall, none.f1) == (1.0, 1.0, 1.0)
    some = score_pointing([(3, 3)], [], masks=np.zeros((0, 8, 8), bool))
    assert (some.precision, some.recall, some.f1) == (0.0, 0.0, 0.0)


def test_no_prediction_for_present_objects_scores_zero():
    s = score_pointing([], [(2, 2)], masks=_masks((8, 8), (0, 0, 4, 4)))
    assert (s.precision, s.recall, s.f1) == (0.0, 0.0, 0.0)


def test_more_predictions_than_objects_lowers_precision_only():
    masks = _masks((20, 20), (0, 0, 4, 4))
    s = score_pointing([(2, 2), (15, 15), (18, 2)], [(2, 2)], masks=masks)
    assert (s.hits, s.n_pred, s.n_gt) == (1, 3, 1)
    assert s.precision == pytest.approx(1 / 3) and s.recall == 1.0 and s.f1 == pytest.approx(0.5)


def test_hungarian_matching_beats_greedy():
    # Objects at x=0 and x=3, predictions at x=2 and x=4. Greedy nearest-first pairs 2->3 (distance 1), then
    # 4->0 (4): total 5, both misses. The optimal assignment pairs 2->0 and 4->3 (total 3): both hits.
    pred, gt = [(2, 0), (4, 0)], [(0, 0), (3, 0)]
    assert sorted(match_points(np.array(pred, float), np.array(gt, float))) == [(0, 0), (1, 1)]
    masks = _masks((1, 6), (0, 0, 2, 0), (3, 0, 5, 0))
    assert score_pointing(pred, gt, masks=masks).f1 == 1.0


def test_hit_is_judged_by_the_matched_objects_mask_not_distance():
    # The prediction is far from the GT point but inside its (large) mask: a hit; no distance threshold.
    masks = _masks((50, 50), (0, 0, 49, 49))
    assert score_pointing([(49, 49)], [(0, 0)], masks=masks).f1 == 1.0
    # Near the GT point but outside its mask: a miss.
    masks = _masks((50, 50), (10, 10, 10, 10))
    assert score_pointing([(11.6, 10)], [(10, 10)], masks=masks).f1 == 0.0


def test_point_on_a_masks_edge_pixel_hits_and_rounding_decides():
    masks = _masks((10, 10), (2, 2, 5, 5))
    assert score_pointing([(5.0, 5.0)], [(3, 3)], masks=masks).f1 == 1.0  # the corner pixel itself
    assert score_pointing([(5.49, 2.0)], [(3, 3)], masks=masks).f1 == 1.0  # rounds to column 5
    assert score_pointing([(5.5, 2.0)], [(3, 3)], masks=masks).f1 == 0.0  # rounds to column 6: outside
    assert score_pointing([(1.5, 3.0)], [(3, 3)], masks=masks).f1 == 1.0  # halves round up: column 2


def test_points_outside_the_image_miss():
    full = _masks((10, 10), (0, 0, 9, 9))
    assert not in_mask(-0.6, 3, full[0]) and not in_mask(9.5, 3, full[0]) and not in_mask(3, 1e9, full[0])
    assert in_mask(-0.4, 3, full[0])  # rounds to column 0
    assert score_pointing([(12, 3)], [(9, 3)], masks=full).f1 == 0.0
    # The distance rule: within the radius but outside the image is still a miss.
    assert score_pointing([(10.6, 3)], [(9, 3)], size=(10, 10), radius=5).f1 == 0.0
    assert score_pointing([(9.4, 3)], [(9, 3)], size=(10, 10), radius=5).f1 == 1.0


def test_distance_rule_uses_five_percent_of_the_diagonal():
    # 300 x 400 image: diagonal 500, radius 25.
    assert score_pointing([(125, 100)], [(100, 100)], size=(300, 400)).f1 == 1.0
    assert score_pointing([(125.5, 100)], [(100, 100)], size=(300, 400)).f1 == 0.0


def test_masks_must_match_points():
    with pytest.raises(ValueError, match="2 masks for 1 ground-truth points"):
        score_pointing([(1, 1)], [(1, 1)], masks=np.zeros((2, 4, 4), bool))
    with pytest.raises(ValueError, match="needs the image size"):
        score_pointing([(1, 1)], [(1, 1)])


def test_point_bench_needs_a_point_and_all_points_inside():
    mask = _masks((10, 10), (0, 0, 4, 9))[0]
    assert score_point_bench([(1, 1), (4, 9)], mask).correct
    assert not score_point_bench([], mask).correct
    assert not score_point_bench([(1, 1), (5, 1)], mask).correct
    assert not score_point_bench([(-1, 1)], mask).correct


# --------------------------------------------------------------------------- formats

def test_v1_and_molmo2_answers_give_pixels():
    v1 = '<points x1="10.0" y1="50.0" x2="100.0" y2="0.0" alt="a">a</points>'
    assert molmo_v1_points(v1, 200, 100) == [(20.0, 50.0), (200.0, 0.0)]
    m2 = '<points coords="1 1 100 500 2 1000 000;2 1 500 500">a</points>'
    assert molmo2_points(m2, 200, 100) == [(20.0, 50.0), (200.0, 0.0), (100.0, 50.0)]
    assert molmo2_points(v1, 200, 100) == molmo_v1_points(v1, 200, 100)  # falls back to v1 forms
    assert molmo2_points('<points coords="1 1 1500 20">a</points>', 200, 100) == []  # off the 0-1000 scale
    with pytest.raises(ValueError, match="Unknown answer format 'v9'"):
        get_format("v9")


# --------------------------------------------------------------------------- counting

@pytest.mark.parametrize("text, count", [
    ("There are none.", 0),  # the v1 evaluator scores this invalid (its regex bug); we count 0
    ("none", 0),
    ("Counting the <points x1=\"1.0\" y1=\"1.0\" alt=\"a\">a</points> shows a total of 1.", 1),
    ("There are 12.", 12),
    ("twenty", 20),
    ("Seven.", 7),
    ("I count a total of 4 dogs in the picture", 4),  # not the last word: the "a total of" rule
    ("a total of three dogs", 3),
    ("There are 4 dogs", None),  # last word is not a number and there is no "a total of"
    ("", None),
    ("<points x1=\"10", None),  # malformed, cut off
])
def test_count_from_text_follows_ai2_rules(text, count):
    assert count_from_text(text) == count


def test_count_scores_exact_close_valid_and_disagreement():
    s = score_count("There are 4.", 3, 3)
    assert (s.exact, s.close, s.valid, s.disagree) == (False, True, True, True)
    assert s.values()["points_accuracy"] == 1.0
    bad = score_count("I am not sure", 0, 2)
    assert (bad.exact, bad.close, bad.valid, bad.disagree) == (False, False, False, False)
    assert score_count("There are none.", 0, 0).values() == {
        "accuracy": 1.0, "close": 1.0, "valid": 1.0, "points_accuracy": 1.0, "text_points_disagree": 0.0}


def test_accuracy_per_count_and_its_mean():
    scores = [score_count("2", 2, 2), score_count("1", 1, 2), score_count("7", 7, 7)]
    assert count_details(scores) == {"per_count_accuracy": {"2": 0.5, "7": 1.0}, "mean_per_count_accuracy": 0.75}


# --------------------------------------------------------------------------- clocks

def _clock(text, h, m, tol=1):
    s = score_clock(text, h, m, tolerance=tol)
    return s.hour, s.minute, s.minute_close, s.overall_exact, s.overall_close


def test_twelve_oclock_accepts_12_and_0():
    assert _clock("The time is 12:00.", 12, 0) == (True, True, True, True, True)
    assert _clock("0:00", 12, 0) == (True, True, True, True, True)
    assert _clock("12:00", 0, 0) == (True, True, True, True, True)
    assert _clock("24:00", 12, 0) == (True, True, True, True, True)  # hours mod 12


def test_minute_59_vs_0_wraps():
    # Same hour, minute 59 vs 0: minute close by the wrap; AI2's overall close takes hour and minute apart.
    assert _clock("3:59", 3, 0) == (True, False, True, False, True)
    # 11:59 vs 12:00 (719 minutes apart on the dial): hour wrong, still overall close.
    assert _clock("11:59", 12, 0) == (False, False, True, False, True)
    assert _clock("12:00", 11, 59) == (False, False, True, False, True)
    # 2 minutes off is not close in test mode, but is under the synthetic +-3 rule.
    assert _clock("3:02", 3, 0) == (True, False, False, False, False)
    assert _clock("3:02", 3, 0, tol=3) == (True, False, True, False, True)
    assert _clock("2:57", 3, 0, tol=3)[4] is False and _clock("11:57", 12, 0, tol=3)[4] is True


def test_ground_truth_minute_60_is_0_and_pm_is_mod_12():
    assert _clock("4:00", 4, 60) == (True, True, True, True, True)
    assert _clock("It is 3:40 PM", 15, 40) == (True, True, True, True, True)


def test_unanswerable_clocks_are_right_only_without_a_colon():
    assert _clock("I cannot see a clock.", -1, -1) == (True,) * 5
    assert _clock("3:40", -1, -1) == (False,) * 5
    assert not score_clock("no clock", -1, -1).answerable


def test_malformed_clock_answers():
    assert clock_from_text("ten past three") is None and clock_from_text("3:") is None
    assert clock_from_text(":40") is None and clock_from_text(None) is None
    assert _clock("ten past three", 3, 10) == (False,) * 5
    assert score_clock("ten past three", 3, 10).parsed is None


# --------------------------------------------------------------------------- bootstrap

def test_paired_bootstrap_is_seeded_and_brackets_the_difference():
    rng = np.random.default_rng(1)
    a = rng.random(50)
    b = a + 0.1 + rng.normal(0, 0.05, 50)
    diff, low, high = paired_bootstrap(a, b)
    assert diff == pytest.approx(float(np.mean(b - a)))
    assert low < diff < high and 0 < low and high < 0.2
    assert paired_bootstrap(a, b) == (diff, low, high)  # fixed seed
    assert paired_bootstrap(a, a) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="equally long"):
        paired_bootstrap([1.0], [1.0, 0.0])
