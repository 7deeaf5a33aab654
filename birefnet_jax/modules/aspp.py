"""Atrous spatial pyramid pooling, plain and deformable, used as decoder attention and
as the squeeze block of the localization module."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from birefnet_jax.nn.deform_conv import DeformableConv2d
from birefnet_jax.nn.layers import apply_opt, conv2d, maybe_bn, pointwise
from birefnet_jax.nn.remat import remat_call, remat_sum

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

    def pooled(self, x):
        """(B, 1, 1, planes): the branch before it is broadcast."""
        return jax.nn.relu(apply_opt(self.bn, self.conv(jnp.mean(x, axis=(1, 2), keepdims=True))))

    def __call__(self, x):
        # Resizing a 1x1 map with aligned corners replicates it.
        return _broadcast_like(self.pooled(x), x)


def _broadcast_like(y, x):
    return jnp.broadcast_to(y, x.shape[:3] + (y.shape[-1],))


def _activate(modules, x):
    """BN -> ReLU -> dropout, the ASPP's tail after its 1x1 fusion."""
    bn, dropout = modules
    return dropout(jax.nn.relu(apply_opt(bn, x)))


def _projected_branch(i: int, width: int):
    """Part `i` of the fusion as a sum: branch i's output times its slice of the 1x1 kernel.
    The concatenation and the 1x1 convolution over it are linear, so their result is the sum
    of these parts; the image-pool part is projected before it is broadcast."""

    def part(modules, x):
        *branches, conv1 = modules
        kernel = conv1.kernel[...][:, :, i * width:(i + 1) * width]
        dtype = conv1.dtype or jnp.result_type(x.dtype, kernel.dtype)
        branch = branches[i]
        if isinstance(branch, _ImagePool):
            return _broadcast_like(pointwise(branch.pooled(x), kernel, dtype), x)
        return pointwise(branch(x), kernel, dtype)

    return part


class _ASPPBase(nnx.Module):
    """Shared tail of both ASPP kinds: concat -> 1x1 conv -> BN -> ReLU -> dropout.

    With `remat` (training, `model.set_remat`) the concatenation and 1x1 convolution run as a sum
    of per-branch projections, recomputed one branch at a time in the backward pass
    (`remat_sum`): the five branches at 256 channels, and the gradient of their concatenation,
    are never held at once. Same function, float rounding aside."""

    def _init_tail(self, in_ch, out_ch, batch_norm, dropout, *, rngs, dtype):
        self.conv1 = conv2d(in_ch, out_ch, 1, bias=False, rngs=rngs, dtype=dtype)
        self.bn1 = maybe_bn(batch_norm, out_ch, dtype)
        self.dropout = nnx.Dropout(dropout, deterministic=True, rngs=rngs)
        self.remat = False

    def _branches(self) -> list[nnx.Module]:
        raise NotImplementedError

    def __call__(self, x):
        branches = self._branches()
        if not self.remat:
            return _activate((self.bn1, self.dropout), self.conv1(jnp.concatenate([b(x) for b in branches], axis=-1)))
        parts = [_projected_branch(i, ASPP_CHANNELS) for i in range(len(branches))]
        y = remat_sum((*branches, self.conv1), x, parts)
        return remat_call((self.bn1, self.dropout), y, _activate)


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

    def _branches(self):
        return [self.aspp1, self.aspp2, self.aspp3, self.aspp4, self.global_avg_pool]


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

    def _branches(self):
        return [self.aspp1, *self.aspp_deforms, self.global_avg_pool]
