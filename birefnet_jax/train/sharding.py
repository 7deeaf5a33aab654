"""Device mesh and shardings for training: `jax.jit` over a `Mesh` with `NamedSharding`.

The mesh has two axes. The batch is split over all devices ('data' x 'fsdp'); parameters and
optimiser state are replicated over 'data' and, for large arrays, split over 'fsdp' (fully
sharded data parallelism: each device holds a slice, XLA gathers it for the computation). With
`fsdp=1` (the default) this is plain data parallelism. BatchNorm statistics are reductions over
the batch axis of a global array, so under `jit` they are taken over the global batch.

Multi-host: after `jax.distributed.initialize()` the mesh spans every process's devices; each
process feeds its own slice of the global batch (`global_batch`).
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA, FSDP = "data", "fsdp"
# Arrays smaller than this stay replicated under FSDP: splitting them saves little and costs a gather.
FSDP_MIN_SIZE = 2**16


def make_mesh(fsdp: int = 1, devices=None) -> Mesh:
    """A ('data', 'fsdp') mesh over `devices` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else list(devices)
    n = len(devices)
    if fsdp < 1 or n % fsdp:
        raise ValueError(f"mesh.fsdp={fsdp} must divide the number of devices ({n})")
    return Mesh(np.asarray(devices).reshape(n // fsdp, fsdp), (DATA, FSDP))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device of the mesh."""
    return NamedSharding(mesh, P((DATA, FSDP)))


def array_sharding(mesh: Mesh, shape: tuple[int, ...], min_size: int = FSDP_MIN_SIZE) -> NamedSharding:
    """Replicated, or split over 'fsdp' along the largest axis it divides."""
    k = mesh.shape[FSDP]
    if k == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return NamedSharding(mesh, P())
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % k == 0:
            spec = [None] * len(shape)
            spec[axis] = FSDP
            return NamedSharding(mesh, P(*spec))
    return NamedSharding(mesh, P())


def state_shardings(state, mesh: Mesh):
    """Shardings for every array of an nnx state (parameters, optimiser state, statistics, RNG)."""
    def one(x):
        shape = getattr(x, "shape", ())
        if jax.dtypes.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key):
            return NamedSharding(mesh, P())
        return array_sharding(mesh, tuple(shape))

    return jax.tree.map(one, state)


def place(x, sharding: NamedSharding) -> jax.Array:
    """A global array from a value every process holds in full (e.g. initialised from the same seed):
    each process fills its addressable shards, so this works across hosts where `device_put` cannot."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = place(jax.random.key_data(x), NamedSharding(sharding.mesh, P()))
        wrap = functools.partial(jax.random.wrap_key_data, impl=jax.random.key_impl(x))
        return jax.jit(wrap, out_shardings=sharding)(data)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_training_state(model: nnx.Module, optimizer: nnx.Optimizer, mesh: Mesh) -> None:
    """Place the model's and the optimiser's arrays on the mesh, in place."""
    state = nnx.state((model, optimizer))
    nnx.update((model, optimizer), jax.tree.map(place, state, state_shardings(state, mesh)))


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Global arrays from this process's slice of the batch (its rows, in process order)."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


__all__ = [
    "DATA", "FSDP", "FSDP_MIN_SIZE", "array_sharding", "batch_sharding", "global_batch", "make_mesh", "place",
    "shard_training_state", "state_shardings",
]
