"""Train BiRefNet: `python train.py --config configs/dis5k.py --workdir runs/dis5k`.

Any config field can be overridden: `--config.batch_size=16 --config.optim.lr=2e-4`. Runs on every
local device; on several hosts pass `--distributed` (jax.distributed.initialize reads the cluster
from the environment on TPU pods and SLURM, or from the --coordinator flags). Run it again with the
same workdir to resume from the newest checkpoint.
"""

import logging
import sys

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from birefnet_jax.checkpoint import CheckpointError
from birefnet_jax.train.data.folders import DatasetError
from birefnet_jax.train.trainer import NonFiniteLossError, train_and_evaluate

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Folder for checkpoints, logs and predictions.")
flags.DEFINE_bool("distributed", False, "Initialise jax.distributed (multi-host).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host without auto-detection).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host without auto-detection).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host without auto-detection).")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietOrbax(logging.Filter):
    """Orbax reports every file it writes at INFO; keep its warnings and errors only."""

    def filter(self, record):
        return record.levelno >= logging.WARNING or "orbax" not in record.pathname


def main(argv):
    del argv
    logging.getLogger().setLevel(logging.INFO)
    absl_logging.get_absl_handler().addFilter(_QuietOrbax())
    if FLAGS.distributed or FLAGS.coordinator_address:
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    try:
        result = train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (DatasetError, CheckpointError, NonFiniteLossError, FileNotFoundError) as e:
        # Problems of the data, the workdir or the run: the message says what to do; no traceback.
        sys.exit(f"train.py: {type(e).__name__}: {e}")
    logging.info("finished: %s", result)


if __name__ == "__main__":
    app.run(main)
