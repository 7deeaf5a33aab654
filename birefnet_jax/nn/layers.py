"""Layers whose exact numerics the PyTorch original depends on.

Everything is NHWC. Convolutions are plain `nnx.Conv`; what needs its own code is
BatchNorm with PyTorch's running-statistics rule and bilinear resizing with
`align_corners=True`, which `jax.image.resize` does not offer.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from birefnet_jax.io.resize import align_corners_taps


def conv2d(
    in_ch: int,
    out_ch: int,
    kernel: int,
    *,
    rngs: nnx.Rngs,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    groups: int = 1,
    bias: bool = True,
    dtype=None,
    zero_init: bool = False,
) -> nnx.Conv:
    """A 2D convolution with PyTorch's argument names and symmetric zero padding."""
    kwargs = {}
    if zero_init:
        kwargs = dict(kernel_init=nnx.initializers.zeros_init(), bias_init=nnx.initializers.zeros_init())
    if kernel == 1 and stride == 1 and padding == 0 and groups == 1:
        kwargs["conv_general_dilated"] = pointwise_conv
    return nnx.Conv(
        in_ch,
        out_ch,
        kernel_size=(kernel, kernel),
        strides=(stride, stride),
        padding=[(padding, padding), (padding, padding)],
        kernel_dilation=(dilation, dilation),
        feature_group_count=groups,
        use_bias=bias,
        dtype=dtype,
        rngs=rngs,
        **kwargs,
    )


def pointwise_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                   dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """`lax.conv_general_dilated` for the 1x1, stride-1, unpadded NHWC convolutions that
    `conv2d` builds, as the matmul it is: XLA's CPU backend runs a dot markedly faster than the
    same convolution, more so in bfloat16 (figures in docs/performance.md)."""
    kwargs.pop("out_sharding", None)
    dims = (((lhs.ndim - 1,), (0,)), ((), ()))
    return jax.lax.dot_general(lhs, rhs.reshape(rhs.shape[-2:]), dims, precision=precision, **kwargs)


class Mlp(nnx.Module):
    """The transformer feed-forward of Swin and DINOv3: fc1 -> GELU (exact, erf) -> fc2."""

    def __init__(self, dim: int, hidden: int, *, rngs, dtype):
        self.fc1 = nnx.Linear(dim, hidden, rngs=rngs, dtype=dtype)
        self.fc2 = nnx.Linear(hidden, dim, rngs=rngs, dtype=dtype)

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class BatchNorm2d(nnx.Module):
    """BatchNorm with PyTorch's semantics, so converted statistics and training steps match.

    Differences from `nnx.BatchNorm` that matter for parity: the running variance is
    updated with the *unbiased* batch variance, `momentum` weighs the new batch (0.1),
    and `num_batches_tracked` is kept so that an exported state dict is complete.
    Toggle with `model.train()` / `model.eval()` (the `use_running_average` attribute).
    """

    def __init__(self, num_features: int, *, eps: float = 1e-5, momentum: float = 0.1, dtype=None):
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.dtype = dtype
        self.use_running_average = True
        self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
        self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32))

    def __call__(self, x: jax.Array) -> jax.Array:
        out_dtype = self.dtype or x.dtype
        xf = x.astype(at_least_f32(x.dtype))
        if self.use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(xf, axis=axes)
            var = jnp.mean(jnp.square(xf - mean), axis=axes)
            n = int(np.prod([x.shape[a] for a in axes]))
            unbiased = var * (n / max(n - 1, 1))
            m = self.momentum
            self.mean[...] = (1 - m) * self.mean[...] + m * jax.lax.stop_gradient(mean)
            self.var[...] = (1 - m) * self.var[...] + m * jax.lax.stop_gradient(unbiased)
            self.num_batches_tracked[...] = self.num_batches_tracked[...] + 1
        inv = jax.lax.rsqrt(var + self.eps) * self.scale[...]
        y = (xf - mean) * inv + self.bias[...]
        return y.astype(out_dtype)


def at_least_f32(dtype):
    """The dtype for statistics and coordinates: float32, or float64 when computing in it."""
    return jnp.promote_types(dtype, jnp.float32)


def pointwise(x: jax.Array, kernel: jax.Array, dtype) -> jax.Array:
    """`x` (..., C) times a 1x1 convolution's kernel slice `kernel` (1, 1, C, O), in `dtype`."""
    return jax.lax.dot_general(x.astype(dtype), kernel[0, 0].astype(dtype), (((x.ndim - 1,), (0,)), ((), ())))


def maybe_bn(enabled: bool, channels: int, dtype=None) -> BatchNorm2d | None:
    """The original replaces BatchNorm by Identity when trained with batch size 1."""
    return BatchNorm2d(channels, dtype=dtype) if enabled else None


def apply_opt(module, x):
    """Apply an optional layer (None stands for the original's nn.Identity)."""
    return x if module is None else module(x)


def _resize_axis(x: jax.Array, axis: int, n_out: int) -> jax.Array:
    n_in = x.shape[axis]
    if n_in == n_out:
        return x
    i0, i1, frac = align_corners_taps(n_in, n_out, x.dtype == jnp.float64)
    shape = [1] * x.ndim
    shape[axis] = n_out
    w1 = jnp.asarray(frac, x.dtype).reshape(shape)
    a = jnp.take(x, jnp.asarray(i0), axis=axis)
    b = jnp.take(x, jnp.asarray(i1), axis=axis)
    return a * (1 - w1) + b * w1


def resize_bilinear(x: jax.Array, size: Sequence[int]) -> jax.Array:
    """Bilinear resize of an NHWC batch with `align_corners=True` semantics (PyTorch's
    `F.interpolate(..., mode='bilinear', align_corners=True)`), as the original uses
    everywhere between pyramid levels."""
    h, w = int(size[0]), int(size[1])
    x = _resize_axis(x, 2, w)
    return _resize_axis(x, 1, h)
