"""Predictions to files: 8-bit masks truncated as the original saves them, PNG encoding, and
float probabilities as .npy, each written atomically."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from birefnet_jax.io.files import atomic_path, atomic_write_bytes


def mask_to_uint8(prob: np.ndarray, block_rows: int = 512) -> np.ndarray:
    """Probabilities in [0, 1] -> 8-bit, truncating as the original saves its predictions; in blocks
    of rows, so a 12000x9000 map needs no full-size float temporaries."""
    out = np.empty(prob.shape, np.uint8)
    for start in range(0, prob.shape[0], block_rows):
        block = np.clip(prob[start : start + block_rows], 0.0, 1.0)
        block *= np.float32(255.0)
        out[start : start + block_rows] = block  # float -> uint8 truncates
    return out


def encode_png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def write_png(path: Path, array: np.ndarray) -> None:
    atomic_write_bytes(path, encode_png(array))


def write_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)
