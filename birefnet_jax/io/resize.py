"""Resizing as the original does around the model, in NumPy: OpenCV's ``INTER_LINEAR`` on the way
in (its test loader) and PyTorch's ``align_corners=True`` bilinear on the way out (its inference
script). The tap tables are shared with the model's own resize (`birefnet_jax.nn.layers`)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

# Elements per intermediate block in the resizes: 2 MB of float32, small enough to stay in cache
# (the fastest size for large outputs), large enough that the Python loop costs nothing; a
# resize never holds more than a few of these beyond its input and output.
_BLOCK_ELEMENTS = 1 << 19



@lru_cache(maxsize=256)
def align_corners_taps(n_in: int, n_out: int, double: bool = False):
    """Source indices and weights of 1D linear interpolation with aligned corners."""
    # In the input's precision, as PyTorch computes the source coordinates.
    ft = np.float64 if double else np.float32
    scale = ft(0.0) if n_out == 1 else ft(n_in - 1) / ft(n_out - 1)
    src = np.arange(n_out, dtype=ft) * scale
    i0 = np.clip(np.floor(src).astype(np.int32), 0, n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = (src - i0.astype(ft)).astype(ft)
    return i0, i1, frac


def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV INTER_LINEAR taps: half-pixel centres, source coordinate clamped to the image
    (so the border pixel is repeated, not blended with a zero)."""
    src = ((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5).astype(np.float32)
    i0 = np.floor(src).astype(np.intp)
    frac = (src - i0.astype(np.float32)).astype(np.float32)
    low, high = i0 < 0, i0 >= n_in - 1
    i0[low], frac[low] = 0, 0
    i0[high], frac[high] = n_in - 1, 0
    return i0, np.minimum(i0 + 1, n_in - 1), frac


def _blend(x: np.ndarray, i0: np.ndarray, i1: np.ndarray, frac: np.ndarray, axis: int) -> np.ndarray:
    """float32 (1 - frac) * x[i0] + frac * x[i1] along `axis` (0 or 1); gathers in x's own dtype,
    so uint8 is widened only after the gather."""
    shape = [1] * x.ndim
    shape[axis] = frac.size
    w1 = frac.reshape(shape)
    a = np.take(x, i0, axis=axis).astype(np.float32, copy=False)
    b = np.take(x, i1, axis=axis).astype(np.float32, copy=False)
    a *= np.float32(1) - w1
    b *= w1
    a += b
    return a


def resize_linear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize to (out_h, out_w) as ``cv2.resize(image, (out_w, out_h), INTER_LINEAR)``:
    half-pixel centres, clamped borders, no antialiasing (the original's test-time loader).

    (H, W) or (H, W, C); uint8 in -> uint8 out (rounded; OpenCV's fixed-point arithmetic differs
    by at most 1), float in -> float32 out. Separable like OpenCV (along the width, then the
    height), in blocks of output rows that read only the input rows they need: a 12000 x 9000
    photo is reduced to 1024 x 1024 without ever being converted to float, in O(output) memory.
    """
    x = np.asarray(image)
    out_h, out_w = int(size[0]), int(size[1])
    if x.ndim not in (2, 3):
        raise ValueError(f"resize_linear takes (H, W) or (H, W, C) arrays, got shape {x.shape}")
    if out_h < 1 or out_w < 1 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"cannot resize {x.shape[:2]} to {(out_h, out_w)}")
    is_u8 = x.dtype == np.uint8
    if not is_u8 and not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"resize_linear takes uint8 or float arrays, got {x.dtype}")
    out_dtype = np.uint8 if is_u8 else np.float32
    h, w = x.shape[:2]
    if (h, w) == (out_h, out_w):
        return x.astype(out_dtype, copy=True)
    r0, r1, fr = _linear_taps(h, out_h)
    c0, c1, fc = _linear_taps(w, out_w)
    channels = x.shape[2] if x.ndim == 3 else 1
    out = np.empty((out_h, out_w) + x.shape[2:], out_dtype)
    step = max(1, _BLOCK_ELEMENTS // (max(w, out_w) * channels))
    for a in range(0, out_h, step):
        b = min(a + step, out_h)
        lo, hi = int(r0[a]), int(r1[b - 1]) + 1
        if 2 * (b - a) < hi - lo:  # downscaling: only the two rows each output row reads
            src = np.take(x, np.concatenate([r0[a:b], r1[a:b]]), axis=0)
            j0, j1 = np.arange(b - a), np.arange(b - a, 2 * (b - a))
        else:  # upscaling: the band of rows, each read by several output rows
            src, j0, j1 = x[lo:hi], r0[a:b] - lo, r1[a:b] - lo
        t = _blend(_blend(src, c0, c1, fc, 1), j0, j1, fr[a:b], 0)
        if is_u8:
            np.rint(t, out=t)
            np.clip(t, 0, 255, out=t)
        out[a:b] = t
    return out


def resize_align_corners(prob: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """float32 bilinear resize with aligned corners, as PyTorch's
    ``F.interpolate(..., mode='bilinear', align_corners=True)`` brings the original's predictions
    back to the image size: the model's own taps (`align_corners_taps`), width then height.

    (H, W) or (H, W, C). Computed in blocks of output rows, each reading only the input rows it
    needs, so a 12000 x 9000 output costs little beyond itself.
    """
    x = np.asarray(prob, dtype=np.float32)
    out_h, out_w = int(size[0]), int(size[1])
    if x.ndim not in (2, 3):
        raise ValueError(f"resize_align_corners takes (H, W) or (H, W, C) arrays, got shape {x.shape}")
    if out_h < 1 or out_w < 1 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"cannot resize {x.shape[:2]} to {(out_h, out_w)}")
    h, w = x.shape[:2]
    if (h, w) == (out_h, out_w):
        return x.copy()
    c0, c1, fc = align_corners_taps(w, out_w)
    r0, r1, fr = align_corners_taps(h, out_h)
    tail = (1,) * (x.ndim - 2)
    wc1 = fc.reshape((1, -1) + tail)
    wc0 = (1 - fc).reshape((1, -1) + tail)
    out = np.empty((out_h, out_w) + x.shape[2:], np.float32)
    channels = x.shape[2] if x.ndim == 3 else 1
    step = max(1, _BLOCK_ELEMENTS // (max(w, out_w) * channels))
    for a in range(0, out_h, step):
        b = min(a + step, out_h)
        rows = np.unique(np.concatenate([r0[a:b], r1[a:b]]))
        band = x[rows]
        across = band[:, c0] * wc0 + band[:, c1] * wc1
        fb = fr[a:b].reshape((-1, 1) + tail)
        np.multiply(across[np.searchsorted(rows, r0[a:b])], 1 - fb, out=out[a:b])
        lower = across[np.searchsorted(rows, r1[a:b])]
        lower *= fb
        out[a:b] += lower
    return out
