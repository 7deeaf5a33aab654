"""Decoder and lateral blocks of the reconstruction module, and the builder that turns
the original's block names (`BasicDecBlk`, `ResBlk`, `ASPP`, `ASPPDeformable`) into modules."""

from __future__ import annotations

import jax
from flax import nnx

from birefnet_jax.modules.aspp import ASPP, ASPPDeformable
from birefnet_jax.nn.layers import apply_opt, conv2d, maybe_bn
from birefnet_jax.nn.scan import block_caller

ATTENTIONS = ("", "ASPP", "ASPPDeformable")


def build_attention(kind: str, channels: int, *, batch_norm, dropout, rngs, dtype):
    if kind == "":
        return None
    if kind == "ASPP":
        return ASPP(channels, batch_norm=batch_norm, dropout=dropout, rngs=rngs, dtype=dtype)
    if kind == "ASPPDeformable":
        return ASPPDeformable(channels, batch_norm=batch_norm, dropout=dropout, rngs=rngs, dtype=dtype)
    raise ValueError(f"unknown decoder attention {kind!r}; expected one of {ATTENTIONS}")


def _conv_bn(modules, x):
    conv, bn = modules
    return apply_opt(bn, conv(x))


def _conv_bn_relu(modules, x):
    return jax.nn.relu(_conv_bn(modules, x))


class BasicDecBlk(nnx.Module):
    """conv3x3 -> BN -> ReLU -> [attention] -> conv3x3 -> BN.

    With `remat` (`model.set_remat`) each conv-BN stage is recomputed in the backward pass and
    the attention does its own (ASPP: one branch at a time); the block keeps its input and the
    attention's input and output, narrow maps, for the backward pass."""

    def __init__(self, in_ch: int, out_ch: int, *, attention: str = "", inter_channels: str = "fixed",
                 batch_norm: bool = True, dropout: float = 0.5, rngs: nnx.Rngs, dtype=None):
        inter = in_ch // 4 if inter_channels == "adap" else 64
        self.conv_in = conv2d(in_ch, inter, 3, padding=1, rngs=rngs, dtype=dtype)
        self.bn_in = maybe_bn(batch_norm, inter, dtype)
        self.dec_att = build_attention(attention, inter, batch_norm=batch_norm, dropout=dropout,
                                       rngs=rngs, dtype=dtype)
        self.conv_out = conv2d(inter, out_ch, 3, padding=1, rngs=rngs, dtype=dtype)
        self.bn_out = maybe_bn(batch_norm, out_ch, dtype)
        self.remat = False

    def _body(self, x):
        call = block_caller(self.remat)
        x = call((self.conv_in, self.bn_in), x, _conv_bn_relu)
        x = apply_opt(self.dec_att, x)
        return call((self.conv_out, self.bn_out), x, _conv_bn)

    def __call__(self, x):
        return self._body(x)


class ResBlk(BasicDecBlk):
    """BasicDecBlk plus a 1x1 projection shortcut."""

    def __init__(self, in_ch: int, out_ch: int, *, rngs: nnx.Rngs, dtype=None, **kwargs):
        super().__init__(in_ch, out_ch, rngs=rngs, dtype=dtype, **kwargs)
        self.conv_resi = conv2d(in_ch, out_ch, 1, rngs=rngs, dtype=dtype)

    def __call__(self, x):
        return self._body(x) + self.conv_resi(x)


class BasicLatBlk(nnx.Module):
    """1x1 conv that brings an encoder level to the decoder's width."""

    def __init__(self, in_ch: int, out_ch: int, *, rngs: nnx.Rngs, dtype=None):
        self.conv = conv2d(in_ch, out_ch, 1, rngs=rngs, dtype=dtype)

    def __call__(self, x):
        return self.conv(x)


class SimpleConvs(nnx.Module):
    """Two 3x3 convs without activation: the image-patch (source reference) encoder."""

    def __init__(self, in_ch: int, out_ch: int, inter: int = 64, *, rngs: nnx.Rngs, dtype=None):
        self.conv1 = conv2d(in_ch, inter, 3, padding=1, rngs=rngs, dtype=dtype)
        self.conv_out = conv2d(inter, out_ch, 3, padding=1, rngs=rngs, dtype=dtype)

    def __call__(self, x):
        return self.conv_out(self.conv1(x))


DECODER_BLOCKS = {"BasicDecBlk": BasicDecBlk, "ResBlk": ResBlk}


def build_block(kind: str, in_ch: int, out_ch: int, *, attention: str, inter_channels: str,
                batch_norm: bool, dropout: float, rngs: nnx.Rngs, dtype=None):
    """A decoder/squeeze block by the original's name: a decoder block, or ASPP used alone."""
    common = dict(batch_norm=batch_norm, dropout=dropout, rngs=rngs, dtype=dtype)
    if kind in DECODER_BLOCKS:
        return DECODER_BLOCKS[kind](in_ch, out_ch, attention=attention, inter_channels=inter_channels, **common)
    if kind == "ASPP":
        return ASPP(in_ch, out_ch, **common)
    if kind == "ASPPDeformable":
        return ASPPDeformable(in_ch, out_ch, **common)
    raise ValueError(f"unknown block {kind!r}; expected BasicDecBlk, ResBlk, ASPP or ASPPDeformable")
