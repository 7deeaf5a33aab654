"""Batch inference: decoding, shape buckets, the device pipeline, writing, refinement and export."""

from birefnet_jax.inference.buckets import SizePolicy
from birefnet_jax.inference.images import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, ImageReadError, read_image
from birefnet_jax.inference.pipeline import PredictSummary, predict
from birefnet_jax.inference.refine import estimate_foreground, refine_foreground

__all__ = [
    "IMAGE_EXTENSIONS",
    "VIDEO_EXTENSIONS",
    "ImageReadError",
    "PredictSummary",
    "SizePolicy",
    "estimate_foreground",
    "predict",
    "read_image",
    "refine_foreground",
]
