"""The core install stays light: importing the package, converting a `.safetensors` file and a
forward pass load none of the extras' heavy packages, and each backbone family is registered once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from birefnet_jax.backbones import TABLE, detect
from birefnet_jax.convert import infer_config
from birefnet_jax.convert.keymap import path_to_torch_key
from birefnet_jax.model import abstract_model

HEAVY = ("tensorflow", "torch", "scipy", "skimage", "cv2", "av", "matplotlib", "clu", "tensorflow_datasets")


@pytest.mark.slow
def test_import_convert_and_predict_import_nothing_heavy(converted, tmp_path):
    src = converted("swin_nobn")
    code = f"""
import sys
import numpy as np
import birefnet_jax
from birefnet_jax.checkpoint import save_model
model = birefnet_jax.load({str(src)!r})
save_model(model, {str(tmp_path / 'ckpt')!r})
predictor = birefnet_jax.load_predictor({str(tmp_path / 'ckpt')!r})
out = predictor(np.zeros((1, 64, 64, 3), np.uint8))
assert out.shape == (1, 64, 64, 1)
from birefnet_jax.inference.export import export_to_file, load_exported
export_to_file(model, {str(tmp_path / 'model.jaxexport')!r}, resolution=(64, 64))  # serializes
assert load_exported({str(tmp_path / 'model.jaxexport')!r}).exported.in_avals[0].shape == (1, 64, 64, 3)
heavy = [m for m in {HEAVY!r} if m in sys.modules]
print("HEAVY", heavy)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "HEAVY []" in out.stdout, out.stdout


def _core_closure() -> set[str]:
    """The distributions a core install brings: the package's dependencies without extras (from
    pyproject.toml where Python reads TOML, as the installed metadata may predate an edit), and
    theirs, transitively, as installed here (markers evaluated, extras not followed)."""
    import importlib.metadata as metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    try:
        import tomllib  # Python 3.11+

        todo = [Requirement(r) for r in tomllib.loads(pyproject.read_text())["project"]["dependencies"]]
    except (ImportError, OSError):
        todo = [Requirement(r) for r in metadata.requires("birefnet-jax") or ()]
    seen: set[str] = set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        try:
            todo.extend(Requirement(r) for r in metadata.requires(req.name) or ())
        except metadata.PackageNotFoundError:
            pass
    return seen


def test_export_needs_only_core_dependencies(tmp_path):
    """Exporting and serializing a program (`birefnet-jax export`, `load_exported`) works with the
    core dependencies alone: a process where every installed package outside them cannot be
    imported (as on a core install) exports, serializes and reads back a program. jax.export's
    serialization needs flatbuffers, which jax does not declare and TensorFlow (an extra) would
    otherwise bring in unnoticed."""
    import importlib.metadata as metadata

    from packaging.utils import canonicalize_name

    core = _core_closure()
    blocked = sorted(m for m, dists in metadata.packages_distributions().items()
                     if not any(canonicalize_name(d) in core for d in dists))
    code = f"""
import sys

BLOCKED = set({blocked!r})


class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not a core dependency)", name=name)
        return None


sys.meta_path.insert(0, NotInstalled())
import jax, jax.numpy as jnp
exported = jax.export.export(jax.jit(lambda x: x * 2))(jax.ShapeDtypeStruct((1, 4), jnp.float32))
again = jax.export.deserialize(exported.serialize())
assert again.in_avals == exported.in_avals
print("OK")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


class _Shape:
    """Stands in for a tensor where only the shape is read."""

    def __init__(self, shape):
        self.shape = tuple(shape)


# One preset per structural variant (the parameter counts of the big ones are checked in test_convert).
@pytest.mark.parametrize("name", ["swin_v1_t", pytest.param("swin_v1_b", marks=pytest.mark.slow), "pvt_v2_b0",
                                  pytest.param("pvt_v2_b2", marks=pytest.mark.slow), "resnet50", "vgg16", "vgg16bn"])
def test_each_preset_is_recognised_and_sized_from_its_keys(name):
    """The table's key identifies the family and its `infer_config` recovers the preset, from the
    keys and shapes the model itself would save."""
    from flax import nnx

    from birefnet_jax.config import BACKBONES, BiRefNetConfig, backbone_name

    cfg = BiRefNetConfig(backbone=BACKBONES[name])
    model = abstract_model(cfg)
    sd = {}
    for path, var in nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat))):
        shape = var.get_value().shape
        if path[-1] == "kernel" and len(shape) == 4:
            shape = (shape[3], shape[2], shape[0], shape[1])
        elif path[-1] == "kernel" and len(shape) == 2:
            shape = shape[::-1]
        sd[path_to_torch_key(tuple(path))] = _Shape(shape)
    assert detect(sd) is TABLE[cfg.backbone.kind]
    inferred = infer_config(sd)
    assert backbone_name(inferred.backbone) == name  # the preset, up to the drop-path rate (not in weights)
    assert inferred == cfg.replace(backbone=inferred.backbone)


def test_unknown_backbone_names_the_known_ones():
    from birefnet_jax.backbones.spec import ArchitectureError

    with pytest.raises(ArchitectureError, match="swin_v1, pvt_v2"):
        detect({"foo.weight": np.zeros(1)})


@pytest.mark.slow
def test_random_model_fills_every_variable_without_initialisers():
    """`random_model` (benchmarks) gives concrete weights in the stated distributions."""
    import jax
    from flax import nnx

    from birefnet_jax.config import BACKBONES, BiRefNetConfig
    from birefnet_jax.model import random_model
    from birefnet_jax.nn.state import count_params

    cfg = BiRefNetConfig(backbone=BACKBONES["pvt_v2_b0"], resolution=(256, 256))
    model = random_model(cfg, seed=3)
    flat = nnx.to_flat_state(nnx.state(model))
    assert all(isinstance(v.get_value(), jax.Array) for _, v in flat)
    assert count_params(model) == count_params(abstract_model(cfg))
    kernels = {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in flat if p[-1] == "kernel"}
    deform = [k for k in kernels if "offset_conv" in k or "modulator_conv" in k]
    assert deform and all(not kernels[k].any() for k in deform)
    big = max((k for k in kernels if k not in deform), key=lambda k: kernels[k].size)
    fan_in = int(np.prod(kernels[big].shape[:-1]))
    assert abs(kernels[big].std() * np.sqrt(fan_in) - 1) < 0.05
