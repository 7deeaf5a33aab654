"""Mean absolute and mean squared error of the normalised prediction against the binary ground truth."""

from __future__ import annotations

import numpy as np


def mae_mse(counts: np.ndarray, levels: np.ndarray) -> tuple[float, float]:
    """MAE and MSE from (2, 256) counts (rows: background, foreground pixels of each grey level).

    The error of a level is ``levels`` on the background and ``1 - levels`` on the foreground, so both
    means are two dot products over 256 levels instead of a pass over the pixels.
    """
    bg, fg = counts.astype(np.float64)
    n = bg.sum() + fg.sum()
    miss = 1.0 - levels
    mae = (bg @ levels + fg @ miss) / n
    mse = (bg @ (levels * levels) + fg @ (miss * miss)) / n
    return float(mae), float(mse)
