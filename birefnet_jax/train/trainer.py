"""`train_and_evaluate(config, workdir)`: the training loop that `train.py` runs.

One loop for one device, many devices and many hosts: the model and optimiser live on a device
mesh (`sharding.py`), each process feeds its slice of the global batch, and the step is one
`jax.jit` program that donates its state. The loop resumes from the newest checkpoint in
`workdir` (parameters, optimiser, RNG, data position), validates every `val_every_steps`, keeps
the last checkpoints and the best by `config.best_metric`, saves and exits cleanly on SIGTERM,
and stops with a message on a non-finite loss.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
from clu import metric_writers, parameter_overview, periodic_actions
from flax import nnx
from jax.experimental import multihost_utils

from birefnet_jax.config import BiRefNetConfig
from birefnet_jax.loading import load
from birefnet_jax.model import BiRefNet, set_remat
from birefnet_jax.nn.state import state_path_name
from birefnet_jax.pretrained import get_preset
from birefnet_jax.train import losses
from birefnet_jax.train.batchnorm import set_train_mode
from birefnet_jax.train.checkpointing import TrainCheckpointer
from birefnet_jax.train.data.augment import augment
from birefnet_jax.train.data.folders import DIS5K_CLASSES, find_pairs, split_sets
from birefnet_jax.train.data.pipeline import make_train_iterator
from birefnet_jax.train.data.sizes import TrainingSizes
from birefnet_jax.train.data.synthetic import write_synthetic_dataset
from birefnet_jax.train.evaluate import HIGHER_IS_BETTER, Validator, write_predictions
from birefnet_jax.train.optim import OptimConfig, freeze_backbone_if, make_optimizer
from birefnet_jax.train.sharding import batch_sharding, global_batch, make_mesh, shard_training_state
from birefnet_jax.train.step import make_train_step

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; names the step and the checkpoint to go back to."""


# --------------------------------------------------------------------------------------------------
# Model


def model_config(config) -> BiRefNetConfig:
    """The architecture: a preset (or backbone name), its backbone fields and model fields overridden."""
    cfg = get_preset(config.model.preset)
    backbone = dict(config.model.get("backbone", {}) or {})
    if backbone:
        backbone = {k: tuple(v) if isinstance(v, list) else v for k, v in backbone.items()}
        cfg = cfg.replace(backbone=dataclasses.replace(cfg.backbone, **backbone))
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(config.model.get("overrides", {})).items()}
    if config.data.get("class_labels", False):
        overrides.setdefault("num_classes", len(DIS5K_CLASSES))
    return cfg.replace(**overrides) if overrides else cfg


def _dtype(name: str | None):
    return None if name in (None, "", "float32") else jnp.dtype(name)


def initial_model(config, cfg: BiRefNetConfig) -> BiRefNet:
    """A freshly initialised model, optionally filled from `config.model.init_from` (a converted
    Orbax folder, an original .pth / .safetensors, hf:...) except the parameters matching
    `config.model.init_exclude` (e.g. a new classification head)."""
    model = BiRefNet(cfg, rngs=nnx.Rngs(config.seed), dtype=_dtype(config.model.dtype))
    if config.model.init_from:
        load_weights_into(model, config.model.init_from, exclude=tuple(config.model.init_exclude))
    return set_remat(model, bool(config.model.get("remat", False)))


def load_weights_into(model: BiRefNet, source: str, *, exclude: tuple[str, ...] = ()) -> list[str]:
    """Copy the weights of checkpoint `source` into `model` (shapes must match) except those whose
    path matches one of the `exclude` regular expressions; returns the paths kept fresh."""

    src = load(source)
    kinds = (nnx.Param, nnx.BatchStat)
    have = {state_path_name(p, "/"): v for p, v in nnx.to_flat_state(nnx.state(src, kinds))}
    patterns = [re.compile(p) for p in exclude]
    state = nnx.state(model, kinds)
    kept, problems = [], []
    for path, var in nnx.to_flat_state(state):
        name = state_path_name(path, "/")
        if any(p.match(name) for p in patterns):
            kept.append(name)
            continue
        if name not in have:
            problems.append(f"{name}: not in {source}")
        elif have[name].get_value().shape != var.get_value().shape:
            problems.append(f"{name}: shape {have[name].get_value().shape} in {source}, "
                            f"{var.get_value().shape} in the model")
        else:
            var.set_value(jnp.asarray(have.pop(name).get_value(), var.get_value().dtype))
    unused = [n for n in have if not any(p.match(n) for p in patterns)]
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... ({len(problems) - 20} more)" if len(problems) > 20 else "")
        raise ValueError(f"cannot initialise from {source}: {len(problems)} parameters do not fit:\n  {shown}\n"
                         "Add patterns for them to config.model.init_exclude to keep them freshly initialised, "
                         "or fix config.model so that the architecture matches the checkpoint.")
    if unused:
        log.warning("%d weights of %s are not used by the model (e.g. %s)", len(unused), source, unused[:3])
    nnx.update(model, state)
    return kept


# --------------------------------------------------------------------------------------------------
# Data


def _train_sets(config) -> str:
    if config.data.train_sets:
        return config.data.train_sets
    task_dir = Path(config.data.root) / config.task
    val = set(split_sets(config.data.val_sets)) if config.data.val_sets else set()
    sets = sorted(p.name for p in task_dir.iterdir() if p.is_dir() and p.name not in val) if task_dir.is_dir() else []
    if not sets:
        raise FileNotFoundError(f"no training sets under {task_dir} (the layout is <root>/<task>/<set>/{{im,gt}}); "
                                "set config.data.train_sets")
    return "+".join(sets)


def _synthetic_data(config, workdir: Path) -> None:
    """Write the quickstart's synthetic data set under <workdir>/data once (process 0 writes)."""

    root = workdir / "data"
    if jax.process_index() == 0:
        for name, count, seed in (("SYN-TR", config.data.synthetic_train, 0), ("SYN-VD", config.data.synthetic_val, 1)):
            if count and not (root / config.task / name / "gt").is_dir():
                write_synthetic_dataset(root, count, size=tuple(config.data.size), seed=config.seed * 100 + seed,
                                        task=config.task, set_name=name)
    _sync("synthetic data")
    config.data.root = str(root)
    config.data.train_sets, config.data.val_sets = "SYN-TR", ("SYN-VD" if config.data.synthetic_val else "")


def _sync(name: str) -> None:
    if jax.process_count() > 1:

        multihost_utils.sync_global_devices(name)


def _sizes(config) -> TrainingSizes:
    if config.data.dynamic_size:
        return TrainingSizes.dynamic(per_side=config.data.buckets_per_side)
    return TrainingSizes.fixed(tuple(config.data.size))


def _augment(config):

    methods = tuple(config.data.augmentations)
    if not methods and not config.data.background_synthesis:
        return None
    return functools.partial(augment, methods=methods, background_synthesis=config.data.background_synthesis)


# --------------------------------------------------------------------------------------------------
# The loop


def _optim_config(config) -> OptimConfig:
    fields = {f.name for f in dataclasses.fields(OptimConfig)}
    given = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.optim.items() if k in fields}
    unknown = set(config.optim.keys()) - fields
    if unknown:
        raise ValueError(f"unknown config.optim fields {sorted(unknown)}; known: {sorted(fields)}")
    return OptimConfig(task=config.task, **given)


def _lambdas(config, epoch: int) -> dict[str, float]:
    return losses.lambdas_for_epoch(epoch, config.epochs, config.task, compound=config.loss.compound_finetune,
                                    finetune_last_epochs=config.loss.get("finetune_last_epochs"))


def _finite_or_raise(logs: dict[str, float], step: int, checkpointer) -> None:
    if all(math.isfinite(v) for v in logs.values()):
        return
    last = checkpointer.latest_step() if checkpointer is not None else None
    back = (f"the last checkpoint is step {last} in {checkpointer.directory}; resume from it with a lower "
            "learning rate, gradient clipping (config.optim.clip_grad_norm) or float32 compute"
            if last is not None else "no checkpoint was saved yet; restart with a lower learning rate, "
            "gradient clipping (config.optim.clip_grad_norm) or float32 compute")
    bad = {k: v for k, v in logs.items() if not math.isfinite(v)}
    raise NonFiniteLossError(f"non-finite loss at step {step} ({bad}); {back}")


def train_and_evaluate(config, workdir: str | Path) -> dict:
    """Train as `config` says, in `workdir` (checkpoints, logs, predictions). Returns the final
    validation metrics (and 'status': 'done' or 'preempted')."""


    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    config = config.copy_and_resolve_references() if hasattr(config, "copy_and_resolve_references") else config
    if config.get("compile_cache_dir"):
        # A restart (preemption, a crash) then loads the compiled step instead of compiling it again:
        # minutes saved, and XLA's compilation memory peak (larger than a step's own) avoided.
        cache = Path(config.compile_cache_dir).expanduser()
        jax.config.update("jax_compilation_cache_dir", str(cache if cache.is_absolute() else workdir / cache))
    if hasattr(config, "unlock"):  # the synthetic data set rewrites the data fields
        config.unlock()
    if not config.data.root:
        _synthetic_data(config, workdir)
    writer = metric_writers.create_default_writer(workdir / "logs", just_logging=jax.process_index() > 0)

    # Data.
    pairs = find_pairs(config.data.root, config.task, _train_sets(config), class_labels=config.data.class_labels)
    val_pairs = find_pairs(config.data.root, config.task, config.data.val_sets) if config.data.val_sets else []
    if config.get("val_max_images", 0):
        val_pairs = val_pairs[: config.val_max_images]
    gbs = config.batch_size
    mesh = make_mesh(config.mesh.fsdp)
    if gbs % mesh.size:
        raise ValueError(f"batch_size {gbs} must be a multiple of the number of devices ({mesh.size})")
    steps_per_epoch = len(pairs) // gbs
    if steps_per_epoch == 0:
        raise ValueError(f"{len(pairs)} training images give no full batch of {gbs}; lower config.batch_size")
    total_steps = config.epochs * steps_per_epoch

    # Model, optimiser, mesh.
    cfg = model_config(config)
    model = initial_model(config, cfg)
    bn_mode = set_train_mode(model, batch_norm=config.batch_norm, global_batch_size=gbs)
    opt_cfg = freeze_backbone_if(_optim_config(config), cfg.backbone_frozen)  # e.g. DINOv3, as the original
    tx, schedule = make_optimizer(opt_cfg, nnx.state(model, nnx.Param), global_batch_size=gbs, epochs=config.epochs,
                                  steps_per_epoch=steps_per_epoch)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    shard_training_state(model, optimizer, mesh)
    in_sharding = batch_sharding(mesh)

    checkpointer = TrainCheckpointer(workdir, max_to_keep=config.keep_checkpoints,
                                     best_metric=config.best_metric,
                                     best_mode="max" if HIGHER_IS_BETTER[config.best_metric.split("/")[-1]] else "min",
                                     save_every_steps=config.checkpoint_every_steps)
    progress = checkpointer.restore_latest(model, optimizer, config=config.to_dict()) or {}
    start = int(progress.get("step", 0))
    if start == 0 and jax.process_index() == 0:
        parameter_overview.log_parameter_overview(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    log.info("training %s: %d images, %d steps of %d (%d per epoch), BatchNorm %s, mesh %s, from step %d",
             cfg.backbone.kind, len(pairs), total_steps, gbs, steps_per_epoch, bn_mode, dict(mesh.shape), start)

    validator = None
    if val_pairs:
        val_batch = -(-config.val_batch_size // mesh.size) * mesh.size  # a multiple of the devices
        validator = Validator(val_pairs, size=tuple(config.val_size), batch_size=val_batch, batch_sharding=in_sharding)

    data = make_train_iterator(pairs, global_batch_size=gbs, sizes=_sizes(config), seed=config.seed, start_step=start,
                               process_index=jax.process_index(), process_count=jax.process_count(),
                               augment=_augment(config), num_threads=config.data.num_threads or None,
                               worker_count=config.data.worker_count)
    hooks = [periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                             every_steps=config.log_every_steps)]
    if config.profile_steps:
        hooks.append(periodic_actions.Profile(num_profile_steps=config.profile_steps, logdir=str(workdir / "logs")))

    steps: dict[tuple, object] = {}
    metrics: dict[str, float] = {}
    preds: list = []
    sums: dict[str, float] = {}
    status = "done"
    step = start
    with data, checkpointer.preemption_guard():
        while step < total_steps:
            epoch = step // steps_per_epoch + 1
            lambdas = _lambdas(config, epoch)
            key = tuple(sorted(lambdas.items()))
            if key not in steps:
                steps[key] = make_train_step(lambdas=lambdas, batch_sum_scale=opt_cfg.accumulate_steps)
            batch = global_batch(next(data), in_sharding)
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                logs = steps[key](model, optimizer, batch)
            step += 1
            logs = {k: float(v) for k, v in jax.device_get(logs).items()}
            _finite_or_raise(logs, step, checkpointer)
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v
            writer.write_scalars(step, {"train/lr": float(schedule((step - 1) // opt_cfg.accumulate_steps)),
                                        "train/grad_norm_step": logs["grad_norm"]})
            for hook in hooks:
                hook(step)
            if step % config.log_every_steps == 0 or step == total_steps:
                n = config.log_every_steps if step % config.log_every_steps == 0 else step % config.log_every_steps
                writer.write_scalars(step, {f"train/{k}": v / n for k, v in sums.items()})
                sums = {}
            if validator is not None and (step % config.val_every_steps == 0 or step == total_steps):
                result = validator.run(model)
                metrics, preds = result.metrics, result.preds
                writer.write_scalars(step, metrics)
            preempted = checkpointer.preemption_requested()
            if checkpointer.should_save(step) or step == total_steps or preempted:
                checkpointer.save(step, model, optimizer,
                                  progress={"step": step, "epoch": epoch, "data_position": data.step},
                                  metrics=metrics if metrics and step % config.val_every_steps == 0 else None,
                                  config=config.to_dict(), force=True)
            if preempted:
                log.warning("SIGTERM: saved step %d in %s; run again to resume", step, checkpointer.directory)
                status = "preempted"
                break
    checkpointer.wait_until_finished()
    writer.flush()
    n = config.write_predictions
    if status == "done" and preds and n and jax.process_index() == 0:
        write_predictions(workdir / "predictions", val_pairs[:n], preds[:n])
        validator.save_comparison(workdir / "predictions.png", preds, count=n)
    return {**metrics, "status": status, "step": step}


__all__ = ["NonFiniteLossError", "initial_model", "load_weights_into", "model_config", "train_and_evaluate"]
