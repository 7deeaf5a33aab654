"""Building blocks shared by the backbones and the BiRefNet heads (NHWC throughout)."""
