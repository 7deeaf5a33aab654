"""Optional dependencies: the core install (inference on .safetensors / Orbax) stays light, and a
feature whose package is missing says which extra brings it."""

from __future__ import annotations

import importlib

# import name -> (pip package, extra that brings it)
_PACKAGES = {
    "cv2": ("opencv-python-headless", "eval"),
    "scipy": ("scipy", "eval"),
    "skimage": ("scikit-image", "eval"),
    "matplotlib": ("matplotlib", "eval"),
    "av": ("av", "video"),
    "torch": ("torch", "torch"),
    "huggingface_hub": ("huggingface_hub", "hub"),
    "tensorflow": ("tensorflow-cpu", "train"),
    "optax": ("optax", "train"),
    "clu": ("clu", "train"),
    "grain": ("grain", "train"),
    "tensorflow_datasets": ("tensorflow-datasets", "train"),
    "array_record": ("array-record", "train"),
}


class MissingDependency(ImportError):
    """A feature needs a package of an extra that is not installed."""


def require(module: str, feature: str):
    """Import `module` or raise MissingDependency naming the extra to install for `feature`."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        package, extra = _PACKAGES.get(module, (module, None))
        hint = f"pip install 'birefnet-jax[{extra}]'" if extra else f"pip install {package}"
        raise MissingDependency(f"{feature} needs {package}, which is not installed: {hint}") from e
