"""Weighted F-measure (Margolin et al., CVPR 2014).

Errors are spread to their neighbours (a 7x7 Gaussian, sigma 5, over an error map in which every
background pixel takes the error of its nearest foreground pixel) and weighted up with the distance
from the foreground. The nearest-pixel map needs an exact Euclidean feature transform with the same
tie-breaking as the original (scipy's), so this metric stays on the CPU, in float64.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy.ndimage import distance_transform_edt

from .levels import EPS

_RADIUS = 3
_SIGMA = 5.0


def _gaussian_1d() -> np.ndarray:
    x = np.arange(-_RADIUS, _RADIUS + 1, dtype=np.float64)
    k = np.exp(-(x * x) / (2 * _SIGMA * _SIGMA))
    return k / k.sum()


_KERNEL = _gaussian_1d()


def _crop(mask: np.ndarray, margin: int) -> tuple[slice, slice]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    h, w = mask.shape
    return (
        slice(max(rows[0] - margin, 0), min(rows[-1] + 1 + margin, h)),
        slice(max(cols[0] - margin, 0), min(cols[-1] + 1 + margin, w)),
    )


def weighted_f_measure(pred: np.ndarray, fg: np.ndarray, levels: np.ndarray, beta: float = 1.0) -> float:
    """Weighted F of ``pred`` (uint8, its grey levels mapped through ``levels``) against ``fg`` (bool).

    An empty ground truth scores 0. ``beta`` multiplies precision linearly, as in the original (it is
    1 there, so the usual beta^2 makes no difference).
    """
    if not fg.any():
        return 0.0
    value = levels[pred]
    # Pixels far from the foreground where the prediction is 0 have no error and no influence: the
    # nearest foreground pixel, and so everything else, is the same on a crop around the rest.
    rows, cols = _crop(fg | (value != 0), _RADIUS)
    value, gt = value[rows, cols], fg[rows, cols]
    error = np.where(gt, 1 - value, value)
    dist, (near_r, near_c) = distance_transform_edt(~gt, return_indices=True)
    spread = error.ravel()[near_r.ravel() * gt.shape[1] + near_c.ravel()].reshape(gt.shape)
    smoothed = cv2.sepFilter2D(spread, cv2.CV_64F, _KERNEL, _KERNEL, borderType=cv2.BORDER_CONSTANT)
    least = np.where(gt & (smoothed < error), smoothed, error)
    weight = np.where(gt, 1.0, 2 - np.exp(np.log(0.5) / 5 * dist))
    weighted = least * weight
    n_fg = np.count_nonzero(gt)
    missed = weighted[gt].sum()
    false_alarm = weighted[~gt].sum()
    tp = n_fg - missed
    recall = 1 - missed / n_fg
    precision = tp / (tp + false_alarm + EPS)
    return float((1 + beta) * recall * precision / (recall + beta * precision + EPS))
