"""VGG16 (and VGG16-BN) from torchvision, cut into BiRefNet's four stages, NHWC.

The original slices torchvision's `features` Sequential after the 2nd, 3rd, 4th and 5th max
pool (strides 4, 8, 16, 32), and slicing keeps the parent's indices: with BatchNorm the
second stage's first conv is `bb.conv2.14`. Each stage here is a `Sequential` whose entries
sit at those same indices.
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from birefnet_jax.backbones.sequential import MaxPool2d, ReLU, Sequential, StagedBackbone
from birefnet_jax.backbones.spec import BackboneSpec
from birefnet_jax.nn.layers import BatchNorm2d, conv2d


@dataclasses.dataclass(frozen=True)
class VggConfig:
    """torchvision's VGG16 feature extractor (optionally with BatchNorm after every conv),
    cut after its 2nd..5th max pools as the original does."""

    batch_norm: bool = False
    kind: str = "vgg16"

    @property
    def channels(self) -> tuple[int, ...]:
        return (128, 256, 512, 512)


PRESETS = {"vgg16": VggConfig(batch_norm=False), "vgg16bn": VggConfig(batch_norm=True)}

# torchvision's configuration "D": conv widths, "M" for a 2x2 max pool.
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
STAGE_ENDS = (2, 3, 4, 5)  # a stage ends after this many max pools


def vgg_features(batch_norm: bool, *, rngs: nnx.Rngs, dtype=None) -> list:
    """The flat layer list of torchvision's `vgg16(_bn).features`, in its index order."""
    layers, in_ch = [], 3
    for v in VGG16_LAYOUT:
        if v == "M":
            layers.append(MaxPool2d(2, 2))
            continue
        layers.append(conv2d(in_ch, v, 3, padding=1, rngs=rngs, dtype=dtype))
        if batch_norm:
            layers.append(BatchNorm2d(v, dtype=dtype))
        layers.append(ReLU())
        in_ch = v
    return layers


class VGG16(StagedBackbone):
    """Returns the four stage outputs (128, 256, 512, 512 channels at strides 4..32)."""

    def __init__(self, cfg: VggConfig, *, rngs: nnx.Rngs, dtype=None):
        layers = vgg_features(cfg.batch_norm, rngs=rngs, dtype=dtype)
        pool_at = [i for i, layer in enumerate(layers) if isinstance(layer, MaxPool2d)]
        start = 0
        for stage, n_pools in enumerate(STAGE_ENDS, start=1):
            end = pool_at[n_pools - 1] + 1
            setattr(self, f"conv{stage}", Sequential([None] * start + layers[start:end]))
            start = end


def infer_config(sd) -> VggConfig:
    """The BN variant has a BatchNorm right after the first conv."""
    return VggConfig(batch_norm="bb.conv1.1.running_mean" in sd)


SPEC = BackboneSpec(kind="vgg16", config=VggConfig, module=VGG16, presets=PRESETS, key="bb.conv1.0.weight",
                    infer=infer_config, stagewise=True)
