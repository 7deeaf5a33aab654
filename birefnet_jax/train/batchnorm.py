"""Training mode with BatchNorm that works for any batch size.

The original builds its model without BatchNorm when trained with batch size 1 (PyTorch cannot
normalise a single value per channel, as in the ASPP pooling branch), so the released weights,
which have BatchNorm, no longer load for fine-tuning at batch size 1. Here the architecture never
changes with the batch size; instead BatchNorm layers either use the batch statistics (the
original's training behaviour; under `jax.jit` over a device mesh the mean and variance are taken
over the global batch, i.e. synchronised across devices and hosts) or keep the checkpoint's
running statistics frozen (normalise with them, never update them).
A checkpoint trained without BatchNorm has none to set, and loads as before.
"""

from __future__ import annotations

from flax import nnx

from birefnet_jax.nn.layers import BatchNorm2d

MODES = ("batch", "frozen", "auto")
# "auto" uses batch statistics from this global batch size on; below it they are frozen.
MIN_BATCH_FOR_STATISTICS = 2


def batchnorm_layers(model: nnx.Module) -> list[BatchNorm2d]:
    return [m for _, m in nnx.iter_graph(model) if isinstance(m, BatchNorm2d)]


def resolve_mode(mode: str, global_batch_size: int | None) -> str:
    if mode not in MODES:
        raise ValueError(f"batch_norm must be one of {MODES}, got {mode!r}")
    if mode != "auto":
        return mode
    if global_batch_size is None:
        raise ValueError("batch_norm='auto' needs the global batch size")
    return "batch" if global_batch_size >= MIN_BATCH_FOR_STATISTICS else "frozen"


def set_train_mode(model: nnx.Module, *, batch_norm: str = "auto", global_batch_size: int | None = None) -> str:
    """Put `model` in training mode (dropout and stochastic depth on); BatchNorm as `batch_norm`
    says ('auto': batch statistics unless the global batch is a single image). Returns the mode
    BatchNorm ended up in ('batch', 'frozen', or 'none' when the model has no BatchNorm)."""
    resolved = resolve_mode(batch_norm, global_batch_size)
    model.train()
    layers = batchnorm_layers(model)
    if resolved == "frozen":
        for bn in layers:
            bn.use_running_average = True
    return resolved if layers else "none"


__all__ = ["MIN_BATCH_FOR_STATISTICS", "MODES", "batchnorm_layers", "resolve_mode", "set_train_mode"]
