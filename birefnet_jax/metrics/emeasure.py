"""E-measure (enhanced alignment, Fan et al., IJCAI 2018) from pixel counts.

For a binarised prediction only four numbers matter: how many pixels are (predicted fg, gt fg),
(fg, bg), (bg, fg) and (bg, bg). Each class has one alignment value, so the enhanced alignment
matrix sums to four products; this holds for one threshold and, element-wise, for the whole curve.
"""

from __future__ import annotations

import numpy as np

from .curves import at_least
from .levels import EPS


def enhanced_alignment(fg_fg, fg_bg, n_fg: int, n: int):
    """E-measure of a binary map with ``fg_fg`` true and ``fg_bg`` false positives (scalars or arrays).

    A ground truth that is all background (or all foreground) has no alignment to speak of: the score
    is then the fraction of pixels predicted background (or foreground), as in the original.
    """
    pred_fg = fg_fg + fg_bg
    pred_bg = n - pred_fg
    if n_fg == 0:
        total = pred_bg
    elif n_fg == n:
        total = pred_fg
    else:
        bg_fg = n_fg - fg_fg
        bg_bg = pred_bg - bg_fg
        mean_pred = pred_fg / n
        mean_gt = n_fg / n
        parts = (
            (fg_fg, 1 - mean_pred, 1 - mean_gt),
            (fg_bg, 1 - mean_pred, 0 - mean_gt),
            (bg_fg, 0 - mean_pred, 1 - mean_gt),
            (bg_bg, 0 - mean_pred, 0 - mean_gt),
        )
        total = 0
        for count, a, b in parts:
            align = 2 * (a * b) / (a**2 + b**2 + EPS)
            total = total + (align + 1) ** 2 / 4 * count
    return total / (n - 1 + EPS)


def e_measure_curve(fg_hist: np.ndarray, bg_hist: np.ndarray, n_fg: int, n: int) -> np.ndarray:
    """(256,) E-measure at each threshold, from quantised histograms of gt-fg and gt-bg pixels."""
    return np.asarray(enhanced_alignment(at_least(fg_hist), at_least(bg_hist), n_fg, n), np.float64)


def e_measure_adaptive(counts: np.ndarray, levels: np.ndarray, threshold: float) -> float:
    """E-measure of the prediction binarised at ``threshold`` (on normalised values)."""
    bg, fg = counts
    keep = levels >= threshold
    n_fg = int(fg.sum())
    n = n_fg + int(bg.sum())
    return float(enhanced_alignment(int(fg[keep].sum()), int(bg[keep].sum()), n_fg, n))
