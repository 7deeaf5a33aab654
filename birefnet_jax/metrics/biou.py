"""Boundary IoU (Cheng et al., CVPR 2021): IoU restricted to a band inside each mask's border.

Each mask keeps only its pixels within ``d`` of its own border (``d`` = 2 % of the image diagonal,
pixels outside the image counting as background); for the grey prediction the band keeps the
difference between the map and its erosion. The IoU is then taken at every threshold, like the
F-measure curve.
"""

from __future__ import annotations

import cv2
import numpy as np

from .curves import at_least

DILATION_RATIO = 0.02


def band_width(shape: tuple[int, int], ratio: float = DILATION_RATIO) -> int:
    """Width of the boundary band in pixels: ``ratio`` of the diagonal, rounded half to even, at least 1."""
    h, w = shape
    return max(int(round(ratio * np.sqrt(h**2 + w**2))), 1)


def inner_band(image: np.ndarray, width: int) -> np.ndarray:
    """``image`` minus its grey erosion by a (2 width + 1)^2 square, zero outside the image (uint8)."""
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (2 * width + 1, 2 * width + 1))
    eroded = cv2.erode(image, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    return cv2.subtract(image, eroded)


def biou_curve(edge_counts: np.ndarray) -> np.ndarray:
    """(256,) boundary IoU per threshold from (2, 256) counts of the prediction's band values, split by
    whether the pixel is in the ground truth's band. An empty ground-truth band counts as one pixel."""
    outside, inside = edge_counts
    tp = at_least(inside)
    fp = at_least(outside)
    positives = max(int(inside.sum()), 1)
    return tp / (positives + fp)
