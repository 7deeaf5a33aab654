"""One-call entry points: load any checkpoint, get a jitted function from images to logits."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from birefnet_jax.checkpoint import is_orbax_checkpoint, load_model
from birefnet_jax.config import BiRefNetConfig
from birefnet_jax.convert import infer_config, load_state_dict_into, read_state_dict
from birefnet_jax.convert.keymap import materialize_rng_state
from birefnet_jax.model import BiRefNet, abstract_model

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def model_from_state_dict(state_dict: dict[str, np.ndarray], config: BiRefNetConfig | None = None, *,
                          dtype=None, seed: int = 0, **overrides) -> BiRefNet:
    """Build the model a state dict describes (or `config`) and fill it strictly."""
    cfg = config if config is not None else infer_config(state_dict, **overrides)
    model = abstract_model(cfg, dtype=dtype)
    load_state_dict_into(model, state_dict)
    return materialize_rng_state(model, seed)


def load(path: str | os.PathLike, config: BiRefNetConfig | None = None, *, dtype=None,
         **overrides) -> BiRefNet:
    """Load an original PyTorch checkpoint (`.pth`, `.safetensors`) or a converted Orbax
    checkpoint directory, in eval mode. `dtype` (e.g. `jnp.bfloat16`) sets the compute dtype;
    parameters stay float32. `overrides` are passed to architecture inference."""
    path = Path(path)
    if is_orbax_checkpoint(path):
        return load_model(path, dtype=dtype)
    return model_from_state_dict(read_state_dict(path), config, dtype=dtype, **overrides)


def make_predict_fn(model: BiRefNet, *, layout: str = "NHWC") -> Callable[[jax.Array], jax.Array]:
    """A pure, jitted function from normalised images to logits.

    `layout='NCHW'` takes and returns PyTorch's layout (as the original's tensors are);
    the default NHWC is what the model computes in. Weights are closed over as arguments of
    the jitted function, so they are not baked into the compiled program as constants.
    """
    if layout not in ("NHWC", "NCHW"):
        raise ValueError(f"layout must be 'NHWC' or 'NCHW', got {layout!r}")
    model.eval()
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, images):
        if layout == "NCHW":
            images = jnp.transpose(images, (0, 2, 3, 1))
        logits = nnx.merge(graphdef, state)(images)
        return jnp.transpose(logits, (0, 3, 1, 2)) if layout == "NCHW" else logits

    def predict(images):
        return forward(state, images)

    predict.state = state
    predict.graphdef = graphdef
    return predict


def normalize(images_uint8: np.ndarray) -> np.ndarray:
    """uint8 RGB (..., H, W, 3) -> float32 normalised with the ImageNet mean and std."""
    return (np.asarray(images_uint8, np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


class Predictor:
    """A loaded model plus its jitted forward and training resolution."""

    def __init__(self, model: BiRefNet):
        self.model = model
        self.config = model.cfg
        self.resolution = tuple(model.cfg.resolution)
        self._fn = make_predict_fn(model)

    def __call__(self, images_nhwc: np.ndarray) -> jax.Array:
        return self._fn(images_nhwc)


def load_predictor(path: str | os.PathLike, *, dtype=None, **overrides) -> Predictor:
    return Predictor(load(path, dtype=dtype, **overrides))
