"""Evaluate saliency / DIS predictions with the standard metrics: `birefnet-jax eval`, as a script.

  python eval.py --pred_dir preds/DIS-VD --gt_dir datasets/DIS5K/DIS-VD/gt
  python eval.py --pred_root e_preds --data_root datasets/DIS5K --datasets DIS-VD+DIS-TE1
  python eval.py --ckpt BiRefNet.safetensors --data_root datasets/DIS5K --datasets DIS-VD

See `python eval.py --help`; the work is `birefnet_jax.metrics.evaluate_folders`.
"""

import sys

from birefnet_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
