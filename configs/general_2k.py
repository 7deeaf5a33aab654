"""The original's General-2K recipe (task weights, epochs, learning rate rule, Swin-L at its resolution)."""

from configs.common import base_config


def get_config():
    c = base_config("General-2K")
    c.data.size = (1440, 2560)  # the original's General-2K size (2560 x 1440, width x height)
    c.val_size = (1440, 2560)
    c.batch_size = 8
    return c
