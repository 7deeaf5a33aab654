"""The front door: load any checkpoint, normalise images, and predict with a compiled program."""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from birefnet_jax.checkpoint import CheckpointError, is_orbax_checkpoint, load_model, read_config
from birefnet_jax.config import BiRefNetConfig
from birefnet_jax.convert import infer_config, load_state_dict_into, read_state_dict
from birefnet_jax.convert.io import HUB_PREFIX
from birefnet_jax.model import BiRefNet, abstract_model, materialize_rng_state

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)

# Overrides that change no parameter, so they may be applied to a converted checkpoint.
_RUNTIME_OVERRIDES = ("resolution", "dropout", "mul_scl_ipt", "num_heads")


def model_from_state_dict(state_dict: dict[str, np.ndarray], config: BiRefNetConfig | None = None, *,
                          dtype=None, seed: int = 0, **overrides) -> BiRefNet:
    """Build the model a state dict describes (or `config`) and fill it strictly."""
    if config is not None and overrides:
        config = _apply_overrides(config, overrides, what="the given config")
    cfg = config if config is not None else infer_config(state_dict, **overrides)
    model = abstract_model(cfg, dtype=dtype)
    load_state_dict_into(model, state_dict)
    return materialize_rng_state(model, seed)


def _apply_overrides(cfg: BiRefNetConfig, overrides: dict, *, what: str) -> BiRefNetConfig:
    """Apply the overrides that leave the parameters unchanged; reject the rest with the reason."""
    fixed = sorted(set(overrides) - set(_RUNTIME_OVERRIDES))
    if fixed:
        raise ValueError(f"cannot override {', '.join(fixed)} of {what}: the weights fix them. Only "
                         f"{', '.join(_RUNTIME_OVERRIDES)} can change after conversion")
    changes = dict(overrides)
    msi = changes.get("mul_scl_ipt")
    if msi is not None and (msi == "cat") != (cfg.mul_scl_ipt == "cat"):
        raise ValueError(f"mul_scl_ipt={msi!r} contradicts {what} ({cfg.mul_scl_ipt!r}): 'cat' doubles the decoder "
                         "widths, so it is fixed by the weights; only '' and 'add' can be exchanged")
    heads = changes.pop("num_heads", None)
    if heads is not None:
        if cfg.backbone.kind != "pvt_v2":
            raise ValueError(f"num_heads only applies to PVT v2 backbones, not {cfg.backbone.kind}")
        heads = tuple(int(h) for h in heads)
        dims = cfg.backbone.embed_dims
        if len(heads) != len(dims) or any(h < 1 or d % h for d, h in zip(dims, heads, strict=False)):
            raise ValueError(f"num_heads={heads} must give one divisor per stage of the widths {dims}")
        changes["backbone"] = dataclasses.replace(cfg.backbone, num_heads=heads)
    if "resolution" in changes:
        changes["resolution"] = tuple(changes["resolution"])
    return cfg.replace(**changes)


def load(path: str | os.PathLike, config: BiRefNetConfig | None = None, *, dtype=None,
         **overrides) -> BiRefNet:
    """Load an original PyTorch checkpoint (`.pth`, `.safetensors`, `hf:<repo>`) or a converted
    Orbax checkpoint folder, in eval mode.

    `dtype` (e.g. `jnp.bfloat16`) sets the compute dtype; parameters stay float32. `overrides`
    set what the weights cannot tell (`mul_scl_ipt` '' or 'add', PVT `num_heads`, `resolution`,
    `dropout`); on an Orbax checkpoint they replace the stored values, and overriding anything the
    weights fix is an error.
    """
    spec = str(path)
    if spec.startswith(HUB_PREFIX) and config is None and not overrides:
        return _load_hub_cached(spec, dtype)
    if not spec.startswith(HUB_PREFIX):
        path = Path(path)
        if is_orbax_checkpoint(path):
            cfg = config if config is not None else read_config(path)[0]
            if overrides:
                cfg = _apply_overrides(cfg, overrides, what=f"the checkpoint {path}")
            return load_model(path, config=cfg, dtype=dtype)
        if path.is_dir():
            load_model(path)  # raises the precise CheckpointError (not ours, incomplete, ...)
        if not path.exists():
            raise CheckpointError(f"{path}: no such file or folder")
    return model_from_state_dict(read_state_dict(path), config, dtype=dtype, **overrides)


def _load_hub_cached(spec: str, dtype) -> BiRefNet:
    """`hf:` checkpoints are downloaded and converted once, then loaded from the Orbax copy kept
    under the user's cache folder (`birefnet_jax.convert.io.cache_root`)."""
    from birefnet_jax.checkpoint import save_model
    from birefnet_jax.convert.io import cache_root, parse_hub_spec

    repo, filename = parse_hub_spec(spec)
    cached = cache_root() / "hf" / f"{repo.replace('/', '--')}--{filename.replace('/', '--')}"
    if is_orbax_checkpoint(cached):
        return load_model(cached, dtype=dtype)
    model = model_from_state_dict(read_state_dict(spec))
    save_model(model, cached, overwrite=cached.exists(), extra={"source": spec})
    return load_model(cached, dtype=dtype)


def normalize(images: np.ndarray) -> np.ndarray:
    """RGB images (..., H, W, 3) -> float32 normalised with the ImageNet mean and std, as the
    original's loader does.

    Integer images are scaled by their type's maximum (uint8: 255, uint16: 65535); float images
    must already be in [0, 1]. Anything else (e.g. images normalised already, or floats in
    [0, 255]) is refused rather than normalised twice.
    """
    images = np.asarray(images)
    if images.shape[-1:] != (3,):
        raise ValueError(f"expected RGB images with 3 channels last, got shape {images.shape}")
    if np.issubdtype(images.dtype, np.integer):
        scaled = images.astype(np.float32) / np.float32(np.iinfo(images.dtype).max)
    elif np.issubdtype(images.dtype, np.floating):
        lo, hi = (float(images.min()), float(images.max())) if images.size else (0.0, 1.0)
        if lo < 0 or hi > 1:
            raise ValueError(f"float images must be in [0, 1] (got values in [{lo:.3g}, {hi:.3g}]); already "
                             "normalised input needs no normalize(), and 0..255 floats should be divided by 255")
        scaled = images.astype(np.float32)
    else:
        raise ValueError(f"cannot normalise images of dtype {images.dtype}")
    return (scaled - IMAGENET_MEAN) / IMAGENET_STD


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


def _forward(graphdef, state, images, *, uint8: bool, probabilities: bool, layout: str):
    """The eval-mode forward on a merged copy of the model: the caller's module is never touched."""
    if layout == "NCHW":
        images = jnp.transpose(images, (0, 2, 3, 1))
    if uint8:
        images = (images.astype(jnp.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    model = nnx.merge(graphdef, state)
    model.eval()
    out = model(images)
    if probabilities:
        out = jax.nn.sigmoid(out)
    return jnp.transpose(out, (0, 3, 1, 2)) if layout == "NCHW" else out


def make_predict_fn(model: BiRefNet, *, layout: str = "NHWC") -> Callable[[jax.Array], jax.Array]:
    """A jitted function from images to logits that always uses the model's current weights.

    Takes a batch (B, H, W, 3) of normalised float images (see `normalize`) or of uint8 RGB
    (normalised inside the program), H and W multiples of 32. `layout='NCHW'` takes and returns
    PyTorch's layout. The model is not switched to eval mode or otherwise changed: the forward
    runs on a copy, and later changes to the model's weights are seen by the next call.
    """
    if layout not in ("NHWC", "NCHW"):
        raise ValueError(f"layout must be 'NHWC' or 'NCHW', got {layout!r}")
    programs: list[tuple] = []  # (graphdef, jitted forward); graph defs compare equal but do not hash

    def predict(images):
        check_batch(images, layout)
        graphdef, state = nnx.split(model)
        forward = next((fn for g, fn in programs if g == graphdef), None)
        if forward is None:
            forward = jax.jit(functools.partial(_forward, graphdef, layout=layout),
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
    `compile_seconds` say how many and how long.
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
            fn = jax.jit(functools.partial(_forward, self.graphdef, uint8=np.dtype(dtype) == np.uint8,
                                           probabilities=probabilities, layout="NHWC"),
                         in_shardings=(self._replicated, self._batched), out_shardings=self._batched)
            start = time.perf_counter()
            self._programs[key] = fn.lower(self.state, jax.ShapeDtypeStruct(shape, dtype)).compile()
            self.compile_seconds += time.perf_counter() - start
        return self._programs[key]

    def padded_batch(self, batch: int) -> int:
        """The batch size a program runs at: the next multiple of the device count."""
        return -(-batch // self.num_devices) * self.num_devices

    def run(self, images, *, probabilities: bool = False) -> jax.Array:
        """Logits (B, H, W, 1) float32, or probabilities with `probabilities=True`; `images` are
        uint8 RGB or normalised float (B, H, W, 3), H and W multiples of 32. A batch that does not
        divide over the devices is padded (and the padding dropped). Asynchronous: the result is a
        device array."""
        b, _, _ = check_batch(images)
        dtype = np.dtype(images.dtype)
        if not (dtype == np.uint8 or np.issubdtype(dtype, np.floating)):
            raise TypeError(f"images must be uint8 RGB or normalised floats, got dtype {dtype}")
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
