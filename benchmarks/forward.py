"""Forward pass of the real presets at their resolution: compile time, steady-state time per
batch and parameter count, printed as JSON. Random weights (speed does not depend on them),
drawn in NumPy (`random_model`), and the forward run through a `Predictor` (the program that
batch inference runs).

    python benchmarks/forward.py --backbones swin_v1_t swin_v1_l pvt_v2_b2 --size 1024 --dtype float32
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from birefnet_jax.config import BACKBONES, BiRefNetConfig
from birefnet_jax.inference.predictor import Predictor
from birefnet_jax.model import random_model
from birefnet_jax.nn.state import count_params


def run(bb: str, size: int, batch: int, dtype: str, repeats: int, keep_output: bool = False) -> dict:
    cfg = BiRefNetConfig(backbone=BACKBONES[bb], resolution=(size, size))
    compute = None if dtype == "float32" else jnp.dtype(dtype)
    t = time.perf_counter()
    model = random_model(cfg, dtype=compute)
    build = time.perf_counter() - t
    params = count_params(model)
    predictor = Predictor(model)
    x = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), np.uint8)
    t = time.perf_counter()
    out = jax.block_until_ready(predictor.run(x))
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(predictor.run(x))
        times.append(time.perf_counter() - t)
    row = {
        "backbone": bb, "size": size, "batch": batch, "dtype": dtype, "device": str(jax.devices()[0]),
        "params": params, "build_s": round(build, 2), "compile_s": round(predictor.compile_seconds, 2),
        "compile_and_first_s": round(first, 2), "steady_s_per_batch": round(float(np.median(times)), 3),
        "finite": bool(np.isfinite(np.asarray(out)).all()), "out_shape": list(out.shape),
    }
    if keep_output:
        row["output"] = np.asarray(out)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--backbones", nargs="+", default=["swin_v1_t", "swin_v1_l", "pvt_v2_b2"])
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    for bb in args.backbones:
        print(json.dumps(run(bb, args.size, args.batch, args.dtype, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
