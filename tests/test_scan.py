"""Repeated blocks scanned at inference give what the unrolled blocks give, and training
(random drop paths) keeps the unrolled blocks."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from birefnet_jax.backbones.swin import SwinConfig, SwinTransformer
from birefnet_jax.nn import scan


def _swin():
    cfg = SwinConfig(embed_dim=8, depths=(2, 6), num_heads=(1, 2), window_size=4, drop_path_rate=0.5)
    return SwinTransformer(cfg, rngs=nnx.Rngs(0))


def _primitives(model, x) -> set[str]:
    graphdef, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda st, v: nnx.merge(graphdef, st)(v))(state, x)
    return {e.primitive.name for e in jaxpr.jaxpr.eqns}


def _unrolled(monkeypatch, model, x):
    with monkeypatch.context() as m:
        m.setattr(scan, "MIN_GROUPS", 10**6)
        return model(x)


@pytest.mark.slow
def test_scanned_stage_equals_unrolled(monkeypatch):
    model = _swin()
    x = np.random.default_rng(0).standard_normal((2, 40, 36, 3)).astype(np.float32)
    assert "scan" in _primitives(model, x)  # the six-block stage runs as three scanned pairs
    for got, ref in zip(model(x), _unrolled(monkeypatch, model, x), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_training_mode_runs_blocks_one_by_one():
    model = _swin()
    model.train()
    x = np.zeros((1, 32, 32, 3), np.float32)
    assert "scan" not in _primitives(model, x)


@pytest.mark.parametrize("period", [1, 2])
def test_leftover_blocks_run_after_the_scan(period):
    """Seven linear blocks: the groups that repeat are scanned, the rest run after, in order."""
    rngs = nnx.Rngs(1)
    blocks = [nnx.Linear(3, 3, rngs=rngs) for _ in range(7)]
    x = np.random.default_rng(1).standard_normal((4, 3)).astype(np.float32)
    ref = x
    for b in blocks:
        ref = b(ref)
    np.testing.assert_allclose(np.asarray(scan.apply_blocks(blocks, x, period=period)), np.asarray(ref),
                               rtol=1e-5, atol=1e-5)
