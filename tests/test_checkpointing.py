"""Training checkpoints (`birefnet_jax.train.checkpointing`): retention of the latest and the best,
bit-identical resumption, the model-checkpoint format of every step folder, the preemption
guard, and the errors for incomplete, corrupt and foreign checkpoints."""

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import birefnet_jax
from birefnet_jax.checkpoint import CheckpointError
from birefnet_jax.nn.layers import BatchNorm2d
from birefnet_jax.train.checkpointing import (
    CheckpointMismatchError,
    PreemptionGuard,
    TrainCheckpointer,
)


@dataclasses.dataclass(frozen=True)
class TinyConfig:
    width: int = 8
    rate: float = 0.5


class Tiny(nnx.Module):
    """Linear, PyTorch-style BatchNorm, dropout, linear: parameters, statistics and an RNG stream."""

    def __init__(self, seed=0, width=8, rate=0.5):
        self.cfg = TinyConfig(width, rate)
        rngs = nnx.Rngs(params=seed, dropout=seed + 1)
        self.fc1 = nnx.Linear(4, width, rngs=rngs)
        self.bn = BatchNorm2d(width)
        self.drop = nnx.Dropout(rate, rngs=rngs)
        self.fc2 = nnx.Linear(width, 1, rngs=rngs)

    def __call__(self, x):
        return self.fc2(self.drop(self.bn(jax.nn.relu(self.fc1(x)))))


def _make(seed=0, width=8, rate=0.5):
    model = Tiny(seed, width, rate)
    model.train()
    return model, nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)


def _batch(i):
    rng = np.random.default_rng(i)
    return jnp.asarray(rng.normal(size=(2, 3, 3, 4)), jnp.float32), jnp.asarray(rng.normal(size=(2, 3, 3, 1)),
                                                                                  jnp.float32)


def _step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return loss


_train_step = nnx.jit(_step, donate_argnums=(0, 1))


def _train(model, optimizer, start, stop):
    for i in range(start, stop):
        _train_step(model, optimizer, *_batch(i))


def _leaves(model, optimizer):
    """Every array of the run as NumPy: weights, statistics, RNG keys (as data) and counts,
    optimiser state and step."""
    flat = [*nnx.to_flat_state(nnx.state(model)), *nnx.to_flat_state(nnx.state(optimizer, nnx.OptState))]
    out = {}
    for path, var in flat:
        v = var.get_value()
        if jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key):
            v = jax.random.key_data(v)
        out["/".join(map(str, path))] = np.asarray(v)
    return out


def _save_series(workdir, values, **kwargs):
    model, optimizer = _make()
    ckpt = TrainCheckpointer(workdir, max_to_keep=2, save_every_steps=1, **kwargs)
    for step, v in enumerate(values, start=1):
        assert ckpt.save(step, model, optimizer, {"epoch": 0}, {ckpt.best_metric: v, "loss": 1.0})
    ckpt.wait_until_finished()
    return ckpt


def test_keeps_latest_and_best_min(tmp_path):
    ckpt = _save_series(tmp_path, [0.5, 0.1, 0.3, 0.4, 0.35], best_metric="mae", best_mode="min")
    assert ckpt.all_steps() == [2, 4, 5]
    assert ckpt.best_checkpoint() == 2 and ckpt.latest_step() == 5
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", "4", "5"]
    model, optimizer = _make()
    progress = ckpt.restore_latest(model, optimizer)
    assert progress["step"] == 5 and progress["best_metric"] == 0.1 and progress["best_step"] == 2
    ckpt.close()
    # A restarted run knows its best; a save without the metric (e.g. on preemption) is only "latest".
    ckpt = TrainCheckpointer(tmp_path, max_to_keep=2, best_metric="mae", best_mode="min", save_every_steps=1)
    assert ckpt.best_checkpoint() == 2
    assert ckpt.save(6, model, optimizer, {"epoch": 1})
    assert ckpt.save(7, model, optimizer, {"epoch": 1}, {"mae": 0.2})
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [2, 6, 7] and ckpt.best_checkpoint() == 2
    ckpt.close()


def test_keeps_latest_and_best_max(tmp_path):
    ckpt = _save_series(tmp_path, [0.2, 0.1, 0.9, 0.3, 0.4], best_metric="fmeasure", best_mode="max")
    assert ckpt.all_steps() == [3, 4, 5] and ckpt.best_checkpoint() == 3
    assert ckpt.metrics(3)["fmeasure"] == 0.9
    ckpt.close()


def test_save_schedule(tmp_path):
    model, optimizer = _make()
    with TrainCheckpointer(tmp_path, save_every_steps=2, max_to_keep=None) as ckpt:
        assert [ckpt.should_save(s) for s in range(5)] == [False, False, True, False, True]
        assert not ckpt.save(1, model, optimizer)
        assert ckpt.save(2, model, optimizer)
        assert not ckpt.save(2, model, optimizer, force=True)  # already saved: no error, no second copy
        assert ckpt.save(3, model, optimizer, force=True)
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [2, 3] and ckpt.best_checkpoint() is None
        with pytest.raises(ValueError, match="older than the latest"):
            ckpt.save(1, model, optimizer, force=True)


@pytest.mark.slow
def test_resume_is_bit_identical(tmp_path):
    k, n = 3, 6
    model, optimizer = _make(seed=0)
    ckpt = TrainCheckpointer(tmp_path, config={"lr": 1e-2, "steps": n}, save_every_steps=k)
    _train(model, optimizer, 0, k)
    assert ckpt.save(k, model, optimizer, {"epoch": 0, "data_position": k})
    _train(model, optimizer, k, n)  # trains on (and donates) the arrays while the save is written
    ckpt.close()
    expected = _leaves(model, optimizer)

    fresh, fresh_opt = _make(seed=42)  # other weights and other dropout keys
    ckpt = TrainCheckpointer(tmp_path, config={"lr": 1e-2, "steps": n}, save_every_steps=k)
    progress = ckpt.restore_latest(fresh, fresh_opt)
    assert progress["step"] == k and progress["data_position"] == k and progress["epoch"] == 0
    assert progress["config"] == {"lr": 1e-2, "steps": n} and progress["elapsed_s"] >= 0
    with pytest.warns(UserWarning, match="steps: checkpoint 6, now 9"):  # a changed run config only warns
        assert ckpt.restore_latest(*_make(seed=7), config={"lr": 1e-2, "steps": 9})["step"] == k
    _train(fresh, fresh_opt, progress["data_position"], n)
    got = _leaves(fresh, fresh_opt)
    assert got.keys() == expected.keys()
    assert any("drop/rngs/key" in p for p in got) and any("opt_state" in p for p in got)
    for path in expected:
        np.testing.assert_array_equal(got[path], expected[path], err_msg=path)
    ckpt.close()


def test_no_checkpoint_gives_none(tmp_path):
    model, optimizer = _make()
    with TrainCheckpointer(tmp_path) as ckpt:
        assert ckpt.restore_latest(model, optimizer) is None
        assert ckpt.latest_step() is None and ckpt.best_checkpoint() is None


def test_temporary_checkpoint_is_ignored(tmp_path):
    model, optimizer = _make()
    with TrainCheckpointer(tmp_path, save_every_steps=1) as ckpt:
        ckpt.save(1, model, optimizer, {"epoch": 0})
    # A save killed before Orbax's final rename leaves only the temporary folder.
    root = tmp_path / "checkpoints"
    shutil.copytree(root / "1", root / f"2{ocp.path.atomicity.TMP_DIR_SUFFIX}")
    with TrainCheckpointer(tmp_path, save_every_steps=1) as ckpt:
        assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
        assert ckpt.restore_latest(*_make(seed=5))["step"] == 1


def test_corrupt_checkpoint_names_folder(tmp_path):
    model, optimizer = _make()
    with TrainCheckpointer(tmp_path, save_every_steps=1) as ckpt:
        ckpt.save(1, model, optimizer)
        ckpt.save(2, model, optimizer)
    train_item = tmp_path / "checkpoints" / "2" / "train"
    shutil.rmtree(train_item)
    train_item.mkdir()
    with TrainCheckpointer(tmp_path) as ckpt, pytest.raises(CheckpointError) as err:
        ckpt.restore_latest(*_make())
    msg = str(err.value)
    assert str(tmp_path / "checkpoints" / "2") in msg and "delete" in msg and "step 1" in msg


def test_other_architecture_is_refused(tmp_path):
    model, optimizer = _make(width=8)
    with TrainCheckpointer(tmp_path, save_every_steps=1) as ckpt:
        ckpt.save(1, model, optimizer)
    wide, wide_opt = _make(width=16)
    with TrainCheckpointer(tmp_path) as ckpt, pytest.raises(CheckpointMismatchError) as err:
        ckpt.restore_latest(wide, wide_opt)
    msg = str(err.value)
    assert "width: checkpoint 8, model 16" in msg  # the config field
    assert "fc1/kernel: checkpoint float32[4, 8], model float32[4, 16]" in msg  # and the weights
    assert "new workdir" in msg
    # Another optimiser (its state has another structure) is refused too.
    other_opt = nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2)), wrt=nnx.Param)
    with TrainCheckpointer(tmp_path) as ckpt, pytest.raises(CheckpointMismatchError, match="training state"):
        ckpt.restore_latest(model, other_opt)
    # A config change that leaves every shape alone (here the dropout rate) only warns.
    with TrainCheckpointer(tmp_path) as ckpt, pytest.warns(UserWarning, match="rate: checkpoint 0.5, model 0.25"):
        assert ckpt.restore_latest(*_make(rate=0.25))["step"] == 1


def _tiny_birefnet_config(embed_dim=16):
    from birefnet_jax.backbones.swin import SwinConfig
    from birefnet_jax.config import BiRefNetConfig

    return BiRefNetConfig(backbone=SwinConfig(embed_dim=embed_dim, depths=(2, 2, 2, 2), num_heads=(1, 1, 1, 1),
                                              window_size=7))


@pytest.mark.slow
def test_step_folder_is_a_model_checkpoint(tmp_path):
    from birefnet_jax.checkpoint import read_config
    from birefnet_jax.model import abstract_model, random_model
    from birefnet_jax.nn.state import materialize_rng_state

    cfg = _tiny_birefnet_config()
    model = random_model(cfg, seed=3)  # built, never run
    optimizer = nnx.Optimizer(model, optax.sgd(1e-3), wrt=nnx.Param)  # stateless: cheap to build
    with TrainCheckpointer(tmp_path, config={"task": "DIS5K"}, best_metric="mae", save_every_steps=10) as ckpt:
        assert ckpt.save(10, model, optimizer, {"epoch": 2}, {"mae": 0.05})
        step_dir = ckpt.step_dir(10)
    assert step_dir == tmp_path / "checkpoints" / "10"
    stored_cfg, meta = read_config(step_dir)
    assert stored_cfg == cfg and meta["run_config"] == {"task": "DIS5K"} and meta["metrics"]["mae"] == 0.05
    loaded = birefnet_jax.load(step_dir)
    weights = (nnx.Param, nnx.BatchStat)
    want = dict(nnx.to_flat_state(nnx.state(model, weights)))
    got = dict(nnx.to_flat_state(nnx.state(loaded, weights)))
    assert got.keys() == want.keys()
    for path, var in want.items():
        np.testing.assert_array_equal(np.asarray(got[path].get_value()), np.asarray(var.get_value()))

    # The same checkpoints refuse a BiRefNet of another size, naming the config field (the check
    # reads shapes only, so a model made by eval_shape will do).
    other = materialize_rng_state(abstract_model(_tiny_birefnet_config(embed_dim=32)))
    with TrainCheckpointer(tmp_path) as ckpt, pytest.raises(CheckpointMismatchError) as err:
        ckpt.restore_latest(other, nnx.Optimizer(other, optax.sgd(1e-3), wrt=nnx.Param))
    assert "backbone.embed_dim: checkpoint 16, model 32" in str(err.value)


def _wait_for(predicate, timeout=5.0):
    end = time.monotonic() + timeout
    while not predicate() and time.monotonic() < end:
        time.sleep(0.01)
    return predicate()


def test_sigterm_sets_flag_and_restores_handler(tmp_path):
    calls = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    try:
        model, optimizer = _make()
        with TrainCheckpointer(tmp_path, save_every_steps=1000) as ckpt:
            with ckpt.preemption_guard() as guard:
                assert not ckpt.preemption_requested()
                os.kill(os.getpid(), signal.SIGTERM)
                assert _wait_for(ckpt.preemption_requested)
                assert guard.received == signal.SIGTERM and calls == []
                # The loop's reaction: a forced save at the current step although none is due.
                assert ckpt.save(7, model, optimizer, {"epoch": 0}, force=True)
            assert ckpt.latest_step() == 7
        assert signal.getsignal(signal.SIGTERM) is not guard._handle
        os.kill(os.getpid(), signal.SIGTERM)  # the previous handler is back
        assert _wait_for(lambda: calls == [signal.SIGTERM])
    finally:
        signal.signal(signal.SIGTERM, previous)

    guard = PreemptionGuard()
    guard.install()
    assert signal.getsignal(signal.SIGTERM) == guard._handle
    guard.uninstall()
    assert signal.getsignal(signal.SIGTERM) is previous


_SHARDED = textwrap.dedent("""
    import sys
    import jax, numpy as np, optax
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    sys.path.insert(0, sys.argv[2])
    from test_checkpointing import _leaves, _make
    from birefnet_jax.train.checkpointing import TrainCheckpointer

    mesh = Mesh(np.array(jax.devices()), ("d",))
    def shard(model, optimizer):
        cols = NamedSharding(mesh, P(None, "d"))
        model.fc1.kernel.set_value(jax.device_put(model.fc1.kernel.get_value(), cols))
        return model, nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
    model, optimizer = shard(*_make(0))
    with TrainCheckpointer(sys.argv[1], save_every_steps=2) as ckpt:
        ckpt.save(2, model, optimizer)
    fresh, fresh_opt = shard(*_make(1))
    with TrainCheckpointer(sys.argv[1]) as ckpt:
        ckpt.restore_latest(fresh, fresh_opt)
    assert fresh.fc1.kernel.get_value().sharding == NamedSharding(mesh, P(None, "d"))
    assert fresh_opt.opt_state[0].mu["fc1"]["kernel"].get_value().sharding.spec == P(None, "d")
    want, got = _leaves(model, optimizer), _leaves(fresh, fresh_opt)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    print("sharded ok", len(jax.devices()))
""")


@pytest.mark.slow
def test_restore_onto_a_mesh_keeps_shardings(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", _SHARDED, str(tmp_path), str(Path(__file__).parent)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "sharded ok 2" in out.stdout
