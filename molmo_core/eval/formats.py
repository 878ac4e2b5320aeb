"""Answer formats: model text -> points in pixels. Metrics never see the text's coordinate convention.

* ``molmo_v1``: ``<point x=".." y="..">`` / ``<points x1=".." y1=".." ...>``, 0-100 percent of width and
  height (:func:`molmo_core.outputs.parse_points`).
* ``molmo2``: ``<points coords="IMG ID X Y ID X Y ...">label</points>``, integers on a 0-1000 scale, frame
  groups separated by ";" or a tab, each group starting with its image index; falls back to the v1 forms
  (allenai/molmo2 `olmo/preprocessing/point_formatter.py`). Read with the app's parser,
  :func:`molmo_core.outputs.parse_any_points`, so the evaluation and the app see the same points.

Each format also has a count reader (:data:`COUNT_PARSERS`): v1 answers by AI2's PointCountEval rules
(:func:`molmo_core.eval.metrics.count_from_text`); Molmo2 answers by :func:`molmo_core.outputs.parse_molmo2_count`
(a stated number, "There are N <points ...>." included, else the number of points: Molmo2 counts by pointing).

``auto`` is not a format but a choice made per model: a loaded model's ``runner.family`` ("molmo" ->
``molmo_v1``, "molmo2" -> ``molmo2``, :func:`format_for_family`); saved answers are ``molmo2`` when any of
them holds a Molmo2 ``coords`` tag, else ``molmo_v1`` (:func:`sniff_format`).

A new format is one function ``(text, width, height) -> list[(x, y)]`` added to :data:`FORMATS` (and a count
reader in :data:`COUNT_PARSERS`).

>>> molmo2_points('<points coords="1 1 500 250 2 100 900">dogs</points>', 200, 100)
[(100.0, 25.0), (20.0, 90.0)]
"""

from __future__ import annotations

from typing import Callable, Iterable

from ..outputs import parse_any_points, parse_molmo2_count, parse_molmo2_points, parse_points
from .metrics import count_from_text

__all__ = ["PointParser", "CountParser", "FORMATS", "COUNT_PARSERS", "AUTO", "molmo_v1_points", "molmo2_points",
           "molmo2_count", "get_format", "get_count_parser", "format_for_family", "sniff_format"]

PointParser = Callable[[str, float, float], list[tuple[float, float]]]
CountParser = Callable[[str], "int | None"]
AUTO = "auto"


def molmo_v1_points(text: str, width: float, height: float) -> list[tuple[float, float]]:
    """Points of a Molmo v1 answer in pixels.

    >>> molmo_v1_points('<point x="50.0" y="10.0" alt="a">a</point>', 200, 100)
    [(100.0, 10.0)]
    """
    return [(p.x, p.y) for p in parse_points(text, width, height)]


def molmo2_points(text: str, width: float, height: float) -> list[tuple[float, float]]:
    """Points of a Molmo2 answer in pixels (0-1000 scale; values above 1000 are dropped), every image index
    of the answer; an answer without Molmo2 points is read in the v1 forms."""
    if not isinstance(text, str):
        return []
    return [(p.x, p.y) for p in parse_any_points(text, width, height, family="auto")]


def molmo2_count(text: str) -> int | None:
    """The count of a Molmo2 answer (:func:`molmo_core.outputs.parse_molmo2_count`).

    >>> molmo2_count('There are 2 <points coords="1 1 100 200 2 300 400">cups</points>.')
    2
    """
    return parse_molmo2_count(text)


FORMATS: dict[str, PointParser] = {"molmo_v1": molmo_v1_points, "molmo2": molmo2_points}
COUNT_PARSERS: dict[str, CountParser] = {"molmo_v1": count_from_text, "molmo2": molmo2_count}
_FAMILY_FORMAT = {"molmo": "molmo_v1", "v1": "molmo_v1", "molmo2": "molmo2"}


def format_for_family(family: str) -> str:
    """The answer format a model family writes.

    >>> format_for_family("molmo"), format_for_family("molmo2")
    ('molmo_v1', 'molmo2')

    Raises:
        ValueError: an unknown family.
    """
    if family not in _FAMILY_FORMAT:
        raise ValueError(f"Unknown model family {family!r}; expected 'molmo' (Molmo v1) or 'molmo2'.")
    return _FAMILY_FORMAT[family]


def sniff_format(answers: Iterable[str]) -> str:
    """``molmo2`` when any answer holds a Molmo2 ``<points coords=...>`` / ``<tracks>`` tag, else ``molmo_v1``.

    >>> sniff_format(["There are none.", '<points coords="1 1 500 500">a</points>'])
    'molmo2'
    """
    return "molmo2" if any(parse_molmo2_points(a) for a in answers) else "molmo_v1"


def get_count_parser(name: str) -> CountParser:
    """The count reader of the answer format ``name``.

    Raises:
        ValueError: an unknown name.
    """
    get_format(name)
    return COUNT_PARSERS[name]


def get_format(name: str) -> PointParser:
    """The point parser called ``name``.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    if name not in FORMATS:
        raise ValueError(f"Unknown answer format {name!r}; expected one of {sorted(FORMATS)}.")
    return FORMATS[name]
