"""Training data: records (PixMo-Cap rows, JSONL, clocks, points) -> packed examples -> batches.

A *record* is one image plus its annotations (a caption, spoken transcripts, a clock time, points, ...).
An *example* is one packed token sequence for one record, built as in the Molmo captioner recipe
(allenai/molmo `launch_scripts/train_captioner.py`, packing as in `olmo/data/model_preprocessor.py`):

    BOS <image tokens> | prompt_1 answer_1 EOS | prompt_2 answer_2 EOS | ...
    subsegment:  10000 |        1              |        2              |      (BOS copies the image's)
    positions:   0..n-1| n, n+1, ...           | n, n+1, ...           |      (each continues after the image)

so the image is encoded once and every annotation sees only the image and itself
(`allowed[q, k] = subsegment[q] <= subsegment[k]`, AND causal AND not padding). Inputs are the
sequence without its last token, targets the sequence shifted by one; the loss mask covers the answer
tokens and their EOS only.

Caption prompts carry the length hint on 90 % of examples: `"long_caption {n}:"` / `"transcript {n}:"`
with `n = (len(text) + int(N(0, 25))) // 15`, else `"long_caption :"` (the captioner's prompts). With
`prompt_format="chat"` each prompt is wrapped the way the released models were fine-tuned
(`" User: {prompt} Assistant:"`, "role" formatting); the default `"captioner"` gives
the captioner's raw `" {prompt}"` form, which the app's Caption tab uses (`runner.stream(..., template="none")`).

Sources (`load_records`):
  * PixMo-Cap-shaped parquet (`image_url`, `caption`, `transcripts`, optionally our export's `image_path`
    / `image_sha256`) with images in a local folder (by path, by URL file name, or by sha256 name);
  * JSONL of `{"image": ..., "caption": ..., "transcripts": [...]}`, `{"image", "label", "points"}` (points
    in percent unless `"point_scale": "pixels"`), or `{"image", "question", "answer"}`;
  * `clocks:N` -> N synthetic clocks from `molmo_core.synthetic.clocks.random_clock` ("What time is being shown?");
  * `shapes:N[:count|:point][:max=M][:plain]` -> N synthetic scenes from `molmo_core.synthetic.shapes.random_scene`,
    each with a pointing and a counting question (or only the one named) answered from the scene's exact labels, in
    Molmo v1's answer format (`:number`: "No pointing: How many ...?" answered with the bare count); at most M
    targets per scene (default 6, as the evaluation's `shapes:N`); `:plain`: the easier scenes of
    `random_scene(..., plain=True)` (no distractors, larger objects, plain background, 336 x 336). Training
    scenes are numbered from (seed + 1) * 1,000,000, so they are never the scenes 0..N-1 that
    `launch.py --eval --data shapes:N` scores.
Records whose image is missing are skipped and counted (`DataReport`). Point, count and clock records carry
their ground truth (`Record.truth`), which the trainer's held-out evaluation scores generated answers against.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence
from urllib.parse import unquote, urlparse

import numpy as np
import torch

from ..eval.data import Example
from ..preprocessing import MolmoTokenizer, load_image, process_image
from ..prompts import CHARS_PER_LENGTH_UNIT, clock_prompt, count_prompt, point_prompt

IMAGE_SUBSEGMENT = 10000  # the official id for image tokens placed at the start of the sequence
SHAPES_SEED_BLOCK = 1_000_000  # training scenes of shapes:N start at (seed + 1) * this; --eval's are 0..N-1
SHAPES_MAX_COUNT = 6  # as the evaluation's shapes:N
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
CAPTION_KINDS = ("long_caption", "transcript")


class DataError(ValueError):
    """Training data that cannot be used: no file, no usable record, wrong columns."""


# ----------------------------------------------------------------------------------------- records
@dataclass
class Annotation:
    kind: str  # "long_caption" | "transcript" | "clock" | "point" | "count" | "qa"
    text: str  # the answer the model must produce
    prompt: str | None = None  # fixed prompt for clock / point / qa; caption prompts are drawn per example


@dataclass
class Record:
    image: Any  # a path, a PIL image, or a zero-argument callable returning one (synthetic data)
    annotations: list[Annotation]
    source: str = ""  # where it came from, for messages ("data.parquet row 12")
    key: str = ""  # stable identity of the image (used for the image cache)
    truth: Callable[[], Example] | None = None  # ground truth of its point / count / clock questions, made on demand


@dataclass
class DataReport:
    """What loading found; `summary()` is printed at the start of a run."""

    records: int = 0
    annotations: int = 0
    missing_images: int = 0
    missing_examples: list[str] = field(default_factory=list)
    without_annotations: int = 0
    truncated_captions: int = 0
    sources: list[str] = field(default_factory=list)

    def summary(self) -> str:
        s = f"{self.records} records with {self.annotations} annotations from {', '.join(self.sources)}"
        if self.missing_images:
            s += (f"; skipped {self.missing_images} records whose image was not found (e.g. "
                  + ", ".join(self.missing_examples[:3]) + ")")
        if self.without_annotations:
            s += f"; skipped {self.without_annotations} records without caption or transcripts"
        if self.truncated_captions:
            s += f"; truncated {self.truncated_captions} over-long texts"
        return s


def _truncate(text: str, max_chars: int, where: str, report: DataReport) -> str:
    if len(text) <= max_chars:
        return text
    report.truncated_captions += 1
    warnings.warn(f"{where}: a {len(text)}-character text was truncated to {max_chars} characters "
                  f"(--max-caption-chars). PixMo-Cap captions average about 1,200 characters.", stacklevel=3)
    cut = text[:max_chars]
    space = cut.rfind(" ")
    return cut[:space] if space > max_chars * 0.8 else cut


def _find_image(candidates: Sequence[str | Path | None], folders: Sequence[Path]) -> Path | None:
    """First existing file among the candidate paths, tried as is and relative to each folder."""
    for c in candidates:
        if not c:
            continue
        p = Path(c).expanduser()
        if p.is_absolute():
            if p.is_file():
                return p
            continue
        for folder in folders:
            q = folder / p
            if q.is_file():
                return q
    return None


def _url_candidates(url: str | None) -> list[str]:
    if not url:
        return []
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return [unquote(parsed.path)]
    if parsed.scheme in ("http", "https"):
        name = unquote(Path(parsed.path).name)
        return [name] if name else []
    return [url]


def _sha_candidates(sha: str | None) -> list[str]:
    if not sha:
        return []
    return [f"{sha}{ext}" for ext in IMAGE_EXTENSIONS]


def caption_record(image_path: Path, caption: str | None, transcripts: Sequence[str] | None, source: str,
                   max_chars: int, report: DataReport) -> Record | None:
    anns = []
    if caption and caption.strip():
        anns.append(Annotation("long_caption", _truncate(caption.strip(), max_chars, source, report)))
    for t in transcripts or []:
        if t and t.strip():
            anns.append(Annotation("transcript", _truncate(t.strip(), max_chars, source, report)))
    if not anns:
        report.without_annotations += 1
        return None
    return Record(image_path, anns, source, key=str(image_path))


def _missing(report: DataReport, what: str) -> None:
    report.missing_images += 1
    if len(report.missing_examples) < 10:
        report.missing_examples.append(what)


def load_parquet(path: Path, images_dir: Path | None, max_chars: int, report: DataReport) -> list[Record]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    cols = set(table.column_names)
    folders = [f for f in (images_dir, path.parent, path.parent.parent) if f is not None]
    records = []
    if {"label", "points"} <= cols:  # pixmo-points shaped: percent coordinates (the Molmo code's convention)
        for source, row, img in _rows_with_images(path, table, folders, report):
            records.append(point_record(img, row["label"], row["points"], "percent", source))
        return records
    need = {"image_url", "caption", "transcripts"}
    if not need <= cols:
        raise DataError(f"{path} is not PixMo-Cap shaped: missing column(s) {sorted(need - cols)}; found "
                        f"{table.column_names}. Expected at least image_url, caption, transcripts "
                        "(or label, points for pointing data).")
    for source, row, img in _rows_with_images(path, table, folders, report):
        rec = caption_record(img, row.get("caption"), row.get("transcripts"), source, max_chars, report)
        if rec is not None:
            records.append(rec)
    return records


def _rows_with_images(path: Path, table, folders: list[Path],
                      report: DataReport) -> Iterator[tuple[str, dict, Path]]:
    """(source name, row, image file) for every parquet row whose image is found (by image_path, the URL's file
    name or the sha256 name); the others are counted as missing in `report`."""
    for i, row in enumerate(table.to_pylist()):
        img = _find_image([row.get("image_path")] + _url_candidates(row.get("image_url"))
                          + _sha_candidates(row.get("image_sha256")), folders)
        if img is None:
            _missing(report, row.get("image_url") or f"row {i}")
            continue
        yield f"{path.name} row {i}", row, img


def point_record(image, label: str, points, scale: str, source: str, size: tuple[int, int] | None = None) -> Record:
    """A "Point to {label}" record; points as [(x, y)] or [{"x", "y"}], in percent or pixels."""
    from ..outputs import format_points

    xy = [(p["x"], p["y"]) if isinstance(p, dict) else (p[0], p[1]) for p in (points or [])]
    if scale == "pixels":
        if size is None:
            from PIL import Image

            with Image.open(image) as im:
                size = im.size
        w, h = size
        xy = [(x / (w / 100), y / (h / 100)) for x, y in xy]
    label = " ".join(str(label).split())
    answer = format_points(xy, alt=label.lower(), text=label.lower())
    return Record(image, [Annotation("point", answer, point_prompt(label))], source, key=str(image),
                  truth=lambda: _pixel_truth(image, source, label, xy))


def _pixel_truth(image, source: str, label: str, xy_percent: list[tuple[float, float]]) -> Example:
    """The ground truth of a point record: its points in pixels, no masks (scored by the distance rule)."""
    truth = Example(0, image, source, label=label)
    w, h = truth.size
    truth.points = np.array(xy_percent, np.float64).reshape(-1, 2) * [w / 100, h / 100]
    truth.count = len(truth.points)
    return truth


def load_jsonl(path: Path, images_dir: Path | None, max_chars: int, report: DataReport) -> list[Record]:
    folders = [f for f in (images_dir, path.parent) if f is not None]
    records = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {i} is not valid JSON ({e}); expected one object per line like "
                                '{"image": "a.jpg", "caption": "...", "transcripts": ["..."]}.') from e
            where = f"{path.name} line {i}"
            image_ref = row.get("image") or row.get("image_path") or row.get("image_url")
            img = _find_image([image_ref] + _url_candidates(row.get("image_url")), folders)
            if img is None:
                _missing(report, str(image_ref) if image_ref else where)
                continue
            if "points" in row and "label" in row:
                records.append(point_record(img, row["label"], row["points"], row.get("point_scale", "percent"),
                                            where))
            elif "question" in row and "answer" in row:
                ans = _truncate(str(row["answer"]).strip(), max_chars, where, report)
                records.append(Record(img, [Annotation("qa", ans, str(row["question"]).strip())], where,
                                      key=str(img)))
            else:
                rec = caption_record(img, row.get("caption"), row.get("transcripts"), where, max_chars, report)
                if rec is not None:
                    records.append(rec)
    return records


def clock_records(n: int, seed: int = 0, size: int = 384) -> list[Record]:
    """N synthetic clocks ("clocks: What time is being shown?" -> "H:MM[:SS]")."""
    try:
        from ..synthetic.clocks import random_clock
    except ImportError as e:  # the renderer is optional
        raise DataError(f"clocks:{n} needs molmo_core.synthetic.clocks, which failed to import ({e}).") from e
    records = []
    for i in range(n):
        s = seed * 1_000_003 + i
        _, time = random_clock(s, size=size)  # the label only; the image is rendered again on use
        records.append(Record(lambda s=s: random_clock(s, size=size)[0],
                              [Annotation("clock", str(time), clock_prompt())], f"clock {s}", key=f"clock:{s}",
                              truth=lambda s=s: _clock_truth(s, size)))
    return records


def _clock_truth(seed: int, size: int) -> Example:
    from ..synthetic.clocks import random_clock

    image, time = random_clock(seed, size=size)
    return Example(0, image, f"clock {seed}", clock=(time.hour, time.minute), second=time.second)


def count_answer(points_percent: Sequence[tuple[float, float]], label: str) -> str:
    """Molmo v1's counting answer: the points first, then the total; "There are none." without any.

    >>> count_answer([(10.0, 20.0)], "red stars")
    'Counting the <point x="10.0" y="20.0" alt="red stars">red stars</point> shows a total of 1.'
    """
    from ..outputs import NO_OBJECTS_TEXT, format_points

    if not points_percent:
        return NO_OBJECTS_TEXT
    return f"Counting the {format_points(points_percent, alt=label, text=label)} shows a total of {len(points_percent)}."


def shape_records(n: int, seed: int = 0, max_count: int = SHAPES_MAX_COUNT,
                  tasks: Sequence[str] = ("point", "count"), plain: bool = False) -> list[Record]:
    """N synthetic shape scenes (`molmo_core.synthetic.shapes`), numbered from (seed + 1) * SHAPES_SEED_BLOCK, each
    with a "Point to {label}" and / or a "How many {label} are there?" question answered from its exact labels.

    The image is kept PNG-encoded (a few kB); the ground truth with its masks is drawn again when asked for."""
    import io

    from ..outputs import format_points
    from ..synthetic.shapes import random_scene

    records = []
    for i in range(n):
        s = (seed + 1) * SHAPES_SEED_BLOCK + i
        scene = random_scene(s, max_count=max_count, plain=plain)
        w, h = scene.image.size
        xy = [(x / (w / 100), y / (h / 100)) for x, y in scene.points]
        answers = {"point": ("point", format_points(xy, alt=scene.label), point_prompt(scene.label)),
                   "count": ("count", count_answer(xy, scene.label), count_prompt(scene.label)),
                   "number": ("count", str(scene.count), count_prompt(scene.label, point=False))}
        png = io.BytesIO()
        scene.image.save(png, format="PNG")
        records.append(Record(png.getvalue(), [Annotation(*answers[t]) for t in tasks], f"shapes scene {s}",
                              key=f"shapes:{s}", truth=lambda s=s: _shape_truth(s, max_count, plain)))
    return records


def _shape_truth(seed: int, max_count: int, plain: bool = False) -> Example:
    from ..synthetic.shapes import random_scene

    scene = random_scene(seed, max_count=max_count, plain=plain)
    return Example(0, scene.image, f"shapes scene {seed}", label=scene.label, points=scene.points, masks=scene.masks,
                   count=scene.count)


def synthetic_records(spec: str, seed: int) -> list[Record]:
    """`clocks:N` or `shapes:N[:count|:point|:number][:max=M][:plain]` -> records.

    Raises:
        DataError: a spec that is not one of those (the message shows the forms).
    """
    name, _, rest = spec.partition(":")
    parts = rest.split(":")
    usage = ("write clocks:N or shapes:N[:count|:point][:max=M][:plain] with N a number, e.g. clocks:500 or "
             "shapes:200:count:max=3")
    if not parts[0].isdigit() or (name == "clocks" and len(parts) > 1):
        raise DataError(f"{spec!r}: {usage}.")
    n = int(parts[0])
    if name == "clocks":
        return clock_records(n, seed)
    tasks: list[str] = []
    max_count = SHAPES_MAX_COUNT
    plain = False
    for opt in parts[1:]:
        if opt in ("count", "point", "number"):
            tasks.append(opt)
        elif opt == "plain":
            plain = True
        elif opt.startswith("max=") and opt[4:].isdigit():
            max_count = int(opt[4:])
        else:
            raise DataError(f"{spec!r}: unknown option {opt!r}; {usage}.")
    return shape_records(n, seed, max_count, tasks or ("point", "count"), plain)


def load_records(sources: str | Path | Sequence[str | Path], images_dir: str | Path | None = None,
                 max_caption_chars: int = 6000, seed: int = 0) -> tuple[list[Record], DataReport]:
    """Read every source (parquet, JSONL, a folder of them, `clocks:N` or `shapes:N`) into records.

    Raises:
        DataError: a source does not exist or has the wrong shape, or no usable record was found.
    """
    if isinstance(sources, (str, Path)):
        sources = [sources]
    report = DataReport()
    imgs = Path(images_dir).expanduser() if images_dir else None
    records: list[Record] = []
    for src in sources:
        text = str(src)
        if text.startswith(("clocks:", "shapes:")):
            records += synthetic_records(text, seed)
            report.sources.append(text)
            continue
        path = Path(text).expanduser()
        if path.is_dir():
            files = sorted(list(path.glob("*.parquet")) + list(path.glob("*.jsonl")))
            if not files:
                raise DataError(f"{path} holds no .parquet or .jsonl file; pass a PixMo-Cap parquet, a JSONL "
                                "of {image, caption, transcripts}, clocks:N or shapes:N.")
        elif path.is_file():
            files = [path]
        else:
            raise DataError(f"Training data not found: {path}. Pass a PixMo-Cap parquet, a JSONL of "
                            "{image, caption, transcripts}, a folder of those, clocks:N or shapes:N.")
        for f in files:
            if f.suffix == ".parquet":
                records += load_parquet(f, imgs, max_caption_chars, report)
            elif f.suffix in (".jsonl", ".json"):
                records += load_jsonl(f, imgs, max_caption_chars, report)
            else:
                raise DataError(f"Unsupported data file {f}: expected .parquet or .jsonl.")
            report.sources.append(f.name)
    report.records = len(records)
    report.annotations = sum(len(r.annotations) for r in records)
    if not records:
        why = report.summary()
        raise DataError(f"No usable training records: {why}. Each record needs an image that exists locally "
                        "(use --images-dir for the folder holding them) and a caption, transcripts, points or "
                        "an answer.")
    return records, report


# ----------------------------------------------------------------------------------------- examples
@dataclass
class ExampleOptions:
    prompt_format: str = "captioner"  # "captioner" (" p", as the captioner) or "chat" (" User: p Assistant:")
    hint_prob: float = 0.9  # fraction of caption examples with a length hint
    hint_noise_chars: float = 25.0  # std of the Gaussian jitter added to the length before // 15
    annotations: str = "all"  # "all" | "paper" (caption + one random transcript) | "captions"
    shuffle_annotations: bool = True
    max_crops: int = 12
    max_seq_len: int = 2304


def caption_user_text(kind: str, text: str, rng: np.random.Generator, opts: ExampleOptions) -> str:
    """`"{style} {hint}:"` with probability hint_prob, else `"{style} :"` (as the captioner was trained)."""
    if rng.random() < opts.hint_prob:
        jitter = int(rng.normal(0.0, opts.hint_noise_chars)) if opts.hint_noise_chars > 0 else 0
        hint = max(0, (len(text) + jitter) // CHARS_PER_LENGTH_UNIT)
        return f"{kind} {hint}:"
    return f"{kind} :"


def wrap_prompt(user_text: str, fmt: str) -> str:
    if fmt == "chat":
        return f" User: {user_text} Assistant:"
    if fmt == "captioner":
        return f" {user_text}"
    raise ValueError(f"prompt_format must be 'chat' or 'captioner'; got {fmt!r}.")


class ImageCache:
    """A small LRU of processed images (crops are the expensive part of building an example)."""

    def __init__(self, tokenizer: MolmoTokenizer, opts: ExampleOptions, resize: str, crop_size: int, patch: int,
                 size: int = 128):
        self.tokenizer, self.opts, self.resize, self.crop_size, self.patch = tokenizer, opts, resize, crop_size, patch
        self.size = size
        self.items: OrderedDict[str, Any] = OrderedDict()

    def get(self, record: Record):
        key = record.key or str(id(record))
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        image = record.image() if callable(record.image) else record.image
        rgb = load_image(image)
        out = process_image(rgb, special=self.tokenizer.special, max_crops=self.opts.max_crops, resize=self.resize,
                            crop_size=self.crop_size, patch=self.patch)
        self.items[key] = out
        if len(self.items) > self.size:
            self.items.popitem(last=False)
        return out


def build_example(record: Record, image_inputs, tokenizer: MolmoTokenizer, rng: np.random.Generator,
                  opts: ExampleOptions) -> dict[str, np.ndarray]:
    """One packed sequence for one record. Returns numpy arrays:

    input_ids, targets, position_ids, subsegments: (T,) int64; loss_mask: (T,) float32;
    images (n_crops, 576, 588), image_masks (n_crops, 576), image_input_idx (n_crops, 144).
    """
    sp = tokenizer.special
    anns = list(record.annotations)
    if opts.annotations == "captions":
        anns = [a for a in anns if a.kind != "transcript"] or anns[:1]
    elif opts.annotations == "paper":
        caps = [a for a in anns if a.kind != "transcript"]
        trans = [a for a in anns if a.kind == "transcript"]
        anns = caps + ([trans[int(rng.integers(len(trans)))]] if trans else [])
    if opts.shuffle_annotations and len(anns) > 1:
        anns = [anns[i] for i in rng.permutation(len(anns))]

    image_tokens = image_inputs.image_tokens
    n_img = 1 + len(image_tokens)  # BOS + image block
    tokens = [sp.bos] + image_tokens.tolist()
    subseg = [IMAGE_SUBSEGMENT] * n_img
    positions = list(range(n_img))
    loss = [0.0] * n_img
    budget = opts.max_seq_len + 1  # the packed sequence is one longer than inputs / targets
    for k, ann in enumerate(anns):
        user = ann.prompt if ann.prompt is not None else caption_user_text(ann.kind, ann.text, rng, opts)
        prompt_ids = tokenizer.encode(wrap_prompt(user, opts.prompt_format))
        answer_ids = tokenizer.encode(" " + ann.text) + [sp.eos]
        room = budget - len(tokens) - len(prompt_ids)
        if room < 2:
            break
        if len(answer_ids) > room:  # too long for the sequence: keep the start, as the official truncation does
            if k > 0:
                break
            answer_ids = answer_ids[:room]
        tokens += prompt_ids + answer_ids
        subseg += [k + 1] * (len(prompt_ids) + len(answer_ids))
        positions += list(range(n_img, n_img + len(prompt_ids) + len(answer_ids)))
        loss += [0.0] * len(prompt_ids) + [1.0] * len(answer_ids)
    if len(tokens) == n_img:
        raise DataError(f"{record.source}: the image alone takes {n_img} tokens, leaving no room for an answer "
                        f"within max_seq_len={opts.max_seq_len}; raise --max-seq-len or lower --max-crops.")
    tokens_a = np.array(tokens, dtype=np.int64)
    idx = np.where(image_inputs.patch_positions >= 0, image_inputs.patch_positions + 1, -1)  # +1 for BOS
    return {
        "input_ids": tokens_a[:-1],
        "targets": tokens_a[1:],
        "loss_mask": np.array(loss[1:], dtype=np.float32),  # target t is in the loss if token t+1 is an answer
        "position_ids": np.array(positions[:-1], dtype=np.int64),
        "subsegments": np.array(subseg[:-1], dtype=np.int64),
        "images": image_inputs.images,
        "image_masks": image_inputs.image_masks,
        "image_input_idx": idx.astype(np.int64),
    }


def collate(examples: Sequence[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Right-pad examples into a batch. Adds `allowed` (B, T, T): subsegment[q] <= subsegment[k]."""
    B = len(examples)
    T = max(len(e["input_ids"]) for e in examples)
    n_crops = max(e["images"].shape[0] for e in examples)
    _, P, D = examples[0]["images"].shape
    out = {
        "input_ids": np.full((B, T), -1, np.int64),
        "targets": np.full((B, T), -1, np.int64),
        "loss_mask": np.zeros((B, T), np.float32),
        "position_ids": np.zeros((B, T), np.int64),
        "subsegments": np.full((B, T), -1, np.int64),
        "images": np.full((B, n_crops, P, D), -1, np.float32),
        "image_masks": np.full((B, n_crops, P), -1, np.float32),
        "image_input_idx": np.full((B, n_crops, examples[0]["image_input_idx"].shape[1]), -1, np.int64),
    }
    for b, e in enumerate(examples):
        n = len(e["input_ids"])
        for k in ("input_ids", "targets", "loss_mask", "position_ids", "subsegments"):
            out[k][b, :n] = e[k]
        c = e["images"].shape[0]
        out["images"][b, :c] = e["images"]
        out["image_masks"][b, :c] = e["image_masks"]
        out["image_input_idx"][b, :c] = e["image_input_idx"]
    batch = {k: torch.from_numpy(v) for k, v in out.items()}
    s = batch["subsegments"]
    batch["allowed"] = s[:, :, None] <= s[:, None, :]  # (B, T, T); padding keys are masked by the model
    return batch


class ExampleStream:
    """Deterministic, stateless order: sequence number p -> (epoch, record) -> example.

    Epoch e visits the records in `permutation(seed, e)`; an example's random choices (length hint, jitter,
    transcript, order) come from an RNG seeded by (seed, epoch, record index). Resuming only needs p.
    """

    def __init__(self, records: list[Record], tokenizer: MolmoTokenizer, opts: ExampleOptions, cache: ImageCache,
                 seed: int, shuffle: bool = True):
        self.records, self.tokenizer, self.opts, self.cache = records, tokenizer, opts, cache
        self.seed, self.shuffle = seed, shuffle
        self._perms: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.records)

    def index(self, p: int) -> tuple[int, int]:
        n = len(self.records)
        epoch, i = divmod(p, n)
        if not self.shuffle:
            return epoch, i
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng((self.seed, epoch)).permutation(n)}
        return epoch, int(self._perms[epoch][i])

    def example(self, p: int) -> dict[str, np.ndarray]:
        epoch, i = self.index(p)
        rng = np.random.default_rng((self.seed, epoch, i))
        rec = self.records[i]
        return build_example(rec, self.cache.get(rec), self.tokenizer, rng, self.opts)


def split_records(records: list[Record], eval_fraction: float, seed: int, max_eval: int = 200,
                  ) -> tuple[list[Record], list[Record]]:
    """Hold out ceil(fraction * n) records (at most max_eval; none when that would leave < 2 to train)."""
    n = len(records)
    k = min(max_eval, math.ceil(eval_fraction * n)) if eval_fraction > 0 else 0
    if k == 0 or n - k < 2:
        return records, []
    order = np.random.default_rng((seed, 987654)).permutation(n)
    held = set(order[:k].tolist())
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["input_ids"] != -1).sum())


__all__ = [
    "Annotation", "Record", "DataReport", "DataError", "ExampleOptions", "ImageCache", "ExampleStream",
    "load_records", "clock_records", "shape_records", "synthetic_records", "count_answer", "point_record", "build_example", "collate", "split_records",
    "caption_user_text", "wrap_prompt", "count_tokens",
]
