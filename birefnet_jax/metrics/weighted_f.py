"""Weighted F-measure (Margolin et al., CVPR 2014).

Errors are spread to their neighbours (a 7x7 Gaussian, sigma 5, over an error map in which every
background pixel takes the error of its nearest foreground pixel) and weighted up with the distance
from the foreground. Float64 throughout, on the CPU.

The original takes both the distances and the nearest pixels from scipy's exact Euclidean feature
transform over the whole image. Only two things are actually used, and both are cheaper to get:

- distances, for the weight ``2 - 0.5 ** (d / 5)``: OpenCV's exact Euclidean distance transform gives
  the integer ``d**2``, and the weight of each ``d**2`` is computed once (it is exactly 2 past
  ``d = 266``);
- nearest foreground pixels, only for background pixels within 3 pixels of the foreground (the only
  ones the 7x7 filter carries onto foreground pixels, where its result is used). They lie at most
  sqrt(18) away, so a search over a few offsets finds them; ties go to the smallest column, then the
  smallest row, which is the choice scipy's transform makes.
"""

from __future__ import annotations

import cv2
import numpy as np

from .crop import crop_around
from .levels import EPS

_RADIUS = 3  # the 7x7 filter
_SIGMA = 5.0
# Past this squared distance, 2 - 0.5 ** (d / 5) rounds to exactly 2 in float64.
_FAR = 266**2


def _gaussian_1d() -> np.ndarray:
    x = np.arange(-_RADIUS, _RADIUS + 1, dtype=np.float64)
    k = np.exp(-(x * x) / (2 * _SIGMA * _SIGMA))
    return k / k.sum()


_KERNEL = _gaussian_1d()
# Weight of a background pixel for each squared distance (index 0, a foreground pixel, gives 1).
_WEIGHT = 2 - np.exp(np.log(0.5) / 5 * np.sqrt(np.arange(_FAR + 1, dtype=np.float64)))


def _tie_ordered_offsets() -> dict[int, np.ndarray]:
    """Offsets (dy, dx) within the band's reach, by squared length, each list in tie-break order."""
    reach = 2 * _RADIUS * _RADIUS
    offsets = [(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5) if 0 < dy * dy + dx * dx <= reach]
    out: dict[int, list] = {}
    for dy, dx in sorted(offsets, key=lambda o: (o[1], o[0])):
        out.setdefault(dy * dy + dx * dx, []).append((dy, dx))
    return {d2: np.array(v) for d2, v in sorted(out.items())}


_OFFSETS = _tie_ordered_offsets()


def nearest_foreground_near(gt: np.ndarray, d2: np.ndarray):
    """Nearest foreground pixel of every background pixel within 3 pixels (Chebyshev) of ``gt``.

    Returns (rows, cols, nearest_rows, nearest_cols) of those pixels; ``d2`` is the exact squared
    distance to the foreground.
    """
    window = np.ones((2 * _RADIUS + 1, 2 * _RADIUS + 1), np.uint8)
    band = cv2.dilate(gt.view(np.uint8), window).view(bool) & ~gt
    rows, cols = np.nonzero(band)
    dist2 = d2[rows, cols]
    padded = np.pad(gt, 4)
    near_r, near_c = rows.copy(), cols.copy()
    for length, offsets in _OFFSETS.items():
        pick = np.flatnonzero(dist2 == length)
        for dy, dx in offsets:
            if pick.size == 0:
                break
            r, c = rows[pick] + dy, cols[pick] + dx
            hit = padded[r + 4, c + 4]
            near_r[pick[hit]], near_c[pick[hit]] = r[hit], c[hit]
            pick = pick[~hit]
        if pick.size:
            raise AssertionError("distance transform and neighbourhood disagree")
    return rows, cols, near_r, near_c


def weighted_f_measure(pred: np.ndarray, fg: np.ndarray, levels: np.ndarray, beta: float = 1.0) -> float:
    """Weighted F of ``pred`` (uint8, its grey levels mapped through ``levels``) against ``fg`` (bool).

    An empty ground truth scores 0. ``beta`` multiplies precision linearly, as in the original (it is
    1 there, so the usual beta^2 makes no difference).
    """
    if not fg.any():
        return 0.0
    # Pixels far from the foreground where the prediction is 0 have no error and no influence: the
    # nearest foreground pixel, and so everything else, is the same on a crop around the rest.
    nonzero = cv2.LUT(pred, (levels != 0).astype(np.uint8)).view(bool)
    rows, cols = crop_around(fg | nonzero, _RADIUS)
    pred, gt = np.ascontiguousarray(pred[rows, cols]), np.ascontiguousarray(fg[rows, cols])
    error = cv2.LUT(pred, levels)
    np.copyto(error, cv2.LUT(pred, 1 - levels), where=gt)  # |value - gt|

    dist = cv2.distanceTransform((~gt).view(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    d2 = np.rint(np.square(dist, dtype=np.float64))
    np.minimum(d2, _FAR, out=d2)
    d2 = d2.astype(np.int32)

    spread = error.copy()
    r, c, nr, nc = nearest_foreground_near(gt, d2)
    spread[r, c] = error[nr, nc]
    smoothed = cv2.sepFilter2D(spread, cv2.CV_64F, _KERNEL, _KERNEL, borderType=cv2.BORDER_CONSTANT)
    least = np.where(gt & (smoothed < error), smoothed, error)
    weighted = least * _WEIGHT[d2]
    n_fg = np.count_nonzero(gt)
    missed = weighted[gt].sum()
    false_alarm = weighted.sum() - missed
    tp = n_fg - missed
    recall = 1 - missed / n_fg
    precision = tp / (tp + false_alarm + EPS)
    return float((1 + beta) * recall * precision / (recall + beta * precision + EPS))
