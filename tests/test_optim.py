"""The optax optimisers and schedules against the original's PyTorch ones, and frozen subsets."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from birefnet_jax.train.optim import (
    OptimConfig,
    decay_milestones,
    learning_rate_schedule,
    make_optimizer,
    parameter_labels,
    scaled_learning_rate,
)


class _Tiny(nnx.Module):
    def __init__(self, rngs):
        self.bb = nnx.Linear(3, 4, rngs=rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(jnp.tanh(self.bb(x)))


def _torch_run(kind, params, grads, lr, steps, weight_decay):
    torch = pytest.importorskip("torch")
    ps = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in params]
    if kind == "AdamW":
        opt = torch.optim.AdamW(ps, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.Adam(ps, lr=lr, weight_decay=weight_decay)
    for s in range(steps):
        for p, g in zip(ps, grads[s], strict=True):
            p.grad = torch.from_numpy(g.copy())
        opt.step()
    return [p.detach().numpy() for p in ps]


@pytest.mark.parametrize("kind,weight_decay", [("AdamW", None), ("Adam", None), ("Adam", 1e-3)])
def test_optimizer_matches_torch(kind, weight_decay):
    rng = np.random.default_rng(0)
    params = [rng.standard_normal((5, 3)), rng.standard_normal(7)]
    grads = [[rng.standard_normal(p.shape) * 10.0 ** rng.integers(-3, 2) for p in params] for _ in range(6)]
    cfg = OptimConfig(optimizer=kind, lr=3e-3, weight_decay=weight_decay)
    with jax.enable_x64(True):
        tx, _ = make_optimizer(cfg, params, global_batch_size=4, epochs=1, steps_per_epoch=10)
        p = [jnp.asarray(a) for a in params]
        state = tx.init(p)
        for g in grads:
            updates, state = tx.update([jnp.asarray(a) for a in g], state, p)
            p = optax.apply_updates(p, updates)
        ours = [np.asarray(a) for a in p]
    default_wd = 1e-2 if kind == "AdamW" else 0.0
    theirs = _torch_run(kind, params, grads, 3e-3, len(grads), default_wd if weight_decay is None else weight_decay)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    assert not np.allclose(ours[0], params[0])


@pytest.mark.parametrize("decay_epochs", [(3, 5), (-2,), (100_000,)])
def test_step_decay_matches_multisteplr(decay_epochs):
    torch = pytest.importorskip("torch")
    epochs, per_epoch = 8, 3
    cfg = OptimConfig(lr=1e-3, lr_decay_epochs=decay_epochs)
    sched = learning_rate_schedule(cfg, global_batch_size=4, epochs=epochs, updates_per_epoch=per_epoch)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    torch_sched = torch.optim.lr_scheduler.MultiStepLR(opt, decay_milestones(decay_epochs, epochs), gamma=0.5)
    expected = []
    for _ in range(epochs):
        expected += [opt.param_groups[0]["lr"]] * per_epoch
        opt.step()
        torch_sched.step()
    ours = [float(sched(i)) for i in range(epochs * per_epoch)]
    np.testing.assert_allclose(ours, expected, rtol=1e-6)
    if decay_epochs == (-2,):
        assert ours[-1] == pytest.approx(5e-4) and ours[0] == pytest.approx(1e-3)


def test_learning_rate_rule_and_warmup_cosine():
    assert scaled_learning_rate("DIS5K", 8) == pytest.approx(1e-4 * math.sqrt(2))
    assert scaled_learning_rate("General", 4) == pytest.approx(1e-5)
    cfg = OptimConfig(task="DIS5K", schedule="cosine", warmup_epochs=1, min_lr_ratio=0.1)
    sched = learning_rate_schedule(cfg, global_batch_size=16, epochs=4, updates_per_epoch=10)
    peak = 1e-4 * 2
    assert float(sched(0)) == 0.0 and float(sched(10)) == pytest.approx(peak)
    assert float(sched(40)) == pytest.approx(0.1 * peak)
    # lr_batch_size reproduces the original's per-GPU rule under data parallelism
    cfg = OptimConfig(task="DIS5K", lr_batch_size=8, schedule="constant")
    assert float(learning_rate_schedule(cfg, global_batch_size=64, epochs=1, updates_per_epoch=1)(0)) == \
        pytest.approx(1e-4 * math.sqrt(2))


def test_frozen_parameters_do_not_move():
    model = _Tiny(nnx.Rngs(0))
    cfg = OptimConfig(lr=1e-2, frozen=("bb/",), clip_grad_norm=1.0)
    params = nnx.state(model, nnx.Param)
    labels = parameter_labels(params, cfg.frozen)
    assert {v for v in jax.tree.leaves(labels)} == {"frozen", "trainable"}
    tx, _ = make_optimizer(cfg, params, global_batch_size=2, epochs=1, steps_per_epoch=1)
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    x = jnp.ones((2, 3))

    @nnx.jit
    def step(model, opt, x):
        grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
        opt.update(model, grads)

    step(model, opt, x)
    after = nnx.state(model, nnx.Param)
    np.testing.assert_array_equal(np.asarray(after["bb"]["kernel"][...]), before["bb"]["kernel"])
    np.testing.assert_array_equal(np.asarray(after["bb"]["bias"][...]), before["bb"]["bias"])
    assert not np.array_equal(np.asarray(after["head"]["kernel"][...]), before["head"]["kernel"])


def test_frozen_pattern_that_matches_nothing_is_an_error():
    params = nnx.state(_Tiny(nnx.Rngs(0)), nnx.Param)
    with pytest.raises(ValueError, match="match no parameter.*bb/bias"):
        parameter_labels(params, ("backbone/",))
    with pytest.raises(ValueError, match="optimizer must be"):
        OptimConfig(optimizer="SGD")
