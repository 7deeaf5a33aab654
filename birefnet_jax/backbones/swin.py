"""Swin Transformer v1 backbone (Liu et al. 2021), NHWC, any input size.

Feature maps are padded to a multiple of the window before partitioning and cropped
afterwards, so any size works; the shifted-window mask is built from the padded size.
"""

from __future__ import annotations

import dataclasses
import math
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from birefnet_jax.backbones.spec import BackboneSpec, DerivedBuffer, count_indices, shape_of
from birefnet_jax.nn.layers import Mlp, at_least_f32, conv2d
from birefnet_jax.nn.scan import apply_blocks, block_caller


@dataclasses.dataclass(frozen=True)
class SwinConfig:
    """Swin Transformer v1 (shifted windows, patch size 4)."""

    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.2
    kind: str = "swin_v1"

    @property
    def channels(self) -> tuple[int, ...]:
        """Output widths of the four stages, shallow to deep."""
        return tuple(self.embed_dim * 2**i for i in range(len(self.depths)))


PRESETS = {
    "swin_v1_t": SwinConfig(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7),
    "swin_v1_s": SwinConfig(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=7),
    "swin_v1_b": SwinConfig(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=12),
    "swin_v1_l": SwinConfig(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12),
}

_NEG = -1e9  # stands for -inf in the shifted-window mask; exp underflows to exactly 0


@lru_cache(maxsize=16)
def relative_position_index(window: int) -> np.ndarray:
    """(N, N) index into the relative-position bias table, N = window**2."""
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij")).reshape(2, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (window - 1)
    return (rel[..., 0] * (2 * window - 1) + rel[..., 1]).astype(np.int64)


@lru_cache(maxsize=64)
def shifted_window_mask(hp: int, wp: int, window: int, shift: int) -> np.ndarray:
    """(nW, N, N) additive mask that keeps tokens from attending across the wrap-around seam."""
    region = np.zeros((hp, wp), np.int32)
    bounds = lambda n: ((0, n - window), (n - window, n - shift), (n - shift, n))  # noqa: E731
    label = 0
    for h0, h1 in bounds(hp):
        for w0, w1 in bounds(wp):
            region[h0:h1, w0:w1] = label
            label += 1
    win = region.reshape(hp // window, window, wp // window, window).transpose(0, 2, 1, 3).reshape(-1, window**2)
    return np.where(win[:, None, :] != win[:, :, None], _NEG, 0.0).astype(np.float32)


def window_partition(x: jax.Array, window: int) -> jax.Array:
    """(B, H, W, C) -> (B, nW, window*window, C)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, -1, window * window, c)


def window_merge(x: jax.Array, window: int, h: int, w: int) -> jax.Array:
    """Inverse of `window_partition`."""
    b, _, _, c = x.shape
    x = x.reshape(b, h // window, w // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


class WindowAttention(nnx.Module):
    """Multi-head self-attention inside windows, with a learned relative-position bias."""

    def __init__(self, dim: int, window: int, num_heads: int, *, rngs, dtype):
        self.window, self.num_heads = window, num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nnx.Param(
            0.02 * jax.random.truncated_normal(rngs.params(), -2, 2, ((2 * window - 1) ** 2, num_heads)))
        self.qkv = nnx.Linear(dim, 3 * dim, rngs=rngs, dtype=dtype)
        self.proj = nnx.Linear(dim, dim, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, mask: np.ndarray | None) -> jax.Array:
        """x: (B, nW, N, C); mask: (nW, N, N) or None."""
        b, nw, n, c = x.shape
        h = self.num_heads
        q, k, v = jnp.split(self.qkv(x).reshape(b, nw, n, 3, h, c // h), 3, axis=3)
        q, k, v = q[:, :, :, 0], k[:, :, :, 0], v[:, :, :, 0]  # (B, nW, N, h, d)
        idx = relative_position_index(self.window).reshape(-1)
        bias = self.relative_position_bias_table[...][idx].reshape(n, n, h).transpose(2, 0, 1)
        logits = jnp.einsum("bwqhd,bwkhd->bwhqk", q * self.scale, k) + bias.astype(q.dtype)
        if mask is not None:
            logits = logits + jnp.asarray(mask, q.dtype)[None, :, None]
        attn = jax.nn.softmax(logits.astype(at_least_f32(logits.dtype)), axis=-1).astype(v.dtype)
        out = jnp.einsum("bwhqk,bwkhd->bwqhd", attn, v).reshape(b, nw, n, c)
        return self.proj(out)


class SwinTransformerBlock(nnx.Module):
    def __init__(self, dim, num_heads, window, shift, mlp_ratio, drop_path, *, rngs, dtype):
        self.window, self.shift = window, shift
        self.norm1 = nnx.LayerNorm(dim, epsilon=1e-5, rngs=rngs, dtype=dtype)
        self.attn = WindowAttention(dim, window, num_heads, rngs=rngs, dtype=dtype)
        self.norm2 = nnx.LayerNorm(dim, epsilon=1e-5, rngs=rngs, dtype=dtype)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), rngs=rngs, dtype=dtype)
        self.drop_path = nnx.Dropout(drop_path, broadcast_dims=(1, 2, 3), deterministic=True, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        ws, s = self.window, self.shift
        y = self.norm1(x)
        pad_b, pad_r = (-h) % ws, (-w) % ws
        y = jnp.pad(y, ((0, 0), (0, pad_b), (0, pad_r), (0, 0)))
        hp, wp = h + pad_b, w + pad_r
        mask = None
        if s:
            y = jnp.roll(y, (-s, -s), axis=(1, 2))
            mask = shifted_window_mask(hp, wp, ws, s)
        y = window_merge(self.attn(window_partition(y, ws), mask), ws, hp, wp)
        if s:
            y = jnp.roll(y, (s, s), axis=(1, 2))
        x = x + self.drop_path(y[:, :h, :w])
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nnx.Module):
    """2x2 space-to-depth (in Swin's channel order) -> LayerNorm -> linear to 2C."""

    def __init__(self, dim, *, rngs, dtype):
        self.norm = nnx.LayerNorm(4 * dim, epsilon=1e-5, rngs=rngs, dtype=dtype)
        self.reduction = nnx.Linear(4 * dim, 2 * dim, use_bias=False, rngs=rngs, dtype=dtype)

    def __call__(self, x):
        h, w = x.shape[1], x.shape[2]
        x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
        x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)
        return self.reduction(self.norm(x))


class BasicLayer(nnx.Module):
    """One stage: blocks alternating plain and shifted windows, then optional merging."""

    def __init__(self, dim, depth, num_heads, window, mlp_ratio, drop_paths, downsample, *, rngs, dtype):
        self.blocks = nnx.List([
            SwinTransformerBlock(dim, num_heads, window, 0 if i % 2 == 0 else window // 2, mlp_ratio,
                                 drop_paths[i], rngs=rngs, dtype=dtype)
            for i in range(depth)
        ])
        self.downsample = PatchMerging(dim, rngs=rngs, dtype=dtype) if downsample else None
        self.remat = False  # recompute each block in the backward pass (model.set_remat)

    def __call__(self, x):
        x = apply_blocks(self.blocks, x, period=2, remat=self.remat)  # plain and shifted windows alternate
        return x, (x if self.downsample is None else block_caller(self.remat)(self.downsample, x))


class PatchEmbed(nnx.Module):
    def __init__(self, embed_dim, patch=4, *, rngs, dtype):
        self.patch = patch
        self.proj = conv2d(3, embed_dim, patch, stride=patch, rngs=rngs, dtype=dtype)
        self.norm = nnx.LayerNorm(embed_dim, epsilon=1e-5, rngs=rngs, dtype=dtype)

    def __call__(self, x):
        p = self.patch
        x = jnp.pad(x, ((0, 0), (0, (-x.shape[1]) % p), (0, (-x.shape[2]) % p), (0, 0)))
        return self.norm(self.proj(x))


class SwinTransformer(nnx.Module):
    """Returns the four stage outputs (strides 4, 8, 16, 32), each layer-normalised."""

    def __init__(self, cfg: SwinConfig, *, rngs: nnx.Rngs, dtype=None):
        n = len(cfg.depths)
        self.patch_embed = PatchEmbed(cfg.embed_dim, rngs=rngs, dtype=dtype)
        dpr = np.linspace(0, cfg.drop_path_rate, sum(cfg.depths)).tolist()
        starts = np.cumsum((0,) + tuple(cfg.depths))
        self.layers = nnx.List([
            BasicLayer(cfg.embed_dim * 2**i, cfg.depths[i], cfg.num_heads[i], cfg.window_size, cfg.mlp_ratio,
                       dpr[starts[i]:starts[i + 1]], i < n - 1, rngs=rngs, dtype=dtype)
            for i in range(n)
        ])
        for i, c in enumerate(cfg.channels):
            setattr(self, f"norm{i}", nnx.LayerNorm(c, epsilon=1e-5, rngs=rngs, dtype=dtype))
        # With remat, the patch embedding and output norms are recomputed too: a LayerNorm's
        # backward otherwise keeps several activation-sized arrays per level until the end.
        self.remat = False

    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        call = block_caller(self.remat)
        x = call(self.patch_embed, x)
        outs = []
        for i, layer in enumerate(self.layers):
            out, x = layer(x)
            outs.append(call(getattr(self, f"norm{i}"), out))
        return tuple(outs)


def infer_config(sd) -> SwinConfig:
    """Widths from the patch embedding, depths from the block indices, heads and window from the
    relative-position bias tables (one column per head, (2w-1)^2 rows)."""
    embed = shape_of(sd, "bb.patch_embed.proj.weight")[0]
    n_layers = count_indices(sd, r"bb\.layers\.(\d+)\.")
    depths = tuple(count_indices(sd, rf"bb\.layers\.{i}\.blocks\.(\d+)\.") for i in range(n_layers))
    tables = [shape_of(sd, f"bb.layers.{i}.blocks.0.attn.relative_position_bias_table") for i in range(n_layers)]
    window = int(round((math.sqrt(tables[0][0]) + 1) / 2))
    hidden = shape_of(sd, "bb.layers.0.blocks.0.mlp.fc1.weight")[0]
    return SwinConfig(embed_dim=embed, depths=depths, num_heads=tuple(t[1] for t in tables), window_size=window,
                      mlp_ratio=hidden / embed)


def _index_for_table(table: np.ndarray) -> np.ndarray:
    """The relative-position index that goes with a bias table of (2w - 1)^2 rows."""
    return relative_position_index(int(round((np.sqrt(table.shape[0]) + 1) / 2)))


SPEC = BackboneSpec(kind="swin_v1", config=SwinConfig, module=SwinTransformer, presets=PRESETS,
                    key="bb.layers.0.blocks.0.attn.qkv.weight", infer=infer_config,
                    derived_buffers=(DerivedBuffer("relative_position_index", "relative_position_bias_table",
                                                   _index_for_table),))
