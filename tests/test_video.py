"""birefnet_jax.inference.video: mask and cut-out videos through `predict`, frame for frame what the
same frames get as images; bad videos reported, partial outputs never left, reruns skipped."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

from birefnet_jax.inference import predict, video  # noqa: E402
from birefnet_jax.inference.buckets import SizePolicy  # noqa: E402
from birefnet_jax.inference.pipeline import PredictSummary  # noqa: E402

FRAMES, WIDTH, HEIGHT, FPS = 12, 96, 64, 7.5
BATCH = 5  # 12 frames: the last batch is short (and with 8 devices, 8 + a short 4)
RESOLUTION = (64, 64)


@pytest.fixture(scope="module")
def predictor():
    from reference_models import recipe_state_dict

    from birefnet_jax.inference.predictor import Predictor
    from birefnet_jax.loading import model_from_state_dict

    return Predictor(model_from_state_dict(recipe_state_dict("swin_nobn")))


def _write_video(path: Path, frames: int = FRAMES) -> Path:
    """A square moving over a gradient, in the codec OpenCV writes everywhere (mp4v)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (WIDTH, HEIGHT))
    assert writer.isOpened()
    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    for i in range(frames):
        frame = np.stack([xx * 2, yy * 3, np.full_like(xx, 60)], axis=-1).astype(np.uint8)
        frame[20:44, 5 + 6 * i : 29 + 6 * i] = (30, 200, 240)
        writer.write(frame)
    writer.release()
    return path


def _read(path: Path, *, raw: bool = False) -> tuple[np.ndarray, float]:
    """All frames (BGR, or with `raw` the decoder's own channels, e.g. BGRA) and the frame rate."""
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG, [cv2.CAP_PROP_CONVERT_RGB, 0] if raw else [])
    assert cap.isOpened(), path
    fps, frames = cap.get(cv2.CAP_PROP_FPS), []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    return np.stack(frames), fps


def _composite(rgba: np.ndarray, background) -> np.ndarray:
    a = rgba[..., 3:].astype(int)
    return (rgba[..., :3] * a + np.array(background) * (255 - a) + 127) // 255


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".") or ".tmp" in p.name]


@pytest.fixture(scope="module")
def clip(tmp_path_factory, predictor):
    """The test video, and what `predict` makes of its frames saved as PNG images: (path, masks,
    cut-outs RGBA)."""
    root = tmp_path_factory.mktemp("clip")
    (root / "in").mkdir()
    (root / "frames").mkdir()
    src = _write_video(root / "in" / "clip.mp4")
    frames, _ = _read(src)  # decoded as the pipeline decodes them
    assert len(frames) == FRAMES
    for i, frame in enumerate(frames):
        cv2.imwrite(str(root / "frames" / f"{i:02d}.png"), frame)
    summary = predict(root / "frames", predictor, root / "ref", resolution=RESOLUTION, outputs=("mask", "cutout"),
                      batch_size=BATCH, progress=False)
    assert summary.done == FRAMES and summary.ok
    masks = np.stack([cv2.imread(str(root / "ref" / f"{i:02d}.png"), cv2.IMREAD_UNCHANGED) for i in range(FRAMES)])
    cutouts = np.stack([cv2.imread(str(root / "ref" / f"{i:02d}_cutout.png"), cv2.IMREAD_UNCHANGED)[..., [2, 1, 0, 3]]
                        for i in range(FRAMES)])
    return src, masks, cutouts


@pytest.mark.slow
def test_mask_and_cutout_videos(tmp_path, predictor, clip):
    src, masks, cutouts = clip
    bad = tmp_path / "in" / "x.mp4"
    bad.parent.mkdir()
    bad.write_bytes(np.random.default_rng(0).bytes(4000))
    out = tmp_path / "out"
    kw = dict(resolution=RESOLUTION, outputs=("mask", "cutout"), batch_size=BATCH, progress=False)
    compiled = predictor.compile_count

    summary = predict([src, bad], predictor, out, **kw)
    assert (summary.done, summary.skipped, summary.frames) == (1, 0, FRAMES)
    assert [p for p, _ in summary.failed] == [bad] and "cannot open the video" in summary.failed[0][1]
    assert predictor.compile_count == compiled  # the images' program: frames are batched alike
    assert sorted(p.name for p in out.iterdir()) == ["clip_cutout.mkv", "clip_mask.mkv"]

    got, fps = _read(out / "clip_mask.mkv")
    assert got.shape == (FRAMES, HEIGHT, WIDTH, 3) and fps == FPS
    assert (got == got[..., :1]).all()
    # Exact: a lossless codec, and each frame at the batch position its image had (0-4, 5-9, 10-11).
    np.testing.assert_array_equal(got[..., 0], masks)

    got, fps = _read(out / "clip_cutout.mkv", raw=True)
    assert len(got) == FRAMES and got.shape[1:3] == (HEIGHT, WIDTH) and fps == FPS
    if video._alpha_property(cv2) is not None:  # OpenCV 4.14+: BGRA, alpha the mask
        assert got.shape[-1] == 4
        np.testing.assert_array_equal(got[..., [2, 1, 0, 3]], cutouts)
    else:  # an older OpenCV: composited over the default green
        np.testing.assert_array_equal(got[..., [2, 1, 0]], _composite(cutouts, (0, 255, 0)))
    assert _leftovers(out) == []

    stamp = (out / "clip_mask.mkv").stat().st_mtime_ns
    again = predict([src, bad], predictor, out, **kw)
    assert (again.done, again.skipped, again.frames, len(again.failed)) == (0, 1, 0, 1)
    assert (out / "clip_mask.mkv").stat().st_mtime_ns == stamp

    redo = predict([src], predictor, out, overwrite=True, **kw)
    assert (redo.done, redo.skipped, redo.frames) == (1, 0, FRAMES) and redo.ok
    assert _leftovers(out) == []


@pytest.mark.slow
def test_cutout_composited_without_alpha(tmp_path, predictor, clip, monkeypatch):
    """An OpenCV that cannot write alpha: the refined foreground over the background colour."""
    src, _, cutouts = clip
    monkeypatch.setattr(video, "_alpha_property", lambda cv2: None)
    summary = PredictSummary()
    video.predict_videos([video.InputItem(src, Path("sub/clip.mp4"))], predictor, SizePolicy(fixed=RESOLUTION),
                         tmp_path, summary, kinds=("cutout",), batch=predictor.padded_batch(BATCH), overwrite=False,
                         progress=False, background=(255, 0, 128))
    assert (summary.done, summary.frames) == (1, FRAMES) and summary.ok
    got, fps = _read(tmp_path / "sub" / "clip_cutout.mkv")
    assert got.shape == (FRAMES, HEIGHT, WIDTH, 3) and fps == FPS
    np.testing.assert_array_equal(got[..., ::-1], _composite(cutouts, (255, 0, 128)))
    assert _leftovers(tmp_path) == []


class _FailingOnce:
    """A predictor whose second run fails, as a device error would midway through a video."""

    def __init__(self, predictor):
        self.predictor, self.calls = predictor, 0

    def run(self, images, **kw):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("device lost")
        return self.predictor.run(images, **kw)


@pytest.mark.slow
def test_failure_midway_leaves_nothing_and_the_rest_continues(tmp_path, predictor, clip):
    src = clip[0]
    short = _write_video(tmp_path / "short.mp4", frames=3)
    summary = PredictSummary()
    items = [video.InputItem(src, Path("clip.mp4")), video.InputItem(short, Path("short.mp4"))]
    out = tmp_path / "out"
    video.predict_videos(items, _FailingOnce(predictor), SizePolicy(fixed=RESOLUTION), out, summary,
                         kinds=("mask", "cutout", "prob"), batch=predictor.padded_batch(BATCH), overwrite=False,
                         progress=False)
    assert [p for p, _ in summary.failed] == [src], summary.failed
    assert "prediction failed" in summary.failed[0][1] and "device lost" in summary.failed[0][1]
    assert (summary.done, summary.frames) == (1, 3)
    assert sorted(p.name for p in out.iterdir()) == ["short_cutout.mkv", "short_mask.mkv"]  # no .npy for videos
    assert len(_read(out / "short_mask.mkv")[0]) == 3


def test_without_opencv_or_video_outputs(tmp_path, monkeypatch):
    item = video.InputItem(tmp_path / "a.mp4", Path("a.mp4"))
    summary = PredictSummary()
    video.predict_videos([item], None, SizePolicy(fixed=RESOLUTION), tmp_path, summary, kinds=("prob",), batch=1,
                         overwrite=False, progress=False)
    assert summary.failed[0][0] == item.path and "'prob' is not" in summary.failed[0][1]

    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 now raises ImportError
    summary = PredictSummary()
    video.predict_videos([item], None, SizePolicy(fixed=RESOLUTION), tmp_path, summary, kinds=("mask",), batch=1,
                         overwrite=False, progress=False)
    assert summary.failed == [(item.path, summary.failed[0][1])] and "birefnet-jax[video]" in summary.failed[0][1]
    assert list(tmp_path.iterdir()) == []


def test_output_names():
    plans = video.plan_video_outputs([Path("a.mp4"), Path("a.avi"), Path("d/b.mov")], Path("o"), ("mask", "prob"))
    assert plans == [{"mask": Path("o/a.mp4_mask.mkv")}, {"mask": Path("o/a.avi_mask.mkv")},
                     {"mask": Path("o/d/b_mask.mkv")}]
