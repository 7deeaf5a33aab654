"""Foreground refinement (blur fusion) against the original's two versions, and the box filter under it
against float64 NumPy, OpenCV and PyTorch."""

from __future__ import annotations

import collections
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from birefnet_jax.inference.refine import (
    FINE_RADIUS,
    box_blur,
    default_anchor,
    estimate_foreground,
    refine_foreground,
)

REF = Path(__file__).parent / "reference" / "refine_foreground.npz"


@pytest.fixture(scope="module")
def ref():
    data = np.load(REF)
    return {k: data[k] for k in data.files}


def blur64(x, size, border, anchor=None):
    """float64 box mean over a (..., H, W, C) array from a 2-D summed-area table of the padded input."""
    x = np.asarray(x, np.float64)
    a = default_anchor(size, border) if anchor is None else anchor
    lead = [(0, 0)] * (x.ndim - 3)
    p = np.pad(x, lead + [(a, size - 1 - a)] * 2 + [(0, 0)], mode="edge" if border == "replicate" else "reflect")
    c = np.pad(np.cumsum(np.cumsum(p, -3), -2), lead + [(1, 0), (1, 0), (0, 0)])
    h, w = x.shape[-3:-1]
    s = c[..., size:, size:, :] - c[..., :h, size:, :] - c[..., size:, :w, :] + c[..., :h, :w, :]
    return s / (size * size)


def foreground64(image, alpha, radius, border):
    """The two-pass blur fusion in float64 NumPy (the formula, written independently of the module)."""
    image = np.asarray(image, np.float64)
    alpha = np.asarray(alpha, np.float64)[..., None]

    def fuse(f, b, size):
        s = blur64(np.concatenate([alpha, f * alpha, b * (1 - alpha)], -1), size, border)
        mean_f = s[..., 1:4] / (s[..., :1] + 1e-5)
        mean_b = s[..., 4:] / (1 - s[..., :1] + 1e-5)
        return np.clip(mean_f + alpha * (image - alpha * mean_f - (1 - alpha) * mean_b), 0, 1), mean_b

    f, b = fuse(image, image, radius)
    return fuse(f, b, FINE_RADIUS)[0]


def as_float(ref):
    return ref["image"].astype(np.float32) / np.float32(255), ref["mask"].astype(np.float32) / np.float32(255)


# ---------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("radius", [90, 15])
def test_tensor_version_parity(ref, radius):
    """border="replicate" is the original's tensor version: float32 outputs agree to a few ulps."""
    image, alpha = as_float(ref)
    out = np.asarray(estimate_foreground(image, alpha, radius, border="replicate"))
    expected = ref[f"tensor_r{radius}"]
    assert out.shape == expected.shape and out.dtype == np.float32
    err = np.abs(out - expected)
    assert err.max() < 1e-5, err.max()  # measured 2.6e-6 (r90), 1.3e-6 (r15): the reference's own rounding


@pytest.mark.parametrize("radius", [90, 15])
def test_opencv_version_parity(ref, radius):
    """border="reflect101" is the original's OpenCV version: same uint8 output, border included."""
    image, alpha = as_float(ref)
    fg = np.asarray(estimate_foreground(image, alpha, radius, border="reflect101"))
    expected = ref[f"cpu_r{radius}"].astype(int)
    diff = np.abs((fg * np.float32(255)).astype(np.uint8).astype(int) - expected)
    # Truncation may flip where fg * 255 lands within rounding of an integer; measured: 0 everywhere.
    assert diff.max() <= 1 and np.mean(diff == 0) > 0.999
    # the float result truncates to the reference: 0 <= fg * 255 - ref < 1, up to rounding
    delta = fg.astype(np.float64) * 255 - expected
    assert delta.min() > -1e-3 and delta.max() < 1 + 1e-3


def test_refine_foreground_uint8(ref):
    """The uint8 convenience: both originals' conversions (x / 255 in float32, truncation back)."""
    image, alpha = as_float(ref)
    cpu = refine_foreground(ref["image"], ref["mask"], 15, border="reflect101")
    assert cpu.dtype == np.uint8 and cpu.shape == ref["image"].shape
    assert np.abs(cpu.astype(int) - ref["cpu_r15"]).max() <= 1 and np.mean(cpu == ref["cpu_r15"]) > 0.999
    tensor = refine_foreground(ref["image"], ref["mask"][..., None], 15)  # default: the tensor version
    assert np.abs(tensor.astype(int) - (ref["tensor_r15"] * 255).astype(np.uint8)).max() <= 1
    fg = np.asarray(estimate_foreground(image, alpha, 15))
    np.testing.assert_array_equal(tensor, (fg * np.float32(255)).astype(np.uint8))


def test_borders_differ_near_the_edges(ref):
    """The two originals disagree at the border, as the reference README says; so do the two modes."""
    image, alpha = as_float(ref)
    rep = np.asarray(estimate_foreground(image, alpha, 15, border="replicate"))
    refl = np.asarray(estimate_foreground(image, alpha, 15, border="reflect101"))
    assert np.abs(rep - refl).max() > 1e-2
    assert np.abs(ref["tensor_r15"] - ref["cpu_r15"] / 255).max() > 1e-2


@pytest.mark.parametrize("border", ["replicate", "reflect101"])
def test_float64_formula(ref, border):
    """float32 result within a few ulps of the same computation in float64 (tighter than the references)."""
    image, alpha = as_float(ref)
    out = np.asarray(estimate_foreground(image, alpha, 90, border=border))
    assert np.abs(out - foreground64(image, alpha, 90, border)).max() < 1e-6  # measured ~2e-7


def test_batched_equals_per_image(ref):
    image, alpha = as_float(ref)
    images = np.stack([image, image[::-1, ::-1]])
    alphas = np.stack([alpha, alpha[::-1, ::-1]])
    batched = np.asarray(estimate_foreground(images, alphas, 15))
    assert batched.shape == images.shape
    for i in range(2):
        single = np.asarray(estimate_foreground(images[i], alphas[i], 15))
        np.testing.assert_allclose(batched[i], single, rtol=0, atol=1e-6)
    trailing = np.asarray(estimate_foreground(images, alphas[..., None], 15))
    np.testing.assert_array_equal(trailing, batched)
    # usable inside jax.jit (traced abstractly here, to spare a compilation)
    traced = jax.eval_shape(jax.jit(estimate_foreground, static_argnames=("radius", "border")), images, alphas, 15)
    assert traced.shape == images.shape and traced.dtype == jnp.float32


def test_input_checks(ref):
    image, alpha = as_float(ref)
    with pytest.raises(ValueError, match="border"):
        estimate_foreground(image, alpha, 15, border="reflect")
    with pytest.raises(ValueError, match="alpha"):
        estimate_foreground(image, alpha[:-1], 15)
    with pytest.raises(ValueError, match="mask"):
        refine_foreground(ref["image"], ref["mask"][:-1])
    with pytest.raises(TypeError):
        refine_foreground(image, ref["mask"])
    with pytest.raises(ValueError, match="size"):
        box_blur(np.zeros((4, 4, 1), np.float32), 0)


def test_foreground_of_a_solid_cutout(ref):
    """Where alpha is 1 the foreground is the image; where the window holds no foreground it stays 0."""
    image = np.random.default_rng(0).random(ref["image"].shape).astype(np.float32)
    alpha = np.zeros(image.shape[:2], np.float32)
    alpha[20:70, 12:60] = 1
    fg = np.asarray(estimate_foreground(image, alpha, 15))
    np.testing.assert_allclose(fg[20:70, 12:60], image[20:70, 12:60], atol=1e-6)
    assert np.all(fg[:, 80:] == 0)


# ---------------------------------------------------------------------------------------------- box blur


@pytest.mark.parametrize("border", ["replicate", "reflect101"])
@pytest.mark.parametrize("size", [2, 9, 16])
def test_box_blur_against_float64(border, size):
    x = np.random.default_rng(size).random((2, 13, 21, 3)).astype(np.float32)
    out = np.asarray(box_blur(x, size, border))
    np.testing.assert_allclose(out, blur64(x, size, border), rtol=0, atol=3e-7)


@pytest.mark.parametrize("border", ["replicate", "reflect101"])
@pytest.mark.parametrize(("shape", "size"), [((1, 1, 1), 6), ((5, 7, 2), 40)])
def test_box_blur_window_larger_than_image(border, shape, size):
    x = np.random.default_rng(1).random(shape).astype(np.float32)
    out = np.asarray(box_blur(x, size, border))
    np.testing.assert_allclose(out, blur64(x, size, border), rtol=0, atol=3e-7)


def test_box_blur_even_window_anchor():
    """Even windows: replicate puts the extra pixel after the centre (the original's tensor `mean_blur`),
    reflect101 before it (cv2.blur); `anchor` overrides."""
    assert default_anchor(6, "replicate") == 2 and default_anchor(6, "reflect101") == 3
    assert default_anchor(7, "replicate") == default_anchor(7, "reflect101") == 3
    impulse = np.zeros((1, 12, 1), np.float32)
    impulse[0, 5] = 1
    support = lambda y: np.flatnonzero(np.asarray(y)[0, :, 0] > 0).tolist()
    assert support(box_blur(impulse, 6, "replicate")) == [2, 3, 4, 5, 6, 7]
    assert support(box_blur(impulse, 6, "reflect101")) == [3, 4, 5, 6, 7, 8]
    assert support(box_blur(impulse, 6, "replicate", anchor=3)) == [3, 4, 5, 6, 7, 8]
    x = np.random.default_rng(2).random((9, 11, 2)).astype(np.float32)
    for size in (10,):
        out = np.asarray(box_blur(x, size, "replicate", anchor=size // 2))
        np.testing.assert_allclose(out, blur64(x, size, "replicate", anchor=size // 2), rtol=0, atol=3e-7)


def test_box_blur_zeros_stay_zero_and_constants_constant():
    """Windows of zeros sum to exactly 0 (the fusion divides by blurred alpha + 1e-5 there)."""
    x = np.zeros((3, 64, 70, 2), np.float32)
    x[:, 20:30, 30:40, 0] = 1
    x[..., 1] = 0.3
    out = np.asarray(box_blur(x, 25))
    assert np.all(out[:, :, 52:, 0] == 0) and np.all(out[:, 42:, :, 0] == 0)
    np.testing.assert_allclose(out[..., 1], 0.3, rtol=1e-6)


def test_box_blur_cost_independent_of_window():
    """O(1) per pixel: no convolution or reduce-window, and a program whose ops do not depend on the window."""
    x = jnp.zeros((1, 16, 640, 1))
    programs = [box_blur.lower(x, size, "replicate").as_text() for size in (30, 301)]
    for text in programs:
        assert "stablehlo.convolution" not in text and "stablehlo.reduce_window" not in text
    ops = [collections.Counter(re.findall(r"stablehlo\.(\w+)", t)) for t in programs]
    assert ops[0] == ops[1]
    compiled = box_blur.lower(x, 301, "replicate").compile().as_text()
    assert not re.search(r"= \S+ (convolution|reduce-window|dot)\(", compiled)


@pytest.mark.parametrize("size", [6, 1001])
def test_box_blur_wide_image_accuracy(size):
    """A 4096-wide image: a running sum over the whole row would lose ~1e-4; the blocked compensated sum
    stays at float32 rounding, whatever the window."""
    x = np.random.default_rng(size).random((1, 3, 4096, 1)).astype(np.float32)
    exact = blur64(x, size, "replicate")
    rel = np.abs(np.asarray(box_blur(x, size, "replicate")) - exact) / np.abs(exact)
    assert rel.max() < 1e-6, rel.max()  # measured ~2e-7


@pytest.mark.parametrize(
    ("shape", "size"), [((1, 1, 1), 3), ((7, 3, 1), 64), ((37, 50, 3), 6), ((37, 50, 3), 15), ((20, 31, 4), 10)]
)
def test_box_blur_matches_cv2(shape, size):
    """Live cross-check of border="reflect101" against cv2.blur (default border), odd, even and oversize."""
    cv2 = pytest.importorskip("cv2")
    x = np.random.default_rng(size).random(shape).astype(np.float32)
    expected = cv2.blur(x, (size, size)).reshape(shape)
    np.testing.assert_allclose(np.asarray(box_blur(x, size, "reflect101")), expected, rtol=0, atol=1e-6)


def test_box_blur_matches_torch_replicate_mean_blur():
    """The original's tensor `mean_blur`: replicate padding, then an unpadded average pool."""
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(4).random((2, 17, 23, 3)).astype(np.float32)
    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    size = 6  # even: where the original's window offset differs from cv2.blur's
    lo, hi = (size - 1) // 2, size // 2
    padded = torch.nn.functional.pad(t, (lo, hi, lo, hi), mode="replicate")
    expected = torch.nn.functional.avg_pool2d(padded, size, stride=1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(box_blur(x, size, "replicate")), expected, rtol=0, atol=1e-6)
