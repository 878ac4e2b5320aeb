"""Parsing and writing Molmo2 point answers (molmo2.md §1.5, evaluation.md "Formats of model answers").

The example cases follow the situations that AI2's formatter tests cover
(``allenai/molmo2`` ``tests/preprocessing/test_point_formatter.py``), with our own values:
single image (sorting by x then y, ties decided after rounding), several images, video
timestamps, tracks (one object, several objects, ids stable while objects come and go, empty
frames), self-closing tags, the tab / ";" separators and "There are none.".
"""
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from molmo_core.outputs import (
    MOLMO2_NO_TRACKS_TEXT,
    MOLMO2_SEPARATORS,
    Molmo2Point,
    Molmo2Tag,
    Point,
    format_molmo2_points,
    molmo2_pixel_points,
    molmo2_points_from_frames,
    molmo2_to_pixels,
    molmo2_track_points,
    parse_any_points,
    parse_count,
    parse_molmo2_count,
    parse_molmo2_points,
    strip_tags,
)


def triples(text):
    """(frame, id, x, y) of every point in every tag, in reading order."""
    return [(p.frame, p.object_id, p.x, p.y) for tag in parse_molmo2_points(text) for p in tag.points]


def xy(points):
    return [(p.x, p.y) for p in points]


# --------------------------------------------------------------------------- writing (AI2 situations)


@pytest.mark.parametrize(
    "frames, expected",
    [
        # one point
        ({1: [(420, 610)]}, '<points coords="1 1 420 610">mug</points>'),
        # sorted by x: the second-listed point comes first
        ({1: [(734, 100), (733, 900)]}, '<points coords="1 1 733 900 2 734 100">mug</points>'),
        # same x: sorted by y
        ({1: [(500, 640), (500, 320)]}, '<points coords="1 1 500 320 2 500 640">mug</points>'),
        # x ties only after rounding (500.3 -> 500): sort after rounding, so y decides
        ({1: [(500.3, 640), (500.0, 320)]}, '<points coords="1 1 500 320 2 500 640">mug</points>'),
        # zero padding to three digits; 1000 is written as is
        ({1: [(7, 45), (1000, 0)]}, '<points coords="1 1 007 045 2 1000 000">mug</points>'),
        # several images: indices as integers, ids continue across images, frames in order
        ({3: [(10, 20)], 1: [(900, 900), (100, 100)]},
         '<points coords="1 1 100 100 2 900 900;3 3 010 020">mug</points>'),
    ],
)
def test_format_image_points(frames, expected):
    assert format_molmo2_points(molmo2_points_from_frames(frames), "mug") == expected


def test_format_nothing_found():
    assert format_molmo2_points([], "mug") == "There are none."
    assert format_molmo2_points([], "mug", mode="point_then_count") == "There are none."
    assert format_molmo2_points(molmo2_points_from_frames({1: [], 2: []}), "mug") == "There are none."
    assert format_molmo2_points([], "car", kind="tracks") == MOLMO2_NO_TRACKS_TEXT


def test_format_count_modes_and_alt():
    pts = molmo2_points_from_frames({1: [(610, 300), (250, 480)]})
    tag = '<points alt="red apple" coords="1 1 250 480 2 610 300">apples</points>'
    assert format_molmo2_points(pts, "apples", alt="red apple") == tag
    assert format_molmo2_points(pts, "apples", alt="red apple", mode="point_then_count") == (
        f"Counting the {tag} shows a total of 2.")
    assert format_molmo2_points(pts, "apples", alt="red apple", mode="count_then_point") == f"There are 2 {tag}."


def test_format_video_points_one_frame():
    pts = molmo2_points_from_frames({2.5: [(640, 720), (300, 150)]})
    assert format_molmo2_points(pts, "bird", frame_kind="timestamp", mode="point_then_count") == (
        'Counting the <points coords="2.5 1 300 150 2 640 720">bird</points> shows a total of 2.')


@pytest.mark.parametrize("separator", ["\t", ";"])
def test_format_video_points_two_frames_html_v1_and_v2(separator):
    # ids keep counting across frames; timestamps get one decimal (12 -> "12.0")
    pts = molmo2_points_from_frames({12: [(880, 90)], 0.5: [(40, 660)]})
    assert format_molmo2_points(pts, "bird", frame_kind="timestamp", separator=separator) == (
        f'<points coords="0.5 1 040 660{separator}12.0 2 880 090">bird</points>')


def test_format_single_object_track():
    frames = {0.0: {"ball": (312, 455)}, 0.5: {"ball": (298, 470)}, 1.0: {"ball": (250, 501)}}
    assert format_molmo2_points(molmo2_track_points(frames), "ball", kind="tracks") == (
        '<tracks coords="0.0 1 312 455;0.5 1 298 470;1.0 1 250 501">ball</tracks>')
    # occluded points are left out by the caller: the track simply starts later
    del frames[0.0]
    assert format_molmo2_points(molmo2_track_points(frames), "ball", kind="tracks", separator="\t") == (
        '<tracks coords="0.5 1 298 470\t1.0 1 250 501">ball</tracks>')


def test_track_ids_follow_xy_order_of_first_appearance():
    # both objects appear at t=0 with the same rounded x; the smaller y gets id 1
    frames = {0: {"a": (80.4, 700), "b": (80.0, 300)}, 3: {"a": (10, 10), "b": (990, 990)}}
    assert format_molmo2_points(molmo2_track_points(frames), "fish", kind="tracks") == (
        '<tracks coords="0.0 1 080 300 2 080 700;3.0 1 990 990 2 010 010">fish</tracks>')


def test_track_ids_stay_stable_while_objects_come_and_go():
    frames = {
        0.0: {"x": (600, 100), "y": (300, 900), "z": (300, 50)},  # z=1, y=2, x=3 by (x, y)
        1.0: {"x": (20, 20), "z": (950, 950), "v": (90, 90), "w": (30, 30)},  # y gone; w=4, v=5 by (x, y)
        2.0: {"x": (999, 1), "y": (2, 2), "z": (480, 480), "u": (470, 470)},  # y is back; u=6
    }
    assert format_molmo2_points(molmo2_track_points(frames), "animals", kind="tracks", separator="\t") == (
        '<tracks coords="'
        "0.0 1 300 050 2 300 900 3 600 100\t"
        "1.0 1 950 950 3 020 020 4 030 030 5 090 090\t"
        "2.0 1 480 480 2 002 002 3 999 001 6 470 470"
        '">animals</tracks>'
    )


def test_track_with_several_objects_and_empty_frames():
    frames = {1: {}, 2: {"p": (250, 250)}, 3: {"p": (250, 260), "q": (700, 700)}, 5: {},
              6: {"r": (700, 100)}, 7: {"p": (250, 270), "q": (700, 700), "r": (700, 700)}}
    text = format_molmo2_points(molmo2_track_points(frames), "people", kind="tracks", separator="\t")
    assert text == ('<tracks coords="2.0 1 250 250\t3.0 1 250 260 2 700 700\t6.0 3 700 100\t'
                    '7.0 1 250 270 2 700 700 3 700 700">people</tracks>')
    tag, = parse_molmo2_points(text)
    assert tag.kind == "tracks" and tag.frame_kind == "timestamp"
    assert {i: [p.frame for p in ps] for i, ps in tag.by_object().items()} == {
        1: [2.0, 3.0, 7.0], 2: [3.0, 7.0], 3: [6.0, 7.0]}


def test_start_and_end_only_track():
    # "first and last appearance" targets are the same format with the middle frames left out
    frames = {0.0: {"cat": (100, 500)}, 4.5: {"cat": (900, 520)}}
    assert format_molmo2_points(molmo2_track_points(frames), "cat", kind="tracks") == (
        '<tracks coords="0.0 1 100 500;4.5 1 900 520">cat</tracks>')


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(points=[Molmo2Point(1, 1, 1000.5, 3)]),
        dict(points=[Molmo2Point(1, 1, -1, 3)]),
        dict(points=[Molmo2Point(1, 1, math.nan, 3)]),
        dict(points=[Molmo2Point(0, 1, 5, 5)]),  # image indices are 1-based
        dict(points=[Molmo2Point(1.5, 1, 5, 5)]),
        dict(points=[Molmo2Point(1, -1, 5, 5)]),
        dict(points=[Molmo2Point(1, 2.0, 5, 5)]),
        dict(points=[Molmo2Point(-0.5, 1, 5, 5)], frame_kind="timestamp"),
        dict(points=[Molmo2Point(math.inf, 1, 5, 5)], frame_kind="timestamp"),
        dict(points=[Molmo2Point(1, 1, 5, 5)], label='say "hi"'),
        dict(points=[Molmo2Point(1, 1, 5, 5)], alt="<b>"),
        dict(points=[Molmo2Point(1, 1, 5, 5)], separator=" "),
        dict(points=[Molmo2Point(1, 1, 5, 5)], kind="point"),
        dict(points=[Molmo2Point(1, 1, 5, 5)], frame_kind="frame"),
        dict(points=[Molmo2Point(1, 1, 5, 5)], mode="count"),
        dict(points=[Molmo2Point(1, 1, 5, 5)], kind="tracks", frame_kind="image"),
        dict(points=[Molmo2Point(1, 1, 5, 5)], kind="tracks", mode="point_then_count"),
    ],
)
def test_format_rejects_what_would_not_parse_back(kwargs):
    kwargs.setdefault("label", "x")
    with pytest.raises(ValueError):
        format_molmo2_points(**kwargs)


def test_id_helpers_reject_out_of_range():
    with pytest.raises(ValueError, match="0-1000"):
        molmo2_points_from_frames({1: [(1001, 0)]})
    with pytest.raises(ValueError, match="0-1000"):
        molmo2_track_points({0.0: {"a": (0, -3)}})


# --------------------------------------------------------------------------- parsing (AI2 situations)


def test_parse_single_image_to_pixels():
    text = '<points coords="1 1 900 700 2 900 800">tmp</points>'
    assert xy(parse_any_points(text, 1000, 1000)) == [(900, 700), (900, 800)]
    assert xy(parse_any_points(text, 100, 50)) == [(90, 35), (90, 40)]
    assert xy(parse_any_points('<points coords="1 1 300 150 2 520 990">m</points>', 100, 50)) == [
        (30, 7.5), (52, 49.5)]


def test_parse_structured_result():
    tag, = parse_molmo2_points('<points alt="boats" coords="1 1 073 160 2 173 600">the boats</points>')
    assert tag == Molmo2Tag(kind="points", label="the boats", alt="boats", frame_kind="image", points=(
        Molmo2Point(1, 1, 73, 160), Molmo2Point(1, 2, 173, 600)))
    # alt after coords, as in the model-card example; no alt at all
    assert parse_molmo2_points('<points coords="1 1 073 160" alt="boats">b</points>')[0].alt == "boats"
    assert parse_molmo2_points('<points coords="1 1 073 160">b</points>')[0].alt is None


@pytest.mark.parametrize(
    "text, expected",
    [
        # no Molmo2 tag: v1 attributes, bare numbers, plain text
        ('<points label="tmp" x1="0" y1="1"/>', []),
        ('"1 900 700 2 900 800"', []),
        ("There are none.", []),
        ("", []),
    ],
)
def test_parse_without_molmo2_tags(text, expected):
    assert triples(text) == expected
    assert parse_any_points(text, 1000, 1000, family="molmo2") == []


def test_parse_self_closing_tag_in_a_counting_sentence():
    text = 'Counting the <points label="kites" coords="0.1 1 900 400 2 911 800"/> shows a total of 2.'
    tag, = parse_molmo2_points(text)
    assert tag.label == "kites" and tag.alt is None and tag.frame_kind == "timestamp"
    assert triples(text) == [(0.1, 1, 900, 400), (0.1, 2, 911, 800)]
    (x1, y1), (x2, y2) = xy(parse_any_points(text, 100, 100))
    assert (x1, y1, x2, y2) == pytest.approx((90.0, 40.0, 91.1, 80.0))
    assert parse_molmo2_count(text) == 2


@pytest.mark.parametrize("sep", MOLMO2_SEPARATORS + ("\n",))
def test_parse_frame_groups_with_each_separator(sep):
    text = f'<points coords="0.1 1 900 400 2 911 800{sep}0.2 3 911 600">kites</points>'
    assert triples(text) == [(0.1, 1, 900, 400), (0.1, 2, 911, 800), (0.2, 3, 911, 600)]
    self_closing = f'<points label="kites" coords="0.1 1 900 400 2 911 800{sep}0.2 3 911 600"/>'
    assert triples(self_closing) == triples(text)


def test_parse_multi_image_with_sizes_per_image():
    tag, = parse_molmo2_points('<points coords="1 1 500 500;2 2 250 750 3 1000 1000">dogs</points>')
    assert tag.frame_kind == "image"
    got = [(p.frame, x, y) for p, x, y in molmo2_pixel_points(tag.points, [(200, 100), (640, 480)])]
    assert got == [(1, 100, 50), (2, 160, 360), (2, 640, 480)]
    # one size for all frames
    assert [(x, y) for _, x, y in molmo2_pixel_points(tag.points, (10, 10))] == [(5, 5), (2.5, 7.5), (10, 10)]
    # image 2 has no size: skipped
    assert [p.frame for p, _, _ in molmo2_pixel_points(tag.points, [(10, 10)])] == [1]
    # and parse_any_points picks one image
    assert xy(parse_any_points(tag_text := '<points coords="1 1 500 500;2 2 250 750">d</points>', 100, 100,
                               frame=2)) == [(25, 75)]
    assert parse_any_points(tag_text, 100, 100, frame=3) == []


def test_parse_tracks_grouped_by_frame():
    text = ('<tracks label="runner" coords="2.0 1 300 300\t3.0 1 300 300 2 400 400\t6.0 3 400 100'
            '\t8.0 1 300 300 2 400 400 3 400 400"/>')
    tag, = parse_molmo2_points(text)
    assert tag.kind == "tracks" and tag.label == "runner"
    assert {t: [(p.object_id, p.x, p.y) for p in ps] for t, ps in tag.by_frame().items()} == {
        2.0: [(1, 300, 300)],
        3.0: [(1, 300, 300), (2, 400, 400)],
        6.0: [(3, 400, 100)],
        8.0: [(1, 300, 300), (2, 400, 400), (3, 400, 400)],
    }
    assert parse_molmo2_count(text) == 3  # distinct objects
    assert strip_tags(text) == ""


def test_repeated_object_in_a_frame_keeps_the_first_for_tracks():
    tag, = parse_molmo2_points('<tracks coords="1.0 1 100 100 1 900 900;2.0 1 110 100">x</tracks>')
    assert len(tag.points) == 3  # kept as written
    assert [(p.frame, p.x) for p in tag.by_object()[1]] == [(1.0, 100), (2.0, 110)]


def test_frame_kind_detection():
    assert parse_molmo2_points('<points coords="3 1 100 100">a</points>')[0].frame_kind == "image"
    assert parse_molmo2_points('<points coords="3.0 1 100 100">a</points>')[0].frame_kind == "timestamp"
    assert parse_molmo2_points('<points coords="1 1 100 100;1.5 2 100 100">a</points>')[0].frame_kind == "timestamp"
    assert parse_molmo2_points('<tracks coords="3 1 100 100">a</tracks>')[0].frame_kind == "timestamp"


# --------------------------------------------------------------------------- malformed input


@pytest.mark.parametrize(
    "coords, expected",
    [
        ("1 1 1000 000 2 1001 500 3 500 1001", [(1, 1, 1000, 0)]),  # > 1000 dropped
        ("1 1 0999 500", [(1, 1, 999, 500)]),  # 4 digits with a leading zero
        ("1 1 73 160 2 173 600", [(1, 2, 173, 600)]),  # unpadded "73" is not a coordinate
        ("1 1 12345 100 2 100 100", [(1, 2, 100, 100)]),
        ("1 1 -100 200 2 100.5 200 3 300 400", [(1, 3, 300, 400)]),
        ("1 1 100 200 2 300", [(1, 1, 100, 200)]),  # odd count: leftover dropped
        ("1 1 100 2 300 400", [(1, 2, 300, 400)]),  # missing y: resynchronises
        ("1 1 100 200 999 2 300 400", [(1, 1, 100, 200), (1, 2, 300, 400)]),  # extra number
        ("1 1 1o0 200 2 300 400", [(1, 2, 300, 400)]),  # letter in a number
        ("1 1 \u0661\u0660\u0660 200", []),  # non-ASCII digits
        ("abc 1 100 200;2 1 300 400", [(2, 1, 300, 400)]),  # bad frame: group dropped
        ("1.2.3 1 100 200;4 2 300 400", [(4, 2, 300, 400)]),
        ("1", []),
        ("", []),
        (";;1  1 100 200 ;\t ; 2 2 300 400;", [(1, 1, 100, 200), (2, 2, 300, 400)]),  # stray separators
        (f"{'9' * 5000} 1 100 200;1 {'9' * 5000} 100 200;1 1 {'9' * 5000} 200", []),  # huge numbers
    ],
)
def test_malformed_coords_drop_only_the_damaged_parts(coords, expected):
    assert triples(f'<points coords="{coords}">x</points>') == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        # stream cut inside coords: complete triples only; a number touching the cut may be partial
        ('<points coords="1 1 100 200 2 300 40', [(1, 1, 100, 200)]),
        ('<points coords="1 1 100 200 2 300 400', [(1, 1, 100, 200)]),
        ('<points coords="1 1 100 200 2 300 400;', [(1, 1, 100, 200), (1, 2, 300, 400)]),
        ('<points coords="1 1 100 200 2 300 400">bo', [(1, 1, 100, 200), (1, 2, 300, 400)]),
        ('<points coords="1 1 100', []),
        ('<points coords="', []),
        ('<points alt="cats" coo', []),
        ("<poin", []),
        # closing quote missing but the tag is closed: not a cut, keep the last number
        ('<points coords="1 1 100 200>cats</points>', [(1, 1, 100, 200)]),
        # upper case and spaces around "="
        ('<POINTS COORDS = "1 1 100 200">cats</POINTS>', [(1, 1, 100, 200)]),
        # an alt containing coords= text does not confuse the attribute parser
        ('<points alt="x coords=" coords="1 1 100 200">c</points>', [(1, 1, 100, 200)]),
    ],
)
def test_truncated_and_odd_tags(text, expected):
    assert triples(text) == expected


def test_labels_and_several_tags():
    text = ('I see <points alt="red cup" coords="1 1 250 500">cups</points> and '
            '<points coords="1 1 750 100">the\n  dog</points> here')
    tags = parse_molmo2_points(text)
    assert [t.label for t in tags] == ["cups", "the\n  dog"]
    assert parse_any_points(text, 640, 480) == [
        Point(160.0, 240.0, "red cup", 1),
        Point(480.0, 48.0, "the dog", 2),  # no alt: inner text, whitespace collapsed
    ]
    # no closing tag: the label runs to the end of the text
    assert parse_molmo2_points('<points coords="1 1 100 100">cat')[0].label == "cat"
    # a cut-off opening tag has no label yet
    assert parse_molmo2_points('<points coords="1 1 100 100')[0].label == ""


def test_non_strings_and_bad_arguments():
    assert parse_molmo2_points(None) == []
    assert parse_any_points(b"<points>", 10, 10) == []
    assert parse_molmo2_count(3) is None
    with pytest.raises(ValueError, match="family"):
        parse_any_points("", 10, 10, family="molmo3")
    with pytest.raises(ValueError, match="Image size must be positive"):
        parse_any_points("", 0, 10)
    with pytest.raises(ValueError, match="Image size must be positive"):
        molmo2_to_pixels(1, 1, 10, -1)


# --------------------------------------------------------------------------- v1 fallback, families


V1 = '<points x1="10.0" y1="20.0" x2="30.0" y2="40.0" alt="dog">dog</points>'
M2 = '<points coords="1 1 500 500">cat</points>'


def test_auto_family_prefers_molmo2_and_falls_back_to_v1():
    assert xy(parse_any_points(V1, 100, 100)) == [(10, 20), (30, 40)]
    assert xy(parse_any_points(M2, 100, 100)) == [(50, 50)]
    assert xy(parse_any_points(V1 + " " + M2, 100, 100)) == [(50, 50)]  # as AI2's extractors do
    assert xy(parse_any_points(V1 + " " + M2, 100, 100, family="v1")) == [(10, 20), (30, 40)]
    assert parse_any_points(V1, 100, 100, family="molmo2") == []
    assert parse_any_points(M2, 100, 100, family="v1") == []
    # a Molmo2 tag without valid points does not hide v1 points
    assert xy(parse_any_points('<points coords="x">a</points> ' + V1, 100, 100)) == [(10, 20), (30, 40)]


def test_point_to_pixels_helper():
    assert Molmo2Point(1, 1, 1000, 0).to_pixels(640, 480) == (640.0, 0.0)
    assert molmo2_to_pixels(333, 667, 300, 300) == pytest.approx((99.9, 200.1))


# --------------------------------------------------------------------------- counts


@pytest.mark.parametrize(
    "text, expected",
    [
        ("There are 3 boats.", 3),
        ("There are none.", 0),
        ("There are three boats.", 3),
        ('Counting the <points coords="1 1 073 160 2 173 600 3 500 500">boats</points> shows a total of 3.', 3),
        ('There are 3 <points coords="1 1 073 160 2 173 600 3 500 500">boats</points>.', 3),
        # numbers in labels, alt and coordinates are not counts
        ('There are 2 <points alt="4 mugs" coords="1 1 100 200 2 300 400">3 mugs</points>.', 2),
        # no stated number: the points
        ('<points coords="1 1 100 200 2 300 400;2 3 100 100">mugs</points>', 3),
        # a stated number wins over the points (compare them yourself)
        ('Counting the <points coords="1 1 100 200">mugs</points> shows a total of 4.', 4),
        ('<points coords="x">mugs</points>', None),
        # v1 forms are the fallback
        ('Counting the <points x1="1.0" y1="2.0" x2="3.0" y2="4.0" alt="c">c</points> shows a total of 2.', 2),
        ('<points x1="1.0" y1="2.0" x2="3.0" y2="4.0" alt="c">c</points>', 2),
        ("I cannot tell.", None),
        (MOLMO2_NO_TRACKS_TEXT, None),
    ],
)
def test_parse_molmo2_count(text, expected):
    assert parse_molmo2_count(text) == expected


def test_strip_tags_covers_molmo2():
    assert strip_tags('Counting the <points coords="1 1 100 200">mugs</points> shows a total of 1.') == (
        "Counting the mugs shows a total of 1.")
    assert strip_tags('<tracks coords="0.0 1 100 200">car</tracks> moves') == "car moves"
    assert strip_tags('Cut <tracks coords="0.0 1 1') == "Cut "
    # the v1 counter is unchanged on v1 answers
    assert parse_count("There are none.") == 0


# --------------------------------------------------------------------------- properties

coord = st.integers(0, 1000)
label_text = st.text(st.characters(blacklist_characters='"<>', blacklist_categories=("Cs",)), max_size=15)


@st.composite
def molmo2_answers(draw):
    kind = draw(st.sampled_from(["points", "tracks"]))
    frame_kind = "timestamp" if kind == "tracks" else draw(st.sampled_from(["image", "timestamp"]))
    frames = st.integers(1, 40) if frame_kind == "image" else st.integers(0, 36000).map(lambda k: k / 10)
    points = draw(st.lists(st.builds(Molmo2Point, frames, st.integers(0, 10**6), coord, coord), max_size=15))
    kwargs = dict(
        label=draw(label_text),
        alt=draw(st.none() | label_text),
        kind=kind,
        frame_kind=frame_kind,
        separator=draw(st.sampled_from(MOLMO2_SEPARATORS)),
        mode="point" if kind == "tracks" else draw(st.sampled_from(["point", "point_then_count", "count_then_point"])),
    )
    return points, kwargs


def canonical(points):
    return tuple(sorted(points, key=lambda p: (p.frame, p.object_id, p.x, p.y)))


@settings(max_examples=300, deadline=None)
@given(molmo2_answers())
def test_format_then_parse_round_trips_exactly(answer):
    points, kw = answer
    text = format_molmo2_points(points, **kw)
    tags = parse_molmo2_points(text)
    if not points:
        assert tags == [] and text in ("There are none.", MOLMO2_NO_TRACKS_TEXT)
        return
    assert tags == [Molmo2Tag(kind=kw["kind"], label=kw["label"], alt=kw["alt"],
                              frame_kind=kw["frame_kind"], points=canonical(points))]
    if kw["kind"] == "points":
        assert parse_molmo2_count(text) == len(points)
    # writing the parsed points again gives the same text
    assert format_molmo2_points(tags[0].points, **kw) == text


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.integers(1, 30), st.lists(st.tuples(coord, coord), max_size=6), max_size=5))
def test_pointing_ids_round_trip_and_count(frames):
    points = molmo2_points_from_frames(frames)
    n = sum(len(v) for v in frames.values())
    assert [p.object_id for p in points] == list(range(1, n + 1))
    text = format_molmo2_points(points, "things", mode="point_then_count")
    assert tuple(points) == (parse_molmo2_points(text)[0].points if n else ())
    assert parse_molmo2_count(text) == n
    assert [(p.x, p.y) for p in parse_any_points(text, 1000, 1000)] == [(p.x, p.y) for p in points]


@st.composite
def track_frames(draw):
    """timestamp -> {object key: (x, y)}, positions distinct within a frame."""
    frames = {}
    for t in draw(st.lists(st.integers(0, 600), unique=True, max_size=6)):
        keys = draw(st.lists(st.sampled_from("abcdefg"), unique=True, max_size=5))
        spots = draw(st.lists(st.tuples(coord, coord), unique=True, min_size=len(keys), max_size=len(keys)))
        frames[t / 2] = dict(zip(keys, spots))
    return frames


@settings(max_examples=150, deadline=None)
@given(track_frames())
def test_track_ids_are_stable_and_round_trip(frames):
    points = molmo2_track_points(frames)
    text = format_molmo2_points(points, "things", kind="tracks")
    assert (parse_molmo2_points(text)[0].points if points else ()) == tuple(points)
    # one id per object key, for the whole video
    where = {(t, xy_): key for t, objs in frames.items() for key, xy_ in objs.items()}
    id_to_key = {}
    for p in points:
        key = where[(p.frame, (p.x, p.y))]
        assert id_to_key.setdefault(p.object_id, key) == key
    assert len(set(id_to_key.values())) == len(id_to_key)
    # ids are given 1, 2, ... in order of first appearance (frames by time, then by (x, y))
    first_seen = []
    for t in sorted(frames):
        for _, key in sorted((xy_, key) for key, xy_ in frames[t].items()):
            if key not in first_seen:
                first_seen.append(key)
    assert [id_to_key[i] for i in range(1, len(first_seen) + 1)] == first_seen


@settings(max_examples=200, deadline=None)
@given(molmo2_answers(), st.integers(0, 400))
def test_truncated_stream_only_loses_points_at_the_end(answer, cut):
    points, kw = answer
    full = format_molmo2_points(points, **kw)
    prefix = full[:cut]
    got, expected = triples(prefix), triples(full)
    assert got == expected[: len(got)]


fragments = st.sampled_from([
    "<points ", "<tracks ", "</points>", "</tracks>", 'coords="', 'alt="', 'label="', '"', ">", "/>", "<",
    " ", "\t", ";", ":", ",", "\n", ".", "-", "1", "073", "999", "1000", "1001", "0.5", "12", "x", "There are ",
    "none.", " a total of ", "three", "9" * 60, "\u0663",
])


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(), st.lists(fragments, max_size=40).map("".join)), st.integers(1, 2000),
       st.integers(1, 2000))
def test_parsers_never_raise_and_stay_in_range(text, width, height):
    for t in (text, f'<points coords="{text}">{text}</points>', f'<tracks alt="{text}" coords="1 {text}'):
        for tag in parse_molmo2_points(t):
            assert tag.kind in ("points", "tracks") and tag.frame_kind in ("image", "timestamp")
            for p in tag.points:
                assert 0 <= p.x <= 1000 and 0 <= p.y <= 1000 and p.object_id >= 0
                assert math.isfinite(p.frame) and p.frame >= 0
            tag.by_frame(), tag.by_object()
        for family in ("auto", "molmo2", "v1"):
            for p in parse_any_points(t, width, height, family=family):
                assert 0 <= p.x <= width and 0 <= p.y <= height
        count = parse_molmo2_count(t)
        assert count is None or count >= 0
        assert isinstance(strip_tags(t), str)
