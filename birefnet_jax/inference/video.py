"""Video inputs for `predict`: what the original's video tutorial does by hand (decode every frame,
predict, write a mask video and a cut-out video), as a streaming pipeline.

Per video: a thread decodes frames into a bounded queue, their resizes to the policy's bucket running
in worker threads (memory stays a few batches of frames, whatever the video's length); the main thread
runs them `batch` at a time through the same compiled program as images (the last, short batch is
padded, so nothing recompiles), keeping one batch on the device while the previous one is finished;
workers resize the probabilities back to the frame size and refine cut-out colours; each output video
is encoded, in order, in a thread of its own.

Two backends, both FFmpeg underneath (the `video` extra brings both):

* PyAV (``av``), used where it is installed. Each output keeps what the input gave: the exact frame
  size (odd sizes too), every frame's timestamp (``pts`` in the input's ``time_base``; Matroska
  stores them in milliseconds, so timestamps finer than that are rounded to the nearest ms), hence
  the frame rate, variable rates included, and every audio stream. Audio is remuxed, its packets
  copied without re-encoding, when Matroska can carry the codec (AAC, MP3, Opus, Vorbis, FLAC, AC-3,
  E-AC-3, DTS, ALAC, TrueHD, MP2, 16/24/32-bit PCM, ...); a codec it cannot (AMR, A-law/mu-law, ADPCM,
  WMA, ...) is decoded and written as FLAC (lossless from the decoded samples, 16- or 32-bit). Negative
  timestamps (an AAC encoder's priming samples) are kept, not shifted onto the video. Frames with a
  rotation in their display matrix (phone video) are turned upright first, as OpenCV does.
* OpenCV (``cv2``), the fallback where PyAV is missing. It drops the audio, drops the last column /
  row of an odd-sized frame (its FFmpeg writer does so for every codec), writes a constant frame rate
  (an unknown rate becomes 25 fps), and takes an alpha channel only from OpenCV 4.14
  (``VIDEOWRITER_PROP_ENABLE_ALPHA``); with an older OpenCV the cut-out is composited over
  `background` instead (BGR, same codec and name).

Outputs:

* ``<rel without extension>_mask.mkv``: the 8-bit masks as grey FFV1 (lossless, intra-only) in
  Matroska: every frame is exactly the mask an image of that frame gets, in a few KB. A lossy codec (the
  tutorial's 'mp4v') would leave block artefacts along the edges that matter most in a matte.
* ``<rel without extension>_cutout.mkv``: the foreground, colours refined by blur fusion as image
  cut-outs are, with the mask as alpha. With PyAV: FFV1 in BGRA (lossless in RGB and alpha alike,
  no chroma subsampling, so colours and alpha decode to exactly the image cut-out's values; FFV1 is an
  open standard, RFC 9043, and Matroska is the one container FFmpeg writes it to and other tools read
  it from; each frame is cut in slices encoded in parallel, with a CRC per slice). With OpenCV: BGRA
  HuffYUV (faster to encode than FFV1 with OpenCV's writer, which gives the encoder no threads).
* "prob" is not written for videos: the mask video is lossless, so it already holds the 8-bit masks,
  and float probabilities for every frame would be far larger than the video. A video asked only for
  "prob" is reported as failed with that reason.

FFV1 and HuffYUV in Matroska play in FFmpeg, VLC and mpv and are read by PyAV and OpenCV; for a player
or an editor that does not read them, convert: ``ffmpeg -i x_mask.mkv -c:v libx264 -pix_fmt yuv420p
x_mask.mp4`` (lossy), or ``ffmpeg -i x_cutout.mkv -c:v prores_ks -profile:v 4444 -pix_fmt yuva444p10le
x_cutout.mov`` (keeps alpha). Lossless video is large: a 1080p cut-out takes a few MB a frame.

Every output is written to a hidden temporary file beside it (keeping the extension, from which
OpenCV's writer picks the container) and renamed into place once complete and checked (OpenCV: its
length read back, as its writer drops frames without a word; PyAV raises on any failure, and the file is
reopened to check its streams), so an interrupted or failed video leaves nothing, and a rerun skips the
videos whose outputs all exist.
"""

from __future__ import annotations

import contextlib
import io
import os
import queue
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from birefnet_jax._optional import MissingDependency
from birefnet_jax.inference.buckets import SizePolicy
from birefnet_jax.inference.inputs import InputItem
from birefnet_jax.inference.outputs import mirror_paths
from birefnet_jax.inference.refine import refine_foreground_strips
from birefnet_jax.io.files import umask
from birefnet_jax.io.masks import mask_to_uint8
from birefnet_jax.io.resize import resize_align_corners, resize_linear

VIDEO_KINDS: tuple[str, ...] = ("mask", "cutout")
VIDEO_BACKENDS: tuple[str, ...] = ("pyav", "opencv")
_SUFFIX = {"mask": "_mask.mkv", "cutout": "_cutout.mkv"}
# OpenCV: lossless codecs its FFmpeg writer has everywhere. FFV1 squeezes a flat grey mask to very
# little; for camera-like BGRA HuffYUV encodes several times faster than FFV1 (OpenCV gives the encoder
# no threads), for somewhat larger files.
_FOURCC = {"mask": "FFV1", "cutout": "HFYU"}
# PyAV: FFV1 for both, grey and BGRA (see the module doc).
_AV_PIX_FMT = {"mask": "gray", "cutout": "bgra"}
DEFAULT_FPS = 25.0  # OpenCV, for streams that do not say their rate
_END = object()  # the decoder's last word


class VideoError(ValueError):
    """A video that produced nothing; the message says why, in user terms."""


def _import_cv2():
    """OpenCV, or MissingDependency naming the extra that brings it."""
    try:
        import cv2  # optional (the `video` extra): imported only when a video is predicted
    except ImportError as e:
        raise MissingDependency("video inputs need opencv-python-headless, which is not installed: "
                                "pip install 'birefnet-jax[video]'") from e
    return cv2


def _import_av():
    """PyAV, or None where it is not installed."""
    try:
        import av  # optional (the `video` extra): imported only when a video is predicted
    except ImportError:
        return None
    return av


def video_backend(backend: str | None = None) -> str:
    """The backend videos are read and written with: `backend` ("pyav" or "opencv"), else PyAV where
    it is installed, else OpenCV; raises MissingDependency when the one needed is missing."""
    if backend not in (None, *VIDEO_BACKENDS):
        raise ValueError(f"video backend must be one of {', '.join(VIDEO_BACKENDS)}; got {backend!r}")
    if backend in (None, "pyav") and _import_av() is not None:
        return "pyav"
    if backend == "pyav":
        raise MissingDependency("the 'pyav' video backend needs av (PyAV), which is not installed: "
                                "pip install 'birefnet-jax[video]'")
    try:
        _import_cv2()
    except MissingDependency as e:
        if backend == "opencv":
            raise
        raise MissingDependency("video inputs need PyAV (or OpenCV), neither of which is installed: "
                                "pip install 'birefnet-jax[video]'") from e
    return "opencv"


def plan_video_outputs(rels: Sequence[Path], root: Path, kinds: Sequence[str]) -> list[dict[str, Path]]:
    """`<root>/<rel without extension>_mask.mkv` etc., mirroring the inputs as images do."""
    return mirror_paths(rels, root, {k: _SUFFIX[k] for k in kinds if k in VIDEO_KINDS})


def predict_videos(videos: list[InputItem], predictor, policy: SizePolicy, output: Path, summary, *,
                   kinds: Sequence[str], batch: int, overwrite: bool, progress: bool, refine_radius: int = 90,
                   background: tuple[int, int, int] = (0, 255, 0), backend: str | None = None) -> None:
    """Mask and cut-out videos for `videos` (see the module doc), accounted in `summary` (a
    `PredictSummary`): done and frames per finished video, skipped when all its outputs exist (unless
    `overwrite`), failed with the reason otherwise; a failed video never stops the others.

    batch: frames per program run; the short last batch is padded to it. background: RGB under
      the cut-out when OpenCV is the backend and cannot write alpha. backend: "pyav", "opencv", or
      None for PyAV where it is installed, else OpenCV.
    """
    wanted = [k for k in kinds if k in VIDEO_KINDS]
    if not wanted:
        for item in videos:
            summary.failed.append((item.path, "only mask and cutout outputs are written for videos "
                                              "('prob' is not; the lossless mask video holds the 8-bit masks)"))
        return
    try:
        io_backend = _AVBackend(_import_av()) if video_backend(backend) == "pyav" else _CVBackend(_import_cv2())
    except ImportError as e:
        for item in videos:
            summary.failed.append((item.path, str(e)))
        return
    todo = []
    for item, plan in zip(videos, plan_video_outputs([v.rel for v in videos], Path(output), wanted), strict=True):
        if not overwrite and all(p.exists() for p in plan.values()):
            summary.skipped += 1
        else:
            todo.append((item, plan))
    if not todo:
        return
    bar = tqdm(total=0, unit="frame", desc="video", disable=not progress, file=sys.stderr, dynamic_ncols=True,
               smoothing=0.1)
    pool = ThreadPoolExecutor(min(8, (os.cpu_count() or 2) + 2), thread_name_prefix="birefnet-video")
    job = _Job(io_backend, predictor, policy, batch, refine_radius, tuple(int(c) for c in background), pool, bar)
    try:
        for item, plan in todo:
            try:
                frames = job.run(item.path, plan)
            except Exception as e:  # this video's failure, not the run's
                summary.failed.append((item.path, str(e) if isinstance(e, VideoError) else f"{type(e).__name__}: {e}"))
                continue
            summary.done += 1
            summary.frames += frames
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()


class _Job:
    """The settings shared by every video of one call."""

    def __init__(self, io_backend, predictor, policy: SizePolicy, batch: int, radius: int,
                 background: tuple[int, int, int], pool: ThreadPoolExecutor, bar):
        self.io, self.predictor, self.policy, self.batch = io_backend, predictor, policy, batch
        self.radius, self.background, self.pool, self.bar = radius, background, pool, bar

    def run(self, path: Path, plan: dict[str, Path]) -> int:
        """Predict one video and write its outputs; returns its frame count. Leaves no file behind
        when it raises."""
        reader = self.io.open(path)
        expected = reader.expected  # from the header: an estimate, for the progress bar
        self.bar.total += expected
        self.bar.refresh()
        writers: dict[str, _Writer] = {}
        shown = self.bar.n
        decoder = None
        try:
            decoder = _Decoder(reader, self.policy, self.pool, 2 * self.batch, keep_full="cutout" in plan)
            first = decoder.get()
            if first is _END:
                raise VideoError("no frames could be decoded")
            h, w = decoder.size
            for kind, dest in plan.items():
                writers[kind] = self.io.writer(dest, kind, reader, (h, w), self.background)
            frames = self._predict(decoder, first, writers, (h, w))
            for writer in writers.values():
                writer.close(frames, decoder.trailer)  # raises if the file is not what was written
            for kind in ("cutout", "mask"):  # the mask last, as for images
                if kind in writers:
                    writers[kind].commit()
        finally:
            if decoder is not None:
                decoder.stop()
            reader.close()
            for writer in writers.values():
                writer.discard()
            self.bar.total += (self.bar.n - shown) - expected  # the estimate, replaced by what was done
            self.bar.refresh()
        return frames

    def _predict(self, decoder: _Decoder, first, writers: dict[str, _Writer], size: tuple[int, int]) -> int:
        """Batches through the device, one batch in flight, finished frames written in order."""
        window = 2 * self.batch
        inflight: deque[tuple[list, object]] = deque()
        finishing: deque[tuple[Future, object]] = deque()
        frames = 0

        def write_oldest() -> None:
            nonlocal frames
            done, info = finishing.popleft()
            for kind, frame in done.result().items():
                writers[kind].write(frame, info)
            frames += 1
            self.bar.update(1)

        def collect_oldest() -> None:
            group, probs = inflight.popleft()
            try:
                host = np.asarray(probs)[..., 0]
            except Exception as e:
                raise VideoError(f"prediction failed after frame {frames}: {type(e).__name__}: {e}") from e
            for (full, _, info), prob in zip(group, host, strict=False):
                finishing.append((self.pool.submit(self._finish, full, prob, size, writers), info))
            while len(finishing) > window or (finishing and finishing[0][0].done()):
                write_oldest()

        def dispatch(group: list) -> None:
            stacked = np.stack([small.result() for _, small, _ in group])
            if len(group) < self.batch:  # the last, short batch is padded, not recompiled
                pad = np.zeros((self.batch - len(group), *stacked.shape[1:]), np.uint8)
                stacked = np.concatenate([stacked, pad])
            try:
                probs = self.predictor.run(stacked, probabilities=True)
            except Exception as e:
                raise VideoError(f"prediction failed after frame {frames}: {type(e).__name__}: {e}") from e
            inflight.append((group, probs))
            if len(inflight) > 1:  # keep one batch on the device while the previous one is finished
                collect_oldest()

        group = [first]
        while True:
            nxt = decoder.get()
            if nxt is _END:
                break
            if len(group) == self.batch:
                dispatch(group)
                group = []
            group.append(nxt)
        dispatch(group)
        while inflight:
            collect_oldest()
        while finishing:
            write_oldest()
        return frames

    def _finish(self, full: np.ndarray | None, prob_small: np.ndarray, size: tuple[int, int],
                writers: dict[str, _Writer]) -> dict[str, np.ndarray]:
        """One frame's outputs from its probabilities at the bucket size, as images get them (in a
        worker thread: the resize and the refinement are the slow part)."""
        mask = mask_to_uint8(resize_align_corners(prob_small, size))
        out = {}
        if "cutout" in writers:
            out["cutout"] = writers["cutout"].cutout_frame(refine_foreground_strips(full, mask, self.radius), mask)
        if "mask" in writers:
            out["mask"] = mask
        return out


class _Decoder:
    """Decodes frames in a thread into a bounded queue, each with its resize to the model's input
    running in `pool` (the resize costs more than decoding): (full RGB or None, Future of the input,
    the reader's note for the writers: timestamp and audio, or None)."""

    def __init__(self, reader, policy: SizePolicy, pool: ThreadPoolExecutor, depth: int, *, keep_full: bool):
        self.reader, self.policy, self.pool, self.keep_full = reader, policy, pool, keep_full
        self.size: tuple[int, int] | None = None  # (height, width) of the frames
        self.trailer = None  # what the reader had after the last frame (audio), set before _END
        self._queue: queue.Queue = queue.Queue(maxsize=max(2, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="birefnet-video-decode", daemon=True)
        self._thread.start()

    def _put(self, value) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        try:
            bucket = None
            index = 0
            frames = self.reader.frames()
            for rgb, info in frames:
                if self._stop.is_set():
                    return
                if self.size is None:
                    self.size = rgb.shape[:2]
                    bucket = self.policy.bucket(self.size[1], self.size[0])
                elif rgb.shape[:2] != self.size:
                    raise VideoError(f"frame {index} is {rgb.shape[1]}x{rgb.shape[0]}, the first was "
                                     f"{self.size[1]}x{self.size[0]}; frames of changing size are not supported")
                small = self.pool.submit(resize_linear, rgb, bucket)
                if not self._put((rgb if self.keep_full else None, small, info)):
                    return
                index += 1
            self.trailer = self.reader.trailer
            self._put(_END)
        except BaseException as e:  # handed to the consumer, which raises it as the video's failure
            self._put(e)

    def get(self):
        item = self._queue.get()
        if isinstance(item, BaseException):
            if isinstance(item, VideoError):
                raise item
            raise VideoError(f"decoding failed: {type(item).__name__}: {item}") from item
        return item

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class _Writer:
    """One output video: frames are encoded in its own thread (in order; overlapping the device and
    the other output) into a hidden temporary file beside `dest` (same extension: OpenCV's writer picks
    the container by it), renamed onto `dest` by `commit`, deleted by `discard`. Subclasses open the
    file (`_open`) and encode a frame (`_encode`), finish (`_finish`) and check it (`_check`)."""

    def __init__(self, dest: Path, kind: str, depth: int = 8):
        self.dest, self.kind, self.depth = dest, kind, depth
        self.alpha = kind == "cutout"
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"birefnet-video-{kind}")
        self._pending: deque[Future] = deque()
        self.tmp: Path | None = None
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=f".tmp{dest.suffix}", dir=dest.parent)
        os.close(fd)
        self.tmp = Path(tmp)
        try:
            self._open()
        except BaseException:
            self.discard()
            raise

    def _open(self) -> None:
        raise NotImplementedError

    def _encode(self, frame: np.ndarray, info) -> None:
        raise NotImplementedError

    def _finish(self, trailer) -> None:
        raise NotImplementedError

    def _check(self, frames: int) -> None:
        raise NotImplementedError

    def _release(self) -> None:
        """Closes the file, whatever state it is in (for `discard`)."""

    def cutout_frame(self, fg: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The frame to write for RGB foreground `fg` under `mask`: BGRA."""
        return np.ascontiguousarray(np.concatenate([fg[..., ::-1], mask[..., None]], axis=-1))

    def write(self, frame: np.ndarray, info) -> None:
        """Queues `frame`; waits for the oldest frames once `depth` are queued (memory stays bounded)."""
        self._pending.append(self._thread.submit(self._encode, frame, info))
        while len(self._pending) > self.depth or (self._pending and self._pending[0].done()):
            self._pending.popleft().result()

    def close(self, frames: int, trailer=None) -> None:
        """Finish the file (with what followed the last frame, `trailer`) and check it holds `frames`."""
        while self._pending:
            self._pending.popleft().result()
        self._thread.submit(self._finish, trailer).result()
        self._check(frames)

    def commit(self) -> None:
        os.chmod(self.tmp, 0o666 & ~umask())
        os.replace(self.tmp, self.dest)
        self.tmp = None

    def discard(self) -> None:
        """Stops encoding and deletes the temporary file (nothing, after `commit`)."""
        self._thread.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()
        with contextlib.suppress(Exception):
            self._release()
        if self.tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                self.tmp.unlink()
            self.tmp = None


# --------------------------------------------------------------------------- PyAV


@dataclass
class _FrameNote:
    """What a PyAV frame carries to the writers: its timestamp (in the input's video time base) and
    the audio demuxed since the previous frame, to be written before it."""

    pts: int
    audio: list = field(default_factory=list)


@dataclass(frozen=True)
class _AudioPacket:
    """A demuxed audio packet, as plain data each writer turns into a packet of its own (an
    `av.Packet` belongs to one thread): `stream` indexes the input's audio streams."""

    stream: int
    data: bytes
    pts: int | None
    dts: int | None
    duration: int | None
    time_base: Fraction
    keyframe: bool
    side_data: tuple = ()


@dataclass(frozen=True)
class _AudioSamples:
    """Decoded audio (for a codec Matroska cannot carry), re-encoded by each writer."""

    stream: int
    samples: np.ndarray
    format: str
    layout: str
    rate: int
    pts: int | None
    time_base: Fraction | None


@lru_cache(maxsize=1)
def _matroska_codec_ids(av) -> frozenset:
    """The codecs FFmpeg's Matroska muxer takes (by codec id)."""
    probe = av.open(io.BytesIO(), "w", format="matroska")
    try:
        ids = set()
        for name in probe.supported_codecs:
            with contextlib.suppress(Exception):
                ids.add(av.codec.Codec(name, "r").id)
            with contextlib.suppress(Exception):
                ids.add(av.codec.Codec(name, "w").id)
        return frozenset(ids)
    finally:
        with contextlib.suppress(Exception):
            probe.close()


class _AVBackend:
    def __init__(self, av):
        self.av = av

    def open(self, path: Path) -> _AVReader:
        return _AVReader(self.av, path)

    def writer(self, dest: Path, kind: str, reader: _AVReader, size_hw: tuple[int, int], background) -> _Writer:
        return _AVWriter(self.av, dest, kind, reader, size_hw)


class _AVReader:
    """The input through PyAV: its first video stream decoded to RGB (turned upright), its audio
    streams demuxed alongside, as `_AudioPacket` (remuxed) or `_AudioSamples` (re-encoded as FLAC)."""

    def __init__(self, av, path: Path):
        self.av = av
        self.trailer: list = []
        try:
            self.container = av.open(str(path))
        except Exception as e:
            if not path.exists():
                raise VideoError("no such file") from e
            raise VideoError("cannot open the video (not a video, or a format or codec FFmpeg cannot "
                             f"decode: {e})") from e
        try:
            if not self.container.streams.video:
                raise VideoError("the file has no video stream")
            self.video = self.container.streams.video[0]
            self.video.thread_type = "AUTO"
            self.time_base = self.video.time_base or Fraction(1, 90000)
            self.rate = self.video.average_rate or self.video.guessed_rate or self.video.base_rate
            # Audio streams FFmpeg knows the codec of (without one, there is no stream to copy from).
            self.audio = [s for s in self.container.streams.audio if s.codec_context is not None]
            supported = _matroska_codec_ids(av) if self.audio else frozenset()
            self.remux = [s.codec_context.codec.id in supported for s in self.audio]
            self.expected = self._expected_frames()
            # The writers copy the audio streams' parameters from a second opening of the file, never
            # touched by the decoding thread.
            self.templates = av.open(str(path)) if self.audio else None
        except BaseException:
            self.container.close()
            raise

    def _expected_frames(self) -> int:
        if self.video.frames:
            return int(self.video.frames)
        duration = self.video.duration
        seconds = float(duration * self.time_base) if duration else (
            self.container.duration / 1e6 if self.container.duration else 0.0)
        return int(round(seconds * float(self.rate))) if self.rate and seconds > 0 else 0

    def audio_template(self, index: int):
        return self.templates.streams[self.audio[index].index]

    def frames(self) -> Iterator[tuple[np.ndarray, _FrameNote]]:
        """(RGB frame, note) in presentation order; `trailer` holds the audio after the last frame."""
        pending: list = []
        last = None
        step = max(1, round(1 / float(self.rate * self.time_base))) if self.rate else 1
        audio_index = {s.index: i for i, s in enumerate(self.audio)}
        for packet in self.container.demux(self.video, *self.audio):
            if packet.stream.index == self.video.index:
                for frame in packet.decode():
                    pts = frame.pts
                    if pts is None or (last is not None and pts <= last):  # missing or out of order
                        pts = 0 if last is None else last + step
                    last = pts
                    rgb = frame.to_ndarray(format="rgb24")
                    turns = round((frame.rotation or 0) / 90) % 4  # counterclockwise, as FFmpeg shows it
                    if turns:
                        rgb = np.ascontiguousarray(np.rot90(rgb, turns))
                    yield rgb, _FrameNote(pts, pending)
                    pending = []
            else:
                i = audio_index[packet.stream.index]
                if self.remux[i]:
                    if packet.size and (packet.pts is not None or packet.dts is not None):
                        pending.append(_AudioPacket(i, bytes(packet), packet.pts, packet.dts, packet.duration,
                                                    packet.time_base, packet.is_keyframe,
                                                    tuple(packet.iter_sidedata())))
                else:
                    for frame in packet.decode():
                        pending.append(_AudioSamples(i, frame.to_ndarray(), frame.format.name, frame.layout.name,
                                                     frame.sample_rate, frame.pts, frame.time_base))
        self.trailer = pending

    def close(self) -> None:
        for c in (self.container, self.templates):
            if c is not None:
                with contextlib.suppress(Exception):
                    c.close()


class _AVWriter(_Writer):
    """An FFV1 video in Matroska through PyAV, with the input's timestamps and audio streams."""

    def __init__(self, av, dest: Path, kind: str, reader: _AVReader, size_hw: tuple[int, int]):
        self.av, self.reader, self.size_hw = av, reader, size_hw
        self.container = None
        self.packets = 0  # video packets written: one a frame (FFV1 is intra-only)
        super().__init__(dest, kind)

    def _open(self) -> None:
        av, reader = self.av, self.reader
        h, w = self.size_hw
        # Negative timestamps (audio priming) kept as they are, not shifted onto the video.
        self.container = av.open(str(self.tmp), "w", format="matroska", options={"avoid_negative_ts": "disabled"})
        try:
            video = self.container.add_stream("ffv1", rate=reader.rate or Fraction(DEFAULT_FPS))
        except Exception as e:
            raise VideoError(f"PyAV cannot write FFV1 video here: {e}") from e
        video.width, video.height, video.pix_fmt = w, h, _AV_PIX_FMT[self.kind]
        video.time_base = reader.time_base
        video.codec_context.time_base = reader.time_base
        # Version 3: slices, encoded in parallel, each with a CRC. Golomb-Rice coding for the cut-out
        # (about twice as fast as the range coder on camera footage, files as large).
        slices = 16 if h * w >= 1280 * 720 else 4
        options = {"level": "3", "slices": str(slices), "slicecrc": "1"}
        if self.kind == "cutout":
            options["coder"] = "rice"
        video.options = options
        video.codec_context.thread_type = "SLICE"
        video.codec_context.thread_count = max(1, min(slices, os.cpu_count() or 1))
        self.video = video
        self.audio = []
        for i, remux in enumerate(reader.remux):
            template = reader.audio_template(i)
            if remux:
                stream = self.container.add_stream_from_template(template)
            else:
                ctx = template.codec_context
                stream = self.container.add_stream("flac", rate=ctx.sample_rate, layout=ctx.layout.name)
                stream.codec_context.format = "s16" if ctx.format.bytes <= 2 else "s32"
            for key in ("language", "title"):
                if key in template.metadata:
                    stream.metadata[key] = template.metadata[key]
            self.audio.append(stream)

    def _mux_audio(self, records) -> None:
        av = self.av
        for rec in records:
            stream = self.audio[rec.stream]
            if isinstance(rec, _AudioPacket):
                packet = av.Packet(rec.data)
                packet.pts, packet.dts, packet.time_base = rec.pts, rec.dts, rec.time_base
                if rec.duration is not None:
                    packet.duration = rec.duration
                packet.is_keyframe = rec.keyframe
                for side in rec.side_data:
                    packet.set_sidedata(side)
                packet.stream = stream
                self.container.mux(packet)
            else:
                frame = av.AudioFrame.from_ndarray(rec.samples, format=rec.format, layout=rec.layout)
                frame.sample_rate = rec.rate
                frame.pts = rec.pts
                if rec.time_base is not None:
                    frame.time_base = rec.time_base
                self.container.mux(stream.encode(frame))

    def _mux_video(self, packets) -> None:
        for packet in packets:
            self.container.mux(packet)
            self.packets += 1

    def _encode(self, frame: np.ndarray, info: _FrameNote) -> None:
        self._mux_audio(info.audio)
        vf = self.av.VideoFrame.from_ndarray(frame, format=_AV_PIX_FMT[self.kind])
        vf.pts, vf.time_base = info.pts, self.reader.time_base
        self._mux_video(self.video.encode(vf))

    def _finish(self, trailer) -> None:
        self._mux_audio(trailer or [])
        self._mux_video(self.video.encode(None))
        for stream, remux in zip(self.audio, self.reader.remux, strict=True):
            if not remux:
                self.container.mux(stream.encode(None))
        container, self.container = self.container, None
        container.close()

    def _check(self, frames: int) -> None:
        if self.packets != frames:
            raise VideoError(f"writing the {self.kind} video failed: {self.packets} frames encoded of {frames}")
        try:
            with self.av.open(str(self.tmp)) as check:
                streams = (len(check.streams.video), len(check.streams.audio))
        except Exception as e:
            raise VideoError(f"writing the {self.kind} video failed: the file cannot be read back ({e})") from e
        if streams != (1, len(self.audio)):
            raise VideoError(f"writing the {self.kind} video failed: it has {streams[0]} video and {streams[1]} "
                             f"audio streams, not 1 and {len(self.audio)}")

    def _release(self) -> None:
        container, self.container = self.container, None
        if container is not None:
            container.close()


# --------------------------------------------------------------------------- OpenCV


class _CVBackend:
    def __init__(self, cv2):
        self.cv2 = cv2

    def open(self, path: Path) -> _CVReader:
        return _CVReader(self.cv2, path)

    def writer(self, dest: Path, kind: str, reader: _CVReader, size_hw: tuple[int, int], background) -> _Writer:
        return _CVWriter(self.cv2, dest, kind, reader.fps, size_hw[::-1], background)


class _CVReader:
    """The input through OpenCV's FFmpeg capture: BGR(A) frames to RGB; no audio."""

    trailer = None

    def __init__(self, cv2, path: Path):
        self.cv2 = cv2
        self.cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
        if not self.cap.isOpened():
            self.cap.release()
            if not path.exists():
                raise VideoError("no such file")
            raise VideoError("cannot open the video (not a video, or a format or codec OpenCV's FFmpeg cannot decode)")
        fps = self.cap.get(cv2.CAP_PROP_FPS)
        self.fps = float(fps) if np.isfinite(fps) and fps > 0 else DEFAULT_FPS
        expected = self.cap.get(cv2.CAP_PROP_FRAME_COUNT)
        self.expected = int(expected) if np.isfinite(expected) and expected > 0 else 0

    def frames(self) -> Iterator[tuple[np.ndarray, None]]:
        cv2 = self.cv2
        while True:
            ok, bgr = self.cap.read()
            if not ok or bgr is None:
                return
            if bgr.ndim == 2:
                bgr = cv2.cvtColor(bgr, cv2.COLOR_GRAY2BGR)
            yield cv2.cvtColor(bgr, cv2.COLOR_BGRA2RGB if bgr.shape[2] == 4 else cv2.COLOR_BGR2RGB), None

    def close(self) -> None:
        self.cap.release()


def _alpha_property(cv2) -> int | None:
    """The writer property that lets it take BGRA frames (OpenCV 4.14+), or None."""
    return getattr(cv2, "VIDEOWRITER_PROP_ENABLE_ALPHA", None)


class _CVWriter(_Writer):
    """An FFV1 (mask) or HuffYUV (cut-out) video through OpenCV's writer."""

    def __init__(self, cv2, dest: Path, kind: str, fps: float, size_wh: tuple[int, int],
                 background: tuple[int, int, int]):
        self.cv2, self.fps, self.size_wh = cv2, fps, size_wh
        self.background = np.array(background[::-1], np.uint16)  # BGR, as OpenCV writes
        self.writer = None
        super().__init__(dest, kind)

    def _open(self) -> None:
        cv2, kind, size_wh, fps = self.cv2, self.kind, self.size_wh, self.fps
        fourcc = cv2.VideoWriter_fourcc(*_FOURCC[kind])
        self.alpha = False
        if kind == "cutout":
            prop = _alpha_property(cv2)
            if prop is not None:
                self.writer = cv2.VideoWriter(str(self.tmp), cv2.CAP_FFMPEG, fourcc, fps, size_wh,
                                              [cv2.VIDEOWRITER_PROP_IS_COLOR, 1, prop, 1])
                self.alpha = self.writer.isOpened()
            if not self.alpha:
                self.writer = cv2.VideoWriter(str(self.tmp), cv2.CAP_FFMPEG, fourcc, fps, size_wh,
                                              [cv2.VIDEOWRITER_PROP_IS_COLOR, 1])
        else:
            self.writer = cv2.VideoWriter(str(self.tmp), cv2.CAP_FFMPEG, fourcc, fps, size_wh,
                                          [cv2.VIDEOWRITER_PROP_IS_COLOR, 0])
        if not self.writer.isOpened():
            raise VideoError(f"OpenCV cannot write {_FOURCC[kind]} video to {self.dest.suffix} files here "
                             "(its FFmpeg backend is missing or lacks the codec)")

    def cutout_frame(self, fg: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """BGRA, or without alpha the foreground composited over the background."""
        if self.alpha:
            return super().cutout_frame(fg, mask)
        a = mask[..., None].astype(np.uint16)
        bgr = (fg[..., ::-1].astype(np.uint16) * a + self.background * (255 - a) + 127) // 255
        return bgr.astype(np.uint8)

    def _encode(self, frame: np.ndarray, info) -> None:
        self.writer.write(frame)

    def _finish(self, trailer) -> None:
        self.writer.release()

    def _check(self, frames: int) -> None:
        """Read the header back: OpenCV's writer drops frames it cannot take without a word, so a file
        of the wrong length must not be committed."""
        cap = self.cv2.VideoCapture(str(self.tmp), self.cv2.CAP_FFMPEG)
        try:
            ok = cap.isOpened()
            count = int(cap.get(self.cv2.CAP_PROP_FRAME_COUNT)) if ok else -1
        finally:
            cap.release()
        if not ok or abs(count - frames) > 1:
            got = "an unreadable file" if not ok else f"{count} frames"
            raise VideoError(f"writing the {self.kind} video failed: OpenCV wrote {got} of {frames}")

    def _release(self) -> None:
        if self.writer is not None:
            self.writer.release()
