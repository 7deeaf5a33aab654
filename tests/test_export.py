"""Serving export (`birefnet_jax.inference.export`) on the swin_w7 reference model: the saved
programs give the model's logits after a round trip through files, with embedded or argument
weights, a static or symbolic batch and the uint8 signature; the loader needs no model code.

Compiling this model dominates the time (~15 s a program on 2 cores, whatever the image size),
so each check reuses a program where it can: one reference forward at 64x64 serves all the
in-process comparisons, and the 256x256 comparison with the original's output rides on the
symbolic-batch program that the standalone loader runs anyway. The 64x64 programs are compiled
with LLVM optimisation off (`FAST_COMPILE`: ~3x faster to compile, same semantics, no fast-math).
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx
from reference_models import case_arrays, case_overrides, recipe_state_dict

from birefnet_jax import cli
from birefnet_jax.inference import export as ex
from birefnet_jax.inference import exported as serving
from birefnet_jax.io.images import IMAGENET_MEAN, IMAGENET_STD, normalize
from birefnet_jax.loading import model_from_state_dict
from birefnet_jax.verify import relative_error

SIZE = 64  # multiples of 32; the model runs at 64x64 (stride-32 features of 2x2, 1x1 at half scale)
TOL_ORIGINAL = 1e-4  # relative L2 against the original's output, as tests/test_parity.py
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _close(got, ref, rel=1e-5):
    """max |got - ref| within `rel` of the reference's scale."""
    got, ref = np.asarray(got), np.asarray(ref)
    assert got.shape == ref.shape and got.dtype == np.float32, (got.shape, got.dtype, ref.shape)
    err = float(np.abs(got - ref).max())
    assert err <= rel * float(np.abs(ref).max()), f"max abs diff {err:.3g}, scale {np.abs(ref).max():.3g}"


def _umask_mode(mode: int) -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


@pytest.fixture(scope="module")
def model():
    return model_from_state_dict(recipe_state_dict("swin_w7"), **case_overrides("swin_w7"))


@pytest.fixture(scope="module")
def images_u8():
    """Three 64x64 uint8 crops of the reference images (inputs de-normalised)."""
    x = case_arrays("swin_w7")["input0"].transpose(0, 2, 3, 1)
    u8 = np.clip(np.rint((x * IMAGENET_STD + IMAGENET_MEAN) * 255), 0, 255).astype(np.uint8)
    return np.stack([u8[0, :SIZE, :SIZE], u8[1, 96:96 + SIZE, 96:96 + SIZE], u8[0, -SIZE:, 128:128 + SIZE]])


@pytest.fixture(scope="module")
def reference(model, images_u8):
    """(normalised images, the model's logits), image by image: one compiled program."""
    graphdef, state = nnx.split(model)
    x = normalize(images_u8)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, x[:1]).compile(FAST_COMPILE)
    return x, np.concatenate([np.asarray(forward(state, x[i:i + 1])) for i in range(len(x))])


def _modes(m):
    return [(path, getattr(node, "deterministic", None), getattr(node, "use_running_average", None))
            for path, node in nnx.iter_graph(m) if isinstance(node, nnx.Module)]


@pytest.mark.slow
def test_embedded_round_trip_leaves_the_model_alone(model, reference, tmp_path):
    """Embedded weights, static batch: saved, loaded and run gives the eval-mode logits, even when
    the caller's model is in train mode, which it stays (nothing of it changes)."""
    x, ref = reference
    trained = nnx.clone(model)
    trained.train()
    modes, leaves = _modes(trained), jax.tree.leaves(nnx.state(trained))
    assert any(d is False for _, d, _ in modes)

    exported = ex.export_model(trained, batch=1, resolution=(SIZE, SIZE))
    assert _modes(trained) == modes
    assert all(a is b for a, b in zip(jax.tree.leaves(nnx.state(trained)), leaves, strict=True))
    assert [a.shape for a in exported.in_avals] == [(1, SIZE, SIZE, 3)]
    assert "custom_call" not in exported.mlir_module()  # deformable conv: plain gathers and dots

    path = tmp_path / "model.jaxexport"
    meta = ex.export_metadata(model, batch=1, resolution=(SIZE, SIZE))
    assert ex.save_exported(exported, path, metadata=meta) == path
    sidecar, weights_file = ex.sidecar_paths(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, sidecar.name]  # no temp files left
    for p in (path, sidecar):
        assert stat.S_IMODE(p.stat().st_mode) == _umask_mode(0o666)
    info = json.loads(sidecar.read_text())
    assert info["images"] == {"shape": [1, SIZE, SIZE, 3], "dtype": "float32"}
    assert info["outputs"] == {"shape": [1, SIZE, SIZE, 1], "dtype": "float32"}
    assert (info["weights"], info["batch"], info["layout"], info["resolution"]) == ("embedded", 1, "NHWC", [SIZE] * 2)
    assert info["config"] == json.loads(json.dumps(model.cfg.to_dict()))
    assert info["matmul_precision"] == "highest"  # conftest's; the program keeps it on any platform

    predict = ex.load_exported(path, compiler_options=FAST_COMPILE)
    _close(predict(x[:1]), ref[:1])
    with pytest.raises(ValueError, match="weights embedded"):
        ex.save_exported(exported, path, weights=ex.model_weights(model))


@pytest.mark.slow
def test_uint8_signature_multi_platform_weights_argument(model, reference, images_u8, tmp_path):
    """uint8 RGB in, probabilities out, lowered for CPU and CUDA together: on this machine it gives
    sigmoid(model(normalize(images))). Weights are an argument: the program stays small."""
    x, ref = reference
    exported = ex.export_model(model, batch=1, resolution=(SIZE, SIZE), weights="argument", uint8_input=True,
                               platforms=("cpu", "cuda"))
    assert exported.platforms == ("cpu", "cuda")
    assert exported.in_avals[-1].dtype == np.uint8
    assert "custom_call" not in exported.mlir_module()

    path = tmp_path / "u8.jaxexport"
    weights = ex.model_weights(model)
    with pytest.raises(ValueError, match="model_weights"):
        ex.save_exported(exported, path)
    ex.save_exported(exported, path, weights=weights,
                     metadata=ex.export_metadata(model, batch=1, resolution=(SIZE, SIZE), weights="argument",
                                                 uint8_input=True))
    _, weights_file = ex.sidecar_paths(path)
    assert stat.S_IMODE(weights_file.stat().st_mode) == _umask_mode(0o666)
    predict = ex.load_exported(path, compiler_options=FAST_COMPILE)
    assert predict.metadata["weights_order"] == list(weights)
    assert predict.metadata["images"]["dtype"] == "uint8" and predict.metadata["output"].startswith("probab")
    probs = predict(images_u8[:1])
    _close(probs, jax.nn.sigmoid(ref[:1]), rel=1e-5)


@pytest.mark.slow
def test_symbolic_batch_standalone_loader(model, tmp_path):
    """One program with a symbolic batch and weights as an argument, run by a process that loads
    the serving module (`inference/exported.py`) by file path and never imports birefnet_jax or
    Flax: batches of 1 and 3 give the original's logits (256x256 reference images) and agree row
    by row."""
    arrays = case_arrays("swin_w7")
    x, original = arrays["input0"].transpose(0, 2, 3, 1), arrays["output0"].transpose(0, 2, 3, 1)
    exported = ex.export_model(model, batch=None, resolution=x.shape[1:3], weights="argument")
    assert str(exported.in_avals[-1].shape[0]) == "b"
    text = exported.mlir_module()
    # A symbolic shape brings JAX's own `shape_assertion` checks (stable, run by JAX and TF alike).
    assert set(re.findall(r"custom_call @(\w+)", text)) <= {"shape_assertion"}, set(re.findall(r"@(\w+)", text))
    path = ex.save_exported(exported, tmp_path / "dyn.jaxexport", weights=ex.model_weights(model),
                            metadata=ex.export_metadata(model, batch=None, resolution=x.shape[1:3],
                                                        weights="argument"))
    assert json.loads(ex.sidecar_paths(path)[0].read_text())["batch"] == "symbolic"

    rows = [0, 1, 0]
    np.save(tmp_path / "x.npy", x[rows])
    script = tmp_path / "serve.py"
    script.write_text(textwrap.dedent("""
        import importlib.util, json, sys
        import numpy as np
        spec = importlib.util.spec_from_file_location("standalone_export", sys.argv[1])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        predict = module.load_exported(sys.argv[2], compiler_options=json.loads(sys.argv[5]))
        x = np.load(sys.argv[3])
        np.savez(sys.argv[4], b1=np.asarray(predict(x[1:2])), b3=np.asarray(predict(x)))
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("birefnet_jax", "flax"))))
    """))
    # default compile options here: unoptimised code runs the 256x256 batches slower than it compiles
    argv = [serving.__file__, path, tmp_path / "x.npy", tmp_path / "out.npz", json.dumps(None)]
    run = subprocess.run([sys.executable, str(script), *map(str, argv)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == []  # no model code, no Flax
    out = np.load(tmp_path / "out.npz")
    assert out["b1"].shape == (1, *x.shape[1:3], 1) and out["b3"].shape == (3, *x.shape[1:3], 1)
    for i, r in enumerate(rows):
        assert relative_error(out["b3"][i], original[r]) < TOL_ORIGINAL
    _close(out["b1"], out["b3"][1:2], rel=1e-4)  # two batch sizes, two compilations: not bit-identical


def _export_args(*argv):
    return cli.parse_args(["export", *(str(a) for a in argv)])


@pytest.mark.slow
def test_cli(converted, tmp_path, capsys):
    """`birefnet-jax export`: the checkpoint's training size by default, files written, an existing
    output kept unless --force, sizes not multiples of 32 refused."""
    ckpt, out = converted("swin_w7"), tmp_path / "out" / "model.jaxexport"
    with pytest.raises(SystemExit):
        _export_args(ckpt, out, "--resolution", "100x64")
    assert "multiples of 32" in capsys.readouterr().err
    assert _export_args(ckpt, out, "--batch", "dynamic").batch is None
    assert _export_args(ckpt, out, "--resolution", "64x128").resolution == (128, 64)  # WIDTHxHEIGHT

    assert cli.cmd_export(_export_args(ckpt, out, "--weights", "argument")) == 0
    sidecar, weights_file = ex.sidecar_paths(out)
    info = json.loads(sidecar.read_text())
    assert info["resolution"] == list(info["config"]["resolution"]) and info["weights"] == "argument"
    assert weights_file.exists() and str(out) in capsys.readouterr().out
    before = out.read_bytes()
    with pytest.raises(FileExistsError, match="--force"):
        cli.cmd_export(_export_args(ckpt, out, "--resolution", "64x64"))
    assert out.read_bytes() == before

    assert cli.cmd_export(_export_args(ckpt, out, "--resolution", "64x64", "--batch", "dynamic", "--force")) == 0
    info = json.loads(sidecar.read_text())
    assert (info["batch"], info["resolution"], info["weights"]) == ("symbolic", [64, 64], "embedded")
    assert not weights_file.exists()  # the stale weights of the earlier export went with it
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name, sidecar.name]


def test_options_refused(model):
    with pytest.raises(ValueError, match="multiples of 32"):
        ex.export_model(model, resolution=(64, 80))
    with pytest.raises(ValueError, match="weights"):
        ex.export_model(model, resolution=(64, 64), weights="inline")
    with pytest.raises(ValueError, match="batch"):
        ex.export_model(model, batch=0, resolution=(64, 64))
    with pytest.raises(ValueError, match=r"'tpu9'.*cpu, cuda, rocm, tpu"):  # jax.export would write it
        ex.export_model(model, resolution=(64, 64), platforms=("cpu", "tpu9"))
    with pytest.raises(ValueError, match="cuda or rocm"):
        ex.export_model(model, resolution=(64, 64), platforms=("gpu",))


def _tiny_export():
    """A (weights, images) program as save_exported sees one, without a model (traced in ms)."""
    def serve(weights, images):
        return images[..., :1] * weights[0]

    exported = jax.export.export(jax.jit(serve))([jax.ShapeDtypeStruct((1,), np.float32)],
                                                 jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32))
    return exported, {"w": np.full(1, 2.0, np.float32)}


@pytest.mark.parametrize("failure", ["serialize", "weights", "sidecar"])
def test_a_failed_save_leaves_nothing(tmp_path, monkeypatch, failure):
    """flatbuffers missing (serialize), a full disk while writing the weights, metadata that is no
    JSON: nothing of the call stays (no .weights.npz, no folder it made), and an earlier export
    under the same name is untouched."""
    exported, weights = _tiny_export()
    earlier = tmp_path / "kept" / "m.jaxexport"
    ex.save_exported(exported, earlier, weights=weights)
    before = {p.name: p.read_bytes() for p in earlier.parent.iterdir()}
    assert sorted(before) == ["m.jaxexport", "m.jaxexport.json", "m.jaxexport.weights.npz"]
    metadata = {}
    if failure == "serialize":
        def serialize(self, *args, **kwargs):
            raise ImportError("Please install 'flatbuffers' in order to use Exported serialization")

        monkeypatch.setattr(jax.export.Exported, "serialize", serialize)
        error = ImportError
    elif failure == "weights":
        def savez(f, **arrays):
            f.write(b"PK half an archive")
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(ex.np, "savez", savez)
        error = OSError
    else:
        metadata, error = {"note": object()}, TypeError
    for path in (earlier, tmp_path / "new" / "deeper" / "m.jaxexport"):
        with pytest.raises(error):
            ex.save_exported(exported, path, weights=weights, metadata=metadata)
    assert {p.name: p.read_bytes() for p in earlier.parent.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]


@pytest.mark.slow
def test_saved_model(model, reference, tmp_path, monkeypatch):
    """The TF SavedModel (jax2tf) serves the same logits; skipped without TensorFlow."""
    # TF's own XLA reads XLA_FLAGS when it first compiles (JAX read it long before): FAST_COMPILE for
    # TF, where no compiler options can be passed. Harmless if TF compiled earlier in the session.
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
    tf = pytest.importorskip("tensorflow")
    x, ref = reference
    directory = ex.export_saved_model(model, tmp_path / "saved", batch=None, resolution=(SIZE, SIZE))
    assert stat.S_IMODE(directory.stat().st_mode) == _umask_mode(0o777)
    assert [p.name for p in tmp_path.iterdir()] == ["saved"]
    with pytest.raises(FileExistsError):
        ex.export_saved_model(model, directory, resolution=(SIZE, SIZE))
    serve = tf.saved_model.load(str(directory)).signatures["serving_default"]
    got = serve(images=tf.constant(x[:2]))["logits"].numpy()
    _close(got, ref[:2])
