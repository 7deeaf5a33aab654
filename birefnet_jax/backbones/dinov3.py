"""DINOv3 vision transformers (Simeoni et al. 2025) as the original BiRefNet uses them, NHWC.

The original builds them with timm (`vit_<size>_patch16_dinov3.lvd1689m`, `features_only=True`,
`dynamic_img_size=True`), so timm's model is the specification, including what its feature
wrapper does:

- 16x16 patches (a strided conv with bias), then one class token and 4 register tokens in front;
  no absolute position embedding and no norm before the blocks.
- Pre-norm blocks (LayerNorm, eps 1e-5) with layer scale on both branches (`gamma_1`, `gamma_2`);
  a GELU MLP (S, B, L) or a SwiGLU (S+, H+, 7B: `fc1_g`, `fc1_x`, hidden width rounded up to a
  multiple of `swiglu_align_to`). The fused qkv projection has no bias (the `_qkvb` variants add
  `q_bias` and `v_bias`; k's bias is a fixed zero).
- Rotary position embedding on the patch tokens of q and k (never the 5 prefix tokens), "rotate
  half" layout: per head of width D, D/4 periods `temperature ** (2i / (D/2))` (temperature 100),
  patch-centre coordinates `(i + 0.5) / n` per axis mapped to [-1, 1] (each axis by its own size,
  so the embedding depends on the token grid, not on pixels), angles `2 pi coord / period`, the
  row coordinate's D/4 angles then the column's. timm builds coordinates and periods in float32
  (periods = the float64 power rounded once) and computes the angles in the periods' precision:
  float32 normally, float64 in a model cast to float64; the rotation is done in float32 at least
  and cast back to q's dtype. The tables depend only on the token grid: here they are NumPy
  constants made once per shape.
- `features_only` returns the raw outputs of the `out_indices` blocks (no final norm: the wrapper
  prunes it, with the head), prefix tokens dropped, as maps at stride 16. Blocks after the last
  index are pruned too, so a BiRefNet checkpoint holds exactly `max(out_indices) + 1` blocks.

The module tree follows timm's names (`DinoV3.model` is the wrapped ViT, as in timm's
`FeatureGetterNet`), so BiRefNet keys (`bb.model.blocks.0.attn.qkv.weight`) and timm's own keys
(`blocks.0.attn.qkv.weight`, see `birefnet_jax.convert.timm`) map mechanically.
"""

from __future__ import annotations

import dataclasses
import re
from functools import lru_cache, partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from birefnet_jax.backbones.spec import ArchitectureError, BackboneSpec, count_indices, shape_of
from birefnet_jax.nn.layers import Mlp, at_least_f32, conv2d
from birefnet_jax.nn.scan import apply_blocks


@dataclasses.dataclass(frozen=True)
class DinoV3Config:
    """A DINOv3 ViT and the blocks whose outputs BiRefNet takes.

    `depth` is the whole model's (it sets the drop-path schedule, as in timm); only the first
    `max(out_indices) + 1` blocks are built. `swiglu_align_to` rounds the SwiGLU hidden width up
    (0: no rounding). `layer_scale` and `qkv_bias` say whether `gamma_*` and `q_bias`/`v_bias` exist.
    """

    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    swiglu: bool = False
    swiglu_align_to: int = 0
    num_reg_tokens: int = 4
    qkv_bias: bool = False
    layer_scale: bool = True
    patch_size: int = 16
    rope_temperature: float = 100.0
    norm_eps: float = 1e-5
    out_indices: tuple[int, ...] = (3, 5, 7, 11)
    drop_path_rate: float = 0.0
    kind: str = "dinov3"

    def __post_init__(self):
        object.__setattr__(self, "out_indices", tuple(int(i) for i in self.out_indices))
        problems = []
        if self.embed_dim < 1 or self.num_heads < 1 or self.embed_dim % self.num_heads:
            problems.append(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        elif self.head_dim % 4:
            problems.append(f"head width {self.head_dim} (embed_dim / num_heads) must be a multiple of 4 "
                            "for the 2D rotary embedding")
        if len(self.out_indices) != 4:
            problems.append(f"out_indices={self.out_indices}: BiRefNet takes exactly 4 block outputs")
        elif any(not -self.depth <= i < self.depth for i in self.out_indices):
            problems.append(f"out_indices={self.out_indices} out of range for depth {self.depth}")
        elif len(set(self.take_indices)) != 4 or list(self.take_indices) != sorted(self.take_indices):
            problems.append(f"out_indices={self.out_indices} must name 4 distinct blocks in increasing order "
                            "(timm returns them in block order)")
        if problems:
            raise ValueError("invalid DINOv3 config: " + "; ".join(problems))

    @property
    def channels(self) -> tuple[int, ...]:
        """Widths of the four outputs, shallow to deep (all the embedding width)."""
        return (self.embed_dim,) * 4

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def take_indices(self) -> tuple[int, ...]:
        """`out_indices` with negative ones counted from the end, as timm resolves them."""
        return tuple(i + self.depth if i < 0 else i for i in self.out_indices)

    @property
    def num_blocks(self) -> int:
        """Blocks that exist in `features_only` mode (timm prunes the rest)."""
        return max(self.take_indices) + 1

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.num_reg_tokens

    @property
    def hidden_features(self) -> int:
        hidden = int(self.embed_dim * self.mlp_ratio)
        if self.swiglu and self.swiglu_align_to:
            hidden += -hidden % self.swiglu_align_to
        return hidden


# The original's table (its models/backbones/dino_v3.py), timm's model definitions.
PRESETS = {
    "dino_v3_s": DinoV3Config(embed_dim=384, depth=12, num_heads=6, out_indices=(3, 5, 7, 11)),
    "dino_v3_s_plus": DinoV3Config(embed_dim=384, depth=12, num_heads=6, swiglu=True, swiglu_align_to=8,
                                   out_indices=(3, 5, 7, 11)),
    "dino_v3_b": DinoV3Config(embed_dim=768, depth=12, num_heads=12, out_indices=(3, 5, 7, 11)),
    "dino_v3_l": DinoV3Config(embed_dim=1024, depth=24, num_heads=16, out_indices=(5, 11, 17, 23)),
    "dino_v3_h_plus": DinoV3Config(embed_dim=1280, depth=32, num_heads=20, swiglu=True, swiglu_align_to=8,
                                   out_indices=(7, 15, 23, 31)),
    "dino_v3_7b": DinoV3Config(embed_dim=4096, depth=40, num_heads=32, mlp_ratio=2.0, swiglu=True,
                               swiglu_align_to=64, out_indices=(9, 19, 29, 39)),
}


# ---------------------------------------------------------------------------------------------
# Rotary position embedding


@lru_cache(maxsize=32)
def rope_angles(height: int, width: int, head_dim: int, temperature: float = 100.0,
                double: bool = False) -> np.ndarray:
    """(height * width, head_dim / 2) rotation angles of the patch tokens, row-major: the row
    coordinate's head_dim / 4 angles, then the column's; float32, or float64 (`double`) as a
    model cast to float64 computes them (from the same float32 coordinates and periods)."""
    n = head_dim // 4
    exponents = np.float32(2.0) * np.arange(n, dtype=np.float32) / np.float32(head_dim // 2)
    periods = (float(temperature) ** exponents.astype(np.float64)).astype(np.float32)
    axes = [(np.arange(s, dtype=np.float32) + np.float32(0.5)) / np.float32(s) for s in (height, width)]
    coords = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 2)
    coords = np.float32(2.0) * coords - np.float32(1.0)
    if double:
        angles = 2 * np.pi * coords.astype(np.float64)[:, :, None] / periods.astype(np.float64)
    else:
        angles = np.float32(2 * np.pi) * coords[:, :, None] / periods
    angles = angles.reshape(height * width, 2 * n)
    angles.setflags(write=False)
    return angles


def rope_embed(height: int, width: int, head_dim: int, temperature: float = 100.0,
               double: bool = False) -> np.ndarray:
    """timm's rotary table for a height x width token grid: (H * W, 2 * head_dim), sin then cos,
    each in the rotate-half layout (the head_dim / 2 angles twice)."""
    sin, cos = _rope_tables(height, width, head_dim, temperature, double, 0)
    return np.concatenate([sin, sin, cos, cos], axis=-1)


@lru_cache(maxsize=32)
def _rope_tables(height, width, head_dim, temperature, double, prefix):
    """sin and cos of `rope_angles` (each (prefix + H * W, head_dim / 2)), the `prefix` leading
    rows at angle 0 (cos 1, sin 0: the class and register tokens pass unrotated). Evaluated in
    float64 and rounded once."""
    angles = rope_angles(height, width, head_dim, temperature, double).astype(np.float64)
    dtype = np.float64 if double else np.float32
    pad = ((prefix, 0), (0, 0))
    sin = np.pad(np.sin(angles), pad).astype(dtype)
    cos = np.pad(np.cos(angles), pad, constant_values=1.0).astype(dtype)
    sin.setflags(write=False)
    cos.setflags(write=False)
    return sin, cos


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """Rotate (B, N, heads, D) `x` by (N, D / 2) tables in their precision ("rotate half": the
    first and second halves of each head are the pair's two components); x's dtype back."""
    x1, x2 = jnp.split(x.astype(sin.dtype), 2, axis=-1)
    s, c = sin[:, None], cos[:, None]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# Attention

# On CPU, attention logits per step, in elements: at 1024x1024 (4101 tokens) the whole (heads, N, N)
# matrix grows to gigabytes per image for the large sizes; query blocks keep it bounded. 32 MiB of
# float32 per block timed fastest among the sizes tried (docs/performance.md). Elsewhere one step.
_ATTN_BLOCK = 1 << 23


def _softmax_attention(q, k, v, scale, spec):
    """softmax(q k^T * scale) v with einsum `spec` ("q-layout,k-layout->logits-layout"): logits and
    softmax in float32 at least, the weights cast to v's dtype for the second matmul (as a bfloat16
    model does)."""
    acc = at_least_f32(q.dtype)
    logits = jnp.einsum(spec, q, k, preferred_element_type=acc) * scale
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    ins, out = spec.split("->")
    q_spec, k_spec = ins.split(",")
    return jnp.einsum(f"{out},{k_spec}->{q_spec}", probs, v, preferred_element_type=acc).astype(v.dtype)


def _attend(q, k, v, scale):
    """Attention over (B, N, heads, D) arrays in one step."""
    return _softmax_attention(q, k, v, scale, "bqhd,bkhd->bhqk")


def _attend_blocked(q, k, v, scale):
    """`_attend` over blocks of queries (`jax.lax.map`) when the logits would not fit in memory
    comfortably, in a heads-first layout transposed once (per block, the (B, N, heads, D) layout
    re-laid k and v out for every matmul, markedly slower on a CPU)."""
    b, n, h, d = q.shape
    steps = -(-n * k.shape[1] * h // _ATTN_BLOCK)  # per image (the batch may be symbolic under jax.export)
    if steps <= 1:
        return _attend(q, k, v, scale)
    rows = -(-n // steps)
    steps = -(-n // rows)
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # (B, heads, N, D)
    q = jnp.pad(q, ((0, 0), (0, 0), (0, steps * rows - n), (0, 0)))
    q = q.reshape(b, h, steps, rows, d).transpose(2, 0, 1, 3, 4)
    out = jax.lax.map(lambda qb: _softmax_attention(qb, k, v, scale, "bhqd,bhkd->bhqk"), q)
    out = out.transpose(1, 2, 0, 3, 4).reshape(b, h, steps * rows, d)[:, :, :n]
    return out.transpose(0, 2, 1, 3)


class Attention(nnx.Module):
    """Multi-head self-attention with a fused qkv projection and the rotary embedding."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, *, rngs, dtype):
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nnx.Linear(dim, 3 * dim, use_bias=False, rngs=rngs, dtype=dtype)
        if qkv_bias:  # k has none (timm keeps a fixed zero buffer for it)
            self.q_bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
            self.v_bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
        else:
            self.q_bias = self.v_bias = None
        self.proj = nnx.Linear(dim, dim, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
        b, n, c = x.shape
        h = self.num_heads
        qkv = self.qkv(x)
        if self.q_bias is not None:
            bias = jnp.concatenate([self.q_bias[...], jnp.zeros_like(self.q_bias[...]), self.v_bias[...]])
            qkv = qkv + bias.astype(qkv.dtype)
        qkv = qkv.reshape(b, n, 3, h, c // h)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q, k = apply_rope(q, sin, cos), apply_rope(k, sin, cos)
        out = jax.lax.platform_dependent(q, k, v, cpu=partial(_attend_blocked, scale=self.scale),
                                         default=partial(_attend, scale=self.scale))
        return self.proj(out.reshape(b, n, c))


class SwiGLU(nnx.Module):
    """fc2(silu(fc1_g(x)) * fc1_x(x))."""

    def __init__(self, dim: int, hidden: int, *, rngs, dtype):
        self.fc1_g = nnx.Linear(dim, hidden, rngs=rngs, dtype=dtype)
        self.fc1_x = nnx.Linear(dim, hidden, rngs=rngs, dtype=dtype)
        self.fc2 = nnx.Linear(hidden, dim, rngs=rngs, dtype=dtype)

    def __call__(self, x):
        return self.fc2(jax.nn.silu(self.fc1_g(x)) * self.fc1_x(x))


def _layer_norm(dim, eps, *, rngs, dtype):
    # Two-pass variance: ViT residual streams carry a few very large channels, where E[x^2] - E[x]^2
    # loses float32 digits.
    return nnx.LayerNorm(dim, epsilon=eps, use_fast_variance=False, rngs=rngs, dtype=dtype)


class Block(nnx.Module):
    """Pre-norm transformer block with layer scale. Maps (tokens, (sin, cos)) to the same pair, so
    that a run of blocks can go through `apply_blocks`' scan with the rotary tables carried along."""

    def __init__(self, cfg: DinoV3Config, drop_path: float, *, rngs, dtype):
        dim = cfg.embed_dim
        self.norm1 = _layer_norm(dim, cfg.norm_eps, rngs=rngs, dtype=dtype)
        self.attn = Attention(dim, cfg.num_heads, cfg.qkv_bias, rngs=rngs, dtype=dtype)
        self.norm2 = _layer_norm(dim, cfg.norm_eps, rngs=rngs, dtype=dtype)
        mlp = SwiGLU if cfg.swiglu else Mlp
        self.mlp = mlp(dim, cfg.hidden_features, rngs=rngs, dtype=dtype)
        if cfg.layer_scale:
            self.gamma_1 = nnx.Param(jnp.full((dim,), 1e-5, jnp.float32))
            self.gamma_2 = nnx.Param(jnp.full((dim,), 1e-5, jnp.float32))
        else:
            self.gamma_1 = self.gamma_2 = None
        self.drop_path = nnx.Dropout(drop_path, broadcast_dims=(1, 2), deterministic=True, rngs=rngs)

    def _scaled(self, y, gamma):
        return y if gamma is None else y * gamma[...].astype(y.dtype)

    def __call__(self, state):
        x, (sin, cos) = state
        x = x + self.drop_path(self._scaled(self.attn(self.norm1(x), sin, cos), self.gamma_1))
        x = x + self.drop_path(self._scaled(self.mlp(self.norm2(x)), self.gamma_2))
        return x, (sin, cos)


class PatchEmbed(nnx.Module):
    def __init__(self, dim: int, patch: int, *, rngs, dtype):
        self.proj = conv2d(3, dim, patch, stride=patch, rngs=rngs, dtype=dtype)

    def __call__(self, x):
        return self.proj(x)


class VisionTransformer(nnx.Module):
    """timm's Eva as DINOv3 configures it, cut to the blocks `features_only` keeps (no final norm,
    no head)."""

    def __init__(self, cfg: DinoV3Config, *, rngs: nnx.Rngs, dtype=None):
        self.cfg = cfg
        dim = cfg.embed_dim
        self.patch_embed = PatchEmbed(dim, cfg.patch_size, rngs=rngs, dtype=dtype)
        init = nnx.initializers.normal(0.02)
        self.cls_token = nnx.Param(init(rngs.params(), (1, 1, dim), jnp.float32))
        self.reg_token = (nnx.Param(init(rngs.params(), (1, cfg.num_reg_tokens, dim), jnp.float32))
                          if cfg.num_reg_tokens else None)
        dpr = np.linspace(0, cfg.drop_path_rate, cfg.depth).tolist()
        self.blocks = nnx.List([Block(cfg, dpr[i], rngs=rngs, dtype=dtype) for i in range(cfg.num_blocks)])
        self.remat = False  # recompute each block in the backward pass (model.set_remat)

    def tokens(self, x: jax.Array) -> tuple[jax.Array, tuple[int, int]]:
        """Patch embedding of an NHWC image and the prefix tokens: ((B, prefix + h * w, C), (h, w))."""
        p = self.cfg.patch_size
        if x.ndim != 4 or x.shape[1] % p or x.shape[2] % p:
            raise ValueError(f"DINOv3 takes (B, H, W, 3) images with H and W multiples of its patch size {p}, "
                             f"got shape {x.shape}")
        x = self.patch_embed(x)
        b, h, w, c = x.shape
        prefix = [self.cls_token[...]] + ([] if self.reg_token is None else [self.reg_token[...]])
        prefix = jnp.broadcast_to(jnp.concatenate(prefix, axis=1).astype(x.dtype), (b, self.cfg.num_prefix_tokens, c))
        return jnp.concatenate([prefix, x.reshape(b, h * w, c)], axis=1), (h, w)

    def rope(self, grid: tuple[int, int], dtype) -> tuple[jax.Array, jax.Array]:
        """sin and cos tables for all tokens (prefix rows unrotated), in float32 at least."""
        acc = at_least_f32(dtype)
        sin, cos = _rope_tables(*grid, self.cfg.head_dim, float(self.cfg.rope_temperature),
                                bool(acc == jnp.float64), self.cfg.num_prefix_tokens)
        return jnp.asarray(sin, acc), jnp.asarray(cos, acc)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        """The outputs of the `out_indices` blocks as (B, H/16, W/16, C) maps, in block order."""
        x, (h, w) = self.tokens(x)
        rope = self.rope((h, w), x.dtype)
        b, _, c = x.shape
        outs, start = [], 0
        for end in self.cfg.take_indices:
            x, _ = apply_blocks([self.blocks[i] for i in range(start, end + 1)], (x, rope), remat=self.remat)
            outs.append(x[:, self.cfg.num_prefix_tokens:].reshape(b, h, w, c))
            start = end + 1
        return tuple(outs)


class DinoV3(nnx.Module):
    """The backbone as timm's `features_only` wrapper holds it (`model`): (B, H, W, 3) images, H and
    W multiples of 16 -> four (B, H/16, W/16, embed_dim) maps, shallow first."""

    def __init__(self, cfg: DinoV3Config, *, rngs: nnx.Rngs, dtype=None):
        self.model = VisionTransformer(cfg, rngs=rngs, dtype=dtype)

    @property
    def cfg(self) -> DinoV3Config:
        return self.model.cfg

    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        return self.model(x)


# ---------------------------------------------------------------------------------------------
# Architecture from state-dict keys

# What the weights cannot tell (head count, which blocks feed BiRefNet, the full depth, ...).
_NOT_IN_WEIGHTS = ("num_heads", "out_indices", "depth", "drop_path_rate", "rope_temperature", "norm_eps")


def _read_weights(sd, prefix: str) -> dict:
    """The architecture fields that the keys and shapes under `prefix` fix, plus the block count."""
    if f"{prefix}storage_tokens" in sd:
        raise ArchitectureError(
            "this is a DINOv3 checkpoint in Meta's original layout (storage_tokens, ls1.gamma, ...); load it once "
            "with timm (timm.create_model('vit_..._patch16_dinov3', pretrained=True, pretrained_cfg_overlay="
            "dict(file=...))) and save its state_dict, which is timm's layout")
    embed, _, patch, _ = shape_of(sd, f"{prefix}patch_embed.proj.weight")
    blocks = count_indices(sd, rf"{re.escape(prefix)}blocks\.(\d+)\.")
    if not blocks:
        raise ArchitectureError(f"the state dict has no '{prefix}blocks.<i>.' keys: not a DINOv3 ViT")
    swiglu = f"{prefix}blocks.0.mlp.fc1_g.weight" in sd
    hidden = shape_of(sd, f"{prefix}blocks.0.mlp.{'fc1_g' if swiglu else 'fc1'}.weight")[0]
    shape_of(sd, f"{prefix}cls_token")
    reg = shape_of(sd, f"{prefix}reg_token")[1] if f"{prefix}reg_token" in sd else 0
    return dict(embed_dim=embed, patch_size=patch, swiglu=swiglu, num_reg_tokens=reg,
                qkv_bias=f"{prefix}blocks.0.attn.q_bias" in sd, layer_scale=f"{prefix}blocks.0.gamma_1" in sd,
                hidden=hidden, blocks=blocks)


def _config_from(found: dict, *, pruned: bool, overrides: dict) -> DinoV3Config:
    """`found` (see `_read_weights`) + overrides -> config. `pruned`: the keys are a features_only
    model's (blocks = max(out_indices) + 1), else a whole model's (blocks = depth)."""
    if unknown := sorted(set(overrides) - set(_NOT_IN_WEIGHTS)):
        raise ArchitectureError(f"DINOv3 override(s) {unknown} are fixed by the weights; only "
                                f"{', '.join(_NOT_IN_WEIGHTS)} can be given")
    blocks, hidden = found.pop("blocks"), found.pop("hidden")

    def fits(p: DinoV3Config) -> bool:  # a `_qkvb` variant is its preset with biases
        same = all(getattr(p, k) == v for k, v in found.items() if k != "qkv_bias")
        return same and (p.num_blocks if pruned else p.depth) == blocks and p.hidden_features == hidden

    preset = next((p for p in PRESETS.values() if fits(p)), None)
    if preset is not None:
        fields = dataclasses.asdict(preset) | found
    else:
        missing = [k for k in ("num_heads", "out_indices") if k not in overrides]
        if missing:
            raise ArchitectureError(
                f"DINOv3 with width {found['embed_dim']}, {blocks} blocks and MLP width {hidden} is not a preset, "
                f"and {' and '.join(missing)} cannot be read from the weights: pass them "
                "(e.g. num_heads=6, out_indices=(3, 5, 7, 11))")
        ratio = hidden / found["embed_dim"]
        if int(found["embed_dim"] * ratio) < hidden:  # the quotient rounded down
            ratio = float(np.nextafter(ratio, np.inf))
        fields = dict(found, mlp_ratio=ratio, swiglu_align_to=0, depth=blocks)
    fields.update(overrides)
    try:
        cfg = DinoV3Config(**fields)
    except (TypeError, ValueError) as e:
        raise ArchitectureError(str(e)) from e
    if cfg.hidden_features != hidden:
        raise ArchitectureError(f"the MLP width {hidden} is not embed_dim * mlp_ratio ({cfg.hidden_features})")
    if pruned and cfg.num_blocks != blocks:
        raise ArchitectureError(f"out_indices={cfg.out_indices} needs {cfg.num_blocks} blocks, the checkpoint has "
                                f"{blocks} (a BiRefNet checkpoint keeps blocks up to the last index)")
    if not pruned and cfg.depth != blocks:
        raise ArchitectureError(f"depth={cfg.depth}, but the checkpoint has {blocks} blocks")
    return cfg


def infer_config(sd, **overrides) -> DinoV3Config:
    """The backbone config of a BiRefNet state dict (`bb.model.*` keys). Presets are recognised
    from widths and block count; for other sizes pass `num_heads` and `out_indices` (and `depth`
    where the checkpoint's blocks were cut after the last index)."""
    return _config_from(_read_weights(sd, "bb.model."), pruned=True, overrides=overrides)


def infer_config_timm(sd, **overrides) -> DinoV3Config:
    """The config of a whole timm DINOv3 state dict (released weights: `cls_token`,
    `blocks.<i>.*`, `norm.*`, no prefix), with BiRefNet's out_indices for the presets."""
    return _config_from(_read_weights(sd, ""), pruned=False, overrides=overrides)


# ---------------------------------------------------------------------------------------------
# Released weights in timm's layout

# Keys of a whole timm model that `features_only` prunes: final norm, pooling, head.
_PRUNED = re.compile(r"^(norm|fc_norm|head|attn_pool|head_drop)\.")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def timm_filter(sd, num_blocks: int) -> dict:
    """The keys of a whole timm DINOv3 state dict that a features_only model with `num_blocks` blocks
    keeps (timm drops the final norm, pooling, head and the blocks after the last out index)."""
    kept = {}
    for key, value in sd.items():
        m = _BLOCK.match(key)
        if _PRUNED.match(key) or (m and int(m.group(1)) >= num_blocks):
            continue
        kept[key] = value
    return kept


SPEC = BackboneSpec(kind="dinov3", config=DinoV3Config, module=DinoV3, presets=PRESETS,
                    key="bb.model.blocks.0.gamma_1", infer=infer_config)
