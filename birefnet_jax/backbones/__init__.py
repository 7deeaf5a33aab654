"""The backbone table: every family registered once, from its own file.

Adding a backbone means one new file (config dataclass, presets, NNX module, `infer_config`
from state-dict keys, and a `SPEC`) and one entry in `TABLE` below. Order matters where one
family's identifying key could also occur in another (ResNet's stem sits where VGG's first conv
does, so ResNet is tried first).
"""

from __future__ import annotations

from flax import nnx

from birefnet_jax.backbones import dinov3, pvt_v2, resnet, swin, vgg
from birefnet_jax.backbones.spec import ArchitectureError, BackboneSpec

TABLE: dict[str, BackboneSpec] = {spec.kind: spec for spec in (swin.SPEC, pvt_v2.SPEC, resnet.SPEC, vgg.SPEC,
                                                                dinov3.SPEC)}

# Every named backbone config, as the original names them (`config.bb`).
BACKBONES = {name: cfg for spec in TABLE.values() for name, cfg in spec.presets.items()}
# Each family's config class by its name (`SwinConfig`, ...): what the package re-exports.
CONFIG_CLASSES: dict[str, type] = {spec.config.__name__: spec.config for spec in TABLE.values()}


def spec_of(kind: str) -> BackboneSpec:
    try:
        return TABLE[kind]
    except KeyError:
        raise ValueError(f"unknown backbone kind {kind!r}; known: {sorted(TABLE)}") from None


def build_backbone(cfg, *, rngs: nnx.Rngs, dtype=None) -> nnx.Module:
    return spec_of(cfg.kind).module(cfg, rngs=rngs, dtype=dtype)


def detect(state_dict) -> BackboneSpec:
    """The family whose identifying key the state dict has."""
    for spec in TABLE.values():
        if spec.key in state_dict:
            return spec
    sample = ", ".join(list(state_dict)[:5])
    raise ArchitectureError(
        f"not a BiRefNet state dict of a known backbone ({', '.join(TABLE)}): none of their keys "
        f"({', '.join(s.key for s in TABLE.values())}) is present; first keys: {sample}")


__all__ = [
    "BACKBONES", "CONFIG_CLASSES", "TABLE", "ArchitectureError", "BackboneSpec", "build_backbone", "detect", "spec_of",
]
