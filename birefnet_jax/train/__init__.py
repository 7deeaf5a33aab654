"""Training: the original's objective (losses), optax optimisation, data pipelines.

Needs the `train` extra (optax, grain, TensorFlow Datasets, clu); the core install never imports it.
"""
