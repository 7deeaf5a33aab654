"""Quickstart: a small BiRefNet trained on a synthetic data set, on a CPU, in minutes, with no
network and no data set to download. The full objective (pixel losses on every level, gradient
supervision), validation, checkpoints and predictions, as a real run has them.

    python train.py --config configs/quickstart.py --workdir runs/quickstart
"""

from configs.common import base_config


def get_config():
    c = base_config("DIS5K")
    c.seed = 0
    c.model.preset = "swin_v1_t"
    c.model.backbone = {"embed_dim": 24, "depths": (1, 1, 2, 1), "num_heads": (1, 2, 3, 6), "window_size": 4,
                        "drop_path_rate": 0.1}
    c.model.overrides = {"mul_scl_ipt": "", "dec_att": "ASPP", "resolution": (128, 128)}
    c.model.dtype = "float32"  # bfloat16 convolutions are no faster on most CPUs
    c.model.remat = False  # 128x128 fits anywhere: keep the activations, save the recomputation
    c.data.root = ""  # empty: generate the synthetic data set under <workdir>/data
    c.data.synthetic_train = 96
    c.data.synthetic_val = 12
    c.data.size = (128, 128)
    c.data.augmentations = ("flip", "rotate")
    c.batch_size = 8
    c.epochs = 16
    c.optim.lr = 1e-3
    c.optim.schedule = "cosine"
    c.optim.warmup_epochs = 1.0
    c.loss.finetune_last_epochs = 0  # no reweighting phase in so short a run
    c.val_every_steps = 64
    c.val_size = (128, 128)
    c.val_batch_size = 4
    c.best_metric = "val/S"
    c.checkpoint_every_steps = 64
    c.keep_checkpoints = 2
    c.log_every_steps = 12
    c.write_predictions = 6
    return c
