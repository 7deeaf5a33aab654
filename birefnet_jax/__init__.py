"""BiRefNet in JAX/Flax NNX, with verified conversion of the original PyTorch checkpoints."""

from birefnet_jax.api import load, load_predictor, make_predict_fn, normalize
from birefnet_jax.config import (
    BACKBONES,
    PRESETS,
    BiRefNetConfig,
    PvtV2Config,
    ResNetConfig,
    SwinConfig,
    VggConfig,
    get_preset,
)
from birefnet_jax.model import BiRefNet, TrainOutputs, count_params

__all__ = [
    "BACKBONES",
    "PRESETS",
    "BiRefNet",
    "BiRefNetConfig",
    "PvtV2Config",
    "ResNetConfig",
    "SwinConfig",
    "TrainOutputs",
    "VggConfig",
    "count_params",
    "get_preset",
    "load",
    "load_predictor",
    "make_predict_fn",
    "normalize",
]
