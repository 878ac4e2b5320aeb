"""Evaluation data -> `Example`s with ground truth in pixels.

Data specs (:func:`load_dataset`):

* ``shapes:N``: synthetic scenes (`molmo_core.synthetic.shapes`): query label, one point and an exact
  mask per target, the count; for ``--task point`` and ``--task count``.
* ``clocks:N``: synthetic clocks (`molmo_core.synthetic.clocks.random_clock`); scored with the +-3 minute
  rule of the synthetic PixMo-Clocks evaluation.
* ``FILE.parquet`` / ``FILE.jsonl``: rows with ``image_url`` (plus optional ``image_sha256`` /
  ``image_path``) and, by task:
  - point: ``label``, ``points`` (list of ``{x, y}``), optional ``masks`` (bool ``[n_points, H, W]``,
    PixMo-Points-Eval); without masks a distance rule decides hits;
  - count: ``label``, ``count`` (``points`` optional; PixMo-Count);
  - clock: ``hour``, ``minute``, optional ``second``; -1 marks an unanswerable item (real-photo rules).
  Images are found by ``image_path``, the URL's file name or ``<sha256>.<ext>`` in ``--images-dir``, the
  file's folder or its parent, else by hashing the images in ``--images-dir``. Point coordinates are
  0-100 percent or pixels: ``coords="auto"`` takes percent unless a coordinate exceeds 100.
* ``FOLDER`` with ``data.json`` (PointArena / Point-Bench): ``image_filename``, ``category``,
  ``user_input``, ``mask_filename``, ``count``; masks are PNGs binarised at > 127.

Bad data raises :class:`EvalDataError` naming the file, row or column, what was expected and what to do.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from ..prompts import clock_prompt, count_prompt, point_prompt

__all__ = ["TASKS", "EvalDataError", "Example", "Dataset", "load_dataset", "mask_from_png"]

TASKS = ("point", "count", "clock")
SYNTHETIC_CLOCK_TOLERANCE = 3  # minutes: the synthetic PixMo-Clocks rule
REAL_CLOCK_TOLERANCE = 1  # minutes: ClockEval's test mode (real photos)
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


class EvalDataError(ValueError):
    """Evaluation data that cannot be used as given."""


@dataclass
class Example:
    """One evaluation item.

    Attributes:
        index: 0-based position in the data set (the ``example`` key of predictions.jsonl).
        image: a file or an in-memory image.
        source: where it came from, for messages (``"eval.parquet row 3"``).
        label: the query, e.g. ``"red circles"``.
        points: float (n, 2) ground-truth points in pixels, one per object.
        masks: bool (n, H, W), one per object; for Point-Bench data (1, H, W), the target region.
        count: the true count.
        clock: (hour, minute), -1 for an unanswerable item; ``second`` when given.
        instruction: a verbatim prompt (Point-Bench's ``user_input``) instead of a templated one.
        category: Point-Bench category.
    """

    index: int
    image: Path | Image.Image
    source: str
    label: str | None = None
    points: np.ndarray | None = None
    masks: np.ndarray | None = None
    count: int | None = None
    clock: tuple[int, int] | None = None
    second: int | None = None
    instruction: str | None = None
    category: str | None = None
    _size: tuple[int, int] | None = field(default=None, repr=False)

    def load_image(self) -> Image.Image:
        """The image as RGB (a fresh object for files, the stored one for synthetic data)."""
        if isinstance(self.image, Image.Image):
            return self.image.convert("RGB") if self.image.mode != "RGB" else self.image
        with Image.open(self.image) as img:
            return img.convert("RGB")

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), from the file header without decoding the image."""
        if self._size is None:
            if isinstance(self.image, Image.Image):
                self._size = self.image.size
            else:
                with Image.open(self.image) as img:
                    self._size = img.size
        return self._size

    def prompt(self, task: str, family: str = "molmo") -> str:
        """The question for ``task``: the verbatim instruction, else the trained template of the model
        ``family`` ("molmo" for Molmo v1, "molmo2"; `molmo_core.prompts`)."""
        if self.instruction:
            return self.instruction
        if task == "clock":
            return clock_prompt(family=family)
        if task == "point":
            return point_prompt(self.label, family=family)
        return count_prompt(self.label, family=family)


@dataclass
class Dataset:
    """Examples plus what the scorer must know about them.

    Attributes:
        spec: the data spec as given.
        examples: in order; ``examples[i].index == i``.
        point_rule: ``"mask"``, ``"distance"`` or ``"point_bench"`` (pointing only).
        clock_tolerance: minutes for "close" (1 real photos, 3 synthetic).
        notes: facts to print next to the numbers (detected coordinate scale, ...).
    """

    spec: str
    examples: list[Example]
    point_rule: str = "mask"
    clock_tolerance: int = REAL_CLOCK_TOLERANCE
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)


# --------------------------------------------------------------------------- synthetic


def _positive(spec: str, text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise EvalDataError(f"Data spec {spec!r}: expected a positive number after the colon, e.g. "
                            f"'{spec.split(':')[0]}:50'.")
    return int(text)


def _shapes(spec: str, n: int) -> Dataset:
    from ..synthetic.shapes import random_scene

    examples = []
    for i in range(n):
        s = random_scene(i)
        examples.append(Example(i, s.image, f"{spec} #{i}", label=s.label, points=s.points, masks=s.masks,
                                count=s.count))
    return Dataset(spec, examples, point_rule="mask", notes=["synthetic shapes: exact masks, seeds 0..N-1"])


def _clocks(spec: str, n: int) -> Dataset:
    from ..synthetic.clocks import random_clock

    examples = []
    for i in range(n):
        image, t = random_clock(i)
        examples.append(Example(i, image, f"{spec} #{i}", clock=(t.hour, t.minute), second=t.second))
    return Dataset(spec, examples, clock_tolerance=SYNTHETIC_CLOCK_TOLERANCE,
                   notes=[f"synthetic clocks: minute close within +-{SYNTHETIC_CLOCK_TOLERANCE} (synthetic rule)"])


# --------------------------------------------------------------------------- images


class _ImageFinder:
    """Finds a row's image by path, URL file name or sha256 name in a few folders, else by content hash."""

    def __init__(self, folders: list[Path], hash_folder: Path | None):
        self.folders = [f for f in folders if f is not None and f.is_dir()]
        self.hash_folder = hash_folder
        self._by_sha: dict[str, Path] | None = None

    def names(self, row: dict) -> list[str]:
        url = str(row.get("image_url") or "")
        sha = str(row.get("image_sha256") or "")
        names = [str(row.get("image_path") or ""), url.split("?")[0].rstrip("/").split("/")[-1]]
        return [n for n in names if n] + ([sha + ext for ext in _IMAGE_EXTENSIONS] if sha else [])

    def find(self, row: dict) -> Path | None:
        for name in self.names(row):
            p = Path(name).expanduser()
            for candidate in [p] if p.is_absolute() else [f / p for f in self.folders]:
                if candidate.is_file():
                    return candidate
        sha = row.get("image_sha256")
        return self._sha_index().get(str(sha).lower()) if sha and self.hash_folder else None

    def _sha_index(self) -> dict[str, Path]:
        if self._by_sha is None:
            self._by_sha = {}
            for p in sorted(self.hash_folder.rglob("*")):
                if p.suffix.lower() in _IMAGE_EXTENSIONS and p.is_file():
                    self._by_sha[hashlib.sha256(p.read_bytes()).hexdigest()] = p
        return self._by_sha


# --------------------------------------------------------------------------- table rows

_NEEDED = {"point": ("image_url", "label", "points"), "count": ("image_url", "label", "count"),
           "clock": ("image_url", "hour", "minute")}


def _read_rows(path: Path) -> tuple[list[dict], list[str]]:
    """Rows and column names of a parquet or JSONL file."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # noqa: BLE001 - any pyarrow failure is "not a readable parquet file"
            raise EvalDataError(f"Could not read {path} as parquet ({e}); expected a parquet file.") from e
        return table.to_pylist(), table.column_names
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalDataError(f"{path} line {n} is not JSON ({e}); expected one JSON object per line.") from e
        if not isinstance(row, dict):
            raise EvalDataError(f"{path} line {n} is {type(row).__name__}, expected a JSON object.")
        rows.append(row)
    columns = sorted({k for r in rows for k in r})
    return rows, columns


def _xy_list(value: Any, where: str) -> np.ndarray:
    """Points given as [{x, y}, ...] or [[x, y], ...] -> float (n, 2)."""
    try:
        pairs = [(p["x"], p["y"]) if isinstance(p, dict) else tuple(p) for p in (value or [])]
        xy = np.asarray(pairs, dtype=np.float64).reshape(-1, 2)
    except (KeyError, TypeError, ValueError) as e:
        raise EvalDataError(f"{where}: points {str(value)[:80]!r} are not a list of {{x, y}} or [x, y] "
                            f"({e}).") from e
    if not np.isfinite(xy).all():
        raise EvalDataError(f"{where}: points contain a missing or infinite coordinate: {xy.tolist()}.")
    return xy


def _scale(rows_points: list[np.ndarray], coords: str, path: Path) -> tuple[str, str]:
    """("percent" | "pixels", note) for the points of a file."""
    if coords in ("percent", "pixels"):
        return coords, f"point coordinates: {coords} (stated with --coords)"
    if coords != "auto":
        raise EvalDataError(f"--coords must be auto, percent or pixels; got {coords!r}.")
    biggest = max((float(p.max()) for p in rows_points if p.size), default=0.0)
    scale = "pixels" if biggest > 100 else "percent"
    return scale, (f"point coordinates: {scale} (detected in {path.name}: largest coordinate {biggest:g}; "
                   "state --coords pixels|percent if that is wrong)")


def _mask_array(value: Any, n_points: int, size: tuple[int, int], where: str) -> np.ndarray:
    try:
        masks = np.asarray(value if value is not None else [], dtype=bool)
    except (TypeError, ValueError) as e:
        raise EvalDataError(f"{where}: masks are not a [n_points, H, W] boolean array ({e}).") from e
    width, height = size
    if n_points == 0 and masks.size == 0:
        return np.zeros((0, height, width), bool)
    if masks.ndim != 3 or masks.shape[1:] != (height, width) or len(masks) != n_points:
        raise EvalDataError(f"{where}: masks have shape {masks.shape}, expected ({n_points}, {height}, {width}) "
                            f"(one {height}x{width} mask per point, for an image of {width}x{height}). Check that "
                            "the image file is the one the masks were made for.")
    return masks


def _clock_value(row: dict, key: str, low: int, high: int, where: str, required: bool = True) -> int | None:
    value = row.get(key)
    if value is None and not required:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not (value == -1 or low <= value <= high):
        raise EvalDataError(f"{where}: {key}={value!r}; expected an integer {low}-{high}, or -1 for an "
                            "unanswerable item.")
    return value


def _table(path: Path, task: str, images_dir: Path | None, coords: str) -> Dataset:
    rows, columns = _read_rows(path)
    if not rows:
        raise EvalDataError(f"{path} has no rows; expected at least one example.")
    missing = [c for c in _NEEDED[task] if c not in columns]
    if missing:
        raise EvalDataError(f"{path} has no column {missing} for --task {task}; found columns {list(columns)}. "
                            f"Expected {list(_NEEDED[task])}" + (" (optional: masks)" if task == "point" else "")
                            + ".")
    finder = _ImageFinder([images_dir, path.parent, path.parent.parent], images_dir)
    images = [finder.find(r) for r in rows]
    lost = [i for i, img in enumerate(images) if img is None]
    if lost:
        shown = ", ".join(f"row {i} ({finder.names(rows[i])[:2]})" for i in lost[:5])
        raise EvalDataError(f"{len(lost)} of {len(rows)} images of {path.name} are not on disk: {shown}"
                            f"{' ...' if len(lost) > 5 else ''}. Looked in "
                            f"{[str(f) for f in finder.folders] or 'no existing folder'} by path, URL file name "
                            "and <sha256>.<ext>. Download them and pass --images-dir FOLDER.")
    examples = [Example(i, img, f"{path.name} row {i}") for i, img in enumerate(images)]
    notes: list[str] = []
    if task == "clock":
        for ex, row in zip(examples, rows):
            ex.clock = (_clock_value(row, "hour", 0, 24, ex.source), _clock_value(row, "minute", 0, 60, ex.source))
            ex.second = _clock_value(row, "second", 0, 60, ex.source, required=False)
        return Dataset(str(path), examples, clock_tolerance=REAL_CLOCK_TOLERANCE,
                       notes=[f"clocks: ClockEval test mode, minute close within +-{REAL_CLOCK_TOLERANCE}"])
    points = [_xy_list(r.get("points"), ex.source) for ex, r in zip(examples, rows)]
    scale, note = _scale(points, coords, path)
    notes.append(note)
    has_masks = "masks" in columns
    for ex, row, xy in zip(examples, rows, points):
        ex.label = str(row.get("label") or "").strip()
        if not ex.label:
            raise EvalDataError(f"{ex.source}: empty label; every row needs the query (e.g. 'red mugs').")
        if scale == "percent" and xy.size:
            xy = xy * np.array(ex.size, np.float64) / 100.0
        ex.points = xy
        if task == "count":
            ex.count = _count_value(row.get("count"), ex.source)
        elif has_masks:
            ex.masks = _mask_array(row.get("masks"), len(xy), ex.size, ex.source)
    rule = "mask" if has_masks else "distance"
    return Dataset(str(path), examples, point_rule=rule, notes=notes)


def _count_value(value: Any, where: str) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise EvalDataError(f"{where}: count={value!r}; expected a whole number >= 0.")
    return value


# --------------------------------------------------------------------------- Point-Bench folders


def mask_from_png(path: Path) -> np.ndarray:
    """bool (H, W): the PNG's grey level > 127 (PointArena's binarisation)."""
    with Image.open(path) as img:
        return np.asarray(img.convert("L")) > 127


def _point_bench(folder: Path, task: str) -> Dataset:
    if task != "point":
        raise EvalDataError(f"{folder} is a Point-Bench folder (data.json with masks); it is scored with "
                            f"--task point, not --task {task}.")
    try:
        items = json.loads((folder / "data.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise EvalDataError(f"{folder / 'data.json'} is not valid JSON ({e}).") from e
    if isinstance(items, dict):
        items = items.get("data", items.get("items", []))
    if not isinstance(items, list):
        raise EvalDataError(f"{folder / 'data.json'}: expected a list of objects, found {type(items).__name__}.")
    examples = []
    for i, item in enumerate(items):
        where = f"{folder.name}/data.json item {i}"
        lacking = [k for k in ("image_filename", "user_input", "mask_filename") if not item.get(k)]
        if lacking:
            raise EvalDataError(f"{where} has no {lacking}; expected image_filename, category, user_input, "
                                "mask_filename, count.")
        image = _in_folder(folder, item["image_filename"], "images", where)
        ex = Example(i, image, where, instruction=str(item["user_input"]).strip(),
                     category=str(item.get("category") or "uncategorised"), count=item.get("count"))
        mask = mask_from_png(_in_folder(folder, item["mask_filename"], "masks", where))
        width, height = ex.size
        if mask.shape != (height, width):
            raise EvalDataError(f"{where}: mask {item['mask_filename']} is {mask.shape[1]}x{mask.shape[0]}, the "
                                f"image {item['image_filename']} is {width}x{height}; expected the same size.")
        ex.masks = mask[None]
        examples.append(ex)
    return Dataset(str(folder), examples, point_rule="point_bench",
                   notes=["Point-Bench: correct when >= 1 point is predicted and every point is in the mask"])


def _in_folder(folder: Path, name: str, sub: str, where: str) -> Path:
    for p in (folder / name, folder / sub / name):
        if p.is_file():
            return p
    raise EvalDataError(f"{where}: {name} is not in {folder} or {folder / sub}; expected the file there.")


# --------------------------------------------------------------------------- entry point

_SYNTHETIC: dict[str, tuple[Callable[[str, int], Dataset], tuple[str, ...]]] = {
    "shapes": (_shapes, ("point", "count")),
    "clocks": (_clocks, ("clock",)),
}


def load_dataset(spec: str, task: str, *, images_dir: str | Path | None = None, coords: str = "auto",
                 limit: int | None = None) -> Dataset:
    """Load evaluation data for ``task`` ("point", "count" or "clock").

    Args:
        spec: ``shapes:N``, ``clocks:N``, a ``.parquet`` / ``.jsonl`` file, or a folder with ``data.json``.
        task: what is evaluated; decides the columns a file needs.
        images_dir: where the images of a parquet / JSONL file are.
        coords: "auto", "percent" or "pixels" (point coordinates in files).
        limit: keep the first ``limit`` examples.

    Returns:
        A :class:`Dataset` (never empty).

    Raises:
        EvalDataError: an unknown spec or task, missing columns or images, masks that do not fit, no rows.
    """
    if task not in TASKS:
        raise EvalDataError(f"Unknown task {task!r}; expected one of {list(TASKS)}.")
    name, colon, rest = str(spec).partition(":")
    if colon and name in _SYNTHETIC:
        make, tasks = _SYNTHETIC[name]
        if task not in tasks:
            raise EvalDataError(f"{name}:N has no labels for --task {task}; it serves --task {' / '.join(tasks)}.")
        n = _positive(spec, rest)
        data = make(spec, n if limit is None else min(n, limit))
    else:
        path = Path(spec).expanduser()
        images = Path(images_dir).expanduser() if images_dir else None
        if images is not None and not images.is_dir():
            raise EvalDataError(f"--images-dir {images} is not a folder; expected the folder with the images.")
        if path.is_dir() and (path / "data.json").is_file():
            data = _point_bench(path, task)
        elif path.is_file() and path.suffix in (".parquet", ".jsonl"):
            data = _table(path, task, images, coords)
        else:
            raise EvalDataError(f"Data {spec!r} is neither shapes:N, clocks:N, an existing .parquet / .jsonl file "
                                "nor a folder with data.json; check the path.")
    if limit is not None:
        data.examples = data.examples[:limit]
    if not data.examples:
        raise EvalDataError(f"Data {spec!r} has no examples; expected at least one.")
    return data
