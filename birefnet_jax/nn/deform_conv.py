"""Modulated deformable convolution (DCNv2), vectorised over positions and taps.

Semantics follow torchvision's `deform_conv2d` with one offset group: tap `k` of the
kernel at output position `(i, j)` samples the input at
`(i*stride - pad + ky*dil + dy_k, j*stride - pad + kx*dil + dx_k)` by bilinear
interpolation, where corners outside the image read as zero and a point beyond one pixel
outside reads as zero altogether; the sample is multiplied by the mask before the
weighted sum over taps and input channels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from birefnet_jax.nn.layers import at_least_f32, conv2d


def deform_conv2d(
    x: jax.Array,
    offset: jax.Array,
    mask: jax.Array | None,
    kernel: jax.Array,
    bias: jax.Array | None = None,
    *,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
) -> jax.Array:
    """Deformable convolution on NHWC arrays.

    Args:
      x: input, (B, H, W, C).
      offset: (B, Ho, Wo, 2*K) with K = kh*kw taps, interleaved (dy, dx) per tap in
        row-major tap order, as torchvision lays out its offset channels.
      mask: (B, Ho, Wo, K) modulation, or None for plain DCNv1.
      kernel: (kh, kw, C, O), the Flax layout of the regular convolution's weight.
      bias: (O,) or None.
    """
    b, h, w, c = x.shape
    kh, kw, _, o = kernel.shape
    k = kh * kw
    ho, wo = offset.shape[1], offset.shape[2]
    off = offset.reshape(b, ho, wo, k, 2)
    ky, kx = jnp.meshgrid(jnp.arange(kh), jnp.arange(kw), indexing="ij")
    base_y = (jnp.arange(ho) * stride - padding)[:, None, None] + (ky.reshape(-1) * dilation)[None, None, :]
    base_x = (jnp.arange(wo) * stride - padding)[None, :, None] + (kx.reshape(-1) * dilation)[None, None, :]
    off = off.astype(at_least_f32(off.dtype))
    py = base_y.astype(off.dtype)[None] + off[..., 0]  # (B, Ho, Wo, K)
    px = base_x.astype(off.dtype)[None] + off[..., 1]

    inside = (py > -1) & (py < h) & (px > -1) & (px < w)
    y0 = jnp.floor(py)
    x0 = jnp.floor(px)
    ly = py - y0
    lx = px - x0
    y0 = y0.astype(jnp.int32)
    x0 = x0.astype(jnp.int32)
    flat = x.reshape(b, h * w, c)

    def corner(yi, xi, wgt):
        valid = inside & (yi >= 0) & (yi < h) & (xi >= 0) & (xi < w)
        idx = jnp.clip(yi, 0, h - 1) * w + jnp.clip(xi, 0, w - 1)
        vals = jnp.take_along_axis(flat, idx.reshape(b, -1, 1), axis=1).reshape(b, ho, wo, k, c)
        return vals * jnp.where(valid, wgt, 0).astype(x.dtype)[..., None]

    sampled = (
        corner(y0, x0, (1 - ly) * (1 - lx))
        + corner(y0, x0 + 1, (1 - ly) * lx)
        + corner(y0 + 1, x0, ly * (1 - lx))
        + corner(y0 + 1, x0 + 1, ly * lx)
    )
    if mask is not None:
        sampled = sampled * mask[..., None].astype(x.dtype)
    out = jnp.einsum("bhwkc,kco->bhwo", sampled, kernel.reshape(k, c, o).astype(x.dtype))
    if bias is not None:
        out = out + bias
    return out


class DeformableConv2d(nnx.Module):
    """DCNv2 layer as BiRefNet builds it: offsets and a `2*sigmoid` modulator predicted by
    convolutions of the same geometry (initialised to zero, so it starts as a plain conv)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, *, stride: int = 1, padding: int = 1,
                 bias: bool = False, rngs: nnx.Rngs, dtype=None):
        k = kernel_size * kernel_size
        self.stride, self.padding = stride, padding
        geo = dict(stride=stride, padding=padding, rngs=rngs)
        # Sampling positions stay float32 under mixed precision: in bfloat16 a position near
        # 256 is only resolved to a whole pixel.
        pos_dtype = None if dtype is None else at_least_f32(dtype)
        self.offset_conv = conv2d(in_ch, 2 * k, kernel_size, zero_init=True, dtype=pos_dtype, **geo)
        self.modulator_conv = conv2d(in_ch, k, kernel_size, zero_init=True, dtype=pos_dtype, **geo)
        self.regular_conv = conv2d(in_ch, out_ch, kernel_size, bias=bias, dtype=dtype, **geo)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(at_least_f32(x.dtype))
        offset = self.offset_conv(x32)
        modulator = 2.0 * jax.nn.sigmoid(self.modulator_conv(x32))
        compute = self.dtype or x.dtype
        reg = self.regular_conv
        bias = None if reg.bias is None else reg.bias[...].astype(compute)
        return deform_conv2d(x.astype(compute), offset, modulator, reg.kernel[...].astype(compute), bias,
                             stride=self.stride, padding=self.padding)
