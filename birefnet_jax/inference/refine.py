"""Foreground colour estimation for RGBA cut-outs ("blur fusion", as BiRefNet's `refine_foreground`).

Compositing an image over a new background with a soft mask leaves a halo of the old background in the
semi-transparent pixels. Blur fusion estimates the foreground colour F of every pixel from box-blurred,
alpha-weighted averages of the image: a first pass with a large window (radius 90) where F = B = the image,
then a pass with a 6-pixel window seeded with the first pass's F and blurred B.

Everything is a box filter, so the cost is set by how the box filter is computed. Here it is O(1) per pixel
whatever the window, and accurate in float32 (see `box_blur`). Two border rules are offered because the
original has two implementations that disagree at the image border (and by one pixel for even windows):

* ``border="replicate"``: the original's tensor (GPU) version, edge replication, and for even windows one
  more pixel after the centre than before;
* ``border="reflect101"``: the original's OpenCV (CPU) version, `cv2.blur` with its default reflect-101
  border (``gfedcb|abcdefgh|gfedcba``), and for even windows one more pixel before the centre.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Border = Literal["replicate", "reflect101"]

BORDERS: tuple[str, ...] = ("replicate", "reflect101")
FINE_RADIUS = 6  # window of the second pass; fixed in the original
_EPS = 1e-5  # keeps the alpha-weighted means finite where the window holds no foreground (or no background)
_PAD_MODE = {"replicate": "edge", "reflect101": "reflect"}  # NumPy's "reflect" skips the edge pixel: reflect-101
# Windows up to this size are summed directly (at most this many adds per pixel, one fused pass over memory);
# larger ones use the blocked scan, whose cost per pixel does not grow with the window.
_DIRECT_MAX = 8
_U8_TO_UNIT = np.arange(256, dtype=np.float32) / np.float32(255)


def default_anchor(size: int, border: str) -> int:
    """Offset of the output pixel inside its window: the two originals differ for even sizes (see module doc)."""
    _check_border(border)
    return size // 2 if border == "reflect101" else (size - 1) // 2


@functools.partial(jax.jit, static_argnames=("size", "border", "anchor"))
def box_blur(x: jax.Array, size: int, border: Border = "replicate", *, anchor: int | None = None) -> jax.Array:
    """Mean over a `size` x `size` window of a (..., H, W, C) array, separably over H then W.

    `anchor` is how many pixels of the window come before the output pixel along each axis (OpenCV's
    meaning); by default it follows the original that `border` reproduces (`default_anchor`). The window may
    be larger than the image: the border rule then repeats (reflect-101 folds back and forth, as OpenCV does).

    Why not a convolution or a plain cumulative sum: a dense k x k (or k-tap separable) filter costs O(k) per
    pixel, and the difference of two running sums along a 4000-pixel row loses about 3 digits in float32.
    Each axis is split into blocks of `size` samples instead; a window always spans the tail of one block and
    the head of the next, so its sum is ``(block total - prefix before the start) + prefix of the next block
    before the end``. Every term sums at most `size` samples, so the float32 error stays that of a `size`-term
    sum whatever the image width, a window of zeros sums to exactly zero, and the work per pixel is a constant.
    """
    _check_border(border)
    size = int(size)
    if size < 1:
        raise ValueError(f"box_blur: size must be >= 1, got {size}")
    x = jnp.asarray(x)
    if x.ndim < 3:
        raise ValueError(f"box_blur: expected (..., H, W, C), got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    anchor = default_anchor(size, border) if anchor is None else int(anchor)
    if not 0 <= anchor < size:
        raise ValueError(f"box_blur: anchor must be in [0, {size}), got {anchor}")
    if size == 1:
        return x
    mode = _PAD_MODE[border]
    y = _window_sums(x, size, x.ndim - 3, anchor, mode)
    y = _window_sums(y, size, x.ndim - 2, anchor, mode)
    return y / jnp.asarray(size * size, x.dtype)


def _check_border(border: str) -> None:
    if border not in BORDERS:
        raise ValueError(f"border must be one of {BORDERS}, got {border!r}")


def _window_sums(x: jax.Array, size: int, axis: int, anchor: int, mode: str) -> jax.Array:
    """Sums of `size` consecutive samples along `axis`, window [i - anchor, i - anchor + size)."""
    n = x.shape[axis]
    before, after = anchor, size - 1 - anchor
    if mode == "reflect" and max(before, after) >= n:
        # Window wider than the image: fold the index back and forth (what OpenCV does) with one gather,
        # rather than jnp.pad's chain of repeated reflections.
        p = jnp.take(x, _reflect101_indices(n, before, after), axis=axis)
    else:
        pads = [(0, 0)] * x.ndim
        pads[axis] = (before, after)
        p = jnp.pad(x, pads, mode=mode)  # p[i : i + size] is the window of output i
    if size <= _DIRECT_MAX:
        out = lax.slice_in_dim(p, 0, n, axis=axis)
        for j in range(1, size):
            out = out + lax.slice_in_dim(p, j, j + n, axis=axis)
        return out
    # Blocks of `size` samples along a leading axis, so that one lax.scan step handles one position in
    # every block at once: `size` sequential steps, each over 1/size of the data.
    rest = x.shape[:axis] + x.shape[axis + 1 :]
    p = jnp.moveaxis(p, axis, 0).reshape(n + size - 1, -1)
    blocks = -(-(n + size) // size)  # the last window's end reaches index n - 1 + size
    p = jnp.pad(p, ((0, blocks * size - p.shape[0]), (0, 0)))
    p = p.reshape(blocks, size, -1).swapaxes(0, 1)  # (size, blocks, R): position in block first

    def step(carry, sample):
        # Compensated (Kahan) running sum: the error stays at a few ulps however long the block is.
        running, lost = carry
        y = sample - lost
        t = running + y
        return (t, (t - running) - y), running - lost  # emit the sum of the samples before this one

    zeros = jnp.zeros_like(p[0])
    (running, lost), head = lax.scan(step, (zeros, zeros), p)  # head[j, b]: sum of block b before position j
    totals = running - lost
    # window starting at position j of block b = rest of block b + head of block b + 1
    sums = (totals[None, :-1] - head[:, :-1]) + head[:, 1:]  # (size, blocks - 1, R)
    sums = sums.swapaxes(0, 1).reshape((blocks - 1) * size, -1)[:n]
    return jnp.moveaxis(sums.reshape((n,) + rest), 0, axis)


def _reflect101_indices(n: int, before: int, after: int) -> np.ndarray:
    """Source index of every sample of the reflect-101 padded axis, for pads of any length."""
    i = np.arange(-before, n + after)
    if n == 1:
        return np.zeros_like(i)
    period = 2 * (n - 1)
    i = np.mod(i, period)
    return np.where(i < n, i, period - i)


def _fuse(image, fg, bg, alpha, size: int, border: str):
    """One blur-fusion pass: alpha-weighted local means of F and B, then F corrected so that the composite
    alpha * F + (1 - alpha) * B reproduces the image. Returns (F clipped to [0, 1], blurred B)."""
    c = image.shape[-1]
    blurred = box_blur(jnp.concatenate([alpha, fg * alpha, bg * (1 - alpha)], axis=-1), size, border)
    b_alpha = blurred[..., :1]
    b_fg = blurred[..., 1 : 1 + c] / (b_alpha + _EPS)
    b_bg = blurred[..., 1 + c :] / ((1 - b_alpha) + _EPS)
    fg = b_fg + alpha * (image - alpha * b_fg - (1 - alpha) * b_bg)
    return jnp.clip(fg, 0, 1), b_bg


def estimate_foreground(image: jax.Array, alpha: jax.Array, radius: int = 90, *, border: Border = "replicate"):
    """Foreground colours in [0, 1] of `image` under the soft mask `alpha` (both in [0, 1]).

    image: (B, H, W, C) or (H, W, C); alpha: the same leading shape, with or without a trailing 1.
    Two passes as the original: a `radius` x `radius` window (the original calls the window side its
    radius) with F = B = image, then a 6 x 6 window from the first F and blurred B. `border` picks which
    original is reproduced: "replicate" (tensor) or "reflect101" (OpenCV).

    Shapes are normalised here, outside the compiled function, so that an image and a batch of one, or a
    mask with or without its trailing 1, share one compilation; usable inside `jax.jit` (radius and border
    static).
    """
    _check_border(border)
    image = jnp.asarray(image, jnp.float32)
    alpha = jnp.asarray(alpha, jnp.float32)
    if alpha.ndim == image.ndim - 1:
        alpha = alpha[..., None]
    if image.ndim not in (3, 4) or alpha.shape != image.shape[:-1] + (1,):
        raise ValueError(
            f"estimate_foreground: image must be (B,H,W,C) or (H,W,C) and alpha the same without C (or with a"
            f" trailing 1); got image {image.shape}, alpha {alpha.shape}"
        )
    if image.ndim == 3:
        return _estimate(image[None], alpha[None], int(radius), border)[0]
    return _estimate(image, alpha, int(radius), border)


@functools.partial(jax.jit, static_argnames=("radius", "border"))
def _estimate(image, alpha, radius: int, border: str):
    fg, blurred_bg = _fuse(image, image, image, alpha, radius, border)
    return _fuse(image, fg, blurred_bg, alpha, FINE_RADIUS, border)[0]


def refine_foreground(image_uint8, mask_uint8, radius: int = 90, border: Border = "replicate") -> np.ndarray:
    """uint8 (H, W, 3) image and (H, W) mask (or anything `np.asarray` takes, e.g. PIL images) -> uint8
    (H, W, 3) foreground, ready to be stacked with the mask as an RGBA cut-out.

    Scaled by 1/255 and truncated back like the original (``(fg * 255).astype(uint8)``); the uint8 arrays
    are what travels to and from the device. The default border follows the original's default (tensor)
    path. The blur fusion is compiled once per shape, radius and border (shared with `estimate_foreground`).
    Unlike the original, a mask of another size is refused rather than resized.
    """
    image = np.asarray(image_uint8)
    mask = np.asarray(mask_uint8)
    if mask.ndim == 3 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if image.ndim != 3 or mask.shape != image.shape[:2]:
        raise ValueError(f"refine_foreground: expected (H, W, C) image, (H, W) mask; got {image.shape}, {mask.shape}")
    if image.dtype != np.uint8 or mask.dtype != np.uint8:
        raise TypeError(f"refine_foreground: expected uint8 arrays, got {image.dtype} and {mask.dtype}")
    # x / 255 through a 256-entry table made on the host: bit-identical to the originals' float32 division on
    # every backend (an accelerator may divide by a constant through its reciprocal, 1 ulp off).
    unit = jnp.asarray(_U8_TO_UNIT)
    fg = estimate_foreground(unit[jnp.asarray(image)], unit[jnp.asarray(mask)], radius, border=border)
    return np.asarray((fg * np.float32(255)).astype(jnp.uint8))  # float -> uint8 truncates, as the originals


@functools.partial(jax.jit, static_argnames=("radius",))
def _refine_strip(image, mask, radius: int):
    unit = jnp.asarray(_U8_TO_UNIT)
    fg = _estimate(unit[image][None], unit[mask][None, ..., None], radius, "replicate")[0]
    return (fg * np.float32(255)).astype(jnp.uint8)


def refine_foreground_strips(image_uint8: np.ndarray, mask_uint8: np.ndarray, radius: int = 90, *,
                             strip_rows: int = 512, width_step: int = 256) -> np.ndarray:
    """`refine_foreground` (replicate border) for images of any size, in bounded memory and a few
    compilations: the image is processed in horizontal strips of `strip_rows` rows plus a halo of
    real neighbouring rows on each side, and the width is edge-padded to a multiple of `width_step`.

    Exact, not an approximation: with a replicated border, edge padding gives the same windows as the
    border rule, and each output row depends only on rows within `radius // 2 + FINE_RADIUS` of it,
    which the halo covers. Device memory is a few strip-sized float arrays whatever the image size
    (a 12000x9000 image runs in 18 strips of ~700x12032 pixels); one program per padded width.
    """
    image = np.asarray(image_uint8)
    mask = np.asarray(mask_uint8)
    if image.ndim != 3 or mask.shape != image.shape[:2] or image.dtype != np.uint8 or mask.dtype != np.uint8:
        raise ValueError(f"expected uint8 (H, W, C) image and (H, W) mask, got {image.shape} {image.dtype}, "
                         f"{mask.shape} {mask.dtype}")
    h, w = mask.shape
    halo = radius // 2 + FINE_RADIUS + 2
    width = -(-w // width_step) * width_step
    out = np.empty_like(image)
    for start in range(0, h, strip_rows):
        lo, hi = start - halo, start + strip_rows + halo
        rows = slice(max(lo, 0), min(hi, h))
        pad = ((max(0, -lo), max(0, hi - h)), (0, width - w))
        strip_img = np.pad(image[rows], (*pad, (0, 0)), mode="edge")
        strip_mask = np.pad(mask[rows], pad, mode="edge")
        fg = np.asarray(_refine_strip(strip_img, strip_mask, int(radius)))
        n = min(strip_rows, h - start)
        out[start : start + n] = fg[halo : halo + n, :w]
    return out
