"""Worker of tests/test_trainer.py: one of two processes (jax.distributed on localhost, CPU
collectives, 4 devices each) taking the tiny model's training step on a 4x2 ('data', 'fsdp') mesh.

    python tests/distributed_step.py <port> <process_id> <output.npz>
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_default_matmul_precision", "highest")


def main(port: str, process_id: str, out: str) -> None:
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=int(process_id))
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    from train_helpers import one_step

    from birefnet_jax.train.sharding import make_mesh

    params, logs = one_step(make_mesh(fsdp=2))
    if jax.process_index() == 0:
        np.savez(out, **params, **{f"log/{k}": v for k, v in logs.items()})
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
