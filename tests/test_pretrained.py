"""The released checkpoints by name (`birefnet_jax.pretrained`): the table, and every way of naming a
release (its name, its hub repository, a local file named as it) loading with the settings it was
trained with. Offline: the hub client is replaced at its boundary (`huggingface_hub.hf_hub_download`)
by one that serves a tiny checkpoint."""

import shutil
import sys

import numpy as np
import pytest
from fake_hub import patch_hub
from PIL import Image

import birefnet_jax
from birefnet_jax import loading, pretrained
from birefnet_jax.checkpoint import CheckpointError, read_config, save_model
from birefnet_jax.cli import main
from birefnet_jax.config import BACKBONES, BiRefNetConfig
from birefnet_jax.convert.io import CheckpointReadError
from birefnet_jax.inference import pipeline
from birefnet_jax.loading import model_from_state_dict
from birefnet_jax.pretrained import DYNAMIC_SIZE, RELEASED_CONFIGS, RELEASES

# The checkpoints the original's README, demo and release page name (issue 20).
EXPECTED = ("BiRefNet", "BiRefNet_lite", "BiRefNet_HR", "BiRefNet_lite-2K", "BiRefNet-matting", "BiRefNet_HR-matting",
            "BiRefNet-portrait", "BiRefNet_dynamic", "BiRefNet_dynamic-matting", "BiRefNet_512x512", "BiRefNet-DIS5K",
            "BiRefNet-COD", "BiRefNet-HRSOD", "BiRefNet-DIS5K-TR_TEs", "BiRefNet-legacy", "BiRefNet_lite-matting")


# --------------------------------------------------------------------------------------------------
# The table


def test_every_release_is_in_the_table_with_its_training_settings():
    assert set(EXPECTED) <= set(RELEASES)
    for name, r in RELEASES.items():
        assert r.name == name and r.repo == f"ZhengPeng7/{name}" and r.hub_file == "model.safetensors"
        assert r.url == f"https://huggingface.co/ZhengPeng7/{name}/resolve/main/model.safetensors"
        assert r.backbone in BACKBONES and r.task in pretrained.TASKS
        assert all(f.endswith(".pth") for f in r.release_files)
        assert RELEASED_CONFIGS[name] == r.config() == birefnet_jax.get_preset(name)
        assert (r.dynamic_size is not None) == ("dynamic" in name)
    assert RELEASES["BiRefNet_HR"].resolution == RELEASES["BiRefNet_HR-matting"].resolution == (2048, 2048)
    assert RELEASES["BiRefNet_lite-2K"].resolution == (1440, 2560)  # the original's 2560x1440, width first
    assert RELEASES["BiRefNet_512x512"].resolution == (512, 512)
    assert RELEASES["BiRefNet_dynamic"].dynamic_size == DYNAMIC_SIZE == (256, 2304)
    assert RELEASES["BiRefNet_HR"].release_files == ("BiRefNet_HR-general-epoch_130.pth",)
    assert RELEASES["BiRefNet"].release_files == ("BiRefNet-general-epoch_244.pth",)
    lite = {n for n, r in RELEASES.items() if r.backbone == "swin_v1_t"}
    assert lite == {"BiRefNet_lite", "BiRefNet_lite-2K", "BiRefNet_lite-matting"}
    # one release per spelling: names, aliases and file stems never collide
    spellings = [s.lower() for r in RELEASES.values() for s in (r.name, *r.aliases)]
    stems = [f.lower().removesuffix(".pth") for r in RELEASES.values() for f in r.release_files]
    assert len(set(spellings)) == len(spellings) and len(set(stems)) == len(stems)


def test_names_aliases_files_and_hub_repositories_find_their_release():
    hr = RELEASES["BiRefNet_HR"]
    assert pretrained.find_release("BiRefNet-HR") is hr and pretrained.find_release("birefnet_hr") is hr
    assert pretrained.get_release("BiRefNet-massive") is RELEASES["BiRefNet-DIS5K-TR_TEs"]
    assert pretrained.release_for_hub("zhengpeng7/BiRefNet_HR") is hr
    assert pretrained.release_for_hub("ZhengPeng7/BiRefNet_HR", "other.safetensors") is None
    assert pretrained.release_for_hub("someone/BiRefNet_HR") is None
    assert pretrained.release_for_file("/w/BiRefNet_HR-general-epoch_130.pth") is hr
    assert pretrained.release_for_file("BiRefNet_HR-general-epoch_130.safetensors") is hr
    assert pretrained.release_for_file("/w/BiRefNet_HR.safetensors") is hr
    assert pretrained.release_for_file("/hf/models--ZhengPeng7--BiRefNet_HR/snapshots/0ab/model.safetensors") is hr
    assert pretrained.release_for_file("/w/model.safetensors") is None
    assert pretrained.release_for_file("/w/BiRefNet-general-epoch_300.pth") is None  # a fine-tune: not a release
    assert birefnet_jax.get_preset("swin_v1_t") == BiRefNetConfig(backbone=BACKBONES["swin_v1_t"])


def test_unknown_names_say_which_was_meant():
    with pytest.raises(KeyError, match="did you mean 'BiRefNet-DIS5K'"):
        pretrained.get_release("BiRefNet-DIS5")
    with pytest.raises(KeyError, match="unknown preset.*Did you mean 'BiRefNet_lite'"):
        birefnet_jax.get_preset("BiRefNet_lit")
    assert pretrained.suggest("BiRefNet_HRR")[0] == "BiRefNet_HR"  # aliases count, but once per release


# --------------------------------------------------------------------------------------------------
# Loading by name, hub repository and file


@pytest.fixture
def hub(monkeypatch, converted, tmp_path):
    """A hub that serves the tiny `swin_nobn` checkpoint for every file and records the requests; a
    fresh conversion cache."""

    calls = []

    def download(repo_id, filename):
        calls.append((repo_id, filename))
        return str(converted("swin_nobn"))

    monkeypatch.setenv("BIREFNET_JAX_CACHE", str(tmp_path / "cache"))
    patch_hub(monkeypatch, download)
    pipeline._cached_predictor.cache_clear()
    yield calls
    pipeline._cached_predictor.cache_clear()


def test_a_release_name_loads_from_its_hub_repository_at_its_resolution(hub, tmp_path):
    model = birefnet_jax.load("BiRefNet_HR")
    assert hub == [("ZhengPeng7/BiRefNet_HR", "model.safetensors")]
    assert model.cfg.resolution == (2048, 2048) and model.cfg.dynamic_size is None
    # the hub spec, in any letter case, is the same release and the same cached copy
    assert birefnet_jax.load("hf:zhengpeng7/birefnet_hr").cfg.resolution == (2048, 2048)
    assert len(hub) == 1
    cached = tmp_path / "cache" / "hf" / "ZhengPeng7--BiRefNet_HR--model.safetensors"
    cfg, meta = read_config(cached)
    assert cfg.resolution == (2048, 2048) and meta["release"] == "BiRefNet_HR"  # the copy keeps the settings
    # an explicit override wins, from the cache too
    assert birefnet_jax.load("BiRefNet_HR", resolution=(512, 768)).cfg.resolution == (512, 768)
    assert len(hub) == 1


def test_a_copy_cached_before_the_release_table_gets_the_settings(hub, converted, tmp_path):
    stale = tmp_path / "cache" / "hf" / "ZhengPeng7--BiRefNet_HR--model.safetensors"
    from reference_models import recipe_state_dict

    save_model(model_from_state_dict(recipe_state_dict("swin_nobn")), stale)
    assert read_config(stale)[0].resolution == (1024, 1024)
    assert birefnet_jax.load("hf:ZhengPeng7/BiRefNet_HR").cfg.resolution == (2048, 2048)
    assert hub == []  # nothing downloaded


def test_a_local_file_named_as_a_release_gets_its_settings(converted, tmp_path):
    src = converted("swin_nobn")
    named = tmp_path / "BiRefNet_HR-general-epoch_130.safetensors"
    shutil.copy(src, named)
    assert birefnet_jax.load(named).cfg.resolution == (2048, 2048)
    assert birefnet_jax.load(named, resolution=(1024, 1024)).cfg.resolution == (1024, 1024)  # override wins
    assert birefnet_jax.load(src).cfg.resolution == (1024, 1024)  # any other name: the defaults
    snapshot = tmp_path / "models--ZhengPeng7--BiRefNet_lite-2K" / "snapshots" / "0ab" / "model.safetensors"
    snapshot.parent.mkdir(parents=True)
    shutil.copy(src, snapshot)
    assert birefnet_jax.load(snapshot).cfg.resolution == (1440, 2560)  # a file of the Hugging Face cache
    config = birefnet_jax.load(src).cfg
    assert birefnet_jax.load(named, config).cfg.resolution == (1024, 1024)  # a given config is taken as it is


def test_an_existing_folder_wins_over_a_release_of_the_same_name(hub, converted, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["convert", str(converted("swin_nobn")), "BiRefNet_HR"]) == 0  # the user's own folder
    assert birefnet_jax.load("BiRefNet_HR").cfg.resolution == (1024, 1024)
    assert hub == []


def test_convert_by_release_name_records_the_dynamic_range(hub, tmp_path):
    dst = tmp_path / "dynamic"
    assert main(["convert", "BiRefNet_dynamic", str(dst)]) == 0
    cfg = read_config(dst)[0]
    assert cfg.dynamic_size == (256, 2304) and cfg.resolution == (1024, 1024)
    assert birefnet_jax.load(dst).cfg.dynamic_size == (256, 2304)
    assert birefnet_jax.load(dst, resolution=(512, 512)).cfg.dynamic_size is None  # see below


def test_a_resolution_alone_runs_a_dynamic_release_at_that_fixed_size(converted, tmp_path):
    named = tmp_path / "BiRefNet_dynamic-general-epoch_174.safetensors"
    shutil.copy(converted("swin_nobn"), named)
    assert birefnet_jax.load(named).cfg.dynamic_size == (256, 2304)
    fixed = birefnet_jax.load(named, resolution=(512, 512)).cfg
    assert fixed.resolution == (512, 512) and fixed.dynamic_size is None
    both = birefnet_jax.load(named, resolution=(512, 512), dynamic_size=(256, 1024)).cfg
    assert both.dynamic_size == (256, 1024)
    stored = BiRefNetConfig(dynamic_size=(256, 2304))  # an Orbax checkpoint's stored config
    assert loading._apply_overrides(stored, {"resolution": (512, 512)}, what="it").dynamic_size is None
    assert loading._apply_overrides(stored, {"dropout": 0.0}, what="it").dynamic_size == (256, 2304)


# --------------------------------------------------------------------------------------------------
# predict: the dynamic releases run at each image's size


def test_the_dynamic_size_policy():
    dyn = pipeline.size_policy(None, (1024, 1024), dynamic_size=(256, 2304))
    assert dyn.fixed is None and dyn.max_pixels == 2304 * 2304
    assert pipeline.size_policy("auto", (1024, 1024), dynamic_size=(256, 2304)).max_pixels == 2304 * 2304
    assert pipeline.size_policy(None, (1024, 1024), dynamic_size=(256, 2304), max_pixels=4096 * 128).max_pixels \
        == 4096 * 128
    assert pipeline.size_policy("512x256", (1024, 1024), dynamic_size=(256, 2304)).fixed == (256, 512)
    assert pipeline.size_policy(None, (2048, 2048)).fixed == (2048, 2048)


@pytest.fixture
def policies(monkeypatch):
    """The size policy each predict call runs with (nothing is decoded or compiled)."""
    seen = []
    monkeypatch.setattr(pipeline, "predict_images", lambda plan, predictor, policy, *a, **k: seen.append(policy))
    return seen


def test_predict_by_release_name_runs_as_trained(hub, policies, tmp_path):
    image = tmp_path / "in" / "a.png"
    image.parent.mkdir()
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(image)
    out = str(tmp_path / "out")
    assert main(["predict", str(image), "-m", "BiRefNet_dynamic", "-o", out, "-q"]) == 0
    assert policies[-1].fixed is None and policies[-1].max_pixels == 2304 * 2304  # --resolution auto, up to 2304^2
    assert main(["predict", str(image), "-m", "BiRefNet_dynamic", "-o", out, "-q", "--resolution", "1024x512"]) == 0
    assert policies[-1].fixed == (512, 1024)  # the user's resolution wins
    assert main(["predict", str(image), "-m", "BiRefNet_HR", "-o", out, "-q"]) == 0
    assert policies[-1].fixed == (2048, 2048)
    assert [repo for repo, _ in hub] == ["ZhengPeng7/BiRefNet_dynamic", "ZhengPeng7/BiRefNet_HR"]


# --------------------------------------------------------------------------------------------------
# The command and the messages


def test_models_lists_every_release(capsys):
    assert main(["models"]) == 0
    text = capsys.readouterr().out
    for r in RELEASES.values():
        assert r.name in text and r.repo in text and all(f in text for f in r.release_files)
        assert all(a in text for a in r.aliases)
    assert "2560x1440" in text and "dynamic 256..2304" in text
    assert main(["models", "--markdown"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| `")]
    assert len(rows) == len(RELEASES)


def _offline(repo_id, filename):
    raise OSError("Temporary failure in name resolution")


@pytest.mark.parametrize("why", ["no network", "no huggingface_hub"])
def test_offline_a_release_name_says_what_to_fetch_and_how_to_pass_it(why, monkeypatch, tmp_path, capsys):

    monkeypatch.setenv("BIREFNET_JAX_CACHE", str(tmp_path / "cache"))
    if why == "no network":
        patch_hub(monkeypatch, _offline, online=False)
    else:
        monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    with pytest.raises(CheckpointReadError) as err:
        birefnet_jax.load("BiRefNet_HR")
    text = str(err.value)
    assert "https://huggingface.co/ZhengPeng7/BiRefNet_HR/resolve/main/model.safetensors" in text
    assert "BiRefNet_HR-general-epoch_130.pth" in text and "-m /path/to/BiRefNet_HR.safetensors" in text
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(image)
    pipeline._cached_predictor.cache_clear()
    assert main(["predict", str(image), "-m", "hf:ZhengPeng7/BiRefNet_lite-2K", "-o", str(tmp_path / "o"), "-q"]) == 2
    url = "https://huggingface.co/ZhengPeng7/BiRefNet_lite-2K/resolve/main/model.safetensors"
    assert url in capsys.readouterr().err


def test_an_unknown_name_is_not_fetched_and_gets_a_suggestion(hub):
    with pytest.raises(CheckpointError, match="did you mean 'BiRefNet_dynamic'"):
        birefnet_jax.load("BiRefNet_dynamc")
    with pytest.raises(CheckpointError, match="no such file"):
        birefnet_jax.load("missing/BiRefNet_HR.pth")
    assert hub == []
