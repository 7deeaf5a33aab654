"""Standard DIS metrics, matching the original BiRefNet evaluator, with JAX doing the pixel counting.

``Evaluator`` accumulates pairs of uint8 prediction / ground-truth maps and reports the data set's
means (S-measure, MAE, MSE, weighted F, HCE, mBA, E- / F-measure adaptive + mean + max of the
256-threshold curves, BIoU mean + max); ``evaluate_pair`` / ``evaluate_batch`` give per-pair results.
See docs/metrics.md for the definitions and the values chosen where the original divides by zero.
"""

from birefnet_jax._optional import require

for _module in ("cv2", "skimage"):  # the `eval` extra: a clear message instead of a bare ImportError
    require(_module, "the DIS metrics (birefnet_jax.metrics, eval.py)")

from .evaluator import (  # noqa: E402
    ALL_METRICS,
    Evaluator,
    PairResult,
    evaluate_batch,
    evaluate_pair,
    skeleton_of,
)
from .folders import evaluate_folders  # noqa: E402
from .io import PairingError, pair_by_stem, read_gray  # noqa: E402
from .report import TASK_COLUMNS, columns_for, format_table  # noqa: E402

__all__ = [
    "ALL_METRICS",
    "Evaluator",
    "PairResult",
    "PairingError",
    "TASK_COLUMNS",
    "columns_for",
    "evaluate_batch",
    "evaluate_folders",
    "evaluate_pair",
    "format_table",
    "pair_by_stem",
    "read_gray",
    "skeleton_of",
]
