"""The synthetic dichotomous data set: deterministic, thin structures, exact soft masks, the original's layout."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from birefnet_jax.train.data import synthetic
from birefnet_jax.train.data.augment import augment
from birefnet_jax.train.data.synthetic import synthetic_example, write_synthetic_dataset

CASES = [(0, i, (256, 256)) for i in range(6)] + [(7, i, (96, 160)) for i in range(6)]


@pytest.fixture(scope="module")
def examples():
    return {case: synthetic_example(*case) for case in CASES}


def run_lengths(binary: np.ndarray) -> np.ndarray:
    """Lengths of the runs of True along each row of a 2-D boolean array."""
    padded = np.pad(binary.astype(np.int8), ((0, 0), (1, 1)))
    steps = np.diff(padded, axis=1)
    return np.flatnonzero(steps.ravel() == -1) - np.flatnonzero(steps.ravel() == 1)


def test_kinds_and_sizes(examples):
    for (_, _, (height, width)), (image, mask) in examples.items():
        assert image.dtype == np.uint8 and image.shape == (height, width, 3)
        assert mask.dtype == np.uint8 and mask.shape == (height, width)
    image, mask = synthetic_example(1, 2, (48, 200))
    assert image.shape == (48, 200, 3) and mask.shape == (48, 200)


def test_deterministic_and_indices_differ(examples):
    image, mask = examples[(0, 3, (256, 256))]
    again = synthetic_example(0, 3, (256, 256))
    np.testing.assert_array_equal(again[0], image)
    np.testing.assert_array_equal(again[1], mask)
    masks = [examples[(0, i, (256, 256))][1] for i in range(6)]
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            assert not np.array_equal(masks[i], masks[j]), (i, j)
    other_seed = synthetic_example(1, 3, (256, 256))
    assert not np.array_equal(other_seed[1], mask) and not np.array_equal(other_seed[0], image)


def test_masks_are_binary_with_soft_edges(examples):
    for case, (_, mask) in examples.items():
        hard = np.isin(mask, (0, 255)).mean()
        soft = ((mask > 0) & (mask < 255)).mean()
        assert hard > 0.75, case  # mostly 0 or 255
        assert soft > 0.005, case  # anti-aliased edges
        assert len(np.unique(mask)) > 8, case  # several coverage levels, not a thresholded mask


def test_foreground_fraction_in_range(examples):
    for case, (_, mask) in examples.items():
        assert 0.02 <= mask.mean() / 255 <= 0.60, case
        assert 0.01 <= (mask >= 128).mean() <= 0.65, case


def test_thin_structures_present(examples):
    for case, (_, mask) in examples.items():
        binary = mask >= 128
        runs = np.concatenate([run_lengths(binary), run_lengths(binary.T)])
        thin = np.count_nonzero((runs >= 1) & (runs <= 3))
        assert thin >= 20, (case, thin)
        assert runs.max() > 3, case  # and not only thin parts


def test_image_follows_the_mask(examples):
    for case, (image, mask) in examples.items():
        fg = image[mask == 255].astype(float)
        bg = image[mask == 0].astype(float)
        gap = np.linalg.norm(fg.mean(axis=0) - bg.mean(axis=0))
        assert gap > 60, (case, gap)
        assert fg.std(axis=0).max() < 40, case  # one shaded colour, not the background showing through


def test_mask_is_exactly_the_alpha():
    """Compositing the example's own foreground and background with the mask gives its image."""
    seed, index, (height, width) = 3, 4, (80, 120)
    rng = np.random.default_rng([seed, index])
    background = synthetic._background(rng, height, width)
    mask = synthetic._object_mask(rng, height, width)
    foreground = synthetic._foreground(rng, height, width, background.mean(axis=(0, 1)))
    image, mask_out = synthetic_example(seed, index, (height, width))
    np.testing.assert_array_equal(mask_out, mask)
    alpha = mask[..., None] / 255.0
    expected = np.round(foreground * alpha + background * (1 - alpha))
    np.testing.assert_allclose(image, expected, atol=1)
    inside = mask == 255
    np.testing.assert_allclose(image[inside], np.round(foreground[inside]), atol=1)


def test_rasteriser_antialiases_a_known_shape():
    canvas = synthetic._Canvas(20, 20, 4)
    canvas.capsules([[2.0, 10.0]], [[18.0, 10.0]], 1.0)  # a horizontal bar 2 px wide, rows 9-10 exactly
    mask = canvas.coverage()
    np.testing.assert_array_equal(mask[9:11, 4:16], 255)
    assert mask[:9].max() == 0 and mask[11:].max() == 0
    canvas = synthetic._Canvas(20, 20, 4)
    canvas.capsules([[2.0, 10.5]], [[18.0, 10.5]], 0.75)  # 1.5 px wide, centred on row 10
    mask = canvas.coverage()
    assert mask[10, 8] == 255 and 0 < mask[9, 8] < 255 and 0 < mask[11, 8] < 255
    assert abs(mask[:, 8].sum() / 255 - 1.5) < 0.1  # coverage sums to the width


def test_write_dataset_layout(tmp_path):
    folder = write_synthetic_dataset(tmp_path, 5, size=(64, 96), seed=2)
    assert folder == tmp_path / "DIS5K" / "SYN-TR"
    images = sorted(p.name for p in (folder / "im").iterdir())
    masks = sorted(p.name for p in (folder / "gt").iterdir())
    stems = [f"syn_{i:05d}" for i in range(5)]
    assert images == [f"{s}.jpg" for s in stems]
    assert masks == [f"{s}.png" for s in stems]
    for i, stem in enumerate(stems):
        expected_image, expected_mask = synthetic_example(2, i, (64, 96))
        with Image.open(folder / "im" / f"{stem}.jpg") as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (96, 64)
            image = np.asarray(im)
        with Image.open(folder / "gt" / f"{stem}.png") as gt:
            assert gt.format == "PNG" and gt.mode == "L"
            mask = np.asarray(gt)
        np.testing.assert_array_equal(mask, expected_mask)  # lossless
        assert np.abs(image.astype(int) - expected_image).mean() < 4  # JPEG quality 95

    other = write_synthetic_dataset(tmp_path / "data", 2, size=(32, 32), task="General", set_name="SYN-VD")
    assert other == tmp_path / "data" / "General" / "SYN-VD"
    assert sorted(p.name for p in (other / "gt").iterdir()) == ["syn_00000.png", "syn_00001.png"]


def test_interrupted_write_leaves_no_partial_file(tmp_path, monkeypatch):
    calls = {"n": 0}
    save = Image.Image.save

    def flaky_save(self, fp, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # the second example's mask: fail half-way through writing it
            fp.write(b"\xff\xd8 partial")
            raise KeyboardInterrupt
        return save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", flaky_save)
    with pytest.raises(KeyboardInterrupt):
        write_synthetic_dataset(tmp_path, 3, size=(32, 32))
    folder = tmp_path / "DIS5K" / "SYN-TR"
    leftovers = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert leftovers == ["gt/syn_00000.png", "im/syn_00000.jpg", "im/syn_00001.jpg"]  # no temporary, no half file
    for path in leftovers:
        with Image.open(folder / path) as img:
            img.load()  # complete, readable files only


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"seed": -1, "index": 0}, ValueError, "seed must be >= 0"),
        ({"seed": 0, "index": 1.5}, TypeError, "index must be an int"),
        ({"seed": 0, "index": 0, "size": (0, 10)}, ValueError, "size must be positive"),
        ({"seed": 0, "index": 0, "size": 64}, TypeError, r"size must be \(height, width\)"),
    ],
)
def test_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        synthetic_example(**kwargs)


def test_bad_dataset_arguments(tmp_path):
    with pytest.raises(ValueError, match="set_name must be a plain folder name"):
        write_synthetic_dataset(tmp_path, 1, set_name="../escape")
    with pytest.raises(ValueError, match="count must be >= 0"):
        write_synthetic_dataset(tmp_path, -1)
    assert not any(tmp_path.iterdir())


def test_examples_go_through_the_augmentations(examples):
    image, mask = examples[(0, 0, (256, 256))]
    methods = ("flip", "crop", "rotate", "enhance", "pepper")
    out_image, out_mask = augment(image, mask, np.random.default_rng(0), methods)
    assert out_image.dtype == np.uint8 and out_mask.shape == out_image.shape[:2]
