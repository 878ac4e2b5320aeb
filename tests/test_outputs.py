"""Parsing Molmo v1 answers: points, counts, clock times (molmo_v1.md §7)."""
import doctest

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from molmo_core import outputs
from molmo_core.outputs import (
    ClockTime,
    Point,
    format_points,
    parse_clock,
    parse_count,
    parse_points,
    percent_to_pixels,
    strip_tags,
)

# --------------------------------------------------------------------------- points


def xy(points):
    return [(p.x, p.y) for p in points]


def flat(pairs):
    """pytest.approx does not compare nested tuples: flatten [(x, y), ...]."""
    return [v for pair in pairs for v in pair]


@pytest.mark.parametrize(
    "text, expected",
    [
        ('<point x="61.5" y="40.6" alt="cat">cat</point>', [(61.5, 40.6)]),
        ('<points x1="10.0" y1="20.0" x2="30.5" y2="40.5" alt="dogs">dogs</points>', [(10.0, 20.0), (30.5, 40.5)]),
        # several tags in one answer, reading order kept
        ('A <point x="90.0" y="1.0" alt="a">a</point> and <point x="5.0" y="6.0" alt="b">b</point>', [(90.0, 1.0), (5.0, 6.0)]),
        # the counting answer
        ('Counting the <points x1="1.0" y1="2.0" x2="3.0" y2="4.0" x3="5.0" y3="6.0" alt="coins">coins</points> shows a total of 3.',
         [(1.0, 2.0), (3.0, 4.0), (5.0, 6.0)]),
        ("There are none.", []),
        ("", []),
        # integers and spaces inside quotes are fine
        ('<point x=" 7" y="8 " alt="a">a</point>', [(7.0, 8.0)]),
        # out of range: > 100 discarded (official evaluator), negatives never match
        ('<points x1="101.0" y1="5.0" x2="50.0" y2="50.0" x3="-3.0" y3="4.0" alt="a">a</points>', [(50.0, 50.0)]),
        ('<point x="100.0" y="0.0" alt="a">a</point>', [(100.0, 0.0)]),
        # stream cut mid-tag: keep complete pairs only
        ('<points x1="10.0" y1="20.0" x2="30.0" y2="4', [(10.0, 20.0)]),
        ('<points x1="10.0" y1="20.0" x2="30', [(10.0, 20.0)]),
        ('<point x="10.0" y=', []),
        ("<poi", []),
        # malformed: missing y, non-numbers, unclosed quotes, no closing tag
        ('<point x="10.0" alt="a">a</point>', []),
        ('<point x="ten" y="5" alt="a">a</point>', []),
        ('<point x="1.0" y="2.0" alt="a">a', [(1.0, 2.0)]),
        # coordinates outside any tag are ignored
        ('x="10.0" y="20.0"', []),
    ],
)
def test_parse_points_percent(text, expected):
    assert flat(xy(parse_points(text, 100, 100))) == pytest.approx(flat(expected))


def test_parse_points_converts_to_pixels_and_labels():
    text = ('<points x1="25.0" y1="50.0" x2="75.0" y2="10.0" alt="red cup">cups</points> '
            '<point x="50.0" y="50.0">the dog</point>')
    pts = parse_points(text, 640, 480)
    assert pts == [
        Point(160.0, 240.0, "red cup", 1),
        Point(480.0, 48.0, "red cup", 2),
        Point(320.0, 240.0, "the dog", 3),  # no alt: inner text is the label
    ]


@pytest.mark.parametrize("w, h", [(0, 10), (10, -1)])
def test_bad_image_size_is_an_error(w, h):
    with pytest.raises(ValueError, match="Image size must be positive"):
        parse_points("", w, h)
    with pytest.raises(ValueError, match="image.size"):
        percent_to_pixels(1, 1, w, h)


@pytest.mark.parametrize(
    "pts, alt, text, expected",
    [
        ([], "cat", None, "There are none."),
        ([(61.54, 40.56)], "cat", None, '<point x="61.5" y="40.6" alt="cat">cat</point>'),
        ([(50, 9), (10, 90), (50, 1)], "coin", "coins",
         '<points x1="10.0" y1="90.0" x2="50.0" y2="1.0" x3="50.0" y3="9.0" alt="coin">coins</points>'),
    ],
)
def test_format_points(pts, alt, text, expected):
    assert format_points(pts, alt, text) == expected


@pytest.mark.parametrize("pts, alt", [([(100.5, 3)], "a"), ([(-1, 3)], "a"), ([(1, 1)], 'say "hi"'), ([(1, 1)], "<b>")])
def test_format_points_rejects_unparseable_input(pts, alt):
    with pytest.raises(ValueError):
        format_points(pts, alt)


coord = st.floats(min_value=0, max_value=100, allow_nan=False)
label = st.text(st.characters(blacklist_characters='"<>', blacklist_categories=("Cs",)), max_size=20)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(coord, coord), max_size=12), label)
def test_format_then_parse_round_trips(pts, alt):
    parsed = parse_points(format_points(pts, alt), 100, 100)
    assert len(parsed) == len(pts)
    expected = sorted((round(x, 1), round(y, 1)) for x, y in pts)
    assert flat(xy(parsed)) == pytest.approx(flat(expected), abs=1e-9)
    originals = sorted(pts, key=lambda q: (round(q[0], 1), round(q[1], 1)))
    for (px, py), (x, y) in zip(xy(parsed), originals):  # within the 0.1 rounding
        assert abs(px - x) <= 0.05 + 1e-9 and abs(py - y) <= 0.05 + 1e-9
    assert [p.index for p in parsed] == list(range(1, len(pts) + 1))
    assert all(p.label == " ".join(alt.split()) for p in parsed)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_parsers_never_raise_on_text(text):
    for t in (text, f'<points x1="{text}', f'<point x="1" y="2" alt="{text}">{text}'):
        assert isinstance(parse_points(t, 123, 45), list)
        parse_count(t)
        parse_clock(t)
        assert isinstance(strip_tags(t), str)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(coord, coord), min_size=1, max_size=6), st.integers(1, 200))
def test_truncated_stream_never_raises_and_only_loses_points(pts, cut):
    full = format_points(pts, "x")
    prefix = full[: min(cut, len(full))]
    got = parse_points(prefix, 100, 100)
    assert len(got) <= len(pts)
    assert xy(got) == xy(parse_points(full, 100, 100))[: len(got)]


def test_huge_numbers_do_not_raise():
    assert parse_points(f'<point x="{"9" * 5000}" y="1">a</point>', 10, 10) == []
    assert parse_count("9" * 5000) is None


# --------------------------------------------------------------------------- counts


@pytest.mark.parametrize(
    "text, expected",
    [
        ('Counting the <points x1="1.0" y1="2.0" alt="coins">coins</points> shows a total of 24.', 24),
        ("... a total of 3. Wait, a total of 5.", 5),
        ("a total of twelve", 12),
        ("There are none.", 0),
        ("there is no dog in the picture", 0),
        ("none", 0),
        ("7", 7),
        ("7.", 7),
        ("There are three cats.", 3),
        ("There are twenty-four coins.", 24),
        ("There are twenty four coins.", 24),
        ("There is one dog.", 1),
        # no stated number: fall back to the points
        ('<points x1="1.0" y1="2.0" x2="3.0" y2="4.0" alt="cat">cat</points>', 2),
        # numbers inside tags (labels, coordinates) are not counts
        ('<point x="1.0" y="2.0" alt="3 cups">3 cups</point>', 1),
        # ambiguous numbers, no points
        ("There are 3 dogs and 2 cats.", None),
        ("I cannot tell.", None),
        ("", None),
        ("3.5", None),
    ],
)
def test_parse_count(text, expected):
    assert parse_count(text) == expected


# --------------------------------------------------------------------------- clocks


@pytest.mark.parametrize(
    "text, expected",
    [
        ("3:40", ClockTime(3, 40)),
        ("The time shown is 10:08.", ClockTime(10, 8)),
        ("10:08:30", ClockTime(10, 8, 30)),
        ("3:40 PM", ClockTime(15, 40)),
        ("3:40pm", ClockTime(15, 40)),
        ("11:05 a.m.", ClockTime(11, 5)),
        ("12:15 AM", ClockTime(0, 15)),
        ("12:15 PM", ClockTime(12, 15)),
        ("23:59:59", ClockTime(23, 59, 59)),
        ("0:00", ClockTime(0, 0)),
        ("clocks: 9:45", ClockTime(9, 45)),
        # invalid -> None
        ("12:60", None),
        ("24:00", None),
        ("13:00 PM", None),
        ("0:30 AM", None),
        ("10:08:61", None),
        ("3:4", None),
        ("The hands are not visible.", None),
        ("", None),
        ("123:45", None),
    ],
)
def test_parse_clock(text, expected):
    assert parse_clock(text) == expected


def test_clock_time_helpers():
    assert str(ClockTime(3, 5)) == "3:05"
    assert str(ClockTime(3, 5, 9)) == "3:05:09"
    assert ClockTime(0, 0).hour12 == 12
    assert ClockTime(15, 40).same_dial(ClockTime(3, 40, 10))
    assert not ClockTime(15, 40).same_dial(ClockTime(4, 40))


@pytest.mark.parametrize(
    "text, expected",
    [
        ('Counting the <points x1="1.0" y1="2.0" alt="coins">coins</points> shows a total of 1.',
         "Counting the coins shows a total of 1."),
        ('<point x="1.0" y="2.0" alt="cat">the cat</point> is here', "the cat is here"),
        ("no tags", "no tags"),
        ('Cut <points x1="1.0" y1', "Cut "),
    ],
)
def test_strip_tags(text, expected):
    assert strip_tags(text) == expected


def test_doctests():
    result = doctest.testmod(outputs)
    assert result.attempted > 0 and result.failed == 0
