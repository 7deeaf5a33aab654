"""The serving side of `birefnet_jax.inference.export`: run a saved program with JAX alone.

Only the standard library, NumPy and JAX are imported, and nothing of this package, so
`load_exported` runs in a process that never imports `birefnet_jax`: copy this file, or load it by
path. File layout: see `birefnet_jax.inference.export`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

FORMAT = "birefnet-jax-export"
FORMAT_VERSION = 1
SIDECAR_SUFFIX = ".json"
WEIGHTS_SUFFIX = ".weights.npz"


def sidecar_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(sidecar JSON, weights .npz) that go with the program at `path`."""
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX), path.with_name(path.name + WEIGHTS_SUFFIX)


def load_exported(path: str | os.PathLike, *, compiler_options: dict[str, Any] | None = None
                  ) -> Callable[[Any], jax.Array]:
    """A jitted `images -> outputs` function from a saved program, using only `jax.export`,
    NumPy and JSON (no Flax, no model code): what a serving process needs.

    Weights of a weights="argument" export are read from the .npz beside it, in the sidecar's
    order, and put on the device once. `compiler_options` go to XLA (`jax.jit`'s), e.g.
    `{"xla_backend_optimization_level": 0}` to compile faster on CPU where start-up matters more
    than speed. The function has `.exported` and `.metadata` attributes.
    """
    path = Path(path)
    exported = jax.export.deserialize(bytearray(path.read_bytes()))
    sidecar, _ = sidecar_paths(path)
    metadata = json.loads(sidecar.read_text()) if sidecar.exists() else {}
    n_weights = len(exported.in_avals) - 1
    call = jax.jit(exported.call, compiler_options=compiler_options)
    if exported.in_tree.num_leaves == 1:
        def predict(images):
            return call(images)
    else:
        if metadata.get("weights") != "argument":
            raise FileNotFoundError(f"{path} takes its weights as an argument but {sidecar} (which names the "
                                    "weights file and order) is missing or says otherwise")
        weights_path = path.with_name(metadata["weights_file"])
        with np.load(weights_path) as npz:
            arrays = [npz[name] for name in metadata["weights_order"]]
        weights = []
        for name, a, dtype, aval in zip(metadata["weights_order"], arrays, metadata["weights_dtypes"],
                                        exported.in_avals[:n_weights], strict=True):
            a = a.view(jnp.dtype(dtype)) if a.dtype != jnp.dtype(dtype) else a
            if a.shape != tuple(aval.shape) or a.dtype != aval.dtype:
                raise ValueError(f"{weights_path}: {name!r} is {a.shape} {a.dtype}, the program expects "
                                 f"{aval.shape} {aval.dtype} (weights from another export?)")
            weights.append(jax.device_put(a))

        def predict(images):
            return call(weights, images)

    predict.exported = exported
    predict.metadata = metadata
    return predict
