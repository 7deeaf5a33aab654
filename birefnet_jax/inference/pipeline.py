"""Batch inference over files: decode and resize in threads, batch by shape bucket, run the compiled
program on all local devices, and write masks, cut-outs and probabilities in threads, so the device
does not wait on the disk and the disk does not wait on the device.

Memory stays bounded whatever the folder size: at most a window of decoded images is held (reads
are submitted lazily, a few batches ahead), plus one partly filled batch per bucket.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from birefnet_jax.inference.buckets import SizePolicy, parse_size
from birefnet_jax.inference.inputs import InputItem, list_inputs
from birefnet_jax.inference.outputs import OutputPaths, plan_outputs, remove_stale_temporaries
from birefnet_jax.io.images import DEFAULT_MAX_PIXELS, VIDEO_EXTENSIONS, read_image
from birefnet_jax.io.masks import mask_to_uint8, write_npy, write_png
from birefnet_jax.io.resize import resize_align_corners, resize_linear


@dataclasses.dataclass
class PredictSummary:
    """What a `predict` call did. `failed` holds (path, reason) for every input that produced nothing."""

    done: int = 0
    skipped: int = 0
    failed: list[tuple[Path, str]] = dataclasses.field(default_factory=list)
    wall_seconds: float = 0.0
    compile_seconds: float = 0.0
    compile_count: int = 0
    buckets: dict[tuple[int, int], int] = dataclasses.field(default_factory=dict)
    frames: int = 0  # video frames predicted

    @property
    def images_per_second(self) -> float:
        return self.done / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    def report(self) -> str:
        lines = [f"done {self.done}, skipped {self.skipped} (outputs exist), failed {len(self.failed)}; "
                 f"{self.wall_seconds:.1f} s, {self.images_per_second:.2f} images/s, "
                 f"{self.compile_count} program(s) compiled in {self.compile_seconds:.1f} s"]
        if self.frames:
            lines.append(f"video frames: {self.frames}")
        if self.buckets:
            sizes = ", ".join(f"{w}x{h}: {n}" for (h, w), n in sorted(self.buckets.items()))
            lines.append(f"input sizes (WxH: images): {sizes}")
        for path, reason in self.failed:
            lines.append(f"FAILED {path}: {reason}")
        return "\n".join(lines)


@dataclasses.dataclass
class _Prepared:
    index: int
    item: InputItem
    outputs: OutputPaths
    model_input: np.ndarray  # (h, w, 3) uint8 at the bucket size
    bucket: tuple[int, int]  # the model input size (height, width)
    size: tuple[int, int]  # original (height, width)
    rgb: np.ndarray | None  # original pixels, kept only for cut-outs
    alpha: np.ndarray | None


def _resolve_predictor(model, dtype, devices):
    from birefnet_jax.inference.predictor import Predictor
    from birefnet_jax.model import BiRefNet

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
    import jax

    from birefnet_jax.inference.predictor import load_predictor

    devices = None if device_ids is None else [d for d in jax.local_devices() if d.id in device_ids]
    return load_predictor(spec, dtype=None if dtype is None else jax.numpy.dtype(dtype), devices=devices)


def size_policy(resolution, default: tuple[int, int], *, max_pixels: int | None = None,
                bucket_step: int = 128) -> SizePolicy:
    """`resolution`: None (the checkpoint's own), "auto", "WxH" or (height, width)."""
    if resolution is None:
        return SizePolicy(fixed=tuple(default))
    if isinstance(resolution, str):
        if resolution == "auto":
            return SizePolicy(max_pixels=max_pixels or default[0] * default[1], step=bucket_step)
        try:
            return SizePolicy(fixed=parse_size(resolution))
        except argparse.ArgumentTypeError as e:  # the command line's error type; a ValueError here
            raise ValueError(str(e)) from None
    return SizePolicy(fixed=tuple(int(v) for v in resolution))


def predict(inputs: str | os.PathLike | Sequence[str | os.PathLike], model, output: str | os.PathLike, *,
            resolution=None, max_pixels: int | None = None, bucket_step: int = 128, batch_size: int | None = None,
            dtype=None, outputs: Sequence[str] = ("mask",), refine_radius: int = 90, overwrite: bool = False,
            workers: int | None = None, max_image_pixels: int | None = DEFAULT_MAX_PIXELS, devices=None,
            progress: bool = True, crop_refine: bool = False, crop_margin: float = 0.1,
            on_image: Callable[[Path], None] | None = None) -> PredictSummary:
    """Predict masks for files, folders (recursive), globs or list files, writing under `output`
    a tree that mirrors the inputs.

    model: a checkpoint (Orbax folder, `.pth`, `.safetensors`, `hf:<repo>`), a `Predictor` (its
      compiled programs are reused across calls) or a `BiRefNet`.
    resolution: None for the checkpoint's own, "WxH", (height, width), or "auto" (each image's own
      size up to `max_pixels`, default the checkpoint's pixel count, in buckets of `bucket_step`).
    outputs: any of "mask" (8-bit PNG at the image's size), "cutout" (RGBA PNG, foreground colours
      refined by blur fusion with `refine_radius`), "prob" (float32 .npy at the image's size).
    overwrite: redo images whose outputs exist (by default they are skipped, so an interrupted run
      resumes where it stopped).
    crop_refine: predict once, then again on the object's bounding box (plus `crop_margin`) cut from
      the full-resolution image, and paste that prediction back: more detail for images far larger
      than the model's resolution.
    on_image: called with each input path once its outputs are written (e.g. for a progress hook).

    Bad inputs never stop the batch: they are listed in the summary with the reason.
    """
    import jax

    start = time.perf_counter()
    specs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not specs:
        raise ValueError("no inputs given")
    items = list_inputs(specs)
    if not items:
        raise ValueError(f"no images found in {', '.join(map(str, specs))}")
    kinds = tuple(dict.fromkeys(outputs))
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"--output {output} is a file; give a folder")
    out_root = output.resolve()
    items = [it for it in items if out_root not in it.path.resolve().parents]  # our own outputs are no inputs
    if not items:
        raise ValueError(f"the inputs hold nothing outside the output folder {output}")
    predictor = _resolve_predictor(model, dtype, devices)
    policy = size_policy(resolution, predictor.resolution, max_pixels=max_pixels, bucket_step=bucket_step)
    batch = predictor.num_devices if batch_size is None else batch_size
    if batch < 1:
        raise ValueError(f"batch size must be at least 1, got {batch}")
    batch = predictor.padded_batch(batch)
    workers = workers or min(8, (os.cpu_count() or 2) + 2)
    compile_before = (predictor.compile_seconds, predictor.compile_count)

    summary = PredictSummary()
    videos = [it for it in items if it.path.suffix.lower() in VIDEO_EXTENSIONS]
    images = [it for it in items if it.path.suffix.lower() not in VIDEO_EXTENSIONS]
    plans = plan_outputs([it.rel for it in images], output, kinds)
    todo = []
    for item, plan in zip(images, plans, strict=True):
        if not overwrite and not plan.missing():
            summary.skipped += 1
        else:
            todo.append((item, plan))

    remove_stale_temporaries([plan for _, plan in todo])  # left by a run that was killed
    bar = _progress(len(todo), progress)
    keep_pixels = "cutout" in kinds

    def prepare(index: int, item: InputItem, plan: OutputPaths) -> _Prepared:
        decoded = read_image(item.path, max_pixels=max_image_pixels)
        h, w = decoded.rgb.shape[:2]
        bucket = policy.bucket(w, h)
        small = resize_linear(decoded.rgb, bucket)
        return _Prepared(index, item, plan, small, bucket, (h, w), decoded.rgb if keep_pixels or crop_refine else None,
                         decoded.alpha if keep_pixels else None)

    def finish(p: _Prepared, prob_small: np.ndarray) -> None:
        prob = resize_align_corners(prob_small, p.size)
        if crop_refine:
            prob = _crop_and_repredict(predictor, policy, p, prob, crop_margin)
        mask = mask_to_uint8(prob)
        if "prob" in p.outputs.paths:
            write_npy(p.outputs.paths["prob"], prob.astype(np.float32))
        if "cutout" in p.outputs.paths:
            write_png(p.outputs.paths["cutout"], _cutout(p.rgb, p.alpha, mask, refine_radius))
        if "mask" in p.outputs.paths:  # last: a mask on disk means the image is done
            write_png(p.outputs.paths["mask"], mask)

    read_pool = ThreadPoolExecutor(workers, thread_name_prefix="birefnet-read")
    write_pool = ThreadPoolExecutor(workers, thread_name_prefix="birefnet-write")
    reads: collections.deque[tuple[InputItem, Future]] = collections.deque()
    writes: collections.deque[tuple[InputItem, Future]] = collections.deque()
    pending: dict[tuple[int, int], list[_Prepared]] = collections.defaultdict(list)
    inflight: collections.deque[tuple[list[_Prepared], jax.Array]] = collections.deque()
    window = max(2 * batch, 2 * workers)

    def settle_write(limit: int) -> None:
        """Account for finished writes; wait on the oldest while more than `limit` are queued."""
        while writes and (len(writes) > limit or writes[0][1].done()):
            item, fut = writes.popleft()
            try:
                fut.result()
                summary.done += 1
                if on_image is not None:
                    on_image(item.path)
            except Exception as e:  # a failed write (disk full, permissions, ...) is this image's failure
                summary.failed.append((item.path, f"{type(e).__name__}: {e}"))
            bar.update(1)

    def collect_oldest() -> None:
        group, probs = inflight.popleft()
        try:
            host = np.asarray(probs)[..., 0]
        except Exception as e:  # a device error fails this batch, not the run
            for p in group:
                summary.failed.append((p.item.path, f"prediction failed: {type(e).__name__}: {e}"))
                bar.update(1)
            return
        for p, prob_small in zip(group, host, strict=False):
            writes.append((p.item, write_pool.submit(finish, p, prob_small)))
        settle_write(limit=window)

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
                summary.failed.append((p.item.path, f"prediction failed: {type(e).__name__}: {e}"))
                bar.update(1)
            return
        inflight.append((group, probs))
        if len(inflight) > 1:  # keep one batch on the device while the previous one is written
            collect_oldest()

    try:
        queue = iter(enumerate(todo))
        exhausted = False
        while True:
            while not exhausted and len(reads) < window:
                nxt = next(queue, None)
                if nxt is None:
                    exhausted = True
                    break
                index, (item, plan) = nxt
                reads.append((item, read_pool.submit(prepare, index, item, plan)))
            if not reads:
                break
            item, fut = reads.popleft()
            try:
                prepared = fut.result()
            except Exception as e:
                summary.failed.append((item.path, _reason(e)))
                bar.update(1)
                continue
            group = pending[prepared.bucket]
            group.append(prepared)
            if len(group) == batch:
                dispatch(prepared.bucket)
        for bucket in list(pending):
            dispatch(bucket)
        while inflight:
            collect_oldest()
        settle_write(limit=0)
        if videos:
            from birefnet_jax.inference.video import predict_videos

            predict_videos(videos, predictor, policy, output, summary, kinds=kinds, batch=batch,
                           overwrite=overwrite, progress=progress, refine_radius=refine_radius)
    finally:
        for fut in (f for _, f in reads):
            fut.cancel()
        read_pool.shutdown(wait=True, cancel_futures=True)
        write_pool.shutdown(wait=True)
        bar.close()
    summary.wall_seconds = time.perf_counter() - start
    summary.compile_seconds = predictor.compile_seconds - compile_before[0]
    summary.compile_count = predictor.compile_count - compile_before[1]
    return summary


def _reason(e: BaseException) -> str:
    from birefnet_jax.io.images import ImageReadError

    if isinstance(e, ImageReadError):
        return e.reason
    return f"{type(e).__name__}: {e}"


def _cutout(rgb: np.ndarray, alpha: np.ndarray | None, mask: np.ndarray, radius: int) -> np.ndarray:
    """RGBA: colours from blur-fusion foreground estimation under the predicted mask; alpha is the
    mask, times the input's own alpha where it has one (transparent stays transparent)."""
    from birefnet_jax.inference.refine import refine_foreground_strips

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
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc="predict", disable=not enabled or total == 0, file=sys.stderr,
                dynamic_ncols=True, smoothing=0.1)
