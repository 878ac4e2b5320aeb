"""Antialiased bilinear image resizing without TensorFlow.

The official Molmo v1 image preprocessor resizes with
``tf.image.resize(image, [h, w], method=BILINEAR, antialias=True)``; the
PyTorch port uses torchvision ``Resize([h, w], BILINEAR, antialias=True)``.
The two use the same filter but differ by float rounding (up to ~1e-4 at
~500 px outputs), so both are provided here:

* :func:`resize_tf_antialias` re-implements TensorFlow's semantics in numpy
  (no TensorFlow import).
* :func:`resize_torch_antialias` calls ``torch.nn.functional.interpolate``
  (what torchvision's ``Resize`` does for float tensors).

TensorFlow semantics (``tf.image.resize`` → ``ScaleAndTranslate`` op with a
triangle kernel, translation 0), per axis with input size ``n_in`` and output
size ``n_out``, all arithmetic in float32::

    scale        = float32(n_out) / float32(n_in)
    inv_scale    = 1 / scale
    kernel_scale = max(inv_scale, 1)      # kernel widened only when downsampling
    s_i          = (i + 0.5) * inv_scale  # sample position of output pixel i
    span_i       = [clamp(ceil(s_i - kernel_scale - 0.5)),
                    clamp(floor(s_i + kernel_scale - 0.5)) + 1)   # clamp to [0, n_in-1]
    w_raw[i, j]  = tri(|(j + 0.5 - s_i) / kernel_scale|),  j in span_i,
                   tri(x) = max(1 - x, 0)
    w[i, j]      = w_raw[i, j] * (1 / sum_j w_raw[i, j])   # per-output normalisation

The image is filtered rows first (vertical axis, giving a float32
intermediate of shape [out_h, W, C]) and then columns:
``out = W_w · (W_h · image)`` with ``W_h`` [out_h, H] and ``W_w`` [out_w, W].
Edge handling is implicit: weights falling outside the image are dropped and
the remaining ones renormalised (equivalent to edge clamping for upsampling).

By default each output is accumulated in float32 over its source span in TF's
order (multiply, then add, span index ascending), which matches TF 2.21 CPU
bit for bit; ``exact=False`` uses two dense float64 matmuls instead.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

__all__ = ["tf_antialias_weights", "resize_tf_antialias", "resize_torch_antialias"]

_F32 = np.float32
# TensorFlow skips normalisation when |sum of weights| < 1000 * FLT_MIN.
_MIN_TOTAL_WEIGHT = _F32(1000.0) * np.finfo(np.float32).tiny


@lru_cache(maxsize=256)
def _tf_spans(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """TF's spans for one axis: ``starts`` int64 [out] and ``weights`` float32 [out, span].

    ``weights[i, k]`` multiplies source pixel ``starts[i] + k``; entries past the
    end of a span are 0. Bit-exact with TF's ``ComputeSpansCore``.
    """
    scale = _F32(out_size) / _F32(in_size)
    inv_scale = _F32(1.0) / scale
    kernel_scale = max(inv_scale, _F32(1.0))
    one_over_kernel_scale = _F32(1.0) / kernel_scale

    # Sample position of every output pixel, float32 like the C++ op.
    sample = (np.arange(out_size, dtype=_F32) + _F32(0.5)) * inv_scale  # [out]

    # Source span [start, end) of every output pixel, computed exactly as TF
    # does (float32, left-to-right evaluation, then clamping).
    start = np.ceil((sample - kernel_scale) - _F32(0.5)).astype(np.int64)  # [out]
    end = np.floor((sample + kernel_scale) - _F32(0.5)).astype(np.int64)  # [out]
    start = np.clip(start, 0, in_size - 1)
    end = np.clip(end, 0, in_size - 1) + 1
    max_span = int((end - start).max())

    src = start[:, None] + np.arange(max_span)[None, :]  # [out, span]
    valid = src < end[:, None]  # [out, span]
    kernel_pos = (src.astype(_F32) + _F32(0.5)) - sample[:, None]  # [out, span]
    x = np.abs(kernel_pos * one_over_kernel_scale)
    w = np.where((x < _F32(1.0)) & valid, _F32(1.0) - x, _F32(0.0)).astype(_F32)

    # Sequential float32 sum over the span (TF's summation order).
    total = np.zeros(out_size, dtype=_F32)  # [out]
    for j in range(max_span):
        total += w[:, j]
    normalise = np.abs(total) >= _MIN_TOTAL_WEIGHT
    recip = np.where(normalise, _F32(1.0) / np.where(normalise, total, _F32(1.0)), _F32(1.0))
    w = (w * recip[:, None].astype(_F32)).astype(_F32)  # [out, span]
    start.setflags(write=False)
    w.setflags(write=False)
    return start, w


def tf_antialias_weights(in_size: int, out_size: int) -> np.ndarray:
    """Dense float32 [out_size, in_size] matrix of TF's antialiased triangle weights.

    Row ``i`` holds the normalised weights of output pixel ``i`` (see the
    module docstring for the formula); they are bit-identical to TF's.
    """
    if in_size <= 0 or out_size <= 0:
        raise ValueError(f"sizes must be positive, got in={in_size} out={out_size}")
    start, w = _tf_spans(int(in_size), int(out_size))
    out_size, span = w.shape
    src = start[:, None] + np.arange(span)[None, :]  # [out, span]
    keep = (src < in_size) & (w != 0)
    rows = np.broadcast_to(np.arange(out_size)[:, None], src.shape)
    dense = np.zeros((out_size, in_size), dtype=_F32)  # [out, in]
    dense[rows[keep], src[keep]] = w[keep]
    return dense


def _gather_axis0(x: np.ndarray, start: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``out[i] = sum_k w[i, k] * x[start[i] + k]`` accumulated in float32, k ascending.

    x: float32 [n_in, ...]; start: [n_out]; w: float32 [n_out, span] -> float32 [n_out, ...].
    Mirrors TF's ``GatherRows`` / ``GatherColumns`` (separate multiply and add,
    sequential over the span), which makes the result bit-identical to TF.
    """
    n_in = x.shape[0]
    n_out, span = w.shape
    acc = np.zeros((n_out,) + x.shape[1:], dtype=_F32)  # [n_out, ...]
    bshape = (n_out,) + (1,) * (x.ndim - 1)
    for k in range(span):
        idx = np.minimum(start + k, n_in - 1)  # weight is 0 wherever this clamps
        acc += w[:, k].reshape(bshape) * x[idx]
    return acc


def resize_tf_antialias(image: np.ndarray, out_h: int, out_w: int, *, exact: bool = True) -> np.ndarray:
    """Reproduce ``tf.image.resize(image, [out_h, out_w], BILINEAR, antialias=True)``.

    Args:
        image: float32 array [H, W, C] (other real dtypes are cast to float32,
            as TF does internally).
        out_h, out_w: output size (positive ints).
        exact: True (default) accumulates each output in float32 over its
            source span in TF's order: bit-identical to TF 2.21 on CPU.
            False uses two dense float64 matmuls with
            :func:`tf_antialias_weights` (agrees with TF to < 1e-6).

    Returns:
        float32 array [out_h, out_w, C]. No clipping is applied (TF does not clip).

    Computes ``out[y, x, c] = sum_j W_w[x, j] * (sum_i W_h[y, i] * image[i, j, c])``
    with ``W_h = tf_antialias_weights(H, out_h)`` and
    ``W_w = tf_antialias_weights(W, out_w)``, rows first like TF, storing the
    intermediate [out_h, W, C] in float32.
    """
    if image.ndim != 3:
        raise ValueError(f"expected an [H, W, C] image, got shape {image.shape}")
    out_h, out_w = int(out_h), int(out_w)
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"output size must be positive, got {out_h}x{out_w}")
    h, w, c = image.shape
    if h <= 0 or w <= 0:
        raise ValueError(f"input image must be non-empty, got shape {image.shape}")
    img = np.asarray(image, dtype=_F32)

    if exact:
        start_h, w_h = _tf_spans(h, out_h)
        start_w, w_w = _tf_spans(w, out_w)
        inter = _gather_axis0(img, start_h, w_h)  # [out_h, W, C]
        inter_t = np.ascontiguousarray(inter.transpose(1, 0, 2))  # [W, out_h, C]
        out_t = _gather_axis0(inter_t, start_w, w_w)  # [out_w, out_h, C]
        return np.ascontiguousarray(out_t.transpose(1, 0, 2))  # [out_h, out_w, C]

    m_h = tf_antialias_weights(h, out_h).astype(np.float64)  # [out_h, H]
    m_w = tf_antialias_weights(w, out_w).astype(np.float64)  # [out_w, W]
    # Vertical pass: [out_h, H] @ [H, W*C] -> [out_h, W*C], rounded to float32.
    inter = (m_h @ img.reshape(h, w * c).astype(np.float64)).astype(_F32)
    # Horizontal pass: [out_w, W] @ [W, out_h*C] -> [out_w, out_h*C].
    inter_t = inter.reshape(out_h, w, c).transpose(1, 0, 2).reshape(w, out_h * c)
    out = (m_w @ inter_t.astype(np.float64)).astype(_F32)
    return np.ascontiguousarray(out.reshape(out_w, out_h, c).transpose(1, 0, 2))  # [out_h, out_w, C]


def resize_torch_antialias(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Reproduce torchvision ``Resize([out_h, out_w], BILINEAR, antialias=True)`` on float32.

    That is ``F.interpolate(x[None], (out_h, out_w), mode="bilinear",
    align_corners=False, antialias=True)`` on the CHW tensor. Mathematically the
    same triangle filter as :func:`resize_tf_antialias` (support
    ``max(H/out_h, 1)`` per axis, normalised weights), but the two libraries
    round the sample positions differently: TF rounds ``scale = out/in`` to
    float32 and inverts it, so its error grows with the output index. Measured
    differences vs TF: ~1e-7 for downsampling, up to ~8e-5 for
    480x640 -> 504x672 and ~8e-6 for 100x80 -> 336x268.

    Note: torch 2.13 (CPU) gives wrong results when ``out_w == 1`` and the height
    is downsampled (every output row equals the first); Molmo never resizes to
    width 1.

    Args:
        image: float32 array [H, W, C].
        out_h, out_w: output size.

    Returns:
        float32 array [out_h, out_w, C].
    """
    import torch
    import torch.nn.functional as F

    if image.ndim != 3:
        raise ValueError(f"expected an [H, W, C] image, got shape {image.shape}")
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=_F32)).permute(2, 0, 1)[None]  # [1, C, H, W]
    y = F.interpolate(x, size=(int(out_h), int(out_w)), mode="bilinear",
                      align_corners=False, antialias=True)  # [1, C, out_h, out_w]
    return y[0].permute(1, 2, 0).contiguous().numpy()  # [out_h, out_w, C]
