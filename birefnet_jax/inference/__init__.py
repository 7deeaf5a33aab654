"""Batch inference: inputs, shape buckets, compiled prediction, the device pipeline, writing,
foreground refinement, video and export."""

from birefnet_jax.inference.pipeline import PredictSummary, predict

__all__ = ["PredictSummary", "predict"]
