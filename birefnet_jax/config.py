"""Architecture configuration: every switch of the original BiRefNet config, as frozen
dataclasses (hashable, so a config can be a static argument under `jax.jit`)."""

from __future__ import annotations

import dataclasses
from typing import Any

MUL_SCL_IPT = ("", "add", "cat")
DEC_ATT = ("", "ASPP", "ASPPDeformable")
DEC_BLK = ("BasicDecBlk", "ResBlk")
SQUEEZE_KINDS = ("BasicDecBlk", "ResBlk", "ASPP", "ASPPDeformable")


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


@dataclasses.dataclass(frozen=True)
class VggConfig:
    """torchvision's VGG16 feature extractor (optionally with BatchNorm after every conv),
    cut after its 2nd..5th max pools as the original does."""

    batch_norm: bool = False
    kind: str = "vgg16"

    @property
    def channels(self) -> tuple[int, ...]:
        return (128, 256, 512, 512)


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    """torchvision's bottleneck ResNet (v1.5: stride on the 3x3 conv); stage 1 includes the stem.
    `depths` are the bottleneck counts per stage; the original offers only ResNet-50's."""

    depths: tuple[int, ...] = (3, 4, 6, 3)
    kind: str = "resnet"

    @property
    def channels(self) -> tuple[int, ...]:
        return (256, 512, 1024, 2048)


BackboneConfig = SwinConfig | PvtV2Config | VggConfig | ResNetConfig
BACKBONE_KINDS = {"swin_v1": SwinConfig, "pvt_v2": PvtV2Config, "vgg16": VggConfig, "resnet": ResNetConfig}
# Backbones the original runs stage by stage (`bb.conv1..conv4`): it has no single call for them,
# so its `add` multi-scale branch (which calls the backbone as a whole) fails.
STAGEWISE_KINDS = ("vgg16", "resnet")


@dataclasses.dataclass(frozen=True)
class BiRefNetConfig:
    """The model switches of the original `config.py`, with the released checkpoints' defaults.

    `batch_norm` is what the original derives from `batch_size > 1`: with a batch of one it
    builds Identity wherever the decoder would have BatchNorm.
    """

    backbone: BackboneConfig = dataclasses.field(default_factory=lambda: SwinConfig(
        embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12))
    mul_scl_ipt: str = "cat"
    cxt_num: int = 3
    squeeze_block: str = "BasicDecBlk_x1"
    dec_blk: str = "BasicDecBlk"
    dec_att: str = "ASPPDeformable"
    dec_ipt: bool = True
    dec_ipt_split: bool = True
    ms_supervision: bool = True
    out_ref: bool = True
    batch_norm: bool = True
    dec_channels_inter: str = "fixed"
    num_classes: int = 0  # > 0: the auxiliary classification head (`auxiliary_classification`)
    dropout: float = 0.5  # inside ASPP, active in training only
    resolution: tuple[int, int] = (1024, 1024)  # (height, width) the checkpoint was trained at

    def __post_init__(self):
        problems = []
        if self.mul_scl_ipt not in MUL_SCL_IPT:
            problems.append(f"mul_scl_ipt={self.mul_scl_ipt!r} not in {MUL_SCL_IPT}")
        if self.dec_att not in DEC_ATT:
            problems.append(f"dec_att={self.dec_att!r} not in {DEC_ATT}")
        if self.dec_blk not in DEC_BLK:
            problems.append(f"dec_blk={self.dec_blk!r} not in {DEC_BLK}")
        if not 0 <= self.cxt_num <= 3:
            problems.append(f"cxt_num={self.cxt_num} not in 0..3")
        if self.squeeze_block:
            kind, _, count = self.squeeze_block.partition("_x")
            if kind not in SQUEEZE_KINDS or not count.isdigit() or int(count) < 1:
                kinds = "|".join(SQUEEZE_KINDS)
                problems.append(f"squeeze_block={self.squeeze_block!r}: expected '' or '<{kinds}>_x<n>'")
        elif self.cxt_num:
            problems.append("cxt_num > 0 needs a squeeze block (the original breaks without one)")
        if not self.dec_ipt:
            problems.append("dec_ipt=False is not buildable in the original (its decoder widths need it)")
        if self.out_ref and not self.ms_supervision:
            problems.append("out_ref needs ms_supervision (the original ties them)")
        if self.mul_scl_ipt == "add" and self.backbone.kind in STAGEWISE_KINDS:
            problems.append(f"mul_scl_ipt='add' with a {self.backbone.kind} backbone: the original cannot run it "
                            "(its 'add' branch calls the backbone as one module, which VGG/ResNet are not); "
                            "use 'cat' or ''")
        if self.dec_channels_inter not in ("fixed", "adap"):
            problems.append(f"dec_channels_inter={self.dec_channels_inter!r} not in ('fixed', 'adap')")
        if problems:
            raise ValueError("invalid BiRefNet config: " + "; ".join(problems))

    # Derived widths, as the original computes them.
    @property
    def lateral_channels(self) -> tuple[int, ...]:
        """Encoder widths deep to shallow, doubled by the `cat` multi-scale input."""
        mult = 2 if self.mul_scl_ipt == "cat" else 1
        return tuple(c * mult for c in reversed(self.backbone.channels))

    @property
    def cxt(self) -> tuple[int, ...]:
        """Widths of the shallower levels concatenated into the deepest one."""
        if not self.cxt_num:
            return ()
        return tuple(self.lateral_channels[1:][::-1][-self.cxt_num:])

    @property
    def squeeze(self) -> tuple[str, int]:
        kind, _, count = self.squeeze_block.partition("_x")
        return kind, int(count or 0)

    def replace(self, **changes) -> BiRefNetConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["backbone"] = dataclasses.asdict(self.backbone)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BiRefNetConfig:
        d = dict(d)
        bb = dict(d.pop("backbone"))
        bb_cls = BACKBONE_KINDS[bb["kind"]]
        bb = bb_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in bb.items()})
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(backbone=bb, **d)


# Backbone presets, named as in the original (`config.bb`).
BACKBONES: dict[str, BackboneConfig] = {
    "swin_v1_t": SwinConfig(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7),
    "swin_v1_s": SwinConfig(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=7),
    "swin_v1_b": SwinConfig(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=12),
    "swin_v1_l": SwinConfig(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12),
    "pvt_v2_b0": PvtV2Config(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2)),
    "pvt_v2_b1": PvtV2Config(embed_dims=(64, 128, 320, 512), depths=(2, 2, 2, 2)),
    "pvt_v2_b2": PvtV2Config(embed_dims=(64, 128, 320, 512), depths=(3, 4, 6, 3)),
    "pvt_v2_b3": PvtV2Config(embed_dims=(64, 128, 320, 512), depths=(3, 4, 18, 3)),
    "pvt_v2_b4": PvtV2Config(embed_dims=(64, 128, 320, 512), depths=(3, 8, 27, 3)),
    "pvt_v2_b5": PvtV2Config(embed_dims=(64, 128, 320, 512), depths=(3, 6, 40, 3), mlp_ratios=(4, 4, 4, 4)),
    "vgg16": VggConfig(batch_norm=False),
    "vgg16bn": VggConfig(batch_norm=True),
    "resnet50": ResNetConfig(depths=(3, 4, 6, 3)),
}


def backbone_name(bb: BackboneConfig) -> str | None:
    """The preset name of a backbone config, ignoring the drop-path rate; None if custom."""
    for name, preset in BACKBONES.items():
        if type(preset) is not type(bb):
            continue
        if hasattr(bb, "drop_path_rate"):
            preset = dataclasses.replace(preset, drop_path_rate=bb.drop_path_rate)
        if preset == bb:
            return name
    return None


def _released(bb: str, resolution=(1024, 1024)) -> BiRefNetConfig:
    return BiRefNetConfig(backbone=BACKBONES[bb], resolution=resolution)


# The released checkpoints (all with the default decoder) and the resolution each was trained at.
PRESETS: dict[str, BiRefNetConfig] = {
    "BiRefNet": _released("swin_v1_l"),
    "BiRefNet-general": _released("swin_v1_l"),
    "BiRefNet-DIS5K": _released("swin_v1_l"),
    "BiRefNet-COD": _released("swin_v1_l"),
    "BiRefNet-HRSOD": _released("swin_v1_l"),
    "BiRefNet-DIS5K-TR_TEs": _released("swin_v1_l"),
    "BiRefNet-massive": _released("swin_v1_l"),
    "BiRefNet-portrait": _released("swin_v1_l"),
    "BiRefNet-matting": _released("swin_v1_l"),
    "BiRefNet_dynamic": _released("swin_v1_l"),
    "BiRefNet_dynamic-matting": _released("swin_v1_l"),
    "BiRefNet_512x512": _released("swin_v1_l", (512, 512)),
    "BiRefNet_HR": _released("swin_v1_l", (2048, 2048)),
    "BiRefNet_HR-matting": _released("swin_v1_l", (2048, 2048)),
    "BiRefNet_lite": _released("swin_v1_t"),
    "BiRefNet_lite-matting": _released("swin_v1_t"),
    "BiRefNet_lite-2K": _released("swin_v1_t", (1440, 2560)),
    "BiRefNet-pvt_v2_b2": _released("pvt_v2_b2"),
}
# Spellings used on the hub.
PRESETS["BiRefNet-HR"] = PRESETS["BiRefNet_HR"]
PRESETS["BiRefNet-HR-matting"] = PRESETS["BiRefNet_HR-matting"]


def get_preset(name: str) -> BiRefNetConfig:
    if name in PRESETS:
        return PRESETS[name]
    if name in BACKBONES:
        return _released(name)
    raise KeyError(f"unknown preset {name!r}; known: {sorted(PRESETS)} or a backbone name {sorted(BACKBONES)}")
