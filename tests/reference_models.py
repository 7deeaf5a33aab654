"""Rebuild the reference models' original state dicts from their NumPy weight recipes."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np

REF = Path(__file__).parent / "reference"
MODEL_CASES = ("swin_w7", "swin_w12", "pvt_v2", "swin_variant", "swin_nobn")
# The case the fast tier (`-m "not slow"`) keeps: the smallest, with every decoder part.
FAST_CASE = "swin_nobn"


def model_case_params():
    """MODEL_CASES for `parametrize`, every case but FAST_CASE marked slow."""
    import pytest

    return [pytest.param(c, marks=() if c == FAST_CASE else pytest.mark.slow) for c in MODEL_CASES]


@cache
def case_meta(case: str) -> dict:
    return json.loads((REF / f"model_{case}.json").read_text())


def case_arrays(case: str):
    return np.load(REF / f"model_{case}.npz")


def recipe_state_dict(case: str) -> dict[str, np.ndarray]:
    """The original state dict of a model case, in the original key order."""
    return state_dict_from_recipe(case_meta(case), case_arrays(case))


def state_dict_from_recipe(meta: dict, arrays) -> dict[str, np.ndarray]:
    """Float tensors from their NumPy recipe (`meta["weights"]`), integer buffers from `arrays`."""
    sd = {}
    for key in meta["state_dict_keys"]:
        w = meta["weights"].get(key)
        if w is None:
            sd[key] = arrays[f"buffer/{key}"]
            continue
        rng = np.random.Generator(np.random.PCG64(w["seed"]))
        n = int(np.prod(w["shape"]))
        v = w["low"] + (w["high"] - w["low"]) * rng.random(n)
        sd[key] = v.astype(np.float32).reshape(w["shape"])
    return sd


def to_float64(model):
    """Cast a model's floating-point weights and statistics to float64 (inside jax.enable_x64)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    state = nnx.state(model, (nnx.Param, nnx.BatchStat))
    nnx.update(model, jax.tree.map(
        lambda v: v.astype(jnp.float64) if jnp.issubdtype(v.dtype, jnp.floating) else v, state))
    return model


def case_overrides(case: str) -> dict:
    """What the weights cannot tell: the `add` multi-scale input and non-preset PVT heads."""
    meta = case_meta(case)
    out = {"mul_scl_ipt": meta["original_config"]["mul_scl_ipt"]}
    if meta["backbone"]["kind"] == "pvt_v2":
        out["num_heads"] = tuple(meta["backbone"]["num_heads"])
    return out
