"""BiRefNet in JAX/Flax NNX, with verified conversion of the original PyTorch checkpoints."""

from birefnet_jax.api import Predictor, load, load_predictor, make_predict_fn, normalize
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
from birefnet_jax.inference import PredictSummary, predict
from birefnet_jax.inference.export import export_model
from birefnet_jax.model import BiRefNet, TrainOutputs, count_params

try:
    from importlib.metadata import version as _version

    __version__ = _version("birefnet-jax")
except Exception:  # not installed (a source tree on sys.path)
    __version__ = "unknown"

__all__ = [
    "BACKBONES",
    "PRESETS",
    "BiRefNet",
    "BiRefNetConfig",
    "PredictSummary",
    "Predictor",
    "PvtV2Config",
    "ResNetConfig",
    "SwinConfig",
    "TrainOutputs",
    "VggConfig",
    "__version__",
    "count_params",
    "export_model",
    "get_preset",
    "load",
    "load_predictor",
    "make_predict_fn",
    "normalize",
    "predict",
]
