"""Per-pair evaluation and the data-set means, as the original DIS evaluator reports them.

One pair goes through three stages: cheap preparation on the host (grey-level tables, the S-measure's
split point, BIoU's boundary bands), one jitted JAX pass that counts pixels (shared by MAE, MSE, S-,
E-, F-measure and BIoU, batched over same-sized pairs), then float64 arithmetic over those counts on
the host; the metrics that need geometry (weighted F, HCE, mBA) run on the CPU with SciPy / OpenCV.

Means over a data set are plain means over images (curves are averaged point-wise, and the mean /
max of a curve is taken on the averaged curve), except mBA, which skips images whose ground truth has
no border (see ``birefnet_jax.metrics.mba``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from . import biou as _biou
from .curves import quantised_histogram
from .emeasure import e_measure_adaptive, e_measure_curve
from .errors import mae_mse
from .fmeasure import f_measure_adaptive, precision_recall_f
from .hce import gt_skeleton, human_correction_effort
from .histogram import count_pixels, split_counts
from .levels import adaptive_threshold, normalised_levels, quantised_levels
from .mba import boundary_accuracy
from .smeasure import s_measure, split_point
from .weighted_f import weighted_f_measure

# The original's metric switches.
ALL_METRICS = ("S", "MAE", "E", "F", "WF", "MBA", "BIoU", "MSE", "HCE")
_COUNTED = {"S", "MAE", "MSE", "E", "F", "BIoU"}
_SCALARS = ("S", "MAE", "MSE", "wF", "HCE", "MBA", "E_adp", "F_adp")
_CURVES = ("E_curve", "F_curve", "precision", "recall", "BIoU_curve")


@dataclass
class PairResult:
    """Metrics of one prediction / ground-truth pair; None for metrics that were not asked for.

    Curves have 256 entries, strictest threshold (255) first.
    """

    name: str | None = None
    S: float | None = None
    MAE: float | None = None
    MSE: float | None = None
    wF: float | None = None
    HCE: int | None = None
    MBA: float | None = None
    E_adp: float | None = None
    F_adp: float | None = None
    E_curve: np.ndarray | None = field(default=None, repr=False)
    F_curve: np.ndarray | None = field(default=None, repr=False)
    precision: np.ndarray | None = field(default=None, repr=False)
    recall: np.ndarray | None = field(default=None, repr=False)
    BIoU_curve: np.ndarray | None = field(default=None, repr=False)

    def scalars(self) -> dict:
        """The per-image numbers (curves summarised by their max and mean), for tables."""
        out = {k: getattr(self, k) for k in _SCALARS if getattr(self, k) is not None}
        for key, curve in (("E", self.E_curve), ("F", self.F_curve), ("BIoU", self.BIoU_curve)):
            if curve is not None:
                out[f"max{key}"] = float(curve.max())
                out[f"mean{key}"] = float(curve.mean())
        return out


def _check_metrics(metrics: Iterable[str]) -> frozenset[str]:
    chosen = frozenset(metrics)
    unknown = chosen - set(ALL_METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {list(ALL_METRICS)}")
    return chosen


def _as_uint8_stack(a, what: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != np.uint8:
        raise TypeError(f"{what} must be uint8 grey images (0-255), got dtype {a.dtype}")
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(f"{what} must be (H, W) or (B, H, W), got shape {a.shape}")
    return np.ascontiguousarray(a)


def evaluate_batch(
    preds,
    gts,
    metrics: Iterable[str] = ALL_METRICS,
    skeletons: Sequence[np.ndarray | None] | None = None,
    names: Sequence[str | None] | None = None,
) -> list[PairResult]:
    """Metrics of a batch of same-sized pairs.

    Args:
      preds: (B, H, W) or (H, W) uint8 predictions, already at the ground truth's size.
      gts: uint8 ground truths of the same shape (foreground is > 128).
      metrics: any of ``ALL_METRICS`` (the original's names: 'WF' gives ``wF``, 'E' the adaptive E
        and the curve, 'F' the adaptive F, the curve and precision / recall).
      skeletons: optional ground-truth skeletons (bool, full size) for HCE, e.g. cached between runs;
        computed when missing.
      names: optional names stored in the results.
    """
    chosen = _check_metrics(metrics)
    preds = _as_uint8_stack(preds, "predictions")
    gts = _as_uint8_stack(gts, "ground truths")
    if preds.shape != gts.shape:
        raise ValueError(f"predictions {preds.shape} and ground truths {gts.shape} differ in shape")
    b, h, w = preds.shape
    fgs = gts > 128
    results = [PairResult(name=None if names is None else names[i]) for i in range(b)]

    levels, quantised, splits = [], [], []
    for i in range(b):
        lo, hi, _, _ = cv2.minMaxLoc(preds[i])
        levels.append(normalised_levels(int(lo), int(hi)))
        quantised.append(quantised_levels(levels[-1]))
        splits.append(split_point(fgs[i]) if "S" in chosen else (0, 0))

    if chosen & _COUNTED:
        pred_edges = gt_edges = None
        if "BIoU" in chosen:
            width = _biou.band_width((h, w))
            pred_edges = np.stack([_biou.inner_band(cv2.LUT(preds[i], quantised[i]), width) for i in range(b)])
            gt_edges = np.stack([_biou.inner_band(fgs[i].view(np.uint8), width) for i in range(b)])
        counts = count_pixels(preds, fgs, np.array(splits), pred_edges, gt_edges)
        for i, r in enumerate(results):
            _from_counts(r, counts[i], levels[i], quantised[i], splits[i], (h, w), chosen)

    for i, r in enumerate(results):
        if "WF" in chosen:
            r.wF = weighted_f_measure(preds[i], fgs[i], levels[i])
        if "HCE" in chosen:
            skeleton = None if skeletons is None else skeletons[i]
            r.HCE = human_correction_effort(preds[i], fgs[i], skeleton)
        if "MBA" in chosen:
            r.MBA = boundary_accuracy(preds[i], fgs[i])
    return results


def _from_counts(r: PairResult, counts, levels, quantised, split, shape, chosen) -> None:
    region, edge = split_counts(counts)
    both = region.sum(axis=0)  # (gt bg / fg, level)
    n_fg = int(both[1].sum())
    n = shape[0] * shape[1]
    if "MAE" in chosen or "MSE" in chosen:
        mae, mse = mae_mse(both, levels)
        r.MAE = mae if "MAE" in chosen else None
        r.MSE = mse if "MSE" in chosen else None
    if "S" in chosen:
        r.S = s_measure(region, levels, split, shape)
    if "E" in chosen or "F" in chosen:
        threshold = adaptive_threshold(float(both.sum(axis=0) @ levels / n))
        fg_hist = quantised_histogram(both[1], quantised)
        bg_hist = quantised_histogram(both[0], quantised)
        if "E" in chosen:
            r.E_adp = e_measure_adaptive(both, levels, threshold)
            r.E_curve = e_measure_curve(fg_hist, bg_hist, n_fg, n)
        if "F" in chosen:
            r.F_adp = f_measure_adaptive(both, levels, threshold)
            r.precision, r.recall, r.F_curve = precision_recall_f(fg_hist, bg_hist)
    if "BIoU" in chosen:
        r.BIoU_curve = _biou.biou_curve(edge)


def evaluate_pair(
    pred: np.ndarray,
    gt: np.ndarray,
    metrics: Iterable[str] = ALL_METRICS,
    skeleton: np.ndarray | None = None,
    name: str | None = None,
) -> PairResult:
    """Metrics of one pair (uint8 grey images). A prediction of another size is first resized to the
    ground truth's with OpenCV's bilinear ``resize``, as the original evaluator does."""
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.ndim == 2 and gt.ndim == 2 and pred.shape != gt.shape:
        pred = cv2.resize(pred, (gt.shape[1], gt.shape[0]))
    return evaluate_batch(pred, gt, metrics, None if skeleton is None else [skeleton], [name])[0]


class Evaluator:
    """Accumulates pairs and reports the data set's metrics.

    >>> ev = Evaluator()
    >>> for pred, gt in pairs:
    ...     ev.update(pred, gt)
    >>> ev.results()['S']
    """

    def __init__(self, metrics: Iterable[str] = ALL_METRICS):
        self.metrics = _check_metrics(metrics)
        self.pairs: list[PairResult] = []

    def __len__(self) -> int:
        return len(self.pairs)

    def add(self, result: PairResult) -> None:
        """Adds a pair evaluated elsewhere (e.g. in a worker thread)."""
        self.pairs.append(result)

    def update(self, pred, gt, skeleton=None, name=None) -> PairResult:
        result = evaluate_pair(pred, gt, self.metrics, skeleton, name)
        self.add(result)
        return result

    def update_batch(self, preds, gts, skeletons=None, names=None) -> list[PairResult]:
        results = evaluate_batch(preds, gts, self.metrics, skeletons, names)
        self.pairs.extend(results)
        return results

    def results(self) -> dict:
        """Means over the pairs so far, with the original's names (``S``, ``MAE``, ``maxF``, ...)."""
        if not self.pairs:
            raise ValueError("no pairs to average")
        out: dict = {"count": len(self.pairs)}
        for key in _SCALARS:
            values = [getattr(p, key) for p in self.pairs]
            if values[0] is None:
                continue
            values = np.array(values, np.float64)
            if key == "MBA":
                values = values[~np.isnan(values)]
                out[key] = float(values.mean()) if values.size else float("nan")
            else:
                out[key] = float(values.mean())
        for key in _CURVES:
            if getattr(self.pairs[0], key) is None:
                continue
            out[key] = np.mean(np.array([getattr(p, key) for p in self.pairs], np.float64), axis=0)
        for key in ("E", "F", "BIoU"):
            curve = out.get(f"{key}_curve")
            if curve is not None:
                out[f"max{key}"] = float(curve.max())
                out[f"mean{key}"] = float(curve.mean())
        return out


def skeleton_of(gt: np.ndarray) -> np.ndarray:
    """Skeleton of a uint8 ground truth (foreground > 128), for callers that cache it across runs."""
    return gt_skeleton(np.asarray(gt) > 128)
