"""Loading any checkpoint as a model: an original `.pth` / `.safetensors` file or `hf:` hub id (converted
on the fly, hub downloads cached as Orbax), a released checkpoint's name, or an Orbax checkpoint
folder; with the overrides the weights cannot tell. A released checkpoint, however it is named,
gets its training settings from `birefnet_jax.pretrained`."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from birefnet_jax.checkpoint import CheckpointError, is_orbax_checkpoint, load_model, read_config, save_model
from birefnet_jax.config import BiRefNetConfig
from birefnet_jax.convert import infer_config, load_state_dict_into, read_state_dict
from birefnet_jax.convert.io import HUB_PREFIX, CheckpointReadError, cache_root, parse_hub_spec, resolve_checkpoint
from birefnet_jax.model import BiRefNet, abstract_model
from birefnet_jax.nn.state import materialize_rng_state
from birefnet_jax.pretrained import Release, find_release, release_for_file, release_for_hub, unknown_name_message

# Overrides that change no parameter, so they may be applied to a converted checkpoint.
_RUNTIME_OVERRIDES = ("resolution", "dynamic_size", "dropout", "mul_scl_ipt", "num_heads")
# Overrides that `infer_config` does not take: applied to the inferred config.
_AFTER_INFERENCE = ("dynamic_size",)
# Suffixes of checkpoint files: a path without one (and without a folder) may be a release name.
_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")


def model_from_state_dict(state_dict: dict[str, np.ndarray], config: BiRefNetConfig | None = None, *,
                          dtype=None, seed: int = 0, **overrides) -> BiRefNet:
    """Build the model a state dict describes (or `config`) and fill it strictly."""
    if config is not None:
        cfg = _apply_overrides(config, overrides, what="the given config") if overrides else config
    else:
        later = {k: overrides.pop(k) for k in _AFTER_INFERENCE if k in overrides}
        cfg = infer_config(state_dict, **overrides)
        if later:
            cfg = _apply_overrides(cfg, later, what="the checkpoint")
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
        changes.setdefault("dynamic_size", None)  # a given size is a fixed size, also for a dynamic checkpoint
    for key in ("resolution", "dynamic_size"):
        if changes.get(key) is not None:
            changes[key] = tuple(changes[key])
    return cfg.replace(**changes)


def load(path: str | os.PathLike, config: BiRefNetConfig | None = None, *, dtype=None,
         **overrides) -> BiRefNet:
    """Load an original PyTorch checkpoint (`.pth`, `.safetensors`, `hf:<repo>`), a released
    checkpoint by name (`"BiRefNet_HR"`: fetched from its hub repository; `birefnet-jax models`
    lists them) or a converted Orbax checkpoint folder, in eval mode.

    A released checkpoint, named as a release, as its hub repository, or as a local file with its
    release name (`BiRefNet_HR-general-epoch_130.pth`, `BiRefNet_HR.safetensors`), gets the
    settings it was trained with (`resolution`, and `dynamic_size` for the dynamic ones; see
    `birefnet_jax.pretrained`). An existing file or folder wins over a release of the same name.

    `dtype` (e.g. `jnp.bfloat16`) sets the compute dtype; parameters stay float32. `overrides`
    set what the weights cannot tell (`mul_scl_ipt` '' or 'add', PVT `num_heads`, `resolution`,
    `dynamic_size`, `dropout`) and win over a release's settings (a `resolution` alone makes a
    dynamic checkpoint run at that fixed size); on an Orbax checkpoint they replace the stored
    values, and overriding anything the weights fix is an error.
    """
    spec = os.fspath(path)
    release = None
    if not spec.startswith(HUB_PREFIX) and not os.path.exists(spec):
        release = find_release(spec)
        if release is not None:
            spec = release.hub_spec
        elif _may_be_a_name(spec):
            raise CheckpointError(f"{spec}: no such file or folder, and {unknown_name_message(spec)}")
    if spec.startswith(HUB_PREFIX):
        release = release or release_for_hub(*parse_hub_spec(spec))
        if release is not None:
            spec = release.hub_spec  # one cache entry whatever the letter case
        if config is None and set(overrides) <= set(_RUNTIME_OVERRIDES):
            return _load_hub_cached(spec, dtype, release, overrides)
        return model_from_state_dict(read_state_dict(_fetch(spec, release)), config, dtype=dtype,
                                     **_with_release(release, config, overrides))
    path = Path(spec)
    if is_orbax_checkpoint(path):
        cfg = config if config is not None else read_config(path)[0]
        if overrides:
            cfg = _apply_overrides(cfg, overrides, what=f"the checkpoint {path}")
        return load_model(path, config=cfg, dtype=dtype)
    if path.is_dir():
        load_model(path)  # raises the precise CheckpointError (not ours, incomplete, ...)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    overrides = _with_release(release_for_file(path), config, overrides)
    return model_from_state_dict(read_state_dict(path), config, dtype=dtype, **overrides)


def _may_be_a_name(spec: str) -> bool:
    """A bare word (no folder, no checkpoint suffix) that is no file: meant as a release name."""
    return bool(spec) and os.sep not in spec and "/" not in spec and not spec.lower().endswith(_CHECKPOINT_SUFFIXES)


def _release_settings(release: Release | None, overrides: dict) -> dict:
    """The release's settings that the caller's overrides leave standing: a given `resolution`
    (without `dynamic_size`) is a fixed size, so it drops the dynamic range too."""
    if release is None:
        return {}
    settings = release.settings()
    if "resolution" in overrides and "dynamic_size" not in overrides:
        settings["dynamic_size"] = None
    return settings


def _with_release(release: Release | None, config: BiRefNetConfig | None, overrides: dict) -> dict:
    """The release's settings under the caller's overrides (none when the caller gives the config)."""
    if config is not None:
        return dict(overrides)
    return {**_release_settings(release, overrides), **overrides}


def _fetch(spec: str, release: Release | None) -> Path:
    """The local file of an `hf:` spec; for a release, a failure says where to get the file by hand."""
    try:
        return resolve_checkpoint(spec)
    except CheckpointReadError as e:
        if release is None:
            raise
        raise CheckpointReadError(f"cannot fetch the released checkpoint {release.name}: {e}\n"
                                  f"Without the hub: {release.fetch_hint()}") from e


def _load_hub_cached(spec: str, dtype, release: Release | None, overrides: dict) -> BiRefNet:
    """`hf:` checkpoints are downloaded and converted once, then loaded from the Orbax copy kept
    under the user's cache folder (`birefnet_jax.convert.io.cache_root`). The copy's config holds
    the release's settings; they are applied again on load (a copy written before they were known
    gets them too), then the caller's overrides."""
    repo, filename = parse_hub_spec(spec)
    cached = cache_root() / "hf" / f"{repo.replace('/', '--')}--{filename.replace('/', '--')}"
    if not is_orbax_checkpoint(cached):
        model = model_from_state_dict(read_state_dict(_fetch(spec, release)), **_release_settings(release, {}))
        extra = {"source": spec} | ({"release": release.name} if release is not None else {})
        save_model(model, cached, overwrite=cached.exists(), extra=extra)
    changes = {**_release_settings(release, overrides), **overrides}
    if not changes:
        return load_model(cached, dtype=dtype)
    cfg = _apply_overrides(read_config(cached)[0], changes, what=f"the checkpoint {spec}")
    return load_model(cached, config=cfg, dtype=dtype)
