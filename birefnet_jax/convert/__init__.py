"""Conversion between the original PyTorch state dicts and this package's NNX models."""

from birefnet_jax.convert.infer import infer_config
from birefnet_jax.convert.io import read_state_dict, write_safetensors
from birefnet_jax.convert.keymap import ConversionError, load_state_dict_into, model_to_state_dict

__all__ = [
    "ConversionError",
    "infer_config",
    "load_state_dict_into",
    "model_to_state_dict",
    "read_state_dict",
    "write_safetensors",
]
