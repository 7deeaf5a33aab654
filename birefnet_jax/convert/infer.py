"""Reading the architecture off a state dict's keys and shapes.

Everything that changes the parameters is inferable. Two switches are not, because they
leave the weights identical: `mul_scl_ipt='add'` versus `''` (both keep the backbone
widths) and PVT v2 head counts outside the presets. They default to '' and the preset
heads and can be overridden. (VGG/ResNet checkpoints can only be '': see BiRefNetConfig.)
"""

from __future__ import annotations

import numpy as np

from birefnet_jax.backbones import detect
from birefnet_jax.backbones.spec import ArchitectureError, count_indices, shape_of
from birefnet_jax.config import NECK_CHANNELS, SINGLE_STRIDE_KINDS, BiRefNetConfig


def _block_kind(sd, prefix: str) -> str:
    if f"{prefix}.conv_in.weight" in sd:
        return "ResBlk" if f"{prefix}.conv_resi.weight" in sd else "BasicDecBlk"
    if f"{prefix}.aspp1.atrous_conv.offset_conv.weight" in sd:
        return "ASPPDeformable"
    if f"{prefix}.aspp1.atrous_conv.weight" in sd:
        return "ASPP"
    expected = (f"{prefix}.conv_in.weight", f"{prefix}.aspp1.atrous_conv.weight",
                f"{prefix}.aspp1.atrous_conv.offset_conv.weight")
    raise ArchitectureError(f"cannot tell the kind of block at {prefix!r}: the state dict has none of "
                            f"{', '.join(expected)}; the checkpoint is incomplete or not a BiRefNet")


def _attention_kind(sd, prefix: str) -> str:
    if f"{prefix}.dec_att.aspp1.atrous_conv.offset_conv.weight" in sd:
        return "ASPPDeformable"
    if f"{prefix}.dec_att.aspp1.atrous_conv.weight" in sd:
        return "ASPP"
    return ""


# Backbone fields the weights cannot tell, by backbone kind: head counts (PVT v2, DINOv3 of a size
# that is no preset), and which blocks a DINOv3 taps and how deep the whole model was.
UNTOLD_BACKBONE_FIELDS = {"pvt_v2": ("num_heads",), "dinov3": ("num_heads", "out_indices", "depth")}


def infer_config(state_dict: dict[str, np.ndarray], *, mul_scl_ipt: str | None = None,
                 num_heads=None, out_indices=None, depth=None, **overrides) -> BiRefNetConfig:
    """A `BiRefNetConfig` that builds exactly the parameters of `state_dict` (prefixes stripped).

    Keyword overrides replace inferred fields (e.g. `resolution=(2048, 2048)`); `mul_scl_ipt`
    picks 'add' over '' when the widths say the input is not concatenated. `num_heads`,
    `out_indices` and `depth` tell the backbone what its weights cannot (`UNTOLD_BACKBONE_FIELDS`).
    """
    sd = state_dict
    spec = detect(sd)
    told = {k: v for k, v in dict(num_heads=num_heads, out_indices=out_indices, depth=depth).items()
            if v is not None}
    allowed = UNTOLD_BACKBONE_FIELDS.get(spec.kind, ())
    if any(k not in allowed for k in told):
        raise ArchitectureError(
            f"{', '.join(told)} only applies to PVT v2 (num_heads, --num-heads) and DINOv3 (num_heads, out_indices, "
            f"depth) backbones; this checkpoint has a {spec.kind} backbone, whose "
            f"{'head counts' if spec.kind != 'dinov3' else 'remaining fields'} the weights tell")
    backbone = spec.infer(sd, **told)
    if "decoder.lateral_block4.conv.weight" not in sd:
        raise ArchitectureError("not a BiRefNet state dict: no 'decoder.lateral_block4' keys")

    bb_ch = list(reversed(backbone.channels))
    neck = "decoder.pyramid_neck_x4.conv.weight" in sd
    if neck != (backbone.kind in SINGLE_STRIDE_KINDS):
        raise ArchitectureError(
            f"the state dict {'has' if neck else 'lacks'} the pyramid neck (decoder.pyramid_neck_x*), which the "
            f"original builds {'only for' if neck else 'for every'} backbone of kinds {SINGLE_STRIDE_KINDS}, "
            f"and its backbone is {backbone.kind}")
    # The width the encoder hands the decoder at level 3: into the neck where there is one, else into
    # the first lateral block.
    lat_key = "decoder.pyramid_neck_x3.conv.weight" if neck else "decoder.lateral_block4.conv.weight"
    lat_in = shape_of(sd, lat_key)[1]
    if lat_in == 2 * bb_ch[1]:
        inferred_msi = "cat"
    elif lat_in == bb_ch[1]:
        inferred_msi = ""
    else:
        raise ArchitectureError(f"decoder width {lat_in} fits neither the backbone ({bb_ch[1]}) nor 'cat' input")
    if mul_scl_ipt is None:
        mul_scl_ipt = inferred_msi
    elif (mul_scl_ipt == "cat") != (inferred_msi == "cat"):
        raise ArchitectureError(f"mul_scl_ipt={mul_scl_ipt!r} contradicts the weights (they say "
                                f"{'cat' if inferred_msi == 'cat' else 'add or none'})")
    if neck:
        widths = tuple(shape_of(sd, f"decoder.pyramid_neck_x{level}.conv.weight")[0] for level in (4, 3, 2, 1))
        expected = tuple(c * (2 if mul_scl_ipt == "cat" else 1) for c in NECK_CHANNELS)
        if widths != expected:
            raise ArchitectureError(f"pyramid neck widths {widths}: the original's neck is always {expected} "
                                    "(Swin-L's widths, doubled by the 'cat' input)")
    mult = 2 if mul_scl_ipt == "cat" else 1
    lat = [c * mult for c in bb_ch]

    n_squeeze = count_indices(sd, r"squeeze_module\.(\d+)\.")
    squeeze, cxt_num = "", 0
    if n_squeeze:
        kind = _block_kind(sd, "squeeze_module.0")
        squeeze = f"{kind}_x{n_squeeze}"
        first = {"BasicDecBlk": "conv_in.weight", "ResBlk": "conv_in.weight",
                 "ASPP": "aspp1.atrous_conv.weight", "ASPPDeformable": "aspp1.atrous_conv.regular_conv.weight"}[kind]
        extra = shape_of(sd, f"squeeze_module.0.{first}")[1] - lat[0]
        options = {n: sum(lat[1:][::-1][-n:]) if n else 0 for n in range(4)}
        matches = [n for n, s in options.items() if s == extra]
        if not matches:
            raise ArchitectureError(f"squeeze input has {extra} context channels, which fits no cxt_num")
        cxt_num = matches[0]

    dec_blk = _block_kind(sd, "decoder.decoder_block4")
    if dec_blk not in ("BasicDecBlk", "ResBlk"):
        raise ArchitectureError(f"decoder blocks of kind {dec_blk} are not a BiRefNet option")
    inter, in4 = shape_of(sd, "decoder.decoder_block4.conv_in.weight")[:2]
    cls = sd.get("cls_head.0.weight")
    cfg = dict(
        backbone=backbone,
        mul_scl_ipt=mul_scl_ipt,
        cxt_num=cxt_num,
        squeeze_block=squeeze,
        dec_blk=dec_blk,
        dec_att=_attention_kind(sd, "decoder.decoder_block4"),
        dec_ipt="decoder.ipt_blk5.conv1.weight" in sd,
        dec_ipt_split=sd.get("decoder.ipt_blk5.conv1.weight", np.zeros((1, 3))).shape[1] > 3,
        ms_supervision="decoder.conv_ms_spvn_4.weight" in sd,
        out_ref="decoder.gdt_convs_4.0.weight" in sd,
        batch_norm=any(k.endswith(".running_mean") and not k.startswith("bb.") for k in sd),
        dec_channels_inter="adap" if inter != 64 and inter == in4 // 4 else "fixed",
        num_classes=0 if cls is None else cls.shape[0],
    )
    known = set(cfg) | {"resolution", "dropout", "freeze_backbone"}
    if unknown := sorted(set(overrides) - known):
        raise ArchitectureError(f"unknown config override(s) {unknown}; known: {sorted(known)}")
    cfg.update(overrides)
    try:
        return BiRefNetConfig(**cfg)
    except ValueError as e:
        raise ArchitectureError(str(e)) from e
