"""Parity check of a checkpoint against logits the original produced for the same inputs."""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from birefnet_jax.inference.predictor import make_predict_fn
from birefnet_jax.loading import load

DEFAULT_TOLERANCE = 1e-4


@dataclasses.dataclass
class VerifyResult:
    name: str
    shape: tuple
    rel_error: float
    passed: bool


def relative_error(out: np.ndarray, ref: np.ndarray) -> float:
    """|out - ref| / |ref| in the L2 norm, computed in float64."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def verify(checkpoint: str | os.PathLike, reference: str | os.PathLike, *,
           tolerance: float = DEFAULT_TOLERANCE, **overrides) -> list[VerifyResult]:
    """Run the checkpoint on every `input<i>` of a reference `.npz` (NCHW, normalised) and
    compare with `output<i>` (NCHW logits), in float32 with the highest matmul precision."""
    try:
        data = np.load(reference)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise ValueError(f"{reference}: not a readable .npz file ({e})") from e
    names = sorted((k for k in data.files if k.startswith("input") and "/" not in k), key=lambda k: int(k[5:] or 0))
    if not names:
        raise ValueError(f"{reference}: no 'input<i>' arrays; see docs/inference.md (conversion and verification) "
                         "for the expected layout")
    missing = [n for n in names if "output" + n[5:] not in data.files]
    if missing:
        raise ValueError(f"{reference}: no outputs for {missing}")
    with jax.default_matmul_precision("highest"):
        model = load(checkpoint, **overrides)
        predict = make_predict_fn(model, layout="NCHW")
        results = []
        for name in names:
            out_name = "output" + name[5:]
            try:
                out = np.asarray(predict(data[name].astype(np.float32)))
            except (TypeError, ValueError) as e:
                raise ValueError(f"{reference}, array '{name}': {e}") from e
            ref = data[out_name]
            if out.shape != ref.shape:
                raise ValueError(f"{out_name}: model gives shape {out.shape}, reference has {ref.shape}")
            err = relative_error(out, ref)
            results.append(VerifyResult(out_name, tuple(ref.shape), err, err <= tolerance))
    return results
