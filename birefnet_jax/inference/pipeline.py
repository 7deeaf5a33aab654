"""Batch inference over files, in three stages that `predict` chains:

* plan (`birefnet_jax.inference.plan.plan_predictions`): find the inputs, plan their output paths
  (refusing inputs whose outputs would meet), skip what is done, check that the output folder can
  be written; before any model is loaded;
* run (`run_images`): decode and resize in threads, batch by shape bucket, run the compiled program on
  all local devices, one batch kept on the device while the previous one comes back;
* write (`ImageWriter`, `write_outputs`): bring the probabilities back to each image's size and write
  masks, cut-outs and probabilities in threads,

so the device does not wait on the disk and the disk does not wait on the device. Videos go through
`birefnet_jax.inference.video.predict_videos` after the images.

Memory stays bounded whatever the folder size: at most a window of decoded images is held (reads
are submitted lazily, a few batches ahead), plus one partly filled batch per bucket, and at most a
window of images waits to be written.

Compiling is the long wait of a small job (seconds to a minute per program on a CPU): with
`compile_cache` JAX's persistent compilation cache keeps the programs across runs
(`persistent_compile_cache`), the progress bar names the program compiling and keeps its time out of
the rate and the estimate, and the summary gives the throughput without it.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from birefnet_jax.convert.io import cache_root
from birefnet_jax.inference.buckets import STEP, SizePolicy, parse_size
from birefnet_jax.inference.inputs import InputItem
from birefnet_jax.inference.outputs import KINDS, OutputPaths
from birefnet_jax.inference.plan import InputSpecs, PredictPlan, plan_predictions
from birefnet_jax.inference.predictor import Predictor, load_predictor
from birefnet_jax.inference.refine import refine_foreground_strips
from birefnet_jax.inference.video import predict_videos
from birefnet_jax.io.images import DEFAULT_MAX_PIXELS, ImageReadError, read_image
from birefnet_jax.io.masks import mask_to_uint8, write_npy, write_png
from birefnet_jax.io.resize import resize_align_corners, resize_linear
from birefnet_jax.model import BiRefNet

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PredictSummary:
    """What a `predict` call did. `failed` holds (path, reason) for every input that produced nothing.

    done, skipped: inputs (images and videos; `videos` of `done` are videos, `frames` their frames).
    wall_seconds: the whole call (planning, loading, compiling included); `images_per_second` is
      `done` over it. image_seconds, video_seconds: the images' and the videos' stages, compiling
      excluded: `warm_images_per_second` and `frames_per_second` are the throughput once compiled.
    compile_count, compile_seconds: programs compiled during the call, `cache_loads` of them loaded
      from the persistent compile cache (`compile_cache`, its folder; None when none was used).
    """

    done: int = 0
    skipped: int = 0
    failed: list[tuple[Path, str]] = dataclasses.field(default_factory=list)
    wall_seconds: float = 0.0
    compile_seconds: float = 0.0
    compile_count: int = 0
    buckets: dict[tuple[int, int], int] = dataclasses.field(default_factory=dict)
    frames: int = 0  # video frames predicted
    videos: int = 0  # of `done`: videos
    image_seconds: float = 0.0  # the images' run and write stages, compiling excluded
    video_seconds: float = 0.0  # the videos', compiling excluded
    cache_loads: int = 0  # of `compile_count`: found in the persistent compile cache
    compile_cache: Path | None = None  # the persistent compile cache's folder, None when none was used

    @property
    def images_per_second(self) -> float:
        """Inputs done per second of the whole call (loading and compiling included)."""
        return self.done / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def images(self) -> int:
        """Images done (`done` less the videos)."""
        return self.done - self.videos

    @property
    def warm_images_per_second(self) -> float:
        """Images per second of the images' stage, compiling excluded."""
        return self.images / self.image_seconds if self.image_seconds > 0 else 0.0

    @property
    def frames_per_second(self) -> float:
        """Video frames per second of the videos' stage, compiling excluded."""
        return self.frames / self.video_seconds if self.video_seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    def report(self) -> str:
        lines = [f"done {self.done}, skipped {self.skipped} (outputs exist), failed {len(self.failed)}; "
                 f"{self.wall_seconds:.1f} s in all"]
        if self.images:
            lines.append(f"images: {self.images} in {self.image_seconds:.1f} s, "
                         f"{self.warm_images_per_second:.2f} images/s (compiling excluded)")
        if self.videos or self.frames:
            lines.append(f"videos: {self.videos}, {self.frames} frames in {self.video_seconds:.1f} s, "
                         f"{self.frames_per_second:.2f} frames/s (compiling excluded)")
        if self.compile_count or self.compile_cache is not None or self.done:
            loaded = f" ({self.cache_loads} loaded from the compile cache)" if self.cache_loads else ""
            cache = f"compile cache: {self.compile_cache}" if self.compile_cache is not None else "no compile cache"
            lines.append(f"{self.compile_count} program(s) compiled in {self.compile_seconds:.1f} s{loaded}; {cache}")
        if self.buckets:
            sizes = ", ".join(f"{w}x{h}: {n}" for (h, w), n in sorted(self.buckets.items()))
            lines.append(f"input sizes (WxH: images): {sizes}")
        for path, reason in self.failed:
            lines.append(f"FAILED {path}: {reason}")
        return "\n".join(lines)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class PredictOptions:
    """Every option of `predict`, checked when built (ValueError naming the option).

    resolution: None for the checkpoint's own, "WxH", (height, width), or "auto" (each image's own
      size up to `max_pixels`, default the checkpoint's pixel count, in buckets of `bucket_step`, a
      multiple of 32; both are used with "auto" only). A checkpoint trained at many sizes (its
      `cfg.dynamic_size`, e.g. BiRefNet_dynamic) runs "auto" when this is None, up to its largest
      training side squared.
    batch_size: images per program run (default: one per device); rounded up to a multiple of the
      device count.
    dtype: compute dtype when `model` is a checkpoint (e.g. "bfloat16"); default float32.
    outputs: any of "mask" (8-bit PNG at the image's size), "cutout" (RGBA PNG, foreground colours
      refined by blur fusion with `refine_radius`), "prob" (float32 .npy at the image's size).
    overwrite: redo images whose outputs exist (by default they are skipped, so an interrupted run
      resumes where it stopped).
    workers: decoding / writing threads (None or 0: a default for this machine).
    max_image_pixels: refuse images with more pixels (None: no limit).
    devices: the devices to run on when `model` is a checkpoint or a `BiRefNet` (default: all local).
    progress: show a progress bar (on stderr); it names the program compiling while it does.
    compile_cache: keep compiled programs across runs in JAX's persistent compilation cache: a
      folder, or True for JAX's own setting (`jax_compilation_cache_dir`, e.g.
      $JAX_COMPILATION_CACHE_DIR) if made, else `<birefnet_jax.convert.io.cache_root()>/xla`
      (~/.cache/birefnet-jax/xla; the command line's default); False turns JAX's off for the call;
      None (the default) leaves JAX's setting as it is. JAX's cache is process-wide: it is set for
      the call and set back after it. A folder that cannot be written warns once
      (`CompileCacheWarning`) and the call goes on without it.
    crop_refine: predict once, then again on the object's bounding box (plus `crop_margin`, a share of
      the box) cut from the full-resolution image, and paste that prediction back: more detail for
      images far larger than the model's resolution.
    on_image: called with each input path once its outputs are written (e.g. for a progress hook).
    process_index, process_count: this process's share when `process_count` processes predict the
      same inputs into the same output folder (`predict --distributed`): every process plans and
      checks the whole set of inputs, then predicts its share alone (see
      `birefnet_jax.inference.plan.process_share`). None: `jax.process_index()`,
      `jax.process_count()` (0 and 1 without `jax.distributed`).
    """

    resolution: str | tuple[int, int] | None = None
    max_pixels: int | None = None
    bucket_step: int = 128
    batch_size: int | None = None
    dtype: Any = None
    outputs: Sequence[str] = ("mask",)
    refine_radius: int = 90
    overwrite: bool = False
    workers: int | None = None
    max_image_pixels: int | None = DEFAULT_MAX_PIXELS
    devices: Sequence[Any] | None = None
    progress: bool = True
    compile_cache: bool | str | os.PathLike | None = None
    crop_refine: bool = False
    crop_margin: float = 0.1
    on_image: Callable[[Path], None] | None = None
    process_index: int | None = None
    process_count: int | None = None

    def __post_init__(self):
        if isinstance(self.outputs, str):
            raise ValueError(f"outputs must be a sequence of kinds from {KINDS}, got the string {self.outputs!r}")
        kinds = tuple(dict.fromkeys(self.outputs))
        bad = [k for k in kinds if k not in KINDS]
        if bad or not kinds:
            raise ValueError(f"outputs must be some of {KINDS}, got {list(self.outputs)}")
        object.__setattr__(self, "outputs", kinds)
        self._check_resolution()
        if self.batch_size is not None and (not _is_int(self.batch_size) or self.batch_size < 1):
            raise ValueError(f"batch_size must be at least 1 (or None: one per device), got {self.batch_size!r}")
        if not _is_int(self.refine_radius) or self.refine_radius < 1:
            raise ValueError(f"refine_radius must be a positive number of pixels, got {self.refine_radius!r}")
        if self.workers is not None and (not _is_int(self.workers) or self.workers < 0):
            raise ValueError(f"workers must be a positive number of threads (None or 0: the default), "
                             f"got {self.workers!r}")
        if not (self.compile_cache is None or isinstance(self.compile_cache, (bool, os.PathLike))
                or (isinstance(self.compile_cache, str) and self.compile_cache)):
            raise ValueError(f"compile_cache must be a folder, True (the default folder), False (off) or None "
                             f"(JAX's setting as it is), got {self.compile_cache!r}")
        if self.max_image_pixels is not None and (not _is_int(self.max_image_pixels) or self.max_image_pixels < 1):
            raise ValueError(f"max_image_pixels must be a positive pixel count or None (no limit), "
                             f"got {self.max_image_pixels!r}")
        if isinstance(self.crop_margin, bool) or not isinstance(self.crop_margin, (int, float, np.number)) \
                or not 0 <= self.crop_margin < float("inf"):
            raise ValueError(f"crop_margin must be a share of the box, 0 or more, got {self.crop_margin!r}")
        if self.on_image is not None and not callable(self.on_image):
            raise ValueError(f"on_image must be callable or None, got {type(self.on_image).__name__}")
        if self.process_count is not None and (not _is_int(self.process_count) or self.process_count < 1):
            raise ValueError(f"process_count must be a positive number of processes (None: jax.process_count()), "
                             f"got {self.process_count!r}")
        if self.process_index is not None and (not _is_int(self.process_index) or self.process_index < 0 or (
                self.process_count is not None and self.process_index >= self.process_count)):
            raise ValueError(f"process_index must be 0 or more, below process_count (None: jax.process_index()), "
                             f"got {self.process_index!r}")

    def _check_resolution(self) -> None:
        resolution = self.resolution
        if isinstance(resolution, str) and resolution == "auto":
            if not _is_int(self.bucket_step) or self.bucket_step < STEP or self.bucket_step % STEP:
                raise ValueError(f"bucket_step {self.bucket_step!r} must be a positive multiple of {STEP}")
            if self.max_pixels is not None and (not _is_int(self.max_pixels)
                                                or self.max_pixels < self.bucket_step ** 2):
                raise ValueError(f"max_pixels {self.max_pixels!r} is below one {self.bucket_step}x{self.bucket_step} "
                                 "bucket")
        elif isinstance(resolution, str):
            try:
                parse_size(resolution)
            except ValueError as e:
                raise ValueError(f"resolution {e}; or 'auto', or None for the checkpoint's") from None
        elif resolution is not None:
            try:
                h, w = (int(v) for v in resolution)
            except (TypeError, ValueError):
                raise ValueError(f"resolution must be None, 'auto', 'WxH' or (height, width), got {resolution!r}") \
                    from None
            if h < STEP or w < STEP or h % STEP or w % STEP:
                raise ValueError(f"resolution {w}x{h}: both sides must be positive multiples of {STEP}")


@dataclasses.dataclass
class _Prepared:
    index: int
    item: InputItem
    outputs: OutputPaths
    model_input: np.ndarray  # (h, w, 3) uint8 at the bucket size
    bucket: tuple[int, int]  # the model input size (height, width)
    size: tuple[int, int]  # original (height, width)
    rgb: np.ndarray | None  # original pixels, kept only for cut-outs and crop refinement
    alpha: np.ndarray | None


def _resolve_predictor(model, dtype, devices):
    if isinstance(model, Predictor):
        return model
    if isinstance(model, BiRefNet):
        return Predictor(model, devices=devices)
    spec = str(model)
    stamp = os.stat(spec).st_mtime_ns if os.path.exists(spec) else None  # a rewritten checkpoint is reloaded
    ids = None if devices is None else tuple(d.id for d in devices)
    return _cached_predictor(spec, stamp, None if dtype is None else np.dtype(dtype).name, ids)


@functools.lru_cache(maxsize=2)
def _cached_predictor(spec: str, stamp, dtype: str | None, device_ids):
    """Predictors by checkpoint, so that repeated `predict` calls on the same checkpoint reuse the
    weights and compiled programs (two kept: a model's weights can be large)."""
    devices = None if device_ids is None else [d for d in jax.local_devices() if d.id in device_ids]
    return load_predictor(spec, dtype=None if dtype is None else jax.numpy.dtype(dtype), devices=devices)


def size_policy(resolution, default: tuple[int, int], *, max_pixels: int | None = None,
                bucket_step: int = 128, dynamic_size: tuple[int, int] | None = None) -> SizePolicy:
    """`resolution`: None (the checkpoint's own), "auto", "WxH" or (height, width).

    `default` and `dynamic_size` are the checkpoint's (`cfg.resolution`, `cfg.dynamic_size`): a
    checkpoint trained at many sizes runs "auto" by default, and "auto" goes up to its largest
    training side squared (else to its resolution's pixel count) unless `max_pixels` says otherwise.
    """
    if resolution is None:
        if dynamic_size is None:
            return SizePolicy(fixed=tuple(default))
        resolution = "auto"
    if isinstance(resolution, str):
        if resolution == "auto":
            cap = dynamic_size[1] ** 2 if dynamic_size is not None else default[0] * default[1]
            return SizePolicy(max_pixels=max_pixels or cap, step=bucket_step)
        return SizePolicy(fixed=parse_size(resolution))
    return SizePolicy(fixed=tuple(int(v) for v in resolution))


# --------------------------------------------------------------------------------------------------
# The run stage


def prepare_image(index: int, item: InputItem, paths: OutputPaths, policy: SizePolicy, *,
                  max_image_pixels: int | None = DEFAULT_MAX_PIXELS, keep_rgb: bool = False,
                  keep_alpha: bool = False) -> _Prepared:
    """Decode one image and resize it to its bucket (in a reading thread)."""
    decoded = read_image(item.path, max_pixels=max_image_pixels)
    h, w = decoded.rgb.shape[:2]
    bucket = policy.bucket(w, h)
    small = resize_linear(decoded.rgb, bucket)
    return _Prepared(index, item, paths, small, bucket, (h, w), decoded.rgb if keep_rgb else None,
                     decoded.alpha if keep_alpha else None)


def run_images(images: Sequence[tuple[InputItem, OutputPaths]], predictor, policy: SizePolicy,
               summary: PredictSummary, *, batch: int, workers: int, window: int,
               max_image_pixels: int | None = DEFAULT_MAX_PIXELS, keep_rgb: bool = False, keep_alpha: bool = False,
               bar=None) -> Iterator[list[tuple[_Prepared, np.ndarray]]]:
    """The device stage: yields each batch's (image, probabilities at its bucket size) as they come
    back from the device.

    Images are decoded and resized in `workers` threads, at most `window` ahead; grouped by bucket
    and run `batch` at a time (`batch` a multiple of the predictor's device count; the last, short
    batch of a bucket is padded, not recompiled), one batch kept on the device while the previous
    one is handed over. An image that cannot be read, or a batch the device fails, is recorded in
    `summary.failed` (and ticks `bar`), never stopping the others; `summary.buckets` counts the
    images per bucket. Close the generator (e.g. `contextlib.closing`) if you stop early: that
    cancels the pending reads.
    """
    read_pool = ThreadPoolExecutor(workers, thread_name_prefix="birefnet-read")
    reads: collections.deque[tuple[InputItem, Future]] = collections.deque()
    pending: dict[tuple[int, int], list[_Prepared]] = collections.defaultdict(list)
    inflight: collections.deque[tuple[list[_Prepared], jax.Array]] = collections.deque()

    def fail(path: Path, reason: str) -> None:
        summary.failed.append((path, reason))
        if bar is not None:
            bar.update(1)

    def collect_oldest() -> list[tuple[_Prepared, np.ndarray]]:
        group, probs = inflight.popleft()
        try:
            host = np.asarray(probs)[..., 0]
        except Exception as e:  # a device error fails this batch, not the run
            for p in group:
                fail(p.item.path, f"prediction failed: {type(e).__name__}: {e}")
            return []
        return list(zip(group, host, strict=False))

    def dispatch(bucket: tuple[int, int]) -> None:
        group = pending.pop(bucket)
        stacked = np.stack([p.model_input for p in group])
        if len(group) < batch:  # the last, short batch is padded, not recompiled
            stacked = np.concatenate([stacked, np.zeros((batch - len(group), *stacked.shape[1:]), np.uint8)])
        summary.buckets[bucket] = summary.buckets.get(bucket, 0) + len(group)
        try:
            probs = predictor.run(stacked, probabilities=True)
        except Exception as e:
            for p in group:
                fail(p.item.path, f"prediction failed: {type(e).__name__}: {e}")
            return
        inflight.append((group, probs))

    try:
        queue = iter(enumerate(images))
        exhausted = False
        while True:
            while not exhausted and len(reads) < window:
                nxt = next(queue, None)
                if nxt is None:
                    exhausted = True
                    break
                index, (item, paths) = nxt
                reads.append((item, read_pool.submit(prepare_image, index, item, paths, policy,
                                                     max_image_pixels=max_image_pixels, keep_rgb=keep_rgb,
                                                     keep_alpha=keep_alpha)))
            if not reads:
                break
            item, fut = reads.popleft()
            try:
                prepared = fut.result()
            except Exception as e:
                fail(item.path, _reason(e))
                continue
            group = pending[prepared.bucket]
            group.append(prepared)
            if len(group) == batch:
                dispatch(prepared.bucket)
                if len(inflight) > 1:  # keep one batch on the device while the previous one is written
                    yield collect_oldest()
        for bucket in list(pending):
            dispatch(bucket)
            if len(inflight) > 1:
                yield collect_oldest()
        while inflight:
            yield collect_oldest()
    finally:
        for _, fut in reads:
            fut.cancel()
        read_pool.shutdown(wait=True, cancel_futures=True)


def _reason(e: BaseException) -> str:
    if isinstance(e, ImageReadError):
        return e.reason
    return f"{type(e).__name__}: {e}"


# --------------------------------------------------------------------------------------------------
# The write stage


def write_outputs(paths: OutputPaths, prob: np.ndarray, rgb: np.ndarray | None = None,
                  alpha: np.ndarray | None = None, refine_radius: int = 90) -> None:
    """Write one image's outputs from its probabilities at the image's size (each file atomically):
    "prob" as float32 .npy, "cutout" as RGBA PNG (needs the image's `rgb`, and its `alpha` if it has
    one), and the 8-bit "mask" last, so that a mask on disk means the image is done."""
    mask = mask_to_uint8(prob)
    if "prob" in paths.paths:
        write_npy(paths.paths["prob"], prob.astype(np.float32))
    if "cutout" in paths.paths:
        write_png(paths.paths["cutout"], _cutout(rgb, alpha, mask, refine_radius))
    if "mask" in paths.paths:  # last: a mask on disk means the image is done
        write_png(paths.paths["mask"], mask)


def finish_image(p: _Prepared, prob_small: np.ndarray, *, predictor, policy: SizePolicy, refine_radius: int = 90,
                 crop_refine: bool = False, crop_margin: float = 0.1) -> None:
    """One image's probabilities at its bucket size -> its files (in a writing thread): resized back
    to the image's size, predicted again on the object's box with `crop_refine`, written."""
    prob = resize_align_corners(prob_small, p.size)
    if crop_refine:
        prob = _crop_and_repredict(predictor, policy, p, prob, crop_margin)
    write_outputs(p.outputs, prob, p.rgb, p.alpha, refine_radius)


class ImageWriter:
    """The write stage: `finish(prepared, probabilities)` for each submitted image in `workers`
    threads, accounted in `summary` as it completes (done, then `on_image(path)`; a failed write is
    that image's failure), at most `window` images queued. Use as a context manager: leaving waits
    for the writes already started."""

    def __init__(self, finish: Callable[[_Prepared, np.ndarray], None], summary: PredictSummary, *, workers: int,
                 window: int, on_image: Callable[[Path], None] | None = None, bar=None):
        self.finish, self.summary, self.window, self.on_image, self.bar = finish, summary, window, on_image, bar
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="birefnet-write")
        self.writes: collections.deque[tuple[InputItem, Future]] = collections.deque()

    def submit(self, results: Sequence[tuple[_Prepared, np.ndarray]]) -> None:
        """Queue the writes of a batch's images; waits on the oldest while more than `window` are queued."""
        for p, prob_small in results:
            self.writes.append((p.item, self.pool.submit(self.finish, p, prob_small)))
        self.settle(limit=self.window)

    def settle(self, limit: int = 0) -> None:
        """Account for finished writes; wait on the oldest while more than `limit` are queued."""
        writes, summary = self.writes, self.summary
        while writes and (len(writes) > limit or writes[0][1].done()):
            item, fut = writes.popleft()
            try:
                fut.result()
                summary.done += 1
                if self.on_image is not None:
                    self.on_image(item.path)
            except Exception as e:  # a failed write (disk full, permissions, ...) is this image's failure
                summary.failed.append((item.path, f"{type(e).__name__}: {e}"))
            if self.bar is not None:
                self.bar.update(1)

    def __enter__(self) -> ImageWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=True)


# --------------------------------------------------------------------------------------------------
# predict


def predict(inputs: InputSpecs, model, output: str | os.PathLike, *, options: PredictOptions | None = None,
            **kwargs) -> PredictSummary:
    """Predict masks for files, folders (recursive), globs or list files, writing under `output`
    a tree that mirrors the inputs.

    model: a checkpoint (Orbax folder, `.pth`, `.safetensors`, `hf:<repo>`), a `Predictor` (its
      compiled programs are reused across calls) or a `BiRefNet`.
    options: a `PredictOptions`, or its fields as keyword arguments (`resolution`, `outputs`,
      `batch_size`, `overwrite`, `crop_refine`, ...; see `PredictOptions`), not both.

    Bad inputs never stop the batch: they are listed in the summary with the reason. Checked
    before any model is loaded: the inputs (inputs whose outputs would share a file name are
    refused with the list: see `birefnet_jax.inference.plan`), and that the output folder can be
    written (`plan.OutputFolderError`, a ValueError and an OSError).
    """
    if options is None:
        options = PredictOptions(**kwargs)
    elif kwargs:
        raise TypeError(f"pass options=PredictOptions(...) or keyword options, not both (got {sorted(kwargs)})")
    elif not isinstance(options, PredictOptions):
        raise TypeError(f"options must be a PredictOptions, got {type(options).__name__}")
    start = time.perf_counter()
    plan = plan_predictions(inputs, output, outputs=options.outputs, overwrite=options.overwrite,
                            process_index=jax.process_index() if options.process_index is None
                            else options.process_index,
                            process_count=jax.process_count() if options.process_count is None
                            else options.process_count)
    summary = PredictSummary(skipped=plan.skipped, failed=list(plan.failed))
    if not plan.images and not plan.videos:  # all done (or unusable): no model needed
        plan.remove_stale_temporaries()
        summary.wall_seconds = time.perf_counter() - start
        return summary
    plan.check_writable()  # before the (slow) load: a wrong output folder costs nothing
    with persistent_compile_cache(options.compile_cache) as summary.compile_cache:
        _run_plan(plan, model, summary, options)
    summary.wall_seconds = time.perf_counter() - start
    return summary


def _run_plan(plan: PredictPlan, model, summary: PredictSummary, options: PredictOptions) -> None:
    """Load, then the images and the videos of `plan`, timed and accounted in `summary`."""
    predictor = _resolve_predictor(model, options.dtype, options.devices)
    policy = size_policy(options.resolution, predictor.resolution, max_pixels=options.max_pixels,
                         bucket_step=options.bucket_step, dynamic_size=predictor.config.dynamic_size)
    batch = predictor.padded_batch(predictor.num_devices if options.batch_size is None else options.batch_size)
    compile_before = (predictor.compile_seconds, predictor.compile_count)

    def warm_seconds(since: float, compiled_before: float) -> float:
        return max(0.0, time.perf_counter() - since - (predictor.compile_seconds - compiled_before))

    plan.remove_stale_temporaries()  # left by a run that was killed, whatever it wrote
    bar = _progress(len(plan.images), options.progress)
    watch = _CompileWatch(bar, options.progress)
    try:
        with watch.watching(predictor):
            since, compiled = time.perf_counter(), predictor.compile_seconds
            predict_images(plan, predictor, policy, summary, options, batch=batch, bar=bar)
            summary.image_seconds = warm_seconds(since, compiled) if plan.images else 0.0
            if plan.videos:
                watch.bar = None  # the videos have their own bar
                since, compiled, done = time.perf_counter(), predictor.compile_seconds, summary.done
                predict_videos(plan.videos, predictor, policy, plan.output, summary, kinds=plan.kinds, batch=batch,
                               overwrite=options.overwrite, progress=options.progress,
                               refine_radius=options.refine_radius)
                summary.videos = summary.done - done
                summary.video_seconds = warm_seconds(since, compiled)
    finally:
        bar.close()
        summary.compile_seconds = predictor.compile_seconds - compile_before[0]
        summary.compile_count = predictor.compile_count - compile_before[1]
        summary.cache_loads = watch.cache_loads


def predict_images(plan: PredictPlan, predictor, policy: SizePolicy, summary: PredictSummary,
                   options: PredictOptions, *, batch: int, bar=None) -> None:
    """The run and write stages for the images of `plan`, accounted in `summary`."""
    workers = options.workers or min(8, (os.cpu_count() or 2) + 2)
    window = max(2 * batch, 2 * workers)
    keep_pixels = "cutout" in plan.kinds
    finish = functools.partial(finish_image, predictor=predictor, policy=policy, refine_radius=options.refine_radius,
                               crop_refine=options.crop_refine, crop_margin=options.crop_margin)
    with ImageWriter(finish, summary, workers=workers, window=window, on_image=options.on_image, bar=bar) as writer:
        batches = run_images(plan.images, predictor, policy, summary, batch=batch, workers=workers, window=window,
                             max_image_pixels=options.max_image_pixels,
                             keep_rgb=keep_pixels or options.crop_refine, keep_alpha=keep_pixels, bar=bar)
        with contextlib.closing(batches):
            for results in batches:
                writer.submit(results)
        writer.settle(limit=0)


def _cutout(rgb: np.ndarray, alpha: np.ndarray | None, mask: np.ndarray, radius: int) -> np.ndarray:
    """RGBA: colours from blur-fusion foreground estimation under the predicted mask; alpha is the
    mask, times the input's own alpha where it has one (transparent stays transparent)."""
    fg = refine_foreground_strips(np.ascontiguousarray(rgb), mask, radius)
    a = mask if alpha is None else ((mask.astype(np.uint16) * alpha + 127) // 255).astype(np.uint8)
    return np.concatenate([fg, a[..., None]], axis=-1)


def _crop_and_repredict(predictor, policy: SizePolicy, p: _Prepared, prob: np.ndarray, margin: float) -> np.ndarray:
    """Locate, then crop: the object's bounding box (mask > 0.5, widened by `margin` of its size)
    cut from the full-resolution image, predicted again at the model's size, pasted back."""
    ys, xs = np.nonzero(prob > 0.5)
    if ys.size == 0:
        return prob
    h, w = p.size
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    dy, dx = int((y1 - y0) * margin) + 1, int((x1 - x0) * margin) + 1
    y0, y1, x0, x1 = max(0, y0 - dy), min(h, y1 + dy), max(0, x0 - dx), min(w, x1 + dx)
    if (y1 - y0) * (x1 - x0) >= 0.9 * h * w:  # the object fills the image: nothing to gain
        return prob
    crop = np.ascontiguousarray(p.rgb[y0:y1, x0:x1])
    bucket = policy.bucket(x1 - x0, y1 - y0)
    batch = predictor.padded_batch(1)
    x = np.zeros((batch, *bucket, 3), np.uint8)
    x[0] = resize_linear(crop, bucket)
    crop_prob = np.asarray(predictor.run(x, probabilities=True))[0, ..., 0]
    out = prob.copy()
    out[y0:y1, x0:x1] = resize_align_corners(crop_prob, (y1 - y0, x1 - x0))
    return out


def _progress(total: int, enabled: bool):
    return tqdm(total=total, unit="img", desc="predict", disable=not enabled or total == 0, file=sys.stderr,
                dynamic_ncols=True, smoothing=0.1)


# --------------------------------------------------------------------------------------------------
# Compiling: the persistent cache, and what the user sees meanwhile


class CompileCacheWarning(UserWarning):
    """The persistent compile cache's folder cannot be used: the run goes on without it."""


_WARNED_CACHE_FOLDERS: set[str] = set()
_CACHE_HIT = "/jax/compilation_cache/cache_hits"


def default_compile_cache() -> Path:
    """The folder `compile_cache=True` means: JAX's own setting (`jax_compilation_cache_dir`, e.g.
    $JAX_COMPILATION_CACHE_DIR) if one is made, else `<cache_root()>/xla`, i.e.
    $BIREFNET_JAX_CACHE/xla or ~/.cache/birefnet-jax/xla."""
    configured = jax.config.jax_compilation_cache_dir
    return Path(configured) if configured else cache_root() / "xla"


def _cache_folder_problem(folder: Path) -> str | None:
    """Why `folder` cannot hold the cache (made if missing, and a file written and removed), or None."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".birefnet-probe-"):
            pass
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    return None


def _set_jax_cache(folder: str | None, min_seconds: float) -> None:
    from jax.experimental.compilation_cache import compilation_cache

    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_seconds)
    compilation_cache.reset_cache()  # JAX opens its cache once: opened anew with this folder (or none)


@contextlib.contextmanager
def persistent_compile_cache(setting: bool | str | os.PathLike | None) -> Iterator[Path | None]:
    """JAX's persistent compilation cache as `setting` says (see `PredictOptions.compile_cache`) for
    the block, and as it was after it; yields the folder in use, or None.

    JAX's cache is process-wide, so this changes it for every thread while the block runs. Every
    program compiled in the block is cached, however quick (`jax_persistent_cache_min_compile_time_secs`
    0: ours take seconds, but on a fast device a small size can take less than JAX's default of one).
    A folder that cannot be written (or made) warns once per folder and process
    (`CompileCacheWarning`), and the block runs without a cache.
    """
    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    if setting is None:
        yield Path(before[0]) if before[0] and jax.config.jax_enable_compilation_cache else None
        return
    folder = None
    if setting is not False and jax.config.jax_enable_compilation_cache:  # (JAX's own switch, off, wins)
        folder = default_compile_cache() if setting is True else Path(setting).expanduser()
        problem = _cache_folder_problem(folder)
        if problem is not None:
            if str(folder) not in _WARNED_CACHE_FOLDERS:
                _WARNED_CACHE_FOLDERS.add(str(folder))
                warnings.warn(f"the compile cache {folder} cannot be used ({problem}); going on without it: "
                              "programs are compiled anew in each run (another folder: --compile-cache DIR, "
                              "compile_cache=DIR; off: --no-compile-cache, compile_cache=False)",
                              CompileCacheWarning, stacklevel=4)
            folder = None
    wanted = (None if folder is None else str(folder), 0.0 if folder is not None else before[1])
    if wanted == before:
        yield folder
        return
    _set_jax_cache(*wanted)
    try:
        yield folder
    finally:
        _set_jax_cache(*before)


class _CompileWatch:
    """While a predictor compiles: its program named on the progress bar (a line on stderr when no
    bar is shown but progress is on, e.g. for videos; a log record at INFO when progress is off),
    and the compile's time taken out of the bar's clock, as tqdm's `unpause()` does, so that its rate
    and estimate come from warm batches only. Counts the programs found in the persistent cache."""

    def __init__(self, bar, progress: bool):
        self.bar, self.progress = bar, progress
        self.cache_loads = 0
        self._compiling = False

    @contextlib.contextmanager
    def watching(self, predictor) -> Iterator[None]:
        watch = getattr(predictor, "watch_compiles", None)
        with contextlib.nullcontext() if watch is None else watch(self):
            jax.monitoring.register_event_listener(self._on_event)
            try:
                yield
            finally:
                jax.monitoring.unregister_event_listener(self._on_event)

    def _on_event(self, event: str, **_) -> None:
        if event == _CACHE_HIT and self._compiling:
            self.cache_loads += 1

    def __call__(self, what: str, seconds: float | None) -> None:
        bar = self.bar if self.bar is not None and not self.bar.disable else None
        self._compiling = seconds is None
        if seconds is None:
            note = f"compiling {what} (first use of this size)"
            if bar is not None:
                bar.set_postfix_str(note)
            elif self.progress:
                tqdm.write(f"{note} ...", file=sys.stderr)
            else:
                log.info("%s ...", note)
            return
        if bar is not None:
            bar.start_t += seconds  # the compile is no part of the rate or the estimate
            bar.last_print_t += seconds
            bar.set_postfix_str("")
        log.info("compiled %s in %.1f s", what, seconds)
