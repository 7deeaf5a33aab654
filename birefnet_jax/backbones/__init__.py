"""Backbone registry: a backbone config kind -> the module that builds it."""

from __future__ import annotations

from flax import nnx

from birefnet_jax.backbones.pvt_v2 import PyramidVisionTransformerV2
from birefnet_jax.backbones.resnet import ResNet
from birefnet_jax.backbones.swin import SwinTransformer
from birefnet_jax.backbones.vgg import VGG16
from birefnet_jax.config import BackboneConfig

REGISTRY = {"swin_v1": SwinTransformer, "pvt_v2": PyramidVisionTransformerV2, "vgg16": VGG16, "resnet": ResNet}


def build_backbone(cfg: BackboneConfig, *, rngs: nnx.Rngs, dtype=None) -> nnx.Module:
    try:
        cls = REGISTRY[cfg.kind]
    except KeyError:
        raise ValueError(f"unknown backbone kind {cfg.kind!r}; known: {sorted(REGISTRY)}") from None
    return cls(cfg, rngs=rngs, dtype=dtype)
