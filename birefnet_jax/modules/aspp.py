"""Atrous spatial pyramid pooling, plain and deformable, used as decoder attention and
as the squeeze block of the localization module."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from birefnet_jax.nn.deform_conv import DeformableConv2d
from birefnet_jax.nn.layers import apply_opt, conv2d, maybe_bn

ASPP_CHANNELS = 256  # fixed in the original whatever the input width


class _Branch(nnx.Module):
    """conv (atrous or deformable, no bias) -> BN -> ReLU."""

    def __init__(self, conv, planes: int, batch_norm: bool, dtype):
        self.atrous_conv = conv
        self.bn = maybe_bn(batch_norm, planes, dtype)

    def __call__(self, x):
        return jax.nn.relu(apply_opt(self.bn, self.atrous_conv(x)))


class _ImagePool(nnx.Module):
    """Global average pool -> 1x1 conv -> BN -> ReLU, broadcast back to the map size."""

    def __init__(self, in_ch: int, planes: int, batch_norm: bool, *, rngs, dtype):
        self.conv = conv2d(in_ch, planes, 1, bias=False, rngs=rngs, dtype=dtype)
        self.bn = maybe_bn(batch_norm, planes, dtype)

    def __call__(self, x):
        pooled = jnp.mean(x, axis=(1, 2), keepdims=True)
        y = jax.nn.relu(apply_opt(self.bn, self.conv(pooled)))
        # Resizing a 1x1 map with aligned corners replicates it.
        return jnp.broadcast_to(y, x.shape[:3] + (y.shape[-1],))


class _ASPPBase(nnx.Module):
    """Shared tail of both ASPP kinds: concat -> 1x1 conv -> BN -> ReLU -> dropout."""

    def _init_tail(self, in_ch, out_ch, batch_norm, dropout, *, rngs, dtype):
        self.conv1 = conv2d(in_ch, out_ch, 1, bias=False, rngs=rngs, dtype=dtype)
        self.bn1 = maybe_bn(batch_norm, out_ch, dtype)
        self.dropout = nnx.Dropout(dropout, deterministic=True, rngs=rngs)

    def _fuse(self, branches):
        x = self.conv1(jnp.concatenate(branches, axis=-1))
        return self.dropout(jax.nn.relu(apply_opt(self.bn1, x)))


class ASPP(_ASPPBase):
    """ASPP with dilations 1, 6, 12, 18 (output stride 16) and image pooling."""

    def __init__(self, in_ch: int, out_ch: int | None = None, *, batch_norm: bool = True,
                 dropout: float = 0.5, rngs: nnx.Rngs, dtype=None):
        out_ch = out_ch or in_ch
        p = ASPP_CHANNELS
        self.aspp1 = _Branch(conv2d(in_ch, p, 1, bias=False, rngs=rngs, dtype=dtype), p, batch_norm, dtype)
        for i, d in zip((2, 3, 4), (6, 12, 18), strict=True):
            conv = conv2d(in_ch, p, 3, padding=d, dilation=d, bias=False, rngs=rngs, dtype=dtype)
            setattr(self, f"aspp{i}", _Branch(conv, p, batch_norm, dtype))
        self.global_avg_pool = _ImagePool(in_ch, p, batch_norm, rngs=rngs, dtype=dtype)
        self._init_tail(5 * p, out_ch, batch_norm, dropout, rngs=rngs, dtype=dtype)

    def __call__(self, x):
        branches = [self.aspp1(x), self.aspp2(x), self.aspp3(x), self.aspp4(x), self.global_avg_pool(x)]
        return self._fuse(branches)


class ASPPDeformable(_ASPPBase):
    """ASPP whose parallel branches are deformable convolutions of sizes 1, 3 and 7."""

    def __init__(self, in_ch: int, out_ch: int | None = None, *, batch_norm: bool = True,
                 dropout: float = 0.5, block_sizes=(1, 3, 7), rngs: nnx.Rngs, dtype=None):
        out_ch = out_ch or in_ch
        p = ASPP_CHANNELS

        def branch(k):
            conv = DeformableConv2d(in_ch, p, k, padding=k // 2, bias=False, rngs=rngs, dtype=dtype)
            return _Branch(conv, p, batch_norm, dtype)

        self.aspp1 = branch(1)
        self.aspp_deforms = nnx.List([branch(k) for k in block_sizes])
        self.global_avg_pool = _ImagePool(in_ch, p, batch_norm, rngs=rngs, dtype=dtype)
        self._init_tail((2 + len(block_sizes)) * p, out_ch, batch_norm, dropout, rngs=rngs, dtype=dtype)

    def __call__(self, x):
        branches = [self.aspp1(x), *[b(x) for b in self.aspp_deforms], self.global_avg_pool(x)]
        return self._fuse(branches)
