"""The checkpoint filter: original state-dict keys <-> NNX state paths, with layouts.

The NNX modules carry the original's attribute names, so a key maps by a few renames
(where the original nests `nn.Sequential` indices) plus the leaf-name and layout change:
conv weights OIHW -> HWIO, linear weights (out, in) -> (in, out), norm `weight` -> `scale`,
BatchNorm `running_mean/var` -> `mean/var`.
"""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
from flax import nnx

from birefnet_jax.backbones import TABLE


class ConversionError(ValueError):
    """A state dict does not fit the model: lists every missing, unexpected and mis-shaped key."""


# Where the original nests `nn.Sequential` indices, NNX has named attributes:
# (original module path, NNX module path), `{n}` standing for a pyramid level digit.
_MODULE_NAMES = [
    ("global_avg_pool.1", "global_avg_pool.conv"),
    ("global_avg_pool.2", "global_avg_pool.bn"),
    ("gdt_convs_{n}.0", "gdt_convs_{n}.conv"),
    ("gdt_convs_{n}.1", "gdt_convs_{n}.bn"),
    ("gdt_convs_pred_{n}.0", "gdt_convs_pred_{n}"),
    ("gdt_convs_attn_{n}.0", "gdt_convs_attn_{n}"),
    ("conv_out1.0", "conv_out1"),
    ("cls_head.0", "cls_head"),
]


def _rule(src: str, dst: str) -> tuple[str, str]:
    """A regex rule rewriting the module path suffix `src` (after a dot or at the start) to `dst`."""
    pattern = r"(^|\.)" + re.escape(src).replace(r"\{n\}", r"(?P<n>\d)") + "$"
    return pattern, r"\g<1>" + dst.replace("{n}", r"\g<n>")


_RENAMES = [_rule(src, dst) for src, dst in _MODULE_NAMES]
_INVERSE = [_rule(dst, src) for src, dst in _MODULE_NAMES]
_LEAF = {"running_mean": "mean", "running_var": "var"}
_LEAF_INV = {"mean": "running_mean", "var": "running_var", "kernel": "weight", "scale": "weight"}
# Buffers the original stores that a backbone derives from a parameter (per-family hooks).
_DERIVED = {d.name: d for spec in TABLE.values() for d in spec.derived_buffers}
_DERIVED_FROM = {d.source: d for d in _DERIVED.values()}


def _sub_all(path: str, rules) -> str:
    for pat, rep in rules:
        path = re.sub(pat, rep, path)
    return path


def _to_path(s: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in s.split("."))


def torch_key_to_path(key: str, targets: dict) -> tuple | None:
    """NNX path for an original key, or None when no such parameter exists."""
    module, _, leaf = key.rpartition(".")
    module = _sub_all(module, _RENAMES)
    base = _to_path(module) if module else ()  # a parameter of the root module (timm's `cls_token`)
    names = {"weight": ("kernel", "scale")}.get(leaf, (_LEAF.get(leaf, leaf),))
    for name in names:
        if base + (name,) in targets:
            return base + (name,)
    return None


def path_to_torch_key(path: tuple) -> str:
    module = _sub_all(".".join(str(p) for p in path[:-1]), _INVERSE)
    leaf = _LEAF_INV.get(path[-1], path[-1])
    return f"{module}.{leaf}" if module else leaf


def _to_flax_layout(value: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    if leaf == "kernel" and value.ndim == 2:
        return value.T
    return value


def _to_torch_layout(value: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 4:
        return value.transpose(3, 2, 0, 1)
    if leaf == "kernel" and value.ndim == 2:
        return value.T
    return value


def _flat_variables(model: nnx.Module) -> dict[tuple, nnx.Variable]:
    return {tuple(path): var for path, var in nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat)))}


def load_state_dict_into(model: nnx.Module, state_dict: dict[str, np.ndarray]) -> nnx.Module:
    """Fill every variable of `model` from an original state dict, strictly.

    Every key must be consumed and every variable filled with the right shape; otherwise a
    `ConversionError` lists all the problems at once. Returns the model (updated in place).
    """
    targets = _flat_variables(model)
    filled: set[tuple] = set()
    unexpected, misshaped, bad_buffers = [], [], []
    updates = {}
    for key, value in state_dict.items():
        value = np.asarray(value)
        prefix, _, leaf = key.rpartition(".")
        if leaf in _DERIVED:
            derived = _DERIVED[leaf]
            source = f"{prefix}.{derived.source}" if prefix else derived.source
            if source not in state_dict:
                unexpected.append(key)
            elif not np.array_equal(value, derived.compute(np.asarray(state_dict[source]))):
                bad_buffers.append(f"{key} (not what {derived.source} implies)")
            continue
        path = torch_key_to_path(key, targets)
        if path is None:
            unexpected.append(key)
            continue
        var = targets[path]
        arr = _to_flax_layout(value, path[-1])
        if arr.shape != tuple(var.get_value().shape):
            misshaped.append(f"{key}: checkpoint {tuple(value.shape)}, model expects "
                             f"{tuple(_to_torch_layout(np.zeros(var.get_value().shape), path[-1]).shape)}")
            continue
        updates[path] = jnp.asarray(arr, dtype=var.get_value().dtype)
        filled.add(path)
    missing = [path_to_torch_key(p) for p in targets if p not in filled]
    if missing or unexpected or misshaped or bad_buffers:
        parts = []
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", misshaped), ("wrong derived buffers", bad_buffers)):
            if items:
                shown = "\n  ".join(items[:40]) + (f"\n  ... and {len(items) - 40} more" if len(items) > 40 else "")
                parts.append(f"{len(items)} {title}:\n  {shown}")
        raise ConversionError(
            "the checkpoint does not match the model architecture. This usually means a checkpoint of "
            "another architecture, or a wrong --mul-scl-ipt / --num-heads override.\n" + "\n".join(parts))
    for path, arr in updates.items():
        targets[path].set_value(arr)
    return model


def model_to_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """The original's state dict (PyTorch layouts and names, including derived buffers)."""
    out: dict[str, np.ndarray] = {}
    for path, var in _flat_variables(model).items():
        value = np.asarray(var.get_value())
        key = path_to_torch_key(path)
        if path[-1] == "num_batches_tracked":
            value = value.astype(np.int64)
        out[key] = np.array(_to_torch_layout(value, path[-1]), order="C")
        prefix, _, leaf = key.rpartition(".")
        if leaf in _DERIVED_FROM:
            derived = _DERIVED_FROM[leaf]
            out[f"{prefix}.{derived.name}" if prefix else derived.name] = derived.compute(out[key])
    return out
