"""Shared pieces of the 256-threshold curves (E-measure, F-measure, BIoU).

Curves follow the original's order: entry ``i`` counts the pixels whose quantised level is at least
``255 - i``, so the first entry is the strictest threshold and the last one takes every pixel.
"""

from __future__ import annotations

import numpy as np


def quantised_histogram(counts: np.ndarray, quantised: np.ndarray) -> np.ndarray:
    """Re-bin (256,) per-grey-level counts into the curve bin that each level quantises to."""
    # Counts are integers far below 2**53, so the float64 weights of bincount are exact.
    return np.rint(np.bincount(quantised, weights=counts, minlength=256)).astype(np.int64)


def at_least(hist: np.ndarray) -> np.ndarray:
    """Number of pixels at or above each threshold, strictest threshold first."""
    return np.cumsum(hist[::-1])
