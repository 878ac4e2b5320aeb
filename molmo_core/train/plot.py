"""Loss curve PNG from metrics.jsonl, drawn with PIL (no plotting dependency)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image, ImageDraw

W, H, PAD = 800, 400, 50


def read_metrics(path: str | Path) -> list[dict]:
    """The JSON lines of metrics.jsonl; a half-written last line (a run in progress) is ignored."""
    rows = []
    p = Path(path)
    if not p.is_file():
        return rows
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def plot_metrics(metrics: str | Path, out: str | Path) -> Path | None:
    """Train loss (blue) and eval loss (orange dots) against step; written atomically to `out`."""
    rows = read_metrics(metrics)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train and not evals:
        return None
    pts = train + evals
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    if x1 == x0:
        x1 = x0 + 1
    if y1 - y0 < 1e-9:
        y1 = y0 + 1e-3

    def xy(s, v):
        return PAD + (s - x0) / (x1 - x0) * (W - 2 * PAD), H - PAD - (v - y0) / (y1 - y0) * (H - 2 * PAD)

    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.rectangle([PAD, PAD, W - PAD, H - PAD], outline=(180, 180, 180))
    for frac in (0.25, 0.5, 0.75):
        y = PAD + frac * (H - 2 * PAD)
        d.line([PAD, y, W - PAD, y], fill=(235, 235, 235))
        d.text((4, y - 6), f"{y1 - frac * (y1 - y0):.3g}", fill=(90, 90, 90))
    d.text((4, PAD - 6), f"{y1:.3g}", fill=(90, 90, 90))
    d.text((4, H - PAD - 6), f"{y0:.3g}", fill=(90, 90, 90))
    d.text((PAD, H - PAD + 8), f"step {x0}", fill=(90, 90, 90))
    d.text((W - PAD - 60, H - PAD + 8), f"step {x1}", fill=(90, 90, 90))
    d.text((PAD, 15), "loss (train: blue, eval: orange)", fill=(40, 40, 40))
    if len(train) > 1:
        d.line([xy(s, v) for s, v in train], fill=(31, 119, 180), width=2)
    elif train:
        x, y = xy(*train[0])
        d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(31, 119, 180))
    for s, v in evals:
        x, y = xy(s, v)
        d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=(255, 127, 14))
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}.png")
    img.save(tmp)
    os.replace(tmp, out)
    return out
