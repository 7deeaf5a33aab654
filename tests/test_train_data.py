"""Training data input: pairing files by stem, one error naming every problem, size buckets, the
deterministic sharded resumable pipeline, and the TFDS builders. Tiny data sets in tmp_path."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from birefnet_jax.io.images import IMAGENET_MEAN, IMAGENET_STD
from birefnet_jax.train.data.folders import (
    DIS5K_CLASSES,
    DatasetError,
    Pair,
    check_files,
    find_pairs,
    load_image,
    load_mask,
)
from birefnet_jax.train.data.pipeline import DEFAULT_AUGMENT, TrainPipeline, make_train_iterator
from birefnet_jax.train.data.sizes import TrainingSizes

H, W = 64, 96
TASK = "DIS5K"
SMALL_SIZES = TrainingSizes.dynamic((32, 128), per_side=3)  # 32, 64 (rounded from 80), 128 each side


def _pattern(i: int, size=(H, W)) -> np.ndarray:
    """A mask unique to example i: a slanted ramp with an i-dependent slope and a block at i."""
    yy, xx = np.mgrid[: size[0], : size[1]]
    m = ((xx * (i + 2) + yy * 5) % 64) * 4
    m[(i * 5) % size[0] :, : 4 + i] = 255
    return m.astype(np.uint8)


def _colour(i: int) -> int:
    return (10 + 23 * i) % 250


def _write_example(root: Path, set_name: str, stem: str, i: int, *, image_ext=".png", mask_ext=".png", size=(H, W)):
    """Image channels 0 and 1 are the mask, channel 2 the constant `_colour(i)`."""
    im, gt = root / TASK / set_name / "im", root / TASK / set_name / "gt"
    im.mkdir(parents=True, exist_ok=True)
    gt.mkdir(parents=True, exist_ok=True)
    mask = _pattern(i, size)
    image = np.stack([mask, mask, np.full(size, _colour(i), np.uint8)], axis=-1)
    Image.fromarray(image).save(im / f"{stem}{image_ext}")
    Image.fromarray(mask).save(gt / f"{stem}{mask_ext}")


@pytest.fixture
def ten(tmp_path) -> Path:
    """Two sets, 6 + 4 examples; example i has stem s{i} (mixed extension cases)."""
    for i in range(10):
        _write_example(tmp_path, "A" if i < 6 else "B", f"s{i}", i, image_ext=(".png", ".PNG")[i % 2])
    return tmp_path


def _flip(image, mask, rng):
    """A test augmentation that uses its generator: random mirror of both, and one pixel of
    channel 2 set from the generator (so batches tell different draws apart)."""
    if rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    image = image.copy()
    image[0, 0, 2] = rng.integers(256)
    return image, mask


def _denormalised(image: np.ndarray) -> np.ndarray:
    return (image * np.asarray(IMAGENET_STD, np.float32) + np.asarray(IMAGENET_MEAN, np.float32)) * 255


# --------------------------------------------------------------------------- folders


def test_pairs_by_stem_across_joined_sets(tmp_path):
    for i, stem in enumerate(["b", "a", "c"]):
        exts = dict(image_ext=(".jpg", ".JPEG", ".png")[i], mask_ext=(".png", ".PNG", ".jpg")[i])
        _write_example(tmp_path, "A", stem, i, **exts)
    for i, stem in enumerate(["a", "z"]):
        _write_example(tmp_path, "B", stem, 10 + i)
    (tmp_path / TASK / "A" / "im" / "._a.jpg").write_bytes(b"macOS metadata, not an image")
    (tmp_path / TASK / "A" / "im" / "notes.txt").write_text("ignored")

    pairs = find_pairs(tmp_path, TASK, "A+B")
    assert [(p.set_name, p.stem) for p in pairs] == [("A", "a"), ("A", "b"), ("A", "c"), ("B", "a"), ("B", "z")]
    for p in pairs:
        assert p.image.parent == tmp_path / TASK / p.set_name / "im" and p.image.stem == p.stem
        assert p.mask.parent == tmp_path / TASK / p.set_name / "gt" and p.mask.stem == p.stem
        assert p.class_label == -1
    assert pairs[1].image.suffix == ".jpg" and pairs[1].mask.suffix == ".png"
    assert find_pairs(tmp_path, TASK, ["B"]) == pairs[3:]
    np.testing.assert_array_equal(load_mask(pairs[4].mask), _pattern(11))
    np.testing.assert_array_equal(load_image(pairs[4].image)[..., 0], _pattern(11))


def test_one_error_names_every_problem(tmp_path):
    for i in range(3):
        _write_example(tmp_path, "A", f"good{i}", i)
    _write_example(tmp_path, "A", "corrupt", 3)
    (tmp_path / TASK / "A" / "im" / "corrupt.png").write_bytes(b"\x89PNG not really a png")
    _write_example(tmp_path, "A", "hollow", 4)
    (tmp_path / TASK / "A" / "gt" / "hollow.png").write_bytes(b"")
    _write_example(tmp_path, "A", "lopsided", 5)
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / TASK / "A" / "gt" / "lopsided.png")
    _write_example(tmp_path, "A", "twice", 6, image_ext=".jpg")
    _write_example(tmp_path, "A", "twice", 6, image_ext=".png")
    _write_example(tmp_path, "A", "orphan_image", 7)
    (tmp_path / TASK / "A" / "gt" / "orphan_image.png").unlink()
    _write_example(tmp_path, "A", "orphan_mask", 8)
    (tmp_path / TASK / "A" / "im" / "orphan_mask.png").unlink()
    (tmp_path / TASK / "Empty" / "im").mkdir(parents=True)
    (tmp_path / TASK / "Empty" / "gt").mkdir()
    (tmp_path / TASK / "NoMasks" / "im").mkdir(parents=True)

    with pytest.raises(DatasetError) as info:
        find_pairs(tmp_path, TASK, "A+Missing+Empty+NoMasks", check=True)
    msg = str(info.value)
    expected = [
        "1 image without a mask", "orphan_image",
        "1 mask without an image", "orphan_mask",
        "twice (twice.jpg, twice.png)",
        f"unreadable image {tmp_path / TASK / 'A' / 'im' / 'corrupt.png'}",
        "1 empty file (0 bytes)", "gt/hollow.png",
        "lopsided", "96x64", "32x32",
        f"folder {tmp_path / TASK / 'Missing'} not found",
        "set 'Empty': no image/mask pairs",
        f"folder {tmp_path / TASK / 'NoMasks' / 'gt'} not found",
        "<set>/im/<stem>",  # the layout
    ]
    missing = [e for e in expected if e not in msg]
    assert not missing, (missing, msg)
    assert "good" not in msg
    assert len(info.value.problems) == 9

    # Without `check` the listing problems are still all there; decoding problems need the check.
    with pytest.raises(DatasetError) as info:
        find_pairs(tmp_path, TASK, "A")
    assert "orphan_image" in str(info.value) and "hollow" in str(info.value) and "corrupt" not in str(info.value)

    # check_files alone, on pairs that list fine.
    pairs = [Pair(tmp_path / TASK / "A" / "im" / f"{s}.png", tmp_path / TASK / "A" / "gt" / f"{s}.png", s, "A")
             for s in ("good0", "corrupt", "lopsided", "good1")]
    with pytest.raises(DatasetError) as info:
        check_files(pairs, workers=2)
    assert len(info.value.problems) == 2 and "corrupt.png" in str(info.value) and "lopsided" in str(info.value)
    check_files([pairs[0], pairs[3]])


def test_missing_task_folder_and_long_lists(tmp_path):
    (tmp_path / "COD").mkdir()
    with pytest.raises(DatasetError, match=rf"task folder {tmp_path / TASK} not found \({tmp_path} holds COD\)"):
        find_pairs(tmp_path, TASK, "DIS-TR")
    im = tmp_path / TASK / "S" / "im"
    im.mkdir(parents=True)
    (tmp_path / TASK / "S" / "gt").mkdir()
    for i in range(500):
        Image.fromarray(np.zeros((2, 2), np.uint8)).save(im / f"x{i:03d}.png")
    with pytest.raises(DatasetError) as info:
        find_pairs(tmp_path, TASK, "S+S+")
    msg = str(info.value)
    assert "500 images without a mask" in msg and "x019" in msg and "x020" not in msg and "(480 more)" in msg
    assert "set 'S' is listed 2 times" in msg and "an empty set name" in msg


def test_class_labels_from_names(tmp_path):
    _write_example(tmp_path, "C", "1#Grp#1#Bag#photo", 0)
    _write_example(tmp_path, "C", "2#Grp#4#Yacht#other", 1)
    pairs = find_pairs(tmp_path, TASK, "C", class_labels=True)
    assert [p.class_label for p in pairs] == [DIS5K_CLASSES.index("Bag"), DIS5K_CLASSES.index("Yacht")]
    assert len(DIS5K_CLASSES) == 219 and list(DIS5K_CLASSES) == sorted(DIS5K_CLASSES)
    assert find_pairs(tmp_path, TASK, "C", class_labels=True, classes=("Yacht", "Bag"))[0].class_label == 1

    _write_example(tmp_path, "D", "3#Grp#1#Unicorn#x", 2)
    _write_example(tmp_path, "D", "plain_name", 3)
    with pytest.raises(DatasetError) as info:
        find_pairs(tmp_path, TASK, "C+D", class_labels=True)
    msg = str(info.value)
    assert "2 files whose class" in msg and "3#Grp#1#Unicorn#x ('Unicorn')" in msg and "plain_name (no 4th" in msg
    assert "Bag" not in msg
    assert all(p.class_label == -1 for p in find_pairs(tmp_path, TASK, "C+D"))


# --------------------------------------------------------------------------- sizes


def test_dynamic_sizes_are_buckets_deterministic_and_spread():
    buckets = TrainingSizes.dynamic()
    sides = (256, 768, 1280, 1792, 2304)
    assert set(buckets.sizes) == {(h, w) for h in sides for w in sides}
    assert all(h % 32 == 0 and w % 32 == 0 for h, w in buckets.sizes)
    weights = dict(zip(buckets.sizes, buckets.weights, strict=True))
    # An end of the range catches about half the original's draws an inner value does.
    assert 0.4 < weights[(256, 768)] / weights[(768, 768)] < 0.6

    drawn = [buckets.size_for_step(7, s) for s in range(3000)]
    assert set(drawn) <= set(buckets.sizes)
    assert len(set(drawn)) == 25
    again = TrainingSizes.dynamic()  # a restart, another host
    assert drawn == [again.size_for_step(7, s) for s in range(3000)]
    assert drawn != [buckets.size_for_step(8, s) for s in range(3000)]
    freq = np.array([drawn.count(s) for s in buckets.sizes]) / len(drawn)
    assert np.abs(freq - np.array(buckets.weights)).max() < 0.02

    uniform = TrainingSizes.dynamic(weighting="uniform")
    assert np.allclose(uniform.weights, 1 / 25)
    assert len(TrainingSizes.dynamic(per_side=9)) == 81 and {h for h, _ in TrainingSizes.dynamic(per_side=9)} == set(
        range(256, 2305, 256)
    )
    fixed = TrainingSizes.fixed()
    assert fixed.is_fixed and {fixed.size_for_step(0, s) for s in range(50)} == {(1024, 1024)}
    assert TrainingSizes.fixed((1440, 2560)).sizes == ((1440, 2560),)
    with pytest.raises(ValueError, match="multiple of 32"):
        TrainingSizes.fixed((1000, 1024))
    with pytest.raises(ValueError, match="multiple of 32"):
        TrainingSizes.dynamic((250, 2304))


# --------------------------------------------------------------------------- pipeline


def _pipeline(data, **kw) -> TrainPipeline:
    opts = dict(global_batch_size=4, sizes=SMALL_SIZES, seed=3, process_index=0, process_count=1, augment=_flip,
                num_threads=2, with_indices=True)
    opts.update(kw)
    return TrainPipeline(data, **opts)


def _take(iterator, n):
    with iterator:
        return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_restart_seeds_and_epochs(ten):
    pairs = find_pairs(ten, TASK, "A+B")
    pipe = _pipeline(pairs)
    assert pipe.steps_per_epoch == 2 and pipe.local_batch_size == 4
    run = _take(pipe.iterator(), 7)
    restarted = _take(make_train_iterator(pairs, global_batch_size=4, sizes=SMALL_SIZES, seed=3, start_step=4,
                                          process_index=0, process_count=1, augment=_flip, num_threads=1,
                                          with_indices=True), 3)
    for a, b in zip(run[4:], restarted, strict=True):
        _assert_batches_equal(a, b)
    _assert_batches_equal(run[5], pipe.load_batch(5))

    order = [b["example_index"].tolist() for b in run]
    for epoch in range(3):  # drop_last: 8 distinct examples per epoch, the other 2 dropped
        seen = order[2 * epoch] + order[2 * epoch + 1]
        assert len(set(seen)) == 8
    assert order[0:2] != order[2:4]  # a new permutation every epoch
    assert {tuple(b["image"].shape[1:3]) for b in run} == {pipe.size_for_step(s) for s in range(7)}
    assert len({tuple(b["image"].shape[1:3]) for b in run}) > 1

    other = _take(_pipeline(pairs, seed=4).iterator(), 4)
    assert [b["example_index"].tolist() for b in other] != order[:4]


def test_processes_split_each_global_batch(ten):
    pairs = find_pairs(ten, TASK, "A+B")
    pipe = _pipeline(pairs)
    whole = _take(pipe.iterator(1), 4)
    parts = [_take(_pipeline(pairs, process_index=p, process_count=2).iterator(1), 4) for p in range(2)]
    for step, batch in enumerate(whole):
        np.testing.assert_array_equal(batch["example_index"], pipe.global_example_indices(step + 1))
        first, second = parts[0][step], parts[1][step]
        assert first["image"].shape[0] == second["image"].shape[0] == 2
        assert not set(first["example_index"].tolist()) & set(second["example_index"].tolist())
        for k in batch:  # including the augmentation: it depends on the position, not the process
            np.testing.assert_array_equal(np.concatenate([first[k], second[k]]), batch[k], err_msg=k)
    with pytest.raises(ValueError, match="not divisible"):
        _pipeline(pairs, global_batch_size=5, process_count=2)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        _pipeline(pairs, global_batch_size=12)


def test_batches_shapes_normalisation_and_alignment(tmp_path):
    for i in range(6):
        _write_example(tmp_path, "C", f"{i}#G#1#{DIS5K_CLASSES[i * 30]}#x", i)
    pairs = find_pairs(tmp_path, TASK, "C", class_labels=True)
    pipe = _pipeline(pairs, augment=None, global_batch_size=3, sizes=TrainingSizes.dynamic((32, 160), per_side=2))
    for step, batch in enumerate(_take(pipe.iterator(), 4)):
        h, w = pipe.size_for_step(step)
        assert batch["image"].dtype == np.float32 and batch["image"].shape == (3, h, w, 3)
        assert batch["mask"].dtype == np.float32 and batch["mask"].shape == (3, h, w, 1)
        assert batch["class_label"].dtype == np.int32 and batch["class_label"].shape == (3,)
        assert 0 <= batch["mask"].min() and batch["mask"].max() <= 1 and batch["mask"].max() > 0.5
        pixels = _denormalised(batch["image"])
        for k, index in enumerate(batch["example_index"]):
            assert batch["class_label"][k] == index * 30  # class i*30 was written into example i's name
            # Image and mask went through the same resize: channels 0 and 1 are the mask.
            np.testing.assert_allclose(pixels[k, ..., 0], batch["mask"][k, ..., 0] * 255, atol=2e-3)
            np.testing.assert_allclose(pixels[k, ..., 1], batch["mask"][k, ..., 0] * 255, atol=2e-3)
            # The constant channel stays the example's colour: normalised with ImageNet's mean/std.
            expected = (np.float32(_colour(index)) / np.float32(255) - np.float32(IMAGENET_MEAN[2])) / np.float32(
                IMAGENET_STD[2]
            )
            np.testing.assert_allclose(batch["image"][k, ..., 2], expected, rtol=0, atol=1e-6)
            # And the mask is the file's mask, resized with PIL's bilinear filter.
            want = np.asarray(Image.fromarray(_pattern(int(index))).resize((w, h), Image.Resampling.BILINEAR))
            np.testing.assert_array_equal(batch["mask"][k, ..., 0], want.astype(np.float32) / 255)


def test_fixed_size_resizes_before_augmenting(ten):
    """One fixed size: the augmentation sees the image at the training size (the original's order)."""
    pairs = find_pairs(ten, TASK, "A+B")
    seen = []

    def spy(image, mask, rng):
        seen.append(image.shape)
        return image, mask

    pipe = _pipeline(pairs, augment=spy, sizes=TrainingSizes.fixed((64, 32)))
    batch = pipe.load_batch(0)
    assert batch["image"].shape == (4, 64, 32, 3) and set(seen) == {(64, 32, 3)}
    seen.clear()
    _pipeline(pairs, augment=spy, sizes=TrainingSizes.fixed((64, 32)), resize_before_augment=False).load_batch(0)
    assert set(seen) == {(H, W, 3)}


def test_default_augmentation_is_deterministic(ten):
    pytest.importorskip("birefnet_jax.train.data.augment")
    pairs = find_pairs(ten, TASK, "A+B")
    pipe = _pipeline(pairs, augment=DEFAULT_AUGMENT)
    run = _take(pipe.iterator(), 3)
    _assert_batches_equal(run[2], _take(pipe.iterator(2), 1)[0])
    assert all(np.isfinite(b["image"]).all() for b in run)


@pytest.mark.slow
def test_worker_processes_give_the_same_batches(ten):
    pairs = find_pairs(ten, TASK, "A+B")
    threads = _take(_pipeline(pairs).iterator(1), 3)
    workers = _take(_pipeline(pairs, worker_count=2).iterator(1), 3)
    for a, b in zip(threads, workers, strict=True):
        _assert_batches_equal(a, b)


# --------------------------------------------------------------------------- TFDS


def test_importing_the_data_modules_imports_no_tensorflow():
    code = (
        "import sys\n"
        "import birefnet_jax.train.data.folders, birefnet_jax.train.data.sizes\n"
        "import birefnet_jax.train.data.pipeline, birefnet_jax.train.data.tfds_builder\n"
        "print('HEAVY', [m for m in ('tensorflow', 'tensorflow_datasets') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "HEAVY []" in out.stdout


def test_tfds_folder_builder_round_trip(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("array_record")
    from birefnet_jax.train.data.tfds_builder import TfdsSource, build, folder_builder

    data = tmp_path / "data"
    for i in range(4):
        _write_example(data, "A", f"a{i}", i, image_ext=(".png", ".jpg")[i % 2])
    for i in range(2):
        _write_example(data, "B", f"b{i}", 4 + i)
    # A 16-bit mask and a palette image: stored as what the folder loader decodes.
    Image.fromarray(_pattern(9).astype(np.uint16) * 257).save(data / TASK / "B" / "gt" / "b1.png")
    b0 = data / TASK / "B" / "im" / "b0.png"
    Image.fromarray(load_image(b0)).convert("P").save(b0)

    builder = build(folder_builder(data, TASK, "A+B", data_dir=tmp_path / "tfds"))
    assert {name: s.num_examples for name, s in builder.info.splits.items()} == {"A": 4, "B": 2}
    for split in ("A", "B"):
        pairs = find_pairs(data, TASK, split)
        source = TfdsSource(builder, split)
        assert len(source) == len(pairs)
        for i, pair in enumerate(pairs):  # the same order as the folder source
            ex = source.example(i)
            assert ex["stem"] == pair.stem and ex["class_label"] == -1
            tol = 0 if pair.image.suffix == ".png" else 1  # JPEG bytes are kept; decoders may differ by 1
            assert np.abs(ex["image"].astype(int) - load_image(pair.image)).max() <= tol
            np.testing.assert_array_equal(ex["mask"][..., 0], load_mask(pair.mask))
    np.testing.assert_array_equal(source.example(1)["mask"][..., 0], _pattern(9))

    # The pipeline reads a built split like the folders it came from.
    pairs = find_pairs(data, TASK, "A")
    from_tfds = _pipeline(TfdsSource(builder.data_dir, "A"), global_batch_size=2).load_batch(1)
    from_files = _pipeline(pairs, global_batch_size=2).load_batch(1)
    np.testing.assert_array_equal(from_tfds["example_index"], from_files["example_index"])
    np.testing.assert_allclose(from_tfds["image"], from_files["image"], atol=1.01 / 255 / min(IMAGENET_STD))
    np.testing.assert_array_equal(from_tfds["mask"], from_files["mask"])


def test_tfds_dis5k_builder_from_zip(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("array_record")
    from birefnet_jax.train.data.tfds_builder import DIS5K_SPLITS, TfdsSource, build, dis5k_builder

    extracted = tmp_path / "unzipped"
    for k, split in enumerate(DIS5K_SPLITS):
        cls = "Bag" if split == "DIS-TR" else "Unicorn"
        _write_example(extracted, split, f"{k}#Grp#1#{cls}#pic", k, size=(32, 32))
    manual = tmp_path / "manual"
    manual.mkdir()
    with zipfile.ZipFile(manual / "DIS5K.zip", "w") as z:
        for f in sorted(extracted.rglob("*.png")):
            z.write(f, f.relative_to(extracted))

    builder = build(dis5k_builder(data_dir=tmp_path / "tfds"), manual_dir=manual)
    assert set(builder.info.splits) == set(DIS5K_SPLITS)
    train = TfdsSource(builder, "DIS-TR").example(0)
    assert train["class_label"] == DIS5K_CLASSES.index("Bag") and train["class_name"] == "Bag"
    np.testing.assert_array_equal(train["mask"][..., 0], _pattern(0, (32, 32)))
    test = TfdsSource(builder, "DIS-TE4").example(0)
    assert test["class_label"] == -1 and test["class_name"] == "Unicorn"
