"""Rebuild the reference models' original state dicts from their NumPy weight recipes."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np

REF = Path(__file__).parent / "reference"
MODEL_CASES = ("swin_w7", "swin_w12", "pvt_v2", "swin_variant", "swin_nobn")


@cache
def case_meta(case: str) -> dict:
    return json.loads((REF / f"model_{case}.json").read_text())


def case_arrays(case: str):
    return np.load(REF / f"model_{case}.npz")


def recipe_state_dict(case: str) -> dict[str, np.ndarray]:
    """The original state dict, in the original key order."""
    meta = case_meta(case)
    arrays = case_arrays(case)
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


def case_overrides(case: str) -> dict:
    """What the weights cannot tell: the `add` multi-scale input and non-preset PVT heads."""
    meta = case_meta(case)
    out = {"mul_scl_ipt": meta["original_config"]["mul_scl_ipt"]}
    if meta["backbone"]["kind"] == "pvt_v2":
        out["num_heads"] = tuple(meta["backbone"]["num_heads"])
    return out
