"""Loading any checkpoint as a model: an original `.pth` / `.safetensors` file or `hf:` hub id (converted
on the fly, hub downloads cached as Orbax), or an Orbax checkpoint folder; with the overrides the
weights cannot tell."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from birefnet_jax.checkpoint import CheckpointError, is_orbax_checkpoint, load_model, read_config, save_model
from birefnet_jax.config import BiRefNetConfig
from birefnet_jax.convert import infer_config, load_state_dict_into, read_state_dict
from birefnet_jax.convert.io import HUB_PREFIX, cache_root, parse_hub_spec
from birefnet_jax.model import BiRefNet, abstract_model
from birefnet_jax.nn.state import materialize_rng_state

# Overrides that change no parameter, so they may be applied to a converted checkpoint.
_RUNTIME_OVERRIDES = ("resolution", "dropout", "mul_scl_ipt", "num_heads")


def model_from_state_dict(state_dict: dict[str, np.ndarray], config: BiRefNetConfig | None = None, *,
                          dtype=None, seed: int = 0, **overrides) -> BiRefNet:
    """Build the model a state dict describes (or `config`) and fill it strictly."""
    if config is not None and overrides:
        config = _apply_overrides(config, overrides, what="the given config")
    cfg = config if config is not None else infer_config(state_dict, **overrides)
    model = abstract_model(cfg, dtype=dtype)
    load_state_dict_into(model, state_dict)
    return materialize_rng_state(model, seed)


def _apply_overrides(cfg: BiRefNetConfig, overrides: dict, *, what: str) -> BiRefNetConfig:
    """Apply the overrides that leave the parameters unchanged; reject the rest with the reason."""
    fixed = sorted(set(overrides) - set(_RUNTIME_OVERRIDES))
    if fixed:
        raise ValueError(f"cannot override {', '.join(fixed)} of {what}: the weights fix them. Only "
                         f"{', '.join(_RUNTIME_OVERRIDES)} can change after conversion")
    changes = dict(overrides)
    msi = changes.get("mul_scl_ipt")
    if msi is not None and (msi == "cat") != (cfg.mul_scl_ipt == "cat"):
        raise ValueError(f"mul_scl_ipt={msi!r} contradicts {what} ({cfg.mul_scl_ipt!r}): 'cat' doubles the decoder "
                         "widths, so it is fixed by the weights; only '' and 'add' can be exchanged")
    heads = changes.pop("num_heads", None)
    if heads is not None:
        if cfg.backbone.kind != "pvt_v2":
            raise ValueError(f"num_heads only applies to PVT v2 backbones, not {cfg.backbone.kind}")
        heads = tuple(int(h) for h in heads)
        dims = cfg.backbone.embed_dims
        if len(heads) != len(dims) or any(h < 1 or d % h for d, h in zip(dims, heads, strict=False)):
            raise ValueError(f"num_heads={heads} must give one divisor per stage of the widths {dims}")
        changes["backbone"] = dataclasses.replace(cfg.backbone, num_heads=heads)
    if "resolution" in changes:
        changes["resolution"] = tuple(changes["resolution"])
    return cfg.replace(**changes)


def load(path: str | os.PathLike, config: BiRefNetConfig | None = None, *, dtype=None,
         **overrides) -> BiRefNet:
    """Load an original PyTorch checkpoint (`.pth`, `.safetensors`, `hf:<repo>`) or a converted
    Orbax checkpoint folder, in eval mode.

    `dtype` (e.g. `jnp.bfloat16`) sets the compute dtype; parameters stay float32. `overrides`
    set what the weights cannot tell (`mul_scl_ipt` '' or 'add', PVT `num_heads`, `resolution`,
    `dropout`); on an Orbax checkpoint they replace the stored values, and overriding anything the
    weights fix is an error.
    """
    spec = str(path)
    if spec.startswith(HUB_PREFIX) and config is None and not overrides:
        return _load_hub_cached(spec, dtype)
    if not spec.startswith(HUB_PREFIX):
        path = Path(path)
        if is_orbax_checkpoint(path):
            cfg = config if config is not None else read_config(path)[0]
            if overrides:
                cfg = _apply_overrides(cfg, overrides, what=f"the checkpoint {path}")
            return load_model(path, config=cfg, dtype=dtype)
        if path.is_dir():
            load_model(path)  # raises the precise CheckpointError (not ours, incomplete, ...)
        if not path.exists():
            raise CheckpointError(f"{path}: no such file or folder")
    return model_from_state_dict(read_state_dict(path), config, dtype=dtype, **overrides)


def _load_hub_cached(spec: str, dtype) -> BiRefNet:
    """`hf:` checkpoints are downloaded and converted once, then loaded from the Orbax copy kept
    under the user's cache folder (`birefnet_jax.convert.io.cache_root`)."""
    repo, filename = parse_hub_spec(spec)
    cached = cache_root() / "hf" / f"{repo.replace('/', '--')}--{filename.replace('/', '--')}"
    if is_orbax_checkpoint(cached):
        return load_model(cached, dtype=dtype)
    model = model_from_state_dict(read_state_dict(spec))
    save_model(model, cached, overwrite=cached.exists(), extra={"source": spec})
    return load_model(cached, dtype=dtype)


