"""Parse points, counts and clock times out of Molmo v1 answers (pure functions).

Output conventions (``molmo_v1.md`` §7, from ``allenai/molmo`` ``data_formatter.py`` and
``eval/evaluators.py``):

* Coordinates are percentages (0-100) of image width (x) and height (y), one decimal,
  sorted by x then y.
* One point: ``<point x="12.3" y="45.6" alt="cat">cat</point>``; several:
  ``<points x1="…" y1="…" x2="…" y2="…" alt="cats">cats</points>`` (1-based suffixes).
* Nothing found: ``"There are none."``
* Counting: ``"Counting the <points …>coins</points> shows a total of 24."``
* Clocks: ``H:MM`` or ``H:MM:SS``, optionally ``AM``/``PM``.

Nothing here raises on model text: malformed, truncated (a stream cut mid-tag) or
out-of-range output yields fewer points or ``None``, never an exception.

>>> parse_points('<point x="50.0" y="25.0" alt="cat">cat</point>', 200, 100)
[Point(x=100.0, y=25.0, label='cat', index=1)]
>>> parse_count('Counting the <points x1="1.0" y1="2.0" x2="3.0" y2="4.0" alt="a">a</points> shows a total of 2.')
2
>>> parse_clock("The time is 3:40 PM.")
ClockTime(hour=15, minute=40, second=None)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

__all__ = [
    "Point",
    "ClockTime",
    "NO_OBJECTS_TEXT",
    "percent_to_pixels",
    "parse_points",
    "format_points",
    "parse_count",
    "parse_clock",
    "strip_tags",
]

#: The trained answer when nothing matches the query.
NO_OBJECTS_TEXT = "There are none."


@dataclass(frozen=True)
class Point:
    """A point in pixel coordinates.

    Attributes:
        x: horizontal pixel position (0 = left edge, may be fractional).
        y: vertical pixel position (0 = top edge).
        label: the tag's ``alt`` text (or its inner text when ``alt`` is missing).
        index: 1-based position of the point in the whole answer, in reading order.
    """

    x: float
    y: float
    label: str
    index: int


@dataclass(frozen=True)
class ClockTime:
    """A time read off a clock.

    Attributes:
        hour: 0-23; AM/PM answers are converted to 24 h (12 AM -> 0, 3 PM -> 15).
        minute: 0-59.
        second: 0-59, or ``None`` when not given.
    """

    hour: int
    minute: int
    second: int | None = None

    @property
    def hour12(self) -> int:
        """The hour as shown on an analog dial, 1-12.

        >>> ClockTime(0, 5).hour12, ClockTime(15, 0).hour12
        (12, 3)
        """
        return (self.hour - 1) % 12 + 1

    def same_dial(self, other: "ClockTime") -> bool:
        """Whether both times put the hands in the same place (ignores AM/PM and seconds).

        >>> ClockTime(15, 40).same_dial(ClockTime(3, 40))
        True
        """
        return self.hour12 == other.hour12 and self.minute == other.minute

    def __str__(self) -> str:
        text = f"{self.hour}:{self.minute:02d}"
        return text if self.second is None else f"{text}:{self.second:02d}"


# --------------------------------------------------------------------------- points

# An opening <point ...> or <points ...> tag; group "attrs" runs to ">" or, for a
# truncated stream, to the end of the text (then "close" is empty).
_OPEN_TAG = re.compile(r"<points?\b(?P<attrs>[^<>]*)(?P<close>>?)", re.IGNORECASE)
_CLOSE_TAG = re.compile(r"</points?\s*>", re.IGNORECASE)
_NUM = r"([0-9]+(?:\.[0-9]+)?)"
# The official evaluators' pattern: x<digits>="num" followed by y<digits>="num".
# A negative number ("-3.0") or a number cut by the end of a stream never matches.
_XY = re.compile(rf'\bx\d*\s*=\s*"\s*{_NUM}\s*"\s+y\d*\s*=\s*"\s*{_NUM}\s*"', re.IGNORECASE)
_ALT = re.compile(r'\balt\s*=\s*"([^"]*)"', re.IGNORECASE)
# Any tag, complete or cut off at the end, for strip_tags / counting.
_ANY_POINT_TAG = re.compile(r"</?points?\b[^<>]*(?:>|$)", re.IGNORECASE)


def percent_to_pixels(x_percent: float, y_percent: float, width: float, height: float) -> tuple[float, float]:
    """Convert Molmo's 0-100 percent coordinates to pixels (the only place this happens).

    Args:
        x_percent: percent of the image width.
        y_percent: percent of the image height.
        width: image width in pixels (> 0).
        height: image height in pixels (> 0).

    Returns:
        ``(x_pixels, y_pixels)``.

    Raises:
        ValueError: a non-positive image size.

    >>> percent_to_pixels(50.0, 25.0, 640, 480)
    (320.0, 120.0)
    """
    if not (width > 0 and height > 0):
        raise ValueError(
            f"Image size must be positive, got width={width!r}, height={height!r}; "
            "pass the size of the image the model was shown (PIL: image.size)."
        )
    return x_percent * width / 100.0, y_percent * height / 100.0


def parse_points(text: str, width: float, height: float) -> list[Point]:
    """All points in a Molmo answer, in pixels, in the order they appear.

    Handles ``<point>`` and ``<points>`` tags, several tags per answer, missing closing
    tags and a stream cut mid-tag (the complete coordinate pairs so far are kept).
    Points with a coordinate above 100 are discarded, as the official evaluators do;
    negative or malformed numbers never match. Text outside tags is ignored.

    Args:
        text: the model's answer (any string; non-strings give ``[]``).
        width: image width in pixels.
        height: image height in pixels.

    Returns:
        Points with 1-based ``index`` over the whole answer; ``[]`` for "There are none."

    Raises:
        ValueError: a non-positive image size (never for the text).

    >>> parse_points('<points x1="10.0" y1="20.0" x2="30.0" y2="40.0" alt="dog">dog</points>', 100, 100)
    [Point(x=10.0, y=20.0, label='dog', index=1), Point(x=30.0, y=40.0, label='dog', index=2)]
    >>> parse_points('<points x1="10.0" y1="20.0" x2="30', 100, 100)
    [Point(x=10.0, y=20.0, label='', index=1)]
    """
    percent_to_pixels(0.0, 0.0, width, height)  # validate the size even for empty text
    if not isinstance(text, str):
        return []
    points: list[Point] = []
    for tag in _OPEN_TAG.finditer(text):
        attrs = tag.group("attrs")
        alt = _ALT.search(attrs)
        label = alt.group(1) if alt else ""
        if not alt and tag.group("close"):
            # No alt attribute: fall back to the inner text up to the closing tag.
            closing = _CLOSE_TAG.search(text, tag.end())
            next_open = _OPEN_TAG.search(text, tag.end())
            end = closing.start() if closing else len(text)
            if next_open and next_open.start() < end:
                end = next_open.start()
            label = text[tag.end():end]
        label = " ".join(label.split())
        for match in _XY.finditer(attrs):
            x_pct, y_pct = float(match.group(1)), float(match.group(2))
            if not (0.0 <= x_pct <= 100.0 and 0.0 <= y_pct <= 100.0):
                continue  # out of range (also catches inf from absurdly long digit runs)
            x, y = percent_to_pixels(x_pct, y_pct, width, height)
            points.append(Point(x=x, y=y, label=label, index=len(points) + 1))
    return points


def format_points(points_percent: Sequence[tuple[float, float]], alt: str, text: str | None = None) -> str:
    """Write points the way Molmo v1 was trained to (inverse of :func:`parse_points`).

    Coordinates are rounded to one decimal and sorted by x, then y; one point gives a
    ``<point>`` tag, several a ``<points>`` tag with 1-based ``x1``/``y1`` suffixes, none
    gives ``"There are none."``.

    Args:
        points_percent: ``(x, y)`` pairs in percent of width / height, each in 0-100.
        alt: the ``alt`` attribute (usually the lower-cased label).
        text: the inner text; defaults to ``alt``.

    Returns:
        The tag text.

    Raises:
        ValueError: a coordinate outside 0-100, or ``"`` / ``<`` / ``>`` in the labels
            (they would make the tag unparseable).

    >>> format_points([(30.04, 40.0), (10.0, 20.0)], "dog")
    '<points x1="10.0" y1="20.0" x2="30.0" y2="40.0" alt="dog">dog</points>'
    >>> format_points([(5, 5)], "cat", "a cat")
    '<point x="5.0" y="5.0" alt="cat">a cat</point>'
    >>> format_points([], "cat")
    'There are none.'
    """
    text = alt if text is None else text
    for name, value in (("alt", alt), ("text", text)):
        bad = sorted({c for c in value if c in '"<>'})
        if bad:
            raise ValueError(
                f"{name}={value!r} contains {bad}, which would break the point tag; "
                "remove those characters from the label."
            )
    rounded = []
    for x, y in points_percent:
        if not (0.0 <= x <= 100.0 and 0.0 <= y <= 100.0):
            raise ValueError(
                f"Point ({x!r}, {y!r}) is outside 0-100; format_points takes percent "
                "coordinates (x / width * 100, y / height * 100)."
            )
        rounded.append((round(float(x), 1), round(float(y), 1)))
    if not rounded:
        return NO_OBJECTS_TEXT
    rounded.sort()  # the official key x * 10000 + y orders by x, then y
    if len(rounded) == 1:
        (x, y), = rounded
        return f'<point x="{x:.1f}" y="{y:.1f}" alt="{alt}">{text}</point>'
    coords = " ".join(f'x{i}="{x:.1f}" y{i}="{y:.1f}"' for i, (x, y) in enumerate(rounded, start=1))
    return f'<points {coords} alt="{alt}">{text}</points>'


def strip_tags(text: str) -> str:
    """Replace point tags by their inner text, for display.

    A tag cut off at the end of a stream is dropped entirely.

    >>> strip_tags('Counting the <points x1="1.0" y1="2.0" alt="coins">coins</points> shows a total of 1.')
    'Counting the coins shows a total of 1.'
    >>> strip_tags('Here: <point x="1.0" y="2')
    'Here: '
    """
    if not isinstance(text, str):
        return ""
    return _ANY_POINT_TAG.sub("", text)


# --------------------------------------------------------------------------- counts

_WORD_NUMBERS = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen "
        "fourteen fifteen sixteen seventeen eighteen nineteen".split()
    )
}
_TENS = {w: 10 * i for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), start=2)}
_WORD_NUMBER = (
    rf"(?:(?:{'|'.join(_TENS)})(?:[\s-](?:{'|'.join(list(_WORD_NUMBERS)[1:10])}))?"
    rf"|{'|'.join(sorted(_WORD_NUMBERS, key=len, reverse=True))})"
)
_NUMBER = rf"(\d{{1,9}}|{_WORD_NUMBER})"
_TOTAL = re.compile(rf"\ba total of\s+{_NUMBER}\b", re.IGNORECASE)
_NONE = re.compile(r"\bthere (?:are|is) (?:none|no)\b|^\s*(?:none|nothing)\.?\s*$", re.IGNORECASE)
_ANY_NUMBER = re.compile(rf"(?<![\d.,:])\b{_NUMBER}\b(?![.,:]\d)", re.IGNORECASE)


def _number_value(token: str) -> int:
    token = token.lower()
    if token.isdigit():
        return int(token)
    parts = re.split(r"[\s-]+", token)
    if parts[0] in _TENS:
        return _TENS[parts[0]] + (_WORD_NUMBERS[parts[1]] if len(parts) > 1 else 0)
    return _WORD_NUMBERS[parts[0]]


def parse_count(text: str) -> int | None:
    """The count stated in a Molmo answer.

    In order: ``"a total of N"`` (the official evaluator's pattern; the last one wins),
    ``"There are none."`` / ``"there is no …"`` -> 0, a single plain number or number
    word (up to ninety-nine) outside point tags, then the number of parsed points.

    Args:
        text: the model's answer (any string).

    Returns:
        The count, or ``None`` if the answer states none and has no points.

    >>> parse_count("There are none.")
    0
    >>> parse_count("There are twenty-four coins.")
    24
    >>> parse_count("7")
    7
    >>> parse_count("I am not sure.") is None
    True
    """
    if not isinstance(text, str):
        return None
    totals = _TOTAL.findall(text)
    if totals:
        return _number_value(totals[-1])
    # Remove the inner text of point tags too: labels such as "3 cups" are not counts.
    plain = re.sub(r"<points?\b[^<>]*>.*?</points?\s*>", " ", text, flags=re.IGNORECASE | re.DOTALL)
    plain = strip_tags(plain)
    n_points = len(parse_points(text, 100, 100))
    if n_points == 0 and _NONE.search(plain):
        return 0
    numbers = {_number_value(m) for m in _ANY_NUMBER.findall(plain)}
    if len(numbers) == 1:
        return numbers.pop()
    return n_points if n_points else None


# --------------------------------------------------------------------------- clocks

_CLOCK = re.compile(
    r"(?<![\d:])(\d{1,2})\s*:\s*(\d{2})(?:\s*:\s*(\d{2}))?(?![\d:])"
    r"(?:\s*([ap])\.?\s*m\b\.?)?",
    re.IGNORECASE,
)


def parse_clock(text: str) -> ClockTime | None:
    """The first ``H:MM`` / ``H:MM:SS`` time in an answer, with AM/PM handling.

    Like the official ClockBench evaluator, only the first time-like match counts; an
    invalid one (minute 60, hour 25, ``13:00 PM``) gives ``None`` rather than a guess.

    Args:
        text: the model's answer (any string).

    Returns:
        A :class:`ClockTime` (24 h when AM/PM was given), or ``None``.

    >>> parse_clock("The time shown is 10:08:30.")
    ClockTime(hour=10, minute=8, second=30)
    >>> parse_clock("12:15 a.m.")
    ClockTime(hour=0, minute=15, second=None)
    >>> parse_clock("It is 12:60.") is None
    True
    """
    if not isinstance(text, str):
        return None
    match = _CLOCK.search(text)
    if match is None:
        return None
    hour, minute = int(match.group(1)), int(match.group(2))
    second = int(match.group(3)) if match.group(3) else None
    meridiem = (match.group(4) or "").lower()
    if minute > 59 or (second is not None and second > 59):
        return None
    if meridiem:
        if not 1 <= hour <= 12:
            return None
        hour = hour % 12 + (12 if meridiem == "p" else 0)
    elif hour > 23:
        return None
    return ClockTime(hour=hour, minute=minute, second=second)

