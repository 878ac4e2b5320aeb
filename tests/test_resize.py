"""Tests for molmo_core.resize (TF / torchvision antialiased bilinear resize).

The golden file holds random float32 images and the outputs of
``tf.image.resize(img, [h, w], "bilinear", antialias=True)`` from
tensorflow-cpu 2.21.0 (generated in a throwaway venv; TF is not a dependency).
"""
from pathlib import Path

import numpy as np
import pytest

from molmo_core.resize import resize_tf_antialias, resize_torch_antialias, tf_antialias_weights

GOLDEN = Path(__file__).parent / "data" / "tf_resize_golden.npz"


def _golden_cases():
    data = np.load(GOLDEN)
    n = sum(1 for k in data.files if k.startswith("in_"))
    return [(data[f"in_{i}"], data[f"out_{i}"]) for i in range(n)]


@pytest.mark.parity
@pytest.mark.parametrize("exact", [True, False])
def test_matches_tensorflow_golden(exact):
    cases = _golden_cases()
    assert len(cases) >= 4
    for img, ref in cases:
        got = resize_tf_antialias(img, ref.shape[0], ref.shape[1], exact=exact)
        assert got.dtype == np.float32
        assert got.shape == ref.shape
        np.testing.assert_array_less(np.abs(got - ref).max(), 1e-5)
        if exact:  # the default path reproduces TF bit for bit
            np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("n_in,n_out", [(1, 1), (1, 7), (9, 64), (480, 504), (640, 224), (4000, 13), (7, 7)])
def test_weights_rows_sum_to_one(n_in, n_out):
    w = tf_antialias_weights(n_in, n_out)
    assert w.shape == (n_out, n_in) and w.dtype == np.float32
    assert (w >= 0).all()
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-5)


def test_identity_and_constant():
    rng = np.random.default_rng(0)
    img = rng.random((13, 17, 3), dtype=np.float32)
    np.testing.assert_array_equal(resize_tf_antialias(img, 13, 17), img)
    const = np.full((31, 45, 2), 0.37, np.float32)
    for oh, ow in [(7, 90), (100, 3), (1, 1), (336, 268)]:
        out = resize_tf_antialias(const, oh, ow)
        assert out.shape == (oh, ow, 2)
        np.testing.assert_allclose(out, 0.37, atol=1e-6)


def test_one_pixel_input_broadcasts():
    img = np.array([[[0.25, 0.5, 1.0]]], np.float32)
    out = resize_tf_antialias(img, 5, 7)
    np.testing.assert_array_equal(out, np.broadcast_to(img, (5, 7, 3)))


def test_exact_and_matmul_paths_agree():
    rng = np.random.default_rng(1)
    for (h, w), (oh, ow) in [((100, 80), (336, 268)), ((480, 640), (504, 672)), ((50, 600), (31, 77))]:
        img = rng.random((h, w, 3), dtype=np.float32)
        a = resize_tf_antialias(img, oh, ow, exact=True)
        b = resize_tf_antialias(img, oh, ow, exact=False)
        assert np.abs(a - b).max() < 1e-6


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        resize_tf_antialias(np.zeros((4, 4), np.float32), 2, 2)
    with pytest.raises(ValueError):
        resize_tf_antialias(np.zeros((4, 4, 3), np.float32), 0, 2)


@pytest.mark.parametrize("shape,out", [((17, 23, 3), (40, 9)), ((100, 80, 3), (336, 268)),
                                       ((480, 640, 3), (504, 672)), ((1, 1, 1), (4, 5)),
                                       ((120, 90, 4), (36, 48))])
def test_torch_variant_matches_interpolate(shape, out):
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    rng = np.random.default_rng(2)
    img = rng.random(shape, dtype=np.float32)
    got = resize_torch_antialias(img, *out)
    x = torch.from_numpy(img).permute(2, 0, 1).unsqueeze(0)
    ref = F.interpolate(x, size=out, mode="bilinear", align_corners=False, antialias=True)
    ref = ref[0].permute(1, 2, 0).numpy()
    assert got.shape == out + (shape[2],) and got.dtype == np.float32
    np.testing.assert_array_equal(got, ref)
    # Same filter as TF, only the float32 rounding of sample positions differs
    # (measured 8.4e-5 for 480x640 -> 504x672).
    assert np.abs(got - resize_tf_antialias(img, *out)).max() < 2e-4


def test_speed_480x640():
    import time

    img = np.random.default_rng(3).random((480, 640, 3), dtype=np.float32)
    resize_tf_antialias(img, 504, 672)  # warm the weight cache
    t0 = time.perf_counter()
    resize_tf_antialias(img, 504, 672)
    assert time.perf_counter() - t0 < 0.5  # ~7 ms measured; generous bound for CI
