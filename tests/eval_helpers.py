"""Small evaluation data sets built in a temp folder, with answers whose scores are known exactly."""
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

W, H = 40, 30  # every test image


def write_images(folder: Path, n: int, prefix: str = "img") -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = f"{prefix}{i}.png"
        Image.new("RGB", (W, H), (10 * i, 100, 200)).save(folder / name)
        names.append(name)
    return names


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def box_mask(x0: int, y0: int, x1: int, y1: int) -> list:
    """A W x H mask with the box (inclusive) set, as nested lists (how parquet stores it)."""
    m = np.zeros((H, W), bool)
    m[y0:y1 + 1, x0:x1 + 1] = True
    return m.tolist()


def pct(x: float, y: float) -> dict:
    """A pixel point as PixMo-Points-Eval stores it: percent of width / height."""
    return {"x": x / W * 100, "y": y / H * 100}


def v1(*pixel_points) -> str:
    """A Molmo v1 answer pointing at pixel points."""
    coords = " ".join(f'x{i}="{x / W * 100:.1f}" y{i}="{y / H * 100:.1f}"' for i, (x, y) in
                      enumerate(pixel_points, start=1))
    return f'<points {coords} alt="things">things</points>'


def points_eval_set(folder: Path) -> tuple[Path, list[str], dict]:
    """A PixMo-Points-Eval-shaped parquet (percent points, one mask per point), answers and their metrics."""
    names = write_images(folder / "images", 4)
    rows = [
        # two objects, both hit
        {"points": [pct(5, 5), pct(30, 20)], "masks": [box_mask(2, 2, 8, 8), box_mask(25, 15, 35, 25)]},
        # one object, two predictions of which one hits
        {"points": [pct(10, 10)], "masks": [box_mask(8, 8, 12, 12)]},
        # no object: "There are none." is right
        {"points": [], "masks": []},
        # one object, a malformed answer
        {"points": [pct(20, 20)], "masks": [box_mask(18, 18, 22, 22)]},
    ]
    for name, row in zip(names, rows):
        row.update(image_url=f"https://example.org/x/{name}", label="things", image_sha256="0" * 64)
    answers = [v1((6, 4), (34, 24)), v1((10, 10), (30, 5)), "There are none.", "I do not know"]
    expected = {"n": 4, "precision": (1 + 0.5 + 1 + 0) / 4, "recall": (1 + 1 + 1 + 0) / 4,
                "f1": (1 + 2 / 3 + 1 + 0) / 4, "malformed": 0.25}
    return write_parquet(folder / "points_eval.parquet", rows), answers, expected


def count_set(folder: Path) -> tuple[Path, list[str], dict]:
    """A PixMo-Count-shaped parquet, answers and their metrics."""
    names = write_images(folder / "images", 4)
    counts = [2, 3, 0, 5]
    rows = [{"image_url": f"https://example.org/{n}", "label": "things", "count": c} for n, c in zip(names, counts)]
    answers = [f"Counting the {v1((5, 5), (20, 20))} shows a total of 2.",
               "There are 4.", "There are none.", "banana"]
    expected = {"n": 4, "accuracy": 0.5, "close": 0.75, "valid": 0.75, "malformed": 0.25,
                "points_accuracy": 0.5, "text_points_disagree": 0.25, "mean_per_count_accuracy": 0.5}
    return write_parquet(folder / "count.parquet", rows), answers, expected


def clock_set(folder: Path) -> tuple[Path, list[str], dict]:
    """A clock parquet (real-photo rules), answers and their metrics."""
    names = write_images(folder / "images", 5)
    times = [(12, 0), (3, 0), (12, 0), (-1, -1), (4, 30)]
    rows = [{"image_url": n, "hour": h, "minute": m} for n, (h, m) in zip(names, times)]
    answers = ["0:00", "3:59", "11:59", "I cannot see a clock", "no idea"]
    expected = {"n": 5, "hour": 0.6, "minute": 0.4, "minute_close": 0.8, "overall_exact": 0.4,
                "overall_close": 0.8, "malformed": 0.2}
    return write_parquet(folder / "clocks.parquet", rows), answers, expected


def predictions_file(path: Path, answers: list[str]) -> Path:
    return write_jsonl(path, [{"example": i, "answer": a} for i, a in enumerate(answers)])
