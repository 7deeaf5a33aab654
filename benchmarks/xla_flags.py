"""XLA CPU backend options on the whole model: one fresh process per option set (XLA reads
`XLA_FLAGS` once, at start-up), each timing `benchmarks/forward.py`'s forward and checking its
output against the default options' output. Prints one JSON line per option set.

    python benchmarks/xla_flags.py --backbone swin_v1_t --size 1024 --dtype float32

The package sets none of these by default: on this project's 2-core AVX-512/AMX machine (jax
0.10.2) none was faster by more than the noise on the whole model, and switching off the
YNNPACK fusions halves bfloat16 matmul speed (see docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

OPTION_SETS = {
    "default": "",
    "xnnpack": "--xla_cpu_use_xnnpack=true",
    "onednn": "--xla_cpu_use_onednn=true",
    "no_ynn_fusion": "--xla_cpu_experimental_ynn_fusion_type=",
    "fast_math": "--xla_cpu_enable_fast_math=true",
    "onednn_fusions": "--xla_cpu_experimental_onednn_fusion_type=dot,eltwise,reduce",
    "xnn_graph_greedy": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "fast_compile": "--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_COMPILE",
}

WORKER = """
import json, sys, numpy as np
sys.path.insert(0, {bench!r})
from forward import run
import jax
row = run({backbone!r}, {size}, {batch}, {dtype!r}, {repeats}, keep_output=True)
np.save({out!r}, row.pop("output"))
print("ROW " + json.dumps(row))
"""


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--backbone", default="swin_v1_t")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--sets", nargs="+", default=list(OPTION_SETS), choices=list(OPTION_SETS))
    args = p.parse_args()
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        reference = None
        for name in ["default"] + [s for s in args.sets if s != "default"]:
            out = str(Path(tmp) / f"{name}.npy")
            code = WORKER.format(bench=str(Path(__file__).parent), backbone=args.backbone, size=args.size,
                                 batch=args.batch, dtype=args.dtype, repeats=args.repeats, out=out)
            user = os.environ.get("XLA_FLAGS", "")
            env = dict(os.environ, XLA_FLAGS=f"{user} {OPTION_SETS[name]}".strip())
            proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
            rows = [line[4:] for line in proc.stdout.splitlines() if line.startswith("ROW ")]
            if proc.returncode or not rows:
                print(json.dumps({"options": name, "error": proc.stderr[-2000:]}), flush=True)
                continue
            row = json.loads(rows[-1])
            logits = np.load(out)
            if reference is None:
                reference = logits
            row.update(options=name, xla_flags=OPTION_SETS[name],
                       max_abs_logit_diff_vs_default=float(np.abs(logits - reference).max()))
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
