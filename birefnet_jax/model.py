"""BiRefNet: localization module (backbone encoder, multi-scale input, context fusion,
squeeze) and reconstruction module (decoder with bilateral reference), in Flax NNX.

Attribute names follow the original's module tree, so that the original state-dict keys
map onto this model with a small rename table (`birefnet_jax.convert.keymap`).
In eval mode (`model.eval()`, the default) the model returns the final logits, (B, H, W, 1).
In train mode it returns `TrainOutputs` with everything the original's objective needs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from birefnet_jax.backbones import build_backbone
from birefnet_jax.config import BiRefNetConfig
from birefnet_jax.io.images import IMAGENET_MEAN, IMAGENET_STD
from birefnet_jax.modules.blocks import build_block
from birefnet_jax.modules.decoder import Decoder
from birefnet_jax.nn.laplacian import gradient_map
from birefnet_jax.nn.layers import at_least_f32, resize_bilinear
from birefnet_jax.nn.state import materialize_rng_state


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


class BiRefNet(nnx.Module):
    """The full model. Input: (B, H, W, 3) images normalised with the ImageNet mean and std,
    H and W multiples of 32."""

    def __init__(self, cfg: BiRefNetConfig, *, rngs: nnx.Rngs, dtype=None):
        self.cfg = cfg
        self.dtype = dtype
        self.deterministic = True
        self.capture_intermediates = False  # sow backbone, encoder and squeeze outputs (for parity checks)
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

    def backbone_levels(self, x: jax.Array) -> tuple[jax.Array, ...]:
        """The backbone's four levels after the multi-scale input (`cat` / `add` of a half-size pass).
        A frozen backbone (`cfg.backbone_frozen`) in training passes no gradient back, so its backward
        pass is never built and none of its activations are kept for one."""
        frozen = self.cfg.backbone_frozen and not self.deterministic

        def run(image):
            with jax.named_scope("bb"):  # names the backbone's operations in programs and profiles
                out = self.bb(image)
            return tuple(jax.lax.stop_gradient(f) for f in out) if frozen else tuple(out)

        feats = run(x)
        self._sow("backbone", feats)
        if self.cfg.mul_scl_ipt:
            half = resize_bilinear(x, (x.shape[1] // 2, x.shape[2] // 2))
            feats_half = run(half)
            ups = [resize_bilinear(fh, f.shape[1:3]) for f, fh in zip(feats, feats_half, strict=True)]
            if self.cfg.mul_scl_ipt == "cat":
                feats = tuple(jnp.concatenate([f, u], axis=-1) for f, u in zip(feats, ups, strict=True))
            else:
                feats = tuple(f + u for f, u in zip(feats, ups, strict=True))
        return feats

    def _sow(self, name: str, values) -> None:
        if self.capture_intermediates:
            for i, v in enumerate(values):
                self.sow(nnx.Intermediate, f"{name}{i + 1}" if len(values) > 1 else name, v)

    def add_context(self, feats: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        """The last `cxt_num` shallower levels resized onto the deepest one and concatenated to it."""
        x1, x2, x3, x4 = feats
        if self.cfg.cxt_num:
            ctx = [resize_bilinear(f, x4.shape[1:3]) for f in (x1, x2, x3)][-self.cfg.cxt_num:]
            x4 = jnp.concatenate([*ctx, x4], axis=-1)
        return x1, x2, x3, x4

    def encode(self, x: jax.Array) -> tuple[jax.Array, ...]:
        """Backbone features after multi-scale fusion and context fusion (levels shallow to deep)."""
        return self.add_context(self.backbone_levels(x))

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
        feats = self.backbone_levels(x)
        training = not self.deterministic
        cls_logits = None
        if training and self.cls_head is not None:  # on the deepest level before the context joins it
            cls_logits = self.cls_head(jnp.mean(feats[3], axis=(1, 2)))
        x1, x2, x3, x4 = self.add_context(feats)
        self._sow("encoder", (x1, x2, x3, x4))
        x4 = self.squeeze(x4)
        self._sow("squeeze", (x4,))
        grad_target = gradient_map(x) if training and self.cfg.out_ref else None
        preds, gdt_preds, gdt_labels = self.decoder(x, (x1, x2, x3, x4), grad_target)
        if not training:
            return preds[-1].astype(at_least_f32(preds[-1].dtype))
        return TrainOutputs(preds, gdt_preds, gdt_labels, cls_logits)


def set_remat(model: BiRefNet, enabled: bool = True) -> BiRefNet:
    """Rematerialisation for training at high resolution: every backbone block (Swin, PVT v2,
    DINOv3), the Swin embedding, merging and output norms, and the conv-BN stages and ASPP
    branches of the squeeze and decoder blocks keep only their inputs for the backward pass and
    are recomputed there, one at a time (`birefnet_jax.nn.remat`): about one more forward pass
    of compute for most of the activations' memory. Same results, same parameters."""
    enabled = bool(enabled)
    for _, module in nnx.iter_modules(model):
        if hasattr(module, "remat"):
            module.remat = enabled
    return model


def abstract_model(cfg: BiRefNetConfig, dtype=None) -> BiRefNet:
    """The model with shapes only (no memory, no compute): for counting and for filling
    from a checkpoint."""
    return nnx.eval_shape(lambda: BiRefNet(cfg, rngs=nnx.Rngs(0), dtype=dtype))


def random_model(cfg: BiRefNetConfig, dtype=None, seed: int = 0) -> BiRefNet:
    """The model with random weights drawn by NumPy into the abstract model: for benchmarks
    and smoke tests, in seconds where the modules' own initialisers need a long jitted
    initialisation on a CPU. Kernels ~ N(0, 1/fan_in), norms at identity, Swin's position
    biases ~ N(0, 0.02), and the deformable convolutions' offset and modulator convs at zero
    as the original initialises them (so sampling starts on the regular grid)."""
    model = abstract_model(cfg, dtype=dtype)
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat))):
        shape, kind = var.get_value().shape, var.get_value().dtype
        name, where = str(path[-1]), "/".join(map(str, path))
        if name in ("scale", "var"):
            value = np.ones(shape, np.float32)
        elif name == "kernel" and "offset_conv" not in where and "modulator_conv" not in where:
            value = rng.standard_normal(shape, np.float32) / np.sqrt(max(1, int(np.prod(shape[:-1]))))
        elif name == "relative_position_bias_table":
            value = rng.standard_normal(shape, np.float32) * 0.02
        elif name == "num_batches_tracked" or not np.issubdtype(kind, np.floating):
            value = np.zeros(shape, kind)
        else:  # biases, running means, offset and modulator convs
            value = np.zeros(shape, np.float32)
        var.set_value(jnp.asarray(value, kind))
    return materialize_rng_state(model, seed)


def eval_forward(graphdef, state, images, *, uint8: bool = False, probabilities: bool = False,
                 layout: str = "NHWC"):
    """The one eval-mode forward, for prediction, export and validation alike: `nnx.merge(graphdef,
    state)` in eval mode on images (B, H, W, 3), NCHW with `layout='NCHW'`; `uint8` images are
    normalised inside the program; returns logits (or `probabilities`) (B, H, W, 1). Pure in its
    arguments, so it can be jitted or exported; the caller's module is never touched."""
    if layout == "NCHW":
        images = jnp.transpose(images, (0, 2, 3, 1))
    if uint8:
        images = (images.astype(jnp.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    model = nnx.merge(graphdef, state)
    model.eval()
    out = model(images)
    if probabilities:
        out = jax.nn.sigmoid(out)
    return jnp.transpose(out, (0, 3, 1, 2)) if layout == "NCHW" else out


__all__ = ["BiRefNet", "TrainOutputs", "abstract_model", "eval_forward", "random_model", "set_remat"]
