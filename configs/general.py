"""The original's General recipe (task weights, epochs, learning rate rule, Swin-L at its resolution)."""

from configs.common import base_config


def get_config():
    c = base_config("General")
    return c
