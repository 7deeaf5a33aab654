"""Orbax checkpoints of a converted model: parameters and BatchNorm statistics plus the
architecture config (JSON), so a checkpoint rebuilds itself without the original file."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from birefnet_jax.config import BiRefNetConfig
from birefnet_jax.convert.keymap import materialize_rng_state
from birefnet_jax.model import BiRefNet, abstract_model

_WEIGHTS = (nnx.Param, nnx.BatchStat)
CONFIG_ITEM = "config"
STATE_ITEM = "state"


def is_orbax_checkpoint(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG_ITEM).exists()


def save_model(model: BiRefNet, directory: str | os.PathLike, *, overwrite: bool = False,
               extra: dict | None = None) -> Path:
    """Save weights and config. Orbax writes into a temporary directory and renames it when
    complete, so an interrupted save never leaves a checkpoint that looks whole; with
    `overwrite`, the old checkpoint is replaced only once the new one is complete."""
    directory = Path(directory).absolute()
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} exists; choose another path or pass overwrite=True (--force)")
    state = nnx.to_pure_dict(nnx.state(model, _WEIGHTS))
    meta = {"birefnet_config": model.cfg.to_dict(), **(extra or {})}
    target = directory.with_name(f"{directory.name}.new-{os.getpid()}") if directory.exists() else directory
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(target, ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(state),
                                                 CONFIG_ITEM: ocp.args.JsonSave(meta)}))
    if target != directory:
        old = directory.with_name(f"{directory.name}.old-{os.getpid()}")
        directory.rename(old)
        target.rename(directory)
        shutil.rmtree(old)
    return directory


def read_config(directory: str | os.PathLike) -> tuple[BiRefNetConfig, dict]:
    directory = Path(directory).absolute()
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        meta = ckptr.restore(directory, ocp.args.Composite(**{CONFIG_ITEM: ocp.args.JsonRestore()}))[CONFIG_ITEM]
    if isinstance(meta, (str, bytes)):
        meta = json.loads(meta)
    return BiRefNetConfig.from_dict(meta["birefnet_config"]), meta


def load_model(directory: str | os.PathLike, *, dtype=None, seed: int = 0) -> BiRefNet:
    """Rebuild the model saved by `save_model` (eval mode)."""
    directory = Path(directory).absolute()
    if not is_orbax_checkpoint(directory):
        raise FileNotFoundError(f"{directory}: not a birefnet-jax Orbax checkpoint (no '{CONFIG_ITEM}' item)")
    cfg, _ = read_config(directory)
    model = abstract_model(cfg, dtype=dtype)
    target = nnx.to_pure_dict(nnx.state(model, _WEIGHTS))
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), target)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        restored = ckptr.restore(directory, ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(target)}))
    state = nnx.state(model, _WEIGHTS)
    nnx.replace_by_pure_dict(state, restored[STATE_ITEM])
    nnx.update(model, state)
    return materialize_rng_state(model, seed)
