"""Resizing as the original does around the model: OpenCV's ``INTER_LINEAR`` on the way in (its test
loader: ``cv2.imread``, ``cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)``, then BGR -> RGB and
the normalisation; the resize treats channels alike, so resizing RGB gives the same numbers) and
PyTorch's ``align_corners=True`` bilinear on the way out (its inference script). The tap tables are
shared with the model's own resize (`birefnet_jax.nn.layers`).

`resize_linear` calls OpenCV where it is installed (an optional package, imported on first use) and
otherwise computes the same numbers in NumPy: OpenCV's fixed-point arithmetic for uint8 (11-bit
weights, its rounding shifts), reproduced step for step, so that both give the same bytes."""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np

# Elements per intermediate block in the resizes: 2 MB of float32, small enough to stay in cache
# (the fastest size for large outputs), large enough that the Python loop costs nothing; a
# resize never holds more than a few of these beyond its input and output.
_BLOCK_ELEMENTS = 1 << 19

# `resize_linear`'s backend when none is passed: "numpy", "opencv", or unset / "auto" (OpenCV where it
# is installed, else NumPy).
RESIZE_BACKEND_ENV = "BIREFNET_JAX_RESIZE"
_BACKENDS = ("auto", "numpy", "opencv")

# OpenCV's INTER_RESIZE_COEF_BITS: uint8 resizes weigh with integers in units of 1/2048.
_COEF_BITS = 11
_COEF_SCALE = 1 << _COEF_BITS


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


@lru_cache(maxsize=256)
def _linear_taps(n_in: int, n_out: int, clamp: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV INTER_LINEAR taps, computed as it computes them: the source coordinate of output i is
    ``float((i + 0.5) * scale - 0.5)`` with ``scale = 1 / (n_out / n_in)`` in double, split into
    floor and float32 fraction. Returns (i0, i1, frac), indices clamped to the image.

    clamp: a coordinate off the image takes the border pixel with weights (1, 0), as OpenCV does
    across the width; along the height it keeps its fraction and reads the border row twice (same
    value in exact arithmetic, not always in 11-bit weights)."""
    scale = 1.0 / (n_out / n_in)
    src = ((np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    start = np.floor(src)
    frac = (src - start).astype(np.float32)
    start = start.astype(np.intp)
    if clamp:
        low, high = start < 0, start >= n_in - 1
        start[low], frac[low] = 0, 0
        start[high], frac[high] = n_in - 1, 0
    for a in (start, frac):
        a.flags.writeable = False
    i1 = np.clip(start + 1, 0, n_in - 1)
    i0 = np.clip(start, 0, n_in - 1)
    i0.flags.writeable = i1.flags.writeable = False
    return i0, i1, frac


@lru_cache(maxsize=256)
def _fixed_weights(n_in: int, n_out: int, clamp: bool) -> tuple[np.ndarray, np.ndarray]:
    """The taps' weights as OpenCV's uint8 path rounds them: ``round((1 - frac) * 2048)`` and
    ``round(frac * 2048)`` in float32, to nearest even (their sum is not always 2048)."""
    frac = _linear_taps(n_in, n_out, clamp)[2]
    w0 = np.rint((np.float32(1) - frac) * np.float32(_COEF_SCALE)).astype(np.int32)
    w1 = np.rint(frac * np.float32(_COEF_SCALE)).astype(np.int32)
    w0.flags.writeable = w1.flags.writeable = False
    return w0, w1


def _blend(x: np.ndarray, i0: np.ndarray, i1: np.ndarray, frac: np.ndarray, axis: int) -> np.ndarray:
    """float32 (1 - frac) * x[i0] + frac * x[i1] along `axis` (0 or 1)."""
    shape = [1] * x.ndim
    shape[axis] = frac.size
    w1 = frac.reshape(shape)
    a = np.take(x, i0, axis=axis).astype(np.float32, copy=False)
    b = np.take(x, i1, axis=axis).astype(np.float32, copy=False)
    a *= np.float32(1) - w1
    b *= w1
    a += b
    return a


@lru_cache(maxsize=1)
def _opencv():
    """cv2, or None where it is not installed (looked for once)."""
    try:
        import cv2  # optional: imported on the first resize, never by importing this module
    except ImportError:
        return None
    return cv2


def resize_backend(backend: str | None = None) -> str:
    """The backend `resize_linear` uses: `backend`, else $BIREFNET_JAX_RESIZE, else "auto";
    "auto" is "opencv" where OpenCV is installed, "numpy" otherwise. Asking for "opencv" where it is
    not installed raises ImportError."""
    choice = backend if backend is not None else (os.environ.get(RESIZE_BACKEND_ENV) or "auto")
    choice = choice.strip().lower()
    if choice not in _BACKENDS:
        source = "backend" if backend is not None else f"${RESIZE_BACKEND_ENV}"
        raise ValueError(f"{source} must be one of {', '.join(_BACKENDS)}; got {choice!r}")
    if choice == "auto":
        return "opencv" if _opencv() is not None else "numpy"
    if choice == "opencv" and _opencv() is None:
        raise ImportError("the 'opencv' resize backend needs opencv-python-headless, which is not installed: "
                          "pip install opencv-python-headless (or use the 'numpy' backend: same numbers, slower)")
    return choice


def resize_linear(image: np.ndarray, size: tuple[int, int], backend: str | None = None) -> np.ndarray:
    """Bilinear resize to (out_h, out_w) as ``cv2.resize(image, (out_w, out_h), INTER_LINEAR)``:
    half-pixel centres, clamped borders, no antialiasing (the original's test-time loader).

    (H, W) or (H, W, C); uint8 in -> uint8 out, float in -> float32 out (computed in float32).

    backend: "opencv" (cv2.resize itself), "numpy", or "auto" (OpenCV where it is installed); None
      reads $BIREFNET_JAX_RESIZE, "auto" when unset. For uint8 the NumPy path is OpenCV's
      fixed-point arithmetic step for step: the same bytes (tests/test_images.py checks it against
      the installed OpenCV), several times slower. For float the two agree to float32 rounding.
      Separable like OpenCV (along the width, then the height), in blocks of output rows that read
      only the input rows they need: a 12000 x 9000 photo is reduced to 1024 x 1024 in O(output)
      memory, never converted whole.
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
    choice = resize_backend(backend)
    h, w = x.shape[:2]
    if (h, w) == (out_h, out_w):
        return x.astype(out_dtype, copy=True)
    channels = x.shape[2] if x.ndim == 3 else 1
    if choice == "opencv" and 1 <= channels <= 512:  # OpenCV's channel limit (CV_CN_MAX)
        out = _opencv().resize(x.astype(out_dtype, copy=False), (out_w, out_h), interpolation=_opencv().INTER_LINEAR)
        return out.reshape((out_h, out_w) + x.shape[2:])  # OpenCV drops a trailing channel axis of 1
    if is_u8 and h == 2 * out_h and w == 2 * out_w:
        return _halve_u8(x)
    return _resize_u8(x, out_h, out_w) if is_u8 else _resize_float(x, out_h, out_w)


def _row_blocks(out_h: int, width: int, channels: int):
    step = max(1, _BLOCK_ELEMENTS // max(1, width * channels))
    for a in range(0, out_h, step):
        yield a, min(a + step, out_h)


def _source_rows(x: np.ndarray, r0: np.ndarray, r1: np.ndarray, a: int, b: int):
    """The input rows output rows a:b read, and where each output row's two rows are among them."""
    lo, hi = int(r0[a]), int(r1[b - 1]) + 1
    if 2 * (b - a) < hi - lo:  # downscaling: only the two rows each output row reads
        return np.take(x, np.concatenate([r0[a:b], r1[a:b]]), axis=0), np.arange(b - a), np.arange(b - a, 2 * (b - a))
    return x[lo:hi], r0[a:b] - lo, r1[a:b] - lo  # upscaling: the band of rows, each read by several


def _resize_float(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """float32 bilinear with OpenCV's taps."""
    h, w = x.shape[:2]
    r0, r1, fr = _linear_taps(h, out_h, clamp=False)
    c0, c1, fc = _linear_taps(w, out_w)
    channels = x.shape[2] if x.ndim == 3 else 1
    out = np.empty((out_h, out_w) + x.shape[2:], np.float32)
    for a, b in _row_blocks(out_h, max(w, out_w), channels):
        src, j0, j1 = _source_rows(x, r0, r1, a, b)
        out[a:b] = _blend(_blend(src, c0, c1, fc, 1), j0, j1, fr[a:b], 0)
    return out


def _resize_u8(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """uint8 INTER_LINEAR in OpenCV's fixed-point arithmetic (its `resizeGeneric_` with the SIMD
    vertical pass): along the width, ``t = p0 * w0 + p1 * w1`` in int32 (weights in 1/2048), then
    along the height ``(((t0 >> 4) * v0 >> 16) + ((t1 >> 4) * v1 >> 16) + 2) >> 2``, saturated."""
    h, w = x.shape[:2]
    r0, r1, _ = _linear_taps(h, out_h, clamp=False)
    v0, v1 = _fixed_weights(h, out_h, False)
    c0, c1, _ = _linear_taps(w, out_w)
    w0, w1 = _fixed_weights(w, out_w, True)
    tail = (1,) * (x.ndim - 2)
    w0, w1 = w0.reshape((1, -1) + tail), w1.reshape((1, -1) + tail)
    channels = x.shape[2] if x.ndim == 3 else 1
    out = np.empty((out_h, out_w) + x.shape[2:], np.uint8)
    for a, b in _row_blocks(out_h, max(w, out_w), channels):
        src, j0, j1 = _source_rows(x, r0, r1, a, b)
        t = np.multiply(np.take(src, c0, axis=1), w0, dtype=np.int32)
        t += np.multiply(np.take(src, c1, axis=1), w1, dtype=np.int32)
        t >>= 4
        top = np.take(t, j0, axis=0)
        top *= v0[a:b].reshape((-1, 1) + tail)
        top >>= 16
        bottom = np.take(t, j1, axis=0)
        bottom *= v1[a:b].reshape((-1, 1) + tail)
        bottom >>= 16
        top += bottom
        top += 2
        top >>= 2
        out[a:b] = top  # within 0..255: the weights are positive and sum to at most 2049
    return out


def _halve_u8(x: np.ndarray) -> np.ndarray:
    """Exactly half the size in both axes: OpenCV switches INTER_LINEAR to its fast INTER_AREA here,
    the mean of each 2 x 2 block, rounded half up for 1, 3 or 4 channels and to nearest even for others."""
    out_h, out_w = x.shape[0] // 2, x.shape[1] // 2
    channels = x.shape[2] if x.ndim == 3 else 1
    out = np.empty((out_h, out_w) + x.shape[2:], np.uint8)
    for a, b in _row_blocks(out_h, 2 * out_w, channels):
        rows = x[2 * a : 2 * b]
        s = rows[0::2, 0::2].astype(np.int32)
        s += rows[0::2, 1::2]
        s += rows[1::2, 0::2]
        s += rows[1::2, 1::2]
        if channels in (1, 3, 4):
            s += 2
            s >>= 2
            out[a:b] = s
        else:
            out[a:b] = np.rint(s * np.float32(0.25))
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
