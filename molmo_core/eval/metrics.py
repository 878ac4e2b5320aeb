"""Per-example metrics for pointing, counting and clock reading, and their aggregates (pure functions).

Definitions follow AI2's evaluators (allenai/molmo `olmo/eval/evaluators.py`; Molmo2 for Point-Bench), read
and re-written here:

* Pointing (PointingEval): predicted and ground-truth points, both in pixels, are paired by Hungarian
  matching on Euclidean distance; a pair is a *hit* when the predicted point, rounded to the nearest pixel,
  lies inside the matched object's mask (outside the image = miss; no distance threshold). precision =
  hits / predictions, recall = hits / objects, F1 = 2PR / (P + R); empty ground truth scores 1 when nothing
  is predicted, else 0. Without masks a stated distance rule replaces the mask test (:func:`distance_rule`).
* Point-Bench (PointBenchEval): correct when at least one point is predicted and every point is in the mask.
* Counting (PointCountEval): the count read from the text (:func:`count_from_text`), exact / close
  (|d| <= 1) / valid, accuracy per ground-truth count and their mean; plus the count of predicted points.
* Clocks (ClockEval, test mode): hour mod 12, minute exact or close (|d| <= tolerance, wrapping at 60),
  overall exact / close (close also when the times are 720 - tolerance .. 719 minutes apart); a ground
  truth of -1 is unanswerable and correct when the answer has no ":".

Every per-example score has ``values()``: the metrics whose mean over examples is the reported number, so
aggregation and the paired bootstrap treat all tasks alike.

>>> s = score_pointing([(10, 10), (90, 90)], [(11, 10)], size=(100, 100), radius=5.0)
>>> s.precision, s.recall, round(s.f1, 3)
(0.5, 1.0, 0.667)
>>> count_from_text("There are none.")
0
>>> score_clock("12:59", 0, 0).values()["overall_close"]
1.0
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "DEFAULT_RADIUS_FRACTION",
    "as_xy",
    "nearest_pixel",
    "in_mask",
    "match_points",
    "distance_rule",
    "PointScore",
    "score_pointing",
    "PointBenchScore",
    "score_point_bench",
    "count_from_text",
    "CountScore",
    "score_count",
    "count_details",
    "clock_from_text",
    "ClockScore",
    "score_clock",
    "mean_values",
    "paired_bootstrap",
]

#: Without masks, a matched prediction is a hit within this fraction of the image diagonal of its point.
DEFAULT_RADIUS_FRACTION = 0.05


# --------------------------------------------------------------------------- geometry


def as_xy(points: Iterable) -> np.ndarray:
    """Points as a float array of shape (n, 2): accepts (x, y) pairs, arrays, or objects with .x and .y.

    >>> as_xy([(1, 2)]).tolist(), as_xy([]).shape
    ([[1.0, 2.0]], (0, 2))
    """
    rows = [(p.x, p.y) if hasattr(p, "x") else tuple(p) for p in points]
    return np.asarray(rows, dtype=np.float64).reshape(-1, 2)


def nearest_pixel(x: float, y: float) -> tuple[int, int]:
    """The pixel (column, row) a point falls on: coordinates rounded to the nearest integer, halves up.

    Pixel (c, r) covers [c - 0.5, c + 0.5) x [r - 0.5, r + 0.5): the convention of the official code,
    which rounds the predicted point before indexing the mask.

    >>> nearest_pixel(10.49, 3.5)
    (10, 4)
    """
    return math.floor(x + 0.5), math.floor(y + 0.5)


def in_mask(x: float, y: float, mask: np.ndarray) -> bool:
    """Whether the point's nearest pixel is set in ``mask`` (H, W); outside the image is False.

    >>> m = np.zeros((4, 4), bool); m[1:3, 1:3] = True
    >>> in_mask(2.4, 1.0, m), in_mask(0.4, 1.0, m), in_mask(-3, 1, m)
    (True, False, False)
    """
    if not (math.isfinite(x) and math.isfinite(y)):
        return False
    col, row = nearest_pixel(x, y)
    height, width = mask.shape
    return 0 <= col < width and 0 <= row < height and bool(mask[row, col])


def match_points(pred: np.ndarray, gt: np.ndarray) -> list[tuple[int, int]]:
    """Hungarian matching of predicted to ground-truth points on Euclidean pixel distance.

    Returns ``min(len(pred), len(gt))`` pairs ``(pred_index, gt_index)`` minimising the total distance.

    >>> match_points(as_xy([(0, 0), (10, 0)]), as_xy([(9, 0), (1, 0)]))
    [(0, 1), (1, 0)]
    """
    if len(pred) == 0 or len(gt) == 0:
        return []
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial.distance import cdist

    rows, cols = linear_sum_assignment(cdist(pred, gt))
    return list(zip(rows.tolist(), cols.tolist()))


def distance_rule(width: int, height: int, fraction: float = DEFAULT_RADIUS_FRACTION) -> float:
    """The hit radius in pixels for data without masks: ``fraction`` of the image diagonal.

    >>> distance_rule(300, 400)
    25.0
    """
    return fraction * math.hypot(width, height)


# --------------------------------------------------------------------------- pointing


@dataclass(frozen=True)
class PointScore:
    """One pointing example.

    Attributes:
        precision, recall, f1: this example's scores.
        n_pred, n_gt, hits: predicted points, ground-truth objects, hits.
        pairs: ``(pred_index, gt_index, hit)`` for every matched pair.
    """

    precision: float
    recall: float
    f1: float
    n_pred: int
    n_gt: int
    hits: int
    pairs: tuple[tuple[int, int, bool], ...] = ()

    def values(self) -> dict[str, float]:
        return {"precision": self.precision, "recall": self.recall, "f1": self.f1}

    def primary(self) -> float:
        return self.f1


def score_pointing(pred: Iterable, gt: Iterable, *, masks: np.ndarray | None = None,
                   size: tuple[int, int] | None = None, radius: float | None = None) -> PointScore:
    """Score predicted points against ground-truth objects (all in pixels).

    Args:
        pred: predicted points, (x, y) pixels.
        gt: one point per ground-truth object, (x, y) pixels.
        masks: bool (n_gt, H, W), one mask per object: the official hit test. ``None``: distance rule.
        size: (width, height) of the image; needed for the distance rule (points outside are misses).
        radius: hit radius in pixels for the distance rule (default :func:`distance_rule` of ``size``).

    Returns:
        A :class:`PointScore`.

    Raises:
        ValueError: masks that do not match the points, or no masks and no size.

    >>> m = np.zeros((1, 5, 5), bool); m[0, 4, 4] = True           # the mask's corner (edge) pixel
    >>> score_pointing([(4.4, 4.4)], [(4, 4)], masks=m).f1
    1.0
    >>> score_pointing([], [], masks=np.zeros((0, 5, 5), bool)).f1, score_pointing([(1, 1)], [], size=(5, 5)).f1
    (1.0, 0.0)
    """
    pred_xy, gt_xy = as_xy(pred), as_xy(gt)
    if len(gt_xy) == 0:
        v = 1.0 if len(pred_xy) == 0 else 0.0
        return PointScore(v, v, v, len(pred_xy), 0, 0)
    if masks is not None and len(masks) != len(gt_xy):
        raise ValueError(f"{len(masks)} masks for {len(gt_xy)} ground-truth points; expected one mask per point.")
    if masks is None:
        if size is None:
            raise ValueError("Without masks the distance rule needs the image size (width, height).")
        radius = distance_rule(*size) if radius is None else radius
    pairs = []
    for p, g in match_points(pred_xy, gt_xy):
        x, y = pred_xy[p]
        if masks is not None:
            hit = in_mask(x, y, masks[g])
        else:
            col, row = nearest_pixel(x, y)
            inside = 0 <= col < size[0] and 0 <= row < size[1]
            hit = inside and math.dist((x, y), gt_xy[g]) <= radius
        pairs.append((p, g, bool(hit)))
    hits = sum(h for _, _, h in pairs)
    precision = hits / len(pred_xy) if len(pred_xy) else 0.0
    recall = hits / len(gt_xy)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return PointScore(precision, recall, f1, len(pred_xy), len(gt_xy), hits, tuple(pairs))


@dataclass(frozen=True)
class PointBenchScore:
    """One Point-Bench example: correct when >= 1 point is predicted and every point is in the mask."""

    correct: bool
    n_pred: int
    inside: tuple[bool, ...] = ()

    def values(self) -> dict[str, float]:
        return {"accuracy": float(self.correct)}

    def primary(self) -> float:
        return float(self.correct)


def score_point_bench(pred: Iterable, mask: np.ndarray) -> PointBenchScore:
    """Point-Bench accuracy for one example (``mask``: bool (H, W), the target region).

    >>> m = np.zeros((4, 4), bool); m[:2] = True
    >>> score_point_bench([(1, 1)], m).correct, score_point_bench([(1, 1), (1, 3)], m).correct
    (True, False)
    >>> score_point_bench([], m).correct
    False
    """
    inside = tuple(in_mask(x, y, mask) for x, y in as_xy(pred))
    return PointBenchScore(bool(inside) and all(inside), len(inside), inside)


# --------------------------------------------------------------------------- counting

_NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
_DIGITS = re.compile(r"[0-9]+")
_A_TOTAL_OF = re.compile(r"\ba total of ([0-9]+|[a-z]+)\b")
_NONE = re.compile(r"\bnone\b")


def _number(word: str) -> int | None:
    if _DIGITS.fullmatch(word):
        return int(word)
    return _NUMBER_WORDS.get(word)


def count_from_text(text: str) -> int | None:
    """The count in an answer by AI2's PointCountEval rules, with its "none" branch working.

    On the answer lower-cased, stripped and without a trailing period: (1) the last word as an integer or
    a number word (zero-twenty); (2) "a total of N"; (3) the word "none" -> 0. The official v1 code writes
    the "none" pattern without a raw string (``\\b`` becomes a backspace), so there "There are none." is
    invalid; here it is 0.

    >>> count_from_text("Counting the <points x1='1' y1='2' alt='a'>a</points> shows a total of 12.")
    12
    >>> count_from_text("Seven"), count_from_text("There are a total of 3 cats here"), count_from_text("Hmm")
    (7, 3, None)
    """
    if not isinstance(text, str):
        return None
    t = text.strip().lower()
    if t.endswith("."):
        t = t[:-1]
    words = t.split()
    if words and (n := _number(words[-1])) is not None:
        return n
    total = _A_TOTAL_OF.search(t)
    if total and (n := _number(total.group(1))) is not None:
        return n
    return 0 if _NONE.search(t) else None


@dataclass(frozen=True)
class CountScore:
    """One counting example.

    Attributes:
        gt: the true count.
        text_count: the count read from the answer text (None: no count found, i.e. invalid).
        point_count: the number of points parsed from the answer (Molmo2 counts these).
    """

    gt: int
    text_count: int | None
    point_count: int

    @property
    def exact(self) -> bool:
        return self.text_count == self.gt

    @property
    def close(self) -> bool:
        return self.text_count is not None and abs(self.text_count - self.gt) <= 1

    @property
    def valid(self) -> bool:
        return self.text_count is not None

    @property
    def disagree(self) -> bool:
        """A count was stated and it is not the number of points given."""
        return self.valid and self.text_count != self.point_count

    def values(self) -> dict[str, float]:
        return {"accuracy": float(self.exact), "close": float(self.close), "valid": float(self.valid),
                "points_accuracy": float(self.point_count == self.gt), "text_points_disagree": float(self.disagree)}

    def primary(self) -> float:
        return float(self.exact)


def score_count(text: str, point_count: int, gt: int,
                count: Callable[[str], int | None] | None = None) -> CountScore:
    """Score a counting answer: the text count against ``gt``, and the number of its points.

    ``count`` reads the count from the text (default :func:`count_from_text`, AI2's v1 rules; Molmo2 answers
    use :func:`molmo_core.outputs.parse_molmo2_count` through `formats.COUNT_PARSERS`).

    >>> s = score_count("There are none.", 0, 0)
    >>> s.exact, s.valid, s.disagree
    (True, True, False)
    >>> score_count("I see 4", 3, 3).values()["close"], score_count("4 of them", 4, 4).valid
    (1.0, False)
    """
    return CountScore(gt=int(gt), text_count=(count or count_from_text)(text), point_count=int(point_count))


def count_details(scores: Sequence[CountScore]) -> dict:
    """Accuracy per ground-truth count (``correct_k``) and their mean.

    >>> count_details([score_count("2", 2, 2), score_count("3", 3, 2), score_count("5", 5, 5)])
    {'per_count_accuracy': {'2': 0.5, '5': 1.0}, 'mean_per_count_accuracy': 0.75}
    """
    by_count: dict[int, list[float]] = {}
    for s in scores:
        by_count.setdefault(s.gt, []).append(float(s.exact))
    per = {str(k): float(np.mean(v)) for k, v in sorted(by_count.items())}
    return {"per_count_accuracy": per, "mean_per_count_accuracy": float(np.mean(list(per.values()))) if per else 0.0}


# --------------------------------------------------------------------------- clocks

_LEADING = re.compile(r"^[0-9]+")
_TRAILING = re.compile(r"[0-9]+$")


def clock_from_text(text: str) -> tuple[int, int] | None:
    """(hour, minute) read as ClockEval does: split on the first ":", the hour is the last word before it,
    the minute the first word after it (their trailing / leading digits). None when either is missing.

    >>> clock_from_text("The time is 10:08:30 PM."), clock_from_text("about 3 : 40"), clock_from_text("noon")
    ((10, 8), (3, 40), None)
    """
    if not isinstance(text, str) or ":" not in text:
        return None
    before, after = text.split(":", 1)
    hour_words, minute_words = before.split(), after.split()
    hour = _TRAILING.search(hour_words[-1]) if hour_words else None
    minute = _LEADING.search(minute_words[0]) if minute_words else None
    if hour is None or minute is None:
        return None
    return int(hour.group()), int(minute.group())


@dataclass(frozen=True)
class ClockScore:
    """One clock example (``answerable`` False: the ground truth is -1, no time can be read)."""

    hour: bool
    minute: bool
    minute_close: bool
    overall_exact: bool
    overall_close: bool
    parsed: tuple[int, int] | None
    answerable: bool = True

    def values(self) -> dict[str, float]:
        return {"hour": float(self.hour), "minute": float(self.minute), "minute_close": float(self.minute_close),
                "overall_exact": float(self.overall_exact), "overall_close": float(self.overall_close)}

    def primary(self) -> float:
        return float(self.overall_close) + float(self.overall_exact)


def score_clock(text: str, gt_hour: int, gt_minute: int, tolerance: int = 1) -> ClockScore:
    """Score a clock answer by ClockEval's test-mode rules.

    Ground truth hour 12 -> 0 and minute 60 -> 0; hours compare mod 12; the minute is close within
    ``tolerance`` minutes, wrapping at the hour (59 vs 0 is 1 apart); overall close = hour right and
    minute close, or the two times 720 - tolerance .. 719 minutes apart on the 12-hour dial (11:59 vs 12:00).
    ``tolerance`` is 1 for real photos, 3 for synthetic clocks. A ground truth hour of -1 is unanswerable:
    every metric is 1 when the answer has no ":", else 0.

    Args:
        text: the model's answer.
        gt_hour: 0-24, or -1 for an unanswerable item.
        gt_minute: 0-60 (ignored when unanswerable).
        tolerance: minutes for "close".

    Returns:
        A :class:`ClockScore`.

    >>> s = score_clock("It is 12:00.", 0, 0); s.hour, s.overall_exact
    (True, True)
    >>> s = score_clock("3:59", 3, 0); s.minute_close, s.overall_close
    (True, True)
    >>> score_clock("I cannot tell", -1, -1).overall_exact
    True
    """
    if gt_hour == -1:
        ok = not (isinstance(text, str) and ":" in text)
        return ClockScore(ok, ok, ok, ok, ok, None, answerable=False)
    parsed = clock_from_text(text)
    if parsed is None:
        return ClockScore(False, False, False, False, False, None)
    gh, gm = gt_hour % 12, gt_minute % 60
    ph, pm = parsed[0] % 12, parsed[1]
    hour_ok = ph == gh
    dm = abs(pm - gm)
    minute_ok = dm == 0
    minute_close = dm <= tolerance or 60 - tolerance <= dm < 60
    apart = abs((ph * 60 + pm) - (gh * 60 + gm))
    overall_close = (hour_ok and minute_close) or 720 - tolerance <= apart < 720
    return ClockScore(hour_ok, minute_ok, minute_close, hour_ok and minute_ok, overall_close, parsed)


# --------------------------------------------------------------------------- aggregation


def mean_values(per_example: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Mean of each metric over examples (every key of the first example).

    >>> mean_values([{"a": 1.0}, {"a": 0.0}])
    {'a': 0.5}
    """
    if not per_example:
        return {}
    return {k: float(np.mean([v[k] for v in per_example])) for k in per_example[0]}


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, n_resamples: int = 2000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float, float]:
    """Difference of means ``mean(b) - mean(a)`` of paired per-example values, with a bootstrap interval.

    Examples are resampled with replacement (the same resample for both models), ``n_resamples`` times
    from a fixed ``seed``; the interval is the percentile interval at ``level``.

    Returns:
        ``(difference, low, high)``.

    Raises:
        ValueError: different lengths or no examples.

    >>> paired_bootstrap([0, 0, 0, 0], [1, 1, 1, 1])
    (1.0, 1.0, 1.0)
    """
    a_arr, b_arr = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a_arr.shape != b_arr.shape or a_arr.ndim != 1 or len(a_arr) == 0:
        raise ValueError(f"Paired bootstrap needs two equally long, non-empty series; got {a_arr.shape} and "
                         f"{b_arr.shape}.")
    diff = b_arr - a_arr
    rng = np.random.default_rng(seed)
    means = []
    chunk = max(1, 2_000_000 // len(diff))  # bound the index matrix to ~16 MB
    for start in range(0, n_resamples, chunk):
        idx = rng.integers(0, len(diff), size=(min(chunk, n_resamples - start), len(diff)))
        means.append(diff[idx].mean(axis=1))
    boot = np.concatenate(means)
    low, high = np.quantile(boot, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(diff.mean()), float(low), float(high)
