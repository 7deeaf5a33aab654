"""A user's mistakes get a message that names the problem and the fix, a non-zero exit, and
nothing outside the destination changes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from reference_models import REF, recipe_state_dict

import birefnet_jax
from birefnet_jax.checkpoint import CheckpointError, save_model
from birefnet_jax.cli import build_parser, main
from birefnet_jax.convert import infer_config, write_safetensors
from birefnet_jax.convert.infer import ArchitectureError
from birefnet_jax.inference.predictor import Predictor, make_predict_fn
from birefnet_jax.io.images import normalize


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes (to show that nothing changed)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, converted):
    """A converted Orbax checkpoint of the small no-BatchNorm case."""
    out = tmp_path_factory.mktemp("orbax") / "ckpt"
    assert main(["convert", str(converted("swin_nobn")), str(out)]) == 0
    return out


def run_cli(args, capsys) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


# ------------------------------------------------------------------ convert: nothing destroyed


def test_force_onto_the_current_folder_destroys_nothing(tmp_path, converted, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    src = work / "model.safetensors"
    src.write_bytes(Path(converted("swin_nobn")).read_bytes())
    (work / "notes.txt").write_text("keep me")
    before = snapshot(tmp_path)
    monkeypatch.chdir(work)
    code, err = run_cli(["convert", "model.safetensors", ".", "--force"], capsys)
    assert code == 2 and "not a birefnet-jax checkpoint" in err and "refusing" in err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("kind", ["folder", "file", "source"])
def test_force_never_replaces_what_is_not_a_checkpoint(tmp_path, converted, capsys, kind):
    src = tmp_path / "model.safetensors"
    src.write_bytes(Path(converted("swin_nobn")).read_bytes())
    if kind == "folder":
        dst = tmp_path / "photos"
        dst.mkdir()
        (dst / "a.jpg").write_bytes(b"not really")
    elif kind == "file":
        dst = tmp_path / "plain"
        dst.write_text("data")
    else:
        dst = src
    before = snapshot(tmp_path)
    code, err = run_cli(["convert", src, dst, "--force"], capsys)
    assert code == 2 and str(dst.name) in err
    assert {"folder": "not a birefnet-jax checkpoint", "file": "is a file", "source": "source"}[kind] in err
    assert snapshot(tmp_path) == before  # and no renamed copies left behind


@pytest.mark.slow
def test_force_replaces_our_own_checkpoint(tmp_path, converted, capsys):
    src, dst = converted("swin_nobn"), tmp_path / "ckpt"
    assert main(["convert", str(src), str(dst)]) == 0
    assert main(["convert", str(src), str(dst), "--force", "--resolution", "64x96"]) == 0
    assert birefnet_jax.load(dst).cfg.resolution == (96, 64)  # WxH on the command line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_checkpoint_holding_the_source_is_not_replaced(tmp_path, converted):
    model = birefnet_jax.load(converted("swin_nobn"))
    ckpt = save_model(model, tmp_path / "ckpt")
    inner = ckpt / "state" / "model.safetensors"
    inner.write_bytes(b"x")
    with pytest.raises(FileExistsError, match="holds the source"):
        save_model(model, ckpt, overwrite=True, protect=(inner,))


# ------------------------------------------------------------------ convert: messages, not tracebacks


@pytest.mark.parametrize("resolution", ["0x0", "70x70", "abc", "-32x64"])
def test_bad_resolution_is_refused_at_the_command_line(tmp_path, converted, capsys, resolution):
    with pytest.raises(SystemExit) as e:
        main(["convert", str(converted("swin_nobn")), str(tmp_path / "c"), "--resolution", resolution])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--resolution" in err
    assert not (tmp_path / "c").exists()


def test_square_size_and_bad_config_resolution():
    from birefnet_jax.cli import parse_size

    assert parse_size("1024") == (1024, 1024) and parse_size("2560x1440") == (1440, 2560)
    with pytest.raises(ValueError, match="multiple of 32"):
        birefnet_jax.get_preset("BiRefNet").replace(resolution=(70, 70))


@pytest.mark.parametrize("heads", ["1,2,5", "1,2,x,8", "0,2,5,8"])
def test_num_heads_of_the_wrong_length(tmp_path, converted, capsys, heads):
    with pytest.raises(SystemExit) as e:
        main(["convert", str(converted("pvt_v2")), str(tmp_path / "c"), "--num-heads", heads])
    assert e.value.code == 2 and "four" in capsys.readouterr().err


def test_num_heads_that_do_not_divide_or_do_not_apply(tmp_path, converted, capsys):
    code, err = run_cli(["convert", converted("pvt_v2"), tmp_path / "c", "--num-heads", "3,3,3,3"], capsys)
    assert code == 2 and "divide" in err
    code, err = run_cli(["convert", converted("swin_nobn"), tmp_path / "c", "--num-heads", "1,2,5,8"], capsys)
    assert code == 2 and "only applies to PVT v2" in err
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("key", ["bb.patch_embed.proj.weight", "decoder.decoder_block4.conv_in.weight",
                                 "bb.layers.0.blocks.0.attn.relative_position_bias_table"])
def test_state_dict_missing_a_key_that_inference_reads(tmp_path, capsys, key):
    sd = recipe_state_dict("swin_nobn")
    del sd[key]
    with pytest.raises(ArchitectureError, match=re.escape(key)):
        infer_config(sd)
    src = write_safetensors(sd, tmp_path / "broken.safetensors")
    code, err = run_cli(["convert", src, tmp_path / "c"], capsys)
    assert code == 2 and key in err and "incomplete" in err


def test_conversion_errors_only_name_flags_that_exist():
    """Every `--flag` written in the package's messages is a flag of the command line."""
    parser = build_parser()
    flags = set()
    for action in parser._subparsers._group_actions[0].choices.values():
        flags |= {s for a in action._actions for s in a.option_strings}
    flags |= {s for a in parser._actions for s in a.option_strings}
    pkg = Path(birefnet_jax.__file__).parent
    mentioned = set()
    for f in pkg.rglob("*.py"):
        if f.name == "cli.py":
            continue
        for literal in re.findall(r"\"[^\"\n]*\"|'[^'\n]*'", f.read_text()):
            if "pip install" in literal:  # pip's own flags
                continue
            mentioned |= set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", literal))
    assert mentioned, "the scan found no flags at all"
    assert mentioned <= flags, f"messages name flags that do not exist: {sorted(mentioned - flags)}"


def test_folder_that_is_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "stuff").mkdir()
    code, err = run_cli(["verify", tmp_path / "stuff", REF / "model_swin_nobn.npz"], capsys)
    assert code == 2 and "is a folder but not a birefnet-jax checkpoint" in err and "convert" in err
    code, err = run_cli(["verify", tmp_path / "nothing", REF / "model_swin_nobn.npz"], capsys)
    assert code == 2 and "no such file" in err


@pytest.mark.parametrize("damage", ["missing_state", "truncated", "missing_config"])
def test_damaged_checkpoint(tmp_path, ckpt, capsys, damage):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    if damage == "missing_state":
        shutil.rmtree(bad / "state")
    elif damage == "truncated":
        for f in (bad / "state").rglob("*"):
            if f.is_file() and f.stat().st_size > 64:
                f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    else:
        (bad / "config" / "metadata").unlink()
    with pytest.raises(CheckpointError, match="again"):
        birefnet_jax.load(bad)
    code, err = run_cli(["verify", bad, REF / "model_swin_nobn.npz"], capsys)
    assert code == 2 and str(bad) in err


def test_verify_given_nhwc_data_names_the_layout(tmp_path, ckpt, capsys):
    ref = dict(np.load(REF / "model_swin_nobn.npz"))
    ref["input0"] = ref["input0"].transpose(0, 2, 3, 1)
    np.savez(tmp_path / "nhwc.npz", **ref)
    code, err = run_cli(["verify", ckpt, tmp_path / "nhwc.npz"], capsys)
    assert code == 2 and "looks like NHWC" in err and "transpose(0, 3, 1, 2)" in err


# ------------------------------------------------------------------ overrides on a converted checkpoint


def test_overrides_on_orbax_are_applied_or_refused(ckpt):
    assert birefnet_jax.load(ckpt, resolution=(64, 128)).cfg.resolution == (64, 128)
    assert birefnet_jax.load(ckpt, mul_scl_ipt="add").cfg.mul_scl_ipt == "add"
    with pytest.raises(ValueError, match="the weights fix them"):
        birefnet_jax.load(ckpt, dec_att="ASPP")
    with pytest.raises(ValueError, match="'cat'"):
        birefnet_jax.load(ckpt, mul_scl_ipt="cat")


@pytest.mark.slow
def test_verify_override_on_orbax_changes_the_result(tmp_path, converted, capsys):
    """swin_variant was trained with the `add` multi-scale input, which the weights cannot tell:
    converted without the flag it fails verification; the flag on verify makes it pass."""
    dst = tmp_path / "variant"
    assert main(["convert", str(converted("swin_variant")), str(dst)]) == 0
    ref = REF / "model_swin_variant.npz"
    assert main(["verify", str(dst), str(ref)]) == 1
    assert main(["verify", str(dst), str(ref), "--mul-scl-ipt", "add"]) == 0
    capsys.readouterr()


# ------------------------------------------------------------------ the predict function and predictor


@pytest.mark.slow
def test_predict_fn_leaves_the_model_alone_and_sees_its_changes(converted):
    from flax import nnx

    model = birefnet_jax.load(converted("swin_nobn"))
    x = np.load(REF / "model_swin_nobn.npz")["input0"].transpose(0, 2, 3, 1)[:, :64, :64]
    model.train()
    predict = make_predict_fn(model)
    first = np.asarray(predict(x))
    assert model.deterministic is False  # still in training mode
    kernel = model.decoder.conv_out1.bias
    kernel.set_value(kernel.get_value() + 1.0)
    second = np.asarray(predict(x))
    np.testing.assert_allclose(second, first + 1.0, rtol=1e-5, atol=1e-5)
    state_before = nnx.to_pure_dict(nnx.state(model))
    pred = Predictor(model)
    kernel.set_value(kernel.get_value() + 1.0)  # the predictor owns a copy
    np.testing.assert_allclose(np.asarray(pred(x)), second, rtol=1e-5, atol=1e-5)
    assert pred.resolution == tuple(model.cfg.resolution) and pred.config is model.cfg
    assert pred.compile_count == 1 and pred.compile_seconds > 0
    assert set(nnx.to_pure_dict(nnx.state(model))) == set(state_before)


@pytest.mark.slow
def test_uint8_input_is_normalised_and_floats_never_twice(converted):
    model = birefnet_jax.load(converted("swin_nobn"))
    predict = make_predict_fn(model)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    np.testing.assert_allclose(np.asarray(predict(img)), np.asarray(predict(normalize(img))), rtol=1e-4, atol=1e-4)
    unit = img.astype(np.float32) / 255
    np.testing.assert_allclose(normalize(unit), normalize(img), atol=1e-6)
    with pytest.raises(ValueError, match="already"):
        normalize(normalize(img))
    with pytest.raises(ValueError, match="divided by 255"):
        normalize(img.astype(np.float32))
    np.testing.assert_allclose(normalize(img.astype(np.uint16) * 257), normalize(img), atol=1e-6)


@pytest.mark.parametrize("bad,exc,match", [
    (lambda x: [x[0], x[0]], TypeError, "np.stack"),
    (lambda x: x[:0], ValueError, "no images"),
    (lambda x: x[0], ValueError, r"images\[None\]"),
    (lambda x: x[..., :1], ValueError, "RGB"),
    (lambda x: x[:, :40, :40], ValueError, "multiple of 32"),
    (lambda x: x + 200.0, ValueError, r"0\.\.255 pixel values.*astype\(np\.uint8\).*normalize\(images / 255\)"),
    (lambda x: jax.numpy.asarray(x + 200.0), ValueError, r"normalize\(images / 255\)"),
    (lambda x: (x + 200).astype(np.int64), TypeError, r"int64.*astype\(np\.uint8\)"),
])
def test_wrong_batches_are_explained(model, bad, exc, match):
    """Refused before anything is compiled, with the fix in the message."""
    x = np.zeros((2, 64, 64, 3), np.float32)
    for fn in (make_predict_fn(model), Predictor(model)):
        with pytest.raises(exc, match=match):
            fn(bad(x))


@pytest.fixture(scope="module")
def model(converted):
    return birefnet_jax.load(converted("swin_nobn"))


def test_float_images_of_any_precision_share_one_program(model, monkeypatch):
    """float64 (np.array of Python floats) or bfloat16 input runs the float32 program: no second
    compilation."""
    pred = Predictor(model)
    asked = []

    def program(shape, dtype, probabilities):
        asked.append(np.dtype(dtype))
        return lambda state, x: x

    monkeypatch.setattr(pred, "_program", program)
    x = np.zeros((1, 64, 64, 3))
    for images in (x.astype(np.float32), x, jax.numpy.asarray(x, jax.numpy.bfloat16)):
        assert pred.run(images).dtype == np.float32
    assert asked == [np.dtype(np.float32)] * 3


def test_signed_integer_images_are_not_normalised_to_black():
    images = np.array([[[[0, 128, 255]] * 32] * 32])  # what np.array gives for a list of ints: int64
    assert images.dtype == np.int64
    with pytest.raises(ValueError, match=r"signed integer images \(int64\).*astype\(np\.uint8\)"):
        normalize(images)
    np.testing.assert_array_equal(normalize(images.astype(np.uint8)), normalize(images / 255))


# ------------------------------------------------------------------ predict / export flags, checked first


@pytest.mark.parametrize("flags,named", [
    (["--refine-radius", "0"], "--refine-radius"),
    (["--crop-margin", "-1"], "--crop-margin"),
    (["--workers", "-1"], "--workers"),
    (["--batch-size", "0"], "--batch-size"),
    (["--max-image-pixels", "-5"], "--max-image-pixels"),
    (["--resolution", "auto", "--bucket-step", "100"], "--bucket-step"),
    (["--resolution", "auto", "--max-pixels", "10"], "--max-pixels"),
])
def test_bad_predict_flags_are_named_before_any_work(tmp_path, capsys, flags, named):
    """Refused while parsing (the inputs and the checkpoint do not exist: nothing is looked at)."""
    code, err = run_cli(["predict", "-m", tmp_path / "missing.safetensors", "-o", tmp_path / "out",
                         tmp_path / "missing.png", *flags], capsys)
    assert code == 2 and f"error: {named} " in err, err
    assert not (tmp_path / "out").exists()


def test_export_platforms_are_checked(tmp_path, capsys):
    from birefnet_jax.cli import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(["export", str(tmp_path / "missing.safetensors"), str(tmp_path / "m.jaxexport"),
                    "--platforms", "cpu,tpu9"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--platforms" in err and "'tpu9'" in err and "cpu, cuda, rocm, tpu" in err
    args = parse_args(["export", "ckpt", "m.jaxexport", "--platforms", "CPU, cuda,cpu"])
    assert args.platforms == ("cpu", "cuda")


# ------------------------------------------------------------------ hf: without a network


def test_hub_checkpoint_offline_fails_at_once(monkeypatch, tmp_path):
    """Not in the cache and no network: the hub is asked once, without huggingface_hub's retries
    (half a minute of warnings), and the message says what to do."""
    import time

    hub = pytest.importorskip("huggingface_hub")
    from birefnet_jax.convert.io import CheckpointReadError, resolve_checkpoint

    try:
        import httpx2 as httpx
    except ImportError:  # huggingface_hub before 1.x: httpx, or requests before that
        httpx = pytest.importorskip("httpx")
    calls = []

    def download(repo_id, filename, *, local_files_only=False, **kwargs):
        calls.append(("download", local_files_only))
        if local_files_only:
            raise hub.errors.LocalEntryNotFoundError("not in the cache")
        raise AssertionError("no download without the hub")

    def metadata(url, **kwargs):
        calls.append(("metadata", url))
        raise httpx.ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr(hub, "hf_hub_download", download)
    monkeypatch.setattr(hub, "get_hf_file_metadata", metadata)
    start = time.perf_counter()
    with pytest.raises(CheckpointReadError, match=r"owner/repo.*ConnectError.*local path"):
        resolve_checkpoint("hf:owner/repo")
    assert time.perf_counter() - start < 1
    assert [c[0] for c in calls] == ["download", "metadata"] and calls[0][1] is True
    assert calls[1][1].endswith("owner/repo/resolve/main/model.safetensors")

    # In the cache: no network at all; reachable: one check, then the download.
    calls.clear()
    monkeypatch.setattr(hub, "hf_hub_download", lambda repo_id, filename, **kw: calls.append(kw) or "/c/m.safetensors")
    assert str(resolve_checkpoint("hf:owner/repo")) == "/c/m.safetensors" and calls == [{"local_files_only": True}]


# ------------------------------------------------------------------ files, version, entry points


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_exports_follow_the_umask(tmp_path, ckpt, umask):
    old = os.umask(umask)
    try:
        assert main(["convert", str(ckpt), str(tmp_path / "out.safetensors")]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "out.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


@pytest.mark.slow
def test_version_and_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "birefnet_jax", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"birefnet-jax {birefnet_jax.__version__}"
    out = subprocess.run([sys.executable, "-m", "birefnet_jax", "convert"], capture_output=True, text=True)
    assert out.returncode == 2 and "usage" in out.stderr
