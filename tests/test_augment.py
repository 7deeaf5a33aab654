"""The training augmentations: the original's operations, order, probabilities and ranges, on arrays,
with every draw from the generator passed in."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from birefnet_jax.train.data.augment import (
    BACKGROUND_SYNTHESIS_METHODS,
    DEFAULT_METHODS,
    METHODS,
    PEPPER_FRACTION,
    BackgroundParams,
    apply_params,
    augment,
    default_methods,
    enhance_colour,
    sample_params,
    synthesize_background,
)

GEOMETRY = ("flip", "crop", "rotate")


def structured_mask(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A mask with a filled ellipse, a thin bar and noise: asymmetric, so misalignments show."""
    yy, xx = np.mgrid[0:height, 0:width]
    mask = np.zeros((height, width), np.uint8)
    cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.2, 0.5) * width
    mask[((yy - cy) / (0.2 * height)) ** 2 + ((xx - cx) / (0.15 * width)) ** 2 <= 1] = 255
    mask[:, int(0.8 * width)] = 200
    mask[rng.random((height, width)) < 0.05] = 90
    return mask


def textured_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def first_seed(predicate, methods, height=20, width=30, background_synthesis=False):
    for seed in range(1000):
        params = sample_params(np.random.default_rng(seed), height, width, methods, background_synthesis)
        if predicate(params):
            return seed, params
    raise AssertionError("no seed satisfies the predicate")


def test_geometry_keeps_image_and_mask_aligned():
    for seed in range(60):
        rng = np.random.default_rng(1000 + seed)
        height, width = int(rng.integers(12, 70)), int(rng.integers(12, 70))
        mask = structured_mask(rng, height, width)
        image = np.repeat(mask[..., None], 3, axis=2)
        out_image, out_mask = augment(image, mask, np.random.default_rng(seed), GEOMETRY)
        assert out_image.shape == out_mask.shape + (3,)
        for channel in range(3):
            np.testing.assert_array_equal(out_image[..., channel], out_mask, err_msg=f"seed {seed}")


def test_augment_draws_what_sample_params_draws():
    rng = np.random.default_rng(5)
    image, mask = textured_image(rng, 40, 50), structured_mask(rng, 40, 50)
    for seed in range(20):
        direct = augment(image, mask, np.random.default_rng(seed), METHODS, background_synthesis=True)
        params = sample_params(np.random.default_rng(seed), 40, 50, METHODS, background_synthesis=True)
        two_step = apply_params(image, mask, params)
        np.testing.assert_array_equal(direct[0], two_step[0])
        np.testing.assert_array_equal(direct[1], two_step[1])


def test_flip_flips_and_otherwise_leaves_alone():
    rng = np.random.default_rng(1)
    image, mask = textured_image(rng, 20, 30), structured_mask(rng, 20, 30)
    seed, _ = first_seed(lambda p: p.flip, ("flip",))
    out_image, out_mask = augment(image, mask, np.random.default_rng(seed), ("flip",))
    np.testing.assert_array_equal(out_image, np.fliplr(image))
    np.testing.assert_array_equal(out_mask, np.fliplr(mask))
    seed, _ = first_seed(lambda p: not p.flip, ("flip",))
    out_image, out_mask = augment(image, mask, np.random.default_rng(seed), ("flip",))
    np.testing.assert_array_equal(out_image, image)
    np.testing.assert_array_equal(out_mask, mask)


def test_rotation_changes_the_pair_like_pil_bicubic():
    rng = np.random.default_rng(2)
    image, mask = textured_image(rng, 20, 30), structured_mask(rng, 20, 30)
    seed, params = first_seed(lambda p: p.angle is not None and abs(p.angle) >= 5, ("rotate",))
    out_image, out_mask = augment(image, mask, np.random.default_rng(seed), ("rotate",))
    assert out_image.shape == image.shape and out_mask.shape == mask.shape
    assert not np.array_equal(out_image, image) and not np.array_equal(out_mask, mask)
    bicubic = Image.Resampling.BICUBIC
    np.testing.assert_array_equal(out_image, np.array(Image.fromarray(image).rotate(params.angle, bicubic)))
    np.testing.assert_array_equal(out_mask, np.array(Image.fromarray(mask).rotate(params.angle, bicubic)))
    # Counter-clockwise by a positive angle, black outside: a corner of the mask is blanked.
    assert out_mask[0, 0] == 0 or out_mask[-1, -1] == 0


def test_crop_window_sizes_and_centre():
    rng = np.random.default_rng(3)
    height, width = 80, 100
    image, mask = textured_image(rng, height, width), structured_mask(rng, height, width)
    border = int(0.1 * min(width, height))  # 8
    widths, heights = set(), set()
    for seed in range(300):
        params = sample_params(np.random.default_rng(seed), height, width, ("crop",))
        left, top, right, bottom = params.crop
        widths.add(right - left)
        heights.add(bottom - top)
        assert (left, top) == ((width - (right - left)) >> 1, (height - (bottom - top)) >> 1)
    # randint(size - border, size): the upper bound is excluded, every other size occurs.
    assert widths == set(range(width - border, width))
    assert heights == set(range(height - border, height))
    out_image, out_mask = augment(image, mask, np.random.default_rng(0), ("crop",))
    left, top, right, bottom = sample_params(np.random.default_rng(0), height, width, ("crop",)).crop
    np.testing.assert_array_equal(out_image, image[top:bottom, left:right])
    np.testing.assert_array_equal(out_mask, mask[top:bottom, left:right])
    # Under 10 pixels a side the border is 0: the original's randint would fail; the image stays whole.
    small = augment(image[:9, :9], mask[:9, :9], np.random.default_rng(0), ("crop",))
    assert small[1].shape == (9, 9)


def test_probabilities_and_ranges_over_many_draws():
    rng = np.random.default_rng(4)
    draws = [sample_params(rng, 8, 8, METHODS, background_synthesis=True) for _ in range(2000)]
    flips = np.mean([p.flip for p in draws])
    angles = np.array([p.angle for p in draws if p.angle is not None])
    assert 0.45 < flips < 0.55
    assert 0.16 < len(angles) / len(draws) < 0.24
    assert angles.min() == -15 and angles.max() == 14  # randint(-15, 15): 15 itself never comes
    factors = np.array([p.enhance for p in draws])
    for column, (lo, hi) in enumerate([(0.5, 1.5), (0.5, 1.5), (0.0, 2.0), (0.0, 3.0)]):
        values = np.round(factors[:, column] * 10).astype(int)
        np.testing.assert_allclose(factors[:, column], values / 10)  # multiples of 0.1
        assert values.min() == round(lo * 10) and values.max() == round(hi * 10)  # both ends included
        assert len(np.unique(values)) == round((hi - lo) * 10) + 1
    kinds = [p.background.kind for p in draws]
    assert 0.35 < kinds.count("grey") / len(kinds) < 0.45
    assert 0.35 < kinds.count("similar") / len(kinds) < 0.45
    assert 0.15 < kinds.count("random") / len(kinds) < 0.25
    similar = [p.background for p in draws if p.background.kind == "similar"]
    assert {b.direction for b in similar} == {-1, 1}
    shifts = np.array([b.shift for b in similar])
    assert shifts.min() >= 0 and shifts.max() < 0.2 and shifts.max() > 0.18
    greys = [p.background.colour for p in draws if p.background.kind == "grey"]
    assert all(c[0] == c[1] == c[2] for c in greys)
    assert min(c[0] for c in greys) <= 5 and max(c[0] for c in greys) >= 250


def test_methods_not_asked_for_draw_nothing():
    rng = np.random.default_rng(0)
    params = sample_params(rng, 50, 60, ())
    assert not params.flip and params.crop is None and params.angle is None and params.enhance is None
    assert len(params.pepper_rows) == 0 and params.background is None
    assert rng.bit_generator.state == np.random.default_rng(0).bit_generator.state  # nothing drawn
    rng = np.random.default_rng(6)
    image, mask = textured_image(rng, 50, 60), structured_mask(rng, 50, 60)
    out_image, out_mask = augment(image, mask, np.random.default_rng(0), ())
    np.testing.assert_array_equal(out_image, image)
    np.testing.assert_array_equal(out_mask, mask)
    assert not np.shares_memory(out_image, image) and not np.shares_memory(out_mask, mask)


def test_pepper_sets_the_expected_pixels_and_leaves_the_mask():
    height, width = 200, 300
    image = np.full((height, width, 3), 128, np.uint8)
    mask = structured_mask(np.random.default_rng(7), height, width)
    expected = int(PEPPER_FRACTION * height * width)  # 90
    params = sample_params(np.random.default_rng(8), height, width, ("pepper",))
    assert len(params.pepper_rows) == expected
    out_image, out_mask = augment(image, mask, np.random.default_rng(8), ("pepper",))
    np.testing.assert_array_equal(out_mask, mask)
    changed = np.any(out_image != 128, axis=2)
    positions = set(zip(params.pepper_rows.tolist(), params.pepper_cols.tolist(), strict=True))
    assert set(zip(*np.nonzero(changed), strict=True)) == positions
    assert 0 < changed.sum() <= expected
    values = out_image[changed]
    assert set(np.unique(values).tolist()) == {0, 255}
    assert np.all(values == values[:, :1])  # all three channels together
    # After a crop, the count and the positions are those of the cropped image.
    params = sample_params(np.random.default_rng(8), height, width, ("crop", "pepper"))
    out_height, out_width = params.output_size
    assert (out_height, out_width) != (height, width)
    assert len(params.pepper_rows) == int(PEPPER_FRACTION * out_height * out_width)
    assert params.pepper_rows.max() < out_height and params.pepper_cols.max() < out_width


def test_enhancement_is_pils_in_order():
    rng = np.random.default_rng(9)
    image, mask = textured_image(rng, 30, 40), structured_mask(rng, 30, 40)
    seed = 11
    factors = sample_params(np.random.default_rng(seed), 30, 40, ("enhance",)).enhance
    out_image, out_mask = augment(image, mask, np.random.default_rng(seed), ("enhance",))
    np.testing.assert_array_equal(out_mask, mask)
    reference = Image.fromarray(image)
    for enhancer, factor in zip(
        (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color, ImageEnhance.Sharpness),
        factors,
        strict=True,
    ):
        reference = enhancer(reference).enhance(factor)
    np.testing.assert_array_equal(out_image, np.array(reference))
    np.testing.assert_array_equal(enhance_colour(image, (1.0, 1.0, 1.0, 1.0)), image)
    assert enhance_colour(image, (0.5, 1.0, 1.0, 1.0)).mean() < image.mean() * 0.6


def soft_mask(height: int = 40, width: int = 50) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    mask[10:30, 15:35] = 255
    mask[9, 15:35] = 128  # a soft edge
    return mask


def test_background_synthesis_keeps_the_foreground_and_replaces_the_background():
    rng = np.random.default_rng(10)
    image, mask = textured_image(rng, 40, 50), soft_mask()
    fg, bg = mask == 255, mask == 0
    seen = set()
    for seed in range(40):
        params = sample_params(np.random.default_rng(seed), 40, 50, (), background_synthesis=True)
        out_image, out_mask = augment(image, mask, np.random.default_rng(seed), (), background_synthesis=True)
        seen.add(params.background.kind)
        np.testing.assert_array_equal(out_mask, mask)
        np.testing.assert_array_equal(out_image[fg], image[fg])
        background = out_image[bg]
        assert np.all(background == background[0]), "the background is one colour"
        assert np.mean(np.any(out_image[bg] != image[bg], axis=1)) > 0.9
        colour = background[0].astype(float)
        if params.background.kind == "grey":
            assert colour[0] == colour[1] == colour[2]
        elif params.background.kind == "similar":
            # Sum of image * alpha over the count of non-zero mask pixels (the original's "mean").
            mean = (image * (mask / 255.0)[..., None]).sum(axis=(0, 1)) / np.count_nonzero(mask)
            b = params.background
            target = mean + (255 - mean) * b.shift if b.direction > 0 else mean - mean * b.shift
            np.testing.assert_allclose(colour, np.floor(target), atol=1)
        # The soft edge is a blend of the two.
        edge = out_image[9, 20].astype(float)
        a = 128 / 255
        np.testing.assert_allclose(edge, image[9, 20].astype(float) * a + colour * (1 - a), atol=1.5)
    assert seen == {"grey", "similar", "random"}


def test_similar_background_of_an_empty_mask_is_finite():
    image = textured_image(np.random.default_rng(12), 10, 12)
    brighter = BackgroundParams("similar", direction=1, shift=0.1)
    out = synthesize_background(image, np.zeros((10, 12), np.uint8), brighter)
    expected = image.reshape(-1, 3).mean(axis=0)
    expected = expected + (255 - expected) * 0.1
    np.testing.assert_allclose(out[0, 0], np.floor(expected), atol=1)
    assert np.all(out == out[0, 0])


def test_same_seed_same_output_and_inputs_untouched():
    rng = np.random.default_rng(13)
    image, mask = textured_image(rng, 64, 48), structured_mask(rng, 64, 48)
    image_copy, mask_copy = image.copy(), mask.copy()
    first = augment(image, mask, np.random.default_rng(21), METHODS, background_synthesis=True)
    second = augment(image, mask, np.random.default_rng(21), METHODS, background_synthesis=True)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    others = [augment(image, mask, np.random.default_rng(s), METHODS, True)[0] for s in range(22, 26)]
    assert any(o.shape != first[0].shape or not np.array_equal(o, first[0]) for o in others)
    np.testing.assert_array_equal(image, image_copy)
    np.testing.assert_array_equal(mask, mask_copy)
    assert first[0].dtype == np.uint8 and first[1].dtype == np.uint8
    assert first[0].flags.writeable and first[0].flags.c_contiguous


def test_default_methods_follow_the_original_config():
    assert DEFAULT_METHODS == ("flip", "enhance", "rotate", "pepper")
    assert default_methods(False) == DEFAULT_METHODS
    assert default_methods(True) == BACKGROUND_SYNTHESIS_METHODS == ("flip",)


@pytest.mark.parametrize(
    "image, mask, kwargs, error, message",
    [
        (np.zeros((8, 8, 3), np.float32), np.zeros((8, 8), np.uint8), {}, TypeError, "image must have dtype uint8"),
        (np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), bool), {}, TypeError, "mask must have dtype uint8"),
        (np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8), {}, ValueError, r"image must have shape \(H, W, 3\)"),
        (np.zeros((8, 8, 4), np.uint8), np.zeros((8, 8), np.uint8), {}, ValueError, r"\(H, W, 3\)"),
        (np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 1), np.uint8), {}, ValueError, "mask must have shape"),
        (np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9), np.uint8), {}, ValueError, "sizes differ"),
        (np.zeros((0, 8, 3), np.uint8), np.zeros((0, 8), np.uint8), {}, ValueError, "empty"),
        ([[0]], np.zeros((8, 8), np.uint8), {}, TypeError, "image must be a NumPy array"),
        (
            np.zeros((8, 8, 3), np.uint8),
            np.zeros((8, 8), np.uint8),
            {"methods": ("flip", "blur")},
            ValueError,
            r"unknown augmentation method\(s\) 'blur'; valid: flip, crop, rotate, enhance, pepper",
        ),
        (np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8), {"methods": "flip"}, TypeError, "not the string"),
    ],
)
def test_bad_inputs_name_the_problem(image, mask, kwargs, error, message):
    with pytest.raises(error, match=message):
        augment(image, mask, np.random.default_rng(0), **kwargs)


def test_bad_generator_and_mismatched_params_name_the_problem():
    image, mask = np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8)
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        augment(image, mask, 0)
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        augment(image, mask, np.random.RandomState(0))
    params = sample_params(np.random.default_rng(0), 9, 8)
    with pytest.raises(ValueError, match=r"drawn for \(H, W\) = \(9, 8\)"):
        apply_params(image, mask, params)
