"""The value each of the 256 grey levels of a prediction takes once normalised, in float64.

The original evaluator stretches a prediction to [0, 1] (``p / 255``, then min-max, unless the map is
constant) and quantises it back with ``(x * 255).astype(uint8)`` for the threshold curves. The
quantisation truncates, so a level can land one below where it started (``k / 255 * 255`` is not
always ``k``); computing the same float64 operations on the 256 levels instead of on every pixel
gives the very same numbers at no cost.
"""

from __future__ import annotations

import numpy as np

# MATLAB's eps, as the original formulas use it.
EPS = float(np.spacing(1))


def normalised_levels(lo: int, hi: int) -> np.ndarray:
    """(256,) float64 value of each grey level for a prediction whose darkest level is ``lo`` and
    brightest ``hi``. Levels outside [lo, hi] do not occur in the image; they get 0."""
    levels = np.arange(256, dtype=np.float64) / 255
    if hi != lo:
        levels = (levels - levels[lo]) / (levels[hi] - levels[lo])
        levels[:lo] = 0.0
        levels[hi + 1 :] = 0.0
    return levels


def quantised_levels(levels: np.ndarray) -> np.ndarray:
    """(256,) uint8: the bin of the 256-threshold curves that each grey level falls into."""
    return (levels * 255).astype(np.uint8)


def adaptive_threshold(mean_value: float) -> float:
    """Twice the mean prediction, capped at 1 (the usual adaptive threshold of saliency metrics)."""
    return min(2 * mean_value, 1.0)
