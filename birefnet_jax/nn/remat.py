"""Rematerialisation that the compiler cannot undo: one block (`remat_call`), or parallel parts
of one block recomputed one after another (`remat_sum`).

`jax.checkpoint` keeps a block's input and recomputes the rest in the backward pass, but the
recomputation depends on nothing but that input, so XLA's scheduler is free to run it early. On a
CPU it does (its optimisation barriers are gone before scheduling): every block's recomputation ran
long before the backward pass reached it, all live at once, and a training step with every Swin
block checkpointed peaked higher than without (docs/performance.md has the figures). Here the
backward rule recomputes the block from an input made data-dependent on the cotangent of the
block's output, which exists only once the backward pass has come back down to this block. So one
block's intermediates are live at a time. The weights are gated the same way, or XLA merges the
recomputation's weight-only work with the forward's and keeps it live in between. `after` is the
gate itself, for buffers that must not be allocated before their data.

The block may update its non-parameter state in the forward pass (dropout RNG counts, BatchNorm
statistics): that update is an output of the forward, and the recomputation starts from the state
before it, so it draws the same dropout masks and gives the same gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _zero_cotangent(tree):
    """Cotangents for the state that is not differentiated: zeros for floating-point leaves
    (BatchNorm statistics), float0 for integers and keys (RNG counts and keys)."""

    def zero(v):
        if jnp.issubdtype(v.dtype, jnp.inexact):
            return jnp.zeros_like(v)
        return np.zeros(v.shape, jax.dtypes.float0)

    return jax.tree.map(zero, tree)


def after(tree, dependency):
    """`tree`, made to depend on `dependency`: plus zero times one element of each floating-point
    array in it. XLA does not fold a floating-point multiply by zero (it would change NaN
    semantics), and on a CPU it drops optimisation barriers before scheduling, so this is what
    keeps a recomputation after the cotangents it waits for."""
    probes = [leaf.ravel()[0] for leaf in jax.tree.leaves(dependency) if jnp.issubdtype(leaf.dtype, jnp.inexact)]
    if not probes:
        return tree
    zero = sum(p * 0 for p in probes)

    def gate(v):
        return v + zero.astype(v.dtype) if jnp.issubdtype(v.dtype, jnp.inexact) else v

    return jax.tree.map(gate, tree)


def _call_module(module, x):
    return module(x)


def _runner(graphdef, fn):
    """(params, rest, x) -> (fn(modules, x), rest after the call), on fresh Variables."""

    def run(params, rest, x):
        modules = nnx.merge(graphdef, params, rest, copy=True)  # fresh Variables at this trace level
        y = fn(modules, x)
        return y, nnx.state(modules, nnx.Not(nnx.Param))

    return run


def remat_call(block, x, fn: Callable | None = None):
    """`fn(block, x)` (by default `block(x)`), keeping only `x` for the backward pass and
    recomputing the rest there. `block` is a module or a tuple of modules (parts of a larger
    one that `fn` strings together)."""
    graphdef, params, rest = nnx.split(block, nnx.Param, ...)
    run = _runner(graphdef, fn or _call_module)

    @jax.custom_vjp
    def call(params, rest, x):
        return run(params, rest, x)

    def forward(params, rest, x):
        return run(params, rest, x), (params, rest, x)

    def backward(saved, cotangents):
        params, rest, x = saved
        dy, _ = cotangents
        # Everything the recomputation reads is gated, the weights too: otherwise XLA merges (CSE)
        # the recomputation's weight-only work (Swin's gathered position bias, broadcast weights)
        # with the forward's and keeps it live from the forward pass to here.
        params, rest, x = after((params, rest, x), dy)
        _, vjp = jax.vjp(lambda p, x_: run(p, rest, x_)[0], params, x)
        dparams, dx = vjp(dy)
        return dparams, _zero_cotangent(rest), dx

    call.defvjp(forward, backward)
    y, new_rest = call(params, rest, x)
    nnx.update(block, new_rest)
    return y


def remat_sum(modules, x, parts: Sequence[Callable]):
    """`sum(part(modules, x) for part in parts)`, keeping only `x` for the backward pass, where
    the parts are recomputed and differentiated one after the other: each recomputation waits
    for the previous part's input gradient. Parallel branches over one input (ASPP's five at a
    quarter of the resolution) would otherwise all be recomputed, and their gradients held, at
    once. A part's state updates (BatchNorm statistics, RNG counts) are replayed from what the
    state was before that part in the forward pass."""
    graphdef, params, rest = nnx.split(modules, nnx.Param, ...)
    runs = [_runner(graphdef, part) for part in parts]

    def forward_all(params, rest, x):
        rests, total = [rest], None
        for run in runs:
            y, r = run(params, rests[-1], x)
            total = y if total is None else total + y
            rests.append(r)
        return total, rests

    @jax.custom_vjp
    def call(params, rest, x):
        total, rests = forward_all(params, rest, x)
        return total, rests[-1]

    def forward(params, rest, x):
        total, rests = forward_all(params, rest, x)
        return (total, rests[-1]), (params, rests[:-1], x)

    def backward(saved, cotangents):
        params, rests, x = saved
        dy, _ = cotangents
        dparams = dx = None
        for run, before in reversed(list(zip(runs, rests, strict=True))):
            p, r, xi = after((params, before, x), (dy, dx))
            _, vjp = jax.vjp(lambda p_, x_, run=run, r=r: run(p_, r, x_)[0], p, xi)
            dp, dxi = vjp(dy)
            dparams = dp if dparams is None else jax.tree.map(jnp.add, dparams, dp)
            dx = dxi if dx is None else dx + dxi
        return dparams, _zero_cotangent(rests[0]), dx

    call.defvjp(forward, backward)
    y, new_rest = call(params, rest, x)
    nnx.update(modules, new_rest)
    return y


__all__ = ["after", "remat_call", "remat_sum"]
