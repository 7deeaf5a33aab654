"""Batch inference: inputs, shape buckets, compiled prediction, the device pipeline, writing,
foreground refinement, video and export."""

from birefnet_jax.inference.pipeline import PredictOptions, PredictSummary, predict

__all__ = ["PredictOptions", "PredictSummary", "predict"]
