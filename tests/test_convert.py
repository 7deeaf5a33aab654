"""Conversion: architecture inference, strictness, file formats, Orbax, export round trip, CLI."""

import numpy as np
import pytest
from fake_hub import patch_hub
from reference_models import MODEL_CASES, REF, case_meta, case_overrides, model_case_params, recipe_state_dict

import birefnet_jax
from birefnet_jax.checkpoint import load_model, save_model
from birefnet_jax.cli import main
from birefnet_jax.config import BACKBONES, BiRefNetConfig, backbone_name
from birefnet_jax.convert import ConversionError, infer_config, model_to_state_dict, read_state_dict
from birefnet_jax.convert.infer import ArchitectureError
from birefnet_jax.convert.io import CheckpointReadError
from birefnet_jax.loading import model_from_state_dict
from birefnet_jax.model import abstract_model
from birefnet_jax.nn.state import count_params


@pytest.mark.parametrize("case", MODEL_CASES)
def test_infer_config_matches_original_switches(case):
    meta = case_meta(case)
    oc = meta["original_config"]
    cfg = infer_config(recipe_state_dict(case), **case_overrides(case))
    assert cfg.mul_scl_ipt == oc["mul_scl_ipt"]
    assert cfg.cxt_num == oc["cxt_num"] and list(cfg.cxt) == oc["cxt"]
    assert cfg.squeeze_block == oc["squeeze_block"]
    assert cfg.dec_blk == oc["dec_blk"] and cfg.dec_att == oc["dec_att"]
    assert cfg.dec_ipt_split == oc["dec_ipt_split"]
    assert cfg.batch_norm == (oc["batch_size"] > 1)
    assert list(cfg.lateral_channels) == oc["lateral_channels_in_collection"]
    bb = meta["backbone"]
    assert cfg.backbone.kind == bb["kind"]
    assert list(cfg.backbone.depths) == bb["depths"] and list(cfg.backbone.num_heads) == bb["num_heads"]


@pytest.mark.parametrize("case", model_case_params())
def test_export_round_trip_is_identical(case, tmp_path):
    sd = recipe_state_dict(case)
    model = model_from_state_dict(sd, **case_overrides(case))
    ckpt = save_model(model, tmp_path / "orbax")
    back = model_to_state_dict(load_model(ckpt))
    assert list(sorted(back)) == list(sorted(sd))
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        assert np.array_equal(back[k], v), k


def test_pth_with_prefixes(tmp_path):
    torch = pytest.importorskip("torch", reason="the torch extra is needed to read .pth files")
    sd = recipe_state_dict("swin_nobn")
    wrapped = {"module._orig_mod." + k: torch.from_numpy(np.array(v)) for k, v in sd.items()}
    torch.save(wrapped, tmp_path / "ckpt.pth")
    got = read_state_dict(tmp_path / "ckpt.pth")
    assert set(got) == set(sd)
    assert all(np.array_equal(got[k], sd[k]) for k in sd)


def test_other_architecture_is_rejected_with_key_lists():
    wrong = recipe_state_dict("swin_nobn")
    model = abstract_model(infer_config(recipe_state_dict("swin_variant"), mul_scl_ipt="add"))
    from birefnet_jax.convert import load_state_dict_into

    with pytest.raises(ConversionError) as e:
        load_state_dict_into(model, wrong)
    msg = str(e.value)
    assert "missing keys" in msg and "unexpected keys" in msg and "shape mismatches" in msg
    assert "decoder.ipt_blk2.conv1.weight: checkpoint (64, 48, 3, 3), model expects (64, 3, 3, 3)" in msg


def test_missing_key_is_named():
    sd = recipe_state_dict("swin_nobn")
    cfg = infer_config(sd)
    del sd["decoder.conv_out1.0.weight"]
    with pytest.raises(ConversionError, match=r"1 missing keys:\n  decoder\.conv_out1\.0\.weight"):
        model_from_state_dict(sd, cfg)


def test_unexpected_and_misshaped_keys_are_named():
    sd = recipe_state_dict("swin_nobn")
    cfg = infer_config(sd)
    sd["decoder.extra.weight"] = np.zeros(3, np.float32)
    sd["decoder.conv_out1.0.bias"] = np.zeros(2, np.float32)
    with pytest.raises(ConversionError) as e:
        model_from_state_dict(sd, cfg)
    assert "decoder.extra.weight" in str(e.value)
    assert "decoder.conv_out1.0.bias: checkpoint (2,), model expects (1,)" in str(e.value)


def test_truncated_and_foreign_files(tmp_path, converted):
    data = converted("swin_nobn").read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointReadError, match="truncated"):
        read_state_dict(bad)
    with pytest.raises(CheckpointReadError, match="no such file"):
        read_state_dict(tmp_path / "absent.safetensors")
    with pytest.raises(ArchitectureError, match="not a BiRefNet state dict"):
        infer_config({"encoder.weight": np.zeros((3, 3), np.float32)})


def test_image_size_not_multiple_of_32(converted):
    model = birefnet_jax.load(converted("swin_nobn"))
    with pytest.raises(ValueError, match="not a multiple of 32"):
        model(np.zeros((1, 100, 96, 3), np.float32))


@pytest.mark.slow
def test_cli_convert_verify_export(tmp_path, converted, capsys):
    src = converted("swin_nobn")
    dst = tmp_path / "orbax"
    assert main(["convert", str(src), str(dst)]) == 0
    assert main(["convert", str(src), str(dst)]) == 2  # exists, no --force
    assert main(["verify", str(dst), str(REF / "model_swin_nobn.npz")]) == 0
    assert "parity verified" in capsys.readouterr().out
    # A wrong reference fails verification with a non-zero status.
    ref = dict(np.load(REF / "model_swin_nobn.npz"))
    ref["output0"] = ref["output0"] + 1.0
    np.savez(tmp_path / "wrong.npz", **ref)
    assert main(["verify", str(dst), str(tmp_path / "wrong.npz")]) == 1
    out = tmp_path / "export.safetensors"
    assert main(["convert", str(dst), str(out)]) == 0
    a, b = read_state_dict(src), read_state_dict(out)
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("bb,expected", [pytest.param("swin_v1_l", 220_176_498, marks=pytest.mark.slow),
                                         pytest.param("swin_v1_t", 44_313_720, marks=pytest.mark.slow),
                                         pytest.param("pvt_v2_b2", 39_665_678, marks=pytest.mark.slow)])
def test_real_presets_parameter_counts(bb, expected):
    cfg = BiRefNetConfig(backbone=BACKBONES[bb])
    assert count_params(abstract_model(cfg)) == expected
    assert backbone_name(cfg.backbone) == bb


def test_presets_resolve():
    assert birefnet_jax.get_preset("BiRefNet_HR").resolution == (2048, 2048)
    assert backbone_name(birefnet_jax.get_preset("BiRefNet_lite").backbone) == "swin_v1_t"
    with pytest.raises(KeyError, match="unknown preset"):
        birefnet_jax.get_preset("nope")


def test_invalid_config_is_explained():
    with pytest.raises(ValueError, match="dec_att='bogus'"):
        BiRefNetConfig(dec_att="bogus")


def test_half_precision_safetensors_are_upcast(tmp_path):
    import ml_dtypes

    from birefnet_jax.convert import write_safetensors

    sd = recipe_state_dict("swin_nobn")
    half = {k: v.astype(ml_dtypes.bfloat16) if v.dtype == np.float32 else v for k, v in sd.items()}
    got = read_state_dict(write_safetensors(half, tmp_path / "half.safetensors"))
    key = "decoder.conv_out1.0.weight"
    assert got[key].dtype == np.float32
    np.testing.assert_array_equal(got[key], sd[key].astype(ml_dtypes.bfloat16).astype(np.float32))


def test_hub_spec_is_resolved_through_huggingface_hub(monkeypatch, converted):

    calls = []

    def fake_download(repo_id, filename):
        calls.append((repo_id, filename))
        return str(converted("swin_nobn"))

    patch_hub(monkeypatch, fake_download)
    sd = read_state_dict("hf:ZhengPeng7/BiRefNet_lite")
    assert calls == [("ZhengPeng7/BiRefNet_lite", "model.safetensors")]
    assert "decoder.conv_out1.0.weight" in sd


def test_overwrite_replaces_a_checkpoint_only_when_complete(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    sd = recipe_state_dict("swin_nobn")
    model = model_from_state_dict(sd)
    ckpt = save_model(model, tmp_path / "ckpt")
    with pytest.raises(FileExistsError, match="--force"):
        save_model(model, ckpt)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ocp.Checkpointer, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_model(model, ckpt, overwrite=True)
    monkeypatch.undo()
    back = model_to_state_dict(load_model(ckpt))  # the old checkpoint is intact
    assert all(np.array_equal(back[k], sd[k]) for k in sd)
    save_model(model, ckpt, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_hub_checkpoints_are_converted_once_and_cached(monkeypatch, converted, tmp_path):

    from birefnet_jax.convert.io import CheckpointReadError

    calls = []

    def fake_download(repo_id, filename):
        calls.append((repo_id, filename))
        return str(converted("swin_nobn"))

    monkeypatch.setenv("BIREFNET_JAX_CACHE", str(tmp_path / "cache"))
    patch_hub(monkeypatch, fake_download)
    first = birefnet_jax.load("hf:ZhengPeng7/BiRefNet_lite")
    second = birefnet_jax.load("hf:ZhengPeng7/BiRefNet_lite")
    assert calls == [("ZhengPeng7/BiRefNet_lite", "model.safetensors")]  # downloaded and converted once
    assert (tmp_path / "cache" / "hf" / "ZhengPeng7--BiRefNet_lite--model.safetensors" / "config").is_dir()
    a, b = model_to_state_dict(first), model_to_state_dict(second)
    assert all(np.array_equal(a[k], b[k]) for k in a)

    def offline(repo_id, filename):
        raise OSError("Temporary failure in name resolution")

    patch_hub(monkeypatch, offline, online=False)
    with pytest.raises(CheckpointReadError, match="Without a network.*local path"):
        birefnet_jax.load("hf:ZhengPeng7/BiRefNet")
