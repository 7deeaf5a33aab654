"""The training configs and fine-tuning initialisation (no compilation: cheap)."""

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from birefnet_jax.checkpoint import save_model
from birefnet_jax.model import random_model
from birefnet_jax.nn.state import state_path_name
from birefnet_jax.pretrained import RELEASED_CONFIGS
from birefnet_jax.train import losses
from birefnet_jax.train.optim import OptimConfig
from birefnet_jax.train.trainer import _optim_config, load_weights_into, model_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TASK_FILES = {"dis5k": "DIS5K", "cod": "COD", "hrsod": "HRSOD", "general": "General", "general_2k": "General-2K",
              "matting": "Matting"}


@pytest.mark.parametrize("name", [*TASK_FILES, "quickstart"])
def test_every_config_builds_its_model_and_optimiser(name):
    c = importlib.import_module(f"configs.{name}").get_config()
    cfg = model_config(c)
    assert cfg.backbone.kind in ("swin_v1", "pvt_v2")
    opt = _optim_config(c)
    assert isinstance(opt, OptimConfig) and opt.task == c.task
    if name in TASK_FILES:
        assert c.task == TASK_FILES[name]
        assert cfg == RELEASED_CONFIGS["BiRefNet"].replace(resolution=cfg.resolution)  # Swin-L, the released decoder
        assert c.epochs > 100 and losses.lambdas_for_epoch(1, c.epochs, c.task) == dict(losses.LAMBDAS_PIX_LAST[c.task])
    if name == "general_2k":
        assert tuple(c.data.size) == (1440, 2560)


def test_config_overrides_reach_the_model_and_the_optimiser():
    from configs.dis5k import get_config

    c = get_config()
    c.model.preset = "swin_v1_t"
    c.model.overrides = {"dec_att": "ASPP"}
    c.data.class_labels = True
    c.optim.frozen = ("bb/",)
    cfg = model_config(c)
    assert cfg.backbone.embed_dim == 96 and cfg.dec_att == "ASPP" and cfg.num_classes == 219
    assert _optim_config(c).frozen == ("bb/",)
    c.optim.momentum = 0.9
    with pytest.raises(ValueError, match="unknown config.optim fields.*momentum"):
        _optim_config(c)


def _weights(model):
    return {state_path_name(p, "/"): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat)))}


@pytest.mark.slow
def test_fine_tuning_starts_from_a_checkpoint_with_a_new_head(tmp_path):
    from train_helpers import tiny_config

    cfg = model_config(tiny_config())
    source = random_model(cfg, seed=1)
    save_model(source, tmp_path / "released")
    with_head = random_model(cfg.replace(num_classes=5), seed=2)
    fresh = _weights(with_head)
    with pytest.raises(ValueError, match=r"(?s)cls_head/kernel: not in .*init_exclude"):
        load_weights_into(with_head, str(tmp_path / "released"))
    kept = load_weights_into(with_head, str(tmp_path / "released"), exclude=("cls_head/",))
    assert sorted(kept) == ["cls_head/bias", "cls_head/kernel"]
    got, src = _weights(with_head), _weights(source)
    for k, v in got.items():
        np.testing.assert_array_equal(v, fresh[k] if k.startswith("cls_head/") else src[k], err_msg=k)
    wider = random_model(cfg.replace(backbone=cfg.backbone.__class__(**{**cfg.backbone.__dict__, "embed_dim": 16})))
    with pytest.raises(ValueError, match=r"shape .* in the model"):
        load_weights_into(wider, str(tmp_path / "released"))


@pytest.mark.slow
def test_remat_gives_the_same_loss_and_gradients():
    """Rematerialisation (every backbone and decoder block recomputed in the backward pass, once
    its output's cotangent exists) changes memory, not results."""
    import functools

    import jax
    from train_helpers import batch, tiny_config

    from birefnet_jax.model import set_remat
    from birefnet_jax.train.batchnorm import set_train_mode
    from birefnet_jax.train.step import loss_fn
    from birefnet_jax.train.trainer import initial_model

    c = tiny_config()
    data = batch(2)
    value_and_grad = nnx.value_and_grad(functools.partial(loss_fn, lambdas=None), has_aux=True)
    results = []
    for remat in (False, True):
        model = set_remat(initial_model(c, model_config(c)), remat)
        set_train_mode(model, batch_norm="batch")
        graphdef, state = nnx.split(model)

        def loss(state, graphdef=graphdef):  # the forward: autodiff would inline the custom VJPs
            return loss_fn(nnx.merge(graphdef, state), data)[0]

        program = str(jax.make_jaxpr(loss)(state))
        (value, _), grads = nnx.jit(value_and_grad)(model, data)
        flat = {state_path_name(p, "/"): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}
        results.append((float(value), flat, program.count("custom_vjp_call")))
    (l0, g0, remat0), (l1, g1, remat1) = results
    # One rematerialised call per block (nn.remat's custom VJP), only when asked for.
    assert remat0 == 0 and remat1 > 0, (remat0, remat1)
    assert l1 == pytest.approx(l0, rel=1e-6)
    for k in g0:
        np.testing.assert_allclose(g1[k], g0[k], rtol=1e-4, atol=1e-5, err_msg=k)
