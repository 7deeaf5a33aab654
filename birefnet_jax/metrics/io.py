"""Reading grey maps and pairing predictions with ground truths by file name."""

from __future__ import annotations

import os
from collections.abc import Iterable

import cv2
import numpy as np

from birefnet_jax.io.images import IMAGE_EXTENSIONS


class PairingError(ValueError):
    """Predictions and ground truths that do not match one to one."""


def read_gray(path: str | os.PathLike) -> np.ndarray:
    """A uint8 (H, W) grey map, read like the original: OpenCV's grey conversion (alpha dropped,
    colour to luma, 16-bit scaled to 8-bit). Raises ValueError naming the file if it cannot be read."""
    path = os.fspath(path)
    try:
        data = np.fromfile(path, np.uint8)  # also works for paths OpenCV cannot open by name
    except OSError as e:
        raise ValueError(f"cannot read image file {path}: {e}") from e
    image = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE) if data.size else None
    if image is None:
        raise ValueError(f"cannot decode image file {path}")
    return image


def list_images(folder: str | os.PathLike) -> list[str]:
    """Image files directly in ``folder`` (by extension, any case), sorted."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"not a folder: {folder}")
    names = [n for n in os.listdir(folder) if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS]
    return sorted(os.path.join(folder, n) for n in names)


def _by_stem(paths: Iterable[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    dupes = []
    for p in paths:
        stem = os.path.splitext(os.path.basename(p))[0]
        if stem in out:
            dupes.append(f"{os.path.basename(out[stem])} / {os.path.basename(p)}")
        out[stem] = p
    if dupes:
        raise PairingError(f"{len(dupes)} {what} file names share a stem: {_listing(dupes)}")
    return out


def _listing(items: list[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" ... (+{len(items) - limit} more)" if len(items) > limit else "")


def pair_by_stem(pred_paths: Iterable[str], gt_paths: Iterable[str]) -> list[tuple[str, str, str]]:
    """(stem, prediction path, ground-truth path) for every stem, sorted by stem.

    Raises PairingError listing every file that has no partner (extensions may differ).
    """
    preds = _by_stem(pred_paths, "prediction")
    gts = _by_stem(gt_paths, "ground-truth")
    lonely_preds = sorted(os.path.basename(preds[s]) for s in preds.keys() - gts.keys())
    lonely_gts = sorted(os.path.basename(gts[s]) for s in gts.keys() - preds.keys())
    problems = []
    if lonely_preds:
        n = len(lonely_preds)
        problems.append(f"{n} prediction{'s' if n > 1 else ''} {'have' if n > 1 else 'has'} no ground truth: "
                        f"{_listing(lonely_preds)}")
    if lonely_gts:
        n = len(lonely_gts)
        problems.append(f"{n} ground truth{'s' if n > 1 else ''} {'have' if n > 1 else 'has'} no prediction: "
                        f"{_listing(lonely_gts)}")
    if problems:
        raise PairingError("; ".join(problems))
    if not gts:
        raise PairingError("no images to evaluate")
    return [(s, preds[s], gts[s]) for s in sorted(gts)]
