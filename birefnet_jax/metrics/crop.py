"""Cropping to where a metric can see anything: the geometric metrics are local, so work outside a
margin around the masks is wasted (each caller says why its margin keeps results exact)."""

from __future__ import annotations

import cv2
import numpy as np


def crop_around(mask: np.ndarray, margin: int) -> tuple[slice, slice] | None:
    """Slices of the bounding box of ``mask`` (bool) grown by ``margin`` and clipped to
    the image; None when ``mask`` is empty."""
    x, y, w, h = cv2.boundingRect(np.ascontiguousarray(mask).view(np.uint8))
    if w == 0:
        return None
    rows, cols = mask.shape
    return (slice(max(y - margin, 0), min(y + h + margin, rows)),
            slice(max(x - margin, 0), min(x + w + margin, cols)))
