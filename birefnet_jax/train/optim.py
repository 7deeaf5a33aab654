"""Optimisation with optax: the original's AdamW / Adam, its batch-size learning-rate rule and
step decay, plus what it lacks (warm-up and cosine, clipping, gradient accumulation, frozen
parameter subsets).

Equivalences with the original's PyTorch optimisers:
- `torch.optim.AdamW(lr, weight_decay=1e-2)` (betas 0.9/0.999, eps 1e-8, decay on every
  parameter) is `optax.adamw` with the same numbers: both decay decoupled, p <- p - lr * (adam + wd * p).
- `torch.optim.Adam(lr, weight_decay=0)` is `optax.adam`.
- `MultiStepLR(milestones, gamma)` stepped once per epoch is a piecewise-constant schedule whose
  boundaries are the milestones times the updates per epoch (`step_decay_schedule`).

The original's learning rate is `base * sqrt(batch_size / 4)` with base 1e-4 for DIS5K and 1e-5
otherwise, where `batch_size` is its per-GPU batch (DDP averages the gradients of all GPUs, but
the rule only sees one GPU's share). `OptimConfig.lr_batch_size` says which batch the rule sees;
left at None it is the global batch, the batch one gradient averages over.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

import jax
import optax

from birefnet_jax.nn.state import state_path_name

# Base learning rate of the original per task, for a batch of 4 (scaled by sqrt(batch / 4)).
BASE_LR = {"DIS5K": 1e-4}
BASE_LR_OTHER = 1e-5
# The original's default milestone lies beyond any run: its learning rate never decays.
NEVER = 100_000


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimiser settings; the defaults are the original's (AdamW, no decay of the learning rate)."""

    optimizer: str = "AdamW"  # "AdamW" (weight decay 1e-2) or "Adam" (none), as the original
    task: str = "DIS5K"  # picks the base learning rate when `lr` is None
    lr: float | None = None  # the learning rate itself; None: the original's rule for `task`
    lr_batch_size: int | None = None  # batch the rule scales with; None: the global batch
    weight_decay: float | None = None  # None: 1e-2 for AdamW, 0 for Adam
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    schedule: str = "step"  # "step" (the original's MultiStepLR), "cosine" or "constant"
    lr_decay_epochs: tuple[int, ...] = (NEVER,)  # step decay milestones; negative N: N-th epoch from the end
    lr_decay_rate: float = 0.5
    warmup_epochs: float = 0.0  # linear warm-up from 0, in (possibly fractional) epochs
    min_lr_ratio: float = 0.0  # cosine: final learning rate as a fraction of the peak
    clip_grad_norm: float | None = None  # global-norm clipping of the trainable gradients
    accumulate_steps: int = 1  # micro-batches per update (optax.MultiSteps)
    frozen: tuple[str, ...] = ()  # regular expressions matched at the start of parameter paths

    def __post_init__(self):
        if self.optimizer not in ("AdamW", "Adam"):
            raise ValueError(f"optimizer must be 'AdamW' or 'Adam', got {self.optimizer!r}")
        if self.schedule not in ("step", "cosine", "constant"):
            raise ValueError(f"schedule must be 'step', 'cosine' or 'constant', got {self.schedule!r}")
        if self.accumulate_steps < 1:
            raise ValueError(f"accumulate_steps must be at least 1, got {self.accumulate_steps}")


def scaled_learning_rate(task: str, batch_size: int, base: float | None = None) -> float:
    """The original's rule: the task's base rate times sqrt(batch_size / 4)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    base = BASE_LR.get(task, BASE_LR_OTHER) if base is None else base
    return base * math.sqrt(batch_size / 4)


def peak_learning_rate(cfg: OptimConfig, global_batch_size: int) -> float:
    if cfg.lr is not None:
        return cfg.lr
    return scaled_learning_rate(cfg.task, cfg.lr_batch_size or global_batch_size)


def decay_milestones(lr_decay_epochs: Sequence[int], epochs: int) -> list[int]:
    """Milestone epochs as the original resolves them: negative N means `epochs + N + 1`."""
    return [int(m) if m > 0 else epochs + int(m) + 1 for m in lr_decay_epochs]


def step_decay_schedule(peak: float, milestones: Sequence[int], rate: float, updates_per_epoch: int):
    """MultiStepLR stepped at each epoch's end: after milestone m (an epoch count) the rate is
    multiplied by `rate`, i.e. from update m * updates_per_epoch on."""
    bounds: dict[int, float] = {}
    for m in milestones:
        b = m * updates_per_epoch
        bounds[b] = bounds.get(b, 1.0) * rate
    return optax.piecewise_constant_schedule(peak, bounds)


def learning_rate_schedule(cfg: OptimConfig, *, global_batch_size: int, epochs: int, updates_per_epoch: int):
    """The learning rate per optimiser update (an accumulated group of micro-batches counts once)."""
    peak = peak_learning_rate(cfg, global_batch_size)
    warmup = int(round(cfg.warmup_epochs * updates_per_epoch))
    total = epochs * updates_per_epoch
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total, warmup + 1),
                                                  end_value=peak * cfg.min_lr_ratio)
    if cfg.schedule == "constant":
        main = optax.constant_schedule(peak)
    else:
        main = step_decay_schedule(peak, decay_milestones(cfg.lr_decay_epochs, epochs), cfg.lr_decay_rate,
                                   updates_per_epoch)
    if not warmup:
        return main
    ramp = optax.linear_schedule(0.0, peak, warmup)
    # The step schedule keeps counting from 0 so that its milestones stay at their epochs.
    return lambda count: jax.numpy.where(count < warmup, ramp(count), main(count))


def _label_tree(tree, patterns, used=None):
    def label(path, _):
        hits = [p.pattern for p in patterns if p.match(state_path_name(path, "/"))]
        if used is not None:
            used.update(hits)
        return "frozen" if hits else "trainable"

    return jax.tree_util.tree_map_with_path(label, tree)


def parameter_labels(params, frozen: Sequence[str]):
    """'frozen' or 'trainable' for every leaf of `params`, by regular expressions matched at the
    start of the '/'-joined parameter path (e.g. 'bb/' freezes the backbone). A pattern that
    matches nothing is an error (a typo would otherwise train what was meant to stay frozen)."""
    patterns = [re.compile(p) for p in frozen]
    used: set[str] = set()
    labels = _label_tree(params, patterns, used)
    unused = [p.pattern for p in patterns if p.pattern not in used]
    if unused:
        examples = [state_path_name(path, "/") for path, _ in jax.tree_util.tree_leaves_with_path(params)[:3]]
        raise ValueError(f"frozen patterns {unused} match no parameter; paths look like {examples}")
    return labels


BACKBONE_PATTERN = "bb/"


def freeze_backbone_if(cfg: OptimConfig, frozen: bool) -> OptimConfig:
    """`cfg` with the backbone among the frozen parameters where the model config freezes it
    (`BiRefNetConfig.backbone_frozen`: no optimiser state for it, and no update)."""
    if not frozen or BACKBONE_PATTERN in cfg.frozen:
        return cfg
    return dataclasses.replace(cfg, frozen=(*cfg.frozen, BACKBONE_PATTERN))


def make_optimizer(cfg: OptimConfig, params, *, global_batch_size: int, epochs: int,
                   steps_per_epoch: int) -> tuple[optax.GradientTransformation, object]:
    """The optax transformation for `params` (the model's `nnx.Param` state) and its learning-rate
    schedule. `steps_per_epoch` counts micro-batches; with `accumulate_steps` k the schedule
    advances once per k of them."""
    updates_per_epoch = max(1, steps_per_epoch // cfg.accumulate_steps)
    schedule = learning_rate_schedule(cfg, global_batch_size=global_batch_size, epochs=epochs,
                                      updates_per_epoch=updates_per_epoch)
    if cfg.optimizer == "AdamW":
        wd = 1e-2 if cfg.weight_decay is None else cfg.weight_decay
        inner = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=wd)
    else:
        inner = optax.adam(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
        if cfg.weight_decay:  # Adam's L2 penalty added to the gradient, as torch.optim.Adam does
            inner = optax.chain(optax.add_decayed_weights(cfg.weight_decay), inner)
    if cfg.clip_grad_norm is not None:
        inner = optax.chain(optax.clip_by_global_norm(cfg.clip_grad_norm), inner)
    tx = inner
    if cfg.frozen:
        parameter_labels(params, cfg.frozen)  # fails early on a pattern that matches nothing
        patterns = [re.compile(p) for p in cfg.frozen]
        tx = optax.multi_transform({"trainable": inner, "frozen": optax.set_to_zero()},
                                   lambda tree: _label_tree(tree, patterns))
    if cfg.accumulate_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.accumulate_steps)
    return tx, schedule


__all__ = [
    "OptimConfig", "decay_milestones", "freeze_backbone_if", "learning_rate_schedule", "make_optimizer",
    "parameter_labels", "peak_learning_rate", "scaled_learning_rate", "step_decay_schedule",
]
