"""birefnet_jax.inference.video: mask and cut-out videos through `predict`, frame for frame what the
same frames get as images; bad videos reported, partial outputs never left, reruns skipped. With PyAV:
exact sizes, timestamps and audio kept, alpha in the cut-out; without it, OpenCV as the fallback."""

from __future__ import annotations

import struct
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from birefnet_jax.inference import predict, video
from birefnet_jax.inference.buckets import SizePolicy
from birefnet_jax.inference.pipeline import PredictSummary
from birefnet_jax.inference.refine import refine_foreground_strips
from birefnet_jax.io.masks import mask_to_uint8
from birefnet_jax.io.resize import resize_align_corners, resize_linear

try:
    import cv2
except ImportError:
    cv2 = None
try:
    import av
except ImportError:
    av = None

needs_cv2 = pytest.mark.skipif(cv2 is None, reason="OpenCV is not installed")
needs_av = pytest.mark.skipif(av is None, reason="PyAV is not installed")

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


@pytest.fixture
def opencv_only(monkeypatch):
    """As where PyAV is not installed: videos go through OpenCV."""
    monkeypatch.setattr(video, "_import_av", lambda: None)


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


@needs_cv2
@pytest.mark.slow
def test_mask_and_cutout_videos(tmp_path, predictor, clip, opencv_only):
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


@needs_cv2
@pytest.mark.slow
def test_cutout_composited_without_alpha(tmp_path, predictor, clip, monkeypatch, opencv_only):
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


@needs_cv2
@pytest.mark.slow
def test_failure_midway_leaves_nothing_and_the_rest_continues(tmp_path, predictor, clip, opencv_only):
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
    monkeypatch.setitem(sys.modules, "av", None)  # and import av
    summary = PredictSummary()
    video.predict_videos([item], None, SizePolicy(fixed=RESOLUTION), tmp_path, summary, kinds=("mask",), batch=1,
                         overwrite=False, progress=False)
    assert summary.failed == [(item.path, summary.failed[0][1])] and "birefnet-jax[video]" in summary.failed[0][1]
    assert list(tmp_path.iterdir()) == []


def test_output_names():
    plans = video.plan_video_outputs([Path("a.mp4"), Path("a.avi"), Path("d/b.mov")], Path("o"), ("mask", "prob"))
    assert plans == [{"mask": Path("o/a.mp4_mask.mkv")}, {"mask": Path("o/a.avi_mask.mkv")},
                     {"mask": Path("o/d/b_mask.mkv")}]


# --------------------------------------------------------------------------- PyAV

AV_SIZE = (17, 33)  # (height, width): odd both ways
AV_FRAMES = 10
AV_RATE = Fraction(30000, 1001)  # NTSC: not a whole number, not 25
AV_BATCH = 4  # 10 frames: batches of 4, 4 and a short 2
AV_RESOLUTION = (32, 32)
SAMPLE_RATE = 48000


class _GreenPredictor:
    """Stands in for the model (no compilation): the probability is the input's green channel."""

    def __init__(self, fail_on: int | None = None):
        self.calls, self.fail_on = 0, fail_on

    @staticmethod
    def probabilities(images: np.ndarray) -> np.ndarray:
        return images[..., 1:2].astype(np.float32) / 255

    def run(self, images, probabilities=True):
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("device lost")
        return self.probabilities(np.asarray(images))


def _av_clip(path: Path, *, audio: str | None = "aac", frames: int = AV_FRAMES) -> Path:
    """A test clip written with PyAV: MPEG-4 Part 2 video (odd sizes allowed) of a square moving over a
    gradient, at AV_RATE, with a 440 Hz sine as `audio` (FFmpeg's native encoders, in every build)."""
    h, w = AV_SIZE
    with av.open(str(path), "w") as out:
        vs = out.add_stream("mpeg4", rate=AV_RATE)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        vs.options = {"qscale": "2"}
        astream = out.add_stream(audio, rate=SAMPLE_RATE, layout="mono") if audio else None
        yy, xx = np.mgrid[:h, :w]
        for i in range(frames):
            rgb = np.stack([xx * 7, yy * 13, np.full_like(xx, 90)], axis=-1).astype(np.uint8)
            rgb[4:12, 2 + 2 * i : 12 + 2 * i] = (30, 220, 240)
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = i, 1 / AV_RATE
            out.mux(vs.encode(frame))
        out.mux(vs.encode(None))
        if astream is not None:
            n = int(SAMPLE_RATE * frames / AV_RATE)
            sine = 0.3 * np.sin(2 * np.pi * 440 * np.arange(n) / SAMPLE_RATE)
            for start in range(0, n, 1024):
                chunk = (sine[start : start + 1024] * 32767).astype(np.int16)[None]
                frame = av.AudioFrame.from_ndarray(chunk, format="s16", layout="mono")
                frame.sample_rate, frame.pts, frame.time_base = SAMPLE_RATE, start, Fraction(1, SAMPLE_RATE)
                out.mux(astream.encode(frame))
            out.mux(astream.encode(None))
    return path


def _av_video(path: Path) -> tuple[np.ndarray, list[float], object]:
    """Every frame (the decoder's own format: grey, BGRA, or RGB), their times, and the video rate."""
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        frames = list(c.decode(stream))
        rate = stream.average_rate
    fmt = frames[0].format.name
    arrays = [f.to_ndarray() if fmt in ("gray", "bgra") else f.to_ndarray(format="rgb24") for f in frames]
    return np.stack(arrays), [float(f.time) for f in frames], rate


def _av_audio(path: Path) -> tuple[list[str], list[bytes], list[float], np.ndarray]:
    """The audio streams' codecs, the first one's packets and their times, and its decoded samples."""
    with av.open(str(path)) as c:
        codecs = [s.codec_context.name for s in c.streams.audio]
        if not codecs:
            return codecs, [], [], np.zeros(0)
        packets = [p for p in c.demux(c.streams.audio[0]) if p.size]
        data, times = [bytes(p) for p in packets], [float(p.pts * p.time_base) for p in packets]
    with av.open(str(path)) as c:
        samples = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
    return codecs, data, times, samples


def _expected(frames_rgb: np.ndarray, radius: int = 90) -> tuple[np.ndarray, np.ndarray]:
    """What the pipeline makes of decoded frames with `_GreenPredictor`: masks and BGRA cut-outs."""
    size = frames_rgb.shape[1:3]
    masks, cutouts = [], []
    for rgb in frames_rgb:
        prob = _GreenPredictor.probabilities(resize_linear(rgb, AV_RESOLUTION)[None])[0, ..., 0]
        mask = mask_to_uint8(resize_align_corners(prob, size))
        fg = refine_foreground_strips(rgb, mask, radius)
        masks.append(mask)
        cutouts.append(np.concatenate([fg[..., ::-1], mask[..., None]], axis=-1))
    return np.stack(masks), np.stack(cutouts)


def _predict_av(items, out: Path, predictor=None, kinds=("mask", "cutout"), backend=None) -> PredictSummary:
    summary = PredictSummary()
    video.predict_videos([video.InputItem(p, Path(p.name)) for p in items], predictor or _GreenPredictor(),
                         SizePolicy(fixed=AV_RESOLUTION), out, summary, kinds=kinds, batch=AV_BATCH, overwrite=False,
                         progress=False, backend=backend)
    return summary


@needs_av
def test_pyav_keeps_size_timestamps_and_audio(tmp_path):
    src = _av_clip(tmp_path / "clip.mp4")
    frames, times, rate = _av_video(src)
    assert frames.shape == (AV_FRAMES, *AV_SIZE, 3) and rate == AV_RATE
    codecs, packets, packet_times, _ = _av_audio(src)
    assert codecs == ["aac"]
    masks, cutouts = _expected(frames)

    assert video.video_backend() == "pyav"
    summary = _predict_av([src], tmp_path / "out")
    assert (summary.done, summary.frames, summary.failed) == (1, AV_FRAMES, [])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["clip_cutout.mkv", "clip_mask.mkv"]

    for kind in ("mask", "cutout"):
        path = tmp_path / "out" / f"clip_{kind}.mkv"
        got, got_times, got_rate = _av_video(path)
        # Exact size (no evened odd sizes), every frame, the rate, each frame's time (Matroska: to the ms).
        assert got.shape[:3] == (AV_FRAMES, *AV_SIZE), kind
        assert got_rate == AV_RATE, kind
        np.testing.assert_allclose(got_times, times, atol=0.0005 + 1e-9, rtol=0, err_msg=kind)
        # The audio stream, its packets copied as they were (remuxed, not re-encoded), at their times.
        got_codecs, got_packets, got_packet_times, _ = _av_audio(path)
        assert got_codecs == ["aac"] and got_packets == packets, kind
        np.testing.assert_allclose(got_packet_times, packet_times, atol=0.0005 + 1e-9, rtol=0, err_msg=kind)
        if kind == "mask":
            np.testing.assert_array_equal(got, masks)  # lossless grey
        else:
            assert got.shape[-1] == 4  # BGRA: alpha kept, exactly the mask; colours the refined foreground
            np.testing.assert_array_equal(got[..., 3], masks)
            np.testing.assert_array_equal(got, cutouts)
    assert _leftovers(tmp_path / "out") == []


@needs_av
def test_pyav_reencodes_audio_matroska_cannot_carry(tmp_path):
    """mu-law PCM (in QuickTime) has no Matroska codec id: decoded and written as lossless FLAC."""
    src = _av_clip(tmp_path / "clip.mov", audio="pcm_mulaw")
    codecs, _, _, samples = _av_audio(src)
    assert codecs == ["pcm_mulaw"]
    summary = _predict_av([src], tmp_path / "out", kinds=("mask",))
    assert (summary.done, summary.frames, summary.failed) == (1, AV_FRAMES, [])
    got_codecs, _, _, got_samples = _av_audio(tmp_path / "out" / "clip_mask.mkv")
    assert got_codecs == ["flac"]
    np.testing.assert_array_equal(got_samples, samples)  # every decoded sample, losslessly


@needs_av
def test_pyav_silent_and_rotated_video(tmp_path):
    """No audio: none written. A display matrix (a phone held upright): frames turned as players show
    them, and as OpenCV's reader turns them."""
    src = _av_clip(tmp_path / "clip.mp4", audio=None)
    data = bytearray(src.read_bytes())
    at = data.find(b"tkhd")  # version 0: the matrix after the type, six 4-byte fields and 16 bytes
    assert at > 0 and data[at + 4] == 0
    matrix = at + 4 + 4 * 6 + 16
    assert struct.unpack(">9i", data[matrix : matrix + 36]) == (1 << 16, 0, 0, 0, 1 << 16, 0, 0, 0, 1 << 30)
    data[matrix : matrix + 36] = struct.pack(">9i", 0, 1 << 16, 0, -(1 << 16), 0, 0, 0, 0, 1 << 30)  # 90 degrees
    rotated = tmp_path / "rotated.mp4"
    rotated.write_bytes(bytes(data))
    frames, _, _ = _av_video(src)
    upright = np.rot90(frames, -1, axes=(1, 2))  # clockwise
    if cv2 is not None:
        cap = cv2.VideoCapture(str(rotated), cv2.CAP_FFMPEG)
        ok, first = cap.read()
        cap.release()
        assert ok and first.shape[:2] == upright.shape[1:3]

    summary = _predict_av([src, rotated], tmp_path / "out", kinds=("mask",))
    assert (summary.done, summary.failed) == (2, [])
    assert _av_audio(tmp_path / "out" / "clip_mask.mkv")[0] == []
    got, _, _ = _av_video(tmp_path / "out" / "rotated_mask.mkv")
    np.testing.assert_array_equal(got, _expected(np.ascontiguousarray(upright))[0])


@needs_av
def test_pyav_failure_midway_leaves_nothing(tmp_path):
    src = _av_clip(tmp_path / "clip.mp4")
    short = _av_clip(tmp_path / "short.mp4", frames=3)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(np.random.default_rng(0).bytes(4000))
    out = tmp_path / "out"
    summary = _predict_av([src, bad, short], out, predictor=_GreenPredictor(fail_on=2))
    assert [p for p, _ in summary.failed] == [src, bad], summary.failed
    assert "prediction failed" in summary.failed[0][1] and "device lost" in summary.failed[0][1]
    assert "cannot open the video" in summary.failed[1][1]
    assert (summary.done, summary.frames) == (1, 3)
    assert sorted(p.name for p in out.iterdir()) == ["short_cutout.mkv", "short_mask.mkv"]
    assert len(_av_video(out / "short_mask.mkv")[0]) == 3
    assert _leftovers(out) == []


@needs_av
@needs_cv2
def test_opencv_fallback_without_pyav(tmp_path, monkeypatch):
    """PyAV missing: OpenCV reads and writes, as before it (even sizes, no audio)."""
    src = _av_clip(tmp_path / "clip.mp4")
    monkeypatch.setitem(sys.modules, "av", None)  # import av now raises ImportError
    assert video.video_backend() == "opencv"
    with pytest.raises(ImportError, match="pyav"):
        video.video_backend("pyav")
    summary = _predict_av([src], tmp_path / "out")
    assert (summary.done, summary.frames, summary.failed) == (1, AV_FRAMES, [])
    got, fps = _read(tmp_path / "out" / "clip_mask.mkv")
    assert got.shape == (AV_FRAMES, AV_SIZE[0] - 1, AV_SIZE[1] - 1, 3)  # OpenCV's writer evens odd sizes
    assert fps == pytest.approx(float(AV_RATE), abs=0.01)
    monkeypatch.undo()
    assert _av_audio(tmp_path / "out" / "clip_mask.mkv")[0] == []


def test_video_backend_choice(monkeypatch):
    with pytest.raises(ValueError, match="pyav, opencv"):
        video.video_backend("gstreamer")
    monkeypatch.setattr(video, "_import_av", lambda: None)
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(ImportError, match=r"neither.*birefnet-jax\[video\]"):
        video.video_backend()
    with pytest.raises(ImportError, match=r"opencv-python-headless.*birefnet-jax\[video\]"):
        video.video_backend("opencv")


class _GreenPipelinePredictor(_GreenPredictor):
    """`_GreenPredictor` with what `predict` asks of a predictor (nothing compiles)."""

    resolution, num_devices, compile_seconds, compile_count = AV_RESOLUTION, 1, 0.0, 0

    class config:  # noqa: N801 (as a checkpoint's config reads)
        dynamic_size = None

    @staticmethod
    def padded_batch(batch: int) -> int:
        return batch


@needs_av
def test_a_video_run_reports_frames(tmp_path, monkeypatch):
    """Through `predict`: the summary counts the video's frames, and its throughput in frames per
    second, apart from images."""
    from birefnet_jax.inference import pipeline

    (tmp_path / "in").mkdir()
    _av_clip(tmp_path / "in" / "clip.mp4")
    monkeypatch.setattr(pipeline, "_resolve_predictor", lambda *a: _GreenPipelinePredictor())
    summary = predict(tmp_path / "in", "unused", tmp_path / "out", resolution=AV_RESOLUTION, batch_size=AV_BATCH,
                      progress=False)
    assert (summary.done, summary.videos, summary.images, summary.frames) == (1, 1, 0, AV_FRAMES)
    assert summary.ok and 0 < summary.video_seconds <= summary.wall_seconds and summary.image_seconds == 0
    assert summary.frames_per_second == pytest.approx(AV_FRAMES / summary.video_seconds)
    report = summary.report()
    assert f"videos: 1, {AV_FRAMES} frames in {summary.video_seconds:.1f} s" in report and "frames/s" in report
    assert "images:" not in report
