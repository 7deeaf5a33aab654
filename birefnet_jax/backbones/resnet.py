"""Bottleneck ResNet (ResNet-50) from torchvision, cut into BiRefNet's four stages, NHWC.

The original's first stage is stem + `layer1` as one Sequential (`bb.conv1.0` conv,
`.1` BatchNorm, `.2` ReLU, `.3` max pool, `.4` the bottlenecks); stages 2..4 are `layer2..4`.
torchvision puts the stride on the 3x3 conv (ResNet v1.5), which changes the numbers.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from birefnet_jax.backbones.sequential import MaxPool2d, ReLU, Sequential, StagedBackbone
from birefnet_jax.backbones.spec import BackboneSpec, count_indices
from birefnet_jax.nn.layers import BatchNorm2d, conv2d


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    """torchvision's bottleneck ResNet (v1.5: stride on the 3x3 conv); stage 1 includes the stem.
    `depths` are the bottleneck counts per stage; the original offers only ResNet-50's."""

    depths: tuple[int, ...] = (3, 4, 6, 3)
    kind: str = "resnet"

    @property
    def channels(self) -> tuple[int, ...]:
        return (256, 512, 1024, 2048)


PRESETS = {"resnet50": ResNetConfig(depths=(3, 4, 6, 3))}

EXPANSION = 4
STAGE_WIDTHS = (64, 128, 256, 512)  # bottleneck widths; outputs are 4x these


class Bottleneck(nnx.Module):
    """1x1 reduce -> 3x3 (strided) -> 1x1 expand, plus a projected shortcut where the shape changes."""

    def __init__(self, in_ch: int, width: int, stride: int, *, rngs: nnx.Rngs, dtype=None):
        out_ch = width * EXPANSION
        self.conv1 = conv2d(in_ch, width, 1, bias=False, rngs=rngs, dtype=dtype)
        self.bn1 = BatchNorm2d(width, dtype=dtype)
        self.conv2 = conv2d(width, width, 3, stride=stride, padding=1, bias=False, rngs=rngs, dtype=dtype)
        self.bn2 = BatchNorm2d(width, dtype=dtype)
        self.conv3 = conv2d(width, out_ch, 1, bias=False, rngs=rngs, dtype=dtype)
        self.bn3 = BatchNorm2d(out_ch, dtype=dtype)
        if stride != 1 or in_ch != out_ch:
            self.downsample = Sequential([
                conv2d(in_ch, out_ch, 1, stride=stride, bias=False, rngs=rngs, dtype=dtype),
                BatchNorm2d(out_ch, dtype=dtype),
            ])
        else:
            self.downsample = None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = jax.nn.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        shortcut = x if self.downsample is None else self.downsample(x)
        return jax.nn.relu(y + shortcut)


def _stage(in_ch: int, width: int, depth: int, stride: int, *, rngs, dtype) -> Sequential:
    blocks = [Bottleneck(in_ch, width, stride, rngs=rngs, dtype=dtype)]
    blocks += [Bottleneck(width * EXPANSION, width, 1, rngs=rngs, dtype=dtype) for _ in range(depth - 1)]
    return Sequential(blocks)


class ResNet(StagedBackbone):
    """Returns the four stage outputs (256, 512, 1024, 2048 channels at strides 4..32)."""

    def __init__(self, cfg: ResNetConfig, *, rngs: nnx.Rngs, dtype=None):
        if len(cfg.depths) != 4 or min(cfg.depths) < 1:
            raise ValueError(f"ResNet needs four stages of at least one block, got depths={cfg.depths}")
        kw = dict(rngs=rngs, dtype=dtype)
        self.conv1 = Sequential([
            conv2d(3, 64, 7, stride=2, padding=3, bias=False, **kw),
            BatchNorm2d(64, dtype=dtype),
            ReLU(),
            MaxPool2d(3, 2, 1),
            _stage(64, STAGE_WIDTHS[0], cfg.depths[0], 1, **kw),
        ])
        in_ch = STAGE_WIDTHS[0] * EXPANSION
        for i in (1, 2, 3):
            setattr(self, f"conv{i + 1}", _stage(in_ch, STAGE_WIDTHS[i], cfg.depths[i], 2, **kw))
            in_ch = STAGE_WIDTHS[i] * EXPANSION


def infer_config(sd) -> ResNetConfig:
    """Stage 1 nests its bottlenecks at index 4 (after the stem); stages 2..4 are the layers."""
    depths = (count_indices(sd, r"bb\.conv1\.4\.(\d+)\."),
              *(count_indices(sd, rf"bb\.conv{i}\.(\d+)\.") for i in (2, 3, 4)))
    return ResNetConfig(depths=depths)


SPEC = BackboneSpec(kind="resnet", config=ResNetConfig, module=ResNet, presets=PRESETS,
                    key="bb.conv1.4.0.conv1.weight", infer=infer_config, stagewise=True)
