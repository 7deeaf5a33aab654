"""Compiled prediction on arrays: a jitted function over a live model, and `Predictor`, which holds
its own weights and one compiled program per batch shape, sharded over the local devices."""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np
from flax import nnx

from birefnet_jax.config import BiRefNetConfig
from birefnet_jax.loading import load
from birefnet_jax.model import BiRefNet, eval_forward


def check_batch(images, layout: str = "NHWC") -> tuple[int, int, int]:
    """Validate a batch before it reaches the compiled program; returns (batch, height, width)."""
    if isinstance(images, (list, tuple)):
        raise TypeError(f"expected one array of images, got a {type(images).__name__}; stack same-sized images "
                        "with np.stack (or use birefnet_jax.predict for files of mixed sizes)")
    if not hasattr(images, "shape") or not hasattr(images, "dtype"):
        raise TypeError(f"expected an array of images, got {type(images).__name__}")
    shape = tuple(images.shape)
    channels_axis = -1 if layout == "NHWC" else 1
    if len(shape) == 3 and shape[channels_axis] == 3:
        raise ValueError(f"expected a batch of images ({layout}), got one image of shape {shape}; add a batch "
                         "axis: images[None]")
    other_axis = 1 if layout == "NHWC" else -1
    if len(shape) == 4 and shape[channels_axis] != 3 and shape[other_axis] == 3:
        other = "NCHW" if layout == "NHWC" else "NHWC"
        fix = "x.transpose(0, 3, 1, 2)" if layout == "NCHW" else "x.transpose(0, 2, 3, 1)"
        raise ValueError(f"expected {layout} images, got shape {shape}, which looks like {other}; convert with {fix}")
    if len(shape) != 4 or shape[channels_axis] != 3:
        expected = "(B, H, W, 3)" if layout == "NHWC" else "(B, 3, H, W)"
        raise ValueError(f"expected a batch of RGB images {expected} ({layout}), got shape {shape}")
    if shape[0] == 0:
        raise ValueError("the batch holds no images (batch size 0)")
    b, h, w = (shape[0], shape[1], shape[2]) if layout == "NHWC" else (shape[0], shape[2], shape[3])
    if h % 32 or w % 32:
        raise ValueError(f"image size {h}x{w} is not a multiple of 32; resize to e.g. {-(-h // 32) * 32}x"
                         f"{-(-w // 32) * 32} (birefnet_jax.predict does this for files)")
    return b, h, w


# Normalised images lie within about -2.2..2.7 (ImageNet mean and std); 0..255 pixel values passed as
# floats reach far beyond this.
_NORMALISED_LIMIT = 10.0


def check_values(images) -> np.dtype:
    """Validate the batch's element type and, for floats, that they are normalised; returns the
    dtype the program takes (uint8, or float32: other floats are cast, so that float64 input, say,
    compiles no second program). Raises with the fix in the message."""
    dtype = np.dtype(images.dtype)
    if dtype == np.uint8:
        return dtype
    if not jax.numpy.issubdtype(dtype, jax.numpy.floating):  # (numpy's own test misses bfloat16)
        fix = ("images.astype(np.uint8) if they hold 0..255 pixel values" if np.issubdtype(dtype, np.integer)
               else "uint8 RGB or normalised floats (birefnet_jax.io.images.normalize)")
        raise TypeError(f"images must be uint8 RGB or normalised floats, got dtype {dtype}; convert: {fix}")
    if isinstance(images, jax.core.Tracer) or (isinstance(images, jax.Array) and not images.is_fully_addressable):
        return np.dtype(np.float32)  # traced inside the caller's jit, or spread over hosts: values not at hand
    if isinstance(images, jax.Array):
        peak = float(jax.numpy.max(jax.numpy.abs(images)))
    else:
        peak = float(np.max(np.abs(np.asarray(images)))) if np.size(images) else 0.0
    if peak > _NORMALISED_LIMIT:
        raise ValueError(f"float images must be normalised (ImageNet mean and std: values within about -2.2..2.7), "
                         f"but these reach {peak:.4g}, which looks like 0..255 pixel values: pass them as uint8 "
                         "(images.astype(np.uint8)), or normalise them: birefnet_jax.io.images.normalize(images / 255)")
    return np.dtype(np.float32)


def make_predict_fn(model: BiRefNet, *, layout: str = "NHWC") -> Callable[[jax.Array], jax.Array]:
    """A jitted function from images to logits that always uses the model's current weights.

    Takes a batch (B, H, W, 3) of normalised float images (see `normalize`) or of uint8 RGB
    (normalised inside the program), H and W multiples of 32; floats far outside the normalised
    range (0..255 pixel values) and other integer types are refused. `layout='NCHW'` takes and returns
    PyTorch's layout. The model is not switched to eval mode or otherwise changed: the forward
    runs on a copy, and later changes to the model's weights are seen by the next call.
    """
    if layout not in ("NHWC", "NCHW"):
        raise ValueError(f"layout must be 'NHWC' or 'NCHW', got {layout!r}")
    programs: list[tuple] = []  # (graphdef, jitted forward); graph defs compare equal but do not hash

    def predict(images):
        check_batch(images, layout)
        dtype = check_values(images)
        if images.dtype != dtype:
            images = images.astype(dtype)
        graphdef, state = nnx.split(model)
        forward = next((fn for g, fn in programs if g == graphdef), None)
        if forward is None:
            forward = jax.jit(functools.partial(eval_forward, graphdef, layout=layout),
                              static_argnames=("uint8", "probabilities"))
            programs.append((graphdef, forward))
        return forward(state, images, uint8=images.dtype == np.uint8, probabilities=False)

    return predict


class Predictor:
    """A model's weights, compiled programs and resolution, for repeated prediction.

    The predictor holds its own copy of the weights (later changes to the model it was built
    from are not seen: build a new predictor). Batches are sharded over `devices` (default: all
    local devices) along the batch axis with the weights replicated; a batch size that is not a
    multiple of the device count is padded up to one. One program is compiled per
    (batch, height, width, input dtype, output), and kept: `compile_count` and
    `compile_seconds` say how many and how long (a program JAX's persistent compile cache
    holds is loaded from it, which counts as a compilation too, a short one);
    `watch_compiles` shows each while it compiles.
    """

    def __init__(self, model: BiRefNet, *, devices: Sequence[jax.Device] | None = None):
        self.config: BiRefNetConfig = model.cfg
        self.dtype = model.dtype
        self.resolution: tuple[int, int] = tuple(model.cfg.resolution)
        graphdef, state = nnx.split(model)
        self.devices = list(devices) if devices is not None else jax.local_devices()
        self.mesh = jax.sharding.Mesh(np.array(self.devices), ("data",))
        self._replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        self._batched = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("data"))
        self.graphdef = graphdef
        self.state = jax.device_put(state, self._replicated)
        self._programs: dict[tuple, jax.stages.Compiled] = {}
        self.compile_seconds = 0.0
        self._lock = threading.Lock()
        self._watchers: list[Callable[[str, float | None], None]] = []

    @property
    def compile_count(self) -> int:
        return len(self._programs)

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    def _program(self, shape: tuple[int, ...], dtype, probabilities: bool):
        key = (shape, np.dtype(dtype).name, probabilities)
        with self._lock:  # writer threads may ask too (crop refinement)
            return self._compile(key, shape, dtype, probabilities)

    def _compile(self, key, shape, dtype, probabilities):
        if key not in self._programs:
            fn = jax.jit(functools.partial(eval_forward, self.graphdef, uint8=np.dtype(dtype) == np.uint8,
                                           probabilities=probabilities, layout="NHWC"),
                         in_shardings=(self._replicated, self._batched), out_shardings=self._batched)
            what = self.describe(shape)
            for watcher in tuple(self._watchers):
                watcher(what, None)
            start = time.perf_counter()
            try:
                self._programs[key] = fn.lower(self.state, jax.ShapeDtypeStruct(shape, dtype)).compile()
            finally:
                seconds = time.perf_counter() - start
                self.compile_seconds += seconds
                for watcher in tuple(self._watchers):
                    watcher(what, seconds)
        return self._programs[key]

    def describe(self, shape: tuple[int, ...]) -> str:
        """A program's shape as the command line writes sizes: "1024x768 batch 2 float32" (WxH, the
        compute dtype)."""
        b, h, w = shape[:3]
        dtype = "float32" if self.dtype is None else np.dtype(self.dtype).name
        return f"{w}x{h} batch {b} {dtype}"

    @contextlib.contextmanager
    def watch_compiles(self, watcher: Callable[[str, float | None], None]) -> Iterator[None]:
        """Within the block, `watcher(what, None)` is called when this predictor starts compiling a
        program and `watcher(what, seconds)` when it is done (also when it failed), `what` naming the
        program (see `describe`): for progress displays. Called in the compiling thread, with the
        predictor's lock held: keep it short, and do not run the predictor from it."""
        self._watchers.append(watcher)
        try:
            yield
        finally:
            self._watchers.remove(watcher)

    def padded_batch(self, batch: int) -> int:
        """The batch size a program runs at: the next multiple of the device count."""
        return -(-batch // self.num_devices) * self.num_devices

    def run(self, images, *, probabilities: bool = False) -> jax.Array:
        """Logits (B, H, W, 1) float32, or probabilities with `probabilities=True`; `images` are
        uint8 RGB or normalised float (B, H, W, 3), H and W multiples of 32 (floats are taken as
        float32; floats far outside the normalised range, i.e. 0..255 pixel values, are refused).
        A batch that does not divide over the devices is padded (and the padding dropped).
        Asynchronous: the result is a device array."""
        b, _, _ = check_batch(images)
        dtype = check_values(images)
        if images.dtype != dtype:  # float64, bfloat16, ...: one float32 program serves them all
            images = images.astype(dtype)
        padded = self.padded_batch(b)
        if padded != b:
            images = np.concatenate([np.asarray(images), np.zeros((padded - b, *images.shape[1:]), dtype)])
        program = self._program(tuple(images.shape), dtype, probabilities)
        out = program(self.state, jax.device_put(images, self._batched))
        return out[:b] if padded != b else out

    def __call__(self, images) -> jax.Array:
        return self.run(images)


def load_predictor(path: str | os.PathLike, *, dtype=None, devices=None, **overrides) -> Predictor:
    return Predictor(load(path, dtype=dtype, **overrides), devices=devices)
