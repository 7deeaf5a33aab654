"""One training step: the model's training-mode forward, the original's objective, its gradients
and an optax update, as a pure function for `nnx.jit`.

Gradient accumulation: `optax.MultiSteps` averages the gradients of k micro-batches. Most pixel
criteria are means over the batch, but the original's IoU (and patch IoU) is a *sum* over the
batch, so averaging k micro-batch losses would shrink its weight k times. `batch_sum_scale`
multiplies those criteria's weights: with k micro-batches of a batch, k makes the average of the
micro-batch losses equal the whole batch's loss (and their gradients average to its gradient).
BatchNorm statistics still couple the images of a batch, so accumulation equals one big batch
exactly only with BatchNorm frozen or absent (`batchnorm.set_train_mode`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import optax
from flax import nnx

from birefnet_jax.train import losses

# Criteria that sum over the batch instead of averaging.
BATCH_SUMMED = ("iou", "iou_patch")


def scale_batch_summed(lambdas: Mapping[str, float], factor: float) -> dict[str, float]:
    return {k: (w * factor if k in BATCH_SUMMED else w) for k, w in lambdas.items()}


def loss_fn(model: nnx.Module, batch: Mapping[str, jax.Array], *, lambdas: Mapping[str, float] | None = None,
            lambdas_cls: Mapping[str, float] | None = None, batch_sum_scale: float = 1.0):
    """(loss, (logs, outputs)) of the model in training mode on `batch` ('image' NHWC normalised,
    'mask' (B, H, W, 1) in [0, 1], optional 'class_label' (B,))."""
    lambdas = losses.LAMBDAS_PIX_LAST["DIS5K"] if lambdas is None else lambdas
    if batch_sum_scale != 1.0:
        lambdas = scale_batch_summed(lambdas, batch_sum_scale)
    outputs = model(batch["image"])
    loss, logs = losses.objective(outputs, batch["mask"], batch.get("class_label"), lambdas=lambdas,
                                  lambdas_cls=lambdas_cls)
    return loss, (logs, outputs)


def train_step(model: nnx.Module, optimizer: nnx.Optimizer, batch, *, lambdas=None, lambdas_cls=None,
               batch_sum_scale: float = 1.0) -> dict[str, jax.Array]:
    """Forward, backward and one optimiser update (a micro-step under gradient accumulation).
    BatchNorm running statistics and the dropout RNG state advance inside the model."""
    grad_fn = nnx.value_and_grad(functools.partial(loss_fn, lambdas=lambdas, lambdas_cls=lambdas_cls,
                                                   batch_sum_scale=batch_sum_scale), has_aux=True)
    (_, (logs, _)), grads = grad_fn(model, batch)
    optimizer.update(model, grads)
    return {**logs, "grad_norm": optax.tree.norm(grads)}


def make_train_step(*, lambdas: Mapping[str, float] | None = None, lambdas_cls: Mapping[str, float] | None = None,
                    batch_sum_scale: float = 1.0, donate: bool = True):
    """`train_step` compiled with the weights bound (Python floats: zero weights cost nothing; new
    weights, as in the fine-tuning phase, mean a new step function and one compilation)."""
    step = functools.partial(train_step, lambdas=None if lambdas is None else dict(lambdas),
                             lambdas_cls=None if lambdas_cls is None else dict(lambdas_cls),
                             batch_sum_scale=batch_sum_scale)
    return nnx.jit(step, donate_argnums=(0, 1) if donate else ())


__all__ = ["BATCH_SUMMED", "loss_fn", "make_train_step", "scale_batch_summed", "train_step"]
