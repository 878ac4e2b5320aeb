"""Evaluation of pointing, counting and clock reading with AI2's metric definitions.

* `metrics`: pure per-example scores and their aggregates (no model, no I/O).
* `formats`: answer formats (Molmo v1 percent tags, Molmo2 0-1000 coordinates) -> points in pixels.
* `data`: loaders that turn labelled data (PixMo-shaped parquet, PointArena folders, clock sets,
  synthetic `shapes:N` / `clocks:N`) into `Example`s with ground truth in pixels.
* `runner`: run models over examples (batched, resumable) or read saved predictions; score; compare.
* `report`: `report.json`, `report.html` (overlays, worst first, disagreements) and the printed table.
* `cli`: `python launch.py --eval ...` / `python -m molmo_core.eval ...`.

Definitions follow allenai/molmo `olmo/eval/evaluators.py` (PointingEval, PointCountEval, ClockEval) and
Molmo2's PointBenchEval; where we differ on purpose (a count of "There are none.", scoring the points of a
malformed answer) the report says so in its `notes`.
"""
