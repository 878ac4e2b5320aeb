"""Molmo2 image, video and prompt preprocessing without torchvision (numpy, PIL and torch only).

It produces what transformers' `Molmo2Processor` produces (transformers 5.23, `models/molmo2/
processing_molmo2.py`, `image_processing_molmo2.py`, `video_processing_molmo2.py`): the same `input_ids`,
`attention_mask`, `mm_token_type_ids`, `pixel_values`, `image_token_pooling`, `image_grids`,
`image_num_crops` and, for a video, `pixel_values_videos`, `video_token_pooling`, `video_grids`; the parity
tests (`tests/test_molmo2_parity.py`) compare them tensor by tensor. transformers' own processors need
torchvision, whose PyPI wheel is a CUDA build that crashes next to the CPU torch of a fresh install.

Image path (one image):
  * global view: the whole image stretched to crop_size x crop_size (378 by default);
  * high-res view: `select_tiling` picks (th, tw) crops of `window = crop - margins` pixels, the image is
    stretched onto a `th*window + margins` x `tw*window + margins` canvas, and crop_size crops are cut with
    stride `window`; the margin patches on interior crop edges are dropped, so the stitched patch grid is
    exactly canvas / patch_size;
  * resizing is bilinear without antialias, done in float32 on the uint8 image and rounded/clamped back to
    uint8 (what transformers' torchvision backend does), then (x - 127.5) / 127.5 (mean = std = 0.5 after
    the fused 1/255 rescale);
  * crops are cut into 14x14 patches, `[n_crops, (crop/14)^2, 14*14*3]`, global crop first;
  * `image_token_pooling` groups patch indices into 2x2 windows (-1 pads odd edges, half before and half
    after), over the global view's grid and over the stitched high-res grid; `image_grids` =
    [lo_h, lo_w, hi_h, hi_w] pooled rows/columns.
Video path: frames sampled at most `num_frames` (64) at <= `max_fps` (2) per second, each frame only a global
view, pooled 3x3; each frame is written `"{t:.1f} <frame_start>...<frame_end>"`.
Prompt: the checkpoint's chat template (rendered the way transformers renders it), else `build_prompt`; the
image placeholders go before the first turn (`<|image|>`, or `Image 1<|image|>Image 2<|image|>...`, or
`<|video|>`), bos (`<|im_end|>` for Molmo2) is prepended, then every placeholder is replaced by its token string.

Deliberate differences (everything else is proven equal by the parity tests):
  * images are read by `molmo_core.preprocessing.load_image(alpha="white")`, which applies the EXIF orientation
    (as the app and Molmo v1 do) and then converts to RGB exactly as transformers does for PIL images
    (transparency composited onto white); transformers ignores EXIF orientation. Arrays are taken as
    channels-last (HxW, HxWx1, HxWx3, HxWx4 uint8) and treated like the PIL image they represent;
  * video frames are normalized even when the checkpoint's video config does not say do_rescale /
    do_normalize (transformers 5.23 then feeds raw 0-255 frames; see `VideoSettings`);
  * grey [T, H, W] videos are accepted (repeated to RGB).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import MolmoInputError
from ..preprocessing import load_image

IMAGE_TOKEN = "<|image|>"
VIDEO_TOKEN = "<|video|>"
# The tokens `mm_token_type_ids` marks as 1 (the order of `Molmo2Processor.image_token_ids`).
MM_TOKENS = ("<im_patch>", "<im_col>", "<im_start>", "<low_res_im_start>", "<frame_start>", "<im_end>",
             "<frame_end>", "<im_low>")
SPECIAL_STRINGS = (IMAGE_TOKEN, VIDEO_TOKEN) + MM_TOKENS
RESAMPLE_MODES = {2: "bilinear", 3: "bicubic"}  # PIL resample codes -> interpolate modes


# ----------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class ImageSettings:
    """`Molmo2ImageProcessor` parameters (class defaults; a checkpoint overrides them)."""
    crop_size: int = 378
    max_crops: int = 8
    overlap_margins: tuple[int, int] = (4, 4)
    patch_size: int = 14
    pooling_size: tuple[int, int] = (2, 2)
    resample: int = 2
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class VideoSettings:
    """`Molmo2VideoProcessor` parameters.

    One deliberate difference: transformers 5.23's Molmo2VideoProcessor has no class default for do_rescale /
    do_normalize, so a checkpoint whose video config does not set them gets raw 0-255 frames (uint8
    `pixel_values_videos`) fed to the ViT, which was trained on normalized pixels like the images. Here they
    default to True (frames normalized exactly like images); explicit values in the config are followed."""
    crop_size: int = 378
    patch_size: int = 14
    pooling_size: tuple[int, int] = (3, 3)
    resample: int = 2
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    num_frames: int | None = 64
    fps: float | None = None
    max_fps: float | None = 2
    do_sample_frames: bool = True


@dataclass(frozen=True)
class TokenSettings:
    """`Molmo2Processor` token-layout flags."""
    image_use_col_tokens: bool = True
    use_single_crop_col_tokens: bool | None = None
    use_single_crop_start_token: bool = True
    video_use_col_tokens: bool = False
    use_frame_special_tokens: bool = True


def _settings_from(cls, d: dict | None):
    """A settings dataclass from a processor config dict (unknown keys ignored, `size` -> crop_size)."""
    d = dict(d or {})
    kw: dict[str, Any] = {}
    size = d.pop("size", None)
    if size is not None:
        h, w = (size.get("height"), size.get("width")) if isinstance(size, dict) else (size, size)
        if h is None or w is None or h != w:
            raise ValueError(f"Molmo2 only supports a square size with height and width; got size={size}.")
        kw["crop_size"] = int(h)
    names = {f.name for f in fields(cls)}
    for k, v in d.items():
        if k in names and v is not None:
            kw[k] = tuple(v) if isinstance(v, list) else v
        elif k in names and k in ("use_single_crop_col_tokens", "fps", "num_frames", "max_fps"):
            kw[k] = None
    s = cls(**kw)
    if getattr(s, "resample", 2) not in RESAMPLE_MODES:
        raise ValueError(f"resample={s.resample} is not supported here (only bilinear=2 and bicubic=3).")
    return s


def read_processor_settings(path: str | Path) -> tuple[ImageSettings, VideoSettings, TokenSettings]:
    """The three settings from a checkpoint folder, found where transformers looks for them: the v5 layout
    (processor_config.json with nested "image_processor" / "video_processor"), else the legacy files
    (preprocessor_config.json; video_preprocessor_config.json, falling back to preprocessor_config.json as
    `Molmo2VideoProcessor.from_pretrained` does). Missing files give the class defaults."""
    path = Path(path)

    def read(name: str) -> dict | None:
        f = path / name
        return json.loads(f.read_text()) if f.is_file() else None

    proc = read("processor_config.json") or {}
    legacy_image = read("preprocessor_config.json")
    image = proc.get("image_processor", legacy_image)
    video = proc.get("video_processor") or read("video_preprocessor_config.json") or legacy_image
    tokens = {k: v for k, v in proc.items() if k not in ("image_processor", "video_processor")}
    return _settings_from(ImageSettings, image), _settings_from(VideoSettings, video), \
        _settings_from(TokenSettings, tokens)


# ----------------------------------------------------------------------------------------- geometry
def select_tiling(height: float, width: float, window: int, max_crops: int) -> tuple[int, int]:
    """(rows, cols) of crops: among tilings with rows*cols <= max_crops (ordered by count, then rows), the
    smallest one that covers the image without downscaling; if none does, the one that needs the least
    downscaling. Scales are computed in float32, as transformers does."""
    tilings = sorted(((h, w) for h in range(1, max_crops + 1) for w in range(1, max_crops + 1)
                      if h * w <= max_crops), key=lambda t: (t[0] * t[1], t[0]))
    sizes = np.array(tilings, dtype=np.float32) * np.float32(window)
    with np.errstate(divide="ignore", invalid="ignore"):  # images within the margins: as torch, inf / nan
        scale = (sizes / np.array([height, width], dtype=np.float32)).min(axis=1)
    if np.all(scale < 1):
        return tilings[int(np.argmax(scale))]
    return tilings[int(np.argmin(np.where(scale < 1, np.float32(10e9), scale)))]


@dataclass(frozen=True)
class CropGeometry:
    tiling: tuple[int, int]  # (rows, cols) of high-res crops
    canvas: tuple[int, int]  # (height, width) in pixels the image is stretched onto
    window: int  # crop stride in pixels


def crop_geometry(height: int, width: int, s: ImageSettings, max_crops: int | None = None) -> CropGeometry:
    left, right = s.overlap_margins
    window = (s.crop_size // s.patch_size - left - right) * s.patch_size
    margin = (left + right) * s.patch_size
    th, tw = select_tiling(height - margin, width - margin, window, max_crops or s.max_crops)
    return CropGeometry((th, tw), (th * window + margin, tw * window + margin), window)


def pool_windows(grid: np.ndarray, pool_h: int, pool_w: int) -> np.ndarray:
    """A [rows, cols] grid of patch indices -> [n_windows, pool_h*pool_w] indices, row-major windows; the grid
    is padded with -1 to a multiple of the window (the smaller half of the padding before, the rest after)."""
    rows, cols = grid.shape
    pad_h, pad_w = -rows % pool_h, -cols % pool_w
    g = np.pad(grid, ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2)), constant_values=-1)
    nr, nc = g.shape[0] // pool_h, g.shape[1] // pool_w
    return g.reshape(nr, pool_h, nc, pool_w).transpose(0, 2, 1, 3).reshape(nr * nc, pool_h * pool_w)


def stitched_patch_grid(tiling: tuple[int, int], crop_patches: int, margins: tuple[int, int]) -> np.ndarray:
    """Indices (into the high-res crops' flattened patches) of the patches that make up the stitched grid:
    every crop keeps its patches except the margins on edges shared with a neighbouring crop."""
    th, tw = tiling
    left, right = margins

    def kept(i: int, n: int) -> np.ndarray:  # patch rows (or columns) crop i keeps along one axis
        return np.arange(left if i > 0 else 0, crop_patches - (right if i < n - 1 else 0))

    rows = []
    for i in range(th):
        r = kept(i, th)
        blocks = [(i * tw + j) * crop_patches ** 2 + r[:, None] * crop_patches + kept(j, tw)[None, :]
                  for j in range(tw)]
        rows.append(np.concatenate(blocks, axis=1))
    return np.concatenate(rows, axis=0).astype(np.int32)


# ----------------------------------------------------------------------------------------- pixels
def resize_normalize(images: torch.Tensor, height: int, width: int, s: ImageSettings | VideoSettings) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> float32 [N, 3, height, width]: resized in float32 without antialias, rounded and
    clamped back to uint8 values, then rescaled and normalised (fused, as transformers does)."""
    x = images
    if tuple(x.shape[-2:]) != (height, width):
        x = F.interpolate(x.float(), size=[height, width], mode=RESAMPLE_MODES[s.resample], align_corners=False,
                          antialias=False)
        x = x.round_().clamp_(0, 255)
    x = x.to(torch.float32)
    if s.do_rescale and s.do_normalize:
        mean = torch.tensor(s.image_mean) * (1.0 / s.rescale_factor)
        std = torch.tensor(s.image_std) * (1.0 / s.rescale_factor)
        return x.sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))
    if s.do_normalize:
        return x.sub_(torch.tensor(s.image_mean).view(-1, 1, 1)).div_(torch.tensor(s.image_std).view(-1, 1, 1))
    if s.do_rescale:
        return x * s.rescale_factor
    return x


def patch_view(images: torch.Tensor, patch: int) -> torch.Tensor:
    """A view of [..., C, S, S] images as [..., S/patch, S/patch, patch, patch, C]: patches row-major, each patch
    (y, x, channel). Copying it into a [..., (S/patch)^2, patch*patch*C] tensor is the only copy patchifying
    needs."""
    *lead, c, h, w = images.shape
    x = images.reshape(*lead, c, h // patch, patch, w // patch, patch)
    k = len(lead)
    return x.permute(*range(k), k + 1, k + 3, k + 2, k + 4, k)


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[N, C, S, S] -> [N, (S/patch)^2, patch*patch*C]."""
    n, c, h, w = images.shape
    out = torch.empty((n, (h // patch) * (w // patch), patch * patch * c), dtype=images.dtype)
    out.view(n, h // patch, w // patch, patch, patch, c).copy_(patch_view(images, patch))
    return out


@dataclass
class ImageFeatures:
    """One image: crops as patches (global first), its pooling indices (into its own patches) and grid."""
    patches: torch.Tensor  # float32 [n_crops, patches_per_crop, patch*patch*3]
    pooling: np.ndarray  # int32 [n_tokens, pool_h*pool_w]
    grid: tuple[int, int, int, int]  # (lo_h, lo_w, hi_h, hi_w)


def image_features(rgb: np.ndarray, s: ImageSettings, max_crops: int | None = None) -> ImageFeatures:
    """An RGB uint8 [H, W, 3] image -> its crops, pooling indices and grid."""
    h, w = rgb.shape[:2]
    rgb = rgb if rgb.flags.writeable else rgb.copy()
    img = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).contiguous()[None]
    geo = crop_geometry(h, w, s, max_crops)
    (th, tw), (ch, cw), step = geo.tiling, geo.canvas, geo.window
    cp, p = s.crop_size // s.patch_size, s.patch_size
    patches = torch.empty((1 + th * tw, cp * cp, p * p * 3))
    small = resize_normalize(img, s.crop_size, s.crop_size, s)[0]
    patches[0].view(cp, cp, p, p, 3).copy_(patch_view(small, p))
    canvas = resize_normalize(img, ch, cw, s)[0]
    # [3, th, tw, crop, crop]: the overlapping crops as a view of the canvas, copied once into the patches
    crops = canvas.unfold(1, s.crop_size, step).unfold(2, s.crop_size, step)
    patches[1:].view(th, tw, cp, cp, p, p, 3).copy_(patch_view(crops.permute(1, 2, 0, 3, 4), p))

    pool_h, pool_w = s.pooling_size
    lo = pool_windows(np.arange(cp * cp, dtype=np.int32).reshape(cp, cp), pool_h, pool_w)
    hi_grid = stitched_patch_grid((th, tw), cp, s.overlap_margins)
    hi = pool_windows(hi_grid, pool_h, pool_w)
    hi = np.where(hi >= 0, hi + cp * cp, -1)  # after the global crop's patches
    grid = (-(-cp // pool_h), -(-cp // pool_w), -(-hi_grid.shape[0] // pool_h), -(-hi_grid.shape[1] // pool_w))
    return ImageFeatures(patches, np.concatenate([lo, hi]).astype(np.int32), grid)


def image_string(grid: Sequence[int], t: TokenSettings = TokenSettings()) -> str:
    """The tokens that replace `<|image|>` (`Molmo2Processor.replace_image_token`)."""
    lo_h, lo_w, hi_h, hi_w = (int(v) for v in grid)
    col = ["<im_col>"] if t.image_use_col_tokens else []
    lo_col = col if t.use_single_crop_col_tokens is None else (["<im_col>"] if t.use_single_crop_col_tokens else [])
    start = "<low_res_im_start>" if t.use_single_crop_start_token else "<im_start>"
    low = [start] + (["<im_patch>"] * lo_w + lo_col) * lo_h + ["<im_end>"]
    high = ["<im_start>"] + (["<im_patch>"] * hi_w + col) * hi_h + ["<im_end>"]
    return "".join(low + high)


# ----------------------------------------------------------------------------------------- video
@dataclass
class Video:
    """A decoded video: uint8 frames [T, H, W, 3] (or [T, H, W] grey) and their rate in frames per second."""
    frames: np.ndarray
    fps: float


def as_video(video) -> Video:
    """A `Video`, a {"frames", "fps"} dict or a (frames, fps) pair -> a checked `Video`.

    Raises:
        MolmoInputError: not uint8, not [T, H, W, 3] / [T, H, W], no frames, or fps not positive.
    """
    if isinstance(video, dict):
        video = Video(video.get("frames"), video.get("fps"))
    elif isinstance(video, (tuple, list)) and len(video) == 2:
        video = Video(*video)
    if not isinstance(video, Video):
        raise MolmoInputError(f"Unsupported video input of type {type(video).__name__}; expected "
                              "molmo_core.molmo2.Video(frames, fps) with uint8 frames [T, H, W, 3].")
    frames = np.asarray(video.frames)
    if frames.dtype != np.uint8:
        raise MolmoInputError(f"Video frames must be uint8; got {frames.dtype}.")
    if frames.ndim == 3:
        frames = np.repeat(frames[..., None], 3, axis=-1)
    if frames.ndim != 4 or frames.shape[-1] != 3 or min(frames.shape[:3]) < 1:
        raise MolmoInputError(f"Video frames must be uint8 [T, H, W, 3] with T, H, W >= 1; got {frames.shape}.")
    try:
        fps = float(video.fps)
    except (TypeError, ValueError):
        fps = float("nan")
    if not math.isfinite(fps) or fps <= 0:
        raise MolmoInputError(f"The video's frame rate must be a positive number; got {video.fps!r}.")
    return Video(frames, fps)


def sample_frame_indices(total: int, fps: float, s: VideoSettings) -> torch.Tensor:
    """Indices of the frames kept (`Molmo2VideoProcessor.sample_frames`): `num_frames` at most, and at most
    `max_fps` per second of video; evenly spaced from frame 0 (a float step, truncated)."""
    duration = total / fps
    if s.fps is not None:
        target = int(duration * s.fps)
    else:
        target = s.num_frames if s.num_frames is not None else total
        if s.max_fps is not None and fps > s.max_fps:
            target = min(target, int(duration * s.max_fps))
    target = max(min(target, total), 1)
    return torch.arange(0, total, total / target).int()


@dataclass
class VideoFeatures:
    patches: torch.Tensor  # float32 [n_frames, patches_per_frame, patch*patch*3]
    pooling: np.ndarray  # int32 [n_frames * tokens_per_frame, pool_h*pool_w]
    grid: tuple[int, int, int]  # (n_frames, rows, cols)
    timestamps: list[float]  # seconds, float32 values as transformers computes them


def video_features(video: Video, s: VideoSettings) -> VideoFeatures:
    if s.num_frames is not None and s.fps is not None:
        raise ValueError("num_frames and fps are mutually exclusive in the video processor config.")
    total = len(video.frames)
    if s.do_sample_frames:
        idx = sample_frame_indices(total, video.fps, s)
        frames = video.frames[idx.numpy()]
        # int32 index / fps -> float32, as transformers computes the timestamps it prints
        stamps = [float(t) for t in (idx / video.fps)]
    else:
        frames = video.frames
        stamps = [float(t) for t in torch.arange(total) / video.fps]
    frames = frames if frames.flags.writeable else frames.copy()
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).contiguous()
    patches = patchify(resize_normalize(x, s.crop_size, s.crop_size, s), s.patch_size)
    cp = s.crop_size // s.patch_size
    per_frame = pool_windows(np.arange(cp * cp, dtype=np.int32).reshape(cp, cp), *s.pooling_size)
    n = len(frames)
    offsets = (np.arange(n, dtype=np.int32) * cp * cp)[:, None, None]
    pooling = np.where(per_frame[None] >= 0, per_frame[None] + offsets, -1).reshape(-1, per_frame.shape[1])
    rows, cols = -(-cp // s.pooling_size[0]), -(-cp // s.pooling_size[1])
    return VideoFeatures(patches, pooling.astype(np.int32), (n, rows, cols), stamps)


def video_string(grid: Sequence[int], timestamps: Sequence[float], t: TokenSettings = TokenSettings()) -> str:
    """The tokens that replace `<|video|>` (`Molmo2Processor.get_video_string`)."""
    _, rows, cols = (int(v) for v in grid)
    start, end = ("<frame_start>", "<frame_end>") if t.use_frame_special_tokens else ("<im_start>", "<im_end>")
    row = "<im_patch>" * cols + ("<im_col>" if t.video_use_col_tokens else "")
    frame = start + row * rows + end
    return " ".join(f"{stamp:.1f} {frame}" for stamp in timestamps)


# ----------------------------------------------------------------------------------------- prompt
def conversation(prompt: str, history: Sequence[tuple[str, str]] = (), n_images: int = 0,
                 video: bool = False) -> list[dict]:
    """Chat messages in transformers' format: the earlier (question, answer) turns, then `prompt`; the
    images / video are attached to the first user turn (the template puts their placeholders first anyway)."""
    media = [{"type": "image"}] * n_images + ([{"type": "video"}] if video else [])
    messages: list[dict] = []
    for q, a in history:
        messages += [{"role": "user", "content": [{"type": "text", "text": q}]},
                     {"role": "assistant", "content": [{"type": "text", "text": a}]}]
    messages.append({"role": "user", "content": [{"type": "text", "text": prompt}]})
    messages[0] = {"role": "user", "content": media + messages[0]["content"]}
    return messages


def build_prompt(prompt: str, history: Sequence[tuple[str, str]] = (), n_images: int = 0,
                 video: bool = False) -> str:
    """The prompt the released Molmo2 chat template renders, without Jinja (used when a checkpoint ships no
    template): placeholders, then `<|im_start|>user\\n{q}<|im_end|>\\n`, answers from the history as
    ` <|im_start|>assistant\\n{a}` (the released template writes that leading space), `<|im_end|>\\n` before
    every later user turn, and `<|im_start|>assistant\\n` to generate."""
    if n_images == 1:
        out = IMAGE_TOKEN
    else:
        out = "".join(f"Image {i + 1}{IMAGE_TOKEN}" for i in range(n_images))
    out += VIDEO_TOKEN if video else ""
    turns = [(q, a) for q, a in history] + [(prompt, None)]
    for k, (q, a) in enumerate(turns):
        out += ("<|im_end|>\n" if k else "") + f"<|im_start|>user\n{q}<|im_end|>\n"
        if a is not None:
            out += f" <|im_start|>assistant\n{a}"
    return out + "<|im_start|>assistant\n"


def raw_prompt(prompt: str, n_images: int = 0, video: bool = False) -> str:
    """template="none": the placeholders and the prompt verbatim, no chat turn markers."""
    return build_prompt("", (), n_images, video).split("<|im_start|>")[0] + prompt


# ----------------------------------------------------------------------------------------- processor
def _as_list(images) -> list:
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


@dataclass
class Molmo2Inputs:
    """The model inputs (batch of one) plus what the caller may want to know about them."""
    tensors: dict[str, torch.Tensor]
    text: str  # the expanded prompt that was tokenized
    prompt: str = ""  # the same before the placeholders were expanded (bos + rendered chat template)
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # (W, H) per image, as the model saw it
    timestamps: list[float] = field(default_factory=list)  # of the video frames used

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def keys(self):
        return self.tensors.keys()

    @property
    def length(self) -> int:
        return int(self.tensors["input_ids"].shape[1])


class Molmo2Preprocessor:
    """`preprocessor(prompt, images=..., video=...) -> Molmo2Inputs`, equal to transformers' Molmo2Processor.

    Args:
        tokenizer: the checkpoint's transformers tokenizer (tokenization itself is transformers').
        chat_template: the checkpoint's Jinja chat template; None uses `build_prompt`.
        max_length: longest accepted input in tokens (the model's context), or None.
    """

    def __init__(self, tokenizer, image: ImageSettings = ImageSettings(), video: VideoSettings = VideoSettings(),
                 tokens: TokenSettings = TokenSettings(), chat_template: str | None = None,
                 max_length: int | None = None):
        self.tokenizer = tokenizer
        self.image = image
        self.video = video
        self.tokens = tokens
        self.chat_template = chat_template
        self.max_length = max_length
        self.bos = tokenizer.bos_token or tokenizer.eos_token
        ids = tokenizer.convert_tokens_to_ids(list(MM_TOKENS) + [IMAGE_TOKEN, VIDEO_TOKEN])
        unk = getattr(tokenizer, "unk_token_id", None)
        missing = [t for t, i in zip(list(MM_TOKENS) + [IMAGE_TOKEN, VIDEO_TOKEN], ids) if i is None or i == unk]
        if missing:
            raise ValueError(f"The tokenizer lacks Molmo2's image tokens {missing}; is this a Molmo2 tokenizer?")
        self.mm_token_ids = np.array(ids[:len(MM_TOKENS)])
        self.video_token_id = ids[-1]

    @classmethod
    def from_pretrained(cls, path: str | Path, tokenizer=None, max_length: int | None = None) -> "Molmo2Preprocessor":
        """Settings, tokenizer and chat template from a checkpoint folder (no remote code, no torchvision)."""
        path = Path(path)
        image, video, tokens = read_processor_settings(path)
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        return cls(tokenizer, image, video, tokens, read_chat_template(path, tokenizer), max_length)

    # ---------------------------------------------------------------- pieces
    def render(self, messages: list[dict]) -> str:
        """The chat template applied to `messages` with a generation prompt, as transformers renders it."""
        from transformers.utils.chat_template_utils import render_jinja_template

        prompts, _ = render_jinja_template(conversations=[messages], chat_template=self.chat_template,
                                           add_generation_prompt=True, **self.tokenizer.special_tokens_map)
        return prompts[0]

    def prompt_text(self, prompt: str, history: Sequence[tuple[str, str]] = (), n_images: int = 0,
                    video: bool = False, template: str = "role") -> str:
        if template == "none":
            if history:
                raise MolmoInputError("A prompt without the chat template cannot carry chat history.")
            return raw_prompt(prompt, n_images, video)
        if template != "role":
            raise ValueError(f"template must be 'role' or 'none'; got {template!r}")
        if self.chat_template:
            return self.render(conversation(prompt, history, n_images, video))
        return build_prompt(prompt, history, n_images, video)

    def process_images(self, images: Sequence, max_crops: int | None = None
                       ) -> tuple[dict[str, torch.Tensor], list[str], list]:
        """Images -> (image tensors, the token string of each image, each image's (W, H))."""
        feats, sizes = [], []
        for image in images:
            rgb = load_image(image, alpha="white")
            sizes.append((rgb.shape[1], rgb.shape[0]))
            feats.append(image_features(rgb, self.image, max_crops))
        offset, pooled = 0, []
        for f in feats:
            pooled.append(np.where(f.pooling >= 0, f.pooling + offset, -1))
            offset += f.patches.shape[0] * f.patches.shape[1]
        tensors = {
            "pixel_values": feats[0].patches if len(feats) == 1 else torch.cat([f.patches for f in feats]),
            "image_token_pooling": torch.from_numpy(np.concatenate(pooled).astype(np.int32)),
            "image_grids": torch.tensor([f.grid for f in feats], dtype=torch.int64),
            "image_num_crops": torch.tensor([f.patches.shape[0] for f in feats], dtype=torch.int64),
        }
        return tensors, [image_string(f.grid, self.tokens) for f in feats], sizes

    def process_video(self, video) -> tuple[dict[str, torch.Tensor], str, list[float]]:
        f = video_features(as_video(video), self.video)
        tensors = {
            "pixel_values_videos": f.patches,
            "video_token_pooling": torch.from_numpy(f.pooling.astype(np.int64)),  # int64, as transformers
            "video_grids": torch.tensor([f.grid], dtype=torch.int64),
        }
        return tensors, video_string(f.grid, f.timestamps, self.tokens), f.timestamps

    # ---------------------------------------------------------------- all together
    def __call__(self, prompt: str, images=None, video=None, history: Sequence[tuple[str, str]] = (),
                 max_crops: int | None = None, template: str = "role") -> Molmo2Inputs:
        """Model inputs for one request.

        Args:
            prompt: the user's text.
            images: None, one image, or a list of images (PIL, uint8 array, path or bytes).
            video: None or a `Video` (uint8 frames + fps); not together with images.
            history: earlier (question, answer) turns of the conversation.
            max_crops: overrides the checkpoint's max_crops for the high-res view.
            template: "role" (the chat template) or "none" (placeholders + prompt verbatim).

        Raises:
            MolmoInputError: an empty prompt, special tokens typed into the text, images together with a
                video, an unreadable image or video, or an input longer than `max_length`.
        """
        if not isinstance(prompt, str) or (not prompt.strip() and template != "none"):
            raise MolmoInputError("The prompt is empty; type a question or an instruction.")
        history = [(str(q), str(a)) for q, a in history]
        for text in [prompt] + [s for turn in history for s in turn]:
            bad = [t for t in SPECIAL_STRINGS if t in text]
            if bad:
                raise MolmoInputError(f"The text contains the model's reserved token(s) {', '.join(bad)}; "
                                      "remove them.")
        images = _as_list(images)
        if images and video is not None:
            raise MolmoInputError("Molmo2 takes either images or one video per request, not both.")
        if max_crops is not None and int(max_crops) < 1:
            raise MolmoInputError(f"max_crops must be >= 1, got {max_crops}.")
        text = self.prompt_text(prompt, history, len(images), video is not None, template)

        tensors: dict[str, torch.Tensor] = {}
        replacements: list[str] = []
        sizes: list = []
        stamps: list[float] = []
        if images:
            t, replacements, sizes = self.process_images(images, max_crops)
            tensors.update(t)
        elif video is not None:
            t, vstring, stamps = self.process_video(video)
            tensors.update(t)
            replacements = [vstring]
        placeholder = VIDEO_TOKEN if video is not None else IMAGE_TOKEN
        if text.count(placeholder) != len(replacements):
            raise ValueError(f"The chat template wrote {text.count(placeholder)} {placeholder} placeholder(s) for "
                             f"{len(replacements)} input(s).")
        # as apply_chat_template: no special tokens added when the template wrote the bos itself
        bos_token = self.tokenizer.bos_token
        add_special = not (template != "none" and bos_token is not None and text.startswith(bos_token))
        if self.bos and not text.startswith(self.bos):
            text = self.bos + text
        parts = text.split(placeholder)
        expanded = parts[0] + "".join(r + p for r, p in zip(replacements, parts[1:]))

        enc = self.tokenizer(expanded, add_special_tokens=add_special)
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        if self.max_length is not None and len(ids) > self.max_length:
            raise MolmoInputError(
                f"The input is {len(ids)} tokens long; this model's context holds {self.max_length}. "
                "Shorten the prompt or the conversation, use fewer or smaller images, or lower max crops.")
        mm = np.where(np.isin(ids, self.mm_token_ids), 1, 0)
        mm[ids == self.video_token_id] = 2
        out = {"input_ids": torch.from_numpy(ids)[None],
               "attention_mask": torch.tensor(enc["attention_mask"], dtype=torch.int64)[None],
               "mm_token_type_ids": torch.from_numpy(mm.astype(np.int64))[None]}
        out.update(tensors)
        return Molmo2Inputs(out, expanded, text, sizes, stamps)


def batch_images(examples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The image tensors of several single-example inputs as one batch, as transformers' processor batches
    them: crops concatenated in order, pooling indices shifted past the earlier examples' patches ({} when no
    example has an image)."""
    imgs = [e for e in examples if "pixel_values" in e]
    if not imgs:
        return {}
    pooled, offset = [], 0
    for e in imgs:
        p = e["image_token_pooling"]
        pooled.append(torch.where(p >= 0, p + offset, p))
        offset += e["pixel_values"].shape[0] * e["pixel_values"].shape[1]
    return dict(pixel_values=torch.cat([e["pixel_values"] for e in imgs]), image_token_pooling=torch.cat(pooled),
                image_grids=torch.cat([e["image_grids"] for e in imgs]),
                image_num_crops=torch.cat([e["image_num_crops"] for e in imgs]))


def read_chat_template(path: Path, tokenizer=None) -> str | None:
    """The checkpoint's chat template: chat_template.jinja, else chat_template.json / the processor or
    tokenizer config's "chat_template", else what the tokenizer loaded; None when there is none."""
    f = path / "chat_template.jinja"
    if f.is_file():
        return f.read_text()
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        g = path / name
        if g.is_file():
            t = json.loads(g.read_text()).get("chat_template")
            if isinstance(t, str) and t:
                return t
    t = getattr(tokenizer, "chat_template", None)
    return t if isinstance(t, str) and t else None
