"""Pyramid Vision Transformer v2 backbone (Wang et al. 2022), NHWC.

Note the two LayerNorm epsilons of the original: 1e-6 in the blocks and stage norms,
PyTorch's default 1e-5 in the patch embeddings and the spatial-reduction norm.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from birefnet_jax.backbones.spec import ArchitectureError, BackboneSpec, count_indices, shape_of
from birefnet_jax.nn.layers import at_least_f32, conv2d
from birefnet_jax.nn.scan import apply_blocks


@dataclasses.dataclass(frozen=True)
class PvtV2Config:
    """Pyramid Vision Transformer v2 (overlapping patch embedding, spatial-reduction attention)."""

    embed_dims: tuple[int, ...] = (64, 128, 320, 512)
    num_heads: tuple[int, ...] = (1, 2, 5, 8)
    mlp_ratios: tuple[float, ...] = (8, 8, 4, 4)
    depths: tuple[int, ...] = (3, 4, 6, 3)
    sr_ratios: tuple[int, ...] = (8, 4, 2, 1)
    drop_path_rate: float = 0.1
    kind: str = "pvt_v2"

    @property
    def channels(self) -> tuple[int, ...]:
        return tuple(self.embed_dims)


PRESETS = {
    "pvt_v2_b0": PvtV2Config(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2)),
    "pvt_v2_b1": PvtV2Config(embed_dims=(64, 128, 320, 512), depths=(2, 2, 2, 2)),
    "pvt_v2_b2": PvtV2Config(embed_dims=(64, 128, 320, 512), depths=(3, 4, 6, 3)),
    "pvt_v2_b3": PvtV2Config(embed_dims=(64, 128, 320, 512), depths=(3, 4, 18, 3)),
    "pvt_v2_b4": PvtV2Config(embed_dims=(64, 128, 320, 512), depths=(3, 8, 27, 3)),
    "pvt_v2_b5": PvtV2Config(embed_dims=(64, 128, 320, 512), depths=(3, 6, 40, 3), mlp_ratios=(4, 4, 4, 4)),
}


# On CPU, attention logits per step, in elements (4 MiB in float32): with 65536 queries x 1024 keys
# at stride 4 of a 1024 input, the whole matrix is 256 MiB, and each pass over it costs more than
# the matmuls; a block of queries at a time stays in cache. (On GPU/TPU: one step.)
_ATTN_BLOCK = 1 << 20


def _attend(q, k, v):
    """softmax(q k^T) v for (b, q, heads, d) queries, normalized after the second matmul: the
    (q, k) matrix is written once and only the (q, d) result is divided.

    Logits, weights and the second matmul in float32 at least: with bfloat16 inputs, the original's
    `softmax(...).astype(bfloat16) @ v` is as accurate as that on XLA CPU (its casts fuse away),
    while rounding the unnormalized weights to bfloat16 is less accurate.
    """
    acc = at_least_f32(q.dtype)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=acc)
    p = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
    out = jnp.einsum("bhqk,bkhd->bhqd", p, v.astype(acc)) / jnp.sum(p, axis=-1, keepdims=True)
    return out.astype(v.dtype).transpose(0, 2, 1, 3)


def _attention_blocked(q, k, v):
    """`_attend` over blocks of queries (`jax.lax.map`) when the logits would not fit in cache."""
    b, n, h, d = q.shape
    steps = -(-n * k.shape[1] * h // _ATTN_BLOCK)
    if steps <= 1:
        return _attend(q, k, v)
    rows = -(-n // steps)
    q = jnp.pad(q, ((0, 0), (0, steps * rows - n), (0, 0), (0, 0)))
    q = q.reshape(b, steps, rows, h, d).swapaxes(0, 1)
    out = jax.lax.map(lambda qb: _attend(qb, k, v), q)
    return out.swapaxes(0, 1).reshape(b, steps * rows, h, d)[:, :n]


def _linear_unrounded(linear, x):
    """`linear(x)` (an nnx.Linear) with its matmul's float32 (float64 when computing in it)
    result and bias added in that precision, before the cast to the compute dtype."""
    x, kernel, bias = linear.promote_dtype((x, linear.kernel[...], linear.bias[...]), dtype=linear.dtype)
    acc = at_least_f32(x.dtype)
    y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=linear.precision,
                            preferred_element_type=acc)
    return y + bias.astype(acc)


def _window(x, top, height, left, width):
    """`x[:, top:top + height, left:left + width]` of an NHWC map, zeros where that runs past its
    edges."""
    h, w = x.shape[1:3]
    r0, r1 = min(max(top, 0), h), max(min(top + height, h), 0)
    c0, c1 = min(max(left, 0), w), max(min(left + width, w), 0)
    r1, c1 = max(r0, r1), max(c0, c1)
    pad = ((0, 0), (r0 - top, top + height - r1), (c0 - left, left + width - c1), (0, 0))
    x = x[:, r0:r1, c0:c1]
    return jnp.pad(x, pad) if any(pad[1] + pad[2]) else x


def _depthwise3x3(x, kernel, bias, pad_top=1, pad_bottom=1):
    """Depthwise 3x3 convolution of NHWC `x` with an HWIO (3, 3, 1, C) kernel, zero padding 1 on
    the left and right and `pad_top` / `pad_bottom` (0 or 1) rows above / below.

    Written as nine shifted copies times per-channel taps: one elementwise loop for XLA, where a
    convolution with `feature_group_count=C` runs many times slower on CPU. Summed, and returned, in
    float32 at least. (One slice and pad per tap, centre tap first: other arrangements ran slower
    in XLA's CPU loop.)
    """
    _, h, w, _ = x.shape
    height = h + pad_top + pad_bottom - 2
    acc = at_least_f32(x.dtype)
    x, kernel = x.astype(acc), kernel.astype(acc)
    out = _window(x, 1 - pad_top, height, 0, w) * kernel[1, 1, 0] + bias.astype(acc)
    for i in range(3):
        for j in range(3):
            if (i, j) != (1, 1):
                out = out + _window(x, i - pad_top, height, j - 1, w) * kernel[i, j, 0]
    return out


class OverlapPatchEmbed(nnx.Module):
    def __init__(self, in_ch, dim, patch, stride, *, rngs, dtype):
        self.proj = conv2d(in_ch, dim, patch, stride=stride, padding=patch // 2, rngs=rngs, dtype=dtype)
        self.norm = nnx.LayerNorm(dim, epsilon=1e-5, rngs=rngs, dtype=dtype)

    def __call__(self, x):
        return self.norm(self.proj(x))


class Attention(nnx.Module):
    """Multi-head attention whose keys and values come from a map shrunk by `sr_ratio`."""

    def __init__(self, dim, num_heads, sr_ratio, *, rngs, dtype):
        if dim % num_heads:
            raise ValueError(f"PVT v2 width {dim} is not divisible by {num_heads} heads")
        self.num_heads, self.sr_ratio = num_heads, sr_ratio
        self.q = nnx.Linear(dim, dim, rngs=rngs, dtype=dtype)
        self.kv = nnx.Linear(dim, 2 * dim, rngs=rngs, dtype=dtype)
        self.proj = nnx.Linear(dim, dim, rngs=rngs, dtype=dtype)
        if sr_ratio > 1:
            self.sr = conv2d(dim, dim, sr_ratio, stride=sr_ratio, rngs=rngs, dtype=dtype)
            self.norm = nnx.LayerNorm(dim, epsilon=1e-5, rngs=rngs, dtype=dtype)
        else:
            self.sr = self.norm = None

    def __call__(self, x):
        b, h, w, c = x.shape
        nh = self.num_heads
        q = self.q(x).reshape(b, h * w, nh, c // nh)
        src = x if self.sr is None else self.norm(self.sr(x))
        kv = self.kv(src).reshape(b, -1, 2, nh, c // nh)
        k, v = kv[:, :, 0], kv[:, :, 1]
        out = jax.lax.platform_dependent(q * (c // nh) ** -0.5, k, v, cpu=_attention_blocked, default=_attend)
        return self.proj(out.reshape(b, h, w, c))


class DWConv(nnx.Module):
    """Depthwise 3x3 conv: the positional information of PVT v2's feed-forward."""

    def __init__(self, dim, *, rngs, dtype):
        self.dwconv = conv2d(dim, dim, 3, padding=1, groups=dim, rngs=rngs, dtype=dtype)

    def __call__(self, x):
        conv = self.dwconv
        x, _ = conv.promote_dtype((x, conv.kernel[...]), dtype=conv.dtype)
        return self.unrounded(x).astype(x.dtype)

    def unrounded(self, x, pad_top=1, pad_bottom=1):
        """The convolution in float32 at least (float64 when computing in it), before the cast to
        the compute dtype; `x` already in that precision is taken as it is. `pad_top` /
        `pad_bottom` 0 read a band of rows whose neighbours are in `x` (its first / last row)
        instead of zero padding."""
        conv = self.dwconv
        kernel, bias = conv.kernel[...], conv.bias[...]
        dtype = conv.dtype or jnp.result_type(x, kernel)
        if x.dtype != at_least_f32(dtype):
            x = x.astype(dtype)
        return _depthwise3x3(x, kernel.astype(dtype), bias.astype(dtype), pad_top, pad_bottom)


# On CPU, hidden activations per band of rows of the feed-forward, in elements (4 MiB in float32),
# and the least rows in a band (each band recomputes fc1 on one row above and below it).
_MLP_BLOCK = 1 << 20
_MLP_MIN_ROWS = 8


class Mlp(nnx.Module):
    """fc -> depthwise 3x3 conv -> GELU -> fc.

    The hidden map is `mlp_ratio` (4-8) times wider than the input: a whole 256x256x512 map of a
    1024 input is 128 MiB, written and read back by each step. On CPU it is computed band of rows
    by band of rows (`jax.lax.map`) instead, so that each band's hidden map stays in cache.
    """

    def __init__(self, dim, hidden, *, rngs, dtype):
        self.fc1 = nnx.Linear(dim, hidden, rngs=rngs, dtype=dtype)
        self.dwconv = DWConv(hidden, rngs=rngs, dtype=dtype)
        self.fc2 = nnx.Linear(hidden, dim, rngs=rngs, dtype=dtype)

    def _band(self, x, pad_top, pad_bottom):
        # The hidden map stays in float32 (at least) from fc1's accumulator to fc2's input cast: in
        # bfloat16 that is one rounding instead of three, and XLA's CPU matmuls run faster with
        # float32 results. fc2's result is rounded to the compute dtype, as nnx.Linear's.
        hidden = _linear_unrounded(self.fc1, x)
        hidden = jax.nn.gelu(self.dwconv.unrounded(hidden, pad_top, pad_bottom), approximate=False)
        out = _linear_unrounded(self.fc2, hidden)
        return out.astype(self.fc2.dtype or jnp.result_type(x, self.fc2.kernel[...]))

    def __call__(self, x):
        return jax.lax.platform_dependent(x, cpu=self._banded, default=self._whole)

    def _whole(self, x):
        return self._band(x, 1, 1)

    def _banded(self, x):
        b, h, w, _ = x.shape
        images = b if isinstance(b, int) else 1  # a symbolic batch (jax.export): per image
        rows = max(_MLP_MIN_ROWS, _MLP_BLOCK // (images * w * self.fc1.out_features))
        if rows >= h:
            return self._band(x, 1, 1)
        steps = -(-h // rows)  # the first band, steps - 2 full ones in a loop, the last (1 to `rows`)
        first = self._band(x[:, :rows + 1], 1, 0)
        last = self._band(x[:, (steps - 1) * rows - 1:], 0, 1)
        if steps == 2:
            return jnp.concatenate([first, last], axis=1)
        mid = jax.lax.map(
            lambda i: self._band(jax.lax.dynamic_slice_in_dim(x, i * rows - 1, rows + 2, axis=1), 0, 0),
            jnp.arange(1, steps - 1))
        mid = mid.swapaxes(0, 1).reshape(b, (steps - 2) * rows, w, -1)
        return jnp.concatenate([first, mid, last], axis=1)


class Block(nnx.Module):
    def __init__(self, dim, num_heads, mlp_ratio, sr_ratio, drop_path, *, rngs, dtype):
        self.norm1 = nnx.LayerNorm(dim, epsilon=1e-6, rngs=rngs, dtype=dtype)
        self.attn = Attention(dim, num_heads, sr_ratio, rngs=rngs, dtype=dtype)
        self.norm2 = nnx.LayerNorm(dim, epsilon=1e-6, rngs=rngs, dtype=dtype)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), rngs=rngs, dtype=dtype)
        self.drop_path = nnx.Dropout(drop_path, broadcast_dims=(1, 2, 3), deterministic=True, rngs=rngs)

    def __call__(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PyramidVisionTransformerV2(nnx.Module):
    """Returns the four stage outputs (strides 4, 8, 16, 32)."""

    def __init__(self, cfg: PvtV2Config, *, rngs: nnx.Rngs, dtype=None):
        dims = cfg.embed_dims
        dpr = np.linspace(0, cfg.drop_path_rate, sum(cfg.depths)).tolist()
        cur = 0
        for i in range(4):
            in_ch = 3 if i == 0 else dims[i - 1]
            patch, stride = (7, 4) if i == 0 else (3, 2)
            setattr(self, f"patch_embed{i + 1}",
                    OverlapPatchEmbed(in_ch, dims[i], patch, stride, rngs=rngs, dtype=dtype))
            setattr(self, f"block{i + 1}", nnx.List([
                Block(dims[i], cfg.num_heads[i], cfg.mlp_ratios[i], cfg.sr_ratios[i], dpr[cur + j],
                      rngs=rngs, dtype=dtype)
                for j in range(cfg.depths[i])
            ]))
            setattr(self, f"norm{i + 1}", nnx.LayerNorm(dims[i], epsilon=1e-6, rngs=rngs, dtype=dtype))
            cur += cfg.depths[i]
        self.remat = False  # recompute each block in the backward pass (model.set_remat)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        outs = []
        for i in range(1, 5):
            x = getattr(self, f"patch_embed{i}")(x)
            x = apply_blocks(getattr(self, f"block{i}"), x, remat=self.remat)
            x = getattr(self, f"norm{i}")(x)
            outs.append(x)
        return tuple(outs)





def infer_config(sd, num_heads=None) -> PvtV2Config:
    """Everything but the head counts is in the weights; those come from the preset with the same
    widths, or from `num_heads` (CLI `--num-heads`)."""
    dims = tuple(shape_of(sd, f"bb.patch_embed{i}.proj.weight")[0] for i in range(1, 5))
    depths = tuple(count_indices(sd, rf"bb\.block{i}\.(\d+)\.") for i in range(1, 5))
    ratios = tuple(shape_of(sd, f"bb.block{i}.0.mlp.fc1.weight")[0] / dims[i - 1] for i in range(1, 5))
    ratios = tuple(int(r) if float(r).is_integer() else r for r in ratios)
    sr = tuple(sd[f"bb.block{i}.0.attn.sr.weight"].shape[-1] if f"bb.block{i}.0.attn.sr.weight" in sd else 1
               for i in range(1, 5))
    if num_heads is None:
        presets = [p for p in PRESETS.values() if p.embed_dims == dims]
        if not presets:
            raise ArchitectureError(
                f"PVT v2 with widths {dims} is not a preset, and head counts cannot be read from the "
                "weights: pass num_heads (CLI: --num-heads 1,2,5,8)")
        num_heads = presets[0].num_heads
    num_heads = tuple(num_heads)
    if len(num_heads) != 4:
        raise ArchitectureError(f"num_heads needs one count per PVT v2 stage (4), got {len(num_heads)}: {num_heads}")
    bad = [f"stage {i + 1}: {d} channels / {h} heads" for i, (d, h) in enumerate(zip(dims, num_heads, strict=True))
           if h < 1 or d % h]
    if bad:
        raise ArchitectureError("num_heads must divide each stage's width: " + "; ".join(bad))
    return PvtV2Config(embed_dims=dims, num_heads=num_heads, mlp_ratios=ratios, depths=depths, sr_ratios=sr)


SPEC = BackboneSpec(kind="pvt_v2", config=PvtV2Config, module=PyramidVisionTransformerV2, presets=PRESETS,
                    key="bb.patch_embed1.proj.weight", infer=infer_config)
