"""Reconstruction module: the decoder with bilateral reference.

Each decoder level sees the image itself as its source reference (split into a grid of patches
stacked along channels, so a coarse level still sees full-resolution pixels), and, with `out_ref`,
a gradient-attention gate trained against the image's gradient map (the target reference).
"""

from __future__ import annotations

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from birefnet_jax.config import BiRefNetConfig
from birefnet_jax.modules.blocks import BasicLatBlk, SimpleConvs, build_block
from birefnet_jax.nn.layers import apply_opt, conv2d, maybe_bn, pointwise, resize_bilinear


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
        lat = list(cfg.lateral_channels)  # what the encoder (and the squeeze module) hand over
        ch = list(cfg.decoder_channels)  # what the decoder blocks work on: the neck's widths where there is one
        if cfg.use_pyramid_neck:
            for level, c_in, c_out in zip((4, 3, 2, 1), lat, ch, strict=True):
                setattr(self, f"pyramid_neck_x{level}", BasicLatBlk(c_in, c_out, rngs=rngs, dtype=dtype))
        out_ch = ch[1:] + [ch[-1] // 2]
        ipt_out = [c // 8 for c in lat]
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

    def _reference(self, image, level, size):
        """The source reference for a level of size `size`: the image (split into a grid of
        patches stacked on channels when `dec_ipt_split`) resized and encoded by `ipt_blk<level>`."""
        h, w = size
        ref = image_to_patches(image, image.shape[1] // h, image.shape[2] // w) if self.cfg.dec_ipt_split else image
        return getattr(self, f"ipt_blk{level}")(resize_bilinear(ref, (h, w)))

    def _with_patches(self, feat, image, level):
        """`feat` with its level's source reference concatenated on channels."""
        return jnp.concatenate([feat, self._reference(image, level, feat.shape[1:3])], axis=-1)

    def _output(self, p, image):
        """`conv_out1` over [p resized to the image's size, the level-1 source reference]. The
        1x1 convolution and the bilinear resize are both linear, so p's share of the convolution
        runs before the resize: one channel goes up to full resolution instead of p's width (96 for
        Swin-T, 768 for Swin-L), which was most of a training step's full-resolution memory.
        The same map up to float rounding."""
        conv, c = self.conv_out1, p.shape[-1]
        kernel = conv.kernel[...]
        dtype = conv.dtype or jnp.result_type(p.dtype, kernel.dtype)
        ref = self._reference(image, 1, image.shape[1:3])
        out = (resize_bilinear(pointwise(p, kernel[:, :, :c], dtype), image.shape[1:3])
               + pointwise(ref, kernel[:, :, c:], dtype))
        return out if conv.bias is None else out + conv.bias[...].astype(dtype)

    def pyramid_neck(self, image, feats):
        """Levels of one stride brought onto strides 4, 8, 16, 32 of the image (bilinear,
        align_corners) and to the decoder's widths (1x1 convs)."""
        h, w = image.shape[1], image.shape[2]
        out = []
        for k, (level, f) in enumerate(zip((1, 2, 3, 4), feats, strict=True)):
            f = resize_bilinear(f, (h // 2 ** (k + 2), w // 2 ** (k + 2)))
            f = getattr(self, f"pyramid_neck_x{level}")(f)
            if self.capture_intermediates:
                self.sow(nnx.Intermediate, f"pyramid_neck_x{level}_out", f)
            out.append(f)
        return tuple(out)

    def _block(self, level, p):
        p = getattr(self, f"decoder_block{level}")(p)  # rematerialised inside, with model.set_remat
        if self.capture_intermediates:
            self.sow(nnx.Intermediate, f"decoder_block{level}_out", p)
        return p

    def __call__(self, image, feats, grad_target=None):
        if self.cfg.use_pyramid_neck:
            feats = self.pyramid_neck(image, feats)
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
        final = self._output(self._block(1, p), image)
        return side + [final], gdt_preds, gdt_labels
