"""`birefnet-jax predict` / `birefnet_jax.inference.predict` on a small model and small images:
odd and broken files, sizes, buckets, padding, devices, resuming, cut-outs."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

import birefnet_jax
from birefnet_jax.cli import main
from birefnet_jax.inference import predict
from birefnet_jax.inference.buckets import SizePolicy
from birefnet_jax.inference.pipeline import PredictOptions, PredictSummary, run_images, write_outputs
from birefnet_jax.inference.plan import plan_predictions
from birefnet_jax.inference.predictor import Predictor
from birefnet_jax.inference.refine import refine_foreground_strips
from birefnet_jax.io.images import read_image
from birefnet_jax.io.masks import mask_to_uint8
from birefnet_jax.io.resize import resize_align_corners, resize_linear

RES = (64, 64)


@pytest.fixture(scope="module")
def model(converted):
    return birefnet_jax.load(converted("swin_nobn"), resolution=RES)


@pytest.fixture(scope="module")
def predictor(model):
    """Shared, so compiled programs are reused across tests (as across calls)."""
    return Predictor(model)


def rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def save(img: Image.Image, path, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def reference_mask(predictor, image: np.ndarray) -> np.ndarray:
    """The mask by hand: resize as the original's loader, predict, bring back, truncate."""
    x = np.zeros((predictor.padded_batch(1), *RES, 3), np.uint8)
    x[0] = resize_linear(image, RES)
    prob = np.asarray(predictor.run(x, probabilities=True))[0, ..., 0]
    return mask_to_uint8(resize_align_corners(prob, image.shape[:2]))


def odd_folder(root):
    """Every kind of file a real folder holds; returns (good name -> expected (h, w)), bad names."""
    good = {}
    save(Image.fromarray(rgb(50, 70)), root / "plain.jpg", quality=95)
    good["plain.jpg"] = (50, 70)
    save(Image.fromarray(rgb(40, 30)[..., 0]), root / "sub" / "gray.png")
    good["sub/gray.png"] = (40, 30)
    rgba = np.dstack([rgb(33, 45), np.full((33, 45), 128, np.uint8)])
    save(Image.fromarray(rgba, "RGBA"), root / "sub" / "deep" / "rgba.png")
    good["sub/deep/rgba.png"] = (33, 45)
    save(Image.fromarray(rgb(36, 36)).convert("P"), root / "palette.png")
    good["palette.png"] = (36, 36)
    save(Image.fromarray(rgb(20, 60)[..., 0].astype(np.uint16) * 257), root / "deep16.png")
    good["deep16.png"] = (20, 60)
    save(Image.fromarray(rgb(30, 40)).convert("CMYK"), root / "cmyk.jpg")
    good["cmyk.jpg"] = (30, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: the mask has the displayed (rotated) size
    save(Image.fromarray(rgb(24, 56)), root / "rotated.jpg", exif=exif)
    good["rotated.jpg"] = (56, 24)
    frames = [Image.fromarray(rgb(32, 48, s)) for s in range(3)]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:])
    good["anim.gif"] = (32, 48)
    (root / "empty.png").write_bytes(b"")
    buf = io.BytesIO()
    Image.fromarray(rgb(64, 64)).save(buf, format="JPEG")
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "notes.png").write_text("not an image")
    bad = {"empty.png": "empty", "truncated.jpg": "truncated", "notes.png": "not an image"}
    return good, bad


@pytest.mark.slow
def test_bad_inputs_never_stop_the_batch(tmp_path, predictor, capsys):
    good, bad = odd_folder(tmp_path / "in")
    s = predict(tmp_path / "in", predictor, tmp_path / "out", progress=False, outputs=("mask", "cutout"))
    assert s.done == len(good) and s.skipped == 0
    failed = {p.name: why for p, why in s.failed}
    assert set(failed) == set(bad)
    for name, word in bad.items():
        assert word in failed[name], failed[name]
    for name, (h, w) in good.items():
        stem = name.rsplit(".", 1)[0]
        mask = np.asarray(Image.open(tmp_path / "out" / f"{stem}.png"))
        assert mask.shape == (h, w) and mask.dtype == np.uint8, name
        cut = Image.open(tmp_path / "out" / f"{stem}_cutout.png")
        assert cut.mode == "RGBA" and cut.size == (w, h)
    assert not list((tmp_path / "out").rglob("*.tmp"))


@pytest.mark.slow
def test_a_huge_image_in_bounded_memory(tmp_path, predictor):
    """12000x9000 (above Pillow's decompression-bomb limit): predicted at the model's size, the mask
    brought back to full size; host memory stays a few full-size arrays (decoded RGB 324 MB, the
    float32 map 432 MB), with no full-size float temporaries."""
    import tracemalloc

    big = np.zeros((9000, 12000), bool)
    big[2000:7000, 3000:9000] = True
    save(Image.fromarray(big), tmp_path / "in" / "huge.png")
    tracemalloc.start()
    try:
        s = predict(tmp_path / "in", predictor, tmp_path / "out", progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert s.done == 1 and s.ok
    assert Image.open(tmp_path / "out" / "huge.png").size == (12000, 9000)
    assert peak < 1.2e9, f"peak host memory {peak / 1e9:.2f} GB"


def test_masks_match_the_manual_path_at_original_sizes(tmp_path, predictor):
    images = {"a.png": rgb(50, 70, 1), "b.png": rgb(90, 40, 2), "c.png": rgb(64, 64, 3)}
    for name, im in images.items():
        save(Image.fromarray(im), tmp_path / "in" / name)
    s = predict(tmp_path / "in", predictor, tmp_path / "out", progress=False, outputs=("mask", "prob"))
    assert s.done == 3 and s.ok
    for name, im in images.items():
        got = np.asarray(Image.open(tmp_path / "out" / name))
        np.testing.assert_array_equal(got, reference_mask(predictor, im))
        prob = np.load(tmp_path / "out" / name.replace(".png", ".npy"))
        assert prob.shape == im.shape[:2] and prob.dtype == np.float32
        np.testing.assert_array_equal(mask_to_uint8(prob), got)


@pytest.mark.slow
def test_mixed_sizes_compile_once_per_bucket_and_pad_the_last_batch(tmp_path, model):
    sizes = [(50, 70), (52, 68), (90, 40), (88, 44), (130, 130), (64, 64), (128, 120)]
    for i, (h, w) in enumerate(sizes):
        save(Image.fromarray(rgb(h, w, i)), tmp_path / "in" / f"{i}.png")
    pred = Predictor(model)
    s = predict(tmp_path / "in", pred, tmp_path / "out", resolution="auto", max_pixels=96 * 96, bucket_step=32,
                batch_size=2, progress=False)
    assert s.done == len(sizes)
    assert 1 < len(s.buckets) < len(sizes)  # similar sizes share a bucket
    assert s.compile_count == len(s.buckets) == pred.compile_count  # one program per bucket, last batches padded
    again = predict(tmp_path / "in", pred, tmp_path / "out2", resolution="auto", max_pixels=96 * 96,
                    bucket_step=32, batch_size=2, progress=False)
    assert again.compile_count == 0  # the programs are reused across calls
    for i, (h, w) in enumerate(sizes):
        assert Image.open(tmp_path / "out" / f"{i}.png").size == (w, h)


@pytest.mark.slow
def test_repeated_calls_on_a_checkpoint_path_reuse_the_programs(tmp_path, converted):
    ckpt = tmp_path / "ckpt"
    assert main(["convert", str(converted("swin_nobn")), str(ckpt), "--resolution", "64x64"]) == 0
    save(Image.fromarray(rgb(30, 40)), tmp_path / "in" / "a.png")
    first = predict(tmp_path / "in", ckpt, tmp_path / "o1", progress=False)
    second = predict(tmp_path / "in", ckpt, tmp_path / "o2", progress=False)
    assert first.compile_count == 1 and second.compile_count == 0


@pytest.mark.slow
def test_fixed_resolution_with_a_short_last_batch_compiles_once(tmp_path, model):
    for i in range(5):
        save(Image.fromarray(rgb(30 + i, 40, i)), tmp_path / "in" / f"{i}.png")
    pred = Predictor(model)
    s = predict(tmp_path / "in", pred, tmp_path / "out", batch_size=pred.padded_batch(2), progress=False)
    assert s.done == 5 and s.compile_count == 1


@pytest.mark.slow
@pytest.mark.skipif(jax.local_device_count() < 2, reason="needs several (forced) CPU devices")
def test_many_devices_give_the_same_masks_as_one(tmp_path, model):
    for i in range(5):
        save(Image.fromarray(rgb(40, 50, i)), tmp_path / "in" / f"{i}.png")
    one = predict(tmp_path / "in", Predictor(model, devices=jax.local_devices()[:1]), tmp_path / "one",
                  batch_size=2, progress=False)
    many = Predictor(model)
    assert many.num_devices == jax.local_device_count()
    all_ = predict(tmp_path / "in", many, tmp_path / "all", progress=False)
    assert one.done == all_.done == 5
    for i in range(5):
        a = np.asarray(Image.open(tmp_path / "one" / f"{i}.png")).astype(int)
        b = np.asarray(Image.open(tmp_path / "all" / f"{i}.png")).astype(int)
        assert np.array_equal(a, b)  # each image is computed whole on one device: same numbers


def test_an_interrupted_run_resumes_without_redoing_finished_images(tmp_path, predictor):
    for i in range(6):
        save(Image.fromarray(rgb(40, 40, i)), tmp_path / "in" / f"{i}.png")
    finished = []

    def stop_after_two(path):
        finished.append(path)
        if len(finished) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        predict(tmp_path / "in", predictor, tmp_path / "out", batch_size=1, progress=False, on_image=stop_after_two)
    written = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert len(written) >= 2
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temporary files
    mtimes = {p: (tmp_path / "out" / p).stat().st_mtime_ns for p in written}
    s = predict(tmp_path / "in", predictor, tmp_path / "out", progress=False)
    assert s.skipped == len(written) and s.done == 6 - len(written)
    assert all((tmp_path / "out" / p).stat().st_mtime_ns == t for p, t in mtimes.items())
    s = predict(tmp_path / "in", predictor, tmp_path / "out", progress=False, overwrite=True)
    assert s.done == 6 and s.skipped == 0


@pytest.mark.slow
def test_a_killed_process_resumes(tmp_path, converted):
    """SIGKILL midway (no cleanup runs at all): the rerun skips what was written, leaves it untouched,
    does the rest, and clears the temporary files the killed run left."""
    import signal
    import subprocess
    import sys
    import time

    for i in range(12):  # large enough that refining each cut-out takes a while
        save(Image.fromarray(rgb(600, 800, i)), tmp_path / "in" / f"{i:02d}.png")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "birefnet_jax", "predict", "-m", str(converted("swin_nobn")), "-o", str(out),
           str(tmp_path / "in"), "--resolution", "64x64", "--batch-size", "1", "--cutout", "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and len(list(out.glob("??.png"))) < 3:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    masks = sorted(out.glob("??.png"))
    assert 0 < len(masks) < 12, "the run should have been killed midway"
    (out / ".05_cutout.png.abc123.tmp").write_bytes(b"half a file")  # as a kill during a write leaves
    done = {p.name: p.stat().st_mtime_ns for p in masks}
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"skipped {len(done)}" in rerun.stdout and f"done {12 - len(done)}," in rerun.stdout
    assert all((out / n).stat().st_mtime_ns == t for n, t in done.items())
    assert len(list(out.glob("??.png"))) == 12 and len(list(out.glob("??_cutout.png"))) == 12
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_a_failed_write_fails_that_image_only(tmp_path, predictor, monkeypatch):
    from birefnet_jax.io import masks

    for i in range(3):
        save(Image.fromarray(rgb(40, 40, i)), tmp_path / "in" / f"{i}.png")
    real = masks.encode_png

    def flaky(array):
        if array.shape == (40, 40) and flaky.calls == 1:
            flaky.calls += 1
            raise OSError(28, "No space left on device")
        flaky.calls += 1
        return real(array)

    flaky.calls = 0
    monkeypatch.setattr(masks, "encode_png", flaky)
    s = predict(tmp_path / "in", predictor, tmp_path / "out", progress=False)
    assert s.done == 2 and len(s.failed) == 1 and "No space left" in s.failed[0][1]
    assert len(list((tmp_path / "out").glob("*.png"))) == 2
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


def test_cutout_colours_and_alpha(tmp_path, predictor):
    im = rgb(48, 40, 5)
    alpha = np.tile(np.linspace(0, 255, 40).astype(np.uint8), (48, 1))
    save(Image.fromarray(np.dstack([im, alpha]), "RGBA"), tmp_path / "in" / "a.png")
    save(Image.fromarray(im), tmp_path / "in" / "b.png")
    s = predict(tmp_path / "in", predictor, tmp_path / "out", progress=False, outputs=("mask", "cutout"),
                refine_radius=15)
    assert s.done == 2
    mask = reference_mask(predictor, im)  # the RGB channels alone decide the mask
    for name in ("a", "b"):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / f"{name}.png")), mask)
    cut_b = np.asarray(Image.open(tmp_path / "out" / "b_cutout.png"))
    np.testing.assert_array_equal(cut_b[..., 3], mask)
    np.testing.assert_array_equal(cut_b[..., :3], refine_foreground_strips(im, mask, 15))
    cut_a = np.asarray(Image.open(tmp_path / "out" / "a_cutout.png"))
    expected_alpha = (mask.astype(np.uint16) * alpha + 127) // 255  # transparent input stays transparent
    np.testing.assert_array_equal(cut_a[..., 3], expected_alpha)
    np.testing.assert_array_equal(cut_a[..., :3], cut_b[..., :3])  # the input's colours, alpha ignored


def test_outputs_inside_the_input_folder_are_not_read_back(tmp_path, predictor):
    save(Image.fromarray(rgb(40, 40, 1)), tmp_path / "in" / "x.png")
    first = predict(tmp_path / "in", predictor, tmp_path / "in" / "masks", progress=False)
    second = predict(tmp_path / "in", predictor, tmp_path / "in" / "masks", progress=False)
    assert first.done == 1 and second.skipped == 1 and second.done == 0 and not second.failed
    assert not (tmp_path / "in" / "masks" / "masks").exists()


def test_outputs_that_would_overwrite_each_other_are_refused_before_any_work(tmp_path):
    """Output names are the input's path without its extension, whatever its siblings; inputs whose
    outputs would meet (any kind, asked for this time or not) are refused with the list, before the
    model is loaded (the checkpoint here does not exist) and before anything is written."""
    from birefnet_jax.inference.inputs import InputError

    def refused(*names, outputs=("mask",)):
        folder = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        for name in names:
            save(Image.fromarray(rgb(8, 8)), folder / name)
        with pytest.raises(InputError, match="overwrite each other") as e:
            predict(folder, tmp_path / "missing.safetensors", tmp_path / "out", outputs=outputs, progress=False)
        return str(e.value)

    message = refused("x.jpg", "x.png")
    assert "x.jpg and " in message and "x.png would both write" in message and "rename" in message
    message = refused("photo.jpg", "photo_cutout.jpg")  # photo.jpg's cut-out is photo_cutout.jpg's mask
    assert "cutout of photo.jpg, mask of photo_cutout.jpg" in message
    message = refused("b.jpg", "b.png", "b.jpg.png", outputs=("mask", "cutout", "prob"))
    assert message.startswith("1 group(s)") and "b.jpg.png" not in message  # b.jpg.png writes b.jpg.png
    assert not (tmp_path / "out").exists()

    # A name never depends on the siblings: x.jpg's mask is x.png alone or beside y.jpg.
    save(Image.fromarray(rgb(8, 8)), tmp_path / "in" / "x.jpg")
    alone = plan_predictions(tmp_path / "in", tmp_path / "out").images[0][1].paths["mask"]
    save(Image.fromarray(rgb(8, 8)), tmp_path / "in" / "y.jpg")
    assert plan_predictions(tmp_path / "in", tmp_path / "out").images[0][1].paths["mask"] == alone
    assert alone == tmp_path / "out" / "x.png"


def test_an_output_folder_holding_the_inputs(tmp_path, predictor):
    """`-o` the input folder itself, or a folder above it: every input is predicted; only our own
    files (the names some input's outputs take) are no inputs, so a rerun skips them; an input that
    its own mask would replace is refused."""
    folder = tmp_path / "photos"
    save(Image.fromarray(rgb(40, 40, 1)), folder / "a.jpg")
    save(Image.fromarray(rgb(30, 50, 2)), folder / "sub" / "b.jpg")
    s = predict(folder, predictor, folder, progress=False)
    assert s.done == 2 and s.ok
    assert Image.open(folder / "a.png").size == (40, 40) and Image.open(folder / "sub" / "b.png").size == (50, 30)
    again = predict(folder, predictor, folder, progress=False, outputs=("mask", "cutout"))
    assert again.done == 2 and again.skipped == 0 and again.ok  # the cut-outs; the masks are no inputs
    assert predict(folder, predictor, folder, progress=False, outputs=("mask", "cutout")).skipped == 2
    save(Image.fromarray(rgb(40, 40, 1)), tmp_path / "more" / "photos" / "a.jpg")
    above = predict(tmp_path / "more" / "photos", predictor, tmp_path / "more", progress=False)  # inputs below -o
    assert above.done == 1 and (tmp_path / "more" / "a.png").exists()
    save(Image.fromarray(rgb(20, 20, 3)), folder / "c.png")
    with pytest.raises(ValueError, match=r"replaced by their own output: .*c\.png \(its mask\)"):
        predict(folder, predictor, folder, progress=False)


def test_unresolvable_inputs_fail_alone(tmp_path, predictor):
    """A symbolic link loop or a broken link, in a folder or named directly, is one failure with its
    reason; the other inputs are predicted."""
    import os

    folder = tmp_path / "in"
    save(Image.fromarray(rgb(40, 40)), folder / "ok.png")
    os.symlink("loop.jpg", folder / "loop.jpg")  # points at itself
    os.symlink("nowhere.png", folder / "broken.png")
    os.symlink("spin", tmp_path / "spin")  # a loop given by name
    s = predict([folder, tmp_path / "spin"], predictor, tmp_path / "out", progress=False)
    assert s.done == 1 and (tmp_path / "out" / "ok.png").exists()
    reasons = {p.name: why for p, why in s.failed}
    assert set(reasons) == {"loop.jpg", "broken.png", "spin"}
    assert "loop" in reasons["loop.jpg"] and "loop" in reasons["spin"] and "broken" in reasons["broken.png"]
    assert s.report().count("FAILED") == 3


def test_temporaries_of_any_earlier_run_are_removed(tmp_path):
    """Whatever the earlier run wrote (a cut-out, a .npy, a video) and whatever this one asks for,
    its temporaries are found and removed; files that are not ours are left alone. All done here,
    so no model is loaded (the checkpoint does not exist)."""
    save(Image.fromarray(rgb(8, 8)), tmp_path / "in" / "a.png")
    (tmp_path / "in" / "clip.mp4").write_bytes(b"never decoded: its outputs exist")
    out = tmp_path / "out"
    save(Image.fromarray(rgb(8, 8)[..., 0]), out / "a.png")
    for name in ("clip_mask.mkv", "clip_cutout.mkv"):
        (out / name).write_bytes(b"done")
    stale = [".a.npy.abc12345.tmp", ".a_cutout.png.x_y9z8w7.tmp", ".clip_mask.mkv.k2j3h4g5.tmp.mkv",
             ".clip_cutout.mkv.q1w2e3r4.tmp.mkv"]
    kept = [".b.png.abc12345.tmp", ".a.png.abc12345.tmp.mkv", ".notes.txt", "a.npy.abc12345.tmp"]
    for name in stale + kept:
        (out / name).write_bytes(b"half a file")
    s = predict(tmp_path / "in", tmp_path / "missing.safetensors", out, progress=False)
    assert s.skipped == 2 and s.done == 0 and s.ok
    assert sorted(p.name for p in out.iterdir()) == sorted(["a.png", "clip_mask.mkv", "clip_cutout.mkv", *kept])


def test_an_unwritable_output_folder_is_found_before_any_work(tmp_path, capsys):
    """Before the model is loaded (the checkpoint here does not exist): a library error that is both
    an OSError and a ValueError, exit status 2 from the command."""
    import os

    from birefnet_jax.inference.plan import OutputFolderError

    save(Image.fromarray(rgb(8, 8)), tmp_path / "in" / "a.png")
    (tmp_path / "file").write_text("in the way")
    targets = [tmp_path / "file" / "out"]
    if os.geteuid() != 0:
        (tmp_path / "locked").mkdir(mode=0o555)
        targets.append(tmp_path / "locked" / "out")
    elif os.path.isdir("/sys") and not os.access("/sys", os.W_OK):  # root writes anywhere but read-only mounts
        targets.append(Path("/sys/birefnet-jax-out"))
    for out in targets:
        with pytest.raises(OutputFolderError, match=f"cannot .*{out.name}") as e:
            predict(tmp_path / "in", tmp_path / "missing.safetensors", out, progress=False)
        assert isinstance(e.value, OSError) and isinstance(e.value, ValueError)
        assert main(["predict", "-m", str(tmp_path / "missing.safetensors"), "-o", str(out), str(tmp_path / "in"),
                     "-q"]) == 2
        assert "output folder" in capsys.readouterr().err
        assert not out.exists()


def test_crop_refine_predicts_the_box_again(tmp_path, predictor):
    """Locate, then crop: the box around the first prediction's object (plus margin) is cut from the
    full-resolution image, predicted again, and pasted back; the rest stays."""
    from birefnet_jax.inference.pipeline import _crop_and_repredict, _Prepared

    im = rgb(400, 300, 7)
    first = np.zeros((400, 300), np.float32)
    first[100:200, 50:110] = 0.9  # the object the first pass found
    p = _Prepared(0, None, None, None, RES, (400, 300), im, None)
    out = _crop_and_repredict(predictor, SizePolicy(fixed=RES), p, first, margin=0.1)
    y0, y1, x0, x1 = 100 - 11, 200 + 11, 50 - 7, 110 + 7  # widened by 10% (+1) of the box
    crop = reference_mask(predictor, np.ascontiguousarray(im[y0:y1, x0:x1]))
    np.testing.assert_array_equal(mask_to_uint8(out[y0:y1, x0:x1]), crop)
    outside = np.ones(first.shape, bool)
    outside[y0:y1, x0:x1] = False
    np.testing.assert_array_equal(out[outside], first[outside])
    # No object, or one that fills the image: the first prediction stands.
    np.testing.assert_array_equal(_crop_and_repredict(predictor, SizePolicy(fixed=RES), p, first * 0, 0.1), 0)
    save(Image.fromarray(im), tmp_path / "in" / "big.png")
    s = predict(tmp_path / "in", predictor, tmp_path / "crop", progress=False, crop_refine=True)
    assert s.done == 1 and Image.open(tmp_path / "crop" / "big.png").size == (300, 400)


@pytest.mark.slow
def test_command_line(tmp_path, converted, capsys):
    ckpt = tmp_path / "ckpt"
    assert main(["convert", str(converted("swin_nobn")), str(ckpt), "--resolution", "64x64"]) == 0
    save(Image.fromarray(rgb(40, 50)), tmp_path / "in" / "ok.png")
    (tmp_path / "in" / "broken.jpg").write_bytes(b"\xff\xd8\xff")
    listing = tmp_path / "list.txt"
    listing.write_text("in/ok.png\n# a comment\nin/broken.jpg\n")
    code = main(["predict", "-m", str(ckpt), "-o", str(tmp_path / "out"), str(listing), "-q", "--cutout"])
    out = capsys.readouterr()
    assert code == 1 and "FAILED" in out.err and "broken.jpg" in out.err and "done 1" in out.err
    assert (tmp_path / "out" / "ok.png").exists() and (tmp_path / "out" / "ok_cutout.png").exists()
    assert main(["predict", "-m", str(ckpt), "-o", str(tmp_path / "out"), str(tmp_path / "in" / "ok.png"),
                 "-q"]) == 0
    assert "skipped 1" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["predict", "-m", str(ckpt), "-o", str(tmp_path / "o"), str(tmp_path / "in"), "--resolution", "70x70"])
    assert main(["predict", "-m", str(ckpt), "-o", str(tmp_path / "o"), str(tmp_path / "in"), "--batch-size", "0"]) == 2
    assert "at least 1" in capsys.readouterr().err
    assert main(["predict", "-m", str(ckpt), "-o", str(tmp_path / "o"), str(tmp_path / "nothing*.png")]) == 2
    assert "matches no files" in capsys.readouterr().err


def test_read_image_sees_through_exif_for_the_mask_size(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 8
    p = save(Image.fromarray(rgb(10, 30)), tmp_path / "r.jpg", exif=exif)
    assert read_image(p).rgb.shape == (30, 10, 3)


@pytest.mark.slow
def test_compile_cache_persists_programs(tmp_path, converted):
    """The command keeps its programs in the user's cache folder by default ($BIREFNET_JAX_CACHE/xla):
    a second process finds them there (also when named with --compile-cache); --no-compile-cache
    writes none."""
    import os
    import subprocess
    import sys

    save(Image.fromarray(rgb(40, 50)), tmp_path / "in" / "a.png")
    cmd = [sys.executable, "-m", "birefnet_jax", "predict", "-m", str(converted("swin_nobn")), "-o",
           str(tmp_path / "out"), str(tmp_path / "in"), "--resolution", "64x64", "-q", "--overwrite"]
    env = {**os.environ, "BIREFNET_JAX_CACHE": str(tmp_path / "user-cache")}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    cache = tmp_path / "user-cache" / "xla"
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    entries = sorted(p.name for p in cache.rglob("*") if p.is_file())
    assert entries, "nothing was written to the compilation cache"
    assert f"compile cache: {cache}" in first.stdout and "loaded from the compile cache" not in first.stdout
    second = subprocess.run([*cmd, "--compile-cache", str(cache)], capture_output=True, text=True, timeout=600,
                            env={**env, "BIREFNET_JAX_CACHE": str(tmp_path / "elsewhere")})
    assert second.returncode == 0 and "done 1" in second.stdout, second.stderr[-2000:]
    assert "1 program(s) compiled" in second.stdout and "(1 loaded from the compile cache)" in second.stdout
    assert sorted(p.name for p in cache.rglob("*") if p.is_file()) == entries  # found, not compiled anew
    off = subprocess.run([*cmd, "--no-compile-cache"], capture_output=True, text=True, timeout=600,
                         env={**env, "BIREFNET_JAX_CACHE": str(tmp_path / "off")})
    assert off.returncode == 0 and "no compile cache" in off.stdout, off.stderr[-2000:]
    assert not (tmp_path / "off").exists() and not (tmp_path / "elsewhere").exists()


# --------------------------------------------------------------------------- the stages, one by one


def test_planning_alone_reads_and_changes_nothing(tmp_path):
    """The plan stage: inputs found, outputs planned, finished images skipped, videos set aside, our own
    outputs not taken as inputs; no model, and nothing written or deleted until asked."""
    save(Image.fromarray(rgb(20, 20)), tmp_path / "in" / "a.png")
    save(Image.fromarray(rgb(20, 20)), tmp_path / "in" / "sub" / "b.jpg")
    (tmp_path / "in" / "clip.mp4").write_bytes(b"not decoded while planning")
    out = tmp_path / "in" / "out"  # inside the inputs: what is written there is no input
    save(Image.fromarray(rgb(20, 20)[..., 0]), out / "a.png")  # a's mask: done
    (out / "sub").mkdir()
    stale = out / "sub" / ".b.png.abc123.tmp"  # as a run killed while writing b's mask leaves
    stale.write_bytes(b"half a file")

    plan = plan_predictions(tmp_path / "in", out)
    assert plan.kinds == ("mask",) and plan.skipped == 1
    assert [(item.rel.as_posix(), {k: p.relative_to(out).as_posix() for k, p in paths.paths.items()})
            for item, paths in plan.images] == [("sub/b.jpg", {"mask": "sub/b.png"})]
    assert [item.rel.as_posix() for item in plan.videos] == ["clip.mp4"]
    assert stale.exists()
    assert plan.remove_stale_temporaries() == 1 and not stale.exists()

    again = plan_predictions(tmp_path / "in", out, outputs=("mask", "cutout", "mask"))
    assert again.kinds == ("mask", "cutout") and again.skipped == 0  # a's cut-out is missing
    assert [item.rel.as_posix() for item, _ in again.images] == ["a.png", "sub/b.jpg"]
    assert len(plan_predictions(tmp_path / "in", out, overwrite=True).images) == 2
    with pytest.raises(FileExistsError, match="is a file"):
        plan_predictions(tmp_path / "in", tmp_path / "in" / "a.png")
    with pytest.raises(ValueError, match=r"replaced by their own output: .*a\.png"):
        plan_predictions(out, out)  # a.png (an image there) would be its own mask
    with pytest.raises(ValueError, match="no inputs"):
        plan_predictions([], out)


@pytest.mark.parametrize(("options", "named"), [
    (dict(batch_size=0), "batch_size"),
    (dict(outputs=("mask", "alpha")), "outputs"),
    (dict(outputs="mask"), "outputs"),
    (dict(outputs=()), "outputs"),
    (dict(resolution="70x70"), "resolution"),
    (dict(resolution=(64, 80)), "resolution"),
    (dict(resolution="auto", bucket_step=100), "bucket_step"),
    (dict(resolution="auto", max_pixels=1000), "max_pixels"),
    (dict(refine_radius=0), "refine_radius"),
    (dict(workers=-1), "workers"),
    (dict(max_image_pixels=0), "max_image_pixels"),
    (dict(crop_margin=-0.1), "crop_margin"),
])
def test_options_are_checked_when_built(options, named):
    with pytest.raises(ValueError, match=named):
        PredictOptions(**options)


def test_options_and_keywords(tmp_path):
    o = PredictOptions(outputs=["mask", "prob", "mask"], resolution="auto", bucket_step=32)
    assert o.outputs == ("mask", "prob")
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.batch_size = 2
    # Checked before anything is listed or loaded (the checkpoint does not exist).
    with pytest.raises(ValueError, match="batch_size"):
        predict(tmp_path / "in", tmp_path / "missing.safetensors", tmp_path / "out", batch_size=0)
    with pytest.raises(TypeError, match="not both"):
        predict(tmp_path / "in", tmp_path / "missing.safetensors", tmp_path / "out", options=o, batch_size=2)
    with pytest.raises(TypeError):
        predict(tmp_path / "in", tmp_path / "missing.safetensors", tmp_path / "out", batch=2)


def test_write_stage_alone(tmp_path):
    """`write_outputs`: the files of one image from its probabilities, no model involved."""
    save(Image.fromarray(rgb(1, 1)), tmp_path / "in" / "x.png")
    ((_, paths),) = plan_predictions(tmp_path / "in", tmp_path / "out", outputs=("mask", "prob", "cutout")).images
    prob = np.random.default_rng(1).random((30, 40), dtype=np.float32)
    im = rgb(30, 40, 4)
    write_outputs(paths, prob, im, None, refine_radius=15)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "x.png")), mask_to_uint8(prob))
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "x.npy"), prob)
    cut = np.asarray(Image.open(tmp_path / "out" / "x_cutout.png"))
    np.testing.assert_array_equal(cut[..., 3], mask_to_uint8(prob))
    np.testing.assert_array_equal(cut[..., :3], refine_foreground_strips(im, mask_to_uint8(prob), 15))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x.npy", "x.png", "x_cutout.png"]


def test_run_stage_alone(tmp_path, predictor):
    """`run_images`: probabilities at the bucket size for each readable image, failures recorded,
    nothing written."""
    images = {"a.png": rgb(50, 70, 1), "b.png": rgb(30, 20, 2)}
    for name, im in images.items():
        save(Image.fromarray(im), tmp_path / "in" / name)
    (tmp_path / "in" / "c.png").write_bytes(b"")
    plan = plan_predictions(tmp_path / "in", tmp_path / "out")
    summary = PredictSummary()
    batches = list(run_images(plan.images, predictor, SizePolicy(fixed=RES), summary,
                              batch=predictor.padded_batch(1), workers=2, window=4))
    got = {p.item.path.name: (p, prob) for batch in batches for p, prob in batch}
    assert sorted(got) == ["a.png", "b.png"] and [p.name for p, _ in summary.failed] == ["c.png"]
    assert summary.buckets == {RES: 2} and summary.done == 0
    for name, im in images.items():
        p, prob = got[name]
        assert prob.shape == RES and p.size == im.shape[:2] and p.rgb is None
        np.testing.assert_array_equal(mask_to_uint8(resize_align_corners(prob, p.size)), reference_mask(predictor, im))
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- compiling: cache, bar, summary


@pytest.fixture(autouse=True)
def _user_cache(monkeypatch, tmp_path_factory):
    """The command keeps compiled programs under $BIREFNET_JAX_CACHE by default: a temporary folder
    here, never the user's ~/.cache."""
    folder = tmp_path_factory.mktemp("user-cache")
    monkeypatch.setenv("BIREFNET_JAX_CACHE", str(folder))
    return folder


def _jax_cache_setting():
    return jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs


def test_the_command_uses_the_user_cache_folder_unless_told_otherwise(tmp_path, predictor, monkeypatch, capsys,
                                                                      _user_cache):
    """Default: $BIREFNET_JAX_CACHE/xla while the run compiles (JAX's setting back as it was after);
    --compile-cache DIR: DIR; --no-compile-cache: none, and nothing made."""
    from birefnet_jax.inference import pipeline

    default = Path(jax.config.jax_compilation_cache_dir or _user_cache / "xla")  # JAX's own setting wins
    seen = []
    monkeypatch.setattr(pipeline, "_resolve_predictor", lambda *a: seen.append(_jax_cache_setting()) or predictor)
    save(Image.fromarray(rgb(30, 40)), tmp_path / "in" / "a.png")
    before = _jax_cache_setting()
    argv = ["predict", "-m", "unused", "-o", str(tmp_path / "out"), str(tmp_path / "in"), "-q", "--overwrite"]
    assert main(argv) == 0
    assert seen[-1] == (str(default), 0.0)  # every program cached, however quick
    assert f"compile cache: {default}" in capsys.readouterr().out
    assert _jax_cache_setting() == before
    assert main([*argv, "--compile-cache", str(tmp_path / "mine")]) == 0
    assert seen[-1][0] == str(tmp_path / "mine") and (tmp_path / "mine").is_dir()
    assert f"compile cache: {tmp_path / 'mine'}" in capsys.readouterr().out
    monkeypatch.setenv("BIREFNET_JAX_CACHE", str(tmp_path / "not-made"))
    assert main([*argv, "--no-compile-cache"]) == 0
    assert seen[-1][0] is None and "no compile cache" in capsys.readouterr().out
    assert not (tmp_path / "not-made").exists() and _jax_cache_setting() == before
    with pytest.raises(SystemExit):
        main([*argv, "--no-compile-cache", "--compile-cache", str(tmp_path / "mine")])
    assert "not allowed with" in capsys.readouterr().err
    # The library leaves JAX's cache alone unless asked.
    predict(tmp_path / "in", predictor, tmp_path / "lib", progress=False)
    assert seen[-1] == before


def test_programs_compiled_in_the_call_land_in_the_cache_folder(tmp_path):
    """What the compile cache does with JAX: a program compiled in the block is written to the
    folder, however quickly it compiled, and found there the next time; afterwards JAX's setting is
    as it was."""
    from birefnet_jax.inference.pipeline import persistent_compile_cache

    before = _jax_cache_setting()
    with persistent_compile_cache(tmp_path / "c") as folder:
        assert folder == tmp_path / "c"
        jax.jit(lambda x: x * 3 + 1)(np.arange(5.0)).block_until_ready()
    assert _jax_cache_setting() == before
    assert [p for p in folder.iterdir() if p.name.endswith("-cache")]
    with persistent_compile_cache(False) as off:
        assert off is None and jax.config.jax_compilation_cache_dir is None
    assert _jax_cache_setting() == before
    for bad in ("", 3, 1.0):
        with pytest.raises(ValueError, match="compile_cache must be a folder, True"):
            PredictOptions(compile_cache=bad)


def test_an_unusable_compile_cache_warns_once_and_the_run_goes_on(tmp_path, predictor, monkeypatch, capsys):
    """A folder that cannot be made (below a file: even root cannot) warns once, and the run
    predicts without a cache; so does the command."""
    import warnings

    from birefnet_jax.inference import pipeline

    save(Image.fromarray(rgb(30, 40)), tmp_path / "in" / "a.png")
    (tmp_path / "a-file").write_text("")
    bad = tmp_path / "a-file" / "xla"
    with pytest.warns(pipeline.CompileCacheWarning, match="cannot be used.*going on without it"):
        s = predict(tmp_path / "in", predictor, tmp_path / "o1", progress=False, compile_cache=bad)
    assert s.done == 1 and s.ok and s.compile_cache is None and "no compile cache" in s.report()
    with warnings.catch_warnings():
        warnings.simplefilter("error", pipeline.CompileCacheWarning)  # once per folder
        assert predict(tmp_path / "in", predictor, tmp_path / "o2", progress=False, compile_cache=bad).done == 1
    monkeypatch.setattr(pipeline, "_resolve_predictor", lambda *a: predictor)
    monkeypatch.setenv("BIREFNET_JAX_CACHE", str(tmp_path / "a-file" / "cache"))
    with pytest.warns(pipeline.CompileCacheWarning, match="a-file/cache/xla cannot be used"):
        assert main(["predict", "-m", "unused", "-o", str(tmp_path / "o3"), str(tmp_path / "in"), "-q"]) == 0
    assert (tmp_path / "o3" / "a.png").exists() and "done 1" in capsys.readouterr().out


def test_the_summary_tells_warm_throughput_from_compile_time(tmp_path, predictor):
    s = PredictSummary(done=22, videos=2, frames=240, wall_seconds=75.0, image_seconds=10.0, video_seconds=40.0,
                       compile_count=2, compile_seconds=21.5, cache_loads=1, compile_cache=Path("/c/xla"))
    assert (s.images, s.warm_images_per_second, s.frames_per_second) == (20, 2.0, 6.0)
    lines = s.report().splitlines()
    assert lines[0] == "done 22, skipped 0 (outputs exist), failed 0; 75.0 s in all"
    assert lines[1] == "images: 20 in 10.0 s, 2.00 images/s (compiling excluded)"
    assert lines[2] == "videos: 2, 240 frames in 40.0 s, 6.00 frames/s (compiling excluded)"
    assert lines[3] == "2 program(s) compiled in 21.5 s (1 loaded from the compile cache); compile cache: /c/xla"
    assert "videos" not in PredictSummary(done=3, image_seconds=1.0).report()
    # A run: the images' time, compiling excluded, lies within the whole call's.
    for i in range(3):
        save(Image.fromarray(rgb(30, 40, i)), tmp_path / "in" / f"{i}.png")
    s = predict(tmp_path / "in", predictor, tmp_path / "out", progress=False)
    assert s.done == 3 and s.videos == 0 and s.frames == 0
    assert 0 < s.image_seconds <= s.wall_seconds - s.compile_seconds
    assert f"images: 3 in {s.image_seconds:.1f} s" in s.report()


def test_the_bar_names_the_program_compiling_and_keeps_its_time_out(capsys, caplog):
    """On the bar while it compiles; then the compile's time is taken out of the bar's clock, so the
    rate and the estimate come from the warm batches. Without a bar: a line on stderr, or with
    progress off a log record."""
    import logging
    import time

    from birefnet_jax.inference.pipeline import _CompileWatch, _progress

    bar = _progress(4, True)
    watch = _CompileWatch(bar, True)
    start = bar.start_t
    watch("1024x768 batch 2 float32", None)
    assert "compiling 1024x768 batch 2 float32 (first use of this size)" in str(bar)
    time.sleep(0.5)  # compiling
    watch("1024x768 batch 2 float32", 0.5)
    assert bar.start_t == pytest.approx(start + 0.5) and "compiling" not in str(bar)
    time.sleep(0.2)  # the first batch
    bar.update(2)
    assert bar.format_dict["elapsed"] < 0.5  # the 0.7 s since the start, less the compile
    bar.close()
    capsys.readouterr()
    _CompileWatch(None, True)("64x64 batch 1 float32", None)
    assert "compiling 64x64 batch 1 float32" in capsys.readouterr().err
    with caplog.at_level(logging.INFO, logger="birefnet_jax.inference.pipeline"):
        quiet = _CompileWatch(_progress(4, False), False)
        quiet("64x64 batch 1 float32", None)
        quiet("64x64 batch 1 float32", 2.5)
    assert not capsys.readouterr().err
    assert [r.getMessage() for r in caplog.records] == ["compiling 64x64 batch 1 float32 (first use of this size) ...",
                                                        "compiled 64x64 batch 1 float32 in 2.5 s"]


# --------------------------------------------------------------------------- many processes (--distributed)


def test_processes_share_the_plan_once_whatever_is_done_and_the_order(tmp_path):
    """`process_index` / `process_count` (predict --distributed), in one process: the shares are
    disjoint and together the whole plan (videos, images and unusable paths dealt out), each the
    same when some outputs exist already (a resumed run) and when the inputs are given in another
    order; every process refuses a plan whose outputs would meet; a process clears only its own
    share's temporaries; no model is needed to check any of it (the checkpoint does not exist)."""
    import os

    from birefnet_jax.inference.plan import process_share

    folder = tmp_path / "in"
    for i in range(5):
        save(Image.fromarray(rgb(8, 8, i)), folder / "a" / f"a{i}.png")
        save(Image.fromarray(rgb(8, 8, i)), folder / "b" / f"b{i}.jpg")
    for name in ("clip1.mp4", "clip2.mp4"):
        (folder / name).write_bytes(b"never decoded while planning")
    os.symlink("nowhere.png", folder / "broken.png")
    specs = [folder / "a", folder / "b", folder / "clip1.mp4", folder / "clip2.mp4", folder / "broken.png"]
    out = tmp_path / "out"

    def shares(specs, count=2):
        """Per process: (images, videos, failed) by relative name, and the plan."""
        plans = [plan_predictions(specs, out, process_index=i, process_count=count) for i in range(count)]
        return [({it.rel.as_posix() for it, _ in p.images}, {v.rel.as_posix() for v in p.videos},
                 {f.name for f, _ in p.failed}) for p in plans], plans

    whole = plan_predictions(specs, out)
    assert (whole.process_index, whole.process_count) == (0, 1)
    every = ({it.rel.as_posix() for it, _ in whole.images}, {v.rel.as_posix() for v in whole.videos},
             {f.name for f, _ in whole.failed})
    assert [len(s) for s in every] == [10, 2, 1]
    before, plans = shares(specs)
    for kind in range(3):
        assert not before[0][kind] & before[1][kind] and before[0][kind] | before[1][kind] == every[kind]
    assert [len(s[0]) for s in before] == [5, 5] and [len(s[1]) for s in before] == [1, 1]  # dealt evenly
    assert [p.process_index for p in plans] == [0, 1] and {p.process_count for p in plans} == {2}
    assert shares(specs[::-1])[0] == before  # the order the inputs are given in does not matter

    # A resumed run: the masks of a third of the images exist; each process skips those of its share
    # and keeps the rest of it, however many the others finished.
    finished = sorted(every[0])[::3]
    for rel in finished:
        save(Image.fromarray(rgb(8, 8)[..., 0]), out / f"{rel.rsplit('.', 1)[0]}.png")
    after, plans = shares(specs)
    for i in range(2):
        assert after[i][0] == before[i][0] - set(finished)
        assert plans[i].skipped == len(before[i][0] & set(finished))
        assert after[i][1:] == before[i][1:]
    # All done: predict itself (no model loaded) skips each share's inputs, and nothing else.
    for rel in every[0]:
        save(Image.fromarray(rgb(8, 8)[..., 0]), out / f"{rel.rsplit('.', 1)[0]}.png")
    for name in ("clip1_mask.mkv", "clip2_mask.mkv"):
        (out / name).write_bytes(b"done")
    done = [predict(specs, tmp_path / "missing.safetensors", out, progress=False, outputs=("mask",),
                    process_index=i, process_count=3) for i in range(3)]
    assert sum(s.skipped for s in done) == 12 and all(s.done == 0 for s in done)
    assert [p.name for s in done for p, _ in s.failed] == ["broken.png"]

    # Temporaries: each process clears those of its own share only (another may be writing its own).
    temps = {rel: out / f".{rel.rsplit('.', 1)[0]}.png.abc12345.tmp" for rel in every[0]}
    for path in temps.values():
        path.write_bytes(b"half a file")
    plans[0].remove_stale_temporaries()
    assert {rel for rel, path in temps.items() if not path.exists()} == before[0][0]
    plans[1].remove_stale_temporaries()
    assert not any(path.exists() for path in temps.values())

    # More processes than inputs: some shares are empty, none fails; the split is checked.
    few = [plan_predictions(folder / "a", tmp_path / "few", process_index=i, process_count=7) for i in range(7)]
    assert sorted(len(p.images) for p in few) == [0, 0, 1, 1, 1, 1, 1]
    items = [it for it, _ in whole.images]
    assert sorted(it.rel for i in range(3) for it in process_share(items, i, 3)) == sorted(it.rel for it in items)
    for index, count in ((2, 2), (-1, 2), (0, 0), (True, 2)):
        with pytest.raises(ValueError, match="process_"):
            plan_predictions(specs, out, process_index=index, process_count=count)
    with pytest.raises(ValueError, match="process_index"):
        PredictOptions(process_index=2, process_count=2)
    with pytest.raises(ValueError, match="process_count"):
        PredictOptions(process_count=0)

    # Outputs that would meet are refused by every process, whichever share holds them.
    save(Image.fromarray(rgb(8, 8)), folder / "a" / "a0.jpg")  # a0.png's outputs, again
    for i in range(2):
        with pytest.raises(ValueError, match="overwrite each other"):
            plan_predictions(specs, tmp_path / "clash", process_index=i, process_count=2)


def test_distributed_flags_are_checked_before_any_work(tmp_path, capsys):
    """--num-processes / --process-id go with --distributed (or --coordinator-address, as train.py's);
    refused with exit status 2 before anything is read or loaded."""
    save(Image.fromarray(rgb(8, 8)), tmp_path / "in" / "a.png")
    base = ["predict", "-m", str(tmp_path / "missing.safetensors"), "-o", str(tmp_path / "out"), str(tmp_path / "in")]
    for flags, message in ((["--num-processes", "2"], "go with --distributed"),
                           (["--process-id", "0"], "go with --distributed"),
                           (["--distributed", "--num-processes", "0"], "at least 1"),
                           (["--distributed", "--num-processes", "2", "--process-id", "2"], "--process-id must be")):
        assert main([*base, *flags]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_two_processes_predict_every_image_once_and_resume(tmp_path, converted):
    """`predict --distributed` in two processes on localhost (jax.distributed, CPU devices): every
    mask written once, by the process whose share it is, equal to one process's; a rerun after two
    masks are deleted redoes those two only (both in process 0's share: process 1, done at once,
    waits for it), each process's summary and process 0's total saying so."""
    import os
    import re
    import socket
    import subprocess
    import sys

    n = 7
    for i in range(n):
        save(Image.fromarray(rgb(30 + 3 * i, 40, i)), tmp_path / "in" / f"{i}.png")
    cmd = [sys.executable, "-m", "birefnet_jax", "predict", "-m", str(converted("swin_nobn")), str(tmp_path / "in"),
           "--resolution", "64x64", "-q"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla")}  # compiled once, by the first run

    def run_two(out):
        with socket.socket() as s:
            s.bind(("localhost", 0))
            port = s.getsockname()[1]
        procs = [subprocess.Popen([*cmd, "-o", str(out), "--distributed", "--coordinator-address", f"localhost:{port}",
                                   "--num-processes", "2", "--process-id", str(i)], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for i in range(2)]
        try:
            outs = [p.communicate(timeout=600) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        assert [p.returncode for p in procs] == [0, 0], "\n".join(o + e[-3000:] for o, e in outs)
        counts = []
        for i, (stdout, _) in enumerate(outs):
            done, skipped = re.search(rf"^\[process {i}/2\] done (\d+), skipped (\d+) \(outputs exist\), failed 0;",
                                      stdout, re.M).groups()
            counts.append((int(done), int(skipped)))
        return counts, outs[0][0]

    single = subprocess.run([*cmd, "-o", str(tmp_path / "single")], env=env, capture_output=True, text=True,
                            timeout=600)
    assert single.returncode == 0 and f"done {n}," in single.stdout, single.stderr[-3000:]
    out = tmp_path / "out"
    counts, stdout0 = run_two(out)
    share0 = {it.path.name for it, _ in plan_predictions(tmp_path / "in", tmp_path / "none", process_index=0,
                                                         process_count=2).images}
    assert counts == [(len(share0), 0), (n - len(share0), 0)] and 0 < len(share0) < n
    assert f"[total over 2 processes] done {n}, skipped 0 (outputs exist), failed 0" in stdout0
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{i}.png" for i in range(n))  # no temporaries
    for i in range(n):
        np.testing.assert_array_equal(np.asarray(Image.open(out / f"{i}.png")),
                                      np.asarray(Image.open(tmp_path / "single" / f"{i}.png")))

    redo = sorted(share0)[:2]
    for name in redo:
        (out / name).unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    counts, stdout0 = run_two(out)
    assert counts == [(2, len(share0) - 2), (0, n - len(share0))]
    assert f"[total over 2 processes] done 2, skipped {n - 2} (outputs exist), failed 0" in stdout0
    assert all((out / name).stat().st_mtime_ns == t for name, t in kept.items())
    for name in redo:
        np.testing.assert_array_equal(np.asarray(Image.open(out / name)),
                                      np.asarray(Image.open(tmp_path / "single" / name)))
