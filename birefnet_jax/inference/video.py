"""Video inputs for `predict`: what the original's video tutorial does by hand (decode every frame,
predict, write a mask video and a cut-out video), as a streaming pipeline.

Per video: a thread decodes frames with OpenCV into a bounded queue, their resizes to the policy's
bucket running in worker threads (memory stays a few batches of frames, whatever the video's length);
the main thread runs them `batch` at a time through the same compiled program as images (the last,
short batch is padded, so nothing recompiles), keeping one batch on the device while the previous one
is finished; workers resize the probabilities back to the frame size and refine cut-out colours; each
output video is encoded, in order, in a thread of its own.

Outputs, chosen for what OpenCV's writer (opencv-python-headless, FFmpeg backend) can write, and
verified by reading them back:

* ``<rel without extension>_mask.mkv``: the 8-bit masks as grey FFV1 (lossless, intra-only) in
  Matroska: every frame is exactly the mask an image of that frame gets, in a few KB. A lossy codec (the
  tutorial's 'mp4v') would leave block artefacts along the edges that matter most in a matte.
* ``<rel without extension>_cutout.mkv``: the foreground, colours refined by blur fusion as image
  cut-outs are, with the mask as alpha: BGRA HuffYUV (lossless; several times faster to encode than
  FFV1 on camera footage) in Matroska. OpenCV's writer takes an alpha channel only from 4.14
  (``VIDEOWRITER_PROP_ENABLE_ALPHA``; FFV1 and HuffYUV keep it, its PNG-in-MOV writer refuses it); with
  an older OpenCV the foreground is composited over `background` instead (BGR, same codec and name).
* "prob" is not written for videos: the mask video is lossless, so it already holds the 8-bit masks,
  and float probabilities for every frame would be far larger than the video. A video asked only for
  "prob" is reported as failed with that reason.

FFV1 and HuffYUV in Matroska play in FFmpeg, VLC and mpv and are read by OpenCV; for a player or an
editor that does not read them, convert: ``ffmpeg -i x_mask.mkv -c:v libx264 -pix_fmt yuv420p
x_mask.mp4`` (lossy), or ``ffmpeg -i x_cutout.mkv -c:v prores_ks -profile:v 4444 -pix_fmt yuva444p10le
x_cutout.mov`` (keeps alpha). Lossless video is large: a 1080p cut-out takes ~5 MB a frame.

Each output has the input's frame count, size and frame rate (an unknown rate becomes 25 fps); audio
is not carried over (OpenCV writes none). OpenCV's writer drops the last column / row of an odd-sized
frame (its FFmpeg backend does so for every codec), so such a video's outputs are one pixel smaller;
codecs of camera video store even sizes. Every output is written to a hidden temporary file beside it
(keeping the extension, from which the writer picks the container) and renamed into place once
complete and its length read back, so an interrupted or failed video leaves nothing, and a rerun
skips the videos whose outputs all exist.
"""

from __future__ import annotations

import contextlib
import os
import queue
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
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
_SUFFIX = {"mask": "_mask.mkv", "cutout": "_cutout.mkv"}
# Lossless codecs OpenCV's FFmpeg writer has everywhere. FFV1 squeezes a flat grey mask to very little;
# for camera-like BGRA HuffYUV encodes several times faster than FFV1 (OpenCV gives the encoder no
# threads), for somewhat larger files.
_FOURCC = {"mask": "FFV1", "cutout": "HFYU"}
DEFAULT_FPS = 25.0  # for streams that do not say their rate
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


def plan_video_outputs(rels: Sequence[Path], root: Path, kinds: Sequence[str]) -> list[dict[str, Path]]:
    """`<root>/<rel without extension>_mask.mkv` etc., mirroring the inputs as images do."""
    return mirror_paths(rels, root, {k: _SUFFIX[k] for k in kinds if k in VIDEO_KINDS})


def predict_videos(videos: list[InputItem], predictor, policy: SizePolicy, output: Path, summary, *,
                   kinds: Sequence[str], batch: int, overwrite: bool, progress: bool, refine_radius: int = 90,
                   background: tuple[int, int, int] = (0, 255, 0)) -> None:
    """Mask and cut-out videos for `videos` (see the module doc), accounted in `summary` (a
    `PredictSummary`): done and frames per finished video, skipped when all its outputs exist (unless
    `overwrite`), failed with the reason otherwise; a failed video never stops the others.

    batch: frames per program run; the short last batch is padded to it. background: RGB under
      the cut-out when this OpenCV cannot write alpha.
    """
    wanted = [k for k in kinds if k in VIDEO_KINDS]
    if not wanted:
        for item in videos:
            summary.failed.append((item.path, "only mask and cutout outputs are written for videos "
                                              "('prob' is not; the lossless mask video holds the 8-bit masks)"))
        return
    try:
        cv2 = _import_cv2()
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
    job = _Job(cv2, predictor, policy, batch, refine_radius, tuple(int(c) for c in background), pool, bar)
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

    def __init__(self, cv2, predictor, policy: SizePolicy, batch: int, radius: int,
                 background: tuple[int, int, int], pool: ThreadPoolExecutor, bar):
        self.cv2, self.predictor, self.policy, self.batch = cv2, predictor, policy, batch
        self.radius, self.background, self.pool, self.bar = radius, background, pool, bar

    def run(self, path: Path, plan: dict[str, Path]) -> int:
        """Predict one video and write its outputs; returns its frame count. Leaves no file behind
        when it raises."""
        cv2 = self.cv2
        cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
        if not cap.isOpened():
            cap.release()
            if not path.exists():
                raise VideoError("no such file")
            raise VideoError("cannot open the video (not a video, or a format or codec OpenCV's FFmpeg cannot decode)")
        fps = cap.get(cv2.CAP_PROP_FPS)
        fps = float(fps) if np.isfinite(fps) and fps > 0 else DEFAULT_FPS
        expected = cap.get(cv2.CAP_PROP_FRAME_COUNT)  # from the header: an estimate, for the progress bar
        expected = int(expected) if np.isfinite(expected) and expected > 0 else 0
        self.bar.total += expected
        self.bar.refresh()
        decoder = _Decoder(cv2, cap, self.policy, self.pool, 2 * self.batch, keep_full="cutout" in plan)
        writers: dict[str, _Writer] = {}
        shown = self.bar.n
        try:
            first = decoder.get()
            if first is _END:
                raise VideoError("no frames could be decoded")
            h, w = decoder.size
            for kind, dest in plan.items():
                writers[kind] = _Writer(cv2, dest, fps, (w, h), kind, self.background)
            frames = self._predict(decoder, first, writers, (h, w))
            for writer in writers.values():
                writer.close(frames)  # raises if the file is not what was written
            for kind in ("cutout", "mask"):  # the mask last, as for images
                if kind in writers:
                    writers[kind].commit()
        finally:
            decoder.stop()
            for writer in writers.values():
                writer.discard()
            self.bar.total += (self.bar.n - shown) - expected  # the estimate, replaced by what was done
            self.bar.refresh()
        return frames

    def _predict(self, decoder: _Decoder, first, writers: dict[str, _Writer], size: tuple[int, int]) -> int:
        """Batches through the device, one batch in flight, finished frames written in order."""
        window = 2 * self.batch
        inflight: deque[tuple[list, object]] = deque()
        finishing: deque[Future] = deque()
        frames = 0

        def write_oldest() -> None:
            nonlocal frames
            for kind, frame in finishing.popleft().result().items():
                writers[kind].write(frame)
            frames += 1
            self.bar.update(1)

        def collect_oldest() -> None:
            group, probs = inflight.popleft()
            try:
                host = np.asarray(probs)[..., 0]
            except Exception as e:
                raise VideoError(f"prediction failed after frame {frames}: {type(e).__name__}: {e}") from e
            for (full, _), prob in zip(group, host, strict=False):
                finishing.append(self.pool.submit(self._finish, full, prob, size, writers))
            while len(finishing) > window or (finishing and finishing[0].done()):
                write_oldest()

        def dispatch(group: list) -> None:
            stacked = np.stack([small.result() for _, small in group])
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
    running in `pool` (the resize costs more than decoding): (full RGB or None, Future of the input)."""

    def __init__(self, cv2, cap, policy: SizePolicy, pool: ThreadPoolExecutor, depth: int, *, keep_full: bool):
        self.cv2, self.cap, self.policy, self.pool, self.keep_full = cv2, cap, policy, pool, keep_full
        self.size: tuple[int, int] | None = None  # (height, width) of the frames
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
        cv2 = self.cv2
        try:
            bucket = None
            index = 0
            while not self._stop.is_set():
                ok, bgr = self.cap.read()
                if not ok or bgr is None:
                    break
                if bgr.ndim == 2:
                    bgr = cv2.cvtColor(bgr, cv2.COLOR_GRAY2BGR)
                rgb = cv2.cvtColor(bgr, cv2.COLOR_BGRA2RGB if bgr.shape[2] == 4 else cv2.COLOR_BGR2RGB)
                if self.size is None:
                    self.size = rgb.shape[:2]
                    bucket = self.policy.bucket(self.size[1], self.size[0])
                elif rgb.shape[:2] != self.size:
                    raise VideoError(f"frame {index} is {rgb.shape[1]}x{rgb.shape[0]}, the first was "
                                     f"{self.size[1]}x{self.size[0]}; frames of changing size are not supported")
                small = self.pool.submit(resize_linear, rgb, bucket)
                if not self._put((rgb if self.keep_full else None, small)):
                    return
                index += 1
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
        self.cap.release()


def _alpha_property(cv2) -> int | None:
    """The writer property that lets it take BGRA frames (OpenCV 4.14+), or None."""
    return getattr(cv2, "VIDEOWRITER_PROP_ENABLE_ALPHA", None)


class _Writer:
    """One output video: frames are encoded in its own thread (in order; overlapping the device and
    the other output) into a hidden temporary file beside `dest` (same extension: the writer picks the
    container by it), renamed onto `dest` by `commit`, deleted by `discard`."""

    def __init__(self, cv2, dest: Path, fps: float, size_wh: tuple[int, int], kind: str,
                 background: tuple[int, int, int], depth: int = 8):
        self.cv2, self.dest, self.kind, self.depth = cv2, dest, kind, depth
        self.background = np.array(background[::-1], np.uint16)  # BGR, as OpenCV writes
        self.alpha = False
        self.writer = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"birefnet-video-{kind}")
        self._pending: deque[Future] = deque()
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=f".tmp{dest.suffix}", dir=dest.parent)
        os.close(fd)
        self.tmp: Path | None = Path(tmp)
        fourcc = cv2.VideoWriter_fourcc(*_FOURCC[kind])
        try:
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
                raise VideoError(f"OpenCV cannot write {_FOURCC[kind]} video to {dest.suffix} files here "
                                 "(its FFmpeg backend is missing or lacks the codec)")
        except BaseException:
            self.discard()
            raise

    def cutout_frame(self, fg: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The frame to write for RGB foreground `fg` under `mask`: BGRA, or without alpha the
        foreground composited over the background."""
        if self.alpha:
            return np.concatenate([fg[..., ::-1], mask[..., None]], axis=-1)
        a = mask[..., None].astype(np.uint16)
        bgr = (fg[..., ::-1].astype(np.uint16) * a + self.background * (255 - a) + 127) // 255
        return bgr.astype(np.uint8)

    def write(self, frame: np.ndarray) -> None:
        """Queues `frame`; waits for the oldest frames once `depth` are queued (memory stays bounded)."""
        self._pending.append(self._thread.submit(self.writer.write, frame))
        while len(self._pending) > self.depth or (self._pending and self._pending[0].done()):
            self._pending.popleft().result()

    def close(self, frames: int) -> None:
        """Finish the file and read its header back: OpenCV's writer drops frames it cannot take
        without a word, so a file of the wrong length must not be committed."""
        while self._pending:
            self._pending.popleft().result()
        self.writer.release()
        cap = self.cv2.VideoCapture(str(self.tmp), self.cv2.CAP_FFMPEG)
        try:
            ok = cap.isOpened()
            count = int(cap.get(self.cv2.CAP_PROP_FRAME_COUNT)) if ok else -1
        finally:
            cap.release()
        if not ok or abs(count - frames) > 1:
            got = "an unreadable file" if not ok else f"{count} frames"
            raise VideoError(f"writing the {self.kind} video failed: OpenCV wrote {got} of {frames}")

    def commit(self) -> None:
        os.chmod(self.tmp, 0o666 & ~umask())
        os.replace(self.tmp, self.dest)
        self.tmp = None

    def discard(self) -> None:
        """Stops encoding and deletes the temporary file (nothing, after `commit`)."""
        self._thread.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()
        if self.writer is not None:
            self.writer.release()
        if self.tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                self.tmp.unlink()
            self.tmp = None
