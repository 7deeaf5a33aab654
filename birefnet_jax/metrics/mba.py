"""Mean boundary accuracy (mBA, from CascadePSP): pixel accuracy inside bands around the ground truth's
border, averaged over five band widths that grow with the image size.

A ground truth without any border (empty, or all foreground) has no band, and its accuracy is a
division by zero (the original returns NaN, which then turns the data set's mean into NaN). Here such
an image returns NaN and is left out of the data set's mean: mBA measures boundaries, and an image
without one says nothing about them. A data set's mBA is thus the original's value over the images
where the original's is defined; it is NaN only when no image of the set has a border at all.
"""

from __future__ import annotations

import cv2
import numpy as np

from .crop import crop_around

STEPS = 5


def band_radii(shape: tuple[int, int], steps: int = STEPS) -> list[int]:
    """Radii of the bands, from 1 up to (H + W) / 300 in ``steps`` truncated steps."""
    h, w = shape
    top = (w + h) / 300
    return [1 + int((top - 1) / steps * i) for i in range(steps)]


def boundary_accuracy(pred: np.ndarray, fg: np.ndarray) -> float:
    """mBA of one pair: ``pred`` uint8 (thresholded at > 128), ``fg`` bool ground truth.

    Returns NaN when the ground truth has no border (see the module docstring).
    """
    radii = band_radii(fg.shape)
    # Bands never reach further than the largest radius from the foreground: work on that crop.
    # A margin of background around the foreground keeps the morphology identical to the full image.
    box = crop_around(fg, max(radii) + 1)
    if box is None:
        return float("nan")
    gt = fg[box].astype(np.uint8)
    correct = (pred[box] > 128) == fg[box]
    accuracies = []
    per_radius: dict[int, float] = {}
    for radius in radii:
        if radius not in per_radius:
            kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
            band = cv2.morphologyEx(gt, cv2.MORPH_GRADIENT, kernel).view(bool)
            size = np.count_nonzero(band)
            if size == 0:
                return float("nan")
            per_radius[radius] = np.count_nonzero(band & correct) / size
        accuracies.append(per_radius[radius])
    return float(sum(accuracies) / len(accuracies))
