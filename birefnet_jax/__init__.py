"""BiRefNet in JAX/Flax NNX, with verified conversion of the original PyTorch checkpoints."""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

from birefnet_jax.backbones import CONFIG_CLASSES
from birefnet_jax.config import BACKBONES, BiRefNetConfig
from birefnet_jax.inference.export import export_model
from birefnet_jax.inference.pipeline import PredictOptions, PredictSummary, predict
from birefnet_jax.inference.predictor import Predictor, load_predictor, make_predict_fn
from birefnet_jax.io.images import normalize
from birefnet_jax.loading import load
from birefnet_jax.model import BiRefNet, TrainOutputs
from birefnet_jax.nn.state import count_params
from birefnet_jax.pretrained import RELEASED_CONFIGS, RELEASES, Release, get_preset, get_release

# Every backbone family's config class (`SwinConfig`, `DinoV3Config`, ...), from the backbone table.
globals().update(CONFIG_CLASSES)

try:
    __version__ = _version("birefnet-jax")
except PackageNotFoundError:  # not installed (a source tree on sys.path)
    __version__ = "unknown"

__all__ = [
    "BACKBONES",
    "RELEASED_CONFIGS",
    "RELEASES",
    "BiRefNet",
    "BiRefNetConfig",
    "PredictOptions",
    "PredictSummary",
    "Predictor",
    "Release",
    "TrainOutputs",
    "__version__",
    "count_params",
    "export_model",
    "get_preset",
    "get_release",
    "load",
    "load_predictor",
    "make_predict_fn",
    "normalize",
    "predict",
    *CONFIG_CLASSES,
]
