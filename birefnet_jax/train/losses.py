"""BiRefNet's training objective as pure functions of NHWC arrays (jit-able and differentiable).

The total is the original's: a pixel loss on every prediction level (multi-scale maps m4, m3, m2 and the
final map), a binary cross-entropy between the gradient-attention predictions and their targets, and, when
the model has a classification head, a cross-entropy on its logits.

Pixel criteria take probabilities `pred` (sigmoid already applied) and targets `gt` in [0, 1], shaped
(B, H, W, C). They compute in the input's dtype, or float32 for narrower inputs (bfloat16), and return a
scalar of that dtype. Like the original's `PixLoss`, `objective` feeds every criterion the sigmoid of the
logits -- the structure loss included, although that loss was written for logits (`structure_loss` takes
logits; the objective passes it probabilities).

Weights: `LAMBDAS_PIX_LAST[task]` and `LAMBDAS_CLS` are the original's tables; `lambdas_for_epoch` gives
the weights of an epoch, including the reweighting of the last fine-tuning epochs.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType

import jax
import jax.numpy as jnp
import numpy as np

from birefnet_jax.nn.layers import resize_bilinear

__all__ = [
    "FINETUNE_FACTORS",
    "FINETUNE_LAST_EPOCHS",
    "LAMBDAS_CLS",
    "LAMBDAS_PIX_LAST",
    "PIX_CRITERIA",
    "TASKS",
    "bce_loss",
    "classification_loss",
    "contour_loss",
    "cross_entropy_loss",
    "finetune_lambdas",
    "gradient_loss",
    "iou_loss",
    "lambdas_for_epoch",
    "mae_loss",
    "mse_loss",
    "objective",
    "patch_iou_loss",
    "pixel_loss",
    "reg_loss",
    "ssim_loss",
    "structure_loss",
]

Array = jax.Array


def _compute_dtype(*xs) -> jnp.dtype:
    """The dtype a loss is computed in: the widest input float, at least float32."""
    dt = jnp.float32
    for x in xs:
        dt = jnp.promote_types(dt, jnp.asarray(x).dtype)
    return jnp.dtype(dt)


def _cast(*xs):
    dt = _compute_dtype(*xs)
    return tuple(jnp.asarray(x).astype(dt) for x in xs)


# --------------------------------------------------------------------------------------------------------
# Criteria on probabilities


_BCE_LOG_FLOOR = -100.0  # PyTorch's BCELoss clamps both logarithms here, so a saturated p costs 100, not inf
_BCE_GRAD_EPS = 1e-12  # and bounds p * (1 - p) from below in its gradient


@jax.custom_jvp
def _bce_map(p, y):
    log_p = jnp.maximum(jnp.log(p), _BCE_LOG_FLOOR)
    log_1mp = jnp.maximum(jnp.log1p(-p), _BCE_LOG_FLOOR)
    return (y - 1) * log_1mp - y * log_p


@_bce_map.defjvp
def _bce_map_jvp(primals, tangents):
    # PyTorch's derivative rather than the derivative of the clamped logs: it stays finite where p is
    # exactly 0 or 1 (a saturated sigmoid) instead of multiplying 0 by inf, and matches its gradients.
    p, y = primals
    dp, dy = tangents
    log_p = jnp.maximum(jnp.log(p), _BCE_LOG_FLOOR)
    log_1mp = jnp.maximum(jnp.log1p(-p), _BCE_LOG_FLOOR)
    out = (y - 1) * log_1mp - y * log_p
    d_p = (p - y) / jnp.maximum(p * (1 - p), _BCE_GRAD_EPS)
    return out, d_p * dp + (log_1mp - log_p) * dy


def bce_loss(pred: Array, gt: Array) -> Array:
    """Binary cross-entropy on probabilities, averaged over all elements, with PyTorch's `BCELoss`
    semantics: each log is clamped at -100, and the gradient is PyTorch's (finite at p = 0 or 1)."""
    pred, gt = _cast(pred, gt)
    return jnp.mean(_bce_map(pred, gt))


def iou_loss(pred: Array, gt: Array) -> Array:
    """1 - soft IoU of each sample, SUMMED over the batch (not averaged), as the original does: the
    loss scales with the batch size. A sample whose prediction and target are both all-zero gives NaN
    (0 / 0), as in the original."""
    pred, gt = _cast(pred, gt)
    axes = tuple(range(1, pred.ndim))
    inter = jnp.sum(gt * pred, axis=axes)
    union = jnp.sum(gt, axis=axes) + jnp.sum(pred, axis=axes) - inter
    return jnp.sum(1 - inter / union)


def patch_iou_loss(pred: Array, gt: Array, window: int | tuple[int, int] = 64, *,
                   original_windows: bool = False) -> Array:
    """IoU loss summed over windows of the image, so that small objects and thin parts weigh as much as
    their share of a window rather than of the whole image.

    Default: the image is tiled into `window` (64x64) cells from the top-left corner; each cell's
    `iou_loss` (itself summed over the batch) is added up. At ragged edges (H or W not a multiple of the
    window) the last row/column of cells is simply smaller -- the remainder -- and counts as a full
    window (no padding enters the IoU; implemented by zero padding, which adds nothing to the sums). A
    cell where both prediction and target are all-zero gives NaN, like `iou_loss`.

    `original_windows=True` reproduces the original's `PatchIoULoss` exactly. Its loops take the
    anchors from the batch size and the channel count instead of the height and width (and step x by
    the y window): y anchors 0, 64, ... below B and x anchors 0, 64, ... below C. With B < 64 and one
    channel it therefore only ever scores the top-left 64x64 window. With B >= 64 it also scores the
    windows at y = 64, 128, ... < B (an anchor at or beyond H slices an empty window, whose IoU is 0 / 0
    = NaN, as in the original).
    """
    pred, gt = _cast(pred, gt)
    wy, wx = (window, window) if isinstance(window, int) else tuple(window)
    if original_windows:
        total = jnp.zeros((), pred.dtype)
        for ay in range(0, pred.shape[0], wy):
            for ax in range(0, pred.shape[-1], wy):
                total = total + iou_loss(pred[:, ay:ay + wy, ax:ax + wx], gt[:, ay:ay + wy, ax:ax + wx])
        return total
    b, h, w, c = pred.shape
    ny, nx = -(-h // wy), -(-w // wx)
    pad = ((0, 0), (0, ny * wy - h), (0, nx * wx - w), (0, 0))

    def cells(x):
        return jnp.pad(x, pad).reshape(b, ny, wy, nx, wx, c)

    p, g = cells(pred), cells(gt)
    axes = (2, 4, 5)
    inter = jnp.sum(g * p, axis=axes)
    union = jnp.sum(g, axis=axes) + jnp.sum(p, axis=axes) - inter
    return jnp.sum(1 - inter / union)


def _gaussian_window(size: int, sigma: float) -> np.ndarray:
    # Rounded to float32 as the original builds it, also when it computes in float64 (it casts this
    # window). Its normaliser is the float32 rounding of the exact sum (as PyTorch's CPU sum gives it):
    # one ulp more or less in the weights shifts SSIM on smooth maps by ~1e-5, through the cancellation
    # in E[x^2] - E[x]^2.
    g = np.array([math.exp(-((i - size // 2) ** 2) / (2.0 * sigma ** 2)) for i in range(size)], np.float32)
    g = g / np.float32(g.astype(np.float64).sum())
    return np.outer(g, g).astype(np.float32)


def _filter_same(x: Array, kernel: np.ndarray) -> Array:
    """Correlate every channel of NHWC maps with one 2D kernel, zero padding to the same size."""
    b, h, w, c = x.shape
    kh, kw = kernel.shape
    # Channels go to the batch axis: one single-channel convolution instead of a grouped one (slow on
    # XLA:CPU). HIGHEST precision: SSIM subtracts squared means from means of squares, which TF32 would ruin.
    xs = jnp.moveaxis(x, -1, 1).reshape(b * c, h, w, 1)
    k = jnp.asarray(kernel, x.dtype)[:, :, None, None]
    y = jax.lax.conv_general_dilated(xs, k, (1, 1), ((kh // 2, kh // 2), (kw // 2, kw // 2)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=jax.lax.Precision.HIGHEST)
    return jnp.moveaxis(y.reshape(b, c, h, w), 1, -1)


def ssim_loss(pred: Array, gt: Array, window_size: int = 11, sigma: float = 1.5) -> Array:
    """1 - (1 + SSIM) / 2, with the mean SSIM over all pixels from a Gaussian window (11, sigma 1.5) and
    zero padding, as the original: rewards matching local structure (edges) beyond per-pixel errors."""
    pred, gt = _cast(pred, gt)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    n = pred.shape[-1]
    stats = _filter_same(jnp.concatenate([pred, gt, pred * pred, gt * gt, pred * gt], axis=-1),
                         _gaussian_window(window_size, sigma))
    mu1, mu2, e11, e22, e12 = (stats[..., i * n:(i + 1) * n] for i in range(5))
    mu1_sq, mu2_sq, mu12 = mu1 * mu1, mu2 * mu2, mu1 * mu2
    var1, var2, cov = e11 - mu1_sq, e22 - mu2_sq, e12 - mu12
    ssim_map = ((2 * mu12 + c1) * (2 * cov + c2)) / ((mu1_sq + mu2_sq + c1) * (var1 + var2 + c2))
    return 1 - (1 + jnp.mean(ssim_map)) / 2


def mae_loss(pred: Array, gt: Array) -> Array:
    """Mean absolute error (PyTorch's L1Loss)."""
    pred, gt = _cast(pred, gt)
    return jnp.mean(jnp.abs(pred - gt))


def mse_loss(pred: Array, gt: Array) -> Array:
    """Mean squared error (PyTorch's MSELoss); the original notes it smooths the maps."""
    pred, gt = _cast(pred, gt)
    return jnp.mean(jnp.square(pred - gt))


def reg_loss(pred: Array, gt: Array | None = None) -> Array:
    """Threshold regulariser mean(1 - p^2 - (p - 1)^2): smallest at p = 0 or 1, so it pushes the map to
    be binary. Ignores `gt` (kept for a uniform criterion signature)."""
    (pred,) = _cast(pred)
    return jnp.mean(1 - (jnp.square(pred) + jnp.square(pred - 1)))


def contour_loss(pred: Array, gt: Array, weight: float = 10.0, eps: float = 1e-8) -> Array:
    """Active-contour loss: `weight` times the mean contour length of the prediction plus the region
    terms mean(p (gt - 1)^2) + mean((1 - p) gt^2). `eps` inside the square root keeps the length (and its
    gradient) finite where the prediction is flat."""
    pred, gt = _cast(pred, gt)
    d_y = jnp.diff(pred, axis=1)[:, 1:, :-2]  # (B, H-2, W-2, C), as the original pairs the differences
    d_x = jnp.diff(pred, axis=2)[:, :-2, 1:]
    length = jnp.mean(jnp.sqrt(jnp.abs(jnp.square(d_y) + jnp.square(d_x)) + eps))
    region_in = jnp.mean(pred * jnp.square(gt - 1))
    region_out = jnp.mean((1 - pred) * jnp.square(gt))
    return weight * length + (region_in + region_out)


def _avg_pool_same(x: Array, size: int) -> Array:
    """Stride-1 average pool with zero padding to the same size, dividing by the full window
    (PyTorch's avg_pool2d with count_include_pad=True)."""
    # Separable: 2 x 31 additions a pixel instead of 31^2 (exact for binary targets in any order).
    r = size // 2
    zero = jnp.zeros((), x.dtype)
    s = jax.lax.reduce_window(x, zero, jax.lax.add, (1, size, 1, 1), (1, 1, 1, 1), ((0, 0), (r, r), (0, 0), (0, 0)))
    s = jax.lax.reduce_window(s, zero, jax.lax.add, (1, 1, size, 1), (1, 1, 1, 1), ((0, 0), (0, 0), (r, r), (0, 0)))
    return s / (size * size)


def structure_loss(logits: Array, gt: Array) -> Array:
    """Weighted BCE-with-logits + weighted IoU (MVANet's structure loss), per sample and channel, then
    averaged. The weight 1 + 5 |avgpool31(gt) - gt| emphasises pixels near the object's boundary.

    It takes logits. The original's `PixLoss` calls it on sigmoid probabilities instead (treating them
    as logits); `objective` does the same, for parity."""
    logits, gt = _cast(logits, gt)
    weight = 1 + 5 * jnp.abs(_avg_pool_same(gt, 31) - gt)
    bce = (1 - gt) * logits - jax.nn.log_sigmoid(logits)
    wbce = jnp.sum(weight * bce, axis=(1, 2)) / jnp.sum(weight, axis=(1, 2))
    p = jax.nn.sigmoid(logits)
    inter = jnp.sum(p * gt * weight, axis=(1, 2))
    union = jnp.sum((p + gt) * weight, axis=(1, 2))
    wiou = 1 - (inter + 1) / (union - inter + 1)
    return jnp.mean(wbce + wiou)


def cross_entropy_loss(logits: Array, labels: Array, ignore_index: int = -100) -> Array:
    """Softmax cross-entropy of (B, K) logits against integer labels, averaged over the labels that
    are not `ignore_index` (PyTorch's CrossEntropyLoss defaults)."""
    (logits,) = _cast(logits)
    labels = jnp.asarray(labels)
    valid = labels != ignore_index
    safe = jnp.where(valid, labels, 0).astype(jnp.int32)
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, safe[:, None], axis=-1)[:, 0]
    return jnp.sum(jnp.where(valid, nll, 0)) / jnp.sum(valid).astype(logits.dtype)


# Name -> criterion on (probabilities, gt), in the order the original evaluates and sums them.
PIX_CRITERIA: dict[str, Callable[[Array, Array], Array]] = {
    "bce": bce_loss,
    "iou": iou_loss,
    "iou_patch": patch_iou_loss,
    "ssim": ssim_loss,
    "mae": mae_loss,
    "mse": mse_loss,
    "reg": reg_loss,
    "cnt": contour_loss,
    "structure": structure_loss,
}

# --------------------------------------------------------------------------------------------------------
# Weights

TASKS = ("DIS5K", "COD", "HRSOD", "General", "General-2K", "Matting")

# `triplet` is listed by the original config but has no criterion there (nor here); it is always 0.
_LAMBDAS_DEFAULT = {"bce": 30.0, "iou": 0.5, "iou_patch": 0.0, "mae": 0.0, "mse": 0.0, "triplet": 0.0,
                    "reg": 0.0, "ssim": 10.0, "cnt": 0.0, "structure": 0.0}
_LAMBDAS_GENERAL = {**_LAMBDAS_DEFAULT, "mae": 100.0}
_LAMBDAS_MATTING = {**_LAMBDAS_GENERAL, "iou": 0.0}

# Read-only: the original's reweighting bug came from updating its weights in place; here every
# change makes a new dict (`finetune_lambdas`, `lambdas_for_epoch`).
LAMBDAS_PIX_LAST: Mapping[str, Mapping[str, float]] = MappingProxyType({
    "DIS5K": MappingProxyType(_LAMBDAS_DEFAULT),
    "COD": MappingProxyType(_LAMBDAS_DEFAULT),
    "HRSOD": MappingProxyType(_LAMBDAS_DEFAULT),
    "General": MappingProxyType(_LAMBDAS_GENERAL),
    "General-2K": MappingProxyType(_LAMBDAS_GENERAL),
    "Matting": MappingProxyType(_LAMBDAS_MATTING),
})
LAMBDAS_CLS: Mapping[str, float] = MappingProxyType({"ce": 5.0})

# Negative: the reweighting phase covers the last |n| epochs.
FINETUNE_LAST_EPOCHS: Mapping[str, int] = MappingProxyType({
    "DIS5K": -40, "COD": -20, "HRSOD": -20, "General": -20, "General-2K": -20, "Matting": -10})

# Factors applied to the pixel weights at each epoch of that phase (1.0 entries kept for the record).
FINETUNE_FACTORS: Mapping[str, Mapping[str, float]] = MappingProxyType({
    **{t: MappingProxyType({"bce": 0.0, "ssim": 1.0, "iou": 0.5, "mae": 0.9}) for t in TASKS if t != "Matting"},
    "Matting": MappingProxyType({"mae": 1.0, "mse": 0.9, "ssim": 0.9}),
})


def _check_task(task: str) -> None:
    if task not in LAMBDAS_PIX_LAST:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")


def finetune_lambdas(lambdas: Mapping[str, float], task: str = "DIS5K", times: int = 1) -> dict[str, float]:
    """`lambdas` with the task's fine-tuning factors applied `times` times (by repeated multiplication,
    as the original's in-place updates round). Returns a new dict."""
    _check_task(task)
    out = dict(lambdas)
    for _ in range(times):
        for name, f in FINETUNE_FACTORS[task].items():
            out[name] = out.get(name, 0.0) * f
    return out


def lambdas_for_epoch(epoch: int, epochs: int, task: str = "DIS5K", *, compound: bool = True,
                      start_epoch: int = 1, finetune_last_epochs: int | None = None,
                      base: Mapping[str, float] | None = None) -> dict[str, float]:
    """The pixel-loss weights of 1-based `epoch` out of `epochs`.

    Epochs after `epochs + finetune_last_epochs` (the last |finetune_last_epochs| ones; 0 turns the
    phase off) reweight the loss: for most tasks BCE off, IoU x 0.5, MAE x 0.9; Matting MSE x 0.9 and
    SSIM x 0.9. The original applies these factors in place at the start of every epoch of the phase,
    so they compound: its k-th epoch in the phase trains with factor**k (IoU weight 0.5 * 0.5**k). That
    is the default (`compound=True`, parity). `compound=False` applies them once for the whole phase,
    which is probably what was meant.

    The original's weights live in the trainer, so a resumed run starts compounding afresh at its first
    epoch: `start_epoch` (the epoch training resumed at) reproduces that.
    """
    _check_task(task)
    base = LAMBDAS_PIX_LAST[task] if base is None else base
    offset = FINETUNE_LAST_EPOCHS[task] if finetune_last_epochs is None else finetune_last_epochs
    first = max(epochs + offset + 1, start_epoch)
    k = epoch - first + 1 if epoch > epochs + offset else 0
    k = max(k, 0) if compound else min(max(k, 0), 1)
    return finetune_lambdas(base, task, k)


# --------------------------------------------------------------------------------------------------------
# The objective


def _is_static_zero(w) -> bool:
    return isinstance(w, numbers.Number) and w == 0


def _active(lambdas: Mapping) -> dict:
    """Criteria to evaluate: zero Python weights are skipped entirely (traced weights never are)."""
    active = {}
    for name, w in lambdas.items():
        if _is_static_zero(w):
            continue
        if name not in PIX_CRITERIA:
            raise ValueError(f"pixel criterion {name!r} has weight {w} but does not exist; "
                             f"known: {', '.join(PIX_CRITERIA)}")
        active[name] = w
    return dict(sorted(active.items(), key=lambda kv: list(PIX_CRITERIA).index(kv[0])))


def pixel_loss(preds: Sequence[Array], gt: Array, lambdas: Mapping[str, float | Array] | None = None, *,
               original_patch_windows: bool = False) -> tuple[Array, dict[str, Array]]:
    """Weighted sum of the pixel criteria over all prediction levels, and each criterion's weighted value
    averaged over the levels (what the original logs).

    preds: NHWC logits; a level at another size than `gt` is first resized to it (bilinear, aligned
    corners). Every criterion gets the sigmoid of the logits. `gt` is used as given (`objective` clamps
    it to [0, 1]). lambdas: name -> weight, default DIS5K's; Python zeros are not computed at all.
    """
    lambdas = LAMBDAS_PIX_LAST["DIS5K"] if lambdas is None else lambdas
    active = _active(lambdas)
    dt = _compute_dtype(gt, *preds)
    gt = jnp.asarray(gt).astype(dt)
    n = len(preds)
    total = jnp.zeros((), dt)
    parts = {name: jnp.zeros((), dt) for name in active}
    for pred in preds:
        pred = jnp.asarray(pred).astype(dt)
        if pred.shape[1:3] != gt.shape[1:3]:
            pred = resize_bilinear(pred, gt.shape[1:3])
        prob = jax.nn.sigmoid(pred)
        for name, w in active.items():
            if name == "iou_patch":
                value = patch_iou_loss(prob, gt, original_windows=original_patch_windows)
            else:
                value = PIX_CRITERIA[name](prob, gt)
            term = value * (w if isinstance(w, numbers.Number) else jnp.asarray(w, dt))
            total = total + term
            parts[name] = parts[name] + term / n
    return total, parts


def gradient_loss(gdt_preds: Sequence[Array], gdt_labels: Sequence[Array]) -> Array:
    """BCE between the gradient-attention predictions and their targets, summed over levels: each
    prediction is resized to its label's size (bilinear, aligned corners) and both go through a sigmoid,
    as the original does (the targets are logits too)."""
    if len(gdt_preds) != len(gdt_labels):
        raise ValueError(f"{len(gdt_preds)} gradient predictions but {len(gdt_labels)} labels")
    dt = _compute_dtype(*gdt_preds, *gdt_labels)
    total = jnp.zeros((), dt)
    for pred, label in zip(gdt_preds, gdt_labels, strict=True):
        pred, label = jnp.asarray(pred).astype(dt), jnp.asarray(label).astype(dt)
        if pred.shape[1:3] != label.shape[1:3]:
            pred = resize_bilinear(pred, label.shape[1:3])
        total = total + bce_loss(jax.nn.sigmoid(pred), jax.nn.sigmoid(label))
    return total


def classification_loss(cls_logits: Array | Sequence[Array | None] | None, labels: Array,
                        lambdas_cls: Mapping[str, float] | None = None) -> Array | None:
    """Weighted cross-entropy summed over the classification levels given; None levels are skipped.
    Returns None when there is nothing to score (no levels, or a zero Python weight)."""
    lambdas_cls = LAMBDAS_CLS if lambdas_cls is None else lambdas_cls
    unknown = set(lambdas_cls) - {"ce"}
    if unknown:
        raise ValueError(f"unknown classification criteria {sorted(unknown)}; known: ce")
    w = lambdas_cls.get("ce", 0.0)
    levels = [cls_logits] if cls_logits is None or hasattr(cls_logits, "shape") else list(cls_logits)
    levels = [x for x in levels if x is not None]
    if not levels or _is_static_zero(w):
        return None
    dt = _compute_dtype(*levels)
    w = w if isinstance(w, numbers.Number) else jnp.asarray(w, dt)
    total = jnp.zeros((), dt)
    for logits in levels:
        total = total + cross_entropy_loss(logits, labels) * w
    return total


def objective(outputs, gt: Array, cls_labels: Array | None = None, *,
              lambdas: Mapping[str, float | Array] | None = None,
              lambdas_cls: Mapping[str, float | Array] | None = None,
              gdt_weight: float = 1.0, original_patch_windows: bool = False) -> tuple[Array, dict[str, Array]]:
    """The original training step's loss: pixel loss + gradient loss * `gdt_weight` + classification loss.

    outputs: `birefnet_jax.model.TrainOutputs` (or anything with `preds`, `gdt_preds`, `gdt_labels`,
      `cls_logits`). gt: (B, H, W, 1) targets, clamped to [0, 1] here. cls_labels: (B,) class indices,
      needed when `outputs.cls_logits` is not None.
    lambdas: pixel weights (default DIS5K's, see `lambdas_for_epoch`); lambdas_cls: default `LAMBDAS_CLS`.
      Prefer dicts of Python floats, bound statically (e.g. with functools.partial before jax.jit): zero
      weights then cost nothing. Traced weights (arrays) also work and avoid a recompilation when the
      weights change, but every criterion they name is computed.

    Returns (loss, logs): `logs` holds scalars `loss`, `loss_pix`, `loss_gdt` (when there are gradient
    levels), `loss_cls` (when scored) and each pixel criterion's weighted value averaged over the levels.
    """
    lambdas_cls = LAMBDAS_CLS if lambdas_cls is None else lambdas_cls
    if outputs.cls_logits is not None and cls_labels is None and not _is_static_zero(lambdas_cls.get("ce", 0.0)):
        raise ValueError("the outputs have classification logits but no cls_labels were given "
                         "(set lambdas_cls={'ce': 0.0} to train without the classification loss)")
    gt = jnp.clip(jnp.asarray(gt), 0, 1)
    loss_pix, parts = pixel_loss(outputs.preds, gt, lambdas, original_patch_windows=original_patch_windows)
    loss = loss_pix
    logs = {"loss_pix": loss_pix}
    if outputs.gdt_preds:
        loss_gdt = gradient_loss(outputs.gdt_preds, outputs.gdt_labels)
        loss = loss + loss_gdt * gdt_weight
        logs["loss_gdt"] = loss_gdt
    if outputs.cls_logits is not None:
        loss_cls = classification_loss(outputs.cls_logits, cls_labels, lambdas_cls)
        if loss_cls is not None:
            loss = loss + loss_cls
            logs["loss_cls"] = loss_cls
    return loss, {"loss": loss, **logs, **parts}
