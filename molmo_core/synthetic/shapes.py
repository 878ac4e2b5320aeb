"""Synthetic scenes of coloured shapes with exact per-object masks, for pointing and counting evaluations.

Each scene asks about one kind of object in one colour ("red circles"): 0 or more *targets* of that colour
and kind are drawn among *distractors* that share the colour or the kind (or neither), with random sizes,
rotations and overlaps, on a varied background. Objects are drawn without anti-aliasing, so the visible
pixels of each object are exactly its mask; an object may be partly hidden by later ones, but at least
:data:`MIN_VISIBLE` of it stays visible (else it is placed elsewhere). Each target's point is the visible
pixel farthest from the mask's border (a point inside the object, not merely its centroid).

Everything follows from the seed: :func:`random_scene` with the same seed gives the same image and labels.
Scene ``seed`` has ``seed % (max_count + 1)`` targets, so ``shapes:N`` covers the counts 0, 1, 2, ... in turn.

>>> s = random_scene(3)
>>> s.count, s.points.shape, s.masks.shape[0], s.masks.shape[1:] == (s.image.height, s.image.width)
(3, (3, 2), 3, True)
>>> all(s.masks[i][int(y), int(x)] for i, (x, y) in enumerate(s.points))
True
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["KINDS", "COLORS", "MIN_VISIBLE", "ShapeObject", "ShapeScene", "shape_mask", "random_scene"]

#: Shape kinds and their names in queries (plural: + "s").
KINDS: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon")

#: Object colours by name: saturated, far apart, never used for backgrounds.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 35),
    "green": (30, 160, 60),
    "blue": (35, 75, 215),
    "yellow": (245, 205, 20),
    "purple": (130, 45, 175),
    "orange": (245, 125, 15),
}

#: The smallest fraction of an object that must stay visible when others overlap it.
MIN_VISIBLE = 0.6

_SIZES = ((320, 240), (384, 288), (448, 336), (336, 448), (400, 400))
_MAX_TRIES = 40
_VERTICES = {"square": 4, "triangle": 3, "hexagon": 6}


@dataclass(frozen=True)
class ShapeObject:
    """One drawn object: its kind, colour name, centre and radius (pixels), and its visible mask (H, W)."""

    kind: str
    color: str
    center: tuple[float, float]
    radius: float
    mask: np.ndarray


@dataclass(frozen=True)
class ShapeScene:
    """A scene and its labels.

    Attributes:
        image: the RGB image.
        label: the query, e.g. ``"red circles"``.
        targets: the objects that match the query, in drawing order.
        distractors: every other object.
        points: (count, 2) float pixels (x, y), one point inside each target's visible mask.
    """

    image: Image.Image
    label: str
    targets: tuple[ShapeObject, ...]
    distractors: tuple[ShapeObject, ...]
    points: np.ndarray

    @property
    def count(self) -> int:
        return len(self.targets)

    @property
    def masks(self) -> np.ndarray:
        """bool (count, H, W): each target's visible pixels."""
        height, width = self.image.height, self.image.width
        return np.stack([t.mask for t in self.targets]) if self.targets else np.zeros((0, height, width), bool)


def _polygon(n: int, cx: float, cy: float, r: float, rotation: float, inner: float | None = None) -> list:
    """A regular polygon (or, with ``inner``, a star of ``n`` spikes) around (cx, cy)."""
    radii = [r] * n if inner is None else [r, inner * r] * n
    step = 2 * math.pi / len(radii)
    return [(cx + rr * math.sin(rotation + i * step), cy - rr * math.cos(rotation + i * step))
            for i, rr in enumerate(radii)]


def shape_mask(kind: str, cx: float, cy: float, r: float, rotation: float, size: tuple[int, int]) -> np.ndarray:
    """bool (H, W) mask of one shape of radius ``r`` (pixels) centred at (cx, cy), ``rotation`` in radians.

    Raises:
        ValueError: an unknown kind.

    >>> int(shape_mask("square", 5, 5, 3, 0.0, (10, 10)).sum()) > 0
    True
    """
    img = Image.new("L", size, 0)
    draw = ImageDraw.Draw(img)
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif kind == "star":
        draw.polygon(_polygon(5, cx, cy, r, rotation, inner=0.45), fill=255)
    elif kind in _VERTICES:
        draw.polygon(_polygon(_VERTICES[kind], cx, cy, r, rotation), fill=255)
    else:
        raise ValueError(f"Unknown shape kind {kind!r}; expected one of {list(KINDS)}.")
    return np.asarray(img) > 0


def _background(rng: random.Random, width: int, height: int) -> np.ndarray:
    """float (H, W, 3) muted background: solid, gradient, blotches or stripes."""
    def muted() -> np.ndarray:
        grey = rng.uniform(70, 235)
        return np.array([grey + rng.uniform(-25, 25) for _ in range(3)]).clip(0, 255)

    c1, c2 = muted(), muted()
    style = rng.choice(["solid", "gradient", "blotches", "stripes"])
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    angle = rng.uniform(0, math.pi)
    along = xs * math.cos(angle) + ys * math.sin(angle)
    if style == "solid":
        t = np.zeros((height, width))
    elif style == "gradient":
        t = (along - along.min()) / max(1e-9, np.ptp(along))
    elif style == "blotches":
        grid = Image.fromarray(np.array([[rng.randrange(256) for _ in range(5)] for _ in range(5)], np.uint8))
        t = np.asarray(grid.resize((width, height), Image.Resampling.BICUBIC), np.float64) / 255.0
    else:
        t = (np.floor(along / rng.uniform(12, 40)) % 2).astype(np.float64)
    return c1 * (1 - t[..., None]) + c2 * t[..., None]


def _specs(rng: random.Random, color: str, kind: str, n_targets: int) -> list[tuple[str, str]]:
    """(colour, kind) of every object to draw, targets and distractors, in drawing order."""
    specs = [(color, kind)] * n_targets
    for _ in range(rng.randint(1, 5)):
        roll = rng.random()
        other_colors = [c for c in COLORS if c != color]
        other_kinds = [k for k in KINDS if k != kind]
        if roll < 0.4:
            specs.append((color, rng.choice(other_kinds)))  # same colour, other kind
        elif roll < 0.8:
            specs.append((rng.choice(other_colors), kind))  # same kind, other colour
        else:
            specs.append((rng.choice(other_colors), rng.choice(other_kinds)))
    rng.shuffle(specs)
    return specs


def _interior_point(mask: np.ndarray) -> tuple[float, float]:
    """The mask pixel farthest from the mask's border, as (x, y)."""
    from scipy.ndimage import distance_transform_edt

    depth = distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    row, col = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return float(col), float(row)


def random_scene(seed: int, *, max_count: int = 6, size: tuple[int, int] | None = None,
                 plain: bool = False) -> ShapeScene:
    """Draw a random scene with ``seed % (max_count + 1)`` targets (fewer only if they cannot be placed).

    Args:
        seed: any int; the same seed gives the same scene.
        max_count: the largest number of targets.
        size: (width, height); default one of a few sizes (landscape, portrait, square) chosen by the seed.
        plain: an easier variant (for learning tests): no distractors, larger objects (radius 0.10-0.16 of the
            shorter side instead of 0.05-0.12), a plain light-grey background and, unless ``size`` is given,
            336 x 336 pixels; the count is still only in the image. The default (False) draws exactly the scenes it always did.

    Returns:
        A :class:`ShapeScene`.
    """
    rng = random.Random(f"molmo-shapes-{seed}")
    width, height = size or ((336, 336) if plain else rng.choice(_SIZES))
    color, kind = rng.choice(list(COLORS)), rng.choice(KINDS)
    placed: list[tuple[str, str, tuple[float, float], float, np.ndarray]] = []  # colour, kind, centre, r, full mask
    visible: list[np.ndarray] = []
    n_targets = seed % (max_count + 1)
    specs = [(color, kind)] * n_targets if plain else _specs(rng, color, kind, n_targets)
    for obj_color, obj_kind in specs:
        for _ in range(_MAX_TRIES):
            r = rng.uniform(*((0.10, 0.16) if plain else (0.05, 0.12))) * min(width, height)
            cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
            full = shape_mask(obj_kind, cx, cy, r, rng.uniform(0, 2 * math.pi), (width, height))
            still = [v & ~full for v in visible]
            if all(s.sum() >= MIN_VISIBLE * p[4].sum() for s, p in zip(still, placed)):
                placed.append((obj_color, obj_kind, (cx, cy), r, full))
                visible = still + [full.copy()]
                break
    pixels = np.full((height, width, 3), 225.0) if plain else _background(rng, width, height)
    for (obj_color, *_rest, full) in placed:
        jitter = np.array([rng.randint(-12, 12) for _ in range(3)])
        pixels[full] = np.clip(np.array(COLORS[obj_color]) + jitter, 0, 255)
    objects = [ShapeObject(k, c, centre, r, v) for (c, k, centre, r, _), v in zip(placed, visible)]
    targets = tuple(o for o in objects if (o.color, o.kind) == (color, kind))
    points = np.array([_interior_point(t.mask) for t in targets], np.float64).reshape(-1, 2)
    return ShapeScene(image=Image.fromarray(pixels.astype(np.uint8), "RGB"), label=f"{color} {kind}s",
                      targets=targets, distractors=tuple(o for o in objects if o not in targets), points=points)
