"""Image -> overlapping crops, patch masks, token layout and prompt ids, as the official processor does it.

The official processor is the `trust_remote_code` file `image_preprocessing_molmo.py` of the allenai
checkpoints (TensorFlow resize for the dense models, torchvision for MolmoE); docs/design.md summarises
what is reproduced and why. All sizes below follow from `CropLayout` (336-px crops, 14-px patches,
4-patch overlap margins, 2x2 pooling); the numbers are those defaults. Pipeline for one image:
  1. choose a tiling rows x cols (<= max_crops) for the image minus the 112-px overlap margin;
  2. aspect-preserving antialiased bilinear resize into (rows*224+112, cols*224+112), centred zero pad,
     CLIP-normalise; cut rows*cols overlapping 336x336 crops with stride 224;
  3. a 336x336 global view of the whole image goes first;
  4. per-patch validity fractions, with the official one-row shift (reproduced on purpose);
  5. token block: global `<im_start>` 12 x (12 `<im_patch>` `<im_col>`) `<im_end>`, then the high-res
     block over the (8*rows+4) x (8*cols+4) pooled grid, then " User: {prompt} Assistant:".
"""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

from .errors import MolmoInputError
from .resize import resize_tf_antialias, resize_torch_antialias

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
EXTRA_TOKENS = ("<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<|image|>")

# Refuse images whose decoded size would be absurd before allocating them (the official crops never use
# more than ~1.5 Mpx of the image anyway). 20000x20000 = 4e8 px is refused; a 12000x8000 photo passes.
MAX_IMAGE_PIXELS = 100_000_000
MAX_FILE_BYTES = 200 * 1024 * 1024

ALPHA_MODES = ("drop", "white")


@dataclass(frozen=True)
class CropLayout:
    """Crop and image-token geometry, all derived from four numbers (the checkpoint's
    `preprocessor_config.json`: base_image_input_size, image_patch_size, overlap_margins; the 2x2 pooling).

    With the defaults a crop is 24x24 patches, pooled to 12x12 tokens; its 16-patch (224 px) window sits
    between 4-patch margins (112 px in all), i.e. 8 pooled tokens of window and 2 of margin per side.
    """

    crop_size: int = 336
    patch: int = 14
    margin: int = 4  # overlap margin in patches, left/top and right/bottom
    pool: int = 2

    def __post_init__(self) -> None:
        if self.crop_size % self.patch or self.patches % self.pool or self.margin % self.pool \
                or self.window_patches <= 0:
            raise ValueError(f"Inconsistent crop layout {self}: the crop must be whole patches, the patches and "
                             "the margin whole pooling cells, and the window (crop minus margins) positive.")

    @property
    def patches(self) -> int:
        """Patches per crop side (24)."""
        return self.crop_size // self.patch

    @property
    def tokens(self) -> int:
        """Pooled tokens per crop side (12)."""
        return self.patches // self.pool

    @property
    def window_patches(self) -> int:
        """Patches per crop side that no neighbouring crop overlaps (16)."""
        return self.patches - 2 * self.margin

    @property
    def window(self) -> int:
        """Crop stride in pixels (224)."""
        return self.window_patches * self.patch

    @property
    def margin_px(self) -> int:
        """Both margins of a crop side in pixels (112)."""
        return 2 * self.margin * self.patch

    @property
    def window_tokens(self) -> int:
        return self.window_patches // self.pool  # 8

    @property
    def margin_tokens(self) -> int:
        return self.margin // self.pool  # 2

    def select_tiling(self, h: int, w: int, max_crops: int) -> tuple[int, int]:
        """rows x cols for an h x w image (`select_tiling` on the image minus the margins)."""
        return select_tiling(h - self.margin_px, w - self.margin_px, self.window, max_crops)

    def grid(self, rows: int, cols: int) -> tuple[int, int]:
        """The high-res view's pooled grid R x C: every crop keeps its window, the outer crops their outer
        margins too ((8 rows + 4) x (8 cols + 4))."""
        return (rows * self.window_tokens + 2 * self.margin_tokens,
                cols * self.window_tokens + 2 * self.margin_tokens)

    @property
    def global_block(self) -> int:
        """Tokens of the global view: `<im_start>`, tokens x (tokens `<im_patch>` + `<im_col>`), `<im_end>` (158)."""
        return 2 + self.tokens * (self.tokens + 1)

    def image_tokens(self, rows: int, cols: int) -> int:
        """Tokens of one image: the global block plus `<im_start>`, R x (C `<im_patch>` + `<im_col>`),
        `<im_end>` (160 + (8 rows + 4)(8 cols + 5))."""
        R, C = self.grid(rows, cols)
        return self.global_block + 2 + R * (C + 1)


# ----------------------------------------------------------------------------------------- image input
def load_image(image, *, max_pixels: int = MAX_IMAGE_PIXELS, alpha: str = "drop") -> np.ndarray:
    """Any accepted image input -> uint8 RGB array [H, W, 3]. The one place images become RGB, for the
    core and the app alike.

    Accepts a PIL image, a numpy array (HxW, HxWx1, HxWx3, HxWx4 uint8) or a path / bytes. EXIF orientation
    is applied (as the training loader does); grayscale is replicated to three channels.

    Args:
        alpha: what happens to transparency (RGBA / LA / PA images, P images with a transparent colour,
            HxWx4 arrays):
            "drop" (the default): the later official processor's `Image.convert("RGB")`: alpha is discarded
                without compositing, so fully transparent pixels show whatever colour they store (often
                black). The parity vectors were made this way; molmo_core's API uses it.
            "white": composite on a white background first, as the Molmo-7B-D model card advises for
                transparent images. The app uses this (`app.service.prepare_image`), so the same RGBA file
                can get a different answer there than through `molmo_core.load(...).generate`.

    Raises:
        MolmoInputError: the file is empty, not an image, or larger than `max_pixels`.
    """
    if alpha not in ALPHA_MODES:
        raise ValueError(f"alpha must be one of {ALPHA_MODES}; got {alpha!r}")
    if isinstance(image, np.ndarray):
        image = _array_to_pil(image, max_pixels)
    if isinstance(image, (str, os.PathLike)):
        image = open_image_file(image, max_pixels)
    elif isinstance(image, (bytes, bytearray)):
        if len(image) == 0:
            raise MolmoInputError("The image is empty (0 bytes); upload a JPEG or PNG.")
        image = open_image(io.BytesIO(image), "upload", max_pixels)
    if isinstance(image, Image.Image):
        w, h = image.size
        check_pixels(w, h, max_pixels)
        if w < 1 or h < 1:
            raise MolmoInputError(f"The image has size {w}x{h}; expected at least 1x1 pixels.")
        try:
            image = ImageOps.exif_transpose(image)
            if alpha == "white" and has_alpha(image):
                rgba = image.convert("RGBA")
                image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
            if image.mode != "RGB":
                image = image.convert("RGB")
            arr = np.asarray(image, dtype=np.uint8)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise MolmoInputError(f"Could not decode the image ({e}); upload a valid JPEG or PNG.") from e
        return np.ascontiguousarray(arr)
    raise MolmoInputError(f"Unsupported image input of type {type(image).__name__}; "
                          "expected a PIL image, a uint8 array or a file path.")


def has_alpha(image: Image.Image) -> bool:
    """Whether a PIL image carries transparency (an alpha band or a transparent palette colour)."""
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def _array_to_pil(image: np.ndarray, max_pixels: int) -> Image.Image:
    """A uint8 HxW / HxWx1 / HxWx3 / HxWx4 array as a PIL image (L, RGB or RGBA), sizes checked first."""
    if image.dtype != np.uint8:
        raise MolmoInputError(f"Image arrays must be uint8; got {image.dtype}. Convert with "
                              "`(x * 255).round().astype(np.uint8)` for floats in [0, 1].")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
        raise MolmoInputError(f"Image arrays must be uint8 HxW, HxWx1, HxWx3 or HxWx4; got shape {image.shape}.")
    check_pixels(image.shape[1], image.shape[0], max_pixels)
    return Image.fromarray(np.ascontiguousarray(image))


def check_pixels(w: int, h: int, max_pixels: int) -> None:
    if w * h > max_pixels:
        raise MolmoInputError(
            f"The image is {w}x{h} = {w * h / 1e6:.0f} megapixels; the limit is {max_pixels / 1e6:.0f} "
            "megapixels. Downscale it first (Molmo sees at most ~1.5 megapixels anyway).")


def open_image_file(path: str | os.PathLike, max_pixels: int) -> Image.Image:
    """`open_image` for a file on disk, refusing a missing, empty or oversized file first."""
    path = Path(path)
    if not path.is_file():
        raise MolmoInputError(f"Image file not found: {path}")
    size = path.stat().st_size
    if size == 0:
        raise MolmoInputError(f"The image file {path.name} is empty (0 bytes); upload a JPEG or PNG.")
    if size > MAX_FILE_BYTES:
        raise MolmoInputError(f"The image file {path.name} is {size / 2**20:.0f} MB; the limit is "
                              f"{MAX_FILE_BYTES // 2**20} MB. Resize it first.")
    return open_image(path, path.name, max_pixels)


def open_image(fp, name: str, max_pixels: int) -> Image.Image:
    """Open and decode an image file, checking its header's size against `max_pixels` before decoding.

    Raises:
        MolmoInputError: not an image, truncated or corrupt, or over the pixel limit.
    """
    try:
        img = Image.open(fp)
    except Image.DecompressionBombError as e:  # PIL's own guard (over 2x its limit) fires inside open()
        found = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(found.group(1)) / 1e6:.0f} megapixels" if found else "too large for PIL to open"
        raise MolmoInputError(f"{name} is {size}; the limit is {max_pixels / 1e6:.0f} megapixels. "
                              "Downscale it first (Molmo sees at most ~1.5 megapixels anyway).") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise MolmoInputError(f"{name} is not a readable image ({type(e).__name__}: {e}); "
                              "upload a JPEG, PNG, WebP or GIF file.") from None
    check_pixels(*img.size, max_pixels)  # header only: nothing decoded yet
    try:
        img.load()
    except (OSError, ValueError, SyntaxError) as e:
        raise MolmoInputError(f"{name} could not be decoded ({e}); it may be truncated or corrupt. "
                              "Upload a valid JPEG or PNG.") from None
    return img


# ----------------------------------------------------------------------------------------- geometry
def select_tiling(h: float, w: float, window: int, max_crops: int) -> tuple[int, int]:
    """Pick rows x cols as the official processor does (h, w are the image size minus the margin).

    Candidates (i, j) with i*j <= max_crops, sorted by (i*j, i). If no candidate covers the image
    (every scale < 1) take the largest scale; otherwise the smallest scale >= 1 (first on ties).
    Sides <= 112 px give negative sizes and degenerate to (1, 1), exactly like the original.
    """
    tilings = sorted(((i, j) for i in range(1, max_crops + 1) for j in range(1, max_crops + 1)
                      if i * j <= max_crops), key=lambda t: (t[0] * t[1], t[0]))
    cand = np.array(tilings, dtype=np.int32)  # [n, 2]
    original = np.array([h, w], dtype=np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.min((cand * window).astype(np.float32) / original, axis=-1)  # [n]
    if np.all(scale < 1):
        ix = int(np.argmax(scale))
    else:
        ix = int(np.argmin(np.where(scale < 1.0, 1e10, scale)))
    return int(cand[ix, 0]), int(cand[ix, 1])


def resized_size(h: int, w: int, out_h: int, out_w: int) -> tuple[int, int]:
    """The size an h x w image is resized to inside out_h x out_w: aspect kept, float32 scale, truncated
    (the official `resize_and_pad`). A side can truncate to 0 for extreme aspect ratios."""
    scale = min(np.float32(out_h) / np.float32(h), np.float32(out_w) / np.float32(w))
    return int(np.float32(h) * scale), int(np.float32(w) * scale)


def check_resizable(h: int, w: int, layout: "CropLayout") -> None:
    """Refuse an image whose shorter side would shrink to 0 pixels in the global view.

    The global view (crop_size x crop_size) is the smallest resize target, so it is the one that fails
    first: the official preprocessing then asks TensorFlow / torchvision for a 0-pixel resize and fails
    with an internal error. We refuse it up front, saying the size found and the minimum.

    Raises:
        MolmoInputError: naming the size, the minimum shorter side for this longer side and the fix.
    """
    if min(resized_size(h, w, layout.crop_size, layout.crop_size)) >= 1:
        return
    long_side, short_side = max(h, w), min(h, w)
    need = -(-long_side // layout.crop_size)  # ceil(long / crop); float32 rounding may want one more
    while min(resized_size(need, long_side, layout.crop_size, layout.crop_size)) < 1:
        need += 1
    shape = "thin" if w < h else "flat"
    raise MolmoInputError(
        f"The image is {w}x{h} pixels: too {shape} for Molmo. Its {layout.crop_size}x{layout.crop_size} "
        f"overview would shrink the {short_side}-px side to 0 pixels (the official preprocessing fails on it "
        f"too). With a {long_side}-px side the other side must be at least {need} px (aspect ratio at most "
        f"about 1:{layout.crop_size}); crop the image or pad it to a less extreme shape.")


def resize_and_pad(image: np.ndarray, out_h: int, out_w: int, resize: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [H, W, 3] -> float32 [out_h, out_w, 3] in [0, 1], centred zero pad, plus the bool mask."""
    sh, sw = resized_size(*image.shape[:2], out_h, out_w)
    x = image.astype(np.float32) * np.float32(1.0 / 255.0) if resize == "tf" else image.astype(np.float32) / 255.0
    if resize == "tf":
        x = resize_tf_antialias(x, sh, sw)
    else:
        x = resize_torch_antialias(x, sh, sw)
    x = np.clip(x, 0.0, 1.0)
    top, left = (out_h - sh) // 2, (out_w - sw) // 2
    pad = ((top, out_h - sh - top), (left, out_w - sw - left))
    mask = np.pad(np.ones((sh, sw), dtype=bool), pad)
    x = np.pad(x, pad + ((0, 0),), constant_values=0.0)
    return x, mask


def normalize(x: np.ndarray) -> np.ndarray:
    return ((x - np.array(CLIP_MEAN)) / np.array(CLIP_STD)).astype(np.float32)


def to_patches(x: np.ndarray, patch: int) -> np.ndarray:
    """[..., H, W, C] -> [..., (H/p)*(W/p), p*p*C], patches row-major, each flattened (dy, dx, c)."""
    *lead, H, W, C = x.shape
    x = x.reshape(*lead, H // patch, patch, W // patch, patch, C)
    x = np.moveaxis(x, -3, -4)  # [..., h, w, dy, dx, C]
    return x.reshape(*lead, (H // patch) * (W // patch), patch * patch * C)


@dataclass
class ImageInputs:
    images: np.ndarray  # float32 [n_crops, 576, 588]: global view first, then tiles row-major
    image_masks: np.ndarray  # float32 [n_crops, 576], with the official one-row shift
    image_tokens: np.ndarray  # int64 [n_image_tokens]
    patch_positions: np.ndarray  # int32 [n_crops, 144]: index into image_tokens, -100 = not used
    tiling: tuple[int, int]


def process_image(image: np.ndarray, *, special: "SpecialTokens", max_crops: int = 12,
                  resize: str = "tf", crop_size: int = 336, patch: int = 14) -> ImageInputs:
    """Crops, masks and the image token block for one uint8 RGB image.

    Raises:
        MolmoInputError: an aspect ratio so extreme that a resized side would be 0 pixels.
    """
    lay = CropLayout(crop_size, patch)
    H, W = image.shape[:2]
    check_resizable(H, W, lay)

    rows, cols = lay.select_tiling(H, W, max_crops)
    big, big_mask = resize_and_pad(image, rows * lay.window + lay.margin_px, cols * lay.window + lay.margin_px,
                                   resize)
    big = normalize(big)
    crops, crop_masks = [], []
    for r in range(rows):
        for c in range(cols):
            y0, x0 = r * lay.window, c * lay.window
            crops.append(big[y0:y0 + crop_size, x0:x0 + crop_size])
            crop_masks.append(big_mask[y0:y0 + crop_size, x0:x0 + crop_size])
    glob, _ = resize_and_pad(image, crop_size, crop_size, resize)
    crops = np.stack([normalize(glob)] + crops)  # [1 + rows*cols, 336, 336, 3]
    masks = to_patches(np.stack(crop_masks)[..., None], patch).astype(np.float32).mean(-1)  # [rows*cols, 576]
    # The official processor appends a row of -1 to the TILE masks and pairs them with [global, tiles...]:
    # the global view gets tile 0's mask, tile k gets tile k+1's, the last tile gets -1 ("partial pad").
    # The released checkpoints were trained this way, so it is reproduced on purpose.
    masks = np.concatenate([masks, np.full((1, lay.patches ** 2), -1.0, np.float32)], 0)

    # Token block: the global view's grid, then the high-res view's pooled grid R x C, in which every crop
    # keeps a non-overlapping part. Each grid row is its <im_patch> tokens followed by one <im_col>.
    n, R, C = lay.tokens, *lay.grid(rows, cols)
    tokens = ([special.im_start] + ([special.im_patch] * n + [special.im_col]) * n + [special.im_end]
              + [special.im_start] + ([special.im_patch] * C + [special.im_col]) * R + [special.im_end])
    hi_start = lay.global_block + 1  # index of the first high-res <im_patch> (after its <im_start>)

    positions = np.full((1 + rows * cols, n * n), -100, dtype=np.int32)
    k = np.arange(n * n)
    positions[0] = 1 + (k // n) * (n + 1) + k % n  # after the global <im_start>, skipping <im_col>s
    win, m = lay.window_tokens, lay.margin_tokens
    for r in range(rows):
        for c in range(cols):
            top = 0 if r == 0 else m  # first kept pooled row inside this crop
            left = 0 if c == 0 else m
            kh = win + m * ((r == 0) + (r == rows - 1))  # kept rows: the window, plus outer margins
            kw = win + m * ((c == 0) + (c == cols - 1))
            g_top = 0 if r == 0 else r * win + m  # grid row of `top`
            g_left = 0 if c == 0 else c * win + m
            pr, pc = np.meshgrid(np.arange(kh), np.arange(kw), indexing="ij")
            cell = (top + pr) * n + (left + pc)  # pooled cell inside the crop's n x n grid
            positions[1 + r * cols + c, cell.ravel()] = (hi_start + (g_top + pr) * (C + 1) + g_left + pc).ravel()
    return ImageInputs(
        images=to_patches(crops, patch),
        image_masks=masks,
        image_tokens=np.array(tokens, dtype=np.int64),
        patch_positions=positions,
        tiling=(rows, cols),
    )


def image_token_count(h: int, w: int, max_crops: int = 12, layout: CropLayout = CropLayout()) -> int:
    """Number of image tokens for an h x w image (default layout: 160 + (8 rows + 4)(8 cols + 5))."""
    return layout.image_tokens(*layout.select_tiling(h, w, max_crops))


# ----------------------------------------------------------------------------------------- tokenizer
def bpe_from_vocab_merges(path: Path, class_name: str | None):
    """A `tokenizers.Tokenizer` from vocab.json + merges.txt (+ added_tokens.json / tokenizer_config.json),
    for folders without tokenizer.json (public copies of the 7B-D folder are like that).

    Built by the transformers class that tokenizer_config.json names (`Qwen2Tokenizer` for 7B-D and 72B,
    `GPT2Tokenizer` for MolmoE), so the pre-tokenizer and added tokens are what transformers itself would
    build from these files. Never through AutoTokenizer: it reads config.json, whose `auto_map` names the
    checkpoint's remote code, and asks "run custom code? [y/N]" on a terminal. No remote code runs here.

    Raises:
        ValueError: tokenizer_class is missing, unknown, or not a class that can be built from these files.
    """
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    cls = tokenizer_class_from_name(class_name) if class_name else None
    why = f"names tokenizer_class {class_name!r}, which transformers does not know" if class_name else \
        "names no tokenizer_class"
    if cls is not None:
        try:
            return cls.from_pretrained(str(path))._tokenizer
        except (OSError, ValueError) as e:
            reason = " ".join(str(e).split())
            why = f"names tokenizer_class {class_name!r}, which could not be built from them ({reason})"
    raise ValueError(f"{path} has vocab.json + merges.txt but no tokenizer.json, and its tokenizer_config.json "
                     f"{why}. Expected a byte-level BPE class such as 'Qwen2Tokenizer' (Molmo-7B-D, 72B) or "
                     "'GPT2Tokenizer' (MolmoE-1B). Copy the checkpoint's tokenizer.json into the folder, or set "
                     "tokenizer_class in tokenizer_config.json.")


@dataclass(frozen=True)
class SpecialTokens:
    im_start: int
    im_end: int
    im_patch: int
    im_col: int
    image: int
    bos: int
    eos: int


class MolmoTokenizer:
    """Thin wrapper over a `tokenizers.Tokenizer` built from the checkpoint's tokenizer files."""

    def __init__(self, backend, eos_token: str = "<|endoftext|>", bos_token: str | None = None):
        self.backend = backend
        ids = self.encode("".join(EXTRA_TOKENS))
        if len(ids) != len(EXTRA_TOKENS):
            raise ValueError(f"The tokenizer does not know Molmo's image tokens {EXTRA_TOKENS}: encoding them "
                             f"gave {len(ids)} ids {ids[:8]}, expected 5. Is this a Molmo tokenizer?")
        eos = backend.token_to_id(eos_token)
        if eos is None:
            raise ValueError(f"The tokenizer has no EOS token {eos_token!r}.")
        bos = backend.token_to_id(bos_token) if bos_token else None
        self.special = SpecialTokens(*ids, bos=eos if bos is None else bos, eos=eos)

    @classmethod
    def from_dir(cls, path: str | Path) -> "MolmoTokenizer":
        path = Path(path)
        cfg = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if (path / name).is_file():
                cfg.update({k: v for k, v in json.loads((path / name).read_text()).items() if v is not None})

        def token(v):
            return v.get("content") if isinstance(v, dict) else v

        eos, bos = token(cfg.get("eos_token")) or "<|endoftext|>", token(cfg.get("bos_token"))
        if (path / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            backend = Tokenizer.from_file(str(path / "tokenizer.json"))
        elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            backend = bpe_from_vocab_merges(path, cfg.get("tokenizer_class"))
        else:
            raise FileNotFoundError(f"No tokenizer.json (or vocab.json + merges.txt) in {path}.")
        return cls(backend, eos_token=eos, bos_token=bos)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=True)


# ----------------------------------------------------------------------------------------- prompt
def format_prompt(prompt: str, history: Sequence[tuple[str, str]] = (), template: str = "role") -> list[str]:
    """Text pieces tokenized separately, as the training formatter does:
    " User: q1 Assistant:", " a1", <EOS>, " User: q2 Assistant:", ... (EOS marked by None).

    template "none" (`message_formatting="none"`, the pre-training captioner's format, e.g.
    " long_caption 65:") uses the prompt verbatim after the leading space, with no history."""
    if template == "none":
        if history:
            raise MolmoInputError("A prompt without the User/Assistant template cannot carry chat history.")
        return [f" {prompt}"]
    if template != "role":
        raise ValueError(f"template must be 'role' or 'none'; got {template!r}")
    pieces: list = []
    for q, a in history:
        pieces += [f" User: {q} Assistant:", f" {a}", None]
    pieces.append(f" User: {prompt} Assistant:")
    return pieces


@dataclass
class ProcessedInput:
    input_ids: np.ndarray  # int64 [L]
    images: np.ndarray | None  # float32 [n_crops, 576, 588]
    image_masks: np.ndarray | None  # float32 [n_crops, 576]
    image_input_idx: np.ndarray | None  # int32 [n_crops, 144]: sequence position of each pooled token
    tiling: tuple[int, int] | None = None
    image_size: tuple[int, int] | None = None  # (W, H) of the RGB image the model saw


class MolmoProcessor:
    """`processor(image, prompt) -> ProcessedInput` with the official layout: BOS, image, text."""

    def __init__(self, tokenizer: MolmoTokenizer, *, max_crops: int = 12, resize: str = "tf",
                 crop_size: int = 336, patch_size: int = 14, max_length: int = 4096):
        self.tokenizer = tokenizer
        self.max_crops = max_crops
        self.resize = resize
        self.crop_size = crop_size
        self.patch_size = patch_size
        self.max_length = max_length

    def __call__(self, image, prompt: str, history: Sequence[tuple[str, str]] = (),
                 max_crops: int | None = None, template: str = "role") -> ProcessedInput:
        if not isinstance(prompt, str) or not prompt.strip():
            raise MolmoInputError("The prompt is empty; type a question or an instruction.")
        sp = self.tokenizer.special
        text_ids: list[int] = []
        for piece in format_prompt(prompt, history, template):
            text_ids += [sp.eos] if piece is None else self.tokenizer.encode(piece)
        if image is None:
            ids = np.array([sp.bos] + text_ids, dtype=np.int64)
            self._check_length(len(ids))
            return ProcessedInput(ids, None, None, None)
        rgb = load_image(image)
        img = process_image(rgb, special=sp, max_crops=max_crops or self.max_crops, resize=self.resize,
                            crop_size=self.crop_size, patch=self.patch_size)
        ids = np.concatenate([[sp.bos], img.image_tokens, text_ids]).astype(np.int64)
        self._check_length(len(ids))
        idx = np.where(img.patch_positions >= 0, img.patch_positions + 1, img.patch_positions)  # +1 for BOS
        return ProcessedInput(ids, img.images, img.image_masks, idx.astype(np.int32), img.tiling,
                              (rgb.shape[1], rgb.shape[0]))

    def _check_length(self, n: int) -> None:
        if n > self.max_length:
            raise MolmoInputError(
                f"The input is {n} tokens long; this model's context holds {self.max_length}. "
                "Shorten the prompt or the conversation, or lower max crops.")
