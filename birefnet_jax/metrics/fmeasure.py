"""F-measure (beta^2 = 0.3 by default) and the precision-recall curve, from pixel counts."""

from __future__ import annotations

import numpy as np

from .curves import at_least

BETA2 = 0.3


def precision_recall_f(fg_hist: np.ndarray, bg_hist: np.ndarray, beta2: float = BETA2):
    """(256,) precision, recall and F-measure at each threshold.

    A threshold that selects no pixel has precision 0 (not 0/0); an empty ground truth has recall 0;
    F is 0 wherever precision * recall is.
    """
    tp = at_least(fg_hist)
    selected = tp + at_least(bg_hist)
    selected[selected == 0] = 1
    positives = max(int(fg_hist.sum()), 1)
    precision = tp / selected
    recall = tp / positives
    numerator = (1 + beta2) * precision * recall
    denominator = np.where(numerator == 0, 1, beta2 * precision + recall)
    return precision, recall, numerator / denominator


def f_measure_adaptive(counts: np.ndarray, levels: np.ndarray, threshold: float, beta2: float = BETA2) -> float:
    """F-measure of the prediction binarised at ``threshold`` (0 when nothing it selects is foreground)."""
    bg, fg = counts
    keep = levels >= threshold
    hit = int(fg[keep].sum())
    if hit == 0:
        return 0.0
    precision = hit / (hit + int(bg[keep].sum()))
    recall = hit / int(fg.sum())
    return float((1 + beta2) * precision * recall / (beta2 * precision + recall))
