"""Settings shared by every training config: the original's recipe as defaults.

A config file defines `get_config()` returning an `ml_collections.ConfigDict`; `train.py
--config configs/<file>.py` reads it and any field can be overridden on the command line
(`--config.batch_size=16`, `--config.optim.lr=2e-4`).
"""

import ml_collections

# Epochs and validation cadence of the original's train.sh, per task.
EPOCHS = {"DIS5K": 500, "COD": 150, "HRSOD": 150, "General": 200, "General-2K": 250, "Matting": 150}
# The original's training and validation sets per task.
TRAIN_SETS = {
    "DIS5K": "DIS-TR", "COD": "TR-COD10K+TR-CAMO", "HRSOD": "TR-HRSOD+TR-UHRSD",
    "General": "", "General-2K": "", "Matting": "",  # the original takes every set not used for validation
}
VAL_SETS = {
    "DIS5K": "DIS-VD", "COD": "TE-CAMO", "HRSOD": "TE-HRSOD", "General": "DIS-VD",
    "General-2K": "DIS-VD", "Matting": "TE-P3M-500-NP",
}


def base_config(task: str = "DIS5K") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 7  # the original's rand_seed
    c.task = task

    # Model: a preset of birefnet_jax.config (or a backbone name), then field overrides.
    c.model = ml_collections.ConfigDict()
    c.model.preset = "swin_v1_l"
    c.model.overrides = ml_collections.ConfigDict()  # BiRefNetConfig fields, e.g. {'dec_att': 'ASPP'}
    c.model.backbone = ml_collections.ConfigDict()  # backbone fields, e.g. {'embed_dim': 32}
    c.model.dtype = "bfloat16"  # compute dtype; parameters stay float32 (the original trains with bf16)
    # Recompute every backbone and decoder block in the backward pass instead of keeping its
    # activations: a fraction of the memory for little extra time (docs/performance.md, training).
    c.model.remat = True
    # Initialise from a checkpoint (converted Orbax folder, original .pth / .safetensors, hf:...):
    c.model.init_from = ""
    c.model.init_exclude = ()  # regular expressions of parameters that keep their fresh initialisation

    # Data: the original's folder layout <data_root>/<task>/<set>/{im,gt}.
    c.data = ml_collections.ConfigDict()
    c.data.root = "datasets/dis"  # empty: a synthetic data set generated under <workdir>/data
    c.data.synthetic_train = 0
    c.data.synthetic_val = 0
    c.data.train_sets = TRAIN_SETS[task]
    c.data.val_sets = VAL_SETS[task]
    c.data.size = (1024, 1024)  # (height, width)
    c.data.dynamic_size = False  # the original's dynamic sizes, from a fixed set of buckets
    c.data.buckets_per_side = 5
    c.data.augmentations = ("flip", "enhance", "rotate", "pepper")
    c.data.background_synthesis = False
    c.data.class_labels = False  # auxiliary classification (DIS5K class names in the file names)
    c.data.num_threads = 0  # 0: as many as the machine has (at most 16)
    c.data.worker_count = 0

    c.batch_size = 8  # global, over all devices and hosts
    c.epochs = EPOCHS[task]
    c.batch_norm = "auto"  # 'batch', 'frozen' or 'auto' (frozen for a single image)

    # Optimisation: fields of birefnet_jax.train.optim.OptimConfig.
    c.optim = ml_collections.ConfigDict()
    c.optim.optimizer = "AdamW"
    c.optim.lr = ml_collections.config_dict.placeholder(float)  # None: the original's rule for the task
    c.optim.lr_batch_size = ml_collections.config_dict.placeholder(int)
    c.optim.schedule = "step"
    c.optim.lr_decay_epochs = (100_000,)
    c.optim.lr_decay_rate = 0.5
    c.optim.warmup_epochs = 0.0
    c.optim.min_lr_ratio = 0.0
    c.optim.clip_grad_norm = ml_collections.config_dict.placeholder(float)
    c.optim.accumulate_steps = 1
    # e.g. ('bb/',) freezes the backbone; added by itself where the model config freezes it (DINOv3 backbones,
    # as the original's freeze_bb; a `freeze_backbone: False` entry in config.model.overrides trains them).
    c.optim.frozen = ()

    # Objective.
    c.loss = ml_collections.ConfigDict()
    c.loss.compound_finetune = True  # the original's compounding reweighting in its last epochs
    c.loss.finetune_last_epochs = ml_collections.config_dict.placeholder(int)  # None: the task's (e.g. -40)

    # Device mesh: 'data' x 'fsdp' (parameters and optimiser state sharded over 'fsdp').
    c.mesh = ml_collections.ConfigDict()
    c.mesh.fsdp = 1

    # Validation, checkpoints, logging.
    c.val_every_steps = 1000
    c.val_size = (1024, 1024)
    c.val_batch_size = 4
    c.val_max_images = 0  # 0: all
    c.best_metric = "val/S"
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    c.log_every_steps = 50
    # Persistent XLA compilation cache (relative paths are under the workdir; '' keeps none): a
    # restarted run loads its compiled programs instead of compiling them again.
    c.compile_cache_dir = ""
    c.profile_steps = 0  # >0: a profile of that many steps after the first few
    c.write_predictions = 8  # validation images written with their predictions at the end
    return c
