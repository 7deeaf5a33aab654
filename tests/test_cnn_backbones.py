"""VGG16, VGG16-BN and ResNet-50 in torchvision's layout (the original's `bb.conv1..conv4`).

Reference data (`reference/cnn_<name>.*`, made by `make_cnn_reference.py`) holds torchvision's
stage outputs for recipe weights, and the original BiRefNet's logits around each backbone in
eval and training mode. Each checkpoint goes through a written .safetensors file, architecture
inference and the strict converter, as a user's file does. Where torchvision is installed, the
backbones are also compared with it live.
"""

import json
from functools import cache
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from reference_models import state_dict_from_recipe

import birefnet_jax
from birefnet_jax.backbones import build_backbone
from birefnet_jax.backbones.resnet import ResNetConfig
from birefnet_jax.backbones.vgg import VggConfig
from birefnet_jax.config import BACKBONES, BiRefNetConfig, backbone_name
from birefnet_jax.convert import infer_config, load_state_dict_into, model_to_state_dict, write_safetensors
from birefnet_jax.convert.infer import ArchitectureError
from birefnet_jax.convert.keymap import path_to_torch_key
from birefnet_jax.model import abstract_model
from birefnet_jax.nn.state import count_params
from birefnet_jax.verify import relative_error

REF = Path(__file__).parent / "reference"
NAMES = ("vgg16", "vgg16bn", "resnet50")
TOL = 1e-4  # the references are the original computed in float64; its own float32 run is within 3e-5
STAGE_CHANNELS = {"vgg16": (128, 256, 512, 512), "vgg16bn": (128, 256, 512, 512),
                  "resnet50": (256, 512, 1024, 2048)}

nchw = lambda a: np.asarray(a).transpose(0, 3, 1, 2)  # noqa: E731
nhwc = lambda a: np.asarray(a).transpose(0, 2, 3, 1)  # noqa: E731


@cache
def _meta(name: str) -> dict:
    return json.loads((REF / f"cnn_{name}.json").read_text())


@cache
def _arrays(name: str) -> dict[str, np.ndarray]:
    with np.load(REF / f"cnn_{name}.npz") as z:
        return {k: z[k] for k in z.files}


def _recipe_state_dict(name: str) -> dict[str, np.ndarray]:
    """The full original BiRefNet state dict (torchvision backbone keys + decoder), rebuilt
    from the NumPy recipe in the original key order."""
    return state_dict_from_recipe(_meta(name), _arrays(name))


def _shapes_only(name: str) -> dict[str, np.ndarray]:
    """Zero-cost stand-ins with the right shapes: all that architecture inference reads."""
    meta = _meta(name)
    return {k: np.broadcast_to(np.float32(0), w["shape"]) if (w := meta["weights"].get(k)) else np.zeros(())
            for k in meta["state_dict_keys"]}


def _expected_config(name: str) -> BiRefNetConfig:
    return BiRefNetConfig(backbone=BACKBONES[name], **_meta(name)["config_overrides"])


# vgg16 differs from vgg16bn only by its BatchNorms: the fast tier keeps vgg16bn and resnet50.
@pytest.fixture(scope="module", params=[pytest.param("vgg16", marks=pytest.mark.slow), "vgg16bn", "resnet50"])
def case(request, tmp_path_factory):
    """(name, recipe state dict, the model loaded from it written as .safetensors); module
    scope groups the tests by backbone, so only one ~40M-parameter model is alive at a time."""
    name = request.param
    sd = _recipe_state_dict(name)
    path = write_safetensors(sd, tmp_path_factory.mktemp("cnn_ckpt") / f"{name}.safetensors")
    yield name, sd, birefnet_jax.load(path)


_stages = nnx.jit(lambda bb, x: bb(x))
_forward = nnx.jit(lambda model, x: model(x))


def _assert_close(name: str, errors: dict[str, float]) -> None:
    """`errors` maps reference array names to relative errors; failures are shown next to the
    original's own float32 error on the same array."""
    own = _meta(name)["float32_error"]
    bad = {k: e for k, e in errors.items() if not e < TOL}
    assert not bad, {k: {"error": e, "original_float32_error": own.get(k)} for k, e in bad.items()}


def _assert_stages_match(name, feats, prefix, errors):
    arrays = _arrays(name)
    assert len(feats) == 4
    for j, f in enumerate(feats):
        ref = arrays[f"{prefix}/backbone{j + 1}"]
        assert f.shape[-1] == STAGE_CHANNELS[name][j]
        assert nchw(f).shape == ref.shape, (prefix, j, f.shape, ref.shape)
        errors[f"{prefix}/backbone{j + 1}"] = relative_error(nchw(f), ref)


def test_backbone_matches_torchvision(case):
    """The backbone alone, filled from the `bb.` keys, gives torchvision's four stage outputs
    (square and non-square input)."""
    name, sd, _ = case
    bb = nnx.eval_shape(lambda: build_backbone(BACKBONES[name], rngs=nnx.Rngs(0)))
    load_state_dict_into(bb, {k[3:]: v for k, v in sd.items() if k.startswith("bb.")})
    arrays, errors = _arrays(name), {}
    for i in range(len(_meta(name)["inputs"])):
        x = arrays[f"input{i}"]
        assert x.shape[2:] in ((64, 64), (64, 96))
        _assert_stages_match(name, _stages(bb, nhwc(x)), f"input{i}", errors)
    _assert_close(name, errors)


def test_end_to_end_eval(case):
    """Inference reads the same config back, the converted model gives the original's logits
    and backbone features, and export reproduces the checkpoint exactly."""
    name, sd, model = case
    expected = _expected_config(name)
    assert infer_config(sd) == expected
    assert model.cfg == expected
    assert model.cfg.lateral_channels[0] == (2 if expected.mul_scl_ipt == "cat" else 1) * STAGE_CHANNELS[name][-1]
    arrays, errors = _arrays(name), {}
    _assert_stages_match(name, _stages(model.bb, nhwc(arrays["input0"])), "input0", errors)
    logits = _forward(model, nhwc(arrays["input0"]))
    assert logits.shape == (1, 64, 64, 1) and np.isfinite(np.asarray(logits)).all()
    if "output0" in arrays:
        errors["output0"] = relative_error(nchw(logits), arrays["output0"])
    _assert_close(name, errors)

    exported = model_to_state_dict(model)
    assert set(exported) == set(sd)
    for key, value in sd.items():
        assert exported[key].dtype == value.dtype, key
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


@pytest.mark.slow
def test_end_to_end_train(case):
    """Training mode (BatchNorm on batch statistics, ASPP dropout off as in the reference)
    matches the original's outputs and running-statistics updates; with the `cat` input the
    backbone's BatchNorms are stepped twice, once per resolution, as in the original."""
    name, _, model = case
    model = nnx.clone(model)
    for _, m in nnx.iter_modules(model):
        if isinstance(m, nnx.Dropout):
            m.rate = 0.0
    model.train()
    arrays = _arrays(name)
    if "train/input" not in arrays:
        pytest.skip(f"cnn_{name}.npz was made without the original BiRefNet (no training-mode outputs)")
    x = arrays["train/input"]
    out = _forward(model, nhwc(x))
    assert len(out.preds) == 4 and len(out.gdt_preds) == 3 and len(out.gdt_labels) == 3
    b = x.shape[0]
    assert b > 2  # BatchNorm of pooled features over two images is too ill-conditioned to compare
    assert [p.shape for p in out.preds] == [(b, 2, 2, 1), (b, 4, 4, 1), (b, 8, 8, 1), (b, 64, 64, 1)]
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(out))
    errors = {f"train/pred{i}": relative_error(nchw(p), arrays[f"train/pred{i}"]) for i, p in enumerate(out.preds)}
    for i in range(3):
        errors[f"train/gdt_pred{i}"] = relative_error(nchw(out.gdt_preds[i]), arrays[f"train/gdt_pred{i}"])
        errors[f"train/gdt_label{i}"] = relative_error(nchw(out.gdt_labels[i]), arrays[f"train/gdt_label{i}"])
    after = model_to_state_dict(model)
    stepped = [k for k in arrays if k.startswith("train/after_step/")]
    assert any(k.startswith("train/after_step/bb.") for k in stepped) == (name != "vgg16")
    for key in stepped:
        errors[key] = relative_error(after[key.removeprefix("train/after_step/")], arrays[key])
    _assert_close(name, errors)
    passes = 2 if model.cfg.mul_scl_ipt == "cat" else 1
    for key, value in after.items():
        if key.endswith("num_batches_tracked"):
            assert int(value) == (passes if key.startswith("bb.") else 1), key


@pytest.mark.parametrize("name", NAMES)
def test_add_input_is_rejected_with_the_reason(name):
    """The original's `add` branch calls the backbone as one module, which it cannot for these."""
    with pytest.raises(ValueError, match="mul_scl_ipt='add'.*use 'cat' or ''"):
        BiRefNetConfig(backbone=BACKBONES[name], mul_scl_ipt="add")
    with pytest.raises(ArchitectureError, match="mul_scl_ipt='add'"):
        infer_config(_shapes_only(name), mul_scl_ipt="add")
    assert BiRefNetConfig(backbone=BACKBONES["swin_v1_t"], mul_scl_ipt="add").mul_scl_ipt == "add"


def test_configs_presets_and_inference():
    assert BACKBONES["vgg16"] == VggConfig(batch_norm=False)
    assert BACKBONES["vgg16bn"] == VggConfig(batch_norm=True)
    assert BACKBONES["resnet50"] == ResNetConfig(depths=(3, 4, 6, 3))
    for name in NAMES:
        bb = BACKBONES[name]
        assert bb.channels == STAGE_CHANNELS[name]
        assert backbone_name(bb) == name
        cfg = BiRefNetConfig(backbone=bb, mul_scl_ipt="")
        assert cfg.lateral_channels == STAGE_CHANNELS[name][::-1]
        assert BiRefNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
        assert birefnet_jax.get_preset(name).backbone == bb
        # vgg16 and vgg16bn differ only in BatchNorm keys; the ResNet depth is counted.
        assert infer_config(_shapes_only(name)).backbone == bb
    assert backbone_name(ResNetConfig(depths=(3, 4, 23, 3))) is None
    with pytest.raises(ValueError, match="four stages"):
        build_backbone(ResNetConfig(depths=(3, 4, 6)), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name,expected", [("vgg16", 31_995_390), ("vgg16bn", 32_003_838),
                                           ("resnet50", 54_798_334)])
def test_real_size_parameter_counts(name, expected):
    """The original BiRefNet's parameter count with this backbone and the default decoder."""
    assert count_params(abstract_model(BiRefNetConfig(backbone=BACKBONES[name]))) == expected


def test_resnet_depths_are_read_from_the_keys():
    """A deeper bottleneck ResNet (101's depths) is inferred and builds the same key set."""
    sd = _shapes_only("resnet50")
    extra = {k.replace("bb.conv3.5.", f"bb.conv3.{i}."): v for i in range(6, 23)
             for k, v in sd.items() if k.startswith("bb.conv3.5.")}
    cfg = infer_config(sd | extra)
    assert cfg.backbone == ResNetConfig(depths=(3, 4, 23, 3))
    bb = nnx.eval_shape(lambda: build_backbone(cfg.backbone, rngs=nnx.Rngs(0)))
    keys = {"bb." + path_to_torch_key(p) for p, _ in nnx.to_flat_state(nnx.state(bb, (nnx.Param, nnx.BatchStat)))}
    assert keys == {k for k in sd | extra if k.startswith("bb.")}


def test_max_pool_pads_with_minus_infinity():
    """ResNet's stem pool sees only negative values at the border: zero padding would leak 0."""
    from birefnet_jax.backbones.sequential import MaxPool2d

    x = -1.0 - np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
    y = np.asarray(MaxPool2d(3, 2, 1)(x))[0, :, :, 0]
    np.testing.assert_array_equal(y, [[-1.0, -2.0], [-5.0, -6.0]])
    assert MaxPool2d(2, 2)(np.zeros((1, 5, 7, 3), np.float32)).shape == (1, 2, 3, 3)  # floor, as PyTorch


# Live comparison with torchvision (skipped where it is not installed: it is not a dependency).


@pytest.mark.parametrize("name", NAMES)
def test_against_live_torchvision(name):
    pytest.importorskip("torchvision", reason="torchvision is not installed (not a project dependency: it pins "
                                              "its own torch build); the stored references cover this")
    import torch
    from make_cnn_reference import run_stages, torchvision_backbone

    torch.manual_seed(3)
    tv = torchvision_backbone(name)
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.2, 0.6)
                m.bias.uniform_(-0.1, 0.1)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    bb = nnx.eval_shape(lambda: build_backbone(BACKBONES[name], rngs=nnx.Rngs(0)))
    load_state_dict_into(bb, {k: v.numpy() for k, v in tv.state_dict().items()})
    x = torch.randn(2, 3, 64, 96)
    errors = {}
    for mode in ("eval", "train"):
        getattr(tv, mode)()
        getattr(bb, mode)()
        with torch.no_grad():
            ref = [f.numpy() for f in run_stages(tv, x)]
        got = _stages(bb, nhwc(x.numpy()))
        errors |= {f"{mode}{j}": relative_error(nchw(g), r) for j, (g, r) in enumerate(zip(got, ref, strict=True))}
    after = model_to_state_dict(bb)
    for key, value in tv.state_dict().items():
        if key.endswith("num_batches_tracked"):
            assert int(after[key]) == int(value) == 1
        elif key.endswith(("running_mean", "running_var")):
            errors[key] = relative_error(after[key], value.numpy())
    bad = {k: e for k, e in errors.items() if not e < TOL}
    assert not bad, bad
