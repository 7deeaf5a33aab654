"""Per-pixel counting in JAX: the one pass over the full-resolution pixels that most metrics share.

Every histogram-based metric (MAE, MSE, S-, E- and F-measure, and the BIoU curve) only needs to know,
per grey level, how many pixels of each kind there are. A prediction has at most 256 grey levels, and a
ground truth is binary, so a few thousand integer counts hold everything those metrics need. Counting
is exact in int32, which is why no float64 is needed on the device: the float64 arithmetic that has to
match the original evaluator bit for bit runs afterwards, on the host, over these small tables.

Pixels are flattened and padded to a few bucket lengths (four per octave), so a data set whose images
all differ in size compiles a handful of kernels instead of one per size.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

LEVELS = 256
QUADRANTS = 4
# Layout of one image's counts: [quadrant, gt in {0, 1}, grey level] then [gt edge in {0, 1}, edge level].
REGION_BINS = QUADRANTS * 2 * LEVELS
EDGE_BINS = 2 * LEVELS
TOTAL_BINS = REGION_BINS + EDGE_BINS
_MIN_BUCKET = 4096


def bucket_length(n: int) -> int:
    """Smallest length m * 2**k (m in 4..8) that holds ``n`` pixels: at most 25 % padding."""
    if n <= _MIN_BUCKET:
        return _MIN_BUCKET
    k = max(math.ceil(math.log2(n)) - 3, 0)
    for m in range(4, 9):
        if m * (1 << k) >= n:
            return m * (1 << k)
    raise AssertionError("unreachable")


def _bins(pred, fg, pred_edge, gt_edge, size, width, centre):
    # (B, L) inputs, (B,) sizes and widths, (B, 2) centres -> flat bin indices over the whole batch.
    # One scatter over the batch is much faster on CPU than a vmapped one.
    b, length = pred.shape
    index = jnp.arange(length, dtype=jnp.int32)[None, :]
    row = index // width[:, None]
    col = index - row * width[:, None]
    top = (row >= centre[:, :1]).astype(jnp.int32)
    right = (col >= centre[:, 1:]).astype(jnp.int32)
    region = ((2 * top + right) * 2 + fg.astype(jnp.int32)) * LEVELS + pred.astype(jnp.int32)
    image = jnp.arange(b, dtype=jnp.int32)[:, None]
    valid = index < size[:, None]
    # Padding goes to one extra bin at the end, dropped afterwards.
    region = jnp.where(valid, region + image * REGION_BINS, b * REGION_BINS).ravel()
    edge = None
    if pred_edge is not None:
        edge = gt_edge.astype(jnp.int32) * LEVELS + pred_edge.astype(jnp.int32)
        edge = jnp.where(valid, edge + image * EDGE_BINS, b * EDGE_BINS).ravel()
    return region, edge


@partial(jax.jit, static_argnames=("with_edges",))
def _count_batch(pred, fg, pred_edge, gt_edge, size, width, centre, *, with_edges):
    b = pred.shape[0]
    if not with_edges:
        pred_edge = gt_edge = None
    region, edge = _bins(pred, fg, pred_edge, gt_edge, size, width, centre)
    region = jnp.bincount(region, length=b * REGION_BINS + 1)[:-1].reshape(b, REGION_BINS)
    if edge is None:
        edge = jnp.zeros((b, EDGE_BINS), region.dtype)
    else:
        edge = jnp.bincount(edge, length=b * EDGE_BINS + 1)[:-1].reshape(b, EDGE_BINS)
    return jnp.concatenate([region, edge], axis=1)


def count_pixels(
    pred: np.ndarray,
    fg: np.ndarray,
    centre: np.ndarray,
    pred_edge: np.ndarray | None = None,
    gt_edge: np.ndarray | None = None,
) -> np.ndarray:
    """Joint pixel counts for a batch of same-sized images.

    Args:
      pred: (B, H, W) uint8 predictions.
      fg: (B, H, W) bool ground-truth foreground.
      centre: (B, 2) int (row, col) where the S-measure splits the image into quadrants: rows
        ``< centre[0]`` are the top half, columns ``< centre[1]`` the left half.
      pred_edge, gt_edge: optional (B, H, W) uint8 / bool boundary maps for the BIoU curve.

    Returns:
      (B, TOTAL_BINS) int64 counts; see ``split_counts``.
    """
    if pred.ndim != 3 or pred.shape != fg.shape:
        raise ValueError(f"pred and fg must be (B, H, W) of one shape, got {pred.shape} and {fg.shape}")
    b, h, w = pred.shape
    n = h * w
    length = bucket_length(n)

    def flat(a, dtype):
        out = np.zeros((b, length), dtype)
        out[:, :n] = a.reshape(b, n)
        return out

    with_edges = pred_edge is not None
    sizes = np.full((b,), n, np.int32)
    widths = np.full((b,), w, np.int32)
    centre = np.asarray(centre, np.int32).reshape(b, 2)
    p, f = flat(pred, np.uint8), flat(fg, np.uint8)
    if with_edges:
        pe, ge = flat(pred_edge, np.uint8), flat(gt_edge, np.uint8)
    else:
        pe = ge = np.zeros((b, 1), np.uint8)
    counts = _count_batch(p, f, pe, ge, sizes, widths, centre, with_edges=with_edges)
    return np.asarray(counts).astype(np.int64)


def split_counts(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(TOTAL_BINS,) counts -> region counts (4 quadrants, 2 gt values, 256 levels), edge counts (2, 256)."""
    region = counts[:REGION_BINS].reshape(QUADRANTS, 2, LEVELS)
    edge = counts[REGION_BINS:].reshape(2, LEVELS)
    return region, edge
