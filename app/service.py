"""`MolmoService`: the one object that owns the loaded model, shared by every UI user.

The UI never touches tensors: it calls the task methods here (`point`, `count`, `read_clock`,
`caption`, `ask_stream`, and for several images at once `point_multi` / `count_multi`) and gets small
dataclasses back (raw answer text + parsed results in pixels). Loading runs in a background thread whose
progress any caller can read with `status()`.

Families: `molmo_core.load` returns a Molmo v1 or a Molmo2 runner (the checkpoint's config.json decides);
the service asks each in its own prompts (`molmo_core.prompts`, chosen by `runner.family`) and reads its
answers in its own point format (v1: 0-100 percent; Molmo2: `<points coords=...>`, 0-1000, per image), so
results come back in pixels either way. Several images in one question are Molmo2's; a v1 model refuses
them with a message.

Concurrency: the runner is thread-safe (its scheduler groups concurrent requests into batches); the
service only guards which runner is current. A model switch frees the old runner before loading the
new one, so two large models never share a small GPU.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

import molmo_core
from molmo_core.errors import CheckpointError, MolmoInputError
from molmo_core.outputs import (ClockTime, Point, parse_any_points, parse_clock, parse_count, parse_molmo2_count,
                                parse_points)
from molmo_core.preprocessing import MAX_IMAGE_PIXELS, load_image
from molmo_core import prompts

ProgressFn = Callable[[float, str], None]
Loader = Callable[..., Any]  # molmo_core.load's signature

NO_MODEL_MESSAGE = ("No model loaded: choose a checkpoint in the Model panel (a hub id such as "
                    "allenai/Molmo-7B-D-0924 or allenai/Molmo2-4B, or a local folder) and press Load.")
QUANTIZE_CHOICES = (None, "8bit", "4bit")
FAMILY_NAMES = {"molmo": "Molmo v1", "molmo2": "Molmo2"}
#: Images per multi-image question (the official Molmo2 demo allows 6).
MAX_IMAGES = 6
ONE_IMAGE_MESSAGE = ("{name} is a Molmo v1 model, which takes one image per question; {n} images were given. "
                     "Keep one image, or load a Molmo2 model (e.g. allenai/Molmo2-4B) to ask about several "
                     "images at once.")


class NoModelError(RuntimeError):
    """A task was asked for while no model is loaded (or it is still loading, or failed to load)."""


class ServiceBusyError(RuntimeError):
    """A second load was requested while one is in progress."""


# ---------------------------------------------------------------------------------------------- results


def _points_json(points: Sequence[Point]) -> list[dict]:
    return [{"index": p.index, "x": round(p.x, 1), "y": round(p.y, 1), "label": p.label} for p in points]


def answer_points(text: str, width: int, height: int, family: str = "molmo", *,
                  image: int | None = None) -> list[Point]:
    """Points of an answer in pixels of a `width` x `height` image, read in the family's format.

    Molmo v1: `parse_points` (0-100 percent). Molmo2: `parse_any_points(family="molmo2")` (0-1000), keeping
    only the points of the 1-based `image` when given (a multi-image answer); a Molmo2 answer written in the
    v1 forms is read as v1 (AI2's Molmo2 extractors fall back the same way).
    """
    if family != "molmo2":
        return parse_points(text, width, height)
    if image in (None, 1):  # the v1 forms carry no image index: they belong to the first image
        return parse_any_points(text, width, height, family="auto", frame=image)
    return parse_any_points(text, width, height, family="molmo2", frame=image)


def answer_count(text: str, family: str = "molmo") -> int | None:
    """The stated count: `parse_count` (v1) or `parse_molmo2_count` (Molmo2: a stated number, else the
    number of points)."""
    return parse_molmo2_count(text) if family == "molmo2" else parse_count(text)


@dataclass(frozen=True)
class PointResult:
    """Answer to "Point to {phrase}": points in pixels of the image as given."""

    answer: str
    phrase: str
    points: list[Point]
    width: int
    height: int

    def to_json(self) -> dict:
        return {"task": "point", "phrase": self.phrase, "image_size": [self.width, self.height],
                "count": len(self.points), "points": _points_json(self.points), "answer": self.answer}


@dataclass(frozen=True)
class CountResult:
    """Answer to "How many {phrase} are there?": the stated count plus the points it counted."""

    answer: str
    phrase: str
    count: int | None
    points: list[Point]
    width: int
    height: int

    def to_json(self) -> dict:
        return {"task": "count", "phrase": self.phrase, "image_size": [self.width, self.height],
                "count": self.count, "points": _points_json(self.points), "answer": self.answer}


@dataclass(frozen=True)
class ImagePoints:
    """The points of one image of a multi-image answer (pixels of that image)."""

    points: list[Point]
    width: int
    height: int


@dataclass(frozen=True)
class MultiPointResult:
    """One question over several images (Molmo2): the answer, its count, and the points per image.

    `task` is "point" or "count"; `count` is the stated count of a counting answer (None for pointing);
    `unplaced` counts points whose image index names no given image (they are not drawn).
    """

    task: str
    answer: str
    phrase: str
    count: int | None
    images: list[ImagePoints]
    family: str = "molmo2"
    unplaced: int = 0

    @property
    def points(self) -> list[tuple[int, Point]]:
        """(1-based image index, point) over all images."""
        return [(i, p) for i, im in enumerate(self.images, start=1) for p in im.points]

    def to_json(self) -> dict:
        return {"task": self.task, "multi": True, "family": self.family, "phrase": self.phrase,
                "count": self.count if self.task == "count" else len(self.points),
                "images": [{"image": i, "image_size": [im.width, im.height], "count": len(im.points),
                            "points": _points_json(im.points)} for i, im in enumerate(self.images, start=1)],
                "unplaced": self.unplaced, "answer": self.answer}


@dataclass(frozen=True)
class ClockResult:
    """A clock reading: the raw answer and the parsed time (None when the answer has no valid time)."""

    answer: str
    time: ClockTime | None

    def to_json(self) -> dict:
        t = self.time
        return {"task": "read_clock", "answer": self.answer, "time": str(t) if t else None,
                "hour": t.hour if t else None, "minute": t.minute if t else None,
                "second": t.second if t else None}


@dataclass(frozen=True)
class CaptionResult:
    answer: str
    style: str
    length_hint: int | None
    prompt: str

    def to_json(self) -> dict:
        return {"task": "caption", "style": self.style, "length_hint": self.length_hint,
                "prompt": self.prompt, "chars": len(self.answer), "answer": self.answer}


@dataclass(frozen=True)
class AskResult:
    answer: str
    points: list[Point]
    width: int | None
    height: int | None

    def to_json(self) -> dict:
        return {"task": "ask", "answer": self.answer, "points": _points_json(self.points),
                "image_size": [self.width, self.height] if self.width else None}


@dataclass(frozen=True)
class LoadState:
    """Where loading stands: phase is "idle", "loading", "ready" or "error"."""

    phase: str = "idle"
    fraction: float = 0.0
    message: str = NO_MODEL_MESSAGE
    source: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class ServiceStatus:
    """What the Model panel shows. Memory figures in bytes; None when not applicable."""

    loaded: bool
    load: LoadState
    name: str | None = None
    device: str | None = None
    precision: str | None = None
    quantization: str | None = None
    max_crops: int | None = None
    param_bytes: int | None = None
    device_memory_used: int | None = None
    device_memory_total: int | None = None
    loads: int = 0
    family: str | None = None  # "molmo" (Molmo v1) or "molmo2"

    def to_json(self) -> dict:
        return asdict(self)

    def markdown(self) -> str:
        if not self.loaded:
            if self.load.phase == "loading":
                return f"**Loading** `{self.load.source}`: {self.load.fraction:.0%} {self.load.message}"
            if self.load.phase == "error":
                return f"**Model failed to load** (`{self.load.source}`): {self.load.error}"
            return f"**No model loaded.** {self.load.message}"
        family = FAMILY_NAMES.get(self.family or "", self.family)
        lines = [f"**Model:** `{self.name}`" + (f" · **Family:** {family}" if family else ""),
                 f"**Device:** {self.device} · **Precision:** {self.precision}"
                 + (f" · **Quantization:** {self.quantization}" if self.quantization else "")
                 + f" · **Max crops:** {self.max_crops}",
                 f"**Weights:** {_gib(self.param_bytes)}"]
        if self.device_memory_total:
            lines.append(f"**Device memory:** {_gib(self.device_memory_used)} used of "
                         f"{_gib(self.device_memory_total)}")
        if self.load.phase == "loading":
            lines.append(f"**Loading** `{self.load.source}`: {self.load.fraction:.0%} {self.load.message}")
        return "  \n".join(lines)


def _gib(n: int | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


@dataclass(frozen=True)
class TaskLimits:
    """max_new_tokens per task. Pointing needs room: each point costs ~12 tokens."""

    point: int = 768
    count: int = 768
    clock: int = 32
    ask: int = 512
    caption_min: int = 64  # caption: max(caption_min, hint * 15 chars / ~3 chars per token + 64)
    caption_max: int = 1024

    def caption(self, length_hint: int | None) -> int:
        hint = prompts.DEFAULT_CAPTION_LENGTH_HINT if length_hint is None else length_hint
        return max(self.caption_min, min(self.caption_max, hint * prompts.CHARS_PER_LENGTH_UNIT // 3 + 64))


# ---------------------------------------------------------------------------------------------- images


def prepare_image(image: Any, *, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """A PIL image, numpy array or file path -> uint8 RGB array (H, W, 3), via `molmo_core.preprocessing.load_image`.

    The app's choice: transparent images are composited on white (`alpha="white"`, the model card's
    advice: RGBA input otherwise shows its hidden colours, often a black background). molmo_core's own
    default drops alpha as the official processor does, so the same RGBA file can get a different answer
    through the core API. EXIF orientation is applied; the file's header is checked against `max_pixels`
    before anything is decoded.

    Raises:
        MolmoInputError: no image, an unreadable file, or one over the pixel limit.
    """
    if image is None:
        raise MolmoInputError("No image: upload a photo (JPEG, PNG or WebP) first.")
    return load_image(image, max_pixels=max_pixels, alpha="white")


def _prompt(builder: Callable[..., str], *args: Any, **kwargs: Any) -> str:
    """Prompt builders raise ValueError/TypeError on empty text; the app shows those as input errors."""
    try:
        return builder(*args, **kwargs)
    except (ValueError, TypeError) as e:
        raise MolmoInputError(str(e)) from None


# ---------------------------------------------------------------------------------------------- service


class MolmoService:
    """Owns the loaded `molmo_core` runner; one instance per process, shared by all UI sessions.

    Args:
        device: passed to `molmo_core.load` (None: CUDA when available, else CPU).
        limits: max_new_tokens per task.
        loader: the load function (tests may pass one that fails on purpose).
    """

    def __init__(self, *, device: str | None = None, limits: TaskLimits | None = None,
                 loader: Loader | None = None):
        self.device = device
        self.limits = limits or TaskLimits()
        self._loader = loader or molmo_core.load
        self._lock = threading.Lock()  # guards _runner, _state, _thread, _max_crops
        self._runner: Any = None
        self._max_crops: int | None = None
        self._state = LoadState()
        self._thread: threading.Thread | None = None
        self.loads = 0  # successful loads so far (tests check the model is loaded once)

    # ------------------------------------------------------------------ loading

    def load(self, source: str | Path, quantize: str | None = None, max_crops: int = 12,
             progress: ProgressFn | None = None, *, wait: bool = False) -> threading.Thread:
        """Start loading `source` in a background thread and return it (joined first when `wait`).

        The old model is freed before the new one loads. Progress is readable with `status()`;
        `progress`, if given, is also called with (fraction, message).

        Raises:
            ServiceBusyError: a load is already running.
            MolmoInputError: an empty source, an unknown quantization or max_crops < 1.
        """
        source = str(source).strip() if source is not None else ""
        if not source:
            raise MolmoInputError("Choose a checkpoint: a hub id such as allenai/Molmo-7B-D-0924 or a local folder.")
        quantize = quantize or None
        if quantize not in QUANTIZE_CHOICES:
            raise MolmoInputError(f"Unknown quantization {quantize!r}; expected one of 8bit, 4bit or none.")
        max_crops = int(max_crops)
        if max_crops < 1:
            raise MolmoInputError(f"max_crops must be >= 1, got {max_crops}.")
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                raise ServiceBusyError(f"{self._state.source} is still loading ({self._state.fraction:.0%}); "
                                       "wait for it to finish before loading another model.")
            self._state = LoadState("loading", 0.0, "Starting", source)
            thread = threading.Thread(target=self._load, args=(source, quantize, max_crops, progress),
                                      name="molmo-load", daemon=True)
            self._thread = thread
        thread.start()
        if wait:
            thread.join()
        return thread

    def _load(self, source: str, quantize: str | None, max_crops: int, progress: ProgressFn | None) -> None:
        def report(fraction: float, message: str) -> None:
            with self._lock:
                self._state = LoadState("loading", max(0.0, min(1.0, float(fraction))), str(message), source)
            if progress:
                progress(fraction, message)

        try:
            self.unload()  # free the old weights first: a small GPU cannot hold two models
            report(0.0, f"Loading {source}")
            runner = self._loader(source, device=self.device, quantize=quantize, max_crops=max_crops,
                                  progress=report)
        except Exception as e:  # noqa: BLE001 -- any failure becomes a message in the Model panel
            message = str(e) if isinstance(e, (CheckpointError, ValueError, OSError)) else f"{type(e).__name__}: {e}"
            with self._lock:
                self._state = LoadState("error", 0.0, "Load failed", source, message or type(e).__name__)
            return
        with self._lock:
            self._runner = runner
            self._max_crops = max_crops
            self.loads += 1
            self._state = LoadState("ready", 1.0, "Ready", source)

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """Block until the current load ends; True if a model is loaded afterwards."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return self._runner is not None

    def unload(self) -> None:
        """Free the current model. New requests fail at once with NoModelError; a batch already
        decoding finishes first (the runner's worker holds its own reference until then)."""
        with self._lock:
            runner, self._runner = self._runner, None
        if runner is not None:
            runner.close()

    @property
    def runner(self) -> Any:
        """The loaded runner, or None (used by the Annotate tab's caption drafts)."""
        return self._runner

    def get_runner(self) -> Any:
        return self._runner

    def status(self) -> ServiceStatus:
        with self._lock:
            runner, state, max_crops, loads = self._runner, self._state, self._max_crops, self.loads
        used = total = None
        try:
            import torch

            if torch.cuda.is_available():
                free, total = torch.cuda.mem_get_info()
                used = total - free
        except Exception:  # noqa: BLE001 -- memory figures are informative only
            pass
        if runner is None:
            return ServiceStatus(False, state, device_memory_used=used, device_memory_total=total, loads=loads)
        dtype = str(getattr(runner, "dtype", "")).replace("torch.", "")
        precision = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}.get(dtype, dtype)
        quant = getattr(runner, "quantize", None)
        return ServiceStatus(True, state, name=runner.name, device=str(runner.device), precision=precision,
                             quantization=quant, max_crops=max_crops, param_bytes=runner.memory_bytes(),
                             device_memory_used=used, device_memory_total=total, loads=loads,
                             family=prompts.family_of(runner))

    @property
    def family(self) -> str | None:
        """The loaded model's family ("molmo" or "molmo2"), None when nothing is loaded."""
        runner = self._runner
        return prompts.family_of(runner) if runner is not None else None

    def _require_runner(self) -> Any:
        with self._lock:
            runner, state = self._runner, self._state
        if runner is not None:
            return runner
        if state.phase == "loading":
            raise NoModelError(f"The model is still loading ({state.fraction:.0%}: {state.message}); "
                               "try again in a moment.")
        if state.phase == "error":
            raise NoModelError(f"No model loaded: {state.source} failed to load ({state.error}). "
                               "Choose another checkpoint in the Model panel.")
        raise NoModelError(NO_MODEL_MESSAGE)

    # ------------------------------------------------------------------ tasks

    def point(self, image: Any, phrase: str) -> PointResult:
        """Ask the model to point at `phrase`; points come back in pixels of `image`.

        Raises:
            MolmoInputError: no/unreadable/huge image or an empty phrase. NoModelError: nothing loaded.
        """
        runner = self._require_runner()
        family = prompts.family_of(runner)
        prompt = _prompt(prompts.point_prompt, phrase, family=family)
        rgb = prepare_image(image)
        text = runner.generate(rgb, prompt, max_new_tokens=self.limits.point)
        h, w = rgb.shape[:2]
        return PointResult(text, " ".join(phrase.split()), answer_points(text, w, h, family), w, h)

    def count(self, image: Any, phrase: str) -> CountResult:
        """Count by pointing (the paper's point-then-count answer); the count plus the points."""
        runner = self._require_runner()
        family = prompts.family_of(runner)
        prompt = _prompt(prompts.count_prompt, phrase, family=family)
        rgb = prepare_image(image)
        text = runner.generate(rgb, prompt, max_new_tokens=self.limits.count)
        h, w = rgb.shape[:2]
        return CountResult(text, " ".join(phrase.split()), answer_count(text, family),
                           answer_points(text, w, h, family), w, h)

    def point_multi(self, images: Sequence[Any], phrase: str) -> MultiPointResult:
        """Point at `phrase` in several images with one question (Molmo2); points per image, in its pixels.

        One image works with either family. Raises MolmoInputError for no image, more than MAX_IMAGES, or
        several images with a Molmo v1 model (it takes one image per question)."""
        return self._multi("point", images, phrase)

    def count_multi(self, images: Sequence[Any], phrase: str) -> MultiPointResult:
        """Count `phrase` over several images with one question (Molmo2): the stated total and the points of
        each image."""
        return self._multi("count", images, phrase)

    def _multi(self, task: str, images: Sequence[Any], phrase: str) -> MultiPointResult:
        runner = self._require_runner()
        family = prompts.family_of(runner)
        images = [im for im in (images or []) if im is not None]
        if not images:
            raise MolmoInputError("No image: upload one or more photos (JPEG, PNG or WebP) first.")
        if len(images) > 1 and family != "molmo2":
            raise MolmoInputError(ONE_IMAGE_MESSAGE.format(name=getattr(runner, "name", "This model"),
                                                           n=len(images)))
        if len(images) > MAX_IMAGES:
            raise MolmoInputError(f"{len(images)} images were given; ask about at most {MAX_IMAGES} at once.")
        builder = prompts.point_prompt if task == "point" else prompts.count_prompt
        prompt = _prompt(builder, phrase, family=family)
        rgbs = [prepare_image(im) for im in images]
        limit = self.limits.point if task == "point" else self.limits.count
        text = runner.generate(rgbs if len(rgbs) > 1 else rgbs[0], prompt, max_new_tokens=limit)
        per_image = []
        for i, rgb in enumerate(rgbs, start=1):
            h, w = rgb.shape[:2]
            per_image.append(ImagePoints(answer_points(text, w, h, family, image=i if len(rgbs) > 1 else None),
                                         w, h))
        unplaced = 0
        if family == "molmo2" and len(rgbs) > 1:
            h, w = rgbs[0].shape[:2]
            unplaced = len(answer_points(text, w, h, family)) - sum(len(im.points) for im in per_image)
        count = answer_count(text, family) if task == "count" else None
        return MultiPointResult(task, text, " ".join(phrase.split()), count, per_image, family, max(0, unplaced))

    def read_clock(self, image: Any) -> ClockResult:
        runner = self._require_runner()
        rgb = prepare_image(image)
        text = runner.generate(rgb, prompts.clock_prompt(family=prompts.family_of(runner)),
                               max_new_tokens=self.limits.clock)
        return ClockResult(text, parse_clock(text))

    def caption(self, image: Any, style: str = "long_caption", length_hint: int | None = 65,
                *, chat_format: bool = False) -> CaptionResult:
        """A dense caption.

        By default the PixMo-Cap captioner format is used (`" long_caption 65:"` with no
        User/Assistant wrapper), which honours the length hint and is what our fine-tunes learn.
        `chat_format=True` asks the released chat models instead ("long_caption: Describe this
        image." inside the usual wrapper; the length hint is then not part of the prompt).
        A Molmo2 model has no captioner format: it is always asked the chat way (the length hint only
        sizes the answer budget).
        """
        if length_hint is not None:
            length_hint = int(length_hint)
        style_key = "_".join(str(style).strip().lower().split())
        runner = self._require_runner()
        rgb = prepare_image(image)
        max_new = self.limits.caption(length_hint)
        if prompts.family_of(runner) == "molmo2":
            prompt = _prompt(prompts.caption_prompt, style, length_hint, family="molmo2")
            text = runner.generate(rgb, prompt, max_new_tokens=max_new)
        elif chat_format:
            prompt = _prompt(prompts.ask_prompt, f"{style_key}: Describe this image.")
            text = runner.generate(rgb, prompt, max_new_tokens=max_new)
        else:
            prompt = _prompt(prompts.caption_prompt, style, length_hint)
            text = "".join(_stream_captioner(runner, rgb, prompt, max_new)).strip()
        return CaptionResult(text, style_key, length_hint, prompt)

    def ask_stream(self, image: Any, question: str, history: Sequence[tuple[str, str]] = ()) -> Iterator[str]:
        """Yield the growing answer text (each item is the whole answer so far).

        `history` holds earlier (question, answer) turns about the same image. The image may be None
        (text-only chat). Input errors raise before the first item.
        """
        runner = self._require_runner()
        prompt = _prompt(prompts.ask_prompt, question)
        rgb = prepare_image(image) if image is not None else None
        pieces = runner.stream(rgb, prompt, history=[(str(q), str(a)) for q, a in history],
                               max_new_tokens=self.limits.ask)
        return _growing(pieces)

    def ask(self, image: Any, question: str, history: Sequence[tuple[str, str]] = ()) -> AskResult:
        text = ""
        for text in self.ask_stream(image, question, history):
            pass
        size = prepare_image(image).shape[:2] if image is not None else None
        points = answer_points(text, size[1], size[0], self.family or "molmo") if size else []
        return AskResult(text.strip(), points, size[1] if size else None, size[0] if size else None)


def _growing(pieces: Iterator[str]) -> Iterator[str]:
    """Deltas -> accumulated text. Closes the underlying stream (releasing the runner's lock) even
    when the consumer stops early."""
    text = ""
    try:
        for piece in pieces:
            text += piece
            yield text
    finally:
        close = getattr(pieces, "close", None)
        if close:
            close()


def _stream_captioner(runner: Any, rgb: np.ndarray, caption_text: str, max_new_tokens: int) -> Iterator[str]:
    """The captioner prompt format (`BOS image " long_caption 65:"`, no User/Assistant wrapper,
    molmo_v1.md §8.1)."""
    return runner.stream(rgb, caption_text, max_new_tokens=max_new_tokens, template="none")


__all__ = [
    "MolmoService", "NoModelError", "ServiceBusyError", "PointResult", "CountResult", "ClockResult",
    "CaptionResult", "AskResult", "LoadState", "ServiceStatus", "TaskLimits", "prepare_image",
    "NO_MODEL_MESSAGE", "MultiPointResult", "ImagePoints", "answer_points", "answer_count", "MAX_IMAGES",
    "ONE_IMAGE_MESSAGE",
]
