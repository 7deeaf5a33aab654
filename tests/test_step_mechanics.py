"""The training step's mechanics on a tiny model (fast to compile): gradient accumulation equals
one step on the whole batch, frozen parameters stay put, BatchNorm for any batch size."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from reference_models import recipe_state_dict

from birefnet_jax.convert import infer_config
from birefnet_jax.loading import model_from_state_dict
from birefnet_jax.model import TrainOutputs
from birefnet_jax.nn.layers import BatchNorm2d
from birefnet_jax.train.batchnorm import batchnorm_layers, set_train_mode
from birefnet_jax.train.optim import OptimConfig, make_optimizer
from birefnet_jax.train.step import make_train_step


class _TinySegmenter(nnx.Module):
    """Two convolutions and a BatchNorm producing the outputs the objective reads: a coarse level
    (multi-scale supervision) and the full-resolution map."""

    def __init__(self, rngs):
        self.bb = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.bn = BatchNorm2d(4)
        self.head = nnx.Conv(4, 1, (3, 3), rngs=rngs)

    def __call__(self, x):
        h = jax.nn.relu(self.bn(self.bb(x)))
        full = self.head(h)
        coarse = full.reshape(x.shape[0], x.shape[1] // 2, 2, x.shape[2] // 2, 2, 1).mean(axis=(2, 4))
        return TrainOutputs([coarse, full], [], [], None)


def _batch(n, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.standard_normal((n, 16, 16, 3)).astype(np.float32)
    mask = (rng.random((n, 16, 16, 1)) > 0.6).astype(np.float32)
    return {"image": image, "mask": mask}


def _params(model):
    return {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _run(batches, accumulate, frozen=(), batch_norm="frozen", batch_sum_scale=None):
    model = _TinySegmenter(nnx.Rngs(0))
    set_train_mode(model, batch_norm=batch_norm, global_batch_size=len(batches[0]["image"]))
    cfg = OptimConfig(lr=1e-2, accumulate_steps=accumulate, frozen=frozen)
    tx, _ = make_optimizer(cfg, nnx.state(model, nnx.Param), global_batch_size=4, epochs=1, steps_per_epoch=10)
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    step = make_train_step(batch_sum_scale=accumulate if batch_sum_scale is None else batch_sum_scale, donate=False)
    logs = [step(model, opt, b) for b in batches]
    return model, logs


def _halves(batch):
    return [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]


@pytest.mark.slow
def test_accumulation_equals_one_step_on_the_whole_batch():
    """Two updates: on two whole batches of 4, and on their eight halves accumulated in pairs (a
    single Adam update is close to lr * sign(grad), blind to how the loss is weighted)."""
    wholes = [_batch(4, seed=0), _batch(4, seed=1)]
    halves = [h for b in wholes for h in _halves(b)]
    one, logs_one = _run(wholes, accumulate=1)
    acc, logs_acc = _run(halves, accumulate=2)
    unscaled, logs_unscaled = _run(halves, accumulate=2, batch_sum_scale=1.0)
    before = _params(_TinySegmenter(nnx.Rngs(0)))
    p_one, p_acc, p_unscaled = _params(one), _params(acc), _params(unscaled)
    for k in p_one:
        assert not np.allclose(p_one[k], before[k]), k  # the steps moved it
        np.testing.assert_allclose(p_acc[k], p_one[k], rtol=1e-5, atol=1e-7, err_msg=k)
    # The IoU sums over the batch: the scaled micro-batch losses average to the whole batch's...
    for i in range(2):
        mean_loss = (float(logs_acc[2 * i]["loss"]) + float(logs_acc[2 * i + 1]["loss"])) / 2
        assert mean_loss == pytest.approx(float(logs_one[i]["loss"]), rel=1e-5)
    # ...which they do not without the scaling, and the parameters then end elsewhere.
    mean_unscaled = (float(logs_unscaled[0]["loss"]) + float(logs_unscaled[1]["loss"])) / 2
    assert mean_unscaled != pytest.approx(float(logs_one[0]["loss"]), rel=1e-3)
    assert not all(np.allclose(p_unscaled[k], p_one[k], rtol=1e-5, atol=1e-7) for k in p_one)


@pytest.mark.slow
def test_frozen_parameters_do_not_move_under_a_train_step():
    model, logs = _run([_batch(2)], accumulate=1, frozen=("bb/",), batch_norm="batch")
    before = _params(_TinySegmenter(nnx.Rngs(0)))
    after = _params(model)
    for k in after:
        if k.startswith("bb/"):
            np.testing.assert_array_equal(after[k], before[k], err_msg=k)
        else:
            assert not np.array_equal(after[k], before[k]), k
    assert float(logs[0]["grad_norm"]) > 0 and np.isfinite(float(logs[0]["loss"]))


def test_batchnorm_modes():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 4, 4, 3)), jnp.float32) * 3 + 1
    bn = BatchNorm2d(3)
    bn.mean[...] = jnp.array([1.0, 2.0, 3.0])
    bn.var[...] = jnp.array([4.0, 1.0, 0.25])
    wrapper = nnx.List([bn])
    # A single image: 'auto' freezes the running statistics (normalise with them, never update).
    assert set_train_mode(wrapper, batch_norm="auto", global_batch_size=1) == "frozen"
    y = bn(x)
    np.testing.assert_allclose(np.asarray(y), (np.asarray(x) - [1, 2, 3]) / np.sqrt(np.array([4, 1, 0.25]) + 1e-5),
                               rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(bn.mean[...]), [1.0, 2.0, 3.0])
    assert int(bn.num_batches_tracked[...]) == 0
    # Two or more: batch statistics, running statistics updated, as the original trains.
    assert set_train_mode(wrapper, batch_norm="auto", global_batch_size=2) == "batch"
    bn(x)
    assert not np.allclose(np.asarray(bn.mean[...]), [1.0, 2.0, 3.0]) and int(bn.num_batches_tracked[...]) == 1
    with pytest.raises(ValueError, match="batch_norm must be one of"):
        set_train_mode(wrapper, batch_norm="sync")
    with pytest.raises(ValueError, match="global batch size"):
        set_train_mode(wrapper, batch_norm="auto")


@pytest.mark.slow
def test_released_layout_fine_tunes_at_batch_size_one():
    """The released weights have BatchNorm: at batch size 1 they keep it (frozen) instead of losing it
    as the original's batch-size-1 build does; a checkpoint without BatchNorm has none to set."""
    with_bn = model_from_state_dict(recipe_state_dict("swin_w7"), infer_config(recipe_state_dict("swin_w7")))
    assert set_train_mode(with_bn, global_batch_size=1) == "frozen"
    layers = batchnorm_layers(with_bn)
    assert len(layers) > 10 and all(bn.use_running_average for bn in layers)
    assert with_bn.bb.layers[0].blocks[1].drop_path.deterministic is False  # the rest is in training mode
    nobn_sd = recipe_state_dict("swin_nobn")
    without = model_from_state_dict(nobn_sd, infer_config(nobn_sd))
    assert set_train_mode(without, global_batch_size=1) == "none"
