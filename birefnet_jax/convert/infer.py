"""Reading the architecture off a state dict's keys and shapes.

Everything that changes the parameters is inferable. Two switches are not, because they
leave the weights identical: `mul_scl_ipt='add'` versus `''` (both keep the backbone
widths) and PVT v2 head counts outside the presets. They default to '' and the preset
heads and can be overridden. (VGG/ResNet checkpoints can only be '': see BiRefNetConfig.)
"""

from __future__ import annotations

import math
import re

import numpy as np

from birefnet_jax.config import BACKBONES, BiRefNetConfig, PvtV2Config, ResNetConfig, SwinConfig, VggConfig


class ArchitectureError(ValueError):
    """The keys do not describe a BiRefNet this package can build."""


def _count(keys, pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    return max(found) + 1 if found else 0


def _infer_swin(sd) -> SwinConfig:
    embed = sd["bb.patch_embed.proj.weight"].shape[0]
    n_layers = _count(sd, r"bb\.layers\.(\d+)\.")
    depths = tuple(_count(sd, rf"bb\.layers\.{i}\.blocks\.(\d+)\.") for i in range(n_layers))
    table = [sd[f"bb.layers.{i}.blocks.0.attn.relative_position_bias_table"] for i in range(n_layers)]
    heads = tuple(t.shape[1] for t in table)
    window = int(round((math.sqrt(table[0].shape[0]) + 1) / 2))
    hidden = sd["bb.layers.0.blocks.0.mlp.fc1.weight"].shape[0]
    return SwinConfig(embed_dim=embed, depths=depths, num_heads=heads, window_size=window,
                      mlp_ratio=hidden / embed)


def _infer_pvt(sd, num_heads=None) -> PvtV2Config:
    dims = tuple(sd[f"bb.patch_embed{i}.proj.weight"].shape[0] for i in range(1, 5))
    depths = tuple(_count(sd, rf"bb\.block{i}\.(\d+)\.") for i in range(1, 5))
    ratios = tuple(sd[f"bb.block{i}.0.mlp.fc1.weight"].shape[0] / dims[i - 1] for i in range(1, 5))
    ratios = tuple(int(r) if float(r).is_integer() else r for r in ratios)
    sr = tuple(sd[f"bb.block{i}.0.attn.sr.weight"].shape[-1] if f"bb.block{i}.0.attn.sr.weight" in sd else 1
               for i in range(1, 5))
    if num_heads is None:
        presets = [p for p in BACKBONES.values() if isinstance(p, PvtV2Config) and p.embed_dims == dims]
        if not presets:
            raise ArchitectureError(
                f"PVT v2 with widths {dims} is not a preset, and head counts cannot be read from the "
                "weights: pass num_heads (CLI: --num-heads 1,2,5,8)")
        num_heads = presets[0].num_heads
    return PvtV2Config(embed_dims=dims, num_heads=tuple(num_heads), mlp_ratios=ratios, depths=depths,
                       sr_ratios=sr)


def _infer_resnet(sd) -> ResNetConfig:
    """Stage 1 nests its bottlenecks at index 4 (after the stem); stages 2..4 are the layers."""
    depths = (_count(sd, r"bb\.conv1\.4\.(\d+)\."),
              *(_count(sd, rf"bb\.conv{i}\.(\d+)\.") for i in (2, 3, 4)))
    return ResNetConfig(depths=depths)


def _block_kind(sd, prefix: str) -> str:
    if f"{prefix}.conv_in.weight" in sd:
        return "ResBlk" if f"{prefix}.conv_resi.weight" in sd else "BasicDecBlk"
    if f"{prefix}.aspp1.atrous_conv.offset_conv.weight" in sd:
        return "ASPPDeformable"
    if f"{prefix}.aspp1.atrous_conv.weight" in sd:
        return "ASPP"
    raise ArchitectureError(f"cannot tell the kind of block at {prefix!r}")


def _attention_kind(sd, prefix: str) -> str:
    if f"{prefix}.dec_att.aspp1.atrous_conv.offset_conv.weight" in sd:
        return "ASPPDeformable"
    if f"{prefix}.dec_att.aspp1.atrous_conv.weight" in sd:
        return "ASPP"
    return ""


def infer_config(state_dict: dict[str, np.ndarray], *, mul_scl_ipt: str | None = None,
                 num_heads=None, **overrides) -> BiRefNetConfig:
    """A `BiRefNetConfig` that builds exactly the parameters of `state_dict` (prefixes stripped).

    Keyword overrides replace inferred fields (e.g. `resolution=(2048, 2048)`); `mul_scl_ipt`
    picks 'add' over '' when the widths say the input is not concatenated.
    """
    sd = state_dict
    if "bb.layers.0.blocks.0.attn.qkv.weight" in sd:
        backbone = _infer_swin(sd)
    elif "bb.patch_embed1.proj.weight" in sd:
        backbone = _infer_pvt(sd, num_heads)
    elif "bb.conv1.4.0.conv1.weight" in sd:
        backbone = _infer_resnet(sd)
    elif "bb.conv1.0.weight" in sd:
        backbone = VggConfig(batch_norm="bb.conv1.1.running_mean" in sd)
    else:
        sample = ", ".join(list(sd)[:5])
        raise ArchitectureError(
            "not a BiRefNet state dict: no backbone keys under 'bb.' (first keys: " + sample + ")")
    if "decoder.lateral_block4.conv.weight" not in sd:
        raise ArchitectureError("not a BiRefNet state dict: no 'decoder.lateral_block4' keys")

    bb_ch = list(reversed(backbone.channels))
    lat_in = sd["decoder.lateral_block4.conv.weight"].shape[1]
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
    mult = 2 if mul_scl_ipt == "cat" else 1
    lat = [c * mult for c in bb_ch]

    n_squeeze = _count(sd, r"squeeze_module\.(\d+)\.")
    squeeze, cxt_num = "", 0
    if n_squeeze:
        kind = _block_kind(sd, "squeeze_module.0")
        squeeze = f"{kind}_x{n_squeeze}"
        first = {"BasicDecBlk": "conv_in.weight", "ResBlk": "conv_in.weight",
                 "ASPP": "aspp1.atrous_conv.weight", "ASPPDeformable": "aspp1.atrous_conv.regular_conv.weight"}[kind]
        extra = sd[f"squeeze_module.0.{first}"].shape[1] - lat[0]
        options = {n: sum(lat[1:][::-1][-n:]) if n else 0 for n in range(4)}
        matches = [n for n, s in options.items() if s == extra]
        if not matches:
            raise ArchitectureError(f"squeeze input has {extra} context channels, which fits no cxt_num")
        cxt_num = matches[0]

    dec_blk = _block_kind(sd, "decoder.decoder_block4")
    if dec_blk not in ("BasicDecBlk", "ResBlk"):
        raise ArchitectureError(f"decoder blocks of kind {dec_blk} are not a BiRefNet option")
    inter = sd["decoder.decoder_block4.conv_in.weight"].shape[0]
    in4 = sd["decoder.decoder_block4.conv_in.weight"].shape[1]
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
    cfg.update(overrides)
    try:
        return BiRefNetConfig(**cfg)
    except ValueError as e:
        raise ArchitectureError(str(e)) from e
