"""Small data for the trainer tests: random images with one caption each, as a JSONL the trainer reads."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

CAPTIONS = ["a red cup", "two dogs", "a blue car", "a white cat"]


def caption_records(folder: Path, captions: list[str] = CAPTIONS) -> Path:
    """folder/{i}.png (random pixels, seeded by i) and folder/d.jsonl with one {image, caption} line each."""
    for i in range(len(captions)):
        Image.fromarray((np.random.default_rng(i).random((40, 56, 3)) * 255).astype("uint8")).save(folder / f"{i}.png")
    path = folder / "d.jsonl"
    path.write_text("".join(json.dumps({"image": f"{i}.png", "caption": c}) + "\n" for i, c in enumerate(captions)))
    return path
