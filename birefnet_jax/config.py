"""Architecture configuration: every switch of the original BiRefNet config, as frozen
dataclasses (hashable, so a config can be a static argument under `jax.jit`)."""

from __future__ import annotations

import dataclasses
from typing import Any

from birefnet_jax.backbones import BACKBONES, TABLE, spec_of

MUL_SCL_IPT = ("", "add", "cat")
DEC_ATT = ("", "ASPP", "ASPPDeformable")
DEC_BLK = ("BasicDecBlk", "ResBlk")
SQUEEZE_KINDS = ("BasicDecBlk", "ResBlk", "ASPP", "ASPPDeformable")
# Backbone kinds whose four outputs share one stride (plain ViTs, here DINOv3). The original puts its
# pyramid neck behind them (each level resized to strides 4..32, then a 1x1 conv to NECK_CHANNELS) and
# freezes them in training by default (its `freeze_bb`).
SINGLE_STRIDE_KINDS = ("dinov3",)
# The decoder widths behind the pyramid neck, deep to shallow: Swin-L's, as the original hard-codes them
# (doubled with the `cat` multi-scale input).
NECK_CHANNELS = (1536, 768, 384, 192)


# The backbone configs live beside their modules (one file per family, see `birefnet_jax.backbones`).
BackboneConfig = Any  # one of the config classes in `birefnet_jax.backbones.TABLE`
BACKBONE_KINDS: dict[str, type] = {kind: spec.config for kind, spec in TABLE.items()}


@dataclasses.dataclass(frozen=True)
class BiRefNetConfig:
    """The model switches of the original `config.py`, with the released checkpoints' defaults.

    `batch_norm` is what the original derives from `batch_size > 1`: with a batch of one it
    builds Identity wherever the decoder would have BatchNorm.
    """

    # Encoder of the localization module: which backbone, and its size (default Swin-L, the original's swin_v1_l).
    backbone: BackboneConfig = dataclasses.field(default_factory=lambda: BACKBONES["swin_v1_l"])
    # Multi-scale input: the image at half size goes through the backbone too; 'cat' concatenates, 'add' sums, '' off.
    mul_scl_ipt: str = "cat"
    # Context: how many shallower encoder levels (0-3) are resized onto the deepest one and concatenated to it.
    cxt_num: int = 3
    # Squeeze module on the deepest, context-enriched features: '<block>_x<n>' stacks n such blocks; '' none.
    squeeze_block: str = "BasicDecBlk_x1"
    # Block of each decoder stage: 'BasicDecBlk' (conv, attention, conv) or 'ResBlk' (the same plus a 1x1 skip).
    dec_blk: str = "BasicDecBlk"
    # Attention inside every decoder / squeeze block: 'ASPP' (dilated convs), 'ASPPDeformable' (deformable), '' none.
    dec_att: str = "ASPPDeformable"
    # Inward bilateral reference (source): the input image itself is fed into every decoder stage via small convs.
    dec_ipt: bool = True
    # How that image is fed: True cuts it into stage-sized patches stacked on channels (lossless), False resizes it.
    dec_ipt_split: bool = True
    # Multi-stage supervision: decoder stages 4..2 also predict a coarse mask, for extra losses (training only).
    ms_supervision: bool = True
    # Outward bilateral reference (target): the object's gradient maps supervise an attention on decoder stages 4..2.
    out_ref: bool = True
    # BatchNorm in decoder / ASPP blocks (the original's batch_size > 1); False builds identities, as with batch 1.
    batch_norm: bool = True
    # Width inside each decoder block: 'fixed' is 64 channels, 'adap' a quarter of the block's input channels.
    dec_channels_inter: str = "fixed"
    # Classes of the auxiliary classification head on the deepest features (training only); 0: no head.
    num_classes: int = 0
    # Dropout rate at the end of each ASPP attention, active in training only (0.5, fixed in the original).
    dropout: float = 0.5
    # (height, width) the checkpoint was trained at; inputs are resized to it (the original's size is (w, h)).
    resolution: tuple[int, int] = (1024, 1024)
    # (smallest, largest) side of dynamic-size training, or None; if set, predict keeps sizes up to largest^2 pixels.
    dynamic_size: tuple[int, int] | None = None
    # Training only: no gradient and no optimiser state for the backbone; None: the original's rule (frozen for DINOv3).
    freeze_backbone: bool | None = None

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
        if self.mul_scl_ipt == "add" and spec_of(self.backbone.kind).stagewise:
            problems.append(f"mul_scl_ipt='add' with a {self.backbone.kind} backbone: the original cannot run it "
                            "(its 'add' branch calls the backbone as one module, which VGG/ResNet are not); "
                            "use 'cat' or ''")
        res = tuple(self.resolution)
        if len(res) != 2 or any(not isinstance(v, int) or v < 32 or v % 32 for v in res):
            problems.append(f"resolution={self.resolution!r}: expected (height, width), each a positive multiple "
                            "of 32 (the backbone downsamples 32x), e.g. (1024, 1024)")
        if self.dynamic_size is not None:
            dyn = tuple(self.dynamic_size)
            if len(dyn) != 2 or any(not isinstance(v, int) or v < 32 or v % 32 for v in dyn) or dyn[0] > dyn[1]:
                problems.append(f"dynamic_size={self.dynamic_size!r}: expected None or (smallest, largest) side, "
                                "multiples of 32, e.g. (256, 2304)")
        if self.freeze_backbone not in (None, True, False):
            problems.append(f"freeze_backbone={self.freeze_backbone!r}: expected None, True or False")
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
    def use_pyramid_neck(self) -> bool:
        """Whether the decoder starts with the pyramid neck: for backbones whose levels share one stride."""
        return self.backbone.kind in SINGLE_STRIDE_KINDS

    @property
    def decoder_channels(self) -> tuple[int, ...]:
        """Widths the decoder works on, deep to shallow: the pyramid neck's outputs (Swin-L's widths,
        doubled by `cat`) where there is one, else `lateral_channels`."""
        if not self.use_pyramid_neck:
            return self.lateral_channels
        mult = 2 if self.mul_scl_ipt == "cat" else 1
        return tuple(c * mult for c in NECK_CHANNELS)

    @property
    def backbone_frozen(self) -> bool:
        """`freeze_backbone` resolved: None follows the original (frozen for single-stride backbones)."""
        if self.freeze_backbone is None:
            return self.backbone.kind in SINGLE_STRIDE_KINDS
        return bool(self.freeze_backbone)

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
        bb_cls = spec_of(bb["kind"]).config
        bb = bb_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in bb.items()})
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(backbone=bb, **d)


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


__all__ = [
    "BACKBONES",
    "BACKBONE_KINDS",
    "NECK_CHANNELS",
    "SINGLE_STRIDE_KINDS",
    "BackboneConfig",
    "BiRefNetConfig",
    "backbone_name",
]
