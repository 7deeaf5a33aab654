"""Model-state utilities that every layer may use: concrete RNG streams for an abstract model,
state path names, parameter counts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def materialize_rng_state(model: nnx.Module, seed: int = 0) -> nnx.Module:
    """Give a model made by `nnx.eval_shape` concrete RNG streams (dropout, drop path), derived
    from `seed`; the eval-mode forward never draws from them."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.RngState))
    for i, (_, var) in enumerate(flat):
        if isinstance(var, nnx.RngKey):
            var.set_value(jax.random.fold_in(jax.random.key(seed), i))
        else:
            var.set_value(jnp.zeros(var.get_value().shape, var.get_value().dtype))
    return model


def state_path_name(path, sep: str = ".") -> str:
    """A pytree path of model state as a name ('bb.layers.0.blocks.1.attn.qkv.kernel'), without the
    `.value` step of each Variable."""
    parts = []
    for entry in path:
        if isinstance(entry, jax.tree_util.DictKey):
            parts.append(str(entry.key))
        elif isinstance(entry, jax.tree_util.SequenceKey):
            parts.append(str(entry.idx))
        elif isinstance(entry, jax.tree_util.GetAttrKey):
            if entry.name != "value":
                parts.append(entry.name)
        else:
            parts.append(str(entry))
    return sep.join(parts)


def count_params(model: nnx.Module) -> int:
    """Learnable parameters (BatchNorm running statistics excluded)."""
    return sum(int(p.size) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
