"""Answer formats: model text -> points in pixels. Metrics never see the text's coordinate convention.

* ``molmo_v1``: ``<point x=".." y="..">`` / ``<points x1=".." y1=".." ...>``, 0-100 percent of width and
  height (:func:`molmo_core.outputs.parse_points`).
* ``molmo2``: ``<points coords="IMG ID X Y ID X Y ...">label</points>``, integers on a 0-1000 scale, frame
  groups separated by ";" or a tab, each group starting with its image index; falls back to the v1 forms
  (allenai/molmo2 `olmo/preprocessing/point_formatter.py`).

A new format is one function ``(text, width, height) -> list[(x, y)]`` added to :data:`FORMATS`.

>>> molmo2_points('<points coords="1 1 500 250 2 100 900">dogs</points>', 200, 100)
[(100.0, 25.0), (20.0, 90.0)]
"""

from __future__ import annotations

import re
from typing import Callable

from ..outputs import parse_points

__all__ = ["PointParser", "FORMATS", "molmo_v1_points", "molmo2_points", "get_format"]

PointParser = Callable[[str, float, float], list[tuple[float, float]]]

_COORDS = re.compile(r'<(?:points?|tracks)\b[^<>]*?\bcoords\s*=\s*"([^"]*)"', re.IGNORECASE)
_MOLMO2_SCALE = 1000.0


def molmo_v1_points(text: str, width: float, height: float) -> list[tuple[float, float]]:
    """Points of a Molmo v1 answer in pixels.

    >>> molmo_v1_points('<point x="50.0" y="10.0" alt="a">a</point>', 200, 100)
    [(100.0, 10.0)]
    """
    return [(p.x, p.y) for p in parse_points(text, width, height)]


def molmo2_points(text: str, width: float, height: float) -> list[tuple[float, float]]:
    """Points of a Molmo2 answer in pixels (0-1000 scale; values above 1000 are dropped); v1 tags too."""
    if not isinstance(text, str):
        return []
    groups = [g for m in _COORDS.finditer(text) for g in re.split(r"[;\t]", m.group(1))]
    if not groups:
        return molmo_v1_points(text, width, height)
    points = []
    for group in groups:
        values = group.split()[1:]  # the first token is the image index (or a video timestamp)
        for i in range(0, len(values) - 2, 3):
            try:
                x, y = float(values[i + 1]), float(values[i + 2])
            except ValueError:
                continue
            if 0 <= x <= _MOLMO2_SCALE and 0 <= y <= _MOLMO2_SCALE:
                points.append((x / _MOLMO2_SCALE * width, y / _MOLMO2_SCALE * height))
    return points


FORMATS: dict[str, PointParser] = {"molmo_v1": molmo_v1_points, "molmo2": molmo2_points}


def get_format(name: str) -> PointParser:
    """The point parser called ``name``.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    if name not in FORMATS:
        raise ValueError(f"Unknown answer format {name!r}; expected one of {sorted(FORMATS)}.")
    return FORMATS[name]
