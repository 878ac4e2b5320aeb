"""Parse points, counts and clock times out of Molmo v1 and Molmo2 answers (pure functions).

Output conventions (``molmo_v1.md`` §7, from ``allenai/molmo`` ``data_formatter.py`` and
``eval/evaluators.py``):

* Coordinates are percentages (0-100) of image width (x) and height (y), one decimal,
  sorted by x then y.
* One point: ``<point x="12.3" y="45.6" alt="cat">cat</point>``; several:
  ``<points x1="…" y1="…" x2="…" y2="…" alt="cats">cats</points>`` (1-based suffixes).
* Nothing found: ``"There are none."``
* Counting: ``"Counting the <points …>coins</points> shows a total of 24."``
* Clocks: ``H:MM`` or ``H:MM:SS``, optionally ``AM``/``PM``.

Molmo2 writes points differently (``molmo2.md`` §1.5, ``evaluation.md``; AI2's formatter is
``allenai/molmo2`` ``olmo/preprocessing/point_formatter.py``): integer coordinates on a 0-1000
scale grouped by image index or video timestamp, ``<points alt="…" coords="1 1 073 160 2 173 600">
label</points>`` and ``<tracks coords="…">``. See the "Molmo2" section at the end of this module:
:func:`parse_molmo2_points`, :func:`parse_molmo2_count`, :func:`format_molmo2_points`, and
:func:`parse_any_points`, which returns :class:`Point` objects for either family.

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

import math
import operator
import re
from dataclasses import dataclass
from typing import Hashable, Iterable, Iterator, Mapping, Sequence

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
    # Molmo2
    "MOLMO2_NO_TRACKS_TEXT",
    "MOLMO2_SEPARATORS",
    "Molmo2Point",
    "Molmo2Tag",
    "molmo2_to_pixels",
    "molmo2_pixel_points",
    "parse_molmo2_points",
    "parse_molmo2_count",
    "parse_any_points",
    "molmo2_points_from_frames",
    "molmo2_track_points",
    "format_molmo2_points",
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
# Any tag (v1 <point>/<points>, Molmo2 <points>/<tracks>), complete or cut off at the end, for
# strip_tags / counting.
_ANY_POINT_TAG = re.compile(r"</?(?:points?|tracks)\b[^<>]*(?:>|$)", re.IGNORECASE)


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

    Covers v1 ``<point>`` / ``<points>`` and Molmo2 ``<points>`` / ``<tracks>``. A tag cut off
    at the end of a stream is dropped entirely.

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


# --------------------------------------------------------------------------- Molmo2
#
# Format (AI2's ``UnifiedPointFormatter``, pointing formats "html-v1" and "html-v2"):
#
#   <points alt="ALT" coords="GROUP SEP GROUP ...">LABEL</points>      alt is optional
#   <tracks coords="GROUP SEP GROUP ...">LABEL</tracks>                  tracking (video)
#   GROUP = F ID X Y [ID X Y ...]
#
# * F: the 1-based image index ("1", "2", ...) for images, or the timestamp in seconds written
#   with one decimal ("0.5", "12.0") for video and tracks.
# * ID: object id. Pointing numbers the points 1, 2, ... across all groups, each group's points
#   sorted by (x, y) after rounding; tracking keeps an object's id in every frame (ids given in
#   order of first appearance) and writes each frame's points by id.
# * X Y: integers on a 0-1000 scale of the image width / height, written "%03d" ("073", "1000").
# * SEP: "\t" in pretraining (html-v1), ";" in SFT (html-v2, what released models write); AI2's
#   parser also accepts ":" and ",".
# * Answers: the bare tag, "Counting the <points ...>...</points> shows a total of N.",
#   "There are N <points ...>...</points>.", or "There are none." when nothing is found
#   (and "No tracks available." for a tracking target without tracks).
#
# Parsing rules (documented in parse_molmo2_points): malformed pieces are dropped, never raised.

#: What AI2's Molmo2 formatter writes for a tracking query when there is nothing to track.
MOLMO2_NO_TRACKS_TEXT = "No tracks available."

#: Characters that separate frame groups inside ``coords`` ("\t" html-v1, ";" html-v2).
MOLMO2_SEPARATORS = ("\t", ";", ":", ",")

_MOLMO2_KINDS = ("points", "tracks")
_FRAME_KINDS = ("image", "timestamp")
_MODES = ("point", "point_then_count", "count_then_point")

# An opening Molmo2 tag; "attrs" runs to ">" or, for a truncated stream, to the end of the text.
_M2_OPEN = re.compile(r"<(?P<kind>points|tracks)\b(?P<attrs>[^<>]*)(?P<close>>?)", re.IGNORECASE)
# Any opening / closing point tag of either family, to find where an inner label ends.
_ANY_OPEN = re.compile(r"<(?:points?|tracks)\b", re.IGNORECASE)
_ANY_CLOSE = re.compile(r"</(?:points?|tracks)\s*>", re.IGNORECASE)
# name="value", where the closing quote may be missing at the end of a truncated stream.
_ATTR = re.compile(r'([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*"([^"]*)("?)')
# Frame groups are split on the four separators; line breaks are accepted as separators too.
_GROUP_SEP = re.compile(r"[\t;:,\r\n]")
# Tokens (ASCII digits only; lengths are capped so that int() / float() never blow up).
_FRAME_TOKEN = re.compile(r"[0-9]{1,9}(?:\.[0-9]{1,9})?")
_ID_TOKEN = re.compile(r"[0-9]{1,9}")
_COORD_TOKEN = re.compile(r"[0-9]{3,4}")
# A partial token at the very end of a cut-off coords value.
_TRAILING_PARTIAL = re.compile(r"[^\s;:,]+$")


@dataclass(frozen=True)
class Molmo2Point:
    """One Molmo2 point, in the model's own units.

    Attributes:
        frame: the 1-based image index (images) or the timestamp in seconds (video, tracks).
        object_id: the id written before the coordinates (``>= 0``).
        x: 0-1000, fraction of the image width times 1000 (0 = left edge).
        y: 0-1000, fraction of the image height times 1000 (0 = top edge).
    """

    frame: float
    object_id: int
    x: float
    y: float

    def to_pixels(self, width: float, height: float) -> tuple[float, float]:
        """``(x, y)`` in pixels of an image of ``width`` x ``height`` (see :func:`molmo2_to_pixels`).

        >>> Molmo2Point(frame=1, object_id=1, x=500, y=250).to_pixels(640, 480)
        (320.0, 120.0)
        """
        return molmo2_to_pixels(self.x, self.y, width, height)


@dataclass(frozen=True)
class Molmo2Tag:
    """One ``<points>`` or ``<tracks>`` tag of a Molmo2 answer.

    Attributes:
        kind: ``"points"`` or ``"tracks"``.
        label: the inner text, exactly as written (the ``label="…"`` attribute for a
            self-closing ``<points … />``; ``""`` when there is none).
        alt: the ``alt`` attribute, or ``None`` when absent.
        frame_kind: ``"timestamp"`` for ``<tracks>`` and whenever a frame is written with a
            decimal point (``"0.5"``), else ``"image"`` (1-based image indices).
        points: the valid points in the order written.
    """

    kind: str
    label: str
    alt: str | None
    frame_kind: str
    points: tuple[Molmo2Point, ...]

    def by_frame(self) -> dict[float, list[Molmo2Point]]:
        """Points grouped by frame (image index or timestamp), frames in ascending order.

        >>> tag = parse_molmo2_points('<points coords="2 1 100 200;1 2 300 400">a</points>')[0]
        >>> [(f, len(ps)) for f, ps in tag.by_frame().items()]
        [(1.0, 1), (2.0, 1)]
        """
        frames: dict[float, list[Molmo2Point]] = {}
        for point in self.points:
            frames.setdefault(point.frame, []).append(point)
        return {frame: frames[frame] for frame in sorted(frames)}

    def by_object(self) -> dict[int, list[Molmo2Point]]:
        """Each object's trajectory: its points in frame order, ids in ascending order.

        An id repeated within one frame is a formatting error: only its first point in that
        frame is kept (as AI2's track extractor does).

        >>> tag = parse_molmo2_points('<tracks coords="0.0 1 100 100 2 500 500;0.5 1 120 100">car</tracks>')[0]
        >>> [(i, [p.frame for p in ps]) for i, ps in tag.by_object().items()]
        [(1, [0.0, 0.5]), (2, [0.0])]
        """
        objects: dict[int, dict[float, Molmo2Point]] = {}
        for point in self.points:
            objects.setdefault(point.object_id, {}).setdefault(point.frame, point)
        return {
            object_id: [per_frame[f] for f in sorted(per_frame)]
            for object_id, per_frame in sorted(objects.items())
        }


def molmo2_to_pixels(x: float, y: float, width: float, height: float) -> tuple[float, float]:
    """Convert Molmo2's 0-1000 coordinates to pixels: ``x / 1000 * width``, ``y / 1000 * height``.

    Computed as ``x * width / 1000`` (the same value, one rounding step fewer).

    Args:
        x: 0-1000 along the width.
        y: 0-1000 along the height.
        width: image width in pixels (> 0).
        height: image height in pixels (> 0).

    Returns:
        ``(x_pixels, y_pixels)``.

    Raises:
        ValueError: a non-positive image size.

    >>> molmo2_to_pixels(900, 700, 100, 50)
    (90.0, 35.0)
    """
    percent_to_pixels(0.0, 0.0, width, height)  # the same size check and message
    return x * width / 1000.0, y * height / 1000.0


def molmo2_pixel_points(
    points: Iterable[Molmo2Point],
    image_sizes: tuple[float, float] | Sequence[tuple[float, float]],
) -> list[tuple[Molmo2Point, float, float]]:
    """Pixel positions of Molmo2 points, for one image size or one size per image.

    Args:
        points: parsed points (e.g. ``tag.points``).
        image_sizes: a single ``(width, height)`` used for every frame (one image, or video
            frames), or a sequence of ``(width, height)`` indexed by the 1-based image index
            (``image_sizes[0]`` is image 1).

    Returns:
        ``(point, x_pixels, y_pixels)`` in input order. With per-image sizes, points whose
        frame is not an integer image index with a size are skipped.

    Raises:
        ValueError: a non-positive image size.

    >>> pts = parse_molmo2_points('<points coords="1 1 500 500;2 2 500 500">a</points>')[0].points
    >>> [(p.frame, x, y) for p, x, y in molmo2_pixel_points(pts, [(100, 100), (640, 480)])]
    [(1.0, 50.0, 50.0), (2.0, 320.0, 240.0)]
    """
    single = len(image_sizes) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in image_sizes
    )
    out = []
    for point in points:
        if single:
            width, height = image_sizes
        else:
            index = point.frame
            if not (float(index).is_integer() and 1 <= index <= len(image_sizes)):
                continue
            width, height = image_sizes[int(index) - 1]
        out.append((point, *molmo2_to_pixels(point.x, point.y, width, height)))
    return out


def _attributes(attrs: str) -> dict[str, tuple[str, bool]]:
    """``name -> (value, quote_closed)``; the first occurrence of a name wins."""
    found: dict[str, tuple[str, bool]] = {}
    for match in _ATTR.finditer(attrs):
        found.setdefault(match.group(1).lower(), (match.group(2), bool(match.group(3))))
    return found


def _parse_coords(value: str) -> tuple[list[Molmo2Point], bool]:
    """Points in a ``coords`` value, and whether any frame was written with a decimal point."""
    points: list[Molmo2Point] = []
    decimal_frames = False
    for group in _GROUP_SEP.split(value):
        tokens = group.split()
        if not tokens or not _FRAME_TOKEN.fullmatch(tokens[0]):
            continue  # empty group, or a frame that is not a number: drop the whole group
        frame = float(tokens[0])
        decimal_frames = decimal_frames or "." in tokens[0]
        i = 1
        while i + 2 < len(tokens):
            object_id, x, y = tokens[i:i + 3]
            if _ID_TOKEN.fullmatch(object_id) and _COORD_TOKEN.fullmatch(x) and _COORD_TOKEN.fullmatch(y):
                if int(x) <= 1000 and int(y) <= 1000:
                    points.append(Molmo2Point(frame, int(object_id), float(int(x)), float(int(y))))
                i += 3  # out of range: the triple is consumed and dropped
            else:
                i += 1  # skip one token and try again (resynchronises after a missing number)
    return points, decimal_frames


def _molmo2_tags(text: str) -> Iterator[tuple[int, int, Molmo2Tag]]:
    """``(start, end, tag)`` for each Molmo2 tag with a ``coords`` attribute; the span covers
    the opening tag, the inner label and the closing tag (when present)."""
    for match in _M2_OPEN.finditer(text):
        raw_attrs = match.group("attrs")
        attrs = _attributes(raw_attrs)
        if "coords" not in attrs:
            continue  # e.g. a Molmo v1 <points x1=… y1=…> tag
        value, quote_closed = attrs["coords"]
        tag_closed = bool(match.group("close"))
        if not quote_closed and not tag_closed:
            # The stream was cut inside coords: the last token may be incomplete ("40" of "400").
            value = _TRAILING_PARTIAL.sub("", value)
        points, decimal_frames = _parse_coords(value)
        kind = match.group("kind").lower()
        self_closing = raw_attrs.rstrip().endswith("/")
        end = match.end()
        if tag_closed and not self_closing:
            closing = _ANY_CLOSE.search(text, match.end())
            next_open = _ANY_OPEN.search(text, match.end())
            label_end = closing.start() if closing else len(text)
            end = closing.end() if closing else len(text)
            if next_open and next_open.start() < label_end:
                label_end = end = next_open.start()
            label = text[match.end():label_end]
        else:
            label = attrs.get("label", ("", True))[0] if self_closing else ""
        alt = attrs.get("alt")
        yield match.start(), end, Molmo2Tag(
            kind=kind,
            label=label,
            alt=alt[0] if alt else None,
            frame_kind="timestamp" if kind == "tracks" or decimal_frames else "image",
            points=tuple(points),
        )


def parse_molmo2_points(text: str) -> list[Molmo2Tag]:
    """Every Molmo2 ``<points coords=…>`` / ``<tracks coords=…>`` tag in an answer, in order.

    Accepts ``alt`` before or after ``coords``, a self-closing ``<points … />`` (label from
    ``label="…"``), several tags per answer, and any of the separators ``\\t ; : ,`` (and line
    breaks) between frame groups. Never raises on the text; these rules decide what is kept:

    * A frame group starts with its frame token (digits, optionally one ``.`` and digits); a
      group whose first token is anything else is dropped.
    * After it, ``ID X Y`` triples are read left to right: ``ID`` 1-9 ASCII digits, ``X`` and
      ``Y`` 3-4 ASCII digits. Where three tokens do not form a triple, one token is skipped and
      reading resumes, so a missing or extra number costs only the damaged point; leftover
      tokens at the end of a group are dropped.
    * A triple with ``X`` or ``Y`` above 1000 is dropped (AI2's parser drops points outside
      the image). Negative, decimal or unpadded (``"73"``) coordinates are not triples.
    * A stream cut inside ``coords`` keeps the complete triples so far (a number touching
      the cut is treated as incomplete).
    * Tags without ``coords`` (Molmo v1 tags) are ignored; see :func:`parse_any_points`.
    * Duplicates are kept as written (see :meth:`Molmo2Tag.by_object` for tracks).

    Args:
        text: the model's answer (any string; non-strings give ``[]``).

    Returns:
        One :class:`Molmo2Tag` per tag that has a ``coords`` attribute (its ``points`` may be
        empty); ``[]`` for "There are none." or text without Molmo2 tags.

    >>> tag, = parse_molmo2_points('<points alt="boats" coords="1 1 073 160 2 173 600">the boats</points>')
    >>> tag.kind, tag.label, tag.alt, tag.frame_kind
    ('points', 'the boats', 'boats', 'image')
    >>> tag.points[1]
    Molmo2Point(frame=1.0, object_id=2, x=173.0, y=600.0)
    >>> [p.frame for p in parse_molmo2_points('<points coords="0.5 1 100 200;12.0 2 300 400">x</points>')[0].points]
    [0.5, 12.0]
    """
    if not isinstance(text, str):
        return []
    return [tag for _, _, tag in _molmo2_tags(text)]


def parse_molmo2_count(text: str) -> int | None:
    """The count stated in a Molmo2 answer (Molmo v1 answers are handled by :func:`parse_count`).

    With Molmo2 tags present, the tags (and their labels) are removed and then, in order:
    ``"a total of N"`` (the last one wins), ``"There are none."`` -> 0 when no point was parsed,
    a single plain number or number word (``"There are 3 <points …>."``), and finally the
    number of parsed points (``<points>``: every point; ``<tracks>``: distinct object ids).
    A stated number wins over the number of points; compare the two yourself to measure how
    often they disagree. Without Molmo2 tags the answer goes to :func:`parse_count` (v1 forms,
    "There are 3 boats.", "There are none.").

    Args:
        text: the model's answer (any string).

    Returns:
        The count, or ``None`` when there is neither a stated count nor any point.

    >>> parse_molmo2_count('Counting the <points coords="1 1 100 200 2 300 400">cups</points> shows a total of 2.')
    2
    >>> parse_molmo2_count('There are 2 <points coords="1 1 100 200 2 300 400">3 cups</points>.')
    2
    >>> parse_molmo2_count("There are none.")
    0
    """
    if not isinstance(text, str):
        return None
    spans = list(_molmo2_tags(text))
    if not spans:
        return parse_count(text)
    pieces, last, n_points = [], 0, 0
    for start, end, tag in spans:
        pieces.append(text[last:start])
        last = end
        if tag.kind == "tracks":
            n_points += len({p.object_id for p in tag.points})
        else:
            n_points += len(tag.points)
    pieces.append(text[last:])
    plain = " ".join(pieces)
    # Also drop any v1 tags (with their inner text) and anything tag-like left over.
    plain = re.sub(r"<points?\b[^<>]*>.*?</points?\s*>", " ", plain, flags=re.IGNORECASE | re.DOTALL)
    plain = strip_tags(plain)
    totals = _TOTAL.findall(plain)
    if totals:
        return _number_value(totals[-1])
    if n_points == 0 and _NONE.search(plain):
        return 0
    numbers = {_number_value(m) for m in _ANY_NUMBER.findall(plain)}
    if len(numbers) == 1:
        return numbers.pop()
    return n_points if n_points else None


def parse_any_points(
    text: str,
    width: float,
    height: float,
    *,
    family: str = "auto",
    frame: float | None = None,
) -> list[Point]:
    """Pixel points for one image from a Molmo v1 or Molmo2 answer, so callers treat both alike.

    Args:
        text: the model's answer (any string).
        width: image width in pixels.
        height: image height in pixels.
        family: ``"molmo2"`` (Molmo2 tags only), ``"v1"`` (same as :func:`parse_points`), or
            ``"auto"``: Molmo2 points when the answer has any, else the v1 forms (the order
            AI2's Molmo2 extractors use).
        frame: keep only Molmo2 points of this image index / timestamp; ``None`` keeps all
            (a single-image answer has only frame 1). Ignored for v1 answers.

    Returns:
        :class:`Point` objects in reading order with 1-based ``index``; the label is the tag's
        ``alt`` (or its inner text when ``alt`` is missing), whitespace collapsed.

    Raises:
        ValueError: a non-positive image size or an unknown ``family`` (never for the text).

    >>> parse_any_points('<points coords="1 1 500 250">cat</points>', 200, 100)
    [Point(x=100.0, y=25.0, label='cat', index=1)]
    >>> parse_any_points('<point x="50.0" y="25.0" alt="cat">cat</point>', 200, 100)
    [Point(x=100.0, y=25.0, label='cat', index=1)]
    """
    if family not in ("auto", "v1", "molmo2"):
        raise ValueError(f"family must be 'auto', 'v1' or 'molmo2', got {family!r}.")
    percent_to_pixels(0.0, 0.0, width, height)  # validate the size even for empty text
    if not isinstance(text, str):
        return []
    if family != "v1":
        tags = parse_molmo2_points(text)
        if family == "molmo2" or any(tag.points for tag in tags):
            points: list[Point] = []
            for tag in tags:
                label = " ".join((tag.alt if tag.alt is not None else tag.label).split())
                for p in tag.points:
                    if frame is None or p.frame == frame:
                        x, y = molmo2_to_pixels(p.x, p.y, width, height)
                        points.append(Point(x=x, y=y, label=label, index=len(points) + 1))
            return points
    return parse_points(text, width, height)


def _check_coordinate(x: float, y: float) -> tuple[int, int]:
    if not (0.0 <= x <= 1000.0 and 0.0 <= y <= 1000.0):  # also rejects NaN
        raise ValueError(
            f"Point ({x!r}, {y!r}) is outside 0-1000; Molmo2 coordinates are "
            "x / width * 1000 and y / height * 1000."
        )
    return round(float(x)), round(float(y))


def molmo2_points_from_frames(frames: Mapping[float, Sequence[tuple[float, float]]]) -> list[Molmo2Point]:
    """Number pointing targets the way AI2's formatter does.

    Coordinates are rounded to integers first, then each frame's points are sorted by
    ``(x, y)`` and numbered 1, 2, … continuing across frames in ascending frame order.

    Args:
        frames: image index (1-based) or timestamp -> ``(x, y)`` points on the 0-1000 scale.

    Returns:
        Points ready for :func:`format_molmo2_points`.

    Raises:
        ValueError: a coordinate outside 0-1000.

    >>> [(p.object_id, p.x, p.y) for p in molmo2_points_from_frames({1: [(911, 800), (900.2, 400)]})]
    [(1, 900, 400), (2, 911, 800)]
    """
    out: list[Molmo2Point] = []
    for frame in sorted(frames):
        for x, y in sorted(_check_coordinate(x, y) for x, y in frames[frame]):
            out.append(Molmo2Point(frame=frame, object_id=len(out) + 1, x=x, y=y))
    return out


def molmo2_track_points(frames: Mapping[float, Mapping[Hashable, tuple[float, float]]]) -> list[Molmo2Point]:
    """Number tracking targets the way AI2's formatter does.

    Frames are taken in time order; within a frame the objects are ordered by their rounded
    ``(x, y)``; an object gets the next id (1, 2, …) the first time it appears and keeps it in
    later frames. Leave out occluded points and empty frames before calling (AI2 skips them).

    Args:
        frames: timestamp in seconds -> {your object key: ``(x, y)`` on the 0-1000 scale}.

    Returns:
        Points ready for ``format_molmo2_points(..., kind="tracks")``.

    Raises:
        ValueError: a coordinate outside 0-1000.

    >>> pts = molmo2_track_points({0.0: {"dog": (500, 200), "cat": (200, 100)}, 1.0: {"dog": (50, 50)}})
    >>> [(p.frame, p.object_id, p.x) for p in pts]
    [(0.0, 1, 200), (0.0, 2, 500), (1.0, 2, 50)]
    """
    ids: dict[Hashable, int] = {}
    out: list[Molmo2Point] = []
    for frame in sorted(frames):
        objects = sorted(((_check_coordinate(*xy), key) for key, xy in frames[frame].items()),
                         key=lambda item: item[0])
        for (x, y), key in objects:
            object_id = ids.setdefault(key, len(ids) + 1)
            out.append(Molmo2Point(frame=frame, object_id=object_id, x=x, y=y))
    return sorted(out, key=lambda p: (p.frame, p.object_id))


def _format_frame(frame: float, frame_kind: str) -> str:
    try:
        value = float(frame)
    except (TypeError, ValueError):
        value = math.nan
    if frame_kind == "image":
        if not (value.is_integer() and value >= 1):
            raise ValueError(f"Image index {frame!r} must be a whole number >= 1 (image indices are 1-based).")
        text = str(int(value))
    else:
        text = "%.1f" % value if value >= 0 else "-"  # AI2's DefaultTimestampFormatter
    if not _FRAME_TOKEN.fullmatch(text):  # what the parser reads back: at most 9 digits before "."
        raise ValueError(f"Frame {frame!r} must be a finite number in [0, 1e9).")
    return text


def format_molmo2_points(
    points: Iterable[Molmo2Point],
    label: str,
    *,
    alt: str | None = None,
    kind: str = "points",
    frame_kind: str | None = None,
    separator: str = ";",
    mode: str = "point",
) -> str:
    """Write Molmo2 points the way AI2's formatter does (inverse of :func:`parse_molmo2_points`).

    Object ids are written as given; use :func:`molmo2_points_from_frames` or
    :func:`molmo2_track_points` to number them like AI2. Frames are written in ascending order
    (image indices as ``"2"``, timestamps with one decimal, ``"%.1f"``); within a frame points
    are ordered by ``(object_id, x, y)``; coordinates are rounded to integers and written
    ``"%03d"``. For integer coordinates and timestamps with at most one decimal, parsing the
    result gives back exactly these points in that order.

    Args:
        points: the points (``x``, ``y`` on the 0-1000 scale).
        label: the inner text.
        alt: the ``alt`` attribute, written before ``coords``; ``None`` leaves it out.
        kind: ``"points"`` or ``"tracks"``.
        frame_kind: ``"image"`` (1-based indices) or ``"timestamp"`` (seconds); defaults to
            ``"timestamp"`` for tracks and ``"image"`` for points.
        separator: between frame groups, one of :data:`MOLMO2_SEPARATORS`; ``";"`` (html-v2,
            SFT) by default, ``"\\t"`` for html-v1.
        mode: ``"point"`` (the bare tag), ``"point_then_count"`` ("Counting the … shows a total
            of N.") or ``"count_then_point"`` ("There are N ….") ; tracks take ``"point"`` only.

    Returns:
        The answer text; ``"There are none."`` (points) or ``"No tracks available."`` (tracks)
        when there are no points.

    Raises:
        ValueError: a bad option, a coordinate outside 0-1000, a negative or non-integer object
            id, an image index below 1 or not whole, or ``"`` / ``<`` / ``>`` in the labels.

    >>> format_molmo2_points(molmo2_points_from_frames({1: [(911, 800), (900, 400)]}), "boats")
    '<points coords="1 1 900 400 2 911 800">boats</points>'
    >>> pts = molmo2_points_from_frames({0.5: [(73, 160)], 1.0: [(173, 600)]})
    >>> format_molmo2_points(pts, "boats", alt="boat", frame_kind="timestamp", mode="point_then_count")
    'Counting the <points alt="boat" coords="0.5 1 073 160;1.0 2 173 600">boats</points> shows a total of 2.'
    """
    if kind not in _MOLMO2_KINDS:
        raise ValueError(f"kind must be one of {_MOLMO2_KINDS}, got {kind!r}.")
    frame_kind = frame_kind or ("timestamp" if kind == "tracks" else "image")
    if frame_kind not in _FRAME_KINDS:
        raise ValueError(f"frame_kind must be one of {_FRAME_KINDS}, got {frame_kind!r}.")
    if kind == "tracks" and frame_kind != "timestamp":
        raise ValueError("Tracks are written with timestamps; use frame_kind='timestamp'.")
    if separator not in MOLMO2_SEPARATORS:
        raise ValueError(f"separator must be one of {MOLMO2_SEPARATORS}, got {separator!r}.")
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}.")
    if kind == "tracks" and mode != "point":
        raise ValueError("Tracks are written with mode='point' only (as AI2's formatter does).")
    for name, value in (("label", label), ("alt", alt or "")):
        bad = sorted({c for c in value if c in '"<>'})
        if bad:
            raise ValueError(
                f"{name}={value!r} contains {bad}, which would break the point tag; "
                "remove those characters from the label."
            )

    groups: dict[str, tuple[float, list[tuple[int, int, int]]]] = {}
    for point in points:
        try:
            object_id = operator.index(point.object_id)  # ints, numpy ints; not floats
        except TypeError:
            object_id = -1
        if isinstance(point.object_id, bool) or not 0 <= object_id < 10**9:
            raise ValueError(f"object_id {point.object_id!r} must be an integer in [0, 1e9).")
        x, y = _check_coordinate(point.x, point.y)
        frame_text = _format_frame(point.frame, frame_kind)
        groups.setdefault(frame_text, (float(frame_text), []))[1].append((object_id, x, y))
    if not groups:
        return MOLMO2_NO_TRACKS_TEXT if kind == "tracks" else NO_OBJECTS_TEXT

    written = []
    for frame_text, (_, triples) in sorted(groups.items(), key=lambda item: item[1][0]):
        written.append(" ".join([frame_text] + [f"{i} {x:03d} {y:03d}" for i, x, y in sorted(triples)]))
    attrs = "" if alt is None else f' alt="{alt}"'
    tag = f'<{kind}{attrs} coords="{separator.join(written)}">{label}</{kind}>'
    count = sum(len(triples) for _, triples in groups.values())
    if mode == "point_then_count":
        return f"Counting the {tag} shows a total of {count}."
    if mode == "count_then_point":
        return f"There are {count} {tag}."
    return tag
