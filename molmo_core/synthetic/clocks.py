"""Synthetic analog clocks in the PixMo-Clocks spirit, drawn with PIL only.

PixMo-Clocks (the Molmo paper, §3) teaches clock reading from rendered watch faces
with varied designs. This module draws simpler but varied faces for examples, tests
and small fine-tuning sets:

* :func:`hand_angles` / :func:`time_from_angles`: pure geometry, degrees clockwise from 12.
* :class:`ClockStyle`: every visual choice (face shape, colours, numerals, ticks, hand
  shape, shadow, background); :meth:`ClockStyle.random` samples one from a seed.
* :func:`render_clock` draws a time in a style; :func:`random_clock` also picks the time.

Command line: ``python -m molmo_core.synthetic.clocks --out DIR --n N`` writes ``clock_00000.png`` …
and ``labels.jsonl`` (one ``{"file": ..., "time": "H:MM[:SS]", ...}`` per line).

>>> hand_angles(3, 0)
HandAngles(hour=90.0, minute=0.0, second=None)
>>> time_from_angles(90.0, 0.0)
ClockTime(hour=3, minute=0, second=None)
"""

from __future__ import annotations

import argparse
import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

from PIL import Image, ImageDraw, ImageFilter, ImageFont

from molmo_core.outputs import ClockTime

__all__ = [
    "HandAngles",
    "ClockStyle",
    "CLEAN_STYLE",
    "HOUR_HAND_LENGTH",
    "MINUTE_HAND_LENGTH",
    "SECOND_HAND_LENGTH",
    "hand_angles",
    "time_from_angles",
    "render_clock",
    "random_clock",
    "main",
]

RGB = tuple[int, int, int]

# Hand lengths and widths as fractions of the dial radius (style.radius * size).
HOUR_HAND_LENGTH = 0.50
MINUTE_HAND_LENGTH = 0.80
SECOND_HAND_LENGTH = 0.88
_HAND_TAIL = 0.2  # the counterweight behind the centre, as a fraction of the hand
_HOUR_HAND_WIDTH = 0.085
_MINUTE_HAND_WIDTH = 0.065
_SECOND_HAND_WIDTH = 0.018
_NUMERAL_RADIUS = 0.74
_SUPERSAMPLE = 2  # draw at 2x and downsample: cheap anti-aliasing

_ROMAN = ("XII", "I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX", "X", "XI")


class HandAngles(NamedTuple):
    """Hand directions in degrees clockwise from 12 o'clock, each in [0, 360)."""

    hour: float
    minute: float
    second: float | None


def hand_angles(hour: int, minute: int, second: int | None = None) -> HandAngles:
    """Where the hands of a continuously driven analog clock point.

    The hour hand moves 30° per hour plus 0.5° per minute (and 1/120° per second); the
    minute hand 6° per minute plus 0.1° per second; the seconds hand 6° per second.

    Args:
        hour: 0-23 (13 and 1 point the same way).
        minute: 0-59.
        second: 0-59 or ``None`` (no seconds hand).

    Returns:
        :class:`HandAngles` (``second`` is ``None`` when ``second`` is).

    Raises:
        ValueError: a field out of range.

    >>> hand_angles(12, 30)
    HandAngles(hour=15.0, minute=180.0, second=None)
    >>> hand_angles(6, 0, 15)
    HandAngles(hour=180.125, minute=1.5, second=90.0)
    """
    _check_time(hour, minute, second)
    s = 0 if second is None else second
    hour_angle = (hour % 12) * 30.0 + minute * 0.5 + s / 120.0
    minute_angle = minute * 6.0 + s * 0.1
    return HandAngles(hour_angle, minute_angle, None if second is None else second * 6.0)


def time_from_angles(hour_angle: float, minute_angle: float) -> ClockTime:
    """Read a time from hand directions (inverse of :func:`hand_angles`, to the minute).

    The minute hand gives the minute; the hour is the one whose hand position, corrected
    for that minute, is nearest the hour hand. So a slightly-off hour hand still reads
    right, and 2:59 / 3:00 are not confused.

    Args:
        hour_angle: hour hand, degrees clockwise from 12 (any real; taken modulo 360).
        minute_angle: minute hand, degrees clockwise from 12.

    Returns:
        :class:`~molmo_core.outputs.ClockTime` with hour 1-12 and no seconds.

    >>> time_from_angles(*hand_angles(11, 59)[:2])
    ClockTime(hour=11, minute=59, second=None)
    >>> time_from_angles(0.0, 0.0)
    ClockTime(hour=12, minute=0, second=None)
    """
    minute = round((minute_angle % 360.0) / 6.0) % 60
    hour = round(((hour_angle - minute * 0.5) % 360.0) / 30.0) % 12
    return ClockTime(hour=12 if hour == 0 else hour, minute=minute)


def _check_time(hour: int, minute: int, second: int | None) -> None:
    if not (0 <= hour <= 23 and 0 <= minute <= 59 and (second is None or 0 <= second <= 59)):
        raise ValueError(
            f"Invalid time hour={hour!r}, minute={minute!r}, second={second!r}; expected "
            "hour 0-23, minute 0-59 and second 0-59 or None."
        )


# --------------------------------------------------------------------------- style


@dataclass(frozen=True)
class ClockStyle:
    """Every visual choice of one clock; :func:`render_clock` is a pure function of it.

    Attributes:
        face: ``"round"`` or ``"square"`` (rounded corners).
        radius: dial radius as a fraction of the image size (0.3-0.45).
        face_color, rim_color: dial fill and its border.
        rim_width: border width as a fraction of the radius (0 = none).
        numerals: ``"arabic"``, ``"roman"`` or ``"none"``.
        marks_color: colour of numerals and tick marks.
        ticks: ``"none"``, ``"hours"`` (12 marks) or ``"minutes"`` (60, hours longer).
        hand_color: hour and minute hands (and the centre cap).
        hand_shape: ``"bar"``, ``"taper"`` or ``"arrow"``.
        second_color: seconds hand (drawn only when a second is given).
        shadow: drop shadow under the dial.
        background: ``"solid"``, ``"gradient"`` or ``"blotches"`` (smooth random noise).
        background_colors: the two colours the background is made from.
        background_seed: seed of the blotch pattern.
    """

    face: str = "round"
    radius: float = 0.42
    face_color: RGB = (255, 255, 255)
    rim_color: RGB = (30, 30, 30)
    rim_width: float = 0.03
    numerals: str = "arabic"
    marks_color: RGB = (20, 20, 20)
    ticks: str = "minutes"
    hand_color: RGB = (10, 10, 10)
    hand_shape: str = "bar"
    second_color: RGB = (210, 30, 30)
    shadow: bool = False
    background: str = "solid"
    background_colors: tuple[RGB, RGB] = ((255, 255, 255), (255, 255, 255))
    background_seed: int = 0

    @classmethod
    def random(cls, rng: random.Random) -> "ClockStyle":
        """Sample a style; hands always contrast with the dial.

        >>> ClockStyle.random(random.Random(1)) == ClockStyle.random(random.Random(1))
        True
        """
        dark_face = rng.random() < 0.25
        if dark_face:
            face = _rand_color(rng, 15, 80)
            hands = _rand_color(rng, 200, 255)
        else:
            face = _rand_color(rng, 195, 255)
            hands = _rand_color(rng, 0, 70)
        marks = hands if rng.random() < 0.6 else (_rand_color(rng, 200, 255) if dark_face else _rand_color(rng, 0, 90))
        second = rng.choice([(220, 30, 30), (230, 140, 0), (20, 120, 220), (200, 0, 150)])
        return cls(
            face=rng.choice(["round", "round", "square"]),
            radius=rng.uniform(0.34, 0.44),
            face_color=face,
            rim_color=_rand_color(rng, 0, 255),
            rim_width=rng.choice([0.0, 0.02, 0.04, 0.07]),
            numerals=rng.choice(["arabic", "arabic", "roman", "none"]),
            marks_color=marks,
            ticks=rng.choice(["none", "hours", "minutes", "minutes"]),
            hand_color=hands,
            hand_shape=rng.choice(["bar", "taper", "arrow"]),
            second_color=second,
            shadow=rng.random() < 0.5,
            background=rng.choice(["solid", "gradient", "blotches"]),
            background_colors=(_rand_color(rng, 0, 255), _rand_color(rng, 0, 255)),
            background_seed=rng.randrange(2**31),
        )


#: A plain, high-contrast face for showing a parsed time next to the input.
CLEAN_STYLE = ClockStyle()


def _rand_color(rng: random.Random, lo: int, hi: int) -> RGB:
    return (rng.randint(lo, hi), rng.randint(lo, hi), rng.randint(lo, hi))


# --------------------------------------------------------------------------- drawing


def _background(style: ClockStyle, side: int) -> Image.Image:
    c1, c2 = style.background_colors
    if style.background == "solid":
        return Image.new("RGB", (side, side), c1)
    if style.background == "gradient":
        mask = Image.linear_gradient("L").resize((side, side))
    elif style.background == "blotches":
        rng = random.Random(style.background_seed)
        n = 6
        mask = Image.frombytes("L", (n, n), bytes(rng.randrange(256) for _ in range(n * n)))
        mask = mask.resize((side, side), Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(side / 24))
    else:
        raise ValueError(f"Unknown background {style.background!r}; expected solid, gradient or blotches.")
    return Image.composite(Image.new("RGB", (side, side), c2), Image.new("RGB", (side, side), c1), mask)


def _dial_box(cx: float, cy: float, r: float) -> list[float]:
    return [cx - r, cy - r, cx + r, cy + r]


def _draw_dial(draw: ImageDraw.ImageDraw, style: ClockStyle, cx: float, cy: float, r: float, fill, outline=None, width: int = 0) -> None:
    if style.face == "round":
        draw.ellipse(_dial_box(cx, cy, r), fill=fill, outline=outline, width=width)
    elif style.face == "square":
        draw.rounded_rectangle(_dial_box(cx, cy, r), radius=r * 0.18, fill=fill, outline=outline, width=width)
    else:
        raise ValueError(f"Unknown face {style.face!r}; expected 'round' or 'square'.")


def _polar(cx: float, cy: float, angle_deg: float, dist: float) -> tuple[float, float]:
    """Point at ``dist`` from the centre in direction ``angle_deg`` (clockwise from 12)."""
    a = math.radians(angle_deg)
    return cx + dist * math.sin(a), cy - dist * math.cos(a)


def _hand_polygon(cx: float, cy: float, angle: float, length: float, width: float, shape: str) -> list[tuple[float, float]]:
    """Outline of a hand from its tail (behind the centre) to its tip."""
    a = math.radians(angle)
    dx, dy = math.sin(a), -math.cos(a)  # along the hand
    nx, ny = -dy, dx  # across the hand
    tail = -_HAND_TAIL * length

    def at(t: float, half: float) -> list[tuple[float, float]]:
        px, py = cx + dx * t, cy + dy * t
        return [(px + nx * half, py + ny * half), (px - nx * half, py - ny * half)]

    if shape == "bar":
        (a1, a2), (b1, b2) = at(tail, width / 2), at(length, width / 2)
        return [a1, b1, b2, a2]
    if shape == "taper":
        (a1, a2), (b1, b2) = at(tail, width / 2), at(length, width * 0.2)
        return [a1, b1, b2, a2]
    if shape == "arrow":
        neck = length * 0.78
        (a1, a2), (n1, n2), (h1, h2) = at(tail, width * 0.3), at(neck, width * 0.3), at(neck, width)
        tip = (cx + dx * length, cy + dy * length)
        return [a1, n1, h1, tip, h2, n2, a2]
    raise ValueError(f"Unknown hand shape {shape!r}; expected bar, taper or arrow.")


def render_clock(
    hour: int,
    minute: int,
    second: int | None = None,
    *,
    size: int = 384,
    seed: int = 0,
    style: ClockStyle | None = None,
) -> Image.Image:
    """Draw an analog clock showing ``hour:minute[:second]``.

    The dial is centred; its radius is ``style.radius * size``. Hands are drawn hour,
    minute, seconds (top), so the minute hand is always visible over the hour hand.

    Args:
        hour: 0-23.
        minute: 0-59.
        second: 0-59 draws a seconds hand; ``None`` draws none.
        size: image side in pixels (>= 32).
        seed: chooses the style when ``style`` is ``None``.
        style: explicit look (e.g. :data:`CLEAN_STYLE`).

    Returns:
        An RGB image of ``size x size``.

    Raises:
        ValueError: an invalid time or size.

    >>> render_clock(3, 40, size=64).size
    (64, 64)
    """
    _check_time(hour, minute, second)
    if not isinstance(size, int) or size < 32:
        raise ValueError(f"size must be an int >= 32 pixels, got {size!r}.")
    style = ClockStyle.random(random.Random(seed)) if style is None else style
    ss = _SUPERSAMPLE
    side = size * ss
    c = side / 2
    r = style.radius * side
    img = _background(style, side)

    if style.shadow:
        mask = Image.new("L", (side, side), 0)
        off = r * 0.05
        _draw_dial(ImageDraw.Draw(mask), style, c + off, c + off * 1.4, r, fill=120)
        mask = mask.filter(ImageFilter.GaussianBlur(r * 0.04))
        img.paste((0, 0, 0), mask=mask)

    draw = ImageDraw.Draw(img)
    rim = round(style.rim_width * r)
    _draw_dial(draw, style, c, c, r, fill=style.face_color, outline=style.rim_color if rim else None, width=rim)

    inner = r - rim  # ticks sit just inside the rim
    if style.ticks != "none":
        step = 1 if style.ticks == "minutes" else 5
        for k in range(0, 60, step):
            major = k % 5 == 0
            length = inner * (0.10 if major else 0.05)
            w = max(1, round(inner * (0.025 if major else 0.01)))
            p0 = _polar(c, c, k * 6, inner * 0.95 - length)
            p1 = _polar(c, c, k * 6, inner * 0.95)
            draw.line([p0, p1], fill=style.marks_color, width=w)

    if style.numerals != "none":
        font = ImageFont.load_default(size=max(8, round(r * (0.17 if style.numerals == "arabic" else 0.13))))
        for k in range(12):
            label = str(k or 12) if style.numerals == "arabic" else _ROMAN[k]
            draw.text(_polar(c, c, k * 30, r * _NUMERAL_RADIUS), label, fill=style.marks_color, font=font, anchor="mm")

    angles = hand_angles(hour, minute, second)
    for angle, length, width in (
        (angles.hour, HOUR_HAND_LENGTH, _HOUR_HAND_WIDTH),
        (angles.minute, MINUTE_HAND_LENGTH, _MINUTE_HAND_WIDTH),
    ):
        draw.polygon(_hand_polygon(c, c, angle, r * length, r * width, style.hand_shape), fill=style.hand_color)
    cap = r * 0.06
    draw.ellipse(_dial_box(c, c, cap), fill=style.hand_color)
    if angles.second is not None:
        poly = _hand_polygon(c, c, angles.second, r * SECOND_HAND_LENGTH, r * _SECOND_HAND_WIDTH, "bar")
        draw.polygon(poly, fill=style.second_color)
        draw.ellipse(_dial_box(c, c, cap * 0.5), fill=style.second_color)

    return img.reduce(ss)


def random_clock(seed: int, *, size: int = 384) -> tuple[Image.Image, ClockTime]:
    """A random time in a random style, with its label (hour 1-12).

    About a third of the clocks show a seconds hand (and their label has seconds).

    >>> image, time = random_clock(0, size=64)
    >>> image.size, 1 <= time.hour <= 12
    ((64, 64), True)
    """
    rng = random.Random(f"molmo-clock-{seed}")
    time = ClockTime(rng.randint(1, 12), rng.randint(0, 59), rng.randint(0, 59) if rng.random() < 0.33 else None)
    style = ClockStyle.random(rng)
    return render_clock(time.hour, time.minute, time.second, size=size, style=style), time


# --------------------------------------------------------------------------- CLI


def main(out: Path, n: int, size: int = 384, seed: int = 0) -> Path:
    """Write ``n`` random clocks to ``out`` plus ``out/labels.jsonl``.

    Args:
        out: output folder (created if missing).
        n: number of clocks (>= 1).
        size: image side in pixels.
        seed: first seed; clock ``i`` uses ``seed + i``.

    Returns:
        The path of the labels file.
    """
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels = out / "labels.jsonl"
    with labels.open("w", encoding="utf-8") as f:
        for i in range(n):
            image, time = random_clock(seed + i, size=size)
            name = f"clock_{i:05d}.png"
            image.save(out / name)
            f.write(json.dumps({"file": name, "time": str(time), **asdict(time)}) + "\n")
    return labels


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Render synthetic analog clocks with labels.")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--n", type=int, default=16, help="number of clocks")
    parser.add_argument("--size", type=int, default=384, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first clock")
    args = parser.parse_args()
    print(f"clocks: out={args.out} n={args.n} size={args.size} seed={args.seed}")
    path = main(out=args.out, n=args.n, size=args.size, seed=args.seed)
    print(f"wrote {args.n} images and {path}")
