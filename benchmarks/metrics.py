"""Seconds per 1024x1024 prediction / ground-truth pair: this project's metrics against pysodmetrics.

    python benchmarks/metrics.py [--pairs 4] [--repeats 3] [--size 1024]

Prints JSON. ``project_all`` is every metric of the original evaluator (S, MAE, MSE, E, F, weighted F,
HCE, mBA, BIoU); ``project_shared`` and ``pysodmetrics_shared`` are the metrics both libraries have
(S, MAE, E, F, weighted F, HCE). HCE includes computing the ground truth's skeleton in both. Each
figure is the median over repeats of the mean over pairs, one pair at a time on one thread, after a
warm-up (JAX compiles once per size bucket); the contenders take turns within each repeat. Two kinds
of pairs: ``soft`` predictions are noisy everywhere; ``saturated`` ones look like a trained model's
(mostly exact 0 and 255, soft edges).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings

import jax
import numpy as np
from scipy import ndimage

from birefnet_jax.metrics import evaluate_pair

SHARED = ("S", "MAE", "E", "F", "WF", "HCE")


def make_pair(rng: np.random.Generator, size: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
    field = ndimage.gaussian_filter(rng.standard_normal((size, size)), size / 24)
    gt = np.where(field > np.quantile(field, 0.7), 255, 0).astype(np.uint8)
    if kind == "soft":
        pred = ndimage.gaussian_filter(gt.astype(np.float64) + rng.standard_normal((size, size)) * 60, 3)
    else:
        shifted = np.roll(gt, (3, -2), axis=(0, 1)).astype(np.float64)
        pred = ndimage.gaussian_filter(shifted, 2.5) * 1.3 - 40
        pred[rng.random((size, size)) < 1e-4] = 255  # a few speckles
    return np.clip(pred, 0, 255).astype(np.uint8), gt


def pysod_shared(pred: np.ndarray, gt: np.ndarray) -> None:
    import py_sod_metrics as psm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for cls in (psm.Smeasure, psm.MAE, psm.Emeasure, psm.Fmeasure, psm.WeightedFmeasure,
                    psm.HumanCorrectionEffortMeasure):
            cls().step(pred, gt)


def seconds_per_pair(fns: dict, pairs, repeats: int) -> dict:
    """Median over repeats of the mean seconds per pair of each function; the functions take turns
    within every repeat so that a change in the machine's load hits them alike."""
    for fn in fns.values():
        fn(*pairs[0])  # warm-up (JAX compiles here)
    runs: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for pred, gt in pairs:
                fn(pred, gt)
            runs[name].append((time.perf_counter() - start) / len(pairs))
    return {name: statistics.median(r) for name, r in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--breakdown", action="store_true", help="also time each metric alone")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    out: dict = {
        "size": [args.size, args.size],
        "pairs": args.pairs,
        "repeats": args.repeats,
        "jax_backend": jax.default_backend(),
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "seconds_per_pair": {},
    }
    for kind in ("soft", "saturated"):
        pairs = [make_pair(rng, args.size, kind) for _ in range(args.pairs)]
        fns = {
            "project_all": lambda p, g: evaluate_pair(p, g),
            "project_shared": lambda p, g: evaluate_pair(p, g, SHARED),
        }
        try:
            import py_sod_metrics  # noqa: F401

            fns["pysodmetrics_shared"] = pysod_shared
        except ImportError:
            pass
        row = seconds_per_pair(fns, pairs, args.repeats)
        if "pysodmetrics_shared" in row:
            row["speedup_shared"] = row["pysodmetrics_shared"] / row["project_shared"]
        if args.breakdown:
            each = {m: (lambda p, g, m=m: evaluate_pair(p, g, [m])) for m in
                    ("S", "MAE", "MSE", "E", "F", "BIoU", "WF", "HCE", "MBA")}
            row["project_each"] = seconds_per_pair(each, pairs, args.repeats)
        out["seconds_per_pair"][kind] = row
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
