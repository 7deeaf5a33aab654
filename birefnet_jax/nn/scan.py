"""Runs of identical blocks through one `lax.scan` at inference.

A Swin-L stage of 18 blocks, unrolled, is 18 copies of the same program for XLA to optimise and
generate code for; scanned over the blocks' stacked weights it is one. The weights stay where
they are (one module per block, as the checkpoints name them): they are stacked inside the
traced function: a copy of the stage's weights per forward, small beside the stage's compute.

Only when nothing random happens (every dropout deterministic, no BatchNorm in training mode):
blocks that differ only in their drop-path rate run with the first group's module definition,
which is the same computation when those rates are not applied. The caller vouches that the
groups differ in nothing else static (Swin: shift alternates within a pair; PVT: one stage).

In training, `remat` recomputes each block in the backward pass instead of keeping its
activations: the backward then holds one block's intermediates at a time, not every block's.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from birefnet_jax.nn.remat import remat_call

MIN_GROUPS = 3  # fewer repeats compile about as fast unrolled

def _call(block, x, fn=None):
    return block(x) if fn is None else fn(block, x)


def block_caller(remat: bool):
    """`f(block, x, fn=None) = fn(block, x)` (by default `block(x)`); with `remat`, the block is
    recomputed in the backward pass (`remat_call`)."""
    return remat_call if remat else _call


def _deterministic(modules) -> bool:
    for _, m in nnx.iter_modules(modules):
        if isinstance(m, nnx.Dropout) and not m.deterministic:
            return False
        if getattr(m, "use_running_average", True) is False:
            return False
    return True


def apply_blocks(blocks: Sequence[nnx.Module], x: jax.Array, *, period: int = 1,
                 remat: bool = False) -> jax.Array:
    """`x` through `blocks` in order. Groups of `period` consecutive blocks (Swin's plain and
    shifted pair: 2) that repeat at least `MIN_GROUPS` times go through one `lax.scan` when the
    blocks are deterministic and their weights line up; otherwise the blocks run one by one,
    each rematerialised (`nn.remat`) when `remat` is set (training)."""
    blocks = list(blocks)
    n = len(blocks) // period
    groups = [tuple(blocks[i * period:(i + 1) * period]) for i in range(n)]
    if n < MIN_GROUPS or not _deterministic(blocks):
        n = 0
    else:
        graphdef, _, rest = nnx.split(groups[0], (nnx.Param, nnx.BatchStat), ...)
        states = [nnx.state(g, (nnx.Param, nnx.BatchStat)) for g in groups]
        shapes = [jax.tree.map(lambda v: (v.shape, v.dtype), s) for s in states]
        if any(s != shapes[0] for s in shapes[1:]):
            n = 0
    if n:
        stacked = jax.tree.map(lambda *v: jnp.stack(v), *states)

        def body(h, w):
            for blk in nnx.merge(graphdef, w, rest):
                h = blk(h)
            return h, None

        x, _ = jax.lax.scan(body, x, stacked)
    call = block_caller(remat)
    for blk in blocks[n * period:]:
        x = call(blk, x)
    return x
