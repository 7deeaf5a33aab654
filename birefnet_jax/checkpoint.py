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
from birefnet_jax.model import BiRefNet, abstract_model
from birefnet_jax.nn.state import materialize_rng_state

_WEIGHTS = (nnx.Param, nnx.BatchStat)
CONFIG_ITEM = "config"
STATE_ITEM = "state"
_CONFIG_KEY = "birefnet_config"


class CheckpointError(ValueError):
    """A checkpoint folder that is missing, not ours, incomplete or corrupt; names the fix."""


def _read_meta_file(path: Path) -> dict | None:
    try:
        meta = json.loads((path / CONFIG_ITEM / "metadata").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and _CONFIG_KEY in meta else None


def is_orbax_checkpoint(path: str | os.PathLike) -> bool:
    """True for a folder this package wrote with `save_model` (its config item names a BiRefNet)."""
    path = Path(path)
    return path.is_dir() and _read_meta_file(path) is not None


def check_replaceable(directory: Path, protect: tuple[Path, ...]) -> None:
    """Overwriting may only ever replace a checkpoint this package wrote: never another folder,
    a file, the working directory, or a folder holding the source."""
    if directory.is_file() or directory.is_symlink():
        raise FileExistsError(f"{directory} exists and is a file, not a checkpoint folder; refusing to replace it. "
                              "Choose a new destination (or delete the file yourself)")
    if not is_orbax_checkpoint(directory):
        raise FileExistsError(f"{directory} exists and is not a birefnet-jax checkpoint; refusing to overwrite it "
                              "(--force only replaces checkpoints this tool wrote). Choose a new destination")
    cwd = Path.cwd().resolve()
    resolved = directory.resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise FileExistsError(f"{directory} is the working directory or holds it; refusing to overwrite it")
    for p in protect:
        p = Path(p).resolve()
        if p == resolved or resolved in p.parents:
            raise FileExistsError(f"{directory} holds the source {p}; refusing to overwrite it. "
                                  "Choose another destination")


def save_model(model: BiRefNet, directory: str | os.PathLike, *, overwrite: bool = False,
               extra: dict | None = None, protect: tuple[str | os.PathLike, ...] = ()) -> Path:
    """Save weights and config. Orbax writes into a temporary directory and renames it when
    complete, so an interrupted save never leaves a checkpoint that looks whole; with
    `overwrite`, an existing checkpoint of this package (and only that) is replaced once the new
    one is complete. `protect`: paths (e.g. the source file) the destination must not hold."""
    directory = Path(directory).absolute()
    if directory.exists() or directory.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{directory} exists; choose another path or pass overwrite=True (--force)")
        check_replaceable(directory, tuple(Path(p) for p in protect))
    state = nnx.to_pure_dict(nnx.state(model, _WEIGHTS))
    meta = {_CONFIG_KEY: model.cfg.to_dict(), **(extra or {})}
    target = directory.with_name(f"{directory.name}.new-{os.getpid()}") if directory.exists() else directory
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            ckptr.save(target, ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(state),
                                                     CONFIG_ITEM: ocp.args.JsonSave(meta)}))
    except BaseException:
        if target != directory and target.exists():
            shutil.rmtree(target, ignore_errors=True)
        raise
    if target != directory:
        old = directory.with_name(f"{directory.name}.old-{os.getpid()}")
        directory.rename(old)
        target.rename(directory)
        shutil.rmtree(old)
    return directory


def _require_checkpoint(directory: Path) -> None:
    if not directory.exists():
        raise CheckpointError(f"{directory}: no such file or folder")
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a folder; a birefnet-jax checkpoint is a folder written by "
                              "`birefnet-jax convert`")
    if not (directory / CONFIG_ITEM).exists():
        raise CheckpointError(f"{directory} is a folder but not a birefnet-jax checkpoint (no '{CONFIG_ITEM}' item). "
                              "Convert an original .pth/.safetensors first: birefnet-jax convert SRC DST")
    if _read_meta_file(directory) is None:
        raise CheckpointError(f"{directory}: the checkpoint's config is missing or unreadable (interrupted copy?); "
                              "convert the original checkpoint again")


def read_config(directory: str | os.PathLike) -> tuple[BiRefNetConfig, dict]:
    directory = Path(directory).absolute()
    _require_checkpoint(directory)
    meta = _read_meta_file(directory)
    try:
        return BiRefNetConfig.from_dict(meta[_CONFIG_KEY]), meta
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{directory}: the stored config is not valid for this version of birefnet-jax "
                              f"({type(e).__name__}: {e}); convert the original checkpoint again") from e


def load_model(directory: str | os.PathLike, *, config: BiRefNetConfig | None = None, dtype=None,
               seed: int = 0) -> BiRefNet:
    """Rebuild the model saved by `save_model` (eval mode). `config` replaces the stored one
    (it must build the same parameters; see `birefnet_jax.loading.load` for the overrides that make sense)."""
    directory = Path(directory).absolute()
    cfg = config if config is not None else read_config(directory)[0]
    _require_checkpoint(directory)
    model = abstract_model(cfg, dtype=dtype)
    target = nnx.to_pure_dict(nnx.state(model, _WEIGHTS))
    # Onto this process's first device, whatever mesh saved it: a checkpoint of a run on 8 GPUs loads
    # on a laptop (without a target sharding, orbax insists on the saving topology).
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), target)
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            restored = ckptr.restore(directory,
                                     ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(target)}))
    except Exception as e:  # orbax and tensorstore raise many types for missing or damaged parts
        raise CheckpointError(
            f"{directory}: the checkpoint's weights are missing, incomplete or corrupt ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); copy it again or convert the original checkpoint "
            "again") from e
    state = nnx.state(model, _WEIGHTS)
    nnx.replace_by_pure_dict(state, restored[STATE_ITEM])
    nnx.update(model, state)
    return materialize_rng_state(model, seed)
