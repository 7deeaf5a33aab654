"""Training data: data sets in the original's folder layout, augmentations, dynamic sizes,
the input pipeline, and a synthetic data set for tests and the quickstart."""
