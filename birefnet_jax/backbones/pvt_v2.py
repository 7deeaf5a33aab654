"""Pyramid Vision Transformer v2 backbone (Wang et al. 2022), NHWC.

Note the two LayerNorm epsilons of the original: 1e-6 in the blocks and stage norms,
PyTorch's default 1e-5 in the patch embeddings and the spatial-reduction norm.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from birefnet_jax.config import PvtV2Config
from birefnet_jax.nn.layers import at_least_f32, conv2d


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
        logits = jnp.einsum("bqhd,bkhd->bhqk", q * (c // nh) ** -0.5, k)
        attn = jax.nn.softmax(logits.astype(at_least_f32(logits.dtype)), axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", attn, v)
        return self.proj(out.reshape(b, h, w, c))


class DWConv(nnx.Module):
    """Depthwise 3x3 conv: the positional information of PVT v2's feed-forward."""

    def __init__(self, dim, *, rngs, dtype):
        self.dwconv = conv2d(dim, dim, 3, padding=1, groups=dim, rngs=rngs, dtype=dtype)

    def __call__(self, x):
        return self.dwconv(x)


class Mlp(nnx.Module):
    """fc -> depthwise 3x3 conv -> GELU -> fc."""

    def __init__(self, dim, hidden, *, rngs, dtype):
        self.fc1 = nnx.Linear(dim, hidden, rngs=rngs, dtype=dtype)
        self.dwconv = DWConv(hidden, rngs=rngs, dtype=dtype)
        self.fc2 = nnx.Linear(hidden, dim, rngs=rngs, dtype=dtype)

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.dwconv(self.fc1(x)), approximate=False))


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

    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        outs = []
        for i in range(1, 5):
            x = getattr(self, f"patch_embed{i}")(x)
            for blk in getattr(self, f"block{i}"):
                x = blk(x)
            x = getattr(self, f"norm{i}")(x)
            outs.append(x)
        return tuple(outs)



