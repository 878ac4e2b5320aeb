"""The evaluation report: report.json, report.html (overlays, worst first, disagreements) and a text table.

report.json::

    {"task", "data", "n", "format", "rules": [...], "bootstrap": {"resamples", "seed", "level"},
     "metrics": {...},                         # the first model's metrics (the only one with one model)
     "models": [{"name", "format", "metrics", "details"}, ...],
     "comparisons": [{"baseline", "model", "metrics": {KEY: {"difference", "ci95": [low, high] | null}}}],
     "examples": [{"example", "source", "answers": {NAME: TEXT}, "primary": {NAME: SCORE}}]}

``metrics`` keys, each a fraction in [0, 1] except ``n``: pointing ``precision``, ``recall``, ``f1`` (or
``accuracy`` on Point-Bench data); counting ``accuracy``, ``close``, ``valid``, ``points_accuracy``,
``text_points_disagree``, ``mean_per_count_accuracy``; clocks ``hour``, ``minute``, ``minute_close``,
``overall_exact``, ``overall_close``; always ``malformed`` (no points / count / time could be read) and ``n``.

``format`` is how the answers were read (``molmo_v1`` or ``molmo2``); each model carries its own (a Molmo v1
model compared with a Molmo2 model), and the top-level ``format`` is ``mixed`` when they differ.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from .metrics import CountScore
from .runner import BOOTSTRAP, ExampleResult, ModelResult, disagreements

__all__ = ["report_dict", "write_json", "format_table", "write_html", "draw_overlay", "RULE_NOTES"]

#: What each pointing rule means, written next to the numbers.
RULE_NOTES = {
    "mask": "pointing hit: the predicted point, rounded to the nearest pixel, lies in the mask of the ground-truth "
            "object it is matched to (Hungarian matching on pixel distance; AI2 PointingEval)",
    "distance": "pointing hit: no masks in the data, so a matched prediction is a hit within 5 % of the image "
                "diagonal of its ground-truth point (our rule, not AI2's; points outside the image miss)",
    "point_bench": "Point-Bench: correct when at least one point is predicted and every point is in the mask",
}
COUNT_NOTE = ('counting: count read from the text by AI2\'s rules, except that "none" counts as 0 (the v1 '
              'evaluator\'s regex bug scores "There are none." invalid); points_accuracy counts the points instead')
MALFORMED_NOTE = "malformed: nothing could be parsed (pointing: no point and no 'none'; clocks: no H:MM)"
_GALLERY = 48  # examples per gallery
_THUMB = 320  # longest side of an overlay in the HTML, pixels


def report_dict(task: str, data_spec: str, models: Sequence[ModelResult], comparisons: list[dict],
                rules: list[str], answer_format: str) -> dict:
    """The report as a JSON-ready dict (see the module docstring for its shape)."""
    first = models[0]
    examples = [{"example": r.example.index, "source": r.example.source,
                 "answers": {m.name: m.results[i].answer for m in models},
                 "primary": {m.name: m.results[i].score.primary() for m in models}}
                for i, r in enumerate(first.results)]
    formats = [m.answer_format or answer_format for m in models]
    overall = formats[0] if len(set(formats)) == 1 else "mixed"
    return {"task": task, "data": data_spec, "n": len(first.results), "format": overall, "rules": rules,
            "bootstrap": BOOTSTRAP, "metrics": first.metrics,
            "models": [{"name": m.name, "format": f, "metrics": m.metrics, "details": m.details}
                       for m, f in zip(models, formats)],
            "comparisons": comparisons, "examples": examples}


def write_json(path: Path, report: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
    tmp.replace(path)


def _metric_rows(report: dict) -> list[tuple[str, list[str]]]:
    """(metric, cells): one cell per model, then difference and interval per comparison."""
    rows = []
    for key, value in report["metrics"].items():
        cells = [str(m["metrics"][key]) if key == "n" else f"{m['metrics'][key]:.3f}" for m in report["models"]]
        for comp in report["comparisons"]:
            row = comp["metrics"][key]
            ci = row["ci95"]
            cells.append(f"{row['difference']:+.3f}")
            cells.append(f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "-")
        rows.append((key, cells))
    return rows


def _headers(report: dict) -> list[str]:
    heads = [m["name"] for m in report["models"]]
    for i, comp in enumerate(report["comparisons"], start=2):
        heads += [f"M{i}-M1", "95% CI"]
    return heads


def format_table(report: dict) -> str:
    """The metrics as a plain-text table (models M1, M2, ... in columns; differences against M1)."""
    heads = ["metric"] + _headers(report)
    rows = [[k] + cells for k, cells in _metric_rows(report)]
    widths = [max(len(r[i]) for r in [heads] + rows) for i in range(len(heads))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [heads] + rows]
    legend = [f"M{i}: {m['name']}" for i, m in enumerate(report["models"], start=1)]
    return "\n".join([f"{report['task']} on {report['data']} ({report['n']} examples)"] + lines + legend)


# --------------------------------------------------------------------------- overlays

_GT = (0, 200, 255)
_HIT = (40, 220, 60)
_MISS = (255, 40, 40)
_NEUTRAL = (255, 215, 0)


def _hit_flags(result: ExampleResult) -> list[bool | None]:
    """Per predicted point: hit, miss, or None where the task has no hit notion (counting)."""
    score = result.score
    if hasattr(score, "pairs"):
        flags: list[bool | None] = [False] * len(result.points)
        for p, _, hit in score.pairs:
            flags[p] = hit
        return flags
    if hasattr(score, "inside"):
        return list(score.inside)
    return [None] * len(result.points)


def draw_overlay(result: ExampleResult) -> Image.Image:
    """The example's image with ground truth (tinted masks, cyan rings) and predictions (green dot = hit,
    red cross = miss, yellow dot = counted point)."""
    ex = result.example
    img = ex.load_image().copy()
    if ex.masks is not None and len(ex.masks):
        union = Image.fromarray((ex.masks.any(axis=0) * 90).astype(np.uint8))
        img.paste(Image.new("RGB", img.size, _GT), mask=union)
    draw = ImageDraw.Draw(img)
    r = max(4, round(min(img.size) * 0.02))
    for x, y in (ex.points if ex.points is not None else []):
        draw.ellipse([x - r * 1.6, y - r * 1.6, x + r * 1.6, y + r * 1.6], outline=_GT, width=max(2, r // 2))
    for (x, y), hit in zip(result.points, _hit_flags(result)):
        if hit is False:
            draw.line([x - r, y - r, x + r, y + r], fill=_MISS, width=max(2, r // 2))
            draw.line([x - r, y + r, x + r, y - r], fill=_MISS, width=max(2, r // 2))
        else:
            draw.ellipse([x - r, y - r, x + r, y + r], fill=_HIT if hit else _NEUTRAL, outline=(0, 0, 0))
    return img


def _data_uri(img: Image.Image) -> str:
    img = img.copy()
    img.thumbnail((_THUMB, _THUMB))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _truth(result: ExampleResult) -> str:
    ex = result.example
    if ex.clock is not None:
        return "unanswerable" if ex.clock[0] == -1 else f"truth {ex.clock[0]}:{ex.clock[1]:02d}"
    if isinstance(result.score, CountScore):
        return f"truth: {ex.count} {ex.label}"
    if ex.points is not None:
        return f"truth: {len(ex.points)} × {ex.label}"
    return f"truth: the region of {ex.instruction!r}"


def _card(result: ExampleResult, model: str) -> str:
    values = ", ".join(f"{k} {v:.2f}" for k, v in result.values().items())
    return (f'<figure><img src="{_data_uri(draw_overlay(result))}" alt="example {result.example.index}">'
            f"<figcaption><b>{html.escape(model)}</b> · #{result.example.index} · "
            f"{html.escape(_truth(result))}<br><code>{html.escape(result.answer[:300])}</code><br>"
            f"<small>{html.escape(values)}</small></figcaption></figure>")


_CSS = ("body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
        "padding:3px 8px;text-align:right}td:first-child{text-align:left}.g{display:flex;flex-wrap:wrap;gap:10px}"
        "figure{margin:0;width:330px;border:1px solid #ddd;padding:4px}figcaption{font-size:12px;word-break:"
        "break-all}.row{display:flex;gap:6px;border-bottom:2px solid #888;padding:6px 0}")


def write_html(path: Path, report: dict, models: Sequence[ModelResult]) -> None:
    """report.html: the table, the rules, each model's worst examples first, and (with several models) the
    examples where they disagree, side by side. Images are embedded as base64 JPEG."""
    heads = "".join(f"<th>{html.escape(h)}</th>" for h in ["metric"] + _headers(report))
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in [k] + cells) + "</tr>"
                   for k, cells in _metric_rows(report))
    parts = [f"<!doctype html><meta charset='utf-8'><title>Evaluation: {html.escape(report['task'])}</title>"
             f"<style>{_CSS}</style><h1>{html.escape(report['task'])} on {html.escape(report['data'])}</h1>"
             f"<p>{report['n']} examples · answer format {html.escape(report['format'])}</p>"
             f"<table><tr>{heads}</tr>{body}</table><ul>"
             + "".join(f"<li>{html.escape(r)}</li>" for r in report["rules"]) + "</ul>"]
    for i, m in enumerate(models, start=1):
        order = sorted(range(len(m.results)), key=lambda j: (m.results[j].score.primary(), j))[:_GALLERY]
        parts.append(f"<h2>M{i} {html.escape(m.name)}: worst examples first</h2><div class='g'>"
                     + "".join(_card(m.results[j], m.name) for j in order) + "</div>")
    if len(models) > 1:
        diff = disagreements(models)
        parts.append(f"<h2>Disagreements ({len(diff)} examples where the models score differently)</h2>")
        for j in diff[:_GALLERY]:
            parts.append("<div class='row'>" + "".join(_card(m.results[j], m.name) for m in models) + "</div>")
    path.write_text("".join(parts), encoding="utf-8")
