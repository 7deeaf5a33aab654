"""Rematerialisation (`nn.remat`): the same values, gradients and state updates as the plain
call, with the structure that keeps memory down (recomputation gated on cotangents, parallel
branches recomputed one after another)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from birefnet_jax.modules.blocks import BasicDecBlk
from birefnet_jax.nn.layers import BatchNorm2d
from birefnet_jax.nn.remat import remat_sum


def _randomise(module, seed):
    """Random parameters everywhere (the deformable offsets start at zero otherwise) and batch
    statistics in training mode."""
    rng = np.random.default_rng(seed)
    for _, v in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        v.set_value(jnp.asarray(rng.normal(0, 0.3, v.shape), v.dtype))
    for _, m in nnx.iter_modules(module):
        if isinstance(m, BatchNorm2d):
            m.use_running_average = False
    return module


def _loss_and_grads(module, x, remat):
    for _, m in nnx.iter_modules(module):
        if hasattr(m, "remat"):
            m.remat = remat

    def loss(module, x):
        y = module(x)
        return jnp.sum(jnp.sin(y) * y)

    (value, (dmod, dx)) = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1)))(module, x)
    flat = {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(dmod)}
    stats = {"/".join(map(str, p)): np.asarray(v.get_value())
             for p, v in nnx.to_flat_state(nnx.state(module, nnx.BatchStat))}
    return float(value), flat, np.asarray(dx), stats


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["block"])
def test_remat_matches_the_plain_call(kind):
    """A decoder block around a deformable ASPP (its conv-BN stages recomputed, the ASPP projected
    and recomputed branch by branch, the deformable convolutions' written-out backward): loss,
    parameter and input gradients, and the BatchNorm statistics the step leaves behind."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 4)), jnp.float32)
    results = []
    for remat in (False, True):
        module = BasicDecBlk(4, 6, attention="ASPPDeformable", rngs=nnx.Rngs(0))
        _randomise(module, 1)
        results.append(_loss_and_grads(module, x, remat))
    (l0, g0, dx0, s0), (l1, g1, dx1, s1) = results
    assert l1 == pytest.approx(l0, rel=1e-6)
    assert g1.keys() == g0.keys()
    # float32 rounding of another summation order, on the scale of the gradients (a conv bias before
    # BatchNorm has a zero gradient in exact arithmetic: rounding noise in both)
    scale = max(np.abs(v).max() for v in g0.values())
    for k in g0:
        np.testing.assert_allclose(g1[k], g0[k], rtol=1e-4, atol=1e-5 * scale, err_msg=k)
    np.testing.assert_allclose(dx1, dx0, rtol=1e-4, atol=1e-5 * np.abs(dx0).max())
    for k in s0:
        np.testing.assert_allclose(s1[k], s0[k], rtol=1e-6, atol=1e-7, err_msg=k)
    assert any(not np.allclose(s0[k], 1.0) and not np.allclose(s0[k], 0.0) for k in s0)  # statistics moved


def test_remat_sum_recomputes_parts_in_sequence():
    """The backward program of `remat_sum` recomputes each part once, after the previous part's
    input gradient: every part's recomputation depends on the gradient of the one before."""

    class Two(nnx.Module):
        def __init__(self):
            self.a = nnx.Linear(3, 3, rngs=nnx.Rngs(0))
            self.b = nnx.Linear(3, 3, rngs=nnx.Rngs(1))

    two = Two()
    parts = [lambda m, x: jnp.tanh(m.a(x)), lambda m, x: jnp.sin(m.b(x))]
    x = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)

    def f(two, x):
        return jnp.sum(remat_sum(two, x, parts) ** 2)

    def g(two, x):
        return jnp.sum((parts[0](two, x) + parts[1](two, x)) ** 2)

    v1, (d1, dx1) = nnx.value_and_grad(f, argnums=(0, 1))(two, x)
    v0, (d0, dx0) = nnx.value_and_grad(g, argnums=(0, 1))(two, x)
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    np.testing.assert_allclose(dx1, dx0, rtol=1e-5, atol=1e-7)
    for (p, a), (_, b) in zip(nnx.to_flat_state(d1), nnx.to_flat_state(d0), strict=True):
        np.testing.assert_allclose(a.get_value(), b.get_value(), rtol=1e-5, atol=1e-7, err_msg=str(p))

    # In the differentiated program, the tanh (part 0) is recomputed from inputs gated on part 1's
    # gradient: the sin's cotangent work must come first in the backward.
    graphdef, state = nnx.split(two)
    grad_program = jax.make_jaxpr(jax.grad(lambda s, x: f(nnx.merge(graphdef, s), x), argnums=1))(state, x)
    text = str(grad_program)
    assert text.count("tanh") >= 2 and text.count("sin") >= 2  # forward and recomputation
    assert text.rindex("tanh") > text.rindex("cos")  # part 0 recomputed after part 1's derivative
