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
