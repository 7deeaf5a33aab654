"""A tiny training setup shared by the trainer tests and their worker processes: the quickstart
config shrunk so that a training step compiles in seconds."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from flax import nnx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # configs/ lives at the top of the repository
    sys.path.insert(0, str(ROOT))


_STEPS: dict = {}


def tiny_config(workdir_data: str = ""):
    from configs.quickstart import get_config

    c = get_config()
    c.model.backbone = {"embed_dim": 8, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1), "window_size": 2,
                        "drop_path_rate": 0.1}
    c.model.overrides = {"mul_scl_ipt": "", "cxt_num": 0, "squeeze_block": "", "dec_att": "",
                         "resolution": (64, 64)}
    c.data.root = workdir_data
    c.data.synthetic_train = 16
    c.data.synthetic_val = 4
    c.data.size = (64, 64)
    c.data.num_threads = 2
    c.val_size = (64, 64)
    c.batch_size = 8
    c.epochs = 3
    c.val_every_steps = 2
    c.checkpoint_every_steps = 2
    c.log_every_steps = 2
    c.write_predictions = 2
    return c


def batch(n: int = 8, seed: int = 0, size: int = 64) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.zeros((n, size, size, 1), np.float32)
    mask[:, size // 4: 3 * size // 4, size // 3: size // 2] = 1.0
    image = (rng.standard_normal((n, size, size, 3)) + 2 * mask).astype(np.float32)
    return {"image": image, "mask": mask}


def one_step(mesh, config=None, data=None):
    """Parameters and BatchNorm statistics after one training step (SGD) of the tiny model on `mesh`, as
    flat NumPy arrays, and the step's logs."""
    import jax
    import jax.experimental.multihost_utils
    import optax

    from birefnet_jax.nn.state import state_path_name
    from birefnet_jax.train.batchnorm import set_train_mode
    from birefnet_jax.train.sharding import batch_sharding, global_batch, shard_training_state
    from birefnet_jax.train.step import make_train_step
    from birefnet_jax.train.trainer import initial_model, model_config

    config = tiny_config() if config is None else config
    data = batch() if data is None else data
    model = initial_model(config, model_config(config))
    set_train_mode(model, batch_norm="batch")
    # Plain SGD: the parameters move by the gradient itself, so devices and processes are compared on
    # the gradients (Adam's first update is about lr * sign(gradient): rounding decides it where the
    # gradient is zero, as for biases in front of BatchNorm).
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    shard_training_state(model, optimizer, mesh)
    sharding = batch_sharding(mesh)
    n_local = len(data["image"]) // jax.process_count()
    lo = jax.process_index() * n_local
    local = {k: v[lo: lo + n_local] for k, v in data.items()}
    key = tuple(d.id for d in mesh.devices.flat)
    if key not in _STEPS:  # one compilation per mesh: later calls trace to the same program
        _STEPS[key] = make_train_step()
    logs = _STEPS[key](model, optimizer, global_batch(local, sharding))
    params = {}
    for path, var in nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat))):
        value = var.get_value()
        params[state_path_name(path, "/")] = np.asarray(jax.experimental.multihost_utils.process_allgather(
            value, tiled=True)) if jax.process_count() > 1 else np.asarray(value)
    return params, {k: float(v) for k, v in logs.items()}
