"""S-measure (structure measure, Fan et al., ICCV 2017) from per-quadrant pixel counts.

The region term splits the image at the ground truth's centre of mass and compares each quadrant with
a global SSIM; the object term compares the foreground and background distributions. Both only need
first and second moments, which the per-quadrant histograms give exactly.

Degenerate splits: when a quadrant has fewer than two pixels (the centre of mass falls on the first or
last row or column), or the foreground or background is a single pixel, the original's variances are
0/0. Its NaN then meets the final ``max(0, S)``, which returns 0. That 0 is reproduced here,
explicitly (pysodmetrics differs there: it divides by N - 1 + eps).
"""

from __future__ import annotations

import math

import numpy as np

from .levels import EPS


def split_point(fg: np.ndarray) -> tuple[int, int]:
    """(row, col) of the quadrant split: the rounded centre of mass of the foreground, plus one.

    Rows ``< row`` form the top half, columns ``< col`` the left half. Sums of indices are exact
    integers, so the rounding (half to even) sees exactly what the original's float mean sees.
    """
    h, w = fg.shape
    rows = np.count_nonzero(fg, axis=1)
    n = int(rows.sum())
    if n == 0:
        return int(np.round(h / 2)) + 1, int(np.round(w / 2)) + 1
    cols = np.count_nonzero(fg, axis=0)
    row_sum = int(rows @ np.arange(h, dtype=np.int64))
    col_sum = int(cols @ np.arange(w, dtype=np.int64))
    return int(np.round(float(row_sum) / n)) + 1, int(np.round(float(col_sum) / n)) + 1


def _object_score(values: np.ndarray, counts: np.ndarray) -> float:
    m = counts.sum()
    mean = counts @ values / m
    std = math.sqrt(counts @ (values - mean) ** 2 / (m - 1))
    return 2 * mean / (mean**2 + 1 + std + EPS)


def _constant_block_mean(value: float, rows: int, cols: int, col_start: int, width: int) -> float:
    # numpy's pairwise mean of a constant block is not always exactly the constant; when a quadrant is
    # constant in both maps, that rounding alone decides between SSIM 1 and 0 in the original. The
    # same strided view of the same constant gives the same rounding.
    block = np.full((rows, width), value)[:, col_start : col_start + cols]
    return float(block.mean())


def _ssim(counts: np.ndarray, levels: np.ndarray, block: tuple[int, int, int, int]) -> float:
    bg, fg = counts.astype(np.float64)
    n_bg, n_fg = bg.sum(), fg.sum()
    m = n_bg + n_fg
    both = bg + fg
    present = np.flatnonzero(both)
    if present.size == 1 and (n_fg == 0 or n_bg == 0):
        value = float(levels[present[0]])
        return 1.0 if _constant_block_mean(value, *block) == value else 0.0
    x = both @ levels / m
    y = n_fg / m
    d = levels - x
    sigma_x = both @ (d * d) / (m - 1)
    sigma_y = (n_bg * (0 - y) ** 2 + n_fg * (1 - y) ** 2) / (m - 1)
    sigma_xy = ((bg @ d) * (0 - y) + (fg @ d) * (1 - y)) / (m - 1)
    alpha = 4 * x * y * sigma_xy
    beta = (x**2 + y**2) * (sigma_x + sigma_y)
    if alpha != 0:
        return float(alpha / (beta + EPS))
    return 1.0 if beta == 0 else 0.0


def s_measure(
    region_counts: np.ndarray,
    levels: np.ndarray,
    split: tuple[int, int],
    shape: tuple[int, int],
    alpha: float = 0.5,
) -> float:
    """S-measure from (4, 2, 256) counts (quadrant TL, TR, BL, BR; gt bg/fg; grey level).

    Args:
      region_counts: counts with the quadrants split at ``split``.
      levels: (256,) normalised value of each grey level.
      split: the (row, col) from ``split_point``.
      shape: (H, W) of the image.
      alpha: weight of the object term against the region term.
    """
    h, w = shape
    n = h * w
    bg, fg = region_counts.sum(axis=0).astype(np.float64)
    n_fg = fg.sum()
    if n_fg == 0:
        return float(1 - (bg @ levels) / n)
    if n_fg == n:
        return float((fg @ levels) / n)
    cy, cx = split
    sizes = (cy * cx, cy * (w - cx), (h - cy) * cx, (h - cy) * (w - cx))
    if n_fg < 2 or n - n_fg < 2 or min(sizes) < 2:
        return 0.0
    u = n_fg / n
    objects = u * _object_score(levels, fg) + (1 - u) * _object_score(1 - levels, bg)

    area = h * w
    w1 = cx * cy / area
    w2 = cy * (w - cx) / area
    w3 = (h - cy) * cx / area
    w4 = 1 - w1 - w2 - w3
    blocks = ((cy, cx, 0, w), (cy, w - cx, cx, w), (h - cy, cx, 0, w), (h - cy, w - cx, cx, w))
    scores = [_ssim(region_counts[q], levels, blocks[q]) for q in range(4)]
    regions = w1 * scores[0] + w2 * scores[1] + w3 * scores[2] + w4 * scores[3]
    return float(max(0.0, alpha * objects + (1 - alpha) * regions))
