"""Training checkpoints: asynchronous, atomic saves of everything a run needs to continue
bit-identically, kept by recency and by a validation metric, plus a preemption guard.

Layout (one Orbax `CheckpointManager` step folder per save)::

    <workdir>/checkpoints/<step>/
        state/     model weights: nnx.Param and nnx.BatchStat as a pure dict (StandardSave)
        config/    JSON {"birefnet_config": ..., "run_config": ..., "metrics": ..., "step": ...}
                   ("model_config" instead of "birefnet_config" for another module with a `cfg`)
        train/     {"optimizer": optimiser state (step, opt_state), "model": the model's other
                   variables (RNG keys as raw key data, RNG counts)} (StandardSave)
        progress/  JSON: step, epoch, data_position, best metric so far, elapsed_s, config, ...
        metrics/   Orbax's own copy of the metrics (only with a tracked metric)

`state` and `config` are exactly the model-checkpoint format of `birefnet_jax.checkpoint`, so
`birefnet_jax.load("<workdir>/checkpoints/<step>")` loads any training checkpoint of a BiRefNet.

Saves are atomic: Orbax writes `<step>.orbax-checkpoint-tmp` and renames it when complete, so a
save killed half-way never looks like a checkpoint (leftover temporary folders are ignored and
removed when the manager starts). Saves are asynchronous: `save` returns after the device arrays
have been copied to host memory (so the training step may donate its buffers at once); the
writing finishes in the background (`wait_until_finished`).

Retention: the last `max_to_keep` checkpoints AND the best `keep_best` by `best_metric`. Orbax
0.12 expresses this directly with a preservation policy, `AnyPreservationPolicy([LatestN,
BestN])` (the older `max_to_keep` + `best_fn` options would keep the N best *instead of* the N
latest). Checkpoints saved without the metric (e.g. on preemption) count only as "latest".

Preemption: `PreemptionGuard` (also `TrainCheckpointer.preemption_guard()`) turns SIGTERM into a
flag; the loop asks `preemption_requested()` after each step and, when it says yes, saves with
`force=True` and exits. With several processes the flag is OR-reduced across them
(`multihost_utils.process_allgather`), so all stop at the same step and take part in the same
(collective) save; that makes `preemption_requested()` a collective too: every process must call
it at the same steps. With one process it is a plain flag.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint import checkpoint_managers as ocm

from birefnet_jax.checkpoint import CONFIG_ITEM, STATE_ITEM, CheckpointError
from birefnet_jax.config import BiRefNetConfig

CHECKPOINT_DIR = "checkpoints"
TRAIN_ITEM = "train"
PROGRESS_ITEM = "progress"
CONFIG_KEY = "birefnet_config"  # the key `birefnet_jax.checkpoint.read_config` reads
MODEL_CONFIG_KEY = "model_config"  # the config of a model other than BiRefNet
WEIGHTS = (nnx.Param, nnx.BatchStat)
# Everything else the model holds that a resumed run needs: RNG keys and counts (dropout, drop
# path) and any other variable; sown intermediates are per-call outputs, not state.
MODEL_REST = nnx.Not(nnx.Any(nnx.Param, nnx.BatchStat, nnx.Intermediate))
_SHOW = 8  # differences listed in an error message


class CheckpointMismatchError(CheckpointError):
    """The checkpoints in a workdir belong to another architecture or optimiser."""


# ----------------------------------------------------------------------------------------------
# Preemption


class PreemptionGuard:
    """Turns SIGTERM (or other `signals`) into a flag instead of killing the process.

    Use as a context manager or with `install()` / `uninstall()`; the previous handlers come back
    on exit. The handler only sets the flag: the training loop checks `preemption_requested()`
    after each step, saves a checkpoint with `force=True` and returns. Signal handlers can only be
    installed from the main thread.
    """

    def __init__(self, signals: Iterable[int] = (signal.SIGTERM,)):
        self.signals = tuple(signals)
        self._previous: dict[int, Any] = {}
        self._flag = False
        self.received: int | None = None  # the last signal number received

    def _handle(self, signum, frame):
        self._flag = True
        self.received = signum

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self) -> PreemptionGuard:
        if self.installed:
            return self
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionGuard.install() must run in the main thread (Python delivers signals "
                               "there); install it around the training loop in the main thread")
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def __enter__(self) -> PreemptionGuard:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def request(self) -> None:
        """Ask for a stop as if a signal had arrived (e.g. from a time limit in the loop)."""
        self._flag = True

    def clear(self) -> None:
        self._flag = False
        self.received = None

    @property
    def requested_locally(self) -> bool:
        """This process's flag, without agreeing with the others."""
        return self._flag

    def preemption_requested(self) -> bool:
        """True when any process got the signal. With several processes this is a collective
        (an all-gather of one flag per process): call it at the same steps everywhere."""
        if jax.process_count() == 1:
            return self._flag
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray([self._flag], np.int32))
        return bool(np.any(flags))


# ----------------------------------------------------------------------------------------------
# Helpers


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_to_data(tree):
    """Typed PRNG keys as their raw uint32 data (what Orbax can store)."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _abstract(x):
    """Restore target of one leaf: its shape, dtype and sharding (so a sharded model restores
    sharded); keys as their key data."""
    if _is_key(x):
        x = jax.random.key_data(x)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


def _flat(tree, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as {'a/b/c': leaf} (keys as strings: Orbax's metadata has '0' for 0)."""
    out = {}
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}/"))
    elif tree is not None:
        out[prefix[:-1]] = tree
    return out


def _jsonable(x):
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return _jsonable(dataclasses.asdict(x))
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if isinstance(x, jax.Array | np.ndarray | np.generic):
        return _jsonable(np.asarray(x).tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None  # JSON has no NaN or infinity
    return x


def _dict_diff(saved, current, prefix: str = "", now: str = "model") -> list[str]:
    """'field: checkpoint A, model B' for every differing leaf of two nested dicts."""
    out = []
    if isinstance(saved, Mapping) and isinstance(current, Mapping):
        for k in sorted(set(saved) | set(current), key=str):
            out += _dict_diff(saved.get(k, "<absent>"), current.get(k, "<absent>"), f"{prefix}{k}.", now)
        return out
    if saved != current:
        out.append(f"{prefix[:-1]}: checkpoint {saved!r}, {now} {current!r}")
    return out


def _tree_diff(saved: dict[str, Any], target: dict[str, Any], what: str) -> list[str]:
    out = []
    for k in sorted(set(saved) - set(target)):
        out.append(f"{what} {k}: only in the checkpoint")
    for k in sorted(set(target) - set(saved)):
        out.append(f"{what} {k}: only in the model")
    for k in sorted(set(saved) & set(target)):
        s, t = saved[k], target[k]
        s_shape, s_dtype = tuple(getattr(s, "shape", ())), np.dtype(getattr(s, "dtype", np.float32))
        if s_shape != tuple(t.shape) or s_dtype != np.dtype(t.dtype):
            out.append(f"{what} {k}: checkpoint {s_dtype.name}{list(s_shape)}, model "
                       f"{np.dtype(t.dtype).name}{list(t.shape)}")
    return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def _model_config(model) -> tuple[str | None, dict | None]:
    """The model's architecture config as JSON and the key it is stored under: 'birefnet_config'
    for a BiRefNet (what `birefnet_jax.load` reads), 'model_config' for another module with a
    `cfg` (a dataclass or anything with `to_dict`), (None, None) without one."""
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        return None, None
    if isinstance(cfg, BiRefNetConfig):
        return CONFIG_KEY, _jsonable(cfg.to_dict())
    if hasattr(cfg, "to_dict"):
        return MODEL_CONFIG_KEY, _jsonable(cfg.to_dict())
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return MODEL_CONFIG_KEY, _jsonable(cfg)
    return None, None


def _metric_getter(name: str, mode: str) -> Callable[[Mapping], float]:
    worst = math.inf if mode == "min" else -math.inf

    def get(metrics: Mapping) -> float:
        v = metrics.get(name) if isinstance(metrics, Mapping) else None
        try:
            v = float(v)
        except (TypeError, ValueError):
            return worst
        return v if math.isfinite(v) else worst

    return get


# ----------------------------------------------------------------------------------------------
# The checkpointer


class TrainCheckpointer:
    """Checkpoints of a training run under `<workdir>/checkpoints/`.

    workdir: the run's folder (created if missing).
    config: the run's config (a JSON-able mapping or a dataclass), stored with every checkpoint.
    max_to_keep: how many of the latest checkpoints to keep (None: all).
    best_metric / best_mode: the validation metric (a key of `metrics` given to `save`) whose best
      `keep_best` checkpoints are kept besides the latest, 'min' (e.g. MAE) or 'max' (e.g. F-measure);
      None: retention by recency only.
    save_every_steps: `should_save(step)` is true on multiples of it.
    async_save: write in a background thread (Orbax's async checkpointing).
    """

    def __init__(self, workdir: str | os.PathLike, *, config: Mapping | Any | None = None,
                 max_to_keep: int | None = 2, best_metric: str | None = None, best_mode: str = "min",
                 keep_best: int = 1, save_every_steps: int = 1000, async_save: bool = True):
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be at least 1 (or None: keep all), got {max_to_keep}")
        if keep_best < 1:
            raise ValueError(f"keep_best must be at least 1, got {keep_best}")
        if save_every_steps < 1:
            raise ValueError(f"save_every_steps must be at least 1, got {save_every_steps}")
        self.workdir = Path(workdir).absolute()
        self.directory = self.workdir / CHECKPOINT_DIR
        self.config = _jsonable(config) if config is not None else None
        self.max_to_keep = max_to_keep
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.keep_best = keep_best
        self.save_every_steps = save_every_steps
        self.guard = PreemptionGuard()

        latest = ocm.LatestN(n=max_to_keep)
        best_fn = None
        if best_metric is not None:
            best_fn = _metric_getter(best_metric, best_mode)
            policy = ocm.AnyPreservationPolicy([
                latest,
                ocm.BestN(get_metric_fn=best_fn, reverse=best_mode == "min", n=keep_best,
                          keep_checkpoints_without_metrics=False),
            ])
        else:
            policy = latest
        options = ocp.CheckpointManagerOptions(
            best_fn=best_fn, best_mode=best_mode, preservation_policy=policy,
            enable_async_checkpointing=async_save, cleanup_tmp_directories=True, create=True)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={STATE_ITEM: ocp.StandardCheckpointHandler(),
                           TRAIN_ITEM: ocp.StandardCheckpointHandler(),
                           CONFIG_ITEM: ocp.JsonCheckpointHandler(),
                           PROGRESS_ITEM: ocp.JsonCheckpointHandler()})
        self._best: tuple[float, int] | None = None  # (value, step) of the best checkpoint so far
        best_step = self.best_checkpoint()
        if best_step is not None:
            value = (self._manager.metrics(best_step) or {}).get(best_metric)
            if value is not None:
                self._best = (float(value), best_step)
        self._clock = time.monotonic()
        self._elapsed_before = 0.0

    # -- queries ---------------------------------------------------------------------------

    def step_dir(self, step: int) -> Path:
        """The folder of one checkpoint; `birefnet_jax.load` accepts it."""
        return self.directory / str(int(step))

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_checkpoint(self) -> int | None:
        """Step of the best checkpoint by `best_metric` (None without a metric or a checkpoint
        that has it)."""
        if self.best_metric is None:
            return None
        return self._manager.best_step()

    def metrics(self, step: int) -> dict | None:
        """The metrics saved with a checkpoint (None if it has none)."""
        return self._manager.metrics(step)

    def should_save(self, step: int) -> bool:
        return step > 0 and step % self.save_every_steps == 0 and step not in self._manager.all_steps()

    # -- preemption ------------------------------------------------------------------------

    def preemption_guard(self) -> PreemptionGuard:
        """The SIGTERM guard, as a context manager: `with ckpt.preemption_guard(): train()`."""
        return self.guard

    def preemption_requested(self) -> bool:
        """True once SIGTERM arrived (on any process: see `PreemptionGuard.preemption_requested`)."""
        return self.guard.preemption_requested()

    # -- saving ----------------------------------------------------------------------------

    def save(self, step: int, model: nnx.Module, optimizer: nnx.Optimizer, progress: Mapping | None = None,
             metrics: Mapping | None = None, *, force: bool = False, config: Mapping | Any | None = None) -> bool:
        """Save the model, optimiser and progress at `step` (asynchronously).

        progress: the loop's position, JSON-able; recognised keys: 'epoch', 'data_position' (the
          next step of the input pipeline; default `step`), 'elapsed_s' (default: time since this
          checkpointer started plus the restored run's). 'step', 'best_metric', 'best_step',
          'metric_name' and 'config' are filled in.
        metrics: validation metrics of this step; `best_metric` among them ranks the checkpoint.
        force: save even if `should_save(step)` is false (at the end, on preemption).
        config: the run's config (default: the one given to the constructor or to `restore`).
        Returns whether a checkpoint was started (False: not due, or this step is saved already).
        """
        step = int(step)
        if config is not None:
            self.config = _jsonable(config)
        if step in self._manager.all_steps():
            return False
        if not force and not self.should_save(step):
            return False
        latest = self.latest_step()
        if latest is not None and step < latest:
            raise ValueError(f"step {step} is older than the latest checkpoint ({latest}) in {self.directory}; "
                             "restore_latest() before training on, or use a new workdir")
        metrics = _jsonable(dict(metrics)) if metrics is not None else None
        orbax_metrics = None
        if self.best_metric is not None and metrics is not None:
            value = metrics.get(self.best_metric)
            if isinstance(value, int | float) and math.isfinite(value):
                orbax_metrics = metrics
                better = (self._best is None or (value < self._best[0] if self.best_mode == "min"
                                                 else value > self._best[0]))
                if better:
                    self._best = (float(value), step)
        progress = _jsonable(dict(progress or {}))
        progress.setdefault("epoch", None)
        progress.setdefault("data_position", step)
        progress.setdefault("elapsed_s", self._elapsed_before + time.monotonic() - self._clock)
        progress.update(step=step, metric_name=self.best_metric,
                        best_metric=None if self._best is None else self._best[0],
                        best_step=None if self._best is None else self._best[1],
                        metrics=metrics, config=self.config, saved_at=time.time())
        meta = {"run_config": self.config, "metrics": metrics, "step": step}
        key, current = _model_config(model)
        if key is not None:
            meta[key] = current
        args = ocp.args.Composite(**{
            STATE_ITEM: ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(model, WEIGHTS))),
            TRAIN_ITEM: ocp.args.StandardSave(self._train_tree(model, optimizer)),
            CONFIG_ITEM: ocp.args.JsonSave(meta),
            PROGRESS_ITEM: ocp.args.JsonSave(progress),
        })
        return bool(self._manager.save(step, args=args, metrics=orbax_metrics, force=True))

    @staticmethod
    def _optimizer_state(optimizer: nnx.Optimizer):
        # nnx.Optimizer (flax >= 0.11) holds `step` and `opt_state` as OptState variables and no
        # longer the model; filtering on OptState also leaves out the model of nnx.ModelAndOptimizer.
        return nnx.state(optimizer, nnx.OptState)

    def _train_tree(self, model, optimizer) -> dict:
        return {"optimizer": nnx.to_pure_dict(self._optimizer_state(optimizer)),
                "model": _keys_to_data(nnx.to_pure_dict(nnx.state(model, MODEL_REST)))}

    def wait_until_finished(self) -> None:
        """Block until the pending asynchronous save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager."""
        self._manager.close()

    def __enter__(self) -> TrainCheckpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- restoring -------------------------------------------------------------------------

    def _corrupt(self, step: int, e: BaseException) -> CheckpointError:
        others = [s for s in self.all_steps() if s != step]
        fallback = (f"delete {self.step_dir(step)} to resume from the previous checkpoint (step {max(others)})"
                    if others else f"delete {self.step_dir(step)} to start the run afresh")
        return CheckpointError(f"{self.step_dir(step)}: the training checkpoint of step {step} is incomplete or "
                               f"corrupt ({_first_line(e)}); {fallback}")

    def _check_compatible(self, step: int, meta: Mapping, model, targets: Mapping[str, Any]) -> None:
        problems = []
        key, current = _model_config(model)
        config_diff = []
        if key is not None and isinstance(meta.get(key), Mapping):
            config_diff = _dict_diff(meta[key], current)
        try:
            saved = self._manager.item_metadata(step)
            for item, label in ((STATE_ITEM, "weight"), (TRAIN_ITEM, "training state")):
                tree = getattr(saved[item], "tree", None)
                if not isinstance(tree, Mapping):
                    raise ValueError(f"the '{item}' item has no readable metadata")
                problems += _tree_diff(_flat(tree), _flat(targets[item]), label)
        except Exception as e:  # unreadable metadata: a damaged checkpoint
            raise self._corrupt(step, e) from e
        if problems:
            listed = "; ".join(problems[:_SHOW]) + (f"; ... ({len(problems) - _SHOW} more)"
                                                   if len(problems) > _SHOW else "")
            fields = (f"The config fields that differ: {'; '.join(config_diff)}. " if config_diff else "")
            raise CheckpointMismatchError(
                f"{self.step_dir(step)}: the checkpoints in {self.directory} belong to another architecture or "
                f"optimiser than the model being trained. {fields}Differences: {listed}. Build the model and "
                f"optimiser with the checkpoint's config (stored in {self.step_dir(step) / CONFIG_ITEM}), or "
                "train this architecture in a new workdir")
        if config_diff:
            warnings.warn(f"{self.step_dir(step)} was saved with another config ({'; '.join(config_diff)}); the "
                          "weights fit, so training continues with the model's config", stacklevel=3)

    def restore(self, step: int, model: nnx.Module, optimizer: nnx.Optimizer, *,
                config: Mapping | Any | None = None) -> dict:
        """Restore checkpoint `step` into `model` and `optimizer` in place; returns its progress.
        The arrays land with the shardings the model's and optimiser's current arrays have.
        `config`: the run's config now; differences from the stored one are warned about (a resumed
        run may change e.g. its length) and later saves store it."""
        step = int(step)
        self.wait_until_finished()
        if step not in self._manager.all_steps():
            raise CheckpointError(f"{self.step_dir(step)}: no checkpoint of step {step} "
                                  f"(steps on disk: {self.all_steps()})")
        try:
            json_items = self._manager.restore(step, args=ocp.args.Composite(**{
                CONFIG_ITEM: ocp.args.JsonRestore(), PROGRESS_ITEM: ocp.args.JsonRestore()}))
            meta, progress = json_items[CONFIG_ITEM], json_items[PROGRESS_ITEM]
            if not isinstance(meta, Mapping) or not isinstance(progress, Mapping):
                raise ValueError("the config or progress item is not a JSON object")
        except Exception as e:
            raise self._corrupt(step, e) from e

        state = nnx.state(model, WEIGHTS)
        opt_state = self._optimizer_state(optimizer)
        rest = nnx.state(model, MODEL_REST)
        rest_pure = nnx.to_pure_dict(rest)
        targets = {
            STATE_ITEM: jax.tree.map(_abstract, nnx.to_pure_dict(state)),
            TRAIN_ITEM: {"optimizer": jax.tree.map(_abstract, nnx.to_pure_dict(opt_state)),
                         "model": jax.tree.map(_abstract, rest_pure)},
        }
        self._check_compatible(step, meta, model, targets)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**{
                STATE_ITEM: ocp.args.StandardRestore(targets[STATE_ITEM]),
                TRAIN_ITEM: ocp.args.StandardRestore(targets[TRAIN_ITEM])}))
        except Exception as e:  # orbax and tensorstore raise many types for missing or damaged parts
            raise self._corrupt(step, e) from e

        nnx.replace_by_pure_dict(state, restored[STATE_ITEM])
        nnx.update(model, state)
        restored_rest = jax.tree.map(
            lambda cur, new: jax.random.wrap_key_data(new, impl=jax.random.key_impl(cur)) if _is_key(cur) else new,
            rest_pure, restored[TRAIN_ITEM]["model"])
        nnx.replace_by_pure_dict(rest, restored_rest)
        nnx.update(model, rest)
        nnx.replace_by_pure_dict(opt_state, restored[TRAIN_ITEM]["optimizer"])
        nnx.update(optimizer, opt_state)

        if config is not None:
            self.config = _jsonable(config)
            saved = meta.get("run_config")
            diff = _dict_diff(saved, self.config, now="now") if isinstance(saved, Mapping) else []
            if diff:
                warnings.warn(f"{self.step_dir(step)}: the run's config changed since this checkpoint "
                              f"({'; '.join(diff[:_SHOW])}); continuing with the new one", stacklevel=2)
        progress = dict(progress)
        self._elapsed_before = float(progress.get("elapsed_s") or 0.0)
        self._clock = time.monotonic()
        return progress

    def restore_latest(self, model: nnx.Module, optimizer: nnx.Optimizer, *,
                       config: Mapping | Any | None = None) -> dict | None:
        """Restore the latest checkpoint into `model` and `optimizer` (in place, keeping their
        shardings) and return its progress dict; None when the workdir has no checkpoint.
        `config`: as for `restore`."""
        self.wait_until_finished()
        self._manager.reload()
        step = self.latest_step()
        if step is None:
            if config is not None:
                self.config = _jsonable(config)
            return None
        return self.restore(step, model, optimizer, config=config)


__all__ = [
    "CHECKPOINT_DIR", "CheckpointMismatchError", "PROGRESS_ITEM", "PreemptionGuard", "TRAIN_ITEM",
    "TrainCheckpointer",
]
