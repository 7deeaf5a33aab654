"""`train.py --config tests/tiny_train_config.py`: the tiny training run of tests/test_trainer.py."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train_helpers import tiny_config  # noqa: E402


def get_config():
    return tiny_config()
