"""Synthetic clocks: hand geometry round-trips and the hands land where the angles say."""
import doctest
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from molmo_core.synthetic import clocks
from molmo_core.synthetic.clocks import (
    CLEAN_STYLE,
    MINUTE_HAND_LENGTH,
    ClockStyle,
    hand_angles,
    random_clock,
    render_clock,
    time_from_angles,
)
from molmo_core.outputs import ClockTime

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "time, expected",
    [
        ((12, 0, None), (0.0, 0.0, None)),
        ((0, 0, None), (0.0, 0.0, None)),
        ((3, 0, None), (90.0, 0.0, None)),
        ((15, 0, None), (90.0, 0.0, None)),
        ((6, 30, None), (195.0, 180.0, None)),
        ((9, 45, None), (292.5, 270.0, None)),
        ((11, 59, None), (359.5, 354.0, None)),
        ((1, 0, 30), (30.25, 3.0, 180.0)),
    ],
)
def test_hand_angles(time, expected):
    got = hand_angles(*time)
    assert (got.hour, got.minute) == pytest.approx(expected[:2])
    assert got.second == expected[2]


@pytest.mark.parametrize("time", [(24, 0), (-1, 0), (3, 60), (3, -1), (3, 0, 60)])
def test_hand_angles_rejects_invalid_time(time):
    with pytest.raises(ValueError, match="expected hour 0-23"):
        hand_angles(*time)


def test_angles_round_trip_every_minute_of_12_hours():
    for hour in range(1, 13):
        for minute in range(60):
            h, m, _ = hand_angles(hour, minute)
            assert time_from_angles(h, m) == ClockTime(hour, minute), (hour, minute)


@pytest.mark.parametrize("second", [0, 10, 29])
def test_round_trip_with_seconds_reads_the_nearest_minute(second):
    for hour in range(1, 13):
        for minute in range(0, 60, 7):
            h, m, _ = hand_angles(hour, minute, second)
            assert time_from_angles(h, m) == ClockTime(hour, minute)


def test_time_from_angles_tolerates_a_sloppy_hour_hand():
    rng = random.Random(0)
    for _ in range(500):
        hour, minute = rng.randint(1, 12), rng.randint(0, 59)
        h, m, _ = hand_angles(hour, minute)
        got = time_from_angles(h + rng.uniform(-10, 10), m + rng.uniform(-2.5, 2.5) + 360 * rng.randint(-1, 1))
        assert got == ClockTime(hour, minute)


# --------------------------------------------------------------------------- pixels


def _close(a, b, tol=60):
    return sum(abs(x - y) for x, y in zip(a, b)) <= tol


def _samples(img: Image.Image, style: ClockStyle, angle: float, r0: float, r1: float, n: int = 25):
    size = img.size[0]
    c, radius = size / 2, style.radius * size
    out = []
    for k in range(n):
        d = radius * (r0 + (r1 - r0) * k / (n - 1))
        x = c + d * math.sin(math.radians(angle))
        y = c - d * math.cos(math.radians(angle))
        out.append(img.getpixel((int(x), int(y))))
    return out


def _angle_gap(a: float, b: float) -> float:
    return abs((a - b + 180) % 360 - 180)


TIMES = [(3, 40), (10, 8), (12, 0), (6, 15), (7, 53), (1, 27)]


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5, 6, 7])
def test_minute_hand_pixels_are_where_the_angle_says(seed):
    style = ClockStyle.random(random.Random(seed))
    hour, minute = TIMES[seed % len(TIMES)]
    img = render_clock(hour, minute, size=384, style=style)
    angles = hand_angles(hour, minute)
    # Along the minute hand (drawn over the hour hand): hand-coloured.
    along = _samples(img, style, angles.minute, 0.2, MINUTE_HAND_LENGTH * 0.9)
    hits = sum(_close(p, style.hand_color) for p in along)
    assert hits >= 0.9 * len(along), (style, along)
    # In a direction away from both hands (and their tails): no hand pixels.
    empty = next(
        a for a in range(0, 360, 5)
        if min(_angle_gap(a, h) for h in (angles.hour, angles.minute, angles.hour + 180, angles.minute + 180)) >= 35
    )
    off = _samples(img, style, empty, 0.25, 0.55)
    assert sum(_close(p, style.hand_color) for p in off) == 0, (style, empty, off)
    assert all(_close(p, style.face_color) for p in off)


def test_hands_move_with_the_time():
    a = render_clock(3, 0, style=CLEAN_STYLE)
    b = render_clock(3, 30, style=CLEAN_STYLE)
    # at 3:00 the minute hand points up, at 3:30 down
    up = _samples(a, CLEAN_STYLE, 0, 0.3, 0.7)
    down = _samples(b, CLEAN_STYLE, 180, 0.3, 0.7)
    assert all(_close(p, CLEAN_STYLE.hand_color) for p in up + down)
    assert not any(_close(p, CLEAN_STYLE.hand_color) for p in _samples(b, CLEAN_STYLE, 0, 0.3, 0.7))


def test_seconds_hand_is_drawn_only_when_given():
    with_s = render_clock(3, 0, 45, style=CLEAN_STYLE)  # seconds hand at 270°
    without = render_clock(3, 0, style=CLEAN_STYLE)
    assert sum(_close(p, CLEAN_STYLE.second_color) for p in _samples(with_s, CLEAN_STYLE, 270, 0.2, 0.8)) >= 20
    assert not any(_close(p, CLEAN_STYLE.second_color) for p in _samples(without, CLEAN_STYLE, 270, 0.2, 0.8))


def test_rendering_is_deterministic_and_varied():
    a1, t1 = random_clock(11, size=96)
    a2, t2 = random_clock(11, size=96)
    assert t1 == t2 and a1.tobytes() == a2.tobytes()
    styles = {ClockStyle.random(random.Random(s)) for s in range(40)}
    assert len(styles) == 40
    assert {s.face for s in styles} == {"round", "square"}
    assert {s.numerals for s in styles} == {"arabic", "roman", "none"}
    assert {s.hand_shape for s in styles} == {"bar", "taper", "arrow"}
    assert len({random_clock(s, size=64)[0].tobytes() for s in range(6)}) == 6


@pytest.mark.parametrize("size", [32, 100, 384])
def test_render_size_and_mode(size):
    img = render_clock(9, 5, size=size, seed=3)
    assert img.size == (size, size) and img.mode == "RGB"


def test_render_rejects_bad_size():
    with pytest.raises(ValueError, match="size must be"):
        render_clock(1, 2, size=8)


def test_random_clock_labels_are_valid():
    for seed in range(30):
        _, t = random_clock(seed, size=32)
        assert 1 <= t.hour <= 12 and 0 <= t.minute <= 59 and t.second in (None, *range(60))


def test_cli_writes_images_and_labels(tmp_path):
    out = tmp_path / "clocks"
    result = subprocess.run(
        [sys.executable, "-m", "molmo_core.synthetic.clocks", "--out", str(out), "--n", "3", "--size", "64", "--seed", "5"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (out / "labels.jsonl").read_text().splitlines()]
    assert [r["file"] for r in rows] == ["clock_00000.png", "clock_00001.png", "clock_00002.png"]
    for i, row in enumerate(rows):
        _, t = random_clock(5 + i, size=64)
        assert row["time"] == str(t) and (row["hour"], row["minute"], row["second"]) == (t.hour, t.minute, t.second)
        assert Image.open(out / row["file"]).size == (64, 64)


def test_doctests():
    result = doctest.testmod(clocks)
    assert result.attempted > 0 and result.failed == 0
