"""The original's Matting recipe (task weights, epochs, learning rate rule, Swin-L at its resolution)."""

from configs.common import base_config


def get_config():
    c = base_config("Matting")
    c.best_metric = "val/MAE"
    return c
