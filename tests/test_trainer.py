"""The training loop on device meshes and across processes, on a tiny model: 8 devices (4 data x 2
FSDP) take the same step as one device, two processes take the same step as one, a run killed
between checkpoints resumes to bit-identical parameters, SIGTERM saves before exiting, the best
checkpoint is the best by the validation metric, and a non-finite loss stops the run."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from train_helpers import batch, one_step

from birefnet_jax.train.sharding import make_mesh

# Subprocess runs and whole training loops: the slow tier (the README's test command runs it).
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


# Devices and processes sum the batch in another order; BatchNorm over a batch of eight amplifies the
# float32 rounding to ~5e-4 relative in a step. Sharding mistakes (statistics over a device's share
# of the batch, a missing all-reduce) change the step by orders of magnitude more.
RTOL, ATOL = 2e-3, 2e-4


def _assert_same(a, b, rtol=RTOL, atol=ATOL):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=k)


@pytest.fixture(scope="module")
def single_device_step():
    return one_step(make_mesh(devices=jax.devices()[:1]))


def test_eight_devices_take_the_same_step_as_one(single_device_step):
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    params1, logs1 = single_device_step
    params8, logs8 = one_step(make_mesh(fsdp=2))  # 4 data x 2 fsdp
    assert logs8["loss"] == pytest.approx(logs1["loss"], rel=1e-6)
    _assert_same(params8, params1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_take_the_same_step_as_one(tmp_path, single_device_step):
    port, out = _free_port(), tmp_path / "step.npz"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    worker = str(ROOT / "tests" / "distributed_step.py")
    procs = [subprocess.Popen([sys.executable, worker, str(port), str(i), str(out)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
    got = dict(np.load(out))
    logs = {k[4:]: float(got.pop(k)) for k in list(got) if k.startswith("log/")}
    params1, logs1 = single_device_step
    assert logs["loss"] == pytest.approx(logs1["loss"], rel=1e-6)
    _assert_same(got, params1)


# ------------------------------------------------------------------------------------------------
# The whole loop in subprocesses (train.py), sharing one persistent compilation cache.


def _train(workdir: Path, cache: Path, *extra, wait=True):
    cmd = [sys.executable, str(ROOT / "train.py"), f"--config={ROOT / 'tests' / 'tiny_train_config.py'}",
           f"--workdir={workdir}", f"--config.compile_cache_dir={cache}", *extra]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
           # Unoptimised code generation: the tiny steps run in milliseconds either way, and it
           # compiles the training step in about half the time.
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0",
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return proc
    out = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, out[-4000:]
    return out


def _final_params(workdir: Path) -> dict[str, np.ndarray]:
    from flax import nnx

    from birefnet_jax import load
    from birefnet_jax.nn.state import state_path_name

    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    model = load(workdir / "checkpoints" / str(steps[-1]))
    return {state_path_name(p, "/"): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat)))}


def _wait_for_checkpoint(workdir: Path, proc, step: int, timeout: float = 600):
    end = time.time() + timeout
    target = workdir / "checkpoints" / str(step)
    while not target.is_dir():
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        assert time.time() < end, "no checkpoint appeared"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    cache = root / "cache"
    out = _train(root / "full", cache)
    return root, cache, out


def test_uninterrupted_run_trains_validates_and_writes_predictions(uninterrupted):
    root, cache, out = uninterrupted
    work = root / "full"
    assert (work / "predictions.png").is_file() and len(list((work / "predictions").glob("*.png"))) == 2
    # The best checkpoint is the one with the best validation S-measure, and it is kept.
    val = {int(k): float(v) for k, v in re.findall(r"\[(\d+)\] [^\n]*val/S=([0-9.eE+-]+)", out)}
    assert sorted(val) == [2, 4, 6], out[-3000:]
    best = max(val, key=val.get)
    progress = json.loads((work / "checkpoints" / "6" / "progress" / "metadata").read_text())
    assert progress["best_step"] == best and progress["best_metric"] == pytest.approx(val[best], rel=1e-5)
    assert (work / "checkpoints" / str(best)).is_dir()
    assert "'status': 'done'" in out
    assert any(cache.iterdir())  # config.compile_cache_dir: the programs, for the runs that follow
    # The loss goes down over the run (the quickstart's pipeline, shrunk): clu's console writer logs it.
    losses = [float(m) for m in re.findall(r"train/loss=([0-9.eE+-]+)", out)]
    assert len(losses) == 3 and losses[-1] < losses[0], losses


def test_killed_run_resumes_to_bit_identical_parameters(uninterrupted):
    root, cache, _ = uninterrupted
    work = root / "killed"
    proc = _train(work, cache, wait=False)
    _wait_for_checkpoint(work, proc, 2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _train(work, cache)
    expected, got = _final_params(root / "full"), _final_params(work)
    assert expected.keys() == got.keys()
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k], err_msg=k)


def test_sigterm_saves_before_exiting(uninterrupted):
    root, cache, _ = uninterrupted
    work = root / "terminated"
    proc = _train(work, cache, wait=False)
    _wait_for_checkpoint(work, proc, 2)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-4000:]
    assert "preempted" in out
    steps = [int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit()]
    assert max(steps) >= 2


def test_non_finite_loss_stops_with_the_step_and_checkpoint_to_go_back_to():
    from birefnet_jax.train.trainer import NonFiniteLossError, _finite_or_raise

    class _Ckpt:
        directory = Path("/runs/x/checkpoints")

        def latest_step(self):
            return 40

    with pytest.raises(NonFiniteLossError, match=r"step 42.*loss.*step 40 in /runs/x/checkpoints"):
        _finite_or_raise({"loss": float("nan"), "bce": 1.0}, 42, _Ckpt())
    _finite_or_raise({"loss": 1.0}, 1, _Ckpt())
    # A poisoned batch really gives a non-finite loss through the step.
    poisoned = batch()
    poisoned["image"][0, 0, 0, 0] = np.nan
    _, logs = one_step(make_mesh(devices=jax.devices()[:1]), data=poisoned)
    assert not np.isfinite(logs["loss"])
