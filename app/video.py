"""Video with Molmo2: decode a clip, sample its frames as the model's processor does, ask, parse, draw, export.

Pure functions (OpenCV, numpy, no Gradio); the tab is `app/video_tab.py`.

Flow of `run_video_task(runner, path, task, phrase, ...)`:

1. `check_video_runner`: a Molmo2 runner (`runner.family == "molmo2"`) must be loaded; Molmo v1 reads single
   images only.
2. `decode_sampled`: OpenCV (`cv2.VideoCapture`, FFmpeg backend) reads the clip; the frame rate comes from the
   container, the frame count from decoding (the container's count is only a first guess). The frames kept
   are `molmo_core.molmo2.processing.sample_frame_indices(total, fps, settings)` with the model processor's
   video settings, the user's "max frames" / "max fps" clamped to them (`sampling_settings`): at most 64 frames
   at <= 2 fps for the released Molmo2 checkpoints. Only the kept frames are held in memory, as RGB uint8
   (frames wider or taller than `MODEL_MAX_SIDE` are shrunk with area averaging first; the model sees
   378 x 378 per frame anyway).
3. The kept frames go to `runner.generate(Video(frames, model_fps), prompt, max_new_tokens=...)`. `model_fps`
   is the rate of the kept frames (n / duration, at most max fps), so the processor, which samples again,
   keeps them all and prints timestamps close to their times in the clip (within one frame); which frames it
   keeps and the timestamps it prints are recomputed here exactly as it computes them (`ClipSample`).
   Before asking, `check_context` refuses a clip whose frames, prompt and answer would not fit the model's
   context ("use fewer frames").
4. `parse_video_answer`: `parse_molmo2_points` reads `<points>` / `<tracks>`; each timestamp goes to the
   nearest frame the model saw; x / y (0-1000) become pixels of the clip.
5. `write_annotated_video`: every frame of the clip at the clip's frame rate (clips of more than
   `OUTPUT_MAX_FRAMES` frames: every k-th frame at fps / k; frames larger than `OUTPUT_MAX_SIDE` are scaled
   down), a disc in the object's colour and an "id N" label per object. A point is shown on the frames
   nearest to the sampled frame it was given for (half a sampling interval either side); a track also moves
   linearly between two sampled frames where the object was tracked (gaps of up to one missing frame).
   Written by `cv2.VideoWriter` as MP4: H.264 ('avc1') where the OpenCV build has an encoder, else VP9 in
   MP4 ('vp09', played by Chrome, Edge, Firefox and Safari; the PyPI OpenCV wheels have no H.264 encoder),
   else MPEG-4 Part 2 ('mp4v', not playable in browsers); the codec used is in the result.
6. `write_result_json`: the whole result (clip, sampling, prompt, answer, points, per-frame counts) as JSON.

Errors meant for the user are `VideoError` (a `MolmoInputError`, so `app.handlers.user_errors` shows them
verbatim): no model / a v1 model, a file that is not a video, a still image, a clip without frames, a clip
too long, too many frames for the model's context, an image together with a video, an empty phrase.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import cv2
import numpy as np
import torch

from molmo_core.errors import MolmoInputError
from molmo_core.molmo2.processing import (VIDEO_TOKEN, TokenSettings, Video, VideoSettings, sample_frame_indices,
                                          video_string)
from molmo_core.outputs import molmo2_to_pixels, parse_molmo2_count, parse_molmo2_points

from .render import PALETTE, marker_radius
from .tempfiles import new_temp_file

__all__ = [
    "TASKS", "DEFAULT_MAX_FRAMES", "DEFAULT_MAX_FPS", "VideoError", "VideoInfo", "ClipSample", "VideoPoint",
    "VideoResult", "check_video_runner", "model_video_settings", "model_limits", "sampling_settings",
    "probe_video", "decode_sampled", "video_prompt", "context_length", "estimate_tokens", "check_context",
    "parse_video_answer", "object_color", "draw_markers", "markers_at", "open_writer",
    "write_annotated_video", "write_result_json", "run_video_task", "info_markdown", "summary_markdown",
    "points_rows", "count_rows",
]

TASKS: tuple[str, ...] = ("point", "count", "track")
#: The Molmo2 video processor's defaults (transformers' Molmo2VideoProcessor): 64 frames at <= 2 fps.
DEFAULT_MAX_FRAMES = 64
DEFAULT_MAX_FPS = 2.0
#: Hard caps for the sliders when the model's processor sets none.
HARD_MAX_FRAMES = 256
HARD_MAX_FPS = 30.0
#: Longest clip accepted (decoding is a full pass over the file, twice with the annotated video).
MAX_DURATION_S = 600.0
MAX_TOTAL_FRAMES = 36_000
#: Largest frame accepted, and the longest side a kept frame is given to the model with.
MAX_FRAME_PIXELS = 4096 * 4096
MODEL_MAX_SIDE = 1920
#: The annotated video: at most this many frames and this long a side (VP9 encoding is slow on a CPU).
OUTPUT_MAX_FRAMES = 600
OUTPUT_MAX_SIDE = 640
#: MP4 codecs tried in order (see the module docstring).
FOURCCS: tuple[str, ...] = ("avc1", "vp09", "mp4v")
BROWSER_PLAYABLE = {"avc1": True, "vp09": True, "mp4v": False}

ProgressFn = Callable[[float, str], None]


class VideoError(MolmoInputError):
    """A video request the app refuses, with a message for the user (what was found, what to do)."""


# ----------------------------------------------------------------------------------------- the model


def check_video_runner(runner: Any) -> None:
    """Refuse when no model is loaded or the model is not a Molmo2 (video needs Molmo2).

    Raises:
        VideoError: no model, or a Molmo v1 model.
    """
    if runner is None:
        raise VideoError("No model is loaded. Video needs a Molmo2 model (for example allenai/Molmo2-4B): "
                         "load one in the Model tab, then run again.")
    if getattr(runner, "family", "molmo") != "molmo2":
        name = getattr(runner, "name", "the loaded model")
        raise VideoError(f"The loaded model ({name}) is a Molmo v1 model, which reads single images only. "
                         "Video needs a Molmo2 model (for example allenai/Molmo2-4B): load one in the Model tab.")


def model_video_settings(runner: Any) -> VideoSettings:
    """The loaded model's video processor settings (`runner.processor.video`), else Molmo2's defaults."""
    settings = getattr(getattr(runner, "processor", None), "video", None)
    return settings if isinstance(settings, VideoSettings) else VideoSettings()


def model_limits(settings: VideoSettings) -> tuple[int, float]:
    """(max frames, max fps) the model's processor keeps: what the sliders are clamped to."""
    if not settings.do_sample_frames:
        return HARD_MAX_FRAMES, HARD_MAX_FPS
    frames = int(settings.num_frames) if settings.num_frames else HARD_MAX_FRAMES
    fps = settings.max_fps if settings.max_fps else settings.fps
    return max(1, frames), float(fps) if fps and fps > 0 else HARD_MAX_FPS


def sampling_settings(runner: Any, max_frames: float | None = None, max_fps: float | None = None) -> VideoSettings:
    """The settings frames are sampled with: the model's, with the user's max frames / max fps (None or 0 =
    the model's) clamped to the model's limits."""
    base = model_video_settings(runner)
    lim_frames, lim_fps = model_limits(base)
    frames = lim_frames if not max_frames or max_frames <= 0 else min(int(max_frames), lim_frames)
    fps = lim_fps if not max_fps or max_fps <= 0 else min(float(max_fps), lim_fps)
    return replace(base, num_frames=max(1, frames), max_fps=fps, fps=None, do_sample_frames=True)


# ----------------------------------------------------------------------------------------- decoding


@dataclass
class VideoInfo:
    """What the container says about a clip (`exact`: the frame count was counted by decoding)."""
    name: str
    frames: int
    fps: float
    width: int
    height: int
    exact: bool = False

    @property
    def duration_s(self) -> float:
        return self.frames / self.fps if self.fps > 0 else 0.0

    def to_json(self) -> dict:
        return {"name": self.name, "frames": self.frames, "fps": round(self.fps, 4),
                "duration_s": round(self.duration_s, 3), "width": self.width, "height": self.height}


def _name(path: str | Path) -> str:
    return Path(path).name or str(path)


_CONTAINER_MAGIC = ((4, b"ftyp"), (0, b"\x1aE\xdf\xa3"), (0, b"OggS"), (0, b"FLV"), (8, b"AVI "))


def _looks_like_video_container(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(16)
    return any(head[at:at + len(magic)] == magic for at, magic in _CONTAINER_MAGIC)


# Still-image formats PIL identifies (not its "MPEG" identifier, which names a video).
_STILL_FORMATS = {"PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "PPM", "ICO", "JPEG2000", "TGA", "DDS", "PCX", "MPO",
                  "HEIF", "AVIF", "QOI"}


def _still_image_format(path: Path) -> str | None:
    """The format name when the file is a single-frame image (PNG, JPEG ...), else None."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.format not in _STILL_FORMATS or getattr(im, "n_frames", 1) > 1:
                return None  # an animated GIF / WebP plays as a video
            return im.format
    except Exception:  # noqa: BLE001 -- PIL raises many types for non-images
        return None


def _open(path: str | Path) -> cv2.VideoCapture:
    p = Path(path)
    name = _name(p)
    if not p.is_file():
        raise VideoError(f"{name} was not found on the server; upload the clip again.")
    if p.stat().st_size == 0:
        raise VideoError(f"{name} is empty (0 bytes). Upload a video clip (MP4, WebM, MOV, AVI ...).")
    still = _still_image_format(p)
    if still:
        raise VideoError(f"{name} is a still image ({still}), not a video. Upload a video clip (MP4, WebM, MOV, "
                         "AVI ...); for single images use the Point & Count tab.")
    cap = cv2.VideoCapture(str(p), cv2.CAP_FFMPEG)
    if not cap.isOpened():
        cap.release()
        if _looks_like_video_container(p):
            raise VideoError(f"{name} is a video file without readable frames (it has no frames, or it was cut "
                             "off). Upload a clip with at least one frame.")
        raise VideoError(f"{name} is not a video that can be read (OpenCV/FFmpeg could not open it). Upload a video "
                         "clip (MP4, WebM, MOV, AVI ...).")
    return cap


def _container_meta(cap: cv2.VideoCapture) -> tuple[float, int]:
    fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
    count = float(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0.0)
    fps = fps if math.isfinite(fps) and 0 < fps <= 1000 else 0.0
    count_i = int(count) if math.isfinite(count) and 0 < count < 1e9 else 0
    return fps, count_i


def probe_video(path: str | Path) -> VideoInfo:
    """Frame count, frame rate and size from the container (fast; the count may be an estimate), checked
    like `decode_sampled` checks a clip.

    Raises:
        VideoError: not a readable video, a still image, no frames, too large or too long.
    """
    cap = _open(path)
    try:
        fps, count = _container_meta(cap)
        ok, frame = cap.read()
        if not ok or frame is None:
            raise VideoError(f"{_name(path)} has no video frames. Upload a clip with at least one frame.")
        h, w = frame.shape[:2]
    finally:
        cap.release()
    info = VideoInfo(_name(path), max(count, 1), fps, w, h, exact=False)
    _check_size(info)
    if fps > 0 and info.duration_s > MAX_DURATION_S:
        raise _too_long(info)
    return info


def _check_size(info: VideoInfo) -> None:
    if info.width * info.height > MAX_FRAME_PIXELS:
        raise VideoError(f"{info.name} has {info.width}x{info.height} frames; at most {MAX_FRAME_PIXELS // 10**6} "
                         "megapixels per frame are accepted. Scale the clip down and upload it again.")


def _too_long(info: VideoInfo) -> VideoError:
    return VideoError(f"{info.name} is {info.duration_s / 60:.1f} min long ({info.frames} frames); this tab takes "
                      f"clips up to {MAX_DURATION_S / 60:.0f} min. Trim the clip and upload it again.")


def _rgb(frame_bgr: np.ndarray, max_side: int | None) -> np.ndarray:
    if frame_bgr.ndim == 2:
        frame_bgr = cv2.cvtColor(frame_bgr, cv2.COLOR_GRAY2BGR)
    elif frame_bgr.shape[2] == 4:
        frame_bgr = cv2.cvtColor(frame_bgr, cv2.COLOR_BGRA2BGR)
    h, w = frame_bgr.shape[:2]
    if max_side and max(h, w) > max_side:
        s = max_side / max(h, w)
        frame_bgr = cv2.resize(frame_bgr, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2RGB)


def _scan(path: str | Path, wanted: set[int],
          max_side: int | None) -> tuple[int, dict[int, np.ndarray], tuple[int, int], float]:
    """One decoding pass: (frames counted, {index: RGB frame} for `wanted`, (width, height) of frame 0,
    time in ms of the last frame)."""
    cap = _open(path)
    frames: dict[int, np.ndarray] = {}
    size = (0, 0)
    last_ms = 0.0
    total = 0
    try:
        while cap.grab():
            if total == 0 or total in wanted:
                ok, frame = cap.retrieve()
                if not ok or frame is None:
                    break
                if total == 0:
                    size = (frame.shape[1], frame.shape[0])
                    if size[0] * size[1] > MAX_FRAME_PIXELS:
                        _check_size(VideoInfo(_name(path), 0, 0.0, *size))
                if total in wanted:
                    frames[total] = _rgb(frame, max_side)
            last_ms = float(cap.get(cv2.CAP_PROP_POS_MSEC) or 0.0)
            total += 1
            if total > MAX_TOTAL_FRAMES:
                raise VideoError(f"{_name(path)} has more than {MAX_TOTAL_FRAMES} frames; this tab takes clips up to "
                                 f"{MAX_DURATION_S / 60:.0f} min. Trim the clip and upload it again.")
    finally:
        cap.release()
    return total, frames, size, last_ms


@dataclass
class ClipSample:
    """A decoded clip's sampled frames and what the model's processor will make of them.

    Attributes:
        info: the clip (exact frame count).
        indices: frame indices (in the clip) of the sampled frames, in order.
        frames: the sampled frames, RGB uint8 [n, H, W, 3] (shrunk to `MODEL_MAX_SIDE` when larger).
        model_fps: the rate the sampled frames are handed to the model with.
        kept: positions (into `indices`) of the frames the model's processor keeps (normally all).
        timestamps: the timestamps (seconds) the processor prints for the kept frames, as it computes them.
        settings: the sampling settings used (the user's limits clamped to the model's).
    """
    info: VideoInfo
    indices: np.ndarray
    frames: np.ndarray
    model_fps: float
    kept: np.ndarray
    timestamps: list[float]
    settings: VideoSettings

    @property
    def model_frames(self) -> np.ndarray:
        """Clip frame indices of the frames the model sees."""
        return self.indices[self.kept]

    @property
    def interval_s(self) -> float:
        """Average time between the frames the model sees."""
        n = len(self.kept)
        return self.info.duration_s / n if n else self.info.duration_s

    def video(self) -> Video:
        return Video(self.frames, self.model_fps)


def _model_view(n: int, duration: float, clip_fps: float, total: int, s: VideoSettings,
                model_settings: VideoSettings) -> tuple[float, np.ndarray, list[float]]:
    """(fps to hand the n sampled frames over with, positions the processor keeps, its timestamps)."""
    if n == total:
        fps = clip_fps  # every frame kept: the clip's own rate, timestamps exact
    else:
        fps = min(n / duration, float(s.max_fps)) if s.max_fps else n / duration
    if model_settings.do_sample_frames:
        idx = sample_frame_indices(n, fps, model_settings)
    else:
        idx = torch.arange(n)
    # as the processor: an integer index tensor divided by the Python float rate (float32 values)
    stamps = [float(t) for t in (idx / fps)]
    return fps, idx.numpy().astype(np.int64), stamps


def decode_sampled(path: str | Path, settings: VideoSettings, model_settings: VideoSettings | None = None,
                   max_side: int | None = MODEL_MAX_SIDE) -> ClipSample:
    """Decode `path` and keep the frames `sample_frame_indices(total, fps, settings)` picks.

    Args:
        path: the clip.
        settings: sampling settings (`sampling_settings`).
        model_settings: the model processor's own settings (default: `settings`), to work out which of the
            handed-over frames it keeps and the timestamps it prints.
        max_side: kept frames with a longer side are shrunk to it (area averaging); None keeps them as decoded.

    Raises:
        VideoError: not a readable video, a still image, no frames, too long, frames too large, no frame rate.
    """
    name = _name(path)
    cap = _open(path)
    fps, guess = _container_meta(cap)
    cap.release()
    if fps > 0 and guess and guess / fps > MAX_DURATION_S:
        raise _too_long(VideoInfo(name, guess, fps, 0, 0))
    wanted = set(sample_frame_indices(guess, fps, settings).tolist()) if fps > 0 and guess > 0 else set()
    total, frames, (w, h), last_ms = _scan(path, wanted, max_side)
    if total == 0:
        raise VideoError(f"{name} has no video frames. Upload a clip with at least one frame.")
    if fps <= 0:  # no rate in the container: from the last frame's time stamp
        fps = (total - 1) / (last_ms / 1000.0) if total > 1 and last_ms > 0 else 0.0
        if not (math.isfinite(fps) and fps > 0):
            raise VideoError(f"{name} does not say its frame rate. Re-encode it (for example as MP4) and upload "
                             "it again.")
    info = VideoInfo(name, total, fps, w, h, exact=True)
    if info.duration_s > MAX_DURATION_S:
        raise _too_long(info)
    indices = sample_frame_indices(total, fps, settings).numpy().astype(np.int64)
    if not set(indices.tolist()) <= frames.keys():  # the container's count was off: a second pass
        _, frames, _, _ = _scan(path, set(indices.tolist()), max_side)
        if not set(indices.tolist()) <= frames.keys():
            raise VideoError(f"{name} could not be decoded to the end (frames missing). Re-encode it and upload "
                             "it again.")
    stack = np.stack([frames[i] for i in indices.tolist()])
    model_fps, kept, stamps = _model_view(len(indices), info.duration_s, fps, total, settings,
                                          model_settings or settings)
    return ClipSample(info, indices, stack, model_fps, kept, stamps, settings)


# ----------------------------------------------------------------------------------------- asking


def video_prompt(task: str, phrase: str) -> str:
    """The Molmo2 question for a task: the same pointing / counting templates as for images
    (`molmo_core.prompts`: "Point to {phrase}", "How many {phrase} are there?"), and "Track {phrase}" for
    tracking (the Molmo2 model card's tracking examples read "Track the ...").

    Raises:
        VideoError: an unknown task or an empty phrase.
    """
    if task not in TASKS:
        raise VideoError(f"Unknown task {task!r}; choose one of {', '.join(TASKS)}.")
    text = " ".join(str(phrase or "").split())
    if not text:
        raise VideoError("Type what to point at, count or track (for example: the red car), then run again.")
    if task == "point":
        return f"Point to {text}"
    if task == "count":
        return f"How many {text} are there?"
    return f"Track {text}"


def context_length(runner: Any) -> int | None:
    """The longest input the model takes, in tokens: `runner.processor.max_length`, else the text config's
    `max_position_embeddings`; None when neither is known."""
    n = getattr(getattr(runner, "processor", None), "max_length", None)
    if n:
        return int(n)
    try:
        config = getattr(runner, "config", None)
    except Exception:  # noqa: BLE001 -- an unloaded model: no limit known here
        return None
    text = getattr(config, "text_config", config)
    n = getattr(text, "max_position_embeddings", None)
    return int(n) if isinstance(n, (int, float)) and n > 0 else None


def _frame_grid(s: VideoSettings) -> tuple[int, int]:
    cp = s.crop_size // s.patch_size
    return -(-cp // s.pooling_size[0]), -(-cp // s.pooling_size[1])


def estimate_tokens(runner: Any, timestamps: Sequence[float], prompt: str) -> tuple[int, int]:
    """(tokens for the frames, tokens for the prompt and chat template) of a video request.

    Exact when the runner's processor has a tokenizer (the frames' token string is built as the processor
    builds it and tokenized); otherwise estimated (pooled patches + 2 frame tokens + 4 for the timestamp
    per frame, about 3 characters per prompt token)."""
    s = model_video_settings(runner)
    rows, cols = _frame_grid(s)
    proc = getattr(runner, "processor", None)
    tokens = getattr(proc, "tokens", None)
    tokens = tokens if isinstance(tokens, TokenSettings) else TokenSettings()
    tok = getattr(proc, "tokenizer", None)
    if tok is not None and timestamps:
        try:
            frames = len(tok(video_string((len(timestamps), rows, cols), timestamps, tokens),
                             add_special_tokens=False)["input_ids"])
            text = proc.prompt_text(prompt, video=True) if hasattr(proc, "prompt_text") else prompt
            bos = getattr(proc, "bos", None)
            if bos and not text.startswith(bos):
                text = bos + text  # as the processor: bos first, then the placeholder is replaced by the frames
            return frames, len(tok(text.replace(VIDEO_TOKEN, ""), add_special_tokens=False)["input_ids"])
        except Exception:  # noqa: BLE001 -- fall back to the estimate
            pass
    per_frame = rows * (cols + (1 if tokens.video_use_col_tokens else 0)) + 2 + 4
    return per_frame * len(timestamps), len(prompt) // 3 + 24


def check_context(runner: Any, clip: ClipSample, prompt: str, max_new_tokens: int) -> dict:
    """Refuse a request whose frames, prompt and answer do not fit the model's context.

    Returns:
        {"frame_tokens", "prompt_tokens", "context"} (context None when unknown).

    Raises:
        VideoError: too many frames for the context, with the number of frames that would fit.
    """
    frame_tokens, prompt_tokens = estimate_tokens(runner, clip.timestamps, prompt)
    limit = context_length(runner)
    out = {"frame_tokens": frame_tokens, "prompt_tokens": prompt_tokens, "context": limit}
    if limit is None:
        return out
    need = frame_tokens + prompt_tokens + int(max_new_tokens)
    if need > limit:
        n = max(1, len(clip.timestamps))
        per_frame = frame_tokens / n
        fit = max(0, int((limit - prompt_tokens - int(max_new_tokens)) // per_frame))
        hint = (f"use fewer frames: at most {fit} (lower max frames or max fps)" if fit >= 1 else
                "use fewer frames and fewer new tokens: not even one frame fits with this answer length")
        raise VideoError(f"Too long for the model's context: {n} frames take about {frame_tokens} tokens "
                         f"({per_frame:.0f} per frame), the prompt {prompt_tokens} and the answer up to "
                         f"{int(max_new_tokens)}, {need} in all; this model holds {limit}. Please {hint}.")
    return out


# ----------------------------------------------------------------------------------------- answers


@dataclass(frozen=True)
class VideoPoint:
    """One point of the answer, placed in the clip.

    Attributes:
        time_s: the timestamp the model wrote.
        frame: index (in the clip) of the sampled frame nearest to that timestamp.
        frame_time_s: that frame's time in the clip (frame / fps).
        x, y: pixels of the clip's frames.
        x_1000, y_1000: as the model wrote them (0-1000).
        object_id: the object id the model wrote.
        label: the tag's label; kind: "points" or "tracks".
    """
    time_s: float
    frame: int
    frame_time_s: float
    x: float
    y: float
    x_1000: float
    y_1000: float
    object_id: int
    label: str
    kind: str

    def to_json(self) -> dict:
        return {"time_s": self.time_s, "frame": self.frame, "frame_time_s": round(self.frame_time_s, 4),
                "x": round(self.x, 1), "y": round(self.y, 1), "x_1000": self.x_1000, "y_1000": self.y_1000,
                "object_id": self.object_id, "label": self.label, "kind": self.kind}


@dataclass
class VideoResult:
    """A parsed video answer (and, once drawn, the annotated video and the JSON file)."""
    task: str
    phrase: str
    prompt: str
    answer: str
    clip: ClipSample
    points: list[VideoPoint]
    count: int | None
    per_frame: list[dict]
    tokens: dict = field(default_factory=dict)
    video_path: str | None = None
    video_meta: dict = field(default_factory=dict)
    json_path: str | None = None

    @property
    def objects(self) -> list[int]:
        return sorted({p.object_id for p in self.points})

    def to_json(self) -> dict:
        c = self.clip
        return {
            "task": self.task, "phrase": self.phrase, "prompt": self.prompt, "answer": self.answer,
            "family": "molmo2", "count": self.count, "objects": self.objects,
            "video": c.info.to_json(),
            "sampling": {"max_frames": c.settings.num_frames, "max_fps": c.settings.max_fps,
                         "frames_sampled": int(len(c.indices)), "frames_seen": int(len(c.kept)),
                         "frames": [int(i) for i in c.model_frames], "timestamps": [round(t, 4) for t in c.timestamps],
                         "model_fps": round(c.model_fps, 6)},
            "tokens": self.tokens,
            "points": [p.to_json() for p in self.points],
            "per_frame": self.per_frame,
            "annotated_video": self.video_meta,
        }


def parse_video_answer(answer: str, clip: ClipSample, task: str = "point", phrase: str = "",
                       prompt: str = "") -> VideoResult:
    """Read a Molmo2 video answer: points / tracks placed on the nearest frame the model saw, in pixels.

    Frames are written as timestamps in seconds (a frame written without a decimal point is read as seconds
    too). Per-frame counts: points per seen frame (`<tracks>`: distinct object ids). The count: the stated
    count (`parse_molmo2_count`) for the count task; otherwise the number of objects (tracks) or points."""
    stamps = np.asarray(clip.timestamps, dtype=np.float64)
    frames = clip.model_frames
    fps, w, h = clip.info.fps, clip.info.width, clip.info.height
    points: list[VideoPoint] = []
    tracked: set[tuple[int, int]] = set()
    for tag in parse_molmo2_points(answer):
        for p in tag.points:
            k = int(np.argmin(np.abs(stamps - p.frame))) if len(stamps) else 0
            frame = int(frames[k]) if len(frames) else 0
            if tag.kind == "tracks":
                if (p.object_id, frame) in tracked:
                    continue  # one point per object and frame (as AI2's track extractor)
                tracked.add((p.object_id, frame))
            x, y = molmo2_to_pixels(p.x, p.y, w, h)
            points.append(VideoPoint(float(p.frame), frame, frame / fps, x, y, p.x, p.y, p.object_id,
                                     tag.label.strip(), tag.kind))
    per_frame = []
    for t, f in zip(clip.timestamps, frames.tolist()):
        here = [p for p in points if p.frame == f]
        tracked = {p.object_id for p in here if p.kind == "tracks"}
        n = len(tracked) + sum(1 for p in here if p.kind != "tracks")
        per_frame.append({"time_s": round(t, 4), "frame": int(f), "count": n})
    if task == "count":
        count = parse_molmo2_count(answer)
    elif any(p.kind == "tracks" for p in points):
        count = len({p.object_id for p in points})
    else:
        count = len(points)
    return VideoResult(task, phrase, prompt, answer, clip, points, count, per_frame)


def points_rows(result: VideoResult) -> list[list]:
    """Rows [time (s), frame, x (px), y (px), object id] of the points table."""
    return [[p.time_s, p.frame, round(p.x, 1), round(p.y, 1), p.object_id] for p in result.points]


def count_rows(result: VideoResult) -> list[list]:
    """Rows [time (s), frame, count] per frame the model saw."""
    return [[round(r["time_s"], 2), r["frame"], r["count"]] for r in result.per_frame]


# ----------------------------------------------------------------------------------------- drawing


def object_color(object_id: int) -> tuple[int, int, int]:
    """RGB colour of an object id: `app.render.PALETTE` by id (id 1 first), the same in every frame and run."""
    return PALETTE[(int(object_id) - 1) % len(PALETTE)]


def _contrast(color: tuple[int, int, int]) -> tuple[int, int, int]:
    r, g, b = color
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def draw_markers(frame: np.ndarray, markers: Sequence[tuple[float, float, int]], radius: int | None = None,
                 labels: bool = True) -> np.ndarray:
    """A copy of an RGB uint8 frame with a disc in the object's colour (`object_color`, contrasting rim) at
    each (x, y, object_id) and, with `labels`, "id N" beside it (right of the disc, left near the right edge).
    """
    out = np.ascontiguousarray(frame.copy())
    h, w = out.shape[:2]
    r = radius or marker_radius(w, h)
    scale = max(0.3, min(w, h) / 500)
    for x, y, object_id in markers:
        cx, cy = int(round(x)), int(round(y))
        color = object_color(object_id)
        cv2.circle(out, (cx, cy), r, color, -1, cv2.LINE_AA)
        cv2.circle(out, (cx, cy), r, _contrast(color), max(1, r // 6), cv2.LINE_AA)
        if labels:
            text = f"id {object_id}"
            (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
            tx = cx + r + 2 if cx + r + 2 + tw < w else cx - r - 2 - tw
            ty = min(max(cy + th // 2, th + 1), h - 2)
            cv2.putText(out, text, (tx, ty), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 3, cv2.LINE_AA)
            cv2.putText(out, text, (tx, ty), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def markers_at(points: Sequence[VideoPoint], t: float, interval: float) -> list[tuple[float, float, int]]:
    """Markers (x, y, object_id) in clip pixels to draw at time `t` (seconds) of the clip.

    Each object is shown where it was given on the nearest sampled frame within half a sampling `interval`;
    a track (`kind == "tracks"`) is also interpolated linearly between two of its sampled frames at most two
    intervals apart."""
    half = interval / 2 + 1e-6
    by_object: dict[tuple[str, int], list[VideoPoint]] = {}
    for p in points:
        by_object.setdefault((p.kind, p.object_id), []).append(p)
    out = []
    for (kind, object_id), pts in by_object.items():
        pts = sorted(pts, key=lambda p: p.frame_time_s)
        near = min(pts, key=lambda p: abs(p.frame_time_s - t))
        if abs(near.frame_time_s - t) <= half:
            if kind == "tracks":
                out.append((near.x, near.y, object_id))
            else:
                out.extend((p.x, p.y, object_id) for p in pts if p.frame == near.frame)
            continue
        if kind != "tracks":
            continue
        for a, b in zip(pts, pts[1:]):
            if a.frame_time_s < t < b.frame_time_s and b.frame_time_s - a.frame_time_s <= 2 * interval + 1e-6:
                u = (t - a.frame_time_s) / (b.frame_time_s - a.frame_time_s)
                out.append((a.x + u * (b.x - a.x), a.y + u * (b.y - a.y), object_id))
                break
    return out


_working_fourcc: str | None = None


def open_writer(path: str | Path, fps: float, size: tuple[int, int]) -> tuple[cv2.VideoWriter, str]:
    """A `cv2.VideoWriter` for an MP4 at `path`: the first of `FOURCCS` whose writer opens
    (`isOpened()`), the one that worked last time first.

    Raises:
        VideoError: no MP4 encoder in this OpenCV build.
    """
    global _working_fourcc
    order = ([_working_fourcc] if _working_fourcc else []) + [f for f in FOURCCS if f != _working_fourcc]
    for fourcc in order:
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), float(fps), size)
        if writer.isOpened():
            _working_fourcc = fourcc
            return writer, fourcc
        writer.release()
    raise VideoError(f"This server's OpenCV cannot write MP4 video (tried {', '.join(FOURCCS)}); the points are in "
                     "the table and the JSON file. Ask the admin to install opencv-python-headless from "
                     "requirements.txt.")


def _even(n: int) -> int:
    return max(2, n - n % 2)


def write_annotated_video(src: str | Path, result: VideoResult, out_path: str | Path,
                          max_side: int = OUTPUT_MAX_SIDE, max_frames: int = OUTPUT_MAX_FRAMES,
                          progress: ProgressFn | None = None) -> dict:
    """Write the clip with the answer's markers to `out_path` (MP4; see the module docstring).

    Returns:
        {"codec", "browser_playable", "frames", "fps", "width", "height", "step"}: step = clip frames per
        written frame.
    """
    info = result.clip.info
    step = max(1, math.ceil(info.frames / max_frames))
    scale = min(1.0, max_side / max(info.width, info.height))
    ow, oh = _even(round(info.width * scale)), _even(round(info.height * scale))
    sx, sy = ow / info.width, oh / info.height
    out_fps = info.fps / step
    radius = marker_radius(ow, oh)
    interval = result.clip.interval_s
    writer, fourcc = open_writer(out_path, out_fps, (ow, oh))
    cap = _open(src)
    written = i = 0
    try:
        while cap.grab():
            if i % step == 0:
                ok, frame = cap.retrieve()
                if not ok or frame is None:
                    break
                rgb = _rgb(frame, None)
                if rgb.shape[1] != ow or rgb.shape[0] != oh:
                    rgb = cv2.resize(rgb, (ow, oh), interpolation=cv2.INTER_AREA)
                marks = [(x * sx, y * sy, oid) for x, y, oid in markers_at(result.points, i / info.fps, interval)]
                writer.write(cv2.cvtColor(draw_markers(rgb, marks, radius), cv2.COLOR_RGB2BGR))
                written += 1
                if progress and written % 25 == 0:
                    progress(min(1.0, i / max(1, info.frames)), f"drawing frame {i + 1} of {info.frames}")
            i += 1
    finally:
        cap.release()
        writer.release()
    return {"codec": fourcc, "browser_playable": BROWSER_PLAYABLE.get(fourcc, False), "frames": written,
            "fps": round(out_fps, 6), "width": ow, "height": oh, "step": step}


def write_result_json(result: VideoResult, path: str | Path | None = None) -> str:
    """The result as JSON in a fresh temp file (`app.tempfiles`, sub-folder "video") or at `path`."""
    out = Path(path) if path else new_temp_file("video", f"video_{result.task}", ".json")
    out.write_text(json.dumps(result.to_json(), indent=2, ensure_ascii=False), encoding="utf-8")
    return str(out)


# ----------------------------------------------------------------------------------------- all together


def run_video_task(runner: Any, path: str | Path | None, task: str, phrase: str, max_frames: float | None = None,
                   max_fps: float | None = None, max_new_tokens: int = 1024, *, image: Any = None,
                   progress: ProgressFn | None = None, draw: bool = True) -> VideoResult:
    """Decode, sample, ask, parse, draw and export one video request.

    Args:
        runner: the loaded runner (a Molmo2Runner or anything with `family == "molmo2"` and `generate`).
        path: the clip.
        task: "point", "count" or "track".
        phrase: what to point at / count / track.
        max_frames, max_fps: sampling limits (None or 0: the model's; larger values are clamped to it).
        max_new_tokens: longest answer.
        image: a still image sent with the clip (an API caller's mistake): refused, Molmo2 takes one video or
            images, not both.
        progress: optional callback (fraction, message).
        draw: write the annotated MP4 and the JSON file (temp files).

    Raises:
        VideoError: see the module docstring. Errors of the runner (MolmoInputError ...) pass through.
    """
    def say(fraction: float, message: str) -> None:
        if progress:
            progress(fraction, message)

    check_video_runner(runner)
    if path is None or (isinstance(path, str) and not path.strip()):
        if image is not None:
            raise VideoError("An image was given but no video: this tab takes a video clip; for images use the "
                             "Point & Count tab.")
        raise VideoError("No video yet: upload a clip first.")
    if image is not None:
        raise VideoError("An image and a video were given together; Molmo2 takes either images or one video per "
                         "request, not both. Send the video alone (or the image alone in the Point & Count tab).")
    prompt = video_prompt(task, phrase)
    if int(max_new_tokens) < 1:
        raise VideoError(f"max new tokens must be at least 1, got {max_new_tokens}.")
    say(0.05, "decoding the clip")
    settings = sampling_settings(runner, max_frames, max_fps)
    clip = decode_sampled(path, settings, model_video_settings(runner))
    tokens = check_context(runner, clip, prompt, int(max_new_tokens))
    say(0.25, f"asking the model about {len(clip.kept)} frames")
    answer = runner.generate(clip.video(), prompt, max_new_tokens=int(max_new_tokens))
    result = parse_video_answer(answer, clip, task, " ".join(phrase.split()), prompt)
    result.tokens = tokens
    if draw:
        say(0.7, "drawing the annotated video")
        out = new_temp_file("video", f"video_{task}", ".mp4")
        result.video_meta = write_annotated_video(path, result, out, progress=lambda f, m: say(0.7 + 0.28 * f, m))
        result.video_path = str(out)
        result.json_path = write_result_json(result)
    say(1.0, "done")
    return result


# ----------------------------------------------------------------------------------------- text


def info_markdown(info: VideoInfo, settings: VideoSettings, model_settings: VideoSettings, loaded: bool) -> str:
    """What the clip is and how many frames the model will see, before running."""
    idx = sample_frame_indices(info.frames, info.fps, settings) if info.fps > 0 else torch.zeros(1, dtype=torch.int32)
    n = len(idx)
    lim_frames, lim_fps = model_limits(model_settings)
    approx = "" if info.exact else "about "
    stamps = [float(t) for t in idx / info.fps] if info.fps > 0 else [0.0]
    shown = ", ".join(f"{t:.1f}" for t in stamps[:6]) + (f", ... {stamps[-1]:.1f}" if n > 6 else "")
    source = "the loaded model's processor" if loaded else "Molmo2's defaults (no Molmo2 model loaded)"
    return (f"**{info.name}**: {approx}{info.frames} frames at {info.fps:.2f} fps ({info.duration_s:.2f} s), "
            f"{info.width}x{info.height}.  \nThe model will see **{n} frame{'s' if n != 1 else ''}** "
            f"(max {settings.num_frames} frames at <= {settings.max_fps:g} fps) at t = {shown} s.  \n"
            f"Limits from {source}: {lim_frames} frames at <= {lim_fps:g} fps.")


def summary_markdown(result: VideoResult) -> str:
    n_seen = len(result.clip.kept)
    frames_with = sum(1 for r in result.per_frame if r["count"])
    if result.task == "count":
        head = f"### Count: {result.count if result.count is not None else '?'} {result.phrase}"
    elif result.task == "track":
        k = len(result.objects)
        head = f"### {k} object{'s' if k != 1 else ''} tracked"
    else:
        head = f"### {len(result.points)} point{'s' if len(result.points) != 1 else ''}"
    meta = result.video_meta
    lines = [head, f"{len(result.points)} points in {frames_with} of the {n_seen} frames the model saw."]
    if meta and not meta.get("browser_playable", True):
        lines.append(f"The annotated video is MPEG-4 Part 2 ({meta['codec']}), which browsers may not play: "
                     "download it and open it in a video player.")
    if not result.points:
        lines.append("No points or tracks in the answer.")
    return "  \n".join(lines)
