"""BiRefNet: localization module (backbone encoder, multi-scale input, context fusion,
squeeze) and reconstruction module (decoder with bilateral reference), in Flax NNX.

Attribute names follow the original's module tree, so that the original state-dict keys
map onto this model with a small rename table (`birefnet_jax.convert.keymap`).
In eval mode (`model.eval()`, the default) the model returns the final logits, (B, H, W, 1).
In train mode it returns `TrainOutputs` with everything the original's objective needs.
"""

from __future__ import annotations

import dataclasses

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from birefnet_jax.backbones import build_backbone
from birefnet_jax.config import BiRefNetConfig
from birefnet_jax.gradient import gradient_map
from birefnet_jax.modules.blocks import BasicLatBlk, SimpleConvs, build_block
from birefnet_jax.nn.layers import apply_opt, at_least_f32, conv2d, maybe_bn, resize_bilinear


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainOutputs:
    """What the training objective consumes (all NHWC logits unless noted).

    preds: multi-scale logits m4, m3, m2 (at strides 32, 16, 8; empty without
      ms_supervision) followed by the final full-resolution map.
    gdt_preds / gdt_labels: gradient-attention predictions and their targets at levels
      4, 3, 2 (empty without out_ref). A label is the image gradient map times the
      upsampled logits of the same level, as the original defines it.
    cls_logits: auxiliary classification logits, or None.
    """

    preds: list
    gdt_preds: list
    gdt_labels: list
    cls_logits: jax.Array | None


def image_to_patches(x: jax.Array, grid_h: int, grid_w: int) -> jax.Array:
    """Split the image into a grid and stack the cells along channels, (c, gh, gw) order:
    the source reference seen by each decoder level at its own resolution."""
    return einops.rearrange(x, "b (gh h) (gw w) c -> b h w (c gh gw)", gh=grid_h, gw=grid_w)


class GradientBranch(nnx.Module):
    """conv3x3 -> BN -> ReLU, shared by the gradient prediction and attention heads."""

    def __init__(self, in_ch: int, width: int, batch_norm: bool, *, rngs, dtype):
        self.conv = conv2d(in_ch, width, 3, padding=1, rngs=rngs, dtype=dtype)
        self.bn = maybe_bn(batch_norm, width, dtype)

    def __call__(self, x):
        return jax.nn.relu(apply_opt(self.bn, self.conv(x)))


class Decoder(nnx.Module):
    """Reconstruction module: decoder blocks from deep to shallow, each fed the image patches
    of its resolution (source reference) and, with `out_ref`, gated by gradient attention
    (target reference)."""

    GDT_WIDTH = 16

    def __init__(self, cfg: BiRefNetConfig, *, rngs: nnx.Rngs, dtype=None):
        self.cfg = cfg
        self.deterministic = True
        self.capture_intermediates = False  # sow decoder block outputs (for parity checks)
        ch = list(cfg.lateral_channels)
        out_ch = ch[1:] + [ch[-1] // 2]
        ipt_out = [c // 8 for c in ch]
        ipt_in = [3 * 4**k for k in (5, 4, 3, 2, 0)] if cfg.dec_ipt_split else [3] * 5
        for level, i_in, i_out in zip((5, 4, 3, 2, 1), ipt_in, [ipt_out[0]] + ipt_out, strict=True):
            setattr(self, f"ipt_blk{level}", SimpleConvs(i_in, i_out, rngs=rngs, dtype=dtype))
        blk = dict(attention=cfg.dec_att, inter_channels=cfg.dec_channels_inter, batch_norm=cfg.batch_norm,
                   dropout=cfg.dropout, rngs=rngs, dtype=dtype)
        for i, level in enumerate((4, 3, 2, 1)):
            in_ch = ch[i] + ipt_out[max(0, i - 1)]
            setattr(self, f"decoder_block{level}", build_block(cfg.dec_blk, in_ch, out_ch[i], **blk))
        self.conv_out1 = conv2d(out_ch[3] + ipt_out[3], 1, 1, rngs=rngs, dtype=dtype)
        for i, level in enumerate((4, 3, 2)):
            setattr(self, f"lateral_block{level}", BasicLatBlk(ch[i + 1], out_ch[i], rngs=rngs, dtype=dtype))
        for i, level in enumerate((4, 3, 2)):
            if cfg.ms_supervision:
                setattr(self, f"conv_ms_spvn_{level}", conv2d(out_ch[i], 1, 1, rngs=rngs, dtype=dtype))
            if cfg.out_ref:
                n = self.GDT_WIDTH
                setattr(self, f"gdt_convs_{level}",
                        GradientBranch(out_ch[i], n, cfg.batch_norm, rngs=rngs, dtype=dtype))
                setattr(self, f"gdt_convs_pred_{level}", conv2d(n, 1, 1, rngs=rngs, dtype=dtype))
                setattr(self, f"gdt_convs_attn_{level}", conv2d(n, 1, 1, rngs=rngs, dtype=dtype))

    def _with_patches(self, feat, image, level):
        """Concatenate the source reference for this level: the image (split into a grid of
        patches stacked on channels when `dec_ipt_split`) encoded by `ipt_blk<level>`."""
        h, w = feat.shape[1], feat.shape[2]
        if self.cfg.dec_ipt_split:
            ref = image_to_patches(image, image.shape[1] // h, image.shape[2] // w)
        else:
            ref = image
        ref = resize_bilinear(ref, (h, w))
        return jnp.concatenate([feat, getattr(self, f"ipt_blk{level}")(ref)], axis=-1)

    def _block(self, level, p):
        p = getattr(self, f"decoder_block{level}")(p)
        if self.capture_intermediates:
            self.sow(nnx.Intermediate, f"decoder_block{level}_out", p)
        return p

    def __call__(self, image, feats, grad_target=None):
        x1, x2, x3, x4 = feats
        training = not self.deterministic
        side, gdt_preds, gdt_labels = [], [], []
        skips = {4: x3, 3: x2, 2: x1}
        p = self._with_patches(x4, image, 5)
        for level in (4, 3, 2):
            p = self._block(level, p)
            if self.cfg.ms_supervision and training:
                m = getattr(self, f"conv_ms_spvn_{level}")(p)
                side.append(m)
            if self.cfg.out_ref:
                g = getattr(self, f"gdt_convs_{level}")(p)
                if training:
                    up = resize_bilinear(m, grad_target.shape[1:3])
                    gdt_labels.append(grad_target * up)
                    gdt_preds.append(getattr(self, f"gdt_convs_pred_{level}")(g))
                p = p * jax.nn.sigmoid(getattr(self, f"gdt_convs_attn_{level}")(g))
            skip = skips[level]
            p = resize_bilinear(p, skip.shape[1:3]) + getattr(self, f"lateral_block{level}")(skip)
            p = self._with_patches(p, image, level)
        p = self._block(1, p)
        p = resize_bilinear(p, image.shape[1:3])
        p = self._with_patches(p, image, 1)
        final = self.conv_out1(p)
        return side + [final], gdt_preds, gdt_labels


class BiRefNet(nnx.Module):
    """The full model. Input: (B, H, W, 3) images normalised with the ImageNet mean and std,
    H and W multiples of 32."""

    def __init__(self, cfg: BiRefNetConfig, *, rngs: nnx.Rngs, dtype=None):
        self.cfg = cfg
        self.dtype = dtype
        self.deterministic = True
        self.bb = build_backbone(cfg.backbone, rngs=rngs, dtype=dtype)
        ch = cfg.lateral_channels
        if cfg.num_classes:
            self.cls_head = nnx.Linear(ch[0], cfg.num_classes, rngs=rngs, dtype=dtype)
        else:
            self.cls_head = None
        kind, count = cfg.squeeze
        blk = dict(attention=cfg.dec_att, inter_channels=cfg.dec_channels_inter, batch_norm=cfg.batch_norm,
                   dropout=cfg.dropout, rngs=rngs, dtype=dtype)
        self.squeeze_module = nnx.List([build_block(kind, ch[0] + sum(cfg.cxt), ch[0], **blk)
                                        for _ in range(count)])
        self.decoder = Decoder(cfg, rngs=rngs, dtype=dtype)

    def encode(self, x: jax.Array) -> tuple[jax.Array, ...]:
        """Backbone features at strides 4..32 after multi-scale fusion and context fusion."""
        feats = self.bb(x)
        if self.cfg.mul_scl_ipt:
            half = resize_bilinear(x, (x.shape[1] // 2, x.shape[2] // 2))
            feats_half = self.bb(half)
            ups = [resize_bilinear(fh, f.shape[1:3]) for f, fh in zip(feats, feats_half, strict=True)]
            if self.cfg.mul_scl_ipt == "cat":
                feats = tuple(jnp.concatenate([f, u], axis=-1) for f, u in zip(feats, ups, strict=True))
            else:
                feats = tuple(f + u for f, u in zip(feats, ups, strict=True))
        x1, x2, x3, x4 = feats
        if self.cfg.cxt_num:
            ctx = [resize_bilinear(f, x4.shape[1:3]) for f in (x1, x2, x3)][-self.cfg.cxt_num:]
            x4 = jnp.concatenate([*ctx, x4], axis=-1)
        return x1, x2, x3, x4

    def squeeze(self, x4: jax.Array) -> jax.Array:
        for blk in self.squeeze_module:
            x4 = blk(x4)
        return x4

    def __call__(self, x: jax.Array):
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected NHWC images with 3 channels, got shape {x.shape}")
        h, w = x.shape[1], x.shape[2]
        if h % 32 or w % 32:
            raise ValueError(f"image size {h}x{w} is not a multiple of 32; resize or pad the input "
                             f"(e.g. to {-(-h // 32) * 32}x{-(-w // 32) * 32})")
        if self.dtype is not None:
            x = x.astype(self.dtype)
        x1, x2, x3, x4 = self.encode(x)
        training = not self.deterministic
        cls_logits = None
        if training and self.cls_head is not None:
            cls_logits = self.cls_head(jnp.mean(x4, axis=(1, 2)))
        x4 = self.squeeze(x4)
        grad_target = gradient_map(x) if training and self.cfg.out_ref else None
        preds, gdt_preds, gdt_labels = self.decoder(x, (x1, x2, x3, x4), grad_target)
        if not training:
            return preds[-1].astype(at_least_f32(preds[-1].dtype))
        return TrainOutputs(preds, gdt_preds, gdt_labels, cls_logits)


def abstract_model(cfg: BiRefNetConfig, dtype=None) -> BiRefNet:
    """The model with shapes only (no memory, no compute): for counting and for filling
    from a checkpoint."""
    return nnx.eval_shape(lambda: BiRefNet(cfg, rngs=nnx.Rngs(0), dtype=dtype))


def count_params(model: nnx.Module) -> int:
    """Learnable parameters (BatchNorm running statistics excluded)."""
    return sum(int(p.size) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


__all__ = ["BiRefNet", "TrainOutputs", "abstract_model", "count_params", "image_to_patches"]
