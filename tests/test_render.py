"""Overlays: markers land on the points, everything else is untouched."""
import doctest

import pytest
from PIL import Image

from app import render
from app.render import (
    PALETTE,
    draw_clock_face,
    draw_count_badge,
    draw_points,
    label_colors,
    marker_radius,
)
from molmo_core.synthetic.clocks import CLEAN_STYLE, render_clock
from molmo_core.outputs import Point, format_points, parse_points

BG = (90, 140, 60)


def _image(w=320, h=240, mode="RGB"):
    return Image.new(mode, (w, h), BG if mode == "RGB" else 0)


@pytest.mark.parametrize("w, h", [(320, 240), (1000, 600), (60, 90)])
def test_markers_at_points_and_nothing_elsewhere(w, h):
    img = _image(w, h)
    pts = parse_points(format_points([(20, 30), (80, 70)], "coin") + format_points([(50, 50)], "cat"), w, h)
    out = draw_points(img, pts, labels=False)
    assert out.size == img.size and out is not img
    colors = label_colors(pts)
    r = marker_radius(w, h)
    for p in pts:
        centre = (int(p.x), int(p.y))
        assert out.getpixel(centre) != img.getpixel(centre)
        assert out.getpixel(centre) == colors[p.label]
    # far from every point (more than 2 radii away): unchanged
    changed = 0
    for x in range(0, w, 3):
        for y in range(0, h, 3):
            far = all((x - p.x) ** 2 + (y - p.y) ** 2 > (2 * r) ** 2 for p in pts)
            if far and out.getpixel((x, y)) != BG:
                changed += 1
    assert changed == 0
    assert img.getpixel((int(pts[0].x), int(pts[0].y))) == BG  # input not modified


def test_colour_per_label_and_contrasting_outline():
    pts = [Point(60, 60, "a", 1), Point(160, 60, "b", 2), Point(260, 60, "a", 3)]
    out = draw_points(_image(), pts, labels=False)
    assert out.getpixel((60, 60)) == out.getpixel((260, 60)) == PALETTE[0]
    assert out.getpixel((160, 60)) == PALETTE[1]
    r = marker_radius(320, 240)
    # the outline ring sits at the radius, in black or white, not the fill colour
    ring = [out.getpixel((60 + d, 60)) for d in (r - 1, r)]
    assert all(px in ((0, 0, 0), (255, 255, 255)) for px in ring), ring
    assert out.getpixel((60 + r + 2, 60)) == BG


def test_numbers_are_drawn_inside_markers():
    pts = [Point(100, 100, "a", 7)]
    plain = draw_points(_image(), pts, labels=False)
    numbered = draw_points(_image(), pts, labels=True)
    r = marker_radius(320, 240)
    box = (100 - r // 2, 100 - r // 2, 100 + r // 2, 100 + r // 2)
    assert plain.crop(box).tobytes() != numbered.crop(box).tobytes()
    # the top of the disc, above the digit, is still the marker colour
    assert numbered.getpixel((100, 100 - int(r * 0.75))) == PALETTE[0]


def test_markers_scale_with_image_size():
    assert marker_radius(2000, 2000) > marker_radius(400, 400) >= 8
    small = draw_points(_image(200, 200), [Point(100, 100, "a", 1)], labels=False)
    big = draw_points(_image(1200, 1200), [Point(600, 600, "a", 1)], labels=False)
    count = lambda im: sum(1 for px in im.getdata() if px != BG)
    assert count(big) > 10 * count(small)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_any_mode_in_rgb_out(mode):
    out = draw_points(_image(mode=mode), [Point(10, 10, "x", 1)])
    assert out.mode == "RGB"


def test_no_points_returns_an_unchanged_copy():
    img = _image()
    out = draw_points(img, [])
    assert out is not img and out.tobytes() == img.tobytes()


def test_points_outside_the_image_do_not_raise():
    out = draw_points(_image(), [Point(-50, 400, "a", 1), Point(1e4, -1e4, "a", 2)])
    assert out.tobytes() == _image().tobytes()


def test_count_badge_top_left_only():
    img = _image(400, 300)
    out = draw_count_badge(img, 24)
    assert out.getpixel((20, 20)) != BG  # inside the badge
    # bottom-right quadrant untouched
    assert out.crop((200, 150, 400, 300)).tobytes() == img.crop((200, 150, 400, 300)).tobytes()
    assert draw_count_badge(img, 3).tobytes() != out.tobytes()  # the number is drawn
    with pytest.raises(ValueError, match="Count must be >= 0"):
        draw_count_badge(img, -1)


def test_clock_face_matches_the_clean_renderer():
    face = draw_clock_face(3, 40, size=200)
    assert face.size == (200, 200)
    assert face.tobytes() == render_clock(3, 40, size=200, style=CLEAN_STYLE).tobytes()
    assert face.tobytes() != draw_clock_face(3, 41, size=200).tobytes()
    # minute hand at 240 degrees: a dark pixel down-left of the centre
    r = CLEAN_STYLE.radius * 200
    assert face.getpixel((int(100 - 0.5 * r * 0.866), int(100 + 0.5 * r * 0.5))) == CLEAN_STYLE.hand_color


def test_doctests():
    result = doctest.testmod(render)
    assert result.attempted > 0 and result.failed == 0
