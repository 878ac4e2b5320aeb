"""Overlays for model answers: numbered point markers, a count badge, a clean clock face.

Pure PIL functions: the input image is never modified, a new RGB image is returned.
Points come from :func:`molmo_core.outputs.parse_points` (pixels, 1-based ``index``).

>>> from PIL import Image
>>> from molmo_core.outputs import Point
>>> out = draw_points(Image.new("RGB", (100, 80), "white"), [Point(50.0, 40.0, "cat", 1)], labels=False)
>>> out.getpixel((50, 40)) == PALETTE[0]
True
"""

from __future__ import annotations

from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from molmo_core.synthetic.clocks import CLEAN_STYLE, render_clock
from molmo_core.outputs import Point

__all__ = [
    "PALETTE",
    "marker_radius",
    "label_colors",
    "draw_points",
    "draw_count_badge",
    "draw_clock_face",
]

#: Marker fill colours, one per distinct label in first-seen order (cycled).
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),  # red
    (0, 130, 200),  # blue
    (60, 180, 75),  # green
    (255, 200, 25),  # yellow
    (145, 30, 180),  # purple
    (245, 130, 48),  # orange
    (70, 240, 240),  # cyan
    (240, 50, 230),  # magenta
)


def _luminance(color: tuple[int, int, int]) -> float:
    r, g, b = color
    return 0.299 * r + 0.587 * g + 0.114 * b


def _contrast(color: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black on light colours, white on dark ones."""
    return (0, 0, 0) if _luminance(color) > 140 else (255, 255, 255)


def marker_radius(width: int, height: int) -> int:
    """Marker radius in pixels for an image: 3 % of the shorter side, at least 8.

    >>> marker_radius(1000, 500), marker_radius(50, 50)
    (15, 8)
    """
    return max(8, round(min(width, height) * 0.03))


def label_colors(points: Sequence[Point]) -> dict[str, tuple[int, int, int]]:
    """Colour of each distinct label, in first-seen order.

    >>> label_colors([Point(0, 0, "b", 1), Point(0, 0, "a", 2), Point(0, 0, "b", 3)])
    {'b': (230, 25, 75), 'a': (0, 130, 200)}
    """
    colors: dict[str, tuple[int, int, int]] = {}
    for p in points:
        if p.label not in colors:
            colors[p.label] = PALETTE[len(colors) % len(PALETTE)]
    return colors


def draw_points(image: Image.Image, points: Sequence[Point], *, labels: bool = True) -> Image.Image:
    """Draw a numbered circle at every point.

    Each marker is a disc in its label's colour (:func:`label_colors`) with an outline
    that contrasts with the fill, and, with ``labels=True``, the point's ``index`` in
    its centre. The radius scales with the image (:func:`marker_radius`).

    Args:
        image: any PIL image (converted to RGB; not modified).
        points: pixel coordinates, e.g. from ``parse_points(text, *image.size)``.
        labels: write the index numbers.

    Returns:
        A new RGB image of the same size.
    """
    out = image.convert("RGB")  # always a copy
    if not points:
        return out
    r = marker_radius(*out.size)
    outline_w = max(2, r // 4)
    colors = label_colors(points)
    font = ImageFont.load_default(size=max(7, round(r * 1.1))) if labels else None
    draw = ImageDraw.Draw(out)
    for p in points:
        fill = colors[p.label]
        draw.ellipse([p.x - r, p.y - r, p.x + r, p.y + r], fill=fill, outline=_contrast(fill), width=outline_w)
        if font is not None:
            text = str(p.index)
            if len(text) > 2:  # keep big indices inside the disc
                font_small = ImageFont.load_default(size=max(6, round(r * 0.8)))
                draw.text((p.x, p.y), text, fill=_contrast(fill), font=font_small, anchor="mm")
            else:
                draw.text((p.x, p.y), text, fill=_contrast(fill), font=font, anchor="mm")
    return out


def draw_count_badge(image: Image.Image, n: int) -> Image.Image:
    """Write the count in a dark rounded badge in the top-left corner.

    Args:
        image: any PIL image (not modified).
        n: the count (>= 0).

    Returns:
        A new RGB image of the same size.

    Raises:
        ValueError: a negative count.
    """
    if n < 0:
        raise ValueError(f"Count must be >= 0, got {n}; pass the parsed count (parse_count).")
    out = image.convert("RGB")
    w, h = out.size
    height = max(14, round(min(w, h) * 0.09))
    font = ImageFont.load_default(size=max(8, round(height * 0.7)))
    draw = ImageDraw.Draw(out)
    text = str(n)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font, anchor="lt")
    pad = height // 3
    margin = max(2, height // 4)
    box = [margin, margin, margin + (right - left) + 2 * pad, margin + height]
    draw.rounded_rectangle(box, radius=height // 3, fill=(20, 20, 20), outline=(255, 255, 255), width=max(1, height // 14))
    draw.text(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), text, fill=(255, 255, 255), font=font, anchor="mm")
    return out


def draw_clock_face(hour: int, minute: int, second: int | None = None, size: int = 256) -> Image.Image:
    """A clean analog face showing a parsed time, for side-by-side checking.

    Args:
        hour: 0-23 (drawn on a 12-hour dial).
        minute: 0-59.
        second: 0-59 adds a red seconds hand.
        size: image side in pixels (>= 32).

    Returns:
        An RGB ``size x size`` image (black hands on a white dial).

    Raises:
        ValueError: an invalid time or size.

    >>> draw_clock_face(3, 40, size=64).size
    (64, 64)
    """
    return render_clock(hour, minute, second, size=size, style=CLEAN_STYLE)
