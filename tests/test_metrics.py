"""The DIS metrics against the original evaluator's numbers and against pysodmetrics."""

import json
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy import ndimage

from birefnet_jax.metrics import ALL_METRICS, Evaluator, evaluate_batch, evaluate_pair
from birefnet_jax.metrics.mba import band_radii, boundary_accuracy

REF = Path(__file__).parent / "reference"
RTOL = 1e-6


@pytest.fixture(scope="module")
def reference():
    data = np.load(REF / "metrics.npz")
    values = json.loads((REF / "metrics.json").read_text())
    pairs = [(data[f"pred{i}"], data[f"gt{i}"]) for i in range(6)]
    return pairs, values


def _close(actual, expected, key):
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64),
                               rtol=RTOL, atol=1e-12, err_msg=key)


@pytest.mark.parametrize("group", ["all", "without_empty_gt"])
def test_matches_original_evaluator(reference, group):
    pairs, values = reference
    if group == "all":
        expected = {k: v for k, v in values.items() if not isinstance(v, dict)}
    else:
        expected, pairs = values[group], pairs[:5]
    ev = Evaluator()
    for pred, gt in pairs:
        ev.update(pred, gt)
    res = ev.results()
    assert res["count"] == len(pairs)
    for key, value in expected.items():
        if key == "MBA" and np.isnan(value):
            continue  # the original's NaN; the project's value is checked below
        _close(res[key], value, key)


def test_mba_skips_ground_truths_without_border(reference):
    pairs, values = reference
    ev = Evaluator()
    for pred, gt in pairs:
        ev.update(pred, gt)
    assert not (pairs[5][1] > 128).any()
    assert np.isnan(ev.pairs[5].MBA)
    assert all(np.isfinite(p.MBA) for p in ev.pairs[:5])
    # Left out of the mean: over all six pairs, mBA is the original's value over the five others.
    assert np.isnan(values["MBA"])
    _close(ev.results()["MBA"], values["without_empty_gt"]["MBA"], "MBA")
    # Full ground truth: no border either.
    full = np.full((40, 50), 255, np.uint8)
    assert np.isnan(boundary_accuracy(pairs[0][0][:40, :50], full > 128))


# --------------------------------------------------------------------------- pysodmetrics


def _blob_pair(rng, h, w, kind):
    field = ndimage.gaussian_filter(rng.standard_normal((h, w)), min(h, w) / rng.uniform(6, 14))
    gt = np.where(field > np.quantile(field, rng.uniform(0.4, 0.85)), 255, 0).astype(np.uint8)
    if kind == "soft":
        noisy = gt.astype(np.float64) + rng.standard_normal((h, w)) * 50
        pred = ndimage.gaussian_filter(noisy, rng.uniform(1, 3))
        pred = (pred - pred.min()) / (pred.max() - pred.min()) * 255
    elif kind == "sparse":  # exact zeros away from the object, as real predictions have
        pred = ndimage.gaussian_filter(gt.astype(np.float64), 2) * rng.uniform(0.6, 1.0, (h, w))
        pred[:, : w // 3] = 0
        pred[0, 0], pred[-1, -1] = 0, 255
    elif kind == "speckled":  # many small wrong regions, holes and thin bits: HCE's contour work
        pred = np.where(rng.random((h, w)) < 0.03, 255.0, gt * (rng.random((h, w)) < 0.97))
        pred[0, 0], pred[-1, -1] = 0, 255
    else:  # binary, shifted
        pred = np.roll(gt, (int(rng.integers(-4, 5)), int(rng.integers(-4, 5))), axis=(0, 1)).astype(np.float64)
        pred[0, 0], pred[-1, -1] = 0, 255
    pred = pred.astype(np.uint8)
    # pysodmetrics' HCE thresholds the normalised map at 0.5 where the original takes > 128 on the
    # raw one: they agree when the map spans 0..255 and never equals 128.
    pred[pred == 128] = 129
    return pred, gt


def _pysod_values(pred, gt):
    import py_sod_metrics as psm

    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = psm.Smeasure()
        m.step(pred, gt)
        out["S"] = m.get_results()["sm"]
        m = psm.MAE()
        m.step(pred, gt)
        out["MAE"] = m.get_results()["mae"]
        m = psm.WeightedFmeasure()
        m.step(pred, gt)
        out["wF"] = m.get_results()["wfm"]
        m = psm.Emeasure()
        m.step(pred, gt)
        em = m.get_results()["em"]
        out["E_adp"], out["E_curve"] = em["adp"], em["curve"]
        m = psm.Fmeasure()
        m.step(pred, gt)
        res = m.get_results()
        out["F_adp"], out["F_curve"] = res["fm"]["adp"], res["fm"]["curve"]
        out["precision"], out["recall"] = res["pr"]["p"], res["pr"]["r"]
        m = psm.HumanCorrectionEffortMeasure()
        m.step(pred, gt)
        out["HCE"] = m.get_results()["hce"]
    return out


@pytest.mark.parametrize("shape", [(64, 96), (131, 97), (240, 256)])
def test_agrees_with_pysodmetrics(shape):
    pytest.importorskip("py_sod_metrics")
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    for kind in ("soft", "sparse", "binary", "speckled"):
        pred, gt = _blob_pair(rng, *shape, kind)
        mine = evaluate_pair(pred, gt)
        for key, value in _pysod_values(pred, gt).items():
            _close(getattr(mine, key), value, f"{key} ({kind}, {shape})")


def test_degenerate_maps_agree_with_pysodmetrics():
    pytest.importorskip("py_sod_metrics")
    rng = np.random.default_rng(7)
    pred, gt = _blob_pair(rng, 70, 90, "soft")
    cases = {
        "empty gt": (pred, np.zeros_like(gt)),
        "full gt": (pred, np.full_like(gt, 255)),
        "constant pred": (np.full_like(pred, 77), gt),
        "empty pred": (np.zeros_like(pred), gt),
    }
    for name, (p, g) in cases.items():
        mine = evaluate_pair(p, g)
        for key, value in _pysod_values(p, g).items():
            if key == "HCE" and name == "constant pred":
                continue  # pysodmetrics binarises the unnormalised 77/255 map differently
            _close(getattr(mine, key), value, f"{key} ({name})")
        assert all(np.isfinite(v) for k, v in mine.scalars().items() if k != "MBA"), name


def test_s_measure_is_zero_where_the_original_divides_by_zero():
    # Foreground centred on the last column: the right quadrants are empty, the original's SSIM is
    # 0/0 and its final max(0, S) turns the NaN into 0.
    gt = np.zeros((30, 40), np.uint8)
    gt[5:25, 39:] = 255
    pred = gt.copy()
    pred[10, 10] = 200
    assert evaluate_pair(pred, gt).S == 0.0
    gt = np.zeros((30, 40), np.uint8)
    gt[12, 20] = 255  # a single foreground pixel: its standard deviation is 0/0 as well
    assert evaluate_pair(pred, gt).S == 0.0
    gt[12, 21] = 255
    assert evaluate_pair(pred, gt).S > 0.0


# --------------------------------------------------------------------------- internals


def test_batch_equals_single_pairs():
    rng = np.random.default_rng(3)
    pairs = [_blob_pair(rng, 50, 70, kind) for kind in ("soft", "sparse", "binary")]
    preds, gts = np.stack([p for p, _ in pairs]), np.stack([g for _, g in pairs])
    batch = evaluate_batch(preds, gts)
    for (pred, gt), got in zip(pairs, batch, strict=True):
        single = evaluate_pair(pred, gt)
        for key in ("S", "MAE", "MSE", "wF", "HCE", "MBA", "E_adp", "F_adp"):
            assert getattr(got, key) == getattr(single, key), key
        for key in ("E_curve", "F_curve", "precision", "recall", "BIoU_curve"):
            np.testing.assert_array_equal(getattr(got, key), getattr(single, key), err_msg=key)


def test_nearest_foreground_ties_like_scipy():
    # Weighted F takes each background pixel's nearest foreground pixel from a local search; on ties
    # it must pick what scipy's feature transform (which the original uses) picks.
    from birefnet_jax.metrics.weighted_f import nearest_foreground_near

    rng = np.random.default_rng(2)
    for shape, density in (((90, 130), 0.02), ((64, 64), 0.3), ((200, 150), 0.002)):
        gt = rng.random(shape) < density
        gt[::6, ::4] |= rng.random(gt[::6, ::4].shape) < 0.5  # lattices: many equidistant pixels
        dist, (near_r, near_c) = ndimage.distance_transform_edt(~gt, return_indices=True)
        d2 = np.minimum(np.rint(dist**2), 266**2).astype(np.int32)
        rows, cols, nr, nc = nearest_foreground_near(gt, d2)
        assert rows.size > 0
        np.testing.assert_array_equal(nr, near_r[rows, cols])
        np.testing.assert_array_equal(nc, near_c[rows, cols])


def test_skeleton_per_component_equals_scikit_image():
    from skimage.morphology import skeletonize

    from birefnet_jax.metrics.hce import gt_skeleton

    rng = np.random.default_rng(4)
    fg = np.zeros((300, 260), bool)
    for _ in range(25):  # large and small components, some touching the border
        y, x = rng.integers(0, 300), rng.integers(0, 260)
        fg[y : y + rng.integers(1, 120), x : x + rng.integers(1, 120)] ^= True
    np.testing.assert_array_equal(gt_skeleton(fg), skeletonize(fg))
    misses = rng.random(fg.shape) < 0.001
    _, labels = cv2.connectedComponents(fg.view(np.uint8), connectivity=8)
    touched = np.isin(labels, np.unique(labels[misses & fg]))
    np.testing.assert_array_equal(gt_skeleton(fg, touching=misses), skeletonize(fg) & touched)


def _mba_direct(pred, fg):
    # The definition on the full image, without the crop the project uses.
    accuracies = []
    for r in band_radii(fg.shape):
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
        band = cv2.morphologyEx(fg.astype(np.uint8), cv2.MORPH_GRADIENT, kernel) > 0
        accuracies.append(np.count_nonzero(band & ((pred > 128) == fg)) / np.count_nonzero(band))
    return sum(accuracies) / len(accuracies)


def test_mba_on_a_crop_equals_the_full_image():
    rng = np.random.default_rng(11)
    for shape in ((300, 420), (97, 61)):
        pred, gt = _blob_pair(rng, *shape, "soft")
        gt[:, : shape[1] // 2] = 0  # a foreground away from some borders, touching others
        assert boundary_accuracy(pred, gt > 128) == pytest.approx(_mba_direct(pred, gt > 128), rel=1e-12)


def test_metric_subsets_and_resizing():
    rng = np.random.default_rng(5)
    pred, gt = _blob_pair(rng, 60, 80, "soft")
    ev = Evaluator(["S", "MAE"])
    ev.update(pred, gt)
    res = ev.results()
    assert set(res) == {"count", "S", "MAE"}
    full = evaluate_pair(pred, gt)
    assert res["S"] == full.S and res["MAE"] == full.MAE
    # A prediction of another size is resized to the ground truth's, as the original does.
    small = cv2.resize(pred, (40, 30))
    assert evaluate_pair(small, gt).MAE == evaluate_pair(cv2.resize(small, (80, 60)), gt).MAE
    with pytest.raises(ValueError, match="unknown metrics"):
        Evaluator(["S", "IoU"])
    with pytest.raises(TypeError, match="uint8"):
        evaluate_pair(pred.astype(np.float32) / 255, gt)
    assert set(ALL_METRICS) == {"S", "MAE", "MSE", "E", "F", "WF", "HCE", "MBA", "BIoU"}
