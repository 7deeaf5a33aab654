"""Validation during training (`birefnet_jax.train.evaluate`): metrics equal the project's evaluator on
the same uint8 predictions, one compilation for an uneven last batch, the model's mode restored
module by module, and the comparison picture / prediction files written whole."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

pytest.importorskip("cv2")
pytest.importorskip("skimage")

from birefnet_jax.io.images import normalize  # noqa: E402
from birefnet_jax.io.masks import mask_to_uint8  # noqa: E402
from birefnet_jax.io.resize import resize_align_corners, resize_linear  # noqa: E402
from birefnet_jax.metrics import ALL_METRICS, Evaluator, evaluate_pair  # noqa: E402
from birefnet_jax.nn.layers import BatchNorm2d  # noqa: E402
from birefnet_jax.train.batchnorm import set_train_mode  # noqa: E402
from birefnet_jax.train.data.folders import Pair  # noqa: E402
from birefnet_jax.train.evaluate import (  # noqa: E402
    DEFAULT_METRICS,
    HIGHER_IS_BETTER,
    Validator,
    eval_mode,
    is_better,
    module_modes,
    save_comparison,
    write_predictions,
)

SIZE = (64, 64)
_MEAN0, _STD0 = 0.485, 0.229


def _mask(h, w, seed, soft=False):
    """A binary ellipse (and with `soft` a grey rim), uint8."""
    rng = np.random.default_rng(seed)
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    ry, rx = rng.uniform(0.15, 0.35) * h, rng.uniform(0.15, 0.35) * w
    yy, xx = np.mgrid[:h, :w]
    d = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
    m = np.where(d < 1, 255, 0).astype(np.uint8)
    if soft:
        m[(d >= 1) & (d < 1.3)] = 100
    return m


def _pairs(root, sizes, soft=False, set_name="VAL"):
    """Pairs whose image is the mask in all three channels (so an echo model can predict it)."""
    (root / "im").mkdir(parents=True, exist_ok=True)
    (root / "gt").mkdir(parents=True, exist_ok=True)
    pairs = []
    for i, (h, w) in enumerate(sizes):
        m = _mask(h, w, i, soft)
        stem = f"s{i}"
        Image.fromarray(np.repeat(m[..., None], 3, axis=-1)).save(root / "im" / f"{stem}.png")
        Image.fromarray(m).save(root / "gt" / f"{stem}.png")
        pairs.append(Pair(root / "im" / f"{stem}.png", root / "gt" / f"{stem}.png", stem, set_name))
    return pairs


class _Inner(nnx.Module):
    def __init__(self, rngs):
        self.deterministic = True  # like BiRefNet's own flag
        self.bn = BatchNorm2d(3)
        self.drop = nnx.Dropout(0.9, rngs=rngs)


class _Echo(nnx.Module):
    """A cheap stand-in: logits that reproduce the image's red channel (or its inverse), through a
    BatchNorm and a heavy dropout that would both change the output outside eval mode."""

    def __init__(self, sign=1.0):
        self.sign = sign
        self.inner = _Inner(nnx.Rngs(0))
        self.deterministic = True

    def __call__(self, x):
        x = self.inner.drop(self.inner.bn(x))
        v = x[..., :1] * _STD0 + _MEAN0
        return self.sign * 40.0 * (v - 0.5)


def _direct(preds, gts, metrics):
    ev = Evaluator(metrics)
    for p, g in zip(preds, gts, strict=True):
        ev.add(evaluate_pair(p, g, metrics))
    return ev.results()


def test_metrics_equal_the_evaluator_on_the_same_predictions(tmp_path):
    sizes = [(64, 64), (50, 70), (90, 40), (33, 47), (64, 96)]
    pairs = _pairs(tmp_path, sizes, soft=True)
    val = Validator(pairs, SIZE, batch_size=2, metrics=ALL_METRICS)
    model = _Echo()
    result = val.run(model)

    assert [p.shape for p in result.preds] == sizes and all(p.dtype == np.uint8 for p in result.preds)
    direct = _direct(result.preds, val.gts, ALL_METRICS)
    assert set(result.metrics) == set(val.higher_is_better)
    for key, value in result.metrics.items():
        assert key.startswith("val/")
        assert value == direct[key[4:]], key
    assert [r.name for r in result.per_image] == ["s0", "s1", "s2", "s3", "s4"]

    # The predictions are the model's eval-mode sigmoid at the validation size, brought back as the
    # project's inference does (bilinear, aligned corners), truncated to uint8.
    model.eval()
    for pair, gt, pred in zip(pairs, val.gts, result.preds, strict=True):
        small = resize_linear(np.asarray(Image.open(pair.image).convert("RGB")), SIZE)
        prob = np.asarray(jax.nn.sigmoid(model(jnp.asarray(normalize(small)[None]))))[0, ..., 0]
        expected = mask_to_uint8(resize_align_corners(prob, gt.shape))
        assert np.abs(expected.astype(int) - pred).max() <= 1
        assert (expected == pred).mean() > 0.99

    assert val.evaluate(result.preds) == result.metrics


def test_perfect_and_inverted_predictions(tmp_path):
    pairs = _pairs(tmp_path, [SIZE] * 3)  # binary masks at the validation size: the echo is exact
    val = Validator(pairs, SIZE, batch_size=2)
    assert val.metrics == DEFAULT_METRICS
    good = val(_Echo())
    assert set(good) == {"val/S", "val/wF", "val/MAE", "val/HCE"}
    assert all(np.array_equal(p, g) for p, g in zip(val.predict(_Echo()), val.gts, strict=True))
    assert good["val/MAE"] == 0.0 and good["val/HCE"] == 0.0
    assert good["val/S"] == pytest.approx(1.0, abs=1e-12) and good["val/wF"] == pytest.approx(1.0, abs=1e-12)

    bad = val(_Echo(sign=-1.0))
    assert bad["val/MAE"] == 1.0 and bad["val/S"] < 0.1 and bad["val/wF"] < 0.1 and bad["val/HCE"] > 0
    assert _direct(val.predict(_Echo(sign=-1.0)), val.gts, DEFAULT_METRICS)["S"] == bad["val/S"]
    assert all(is_better(k, good[k], bad[k]) for k in good)
    assert val.higher_is_better == {"val/S": True, "val/wF": True, "val/MAE": False, "val/HCE": False}
    assert HIGHER_IS_BETTER["MAE"] is False


def test_uneven_batches_compile_once_and_match_batch_one(tmp_path):
    pairs = _pairs(tmp_path, [(64, 64), (40, 72), (80, 50), (64, 64), (30, 30)], soft=True)
    by_two = Validator(pairs, SIZE, batch_size=2)
    by_one = Validator(pairs, SIZE, batch_size=1)
    model = _Echo()
    first = by_two.run(model)
    assert by_two.trace_count == 1
    second = by_two.run(model)
    assert by_two.trace_count == 1  # the padded last batch reuses the one program
    single = by_one.run(model)
    assert by_one.trace_count == 1
    assert first.metrics == second.metrics == single.metrics
    assert all(np.array_equal(a, b) for a, b in zip(first.preds, single.preds, strict=True))


def test_mode_is_restored_module_by_module(tmp_path):
    pairs = _pairs(tmp_path, [(64, 64), (48, 80), (70, 60)], soft=True)
    val = Validator(pairs, SIZE, batch_size=2)
    model = _Echo()
    model.eval()
    reference = val(model)

    for setup in (lambda m: m.eval(), lambda m: set_train_mode(m, batch_norm="frozen"),
                  lambda m: set_train_mode(m, batch_norm="batch")):
        setup(model)
        before = module_modes(model)
        assert val(model) == reference  # eval mode inside: no dropout, running statistics
        assert module_modes(model) == before
    assert module_modes(model)["inner/bn"] == {"use_running_average": False}
    set_train_mode(model, batch_norm="frozen")
    modes = module_modes(model)
    assert modes["inner/bn"] == {"use_running_average": True}
    assert modes["inner/drop"] == {"deterministic": False} and modes[""] == {"deterministic": False}
    assert val.trace_count == 1  # always the eval-mode graph: switching BatchNorm modes does not recompile

    with pytest.raises(RuntimeError), eval_mode(model):
        assert module_modes(model)["inner/drop"] == {"deterministic": True}
        raise RuntimeError("boom")
    assert module_modes(model) == modes


@pytest.mark.slow
def test_tiny_birefnet_in_frozen_training_mode(tmp_path):
    from birefnet_jax.backbones.swin import SwinConfig
    from birefnet_jax.config import BiRefNetConfig
    from birefnet_jax.model import random_model

    cfg = BiRefNetConfig(backbone=SwinConfig(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 1, 1, 1),
                                             window_size=7),
                         mul_scl_ipt="", dec_att="", squeeze_block="", cxt_num=0, resolution=SIZE)
    model = random_model(cfg)
    assert set_train_mode(model, batch_norm="frozen") == "frozen"
    before = module_modes(model)
    assert any(a.get("use_running_average") is True for a in before.values())
    assert any(a.get("deterministic") is False for a in before.values())
    state_before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, (nnx.Param, nnx.BatchStat))))

    val = Validator(_pairs(tmp_path, [(64, 64), (40, 90), (72, 64)]), SIZE, batch_size=2)
    frozen = val(model)
    assert module_modes(model) == before
    assert all(np.isfinite(v) for v in frozen.values())
    state_after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, (nnx.Param, nnx.BatchStat))))
    assert jax.tree.all(jax.tree.map(np.array_equal, state_before, state_after))

    model.eval()
    assert val(model) == frozen
    assert val.trace_count == 1


def test_batch_sharding_on_a_mesh(tmp_path):
    pairs = _pairs(tmp_path, [(64, 64), (50, 70), (80, 40)], soft=True)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    sharded = Validator(pairs, SIZE, batch_size=2, batch_sharding=sharding)
    plain = Validator(pairs, SIZE, batch_size=2)
    assert sharded(_Echo()) == plain(_Echo())


def test_bad_arguments(tmp_path):
    pairs = _pairs(tmp_path, [SIZE])
    with pytest.raises(ValueError, match="multiple of 32"):
        Validator(pairs, (60, 64))
    with pytest.raises(ValueError, match="unknown metrics"):
        Validator(pairs, SIZE, metrics=("S", "IoU"))
    with pytest.raises(ValueError, match="no validation pairs"):
        Validator([], SIZE)
    assert Validator(pairs, SIZE, metrics=("wF",)).metrics == ("WF",)


def test_save_comparison_grid(tmp_path):
    rng = np.random.default_rng(0)
    rows, (h, w) = 3, (24, 40)
    images = [rng.integers(0, 256, (h, w, 3), np.uint8) for _ in range(rows)]
    gts = [rng.integers(0, 256, (h, w), np.uint8) for _ in range(rows)]
    preds = [rng.integers(0, 256, (h, w), np.uint8) for _ in range(rows)]
    path = tmp_path / "out" / "comparison.png"
    assert save_comparison(path, images, gts, preds, names=["a", "b", "c"]) == path
    picture = np.asarray(Image.open(path))
    label, gap = 16, 2
    assert picture.shape == (label + rows * h + (rows - 1) * gap, 3 * w + 2 * gap, 3)
    for r in range(rows):
        y = label + r * (h + gap)
        gt_tile = picture[y : y + h, w + gap : 2 * w + gap]
        pred_tile = picture[y : y + h, 2 * (w + gap) : 2 * (w + gap) + w]
        assert np.array_equal(pred_tile, np.repeat(preds[r][..., None], 3, axis=-1))
        assert np.array_equal(gt_tile, np.repeat(gts[r][..., None], 3, axis=-1))
    assert picture[:label].std() > 0  # the labels are drawn
    assert sorted(p.name for p in path.parent.iterdir()) == ["comparison.png"]  # no temporary file left

    # Overwritten whole; other sizes and float probabilities are resized / converted to the tile.
    probs = [rng.random((50, 30)).astype(np.float32) for _ in range(2)]
    save_comparison(path, images[:2], gts[:2], probs, tile=(32, 32))
    assert np.asarray(Image.open(path)).shape == (label + 2 * 32 + gap, 3 * 32 + 2 * gap, 3)
    assert sorted(p.name for p in path.parent.iterdir()) == ["comparison.png"]


def test_validator_pictures_and_prediction_files(tmp_path):
    pairs = _pairs(tmp_path / "data", [(64, 64), (50, 70)], soft=True)
    val = Validator(pairs, SIZE, batch_size=2)
    result = val.run(_Echo())
    picture = np.asarray(Image.open(val.save_comparison(tmp_path / "cmp.png", result.preds, max_side=32)))
    assert picture.shape == (16 + 2 * 32 + 2, 3 * 32 + 2 * 2, 3)

    out = tmp_path / "preds"
    paths = val.write_predictions(out, result.preds)
    assert [p.name for p in paths] == ["s0.png", "s1.png"]
    for p, pred in zip(paths, result.preds, strict=True):
        assert np.array_equal(np.asarray(Image.open(p)), pred)
    probs = [np.full((5, 7), 0.5, np.float32), np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4, 1)]
    paths = write_predictions(out, pairs, probs, by_set=True)
    assert [str(p.relative_to(out)) for p in paths] == ["VAL/s0.png", "VAL/s1.png"]
    assert np.array_equal(np.asarray(Image.open(paths[1])), mask_to_uint8(probs[1][..., 0]))
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]

    twins = [pairs[0], Pair(pairs[1].image, pairs[1].mask, "s0", "OTHER")]
    with pytest.raises(ValueError, match="by_set=True"):
        write_predictions(tmp_path / "dups", twins, result.preds)
