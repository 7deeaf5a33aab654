"""The training objective (`birefnet_jax.train.losses`) against the original's criteria
(`reference/losses.*`) and its training step (`reference/train_swin_w7.*`), plus the parts the
references do not cover: patch IoU windows, the fine-tuning reweighting, gradients, dtypes."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference_models import REF

from birefnet_jax.model import TrainOutputs
from birefnet_jax.nn.layers import resize_bilinear
from birefnet_jax.train import losses as L

TOL = 1e-6  # losses are compared to 1e-6 relative (reference README)
LOSSES = json.loads((REF / "losses.json").read_text())


# Jitted once: one compilation per shape instead of one per primitive.
cross_entropy = jax.jit(L.cross_entropy_loss)
patch_iou = jax.jit(L.patch_iou_loss, static_argnames=("window", "original_windows"))


def nhwc(a):
    return np.ascontiguousarray(np.asarray(a).transpose(0, 2, 3, 1))


def rel(value, ref):
    return abs(float(value) - float(ref)) / abs(float(ref))


def _ref_outputs(arrays, dtype=None):
    def get(key):
        a = jnp.asarray(nhwc(arrays[key]))
        return a if dtype is None else a.astype(dtype)

    return TrainOutputs([get(f"pred{i}") for i in range(4)], [get(f"gdt_pred{i}") for i in range(3)],
                        [get(f"gdt_label{i}") for i in range(3)], None)


# --------------------------------------------------------------------------------------------------------
# Criteria against the original


@jax.jit
def _all_criteria(logits, gt):
    p = jax.nn.sigmoid(logits)
    out = {name: L.PIX_CRITERIA[name](p, gt) for name in ("bce", "iou", "ssim", "mae", "mse", "reg", "cnt")}
    out["structure"] = L.structure_loss(p, gt)  # on probabilities, as PixLoss calls it
    out["structure_on_logits"] = L.structure_loss(logits, gt)
    return out


@pytest.mark.parametrize("i", [0, 1])
def test_criteria_match_original(i):
    arrays = np.load(REF / "losses.npz")
    got = _all_criteria(jnp.asarray(nhwc(arrays[f"logits{i}"])), jnp.asarray(nhwc(arrays[f"gt{i}"])))
    assert len(got) == 9
    errors = {name: rel(v, LOSSES[f"{name}/{i}"]) for name, v in got.items()}
    assert max(errors.values()) < TOL, errors


def test_cross_entropy_matches_original():
    arrays = np.load(REF / "losses.npz")
    ce = cross_entropy(arrays["cls_logits"], arrays["cls_labels"])
    assert rel(ce, LOSSES["cls_ce"]) < TOL
    # PyTorch's ignore_index: an ignored label drops out of the mean.
    labels = arrays["cls_labels"].copy()
    labels[1] = -100
    keep = [0, 2, 3]
    want = cross_entropy(arrays["cls_logits"][keep], arrays["cls_labels"][keep])
    assert rel(cross_entropy(arrays["cls_logits"], labels), want) < TOL


# --------------------------------------------------------------------------------------------------------
# The combined objective against the original's training step


def test_objective_matches_training_step():
    meta = json.loads((REF / "train_swin_w7.json").read_text())
    arrays = np.load(REF / "train_swin_w7.npz")
    outputs = _ref_outputs(arrays)
    lambdas = L.LAMBDAS_PIX_LAST["DIS5K"]
    loss, logs = jax.jit(lambda o, gt: L.objective(o, gt, lambdas=lambdas))(outputs, nhwc(arrays["gt"]))
    assert set(logs) == {"loss", "loss_pix", "loss_gdt", "bce", "iou", "ssim"}
    assert float(loss) == float(logs["loss"])
    refs = {"loss": meta["loss"], "loss_pix": meta["loss_pix"], "loss_gdt": meta["loss_gdt"],
            **{k: meta[f"loss_dict/{k}"] for k in ("bce", "iou", "ssim")}}
    errors = {k: rel(logs[k], v) for k, v in refs.items()}
    assert max(errors.values()) < TOL, errors


def test_objective_float64_matches_original_float64_step():
    """The exact check: the original's training step run in float64 on its own float64 predictions
    (`loss/*` in train_swin_w7_float64.npz, written by tests/make_float64_reference.py)."""
    arrays = np.load(REF / "train_swin_w7_float64.npz")
    if "loss/loss" not in arrays.files:
        pytest.skip("train_swin_w7_float64.npz has no float64 loss values (loss/*)")
    gt = nhwc(np.load(REF / "train_swin_w7.npz")["gt"])
    with jax.enable_x64(True):
        outputs = _ref_outputs(arrays, jnp.float64)
        lambdas = L.LAMBDAS_PIX_LAST["DIS5K"]
        _, logs = jax.jit(lambda o, g: L.objective(o, g, lambdas=lambdas))(outputs, jnp.asarray(gt, jnp.float64))
        assert logs["loss"].dtype == jnp.float64
        errors = {k: rel(v, arrays[f"loss/{k}"] if f"loss/{k}" in arrays.files else arrays[f"loss/loss_dict/{k}"])
                  for k, v in logs.items()}
    assert max(errors.values()) < 1e-12, errors


def _small_outputs(seed=0, b=2):
    rng = np.random.default_rng(seed)
    preds = [jnp.asarray(rng.normal(size=(b, s, s, 1)) * 3, jnp.float32) for s in (8, 16, 32)]
    gdt = [jnp.asarray(rng.normal(size=(b, s, s, 1)), jnp.float32) for s in (8, 16)]
    labels = [jnp.asarray(rng.normal(size=(b, 32, 32, 1)), jnp.float32) for _ in range(2)]
    gt = jnp.asarray((rng.random((b, 32, 32, 1)) > 0.6).astype(np.float32))
    return TrainOutputs(preds, gdt, labels, None), gt


def test_static_zero_weights_are_skipped_and_traced_weights_agree():
    outputs, gt = _small_outputs()
    static = {"bce": 30.0, "iou": 0.0, "ssim": 10.0, "triplet": 0.0}
    objective = jax.jit(lambda o, g: L.objective(o, g, lambdas=static))
    loss, logs = objective(outputs, gt)
    assert "iou" not in logs and set(logs) == {"loss", "loss_pix", "loss_gdt", "bce", "ssim"}

    @jax.jit
    def independently(o, g):  # resize, sigmoid, weight, sum over levels
        probs = [jax.nn.sigmoid(resize_bilinear(p, (32, 32))) for p in o.preds]
        bce = sum(30.0 * L.bce_loss(p, g) for p in probs)
        return bce + sum(10.0 * L.ssim_loss(p, g) for p in probs), bce / 3, L.gradient_loss(o.gdt_preds, o.gdt_labels)

    want_pix, want_bce, want_gdt = independently(outputs, gt)
    assert rel(logs["loss_pix"], want_pix) < TOL
    assert rel(logs["bce"], want_bce) < TOL
    assert rel(loss, want_pix + want_gdt) < TOL

    traced = {"bce": jnp.float32(30.0), "ssim": jnp.float32(10.0)}
    loss_t, _ = jax.jit(lambda o, g, lam: L.objective(o, g, lambdas=lam))(outputs, gt, traced)
    assert rel(loss_t, loss) < TOL
    # gt is clamped to [0, 1] first
    assert rel(objective(outputs, gt * 3 - 1)[0], objective(outputs, jnp.clip(gt * 3 - 1, 0, 1))[0]) < TOL
    with pytest.raises(ValueError, match="triplet"):
        L.objective(outputs, gt, lambdas={"bce": 1.0, "triplet": 3.0})


def test_classification_loss_in_objective():
    arrays = np.load(REF / "losses.npz")
    logits, labels = jnp.asarray(arrays["cls_logits"]), jnp.asarray(arrays["cls_labels"])
    outputs, gt = _small_outputs(b=4)
    outputs = TrainOutputs(outputs.preds[-1:], [], [], logits)  # no gradient levels: no loss_gdt
    loss, logs = jax.jit(lambda o, g, y: L.objective(o, g, y, lambdas={"bce": 1.0}))(outputs, gt, labels)
    assert set(logs) == {"loss", "loss_pix", "loss_cls", "bce"}
    assert rel(logs["loss_cls"], 5.0 * LOSSES["cls_ce"]) < TOL
    assert rel(loss, logs["loss_pix"] + logs["loss_cls"]) < TOL
    assert rel(L.classification_loss([None, logits, logits], labels), 10.0 * LOSSES["cls_ce"]) < TOL
    assert L.classification_loss([None], labels) is None
    assert L.classification_loss(logits, labels, {"ce": 0.0}) is None
    with pytest.raises(ValueError, match="cls_labels"):
        L.objective(outputs, gt, None)
    _, logs = L.objective(outputs, gt, None, lambdas={"mae": 1.0}, lambdas_cls={"ce": 0.0})
    assert set(logs) == {"loss", "loss_pix", "mae"}


# --------------------------------------------------------------------------------------------------------
# Patch IoU


def _np_iou(p, g):
    inter = (p * g).sum(axis=(1, 2, 3))
    return float(np.sum(1 - inter / (g.sum(axis=(1, 2, 3)) + p.sum(axis=(1, 2, 3)) - inter)))


def _probs(shape, seed):
    rng = np.random.default_rng(seed)
    return rng.random(shape).astype(np.float32), (rng.random(shape) > 0.5).astype(np.float32)


@pytest.mark.parametrize("window", [64, (32, 48)])
def test_patch_iou_tiles_the_image(window):
    p, g = _probs((2, 150, 130, 1), 1)  # ragged at both edges
    wy, wx = (window, window) if isinstance(window, int) else window
    want = sum(_np_iou(p[:, y:y + wy, x:x + wx], g[:, y:y + wy, x:x + wx])
               for y in range(0, 150, wy) for x in range(0, 130, wx))
    assert rel(patch_iou(p, g, window), want) < TOL


def test_patch_iou_original_windows():
    # Small batch: only the top-left 64x64 window.
    p, g = _probs((2, 128, 128, 1), 2)
    assert rel(patch_iou(p, g, original_windows=True), _np_iou(p[:, :64, :64], g[:, :64, :64])) < TOL
    # An object (and a prediction of it) outside the top-left window: the original sees none of it.
    g = np.zeros((2, 128, 128, 1), np.float32)
    g[:, 80:120, 70:110] = 1
    p = np.clip(g * 0.8 + 0.05, 0, 1)
    tiled, orig = float(patch_iou(p, g)), float(patch_iou(p, g, original_windows=True))
    assert rel(orig, _np_iou(p[:, :64, :64], g[:, :64, :64])) < TOL
    assert abs(tiled - orig) > 0.1
    # Batch >= 64: y anchors 0, 64, 128 (below the batch size 130), x anchor 0 (one channel).
    p, g = _probs((130, 192, 100, 1), 3)
    want = sum(_np_iou(p[:, y:y + 64, :64], g[:, y:y + 64, :64]) for y in (0, 64, 128))
    assert rel(patch_iou(p, g, original_windows=True), want) < TOL
    # ... and an anchor past the height scores an empty window: NaN, as in the original.
    assert np.isnan(float(patch_iou(p[:, :128], g[:, :128], original_windows=True)))


# --------------------------------------------------------------------------------------------------------
# Weights and the fine-tuning reweighting


def test_task_tables():
    assert L.LAMBDAS_PIX_LAST["COD"] == L.LAMBDAS_PIX_LAST["HRSOD"] == L.LAMBDAS_PIX_LAST["DIS5K"]
    nonzero = {t: {k: v for k, v in lam.items() if v} for t, lam in L.LAMBDAS_PIX_LAST.items()}
    assert nonzero["DIS5K"] == {"bce": 30.0, "iou": 0.5, "ssim": 10.0}
    assert nonzero["General"] == nonzero["General-2K"] == {"bce": 30.0, "iou": 0.5, "mae": 100.0, "ssim": 10.0}
    assert nonzero["Matting"] == {"bce": 30.0, "mae": 100.0, "ssim": 10.0}
    assert L.LAMBDAS_CLS == {"ce": 5.0}
    assert L.FINETUNE_LAST_EPOCHS == {"DIS5K": -40, "COD": -20, "HRSOD": -20, "General": -20,
                                      "General-2K": -20, "Matting": -10}


def test_finetune_reweighting():
    epochs = 100
    for task in ("DIS5K", "General"):
        base = L.LAMBDAS_PIX_LAST[task]
        start = epochs + L.FINETUNE_LAST_EPOCHS[task]  # the last epoch before the phase
        assert L.lambdas_for_epoch(1, epochs, task) == base
        assert L.lambdas_for_epoch(start, epochs, task) == base
        for k in (1, 2, 5):
            lam = L.lambdas_for_epoch(start + k, epochs, task)
            assert lam["bce"] == 0.0 and lam["ssim"] == base["ssim"]
            assert lam["iou"] == pytest.approx(base["iou"] * 0.5 ** k, rel=1e-12)
            assert lam["mae"] == pytest.approx(base["mae"] * 0.9 ** k, rel=1e-12)
            once = L.lambdas_for_epoch(start + k, epochs, task, compound=False)
            assert once["iou"] == pytest.approx(base["iou"] * 0.5) and once["bce"] == 0.0
            assert once["mae"] == pytest.approx(base["mae"] * 0.9)
    assert L.lambdas_for_epoch(100, 100, "General")["mae"] == pytest.approx(100 * 0.9 ** 20, rel=1e-12)
    lam = L.lambdas_for_epoch(93, 100, "Matting")
    assert lam["ssim"] == pytest.approx(10 * 0.9 ** 3, rel=1e-12)
    assert (lam["bce"], lam["mae"], lam["mse"], lam["iou"]) == (30.0, 100.0, 0.0, 0.0)
    # A run resumed inside the phase compounds from its first epoch, as the original's trainer does.
    assert L.lambdas_for_epoch(70, 100, "DIS5K", start_epoch=68)["iou"] == pytest.approx(0.5 * 0.5 ** 3)
    assert L.lambdas_for_epoch(100, 100, "DIS5K", finetune_last_epochs=0) == L.LAMBDAS_PIX_LAST["DIS5K"]
    assert L.LAMBDAS_PIX_LAST["DIS5K"]["iou"] == 0.5  # the table is not mutated
    with pytest.raises(TypeError):
        L.LAMBDAS_PIX_LAST["DIS5K"]["iou"] = 1.0
    with pytest.raises(ValueError, match="unknown task"):
        L.lambdas_for_epoch(1, 10, "dis5k")


# --------------------------------------------------------------------------------------------------------
# Gradients and dtypes


@pytest.mark.slow
def test_objective_is_differentiable():
    rng = np.random.default_rng(4)
    gt = jnp.asarray((rng.random((2, 32, 32, 1)) > 0.5).astype(np.float32))
    const = jnp.zeros((2, 8, 8, 1))  # a constant map: the contour length sits at its sqrt's eps
    saturated = jnp.asarray(np.where(rng.random((2, 32, 32, 1)) > 0.5, 200.0, -200.0), jnp.float32)  # p = 0 or 1
    outputs = TrainOutputs([const, saturated], [jnp.asarray(rng.normal(size=(2, 16, 16, 1)), jnp.float32)],
                           [jnp.asarray(rng.normal(size=(2, 32, 32, 1)), jnp.float32)],
                           jnp.asarray(rng.normal(size=(2, 5)), jnp.float32))
    every = {name: 1.0 for name in L.PIX_CRITERIA}
    grads = jax.jit(jax.grad(lambda o, g: L.objective(o, g, jnp.array([1, 3]), lambdas=every)[0]))(outputs, gt)
    leaves = jax.tree.leaves(grads)
    assert len(leaves) == 5
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in (grads.preds[0], grads.gdt_preds[0], grads.gdt_labels[0],
                                                         grads.cls_logits))
    # The eps inside the contour's square root is what keeps a flat prediction's gradient finite.
    flat = jnp.full((1, 8, 8, 1), 0.5)
    assert bool(jnp.all(jnp.isfinite(jax.grad(lambda p: L.contour_loss(p, gt[:1, :8, :8]))(flat))))
    assert not bool(jnp.all(jnp.isfinite(jax.grad(lambda p: L.contour_loss(p, gt[:1, :8, :8], eps=0.0))(flat))))


def test_float64():
    rng = np.random.default_rng(5)
    p, g = rng.random((2, 24, 20, 1)), (rng.random((2, 24, 20, 1)) > 0.5).astype(np.float64)
    p[0, 0, 0, 0], p[0, 0, 1, 0] = 0.0, 1.0  # the clamped logs
    with jax.enable_x64(True):
        pj, gj = jnp.asarray(p, jnp.float64), jnp.asarray(g, jnp.float64)
        got = jax.jit(lambda a, b: {name: f(a, b) for name, f in L.PIX_CRITERIA.items()})(pj, gj)
        assert all(v.dtype == jnp.float64 for v in got.values()), {k: v.dtype for k, v in got.items()}
        x = rng.normal(size=(2, 24, 20, 1)) * 4
        outputs = TrainOutputs([jnp.asarray(x, jnp.float64)], [], [], None)
        total = jax.jit(lambda o, y: L.objective(o, y, lambdas={"bce": 30.0, "iou": 0.5}))(outputs, gj)[0]
        assert total.dtype == jnp.float64

    def np_bce(p, g):
        with np.errstate(divide="ignore"):
            return -np.mean(g * np.maximum(np.log(p), -100) + (1 - g) * np.maximum(np.log1p(-p), -100))

    assert rel(got["bce"], np_bce(p, g)) < 1e-14
    assert rel(got["iou"], _np_iou(p, g)) < 1e-14
    q = 1 / (1 + np.exp(-x))
    assert rel(total, 30 * np_bce(q, g) + 0.5 * _np_iou(q, g)) < 1e-14
    # bfloat16 inputs are computed in float32
    assert L.ssim_loss(jnp.asarray(p, jnp.bfloat16), jnp.asarray(g, jnp.bfloat16)).dtype == jnp.float32
