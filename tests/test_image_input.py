"""Image input before the model: RGB conversion (alpha options), the crop/token layout, extreme sizes."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from molmo_core.errors import MolmoInputError
from molmo_core.preprocessing import (
    CropLayout,
    SpecialTokens,
    image_token_count,
    load_image,
    process_image,
    resized_size,
)

SP = SpecialTokens(im_start=1, im_end=2, im_patch=3, im_col=4, image=5, bos=0, eos=0)


# ------------------------------------------------------------------------------------------ alpha
def _rgba() -> Image.Image:
    """Red everywhere; alpha 0 on the left half, 255 on the right column, 128 in the middle column."""
    a = np.zeros((4, 6, 4), np.uint8)
    a[..., 0] = 255
    a[:, 5, 3] = 255
    a[:, 3, 3] = 128
    return Image.fromarray(a, "RGBA")


def _sources(img: Image.Image, tmp_path) -> list:
    img.save(tmp_path / "t.png")
    return [img, np.asarray(img), tmp_path / "t.png", str(tmp_path / "t.png"), (tmp_path / "t.png").read_bytes()]


def test_alpha_drop_is_the_official_conversion(tmp_path):
    for source in _sources(_rgba(), tmp_path):
        rgb = load_image(source)  # the default
        assert rgb.dtype == np.uint8 and rgb.shape == (4, 6, 3)
        assert (rgb == [255, 0, 0]).all()  # transparent pixels keep their stored red
        assert (rgb == np.asarray(_rgba().convert("RGB"))).all()


def test_alpha_white_composites_on_white(tmp_path):
    for source in _sources(_rgba(), tmp_path):
        rgb = load_image(source, alpha="white").astype(int)
        assert (rgb[:, 0] == 255).all()  # fully transparent -> white
        assert (rgb[:, 5] == [255, 0, 0]).all()  # opaque -> unchanged
        mid = rgb[0, 3]  # half transparent red over white: (255, ~127, ~127)
        assert mid[0] == 255 and abs(mid[1] - 127) <= 1 and abs(mid[2] - 127) <= 1


def test_alpha_white_covers_la_and_transparent_palette_and_leaves_opaque_images_alone():
    la = Image.fromarray(np.stack([np.zeros((3, 3), np.uint8), np.zeros((3, 3), np.uint8)], -1), "LA")
    assert (load_image(la, alpha="white") == 255).all() and (load_image(la) == 0).all()
    pal = Image.new("P", (3, 3), 0)
    pal.putpalette([0, 0, 0] * 256)
    pal.info["transparency"] = 0
    assert (load_image(pal, alpha="white") == 255).all() and (load_image(pal) == 0).all()
    opaque = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert (load_image(opaque, alpha="white") == opaque).all() and (load_image(opaque) == opaque).all()
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4, 1)
    assert (load_image(gray) == gray).all() and load_image(gray).shape == (3, 4, 3)


def test_alpha_option_is_checked():
    with pytest.raises(ValueError, match=r"alpha must be one of \('drop', 'white'\); got 'black'"):
        load_image(np.zeros((2, 2, 3), np.uint8), alpha="black")


# ------------------------------------------------------------------------------------------ layout
def test_default_layout_numbers_are_the_official_ones():
    lay = CropLayout()
    assert (lay.patches, lay.tokens, lay.window_patches, lay.window, lay.margin_px) == (24, 12, 16, 224, 112)
    assert (lay.window_tokens, lay.margin_tokens, lay.global_block) == (8, 2, 158)
    assert lay.grid(2, 3) == (20, 28)
    with pytest.raises(ValueError, match="Inconsistent crop layout"):
        CropLayout(crop_size=340)


# molmo_v1.md section 5.7, worked examples: H x W -> image tokens
@pytest.mark.parametrize("h,w,n", [(336, 336, 316), (224, 224, 316), (354, 536, 580), (480, 640, 740),
                                   (768, 1024, 1196), (1080, 1920, 1196), (2048, 2048, 972), (3000, 400, 1356),
                                   (100, 2000, 316)])
def test_image_token_count_matches_the_worked_examples(h, w, n):
    assert image_token_count(h, w) == n


def _check_block(out, lay: CropLayout) -> None:
    """The token block has the layout's length, and the index map hits every <im_patch> exactly once."""
    tokens, pos = out.image_tokens, out.patch_positions
    assert len(tokens) == lay.image_tokens(*out.tiling)
    used = pos[pos >= 0]
    assert len(used) == len(set(used.tolist()))
    assert sorted(used.tolist()) == np.flatnonzero(tokens == SP.im_patch).tolist()
    assert (tokens[pos[0]] == SP.im_patch).all() and pos[0].max() < lay.global_block  # global row first


@pytest.mark.parametrize("h,w", [(336, 336), (480, 640), (640, 480), (1000, 200), (200, 1300), (900, 900)])
def test_token_block_and_index_map_follow_the_layout(h, w):
    img = np.full((h, w, 3), 100, np.uint8)
    out = process_image(img, special=SP, max_crops=12)
    _check_block(out, CropLayout())
    assert out.images.shape == (1 + out.tiling[0] * out.tiling[1], 576, 588)


def test_a_different_crop_size_changes_every_derived_number():
    lay = CropLayout(crop_size=224, patch=14)  # 16 patches, 8 tokens, window 8 patches (112 px)
    assert (lay.tokens, lay.window, lay.margin_px, lay.global_block) == (8, 112, 112, 74)
    out = process_image(np.full((300, 500, 3), 50, np.uint8), special=SP, max_crops=6, crop_size=224, patch=14)
    _check_block(out, lay)
    assert out.images.shape[1:] == (256, 588)


# ------------------------------------------------------------------------------------------ extreme sizes
def _global_side_is_zero(h: int, w: int) -> bool:
    """molmo_v1.md 5.4: scale = min(336/H, 336/W) in float32, sides truncated."""
    scale = min(np.float32(336) / np.float32(h), np.float32(336) / np.float32(w))
    return int(np.float32(h) * scale) == 0 or int(np.float32(w) * scale) == 0


def _run(h: int, w: int, resize: str = "tf"):
    return process_image(np.full((h, w, 3), 200, np.uint8), special=SP, max_crops=12, resize=resize)


def _check_extreme(h: int, w: int, resize: str = "tf") -> None:
    if not _global_side_is_zero(h, w):
        out = _run(h, w, resize)
        assert np.isfinite(out.images).all() and len(out.image_tokens) == image_token_count(h, w)
        return
    with pytest.raises(MolmoInputError) as err:
        _run(h, w, resize)
    msg = str(err.value)
    assert f"The image is {w}x{h} pixels" in msg and "crop the image or pad it" in msg
    need = int(re.search(r"must be at least (\d+) px", msg).group(1))
    long_side = max(h, w)
    assert need > min(h, w)
    # The stated minimum is exact: that size works, one pixel less does not.
    _run(*((long_side, need) if h > w else (need, long_side)), resize)
    if need > 1:
        with pytest.raises(MolmoInputError):
            _run(*((long_side, need - 1) if h > w else (need - 1, long_side)), resize)


@pytest.mark.parametrize("h,w", [(1, 336), (1, 337), (337, 1), (1, 5000), (5000, 1), (2, 5000), (5000, 2),
                                 (2, 673), (3, 1009), (15, 5000), (14, 5000), (1, 1), (1, 2), (2, 1)])
@pytest.mark.parametrize("resize", ["tf", "torch"])
def test_extreme_aspect_ratios_work_or_are_refused_clearly(h, w, resize):
    _check_extreme(h, w, resize)


@settings(max_examples=60, deadline=None)
@given(short=st.integers(1, 40), long_side=st.integers(1, 9000), tall=st.booleans())
def test_any_thin_or_flat_image_works_or_is_refused_clearly(short, long_side, tall):
    _check_extreme(*((long_side, short) if tall else (short, long_side)))


def test_resized_size_is_the_official_truncation():
    assert resized_size(354, 536, 336, 336) == (221, 336)
    assert resized_size(1, 337, 336, 336) == (0, 336)


def test_bytes_input_of_a_thin_image_is_refused_through_the_processor_path():
    buf = io.BytesIO()
    Image.new("RGB", (3000, 1)).save(buf, "PNG")
    rgb = load_image(buf.getvalue())
    with pytest.raises(MolmoInputError, match=r"3000x1 pixels: too flat .* at least 9 px"):
        process_image(rgb, special=SP)
