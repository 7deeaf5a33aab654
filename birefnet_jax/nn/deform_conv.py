"""Modulated deformable convolution (DCNv2), tiled over output positions.

Semantics follow torchvision's `deform_conv2d` with one offset group: tap `k` of the
kernel at output position `(i, j)` samples the input at
`(i*stride - pad + ky*dil + dy_k, j*stride - pad + kx*dil + dx_k)` by bilinear
interpolation, where corners outside the image read as zero and a point beyond one pixel
outside reads as zero altogether; the sample is multiplied by the mask before the
weighted sum over taps and input channels.

How it runs: the four bilinear corners of every cell are laid side by side in one table
(so each sample is one contiguous-row gather), and output positions go through in tiles (a
`fori_loop`): a tile gathers and blends its samples, (tile, K*C), and contracts them with the
kernel as one matmul, so no (H, W, K, C) tensor exists, let alone one per corner. The backward
pass is written out (a custom VJP) and goes through the same tiles, rebuilding each tile's
samples, so training memory stays at one tile as well; the input's gradient is a scatter-add
into the corner table's. Its buffers and accumulators are made from the data they follow, so
that XLA does not hoist them, shared between all convolutions of a shape, to the start of the
program (as it did with the zero buffers of autodiff's scan transpose, held through a whole
training step).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from birefnet_jax.nn.layers import at_least_f32, conv2d
from birefnet_jax.nn.remat import after

# Sampled input per tile of positions. On a CPU a few MiB stays in cache; an accelerator wants few,
# large steps (each step of the loop is a kernel launch or more), within memory.
CPU_TILE_BYTES = 4 << 20
ACCELERATOR_TILE_BYTES = 256 << 20


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
    tile_bytes: int | None = None,
) -> jax.Array:
    """Deformable convolution on NHWC arrays.

    Args:
      x: input, (B, H, W, C).
      offset: (B, Ho, Wo, 2*K) with K = kh*kw taps, interleaved (dy, dx) per tap in
        row-major tap order, as torchvision lays out its offset channels.
      mask: (B, Ho, Wo, K) modulation, or None for plain DCNv1.
      kernel: (kh, kw, C, O), the Flax layout of the regular convolution's weight.
      bias: (O,) or None.
      tile_bytes: about how much sampled input one tile of output positions holds; by default
        a few MiB on a CPU and 256 MiB on an accelerator (the backend JAX traces for).

    The input is sampled and contracted in its own dtype (bfloat16 under mixed precision); sampling
    positions, bilinear weights and the accumulation are at least float32.
    """
    b, h, w, c = x.shape
    kh, kw, _, o = kernel.shape
    ho, wo = offset.shape[1], offset.shape[2]
    per_position = kh * kw * c * jnp.dtype(at_least_f32(x.dtype)).itemsize
    if tile_bytes is None:
        tile_bytes = CPU_TILE_BYTES if jax.default_backend() == "cpu" else ACCELERATOR_TILE_BYTES
    # Tiles are whole output rows of one image, so that they divide every batch evenly (no
    # padding, and a batch size that is symbolic in an exported program works too).
    rows = max([r for r in range(1, ho + 1) if ho % r == 0 and r * wo * per_position <= tile_bytes], default=1)
    geo = _Geometry(stride, padding, dilation, rows)
    out = _sample_and_contract(x, offset, mask, kernel, geo)
    if bias is not None:
        out = out + bias.astype(out.dtype)
    return out.astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class _Geometry:
    stride: int
    padding: int
    dilation: int
    rows: int  # output rows per tile


def _plan_tiles(x, offset, mask, kernel_hw, geo):
    """Table rows (n_tiles, tile, K) and bilinear weights (n_tiles, tile, K, 4) per tile."""
    b, h, w, _ = x.shape
    ho, wo = offset.shape[1], offset.shape[2]
    k = kernel_hw[0] * kernel_hw[1]
    idx, wgt = _sampling_plan(offset, mask, (b, h, w), kernel_hw, (ho, wo), geo.stride, geo.padding, geo.dilation)
    n_tiles = b * (ho // geo.rows)
    return idx.reshape(n_tiles, -1, k), wgt.reshape(n_tiles, -1, k, 4)


def _blend(table, t_idx, t_wgt, c, acc):
    """The four corners of every (position, tap) of a tile, (tile, K, 4C) in `acc`, and their
    bilinear blend, (tile, K, C)."""
    corners = jnp.take(table, t_idx, axis=0, mode="clip").astype(acc)
    return corners, sum(corners[..., q * c:(q + 1) * c] * t_wgt[..., q:q + 1] for q in range(4))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _sample_and_contract(x, offset, mask, kernel, geo):
    return _forward(x, offset, mask, kernel, geo)


def _forward(x, offset, mask, kernel, geo):
    b, _, _, c = x.shape
    kh, kw, _, o = kernel.shape
    ho, wo = offset.shape[1], offset.shape[2]
    acc = at_least_f32(x.dtype)
    table = _corner_table(x)
    idx, wgt = _plan_tiles(x, offset, mask, (kh, kw), geo)
    n_tiles, tile = idx.shape[:2]
    weight = kernel.reshape(kh * kw * c, o).astype(x.dtype)

    def tile_out(i, out):
        _, sampled = _blend(table, idx[i], wgt[i], c, acc)
        y = jnp.dot(sampled.reshape(tile, -1).astype(x.dtype), weight, preferred_element_type=acc)
        return out.at[i].set(y)

    # The output buffer is made from `x` (zero times one element), so that XLA neither merges it
    # with every other deformable convolution's buffer of that shape nor allocates it long before
    # it is needed (in a rematerialised backward pass, that is hours of program order early).
    out = jax.lax.fori_loop(0, n_tiles, tile_out, after(jnp.zeros((n_tiles, tile, o), acc), x))
    return out.reshape(b, ho, wo, o)


def _forward_rule(x, offset, mask, kernel, geo):
    return _forward(x, offset, mask, kernel, geo), (x, offset, mask, kernel)


def _backward_rule(geo, saved, g):
    """Gradients tile by tile, as the forward ran: the sampled input of a tile is rebuilt from the
    corner table, the kernel's gradient and the table's (a scatter-add of the blended corners'
    gradients) accumulate over the tiles, and the bilinear weights' gradients go back through the
    sampling plan to the offsets and the mask. The accumulators are made from `g`, so they exist
    only once the backward pass reaches this convolution."""
    x, offset, mask, kernel = saved
    _, _, _, c = x.shape
    kh, kw, _, o = kernel.shape
    acc = at_least_f32(x.dtype)
    table, table_vjp = jax.vjp(_corner_table, x)
    (idx, wgt), plan_vjp = jax.vjp(lambda off, m: _plan_tiles(x, off, m, (kh, kw), geo), offset, mask)
    n_tiles, tile, k = idx.shape
    weight = kernel.reshape(k * c, o).astype(x.dtype)
    g = jnp.asarray(g).reshape(n_tiles, tile, o)

    def tile_grads(i, carry):
        d_table, d_weight, d_wgt = carry
        corners, sampled = _blend(table, idx[i], wgt[i], c, acc)
        g_t = g[i].astype(x.dtype)
        d_weight = d_weight + jnp.dot(sampled.reshape(tile, k * c).astype(x.dtype).T, g_t,
                                      preferred_element_type=acc)
        d_sampled = jnp.dot(g_t, weight.T, preferred_element_type=acc).reshape(tile, k, c)
        d_wgt_t = jnp.stack([jnp.sum(corners[..., q * c:(q + 1) * c] * d_sampled, axis=-1) for q in range(4)], -1)
        d_corners = jnp.concatenate([d_sampled * wgt[i][..., q:q + 1] for q in range(4)], axis=-1)
        d_table = d_table.at[idx[i].reshape(-1)].add(d_corners.reshape(tile * k, 4 * c), mode="promise_in_bounds")
        return d_table, d_weight, d_wgt.at[i].set(d_wgt_t.astype(d_wgt.dtype))

    zeros = after((jnp.zeros(table.shape, acc), jnp.zeros((k * c, o), acc), jnp.zeros(wgt.shape, wgt.dtype)), g)
    d_table, d_weight, d_wgt = jax.lax.fori_loop(0, n_tiles, tile_grads, zeros)
    (d_x,) = table_vjp(d_table.astype(table.dtype))
    d_offset, d_mask = plan_vjp((np.zeros(idx.shape, jax.dtypes.float0), d_wgt))
    return d_x, d_offset, d_mask, d_weight.reshape(kernel.shape).astype(kernel.dtype)


_sample_and_contract.defvjp(_forward_rule, _backward_rule)


def _corner_table(x: jax.Array) -> jax.Array:
    """(B*(H+1)*(W+1), 4*C): row `(y+1)*(W+1) + (x+1)` holds the four bilinear corners of the
    cell whose top-left pixel is (y, x), for y in [-1, H-1] and x in [-1, W-1], zeros outside
    the image. One gather of a contiguous row then fetches all four corners (XLA's CPU gather
    is several times faster on rows of a 2-D table than on (4, C) slices)."""
    b, h, w, c = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    corners = (xp[:, :-1, :-1], xp[:, :-1, 1:], xp[:, 1:, :-1], xp[:, 1:, 1:])
    return jnp.concatenate(corners, axis=3).reshape(b * (h + 1) * (w + 1), 4 * c)


def _sampling_plan(offset, mask, in_shape, kernel_size, out_size, stride, padding, dilation):
    """Row of `_corner_table` and the four bilinear weights (times the modulation, zero for a
    point beyond one pixel outside the image) of every (position, tap): (B, Ho, Wo, K) and
    (B, Ho, Wo, K, 4)."""
    b, h, w = in_shape
    kh, kw = kernel_size
    ho, wo = out_size
    k = kh * kw
    off = offset.reshape(b, ho, wo, k, 2)
    off = off.astype(at_least_f32(off.dtype))
    ky, kx = jnp.meshgrid(jnp.arange(kh), jnp.arange(kw), indexing="ij")
    base_y = (jnp.arange(ho) * stride - padding)[:, None, None] + (ky.reshape(-1) * dilation)[None, None, :]
    base_x = (jnp.arange(wo) * stride - padding)[None, :, None] + (kx.reshape(-1) * dilation)[None, None, :]
    py = base_y.astype(off.dtype)[None] + off[..., 0]  # (B, Ho, Wo, K)
    px = base_x.astype(off.dtype)[None] + off[..., 1]

    inside = (py > -1) & (py < h) & (px > -1) & (px < w)
    y0 = jnp.floor(py)
    x0 = jnp.floor(px)
    ly = py - y0
    lx = px - x0
    scale = inside.astype(off.dtype)
    if mask is not None:
        scale = scale * mask.astype(off.dtype)
    wgt = jnp.stack([(1 - ly) * (1 - lx), (1 - ly) * lx, ly * (1 - lx), ly * lx], axis=-1) * scale[..., None]
    row = jnp.clip(y0.astype(jnp.int32), -1, h - 1) + 1
    col = jnp.clip(x0.astype(jnp.int32), -1, w - 1) + 1
    image = jax.lax.broadcasted_iota(jnp.int32, (b, 1, 1, 1), 0) * ((h + 1) * (w + 1))
    return image + row * (w + 1) + col, wgt


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

    def positions(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Offsets and modulator, in float32 at least. The two convolutions share input and
        geometry, so they run as one with the kernels side by side (one pass over the input, one
        wider matmul, cheaper than the two separately)."""
        x32 = x.astype(at_least_f32(x.dtype))
        off, mod = self.offset_conv, self.modulator_conv
        kernel = jnp.concatenate([off.kernel[...], mod.kernel[...]], axis=-1).astype(x32.dtype)
        bias = jnp.concatenate([off.bias[...], mod.bias[...]]).astype(x32.dtype)
        dims = jax.lax.conv_dimension_numbers(x32.shape, kernel.shape, ("NHWC", "HWIO", "NHWC"))
        y = off.conv_general_dilated(x32, kernel, off.strides, off.padding, lhs_dilation=(1, 1),
                                     rhs_dilation=off.kernel_dilation, dimension_numbers=dims,
                                     feature_group_count=1, precision=off.precision) + bias
        n = off.out_features
        return y[..., :n], 2.0 * jax.nn.sigmoid(y[..., n:])

    def __call__(self, x: jax.Array) -> jax.Array:
        offset, modulator = self.positions(x)
        compute = self.dtype or x.dtype
        reg = self.regular_conv
        bias = None if reg.bias is None else reg.bias[...].astype(compute)
        return deform_conv2d(x.astype(compute), offset, modulator, reg.kernel[...].astype(compute), bias,
                             stride=self.stride, padding=self.padding)
