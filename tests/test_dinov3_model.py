"""BiRefNet around a DINOv3 backbone, against the original (`reference/model_dinov3.*`, made by
`make_dinov3_model_reference.py`): the pyramid neck and the channel rules the original applies to
single-stride backbones, conversion both ways, float32 and float64 parity end to end (logits and
intermediates, square and non-square input, training mode), and training with the backbone frozen
as the original configures it (no gradient, no optimiser state, no backward pass through it).

Each program here runs once, so they are compiled with cheap code generation (`_run`): compiling
the released decoder costs far more than running it at these sizes."""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from reference_models import case_meta, state_dict_from_recipe

import birefnet_jax
from birefnet_jax.backbones import dinov3
from birefnet_jax.backbones.dinov3 import DinoV3Config
from birefnet_jax.config import BACKBONES, NECK_CHANNELS, BiRefNetConfig
from birefnet_jax.convert import infer_config, model_to_state_dict, write_safetensors
from birefnet_jax.convert.infer import ArchitectureError
from birefnet_jax.convert.keymap import _to_torch_layout, path_to_torch_key
from birefnet_jax.model import abstract_model, random_model
from birefnet_jax.nn.state import count_params, state_path_name
from birefnet_jax.pretrained import get_preset
from birefnet_jax.train.optim import OptimConfig, freeze_backbone_if, make_optimizer
from birefnet_jax.verify import relative_error

REF = Path(__file__).parent / "reference"
TOL = 1e-4  # the references are the original computed in float64; its own float32 run is within 2e-5
DINO_NAMES = ("dino_v3_s", "dino_v3_s_plus", "dino_v3_b", "dino_v3_l", "dino_v3_h_plus", "dino_v3_7b")
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True,
                "xla_cpu_use_fusion_emitters": False}

nchw = lambda a: np.asarray(a).transpose(0, 3, 1, 2)  # noqa: E731
nhwc = lambda a: np.asarray(a).transpose(0, 2, 3, 1)  # noqa: E731


@cache
def _meta() -> dict:
    return json.loads((REF / "model_dinov3.json").read_text())


@cache
def _arrays() -> dict[str, np.ndarray]:
    with np.load(REF / "model_dinov3.npz") as z:
        return {k: z[k] for k in z.files}


def _expected_config() -> BiRefNetConfig:
    """The reference model: the tiny DINOv3, the released default decoder, the 219-class head
    (the original's DIS5K classes, on so that training mode has it)."""
    b = _meta()["backbone"]
    bb = DinoV3Config(embed_dim=b["embed_dim"], depth=b["depth"], num_heads=b["num_heads"],
                      out_indices=tuple(b["out_indices"]))
    return BiRefNetConfig(backbone=bb, num_classes=219)


def _untold() -> dict:
    """What the tiny backbone's weights cannot tell (it is no preset)."""
    b = _meta()["backbone"]
    return {"num_heads": b["num_heads"], "out_indices": tuple(b["out_indices"])}


def _compile(lowered):
    """`lowered.compile` with FAST_COMPILE, less any option this XLA does not know."""
    options = dict(FAST_COMPILE)
    while True:
        try:
            return lowered.compile(options)
        except jax.errors.JaxRuntimeError as e:
            unknown = [k for k in options if f"'{k}'" in str(e)]
            if not unknown:
                raise
            for k in unknown:
                del options[k]


def _run(fn, model, *args):
    """`fn(model, *args)`, compiled once with cheap code generation."""
    graphdef, state = nnx.split(model)

    def pure(state, *args):
        return fn(nnx.merge(graphdef, state), *args)

    return _compile(jax.jit(pure).lower(state, *args))(state, *args)


def _as_float64(model):
    """A float64 copy of `model` (inside `jax.enable_x64`), cast on the host."""
    model = nnx.clone(model)
    state = nnx.state(model, (nnx.Param, nnx.BatchStat))
    nnx.update(model, jax.tree.map(
        lambda v: jnp.asarray(np.asarray(v, np.float64)) if jnp.issubdtype(v.dtype, jnp.floating) else v, state))
    return model


def _no_dropout(model):
    """Training mode as the reference ran it: ASPP dropout off (it draws random numbers)."""
    for _, m in nnx.iter_modules(model):
        if isinstance(m, nnx.Dropout):
            m.rate = 0.0
    return model


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """(recipe state dict, the model converted from it written as .safetensors)."""
    sd = state_dict_from_recipe(_meta(), _arrays())
    path = write_safetensors(sd, tmp_path_factory.mktemp("dinov3_ckpt") / "dinov3.safetensors")
    return sd, birefnet_jax.load(path, config=_expected_config())


@cache
def _real_size(name: str) -> tuple[BiRefNetConfig, dict[str, np.ndarray], int]:
    """A preset's config, zero-cost stand-ins for its original state dict (key names, layouts and
    shapes: all that inference reads), and its parameter count."""
    cfg = get_preset(name)
    model = abstract_model(cfg)
    shapes = {}
    for path, var in nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat))):
        shape = _to_torch_layout(np.zeros(var.get_value().shape, np.bool_), path[-1]).shape
        shapes[path_to_torch_key(tuple(path))] = np.broadcast_to(np.float32(0), shape)
    return cfg, shapes, count_params(model)


# --------------------------------------------------------------------------------------------------
# Configuration and conversion


def test_channel_rules():
    """The original's rules for single-stride backbones: the neck brings every level to Swin-L's
    widths (doubled by `cat`); the context, squeeze, image-input blocks and classification head keep
    the backbone's own widths; the backbone is frozen unless told otherwise."""
    cfg = _expected_config()
    assert cfg.use_pyramid_neck and cfg.backbone_frozen and cfg.freeze_backbone is None
    assert cfg.lateral_channels == (64,) * 4 and cfg.cxt == (64, 64, 64)
    assert cfg.decoder_channels == tuple(2 * c for c in NECK_CHANNELS)
    assert cfg.replace(mul_scl_ipt="").decoder_channels == NECK_CHANNELS
    assert not cfg.replace(freeze_backbone=False).backbone_frozen
    swin = BiRefNetConfig()
    assert not swin.use_pyramid_neck and not swin.backbone_frozen and swin.replace(freeze_backbone=True).backbone_frozen
    assert swin.decoder_channels == swin.lateral_channels
    assert BiRefNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="freeze_backbone"):
        cfg.replace(freeze_backbone="yes")
    for name in DINO_NAMES:  # no released checkpoint: a name gives the backbone with the default decoder
        preset = get_preset(name)
        assert preset.backbone == BACKBONES[name] and preset.use_pyramid_neck and preset.backbone_frozen


def test_modules_and_widths(case):
    _, model = case
    d = model.decoder
    assert {n: getattr(d, f"pyramid_neck_x{n}").conv.kernel.shape[2:] for n in (4, 3, 2, 1)} == {
        4: (64, 3072), 3: (64, 1536), 2: (64, 768), 1: (64, 384)}
    assert d.ipt_blk5.conv_out.kernel.shape[-1] == d.ipt_blk1.conv_out.kernel.shape[-1] == 64 // 8
    assert d.decoder_block4.conv_in.kernel.shape[2] == 3072 + 8
    assert d.lateral_block4.conv.kernel.shape[2:] == (1536, 1536)
    assert d.conv_out1.kernel.shape[2] == 384 // 2 + 8
    assert model.squeeze_module[0].conv_in.kernel.shape[2:] == (64 * 4, 64)
    assert model.cls_head.kernel.shape == (64, 219)


def test_real_size_preset_and_its_inference():
    """dino_v3_s at its real size: the original's parameter count (built on PyTorch's `meta`
    device), and inference reads the backbone and the neck back from the keys."""
    cfg, shapes, n_params = _real_size("dino_v3_s")
    assert n_params == _meta()["real_size_parameter_counts"]["dino_v3_s"]
    assert sorted(_meta()["real_size_parameter_counts"]) == sorted(DINO_NAMES)
    assert infer_config(shapes) == cfg
    assert infer_config(shapes, freeze_backbone=False) == cfg.replace(freeze_backbone=False)
    with pytest.raises(ArchitectureError, match="lacks the pyramid neck"):
        infer_config({k: v for k, v in shapes.items() if ".pyramid_neck_" not in k})
    key = "decoder.pyramid_neck_x2.conv.weight"
    with pytest.raises(ArchitectureError, match="pyramid neck widths"):
        infer_config(dict(shapes, **{key: np.zeros((100, *shapes[key].shape[1:]), np.float32)}))
    swin = case_meta("swin_w7")  # a pyramid backbone: the original builds no neck for it
    swin = {k: np.broadcast_to(np.float32(0), w["shape"]) if (w := swin["weights"].get(k)) else np.zeros(())
            for k in swin["state_dict_keys"]}
    infer_config(swin)
    swin |= {k: v for k, v in shapes.items() if ".pyramid_neck_" in k}
    with pytest.raises(ArchitectureError, match="has the pyramid neck.*swin_v1"):
        infer_config(swin)


def test_conversion_round_trip(case):
    """The tiny backbone's sizes come from the weights plus what they cannot tell; export gives back
    every original key (neck included) bit for bit."""
    sd, model = case
    assert dinov3.infer_config(sd, **_untold()) == _expected_config().backbone
    # What `birefnet_jax.load(path, num_heads=..., out_indices=...)` does with a checkpoint:
    assert infer_config(sd, **_untold()).backbone == _expected_config().backbone
    with pytest.raises(ArchitectureError, match="num_heads"):
        infer_config(sd)  # a size that is no preset: the head count must be told
    assert model.cfg == _expected_config()
    assert sum(k.startswith("decoder.pyramid_neck_x") for k in sd) == 8
    exported = model_to_state_dict(model)
    assert set(exported) == set(sd)
    for key, value in sd.items():
        assert exported[key].dtype == value.dtype, key
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


# --------------------------------------------------------------------------------------------------
# Parity with the original


def _with_intermediates(model, x):
    """Logits and every sown intermediate: backbone, encoder levels, squeeze (the model's), the
    neck and the decoder blocks (the decoder's)."""
    out, inter = nnx.capture(model, nnx.Intermediate)(x)
    found = {"output": out}
    for scope in (inter, inter["decoder"]):
        for name, var in scope.items():
            if name != "decoder":
                value = var.get_value() if hasattr(var, "get_value") else var
                found[name.removesuffix("_out")] = value[0] if isinstance(value, tuple) else value
    return found


def _thin(name: str, a: np.ndarray) -> np.ndarray:
    """The reference keeps every (C // 16)-th channel of the wide neck and decoder outputs."""
    return a[:, :: a.shape[1] // 16] if name.startswith(("pyramid_neck_x", "decoder_block")) else a


def _compare(feats: dict, index: int, tol: float) -> dict[str, float]:
    """Relative errors of the logits and every stored intermediate of input `index`; fails above `tol`."""
    arrays = _arrays()
    refs = {k.split("/", 1)[1]: arrays[k] for k in arrays if k.startswith(f"input{index}/")}
    refs["output"] = arrays[f"output{index}"]
    assert {f"pyramid_neck_x{n}" for n in (1, 2, 3, 4)} <= set(refs) and set(refs) == set(feats), set(refs) ^ set(feats)
    errors = {}
    for key, ref in refs.items():
        got = _thin(key, nchw(feats[key]))
        assert got.shape == ref.shape, (key, got.shape, ref.shape)
        errors[key] = relative_error(got, ref)
    bad = {k: (e, _meta()["float32_error"].get(f"input{index}/{k}")) for k, e in errors.items() if not e < tol}
    assert not bad, bad
    return errors


def _capturing(model):
    model = nnx.clone(model)
    model.capture_intermediates = model.decoder.capture_intermediates = True
    return model


def test_float32_parity_with_intermediates(case):
    """The non-square input (64x96): logits and every stored intermediate (backbone, encoder levels,
    squeeze, neck, decoder blocks) within float32 rounding of the original's float64 run."""
    _, model = case
    feats = _run(_with_intermediates, _capturing(model), nhwc(_arrays()["input1"]))
    _compare(feats, 1, TOL)


@pytest.mark.slow
def test_float64_is_exact(case):
    """The square input (64x64) in float64: the original's float64 logits to rounding (~1e-13), and
    its intermediates to their float32 storage."""
    _, model = case
    arrays = _arrays()
    with jax.enable_x64(True):
        feats = _run(_with_intermediates, _as_float64(_capturing(model)), nhwc(arrays["input0"]).astype(np.float64))
    out = nchw(feats["output"])
    assert out.dtype == np.float64
    ref = arrays["float64/output0"]
    assert ref.dtype == np.float64
    err = relative_error(out, ref)
    assert err < 1e-10 and np.abs(out - ref).max() < 1e-10, err
    assert max(_compare(feats, 0, 1e-6).values()) < 1e-6


@pytest.mark.slow
def test_training_mode_outputs(case):
    """Training mode with the backbone frozen (BatchNorm on batch statistics, ASPP dropout off as in
    the reference): the multi-scale logits, gradient maps and their labels, and the auxiliary class
    logits, taken from the deepest level before the context joins it."""
    _, loaded = case
    model = _no_dropout(nnx.clone(loaded))
    model.train()
    arrays = _arrays()
    out = _run(lambda m, x: m(x), model, nhwc(arrays["train/input"]))
    got = {f"train/pred{i}": p for i, p in enumerate(out.preds)}
    got |= {f"train/gdt_pred{i}": p for i, p in enumerate(out.gdt_preds)}
    got["train/gdt_label0"] = out.gdt_labels[0]
    errors = {k: relative_error(nchw(v), arrays[k]) for k, v in got.items()}
    errors["train/cls"] = relative_error(out.cls_logits, arrays["train/cls"])
    assert len(errors) == 9 and not {k: e for k, e in errors.items() if not e < TOL}, errors
    assert _meta()["frozen_backbone_has_grad"] is False  # the original: requires_grad off for every bb.*


# --------------------------------------------------------------------------------------------------
# Training with the backbone frozen


def _light_model(**changes):
    """The tiny DINOv3 under a light decoder (no deformable attention, no multi-scale input or
    supervision: fast to compile); the freezing does not depend on the decoder."""
    cfg = _expected_config().replace(mul_scl_ipt="", dec_att="", squeeze_block="", cxt_num=0, out_ref=False,
                                     ms_supervision=False, num_classes=3, **changes)
    model = random_model(cfg, seed=3)
    for path, var in nnx.to_flat_state(nnx.state(model.bb, nnx.Param)):  # random_model zeroes them
        if str(path[-1]).startswith(("gamma_", "cls_token", "reg_token")):
            var.set_value(jnp.full(var.get_value().shape, 0.3, var.get_value().dtype))
    model.train()
    return model


def _loss(model, x):
    out = model(x)
    return sum(jnp.mean(p**2) for p in out.preds) + jnp.mean(out.cls_logits**2)


def _walk(jaxpr, found):
    """Name stacks of every equation, nested programs included."""
    for eqn in jaxpr.eqns:
        found.append(str(eqn.source_info.name_stack))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            _walk(sub, found)
    return found


_IN_BB = re.compile(r"(^|[/(])bb($|[/)])")


def _gradient_program(model, x):
    """The traced gradient program of `_loss` and the number of its operations that belong to the
    backbone's backward pass (JAX names them `transpose(jvp(... bb ...))`)."""
    graphdef, state = nnx.split(model)

    def grads(state, x):
        return nnx.grad(_loss)(nnx.merge(graphdef, state), x)

    traced = jax.jit(grads).trace(state, x)
    stacks = _walk(traced.jaxpr.jaxpr, [])
    return traced, state, sum("transpose(" in s and bool(_IN_BB.search(s)) for s in stacks)


@pytest.mark.slow
def test_frozen_backbone_training():
    """The frozen backbone gets zero gradients and no optimiser state, and the gradient program has
    no backward pass through it (unfrozen, it has); everything after it gets gradients."""
    x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    model = _light_model()
    assert model.cfg.backbone_frozen
    traced, state, backward_ops = _gradient_program(model, x)
    assert backward_ops == 0
    assert _gradient_program(_light_model(freeze_backbone=False), x)[2] > 0

    grads = _compile(traced.lower())(state, x)
    flat = {state_path_name(p, "/"): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}
    bb = [k for k in flat if k.startswith("bb/")]
    assert bb and not any(flat[k].any() for k in bb)
    assert all(flat[k].any() for k in flat if k.startswith(("decoder/pyramid_neck_x", "cls_head/")))

    # The trainer adds the backbone to the frozen parameters (freeze_backbone_if); no moments exist for it.
    opt_cfg = freeze_backbone_if(OptimConfig(lr=1e-2), model.cfg.backbone_frozen)
    assert opt_cfg.frozen == ("bb/",) and freeze_backbone_if(opt_cfg, True) == opt_cfg
    assert freeze_backbone_if(OptimConfig(), False).frozen == ()
    tx, _ = make_optimizer(opt_cfg, nnx.state(model, nnx.Param), global_batch_size=2, epochs=1, steps_per_epoch=1)
    opt_state = jax.eval_shape(tx.init, nnx.state(model, nnx.Param))  # its structure, nothing computed
    moments = [state_path_name(p, "/") for p, leaf in jax.tree_util.tree_leaves_with_path(opt_state)
               if not isinstance(leaf, optax.MaskedNode) and len(getattr(leaf, "shape", ())) > 0]
    assert sum("mu" in m.split("/") for m in moments) == sum("nu" in m.split("/") for m in moments)
    assert sum("mu" in m.split("/") for m in moments) == len(flat) - len(bb)
    assert not [m for m in moments if "/bb/" in f"/{m}/"], [m for m in moments if "bb" in m][:3]
