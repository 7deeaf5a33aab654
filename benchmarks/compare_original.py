"""Model forward speed, peak memory and output agreement of birefnet-jax against the original
PyTorch BiRefNet, side by side on the same weights, input, device and threads.

    python benchmarks/compare_original.py --original /path/to/BiRefNet --original-python venv-orig/bin/python \\
        --backbones swin_v1_t swin_v1_l pvt_v2_b2 --batch-sizes 1 4 --dtypes float32 bfloat16 --resolution 1024

How it measures. Per configuration (backbone, batch size, dtype) this process starts two fresh
worker processes and talks to each over stdin/stdout, one JSON line per request and answer:

* the original's worker (run with `--original-python`) imports `models.birefnet.BiRefNet` and
  `config.Config` from a temporary copy of `--original` whose config.py names the backbone (the
  checkout is never modified), builds the model without a pretrained backbone (`bb_pretrained=False`),
  seeds torch, and then gives every deformable convolution's offset and modulator convs random
  weights (N(0, (0.5 / sqrt(fan_in))^2), biases U(-0.5, 0.5): offsets of about half a pixel) and
  every BatchNorm random running statistics and affine parameters. The original initialises the
  offset/modulator convs to zero, which would sample on the regular grid and leave the deformable
  sampling unchecked. The state dict is written to a temporary .safetensors file;
* our worker (run with this Python) builds our model from that file (`model_from_state_dict`)
  and runs it through `birefnet_jax.inference.predictor.Predictor` (the compiled eval-mode program returning logits).

Both run the same seeded batch of normalised images (NCHW for the original, NHWC for ours), already
on the device, and the timed call is the model's forward only (`model(x)[-1]` for the original,
eval mode, under `torch.inference_mode`; synchronised on CUDA; ours blocks until ready). The
requests alternate, original call, our call, original call, ..., `--warmup` times untimed then
`--repeats` times timed, so that drifting load on a shared machine hits both alike. Seconds per
image are the median call over the batch size; `ratio` is original / ours (our speed-up);
`ours_compile_s` is our first call minus the steady median (tracing and XLA compilation).

Threads: both workers pin themselves (`os.sched_setaffinity`) to the same `--threads` CPUs (the
first of this process's affinity) and the original calls `torch.set_num_threads`. On CUDA (when
the original's torch sees one) the original runs on the GPU, with `torch.set_float32_matmul_precision
('high')` as its own inference.py sets it (TF32 matmuls, as JAX's default float32 precision uses on
the GPU); ours runs on JAX's default device, with XLA's preallocation off so that both fit.

dtypes: `float32` both plain; `bfloat16` ours in bfloat16, the original under `torch.autocast(...,
bfloat16)` (on the CPU the original's torchvision `deform_conv2d` may have no bfloat16 kernel: the
row then says `"original": "cannot run: <reason>"`); `float16` (meant for CUDA, where the original
is usually run in float16) the original under float16 autocast against ours in bfloat16.

Agreement: the final logits of both, in float32 for the original. `max_abs_diff` is the largest
difference of the probabilities (sigmoid of the logits), `mask_agreement` the fraction of pixels
whose mask at 0.5 is the same. Reduced-precision rows compare our output with the original's
float32 output (computed in that configuration's worker after timing, if no float32 row of the
same backbone and batch ran before); `original_mask_agreement` then gives the original's own
autocast mask agreement with its float32 output, for scale. `agree` is false when
* float32 on a CPU: max_abs_diff > 1e-3 (the port matches the original to float32 rounding, ~1e-5);
* float32 on a GPU: max_abs_diff > 1e-2 (both sides may use TF32 for float32 convolutions/matmuls);
* bfloat16 / float16: mask_agreement < 0.99 (--min-mask-agreement).
Random weights give outputs close to 0.5 in places, where any rounding flips the mask; agreement
numbers are a check of the harness and of the port, not of precision on real images.

Memory (`*_peak_mb`): on a CPU the worker's peak resident set (`ru_maxrss`, whole process: setup,
which reads the weights once more than it keeps, compile and run) and `*_run_rss_peak_mb`, the
high-water mark from the first forward on (Linux `/proc/self/clear_refs`); on CUDA the device peak
(`torch.cuda.max_memory_allocated`, and JAX's `peak_bytes_in_use`), weights included.

Output: one JSON line per configuration on stdout (and appended to `--out`). `--ours-only` times
our model alone (random weights, no original needed).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import select
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

# Shared with benchmarks/inference.py (this folder is on sys.path when a script of it runs).
from inference import load_average, peak_rss_mb, prepare_original

# Our backbone names -> the original config's `self.bb` choices (the same spellings).
ORIGINAL_BACKBONES = {
    "swin_v1_t": "swin_v1_t", "swin_v1_s": "swin_v1_s", "swin_v1_b": "swin_v1_b", "swin_v1_l": "swin_v1_l",
    "pvt_v2_b0": "pvt_v2_b0", "pvt_v2_b1": "pvt_v2_b1", "pvt_v2_b2": "pvt_v2_b2", "pvt_v2_b5": "pvt_v2_b5",
    "vgg16": "vgg16", "vgg16bn": "vgg16bn", "resnet50": "resnet50",
    "dino_v3_s": "dino_v3_s", "dino_v3_s_plus": "dino_v3_s_plus", "dino_v3_b": "dino_v3_b", "dino_v3_l": "dino_v3_l",
}
DTYPES = ("float32", "bfloat16", "float16")
OURS_DTYPE = {"float32": "float32", "bfloat16": "bfloat16", "float16": "bfloat16"}
REPO = Path(__file__).resolve().parents[1]
MASK_THRESHOLD = 0.5
FLOAT32_TOLERANCE = {"cpu": 1e-3, "gpu": 1e-2}
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


class WorkerError(RuntimeError):
    pass


STOPPING = False  # set on SIGTERM (e.g. from `timeout`): workers are killed, not asked to finish


def on_sigterm(signum, frame):
    global STOPPING
    STOPPING = True
    raise SystemExit(128 + signum)


# ----------------------------------------------------------------------------------------------
# Worker side: shared plumbing.


def pin_cpus(cpus: list[int]) -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)


def reset_rss_peak() -> bool:
    """Reset the kernel's resident-set high-water mark (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_peak_since_reset_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def serve(handlers: dict) -> None:
    """Answer one JSON line per request line on stdin. Everything else the libraries print goes
    to stderr: the protocol keeps the original stdout to itself."""
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def answer(message: dict) -> None:
        channel.write(json.dumps(message) + "\n")
        channel.flush()

    try:
        answer({"ready": True, **handlers["setup"]()})
    except Exception as e:  # the orchestrator reports it
        traceback.print_exc()
        answer({"error": f"setup failed: {type(e).__name__}: {e}"})
        return
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        cmd = request.pop("cmd")
        if cmd == "quit":
            answer({"bye": True})
            return
        try:
            answer(handlers[cmd](**request))
        except Exception as e:
            traceback.print_exc()
            text = str(e).strip().splitlines()[0] if str(e).strip() else ""
            answer({"error": text if text.startswith("cannot run") else f"{type(e).__name__}: {text}"})


class Timer:
    """The timing requests common to both workers: `forward()` runs one synchronised call and keeps
    its output; `logits()` gives the kept output as float32 (B, H, W)."""

    def __init__(self):
        self.last = None
        self.peak_reset = None
        self.setup_peak_mb = 0.0

    def time(self, repeats: int = 1) -> dict:
        if self.peak_reset is None:
            self.peak_reset = reset_rss_peak()
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            self.last = self.forward()
            seconds.append(time.perf_counter() - start)
        return {"seconds": seconds}

    def save(self, path: str) -> dict:
        np.save(path, self.logits())
        return {"saved": path}

    def rss(self) -> dict:
        # ru_maxrss may or may not have been lowered by the reset: the setup's peak is kept apart.
        return {"rss_peak_mb": max(self.setup_peak_mb, peak_rss_mb()),
                "run_rss_peak_mb": rss_peak_since_reset_mb() if self.peak_reset else None}


# ----------------------------------------------------------------------------------------------
# The original's worker (runs under --original-python: only the standard library, NumPy and torch).


def write_safetensors_streaming(state_dict, path: Path) -> None:
    """A .safetensors file written tensor by tensor (no second copy of the weights in memory, and
    no dependency on the safetensors package in the original's Python)."""
    import torch

    codes = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.int64: "I64",
             torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}
    header, tensors, offset = {}, [], 0
    for key, tensor in state_dict.items():
        tensor = tensor.detach().cpu().contiguous()
        size = tensor.numel() * tensor.element_size()
        header[key] = {"dtype": codes[tensor.dtype], "shape": list(tensor.shape),
                       "data_offsets": [offset, offset + size]}
        tensors.append(tensor)
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for tensor in tensors:
            f.write(tensor.numpy().tobytes())


def randomise_original(model, seed: int) -> tuple[int, int]:
    """Random offset/modulator convs in every deformable conv and random BatchNorm statistics."""
    import torch

    g = torch.Generator().manual_seed(seed)
    deformable = batch_norms = 0
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "offset_conv") and hasattr(module, "modulator_conv"):
                for conv in (module.offset_conv, module.modulator_conv):
                    fan_in = conv.weight[0].numel()
                    conv.weight.normal_(0.0, 0.5 / fan_in**0.5, generator=g)
                    conv.bias.uniform_(-0.5, 0.5, generator=g)
                deformable += 1
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.1, generator=g)
                module.running_var.uniform_(0.5, 1.5, generator=g)
                module.weight.uniform_(0.8, 1.2, generator=g)
                module.bias.normal_(0.0, 0.1, generator=g)
                batch_norms += 1
    return deformable, batch_norms


def enter_original(spec: dict):
    """The original's worker's first step: pin this process to the spec's CPUs (before torch starts
    its threads), set torch's thread count and work in the copy of the original. Returns torch."""
    pin_cpus(spec["cpus"])
    import torch

    torch.set_num_threads(len(spec["cpus"]))
    sys.path.insert(0, spec["root"])
    os.chdir(spec["root"])
    return torch


def build_original(spec: dict):
    """The original's model with random weights (see the module docstring), its state dict written
    to spec["weights"] for our worker. Returns (model, device, info), the model still on the CPU."""
    import torch
    import torchvision
    from config import Config
    from models.birefnet import BiRefNet

    config = Config()
    if config.bb != spec["backbone"]:
        raise RuntimeError(f"the copy's config.py selects {config.bb!r}, not {spec['backbone']!r}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    torch.manual_seed(spec["seed"])
    model = BiRefNet(bb_pretrained=False)
    deformable, batch_norms = randomise_original(model, spec["seed"] + 1)
    build = time.perf_counter() - start
    write_safetensors_streaming(model.state_dict(), Path(spec["weights"]))
    if device == "cuda" and getattr(config, "precisionHigh", False):
        torch.set_float32_matmul_precision("high")  # as the original's inference.py and train.py
    return model, device, {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "build_s": round(build, 2),
        "deformable_convs_randomised": deformable, "batch_norms_randomised": batch_norms,
        "torch": torch.__version__, "torchvision": torchvision.__version__, "threads": torch.get_num_threads(),
        "weights": spec["weights"],
    }


def original_worker(spec: dict) -> None:
    torch = enter_original(spec)
    timer = Timer()
    state = {}

    def setup() -> dict:
        model, device, info = build_original(spec)
        model.eval()
        model.to(device)
        x = np.load(spec["input"], mmap_mode="r")[: spec["batch"]]
        state.update(model=model, device=device,
                     x=torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device))
        autocast = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[spec["dtype"]]
        state["autocast"] = autocast
        timer.setup_peak_mb = peak_rss_mb()
        return info

    def run(autocast):
        with torch.inference_mode(), torch.autocast(state["device"], dtype=autocast or torch.float32,
                                                     enabled=autocast is not None):
            out = state["model"](state["x"])[-1]
        if state["device"] == "cuda":
            torch.cuda.synchronize()
        return out

    timer.forward = lambda: run(state["autocast"])
    timer.logits = lambda: timer.last.float()[:, 0].cpu().numpy()

    def time_(repeats: int = 1) -> dict:
        try:
            return timer.time(repeats)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RuntimeError(f"cannot run: {first}") from e

    def reference(path: str) -> dict:
        np.save(path, run(None).float()[:, 0].cpu().numpy())
        return {"saved": path}

    def stats() -> dict:
        out = timer.rss()
        if state["device"] == "cuda":
            out["device_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        return out

    serve({"setup": setup, "time": time_, "save": timer.save, "reference": reference, "stats": stats})


# ----------------------------------------------------------------------------------------------
# Our worker (runs under this Python).


def jax_device_peak(device) -> dict:
    """{'device_peak_mb': JAX's peak bytes in use} on an accelerator; {} on a CPU or where unknown."""
    memory = (device.memory_stats() or {}) if device.platform != "cpu" else {}
    return {"device_peak_mb": round(memory["peak_bytes_in_use"] / 2**20, 1)} if "peak_bytes_in_use" in memory else {}


def ours_worker(spec: dict) -> None:
    pin_cpus(spec["cpus"])
    if (REPO / "birefnet_jax" / "__init__.py").is_file():  # the package beside this script, installed or not
        sys.path.insert(0, str(REPO))
    timer = Timer()
    state = {}

    def setup() -> dict:
        import flax
        import jax
        import jax.numpy as jnp

        import birefnet_jax
        from birefnet_jax.convert import read_state_dict
        from birefnet_jax.inference.predictor import Predictor
        from birefnet_jax.loading import model_from_state_dict
        from birefnet_jax.model import random_model
        from birefnet_jax.pretrained import get_preset

        size = spec["resolution"]
        dtype = None if spec["dtype"] == "float32" else jnp.dtype(spec["dtype"])
        start = time.perf_counter()
        if spec.get("weights"):
            state_dict = read_state_dict(spec["weights"])
            model = model_from_state_dict(state_dict, dtype=dtype, resolution=(size, size))
            del state_dict
        else:
            model = random_model(get_preset(spec["backbone"]).replace(resolution=(size, size)), dtype, spec["seed"])
        predictor = Predictor(model)
        del model
        gc.collect()
        device = jax.devices()[0]
        x = np.load(spec["input"], mmap_mode="r")[: spec["batch"]]
        state.update(predictor=predictor, device=device, x=jax.device_put(np.ascontiguousarray(x), device))
        jax.block_until_ready(state["x"])
        build = time.perf_counter() - start
        timer.setup_peak_mb = peak_rss_mb()
        return {"device": "cpu" if device.platform == "cpu" else device.device_kind, "platform": device.platform,
                "build_s": round(build, 2), "jax": jax.__version__, "flax": flax.__version__,
                "package": str(Path(birefnet_jax.__file__).parent),
                "threads": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None}

    def forward():
        import jax

        return jax.block_until_ready(state["predictor"].run(state["x"]))

    timer.forward = forward
    timer.logits = lambda: np.asarray(timer.last, np.float32)[..., 0]

    def stats() -> dict:
        out = timer.rss()
        out["compile_s"] = round(state["predictor"].compile_seconds, 2)
        out.update(jax_device_peak(state["device"]))
        return out

    serve({"setup": setup, "time": timer.time, "save": timer.save, "stats": stats})


# ----------------------------------------------------------------------------------------------
# The orchestrator.


class Worker:
    """A worker process and its request/answer channel; its stderr goes to a log file, whose tail
    is quoted when it fails."""

    def __init__(self, name: str, argv: list[str], env: dict, log: Path, timeout: float | None):
        self.name, self.log_path, self.timeout = name, log, timeout
        self.log = open(log, "w")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, bufsize=1, env=env)
        try:
            self.info = self._read()
        except BaseException:
            self.close()
            raise

    def _tail(self) -> str:
        self.log.flush()
        lines = [line.strip() for line in self.log_path.read_text(errors="replace").splitlines() if line.strip()]
        return " | ".join(lines[-3:]) if lines else "no output"

    def _read(self) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        if not ready:
            self.kill()
            raise WorkerError(f"{self.name} worker gave no answer in {self.timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise WorkerError(f"{self.name} worker exited with status {code}: {self._tail()}")
        message = json.loads(line)
        if "error" in message:
            raise WorkerError(message["error"])
        return message

    def ask(self, cmd: str, **kwargs) -> dict:
        try:
            self.proc.stdin.write(json.dumps({"cmd": cmd, **kwargs}) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise WorkerError(f"{self.name} worker is gone: {self._tail()}") from None
        return self._read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None and not STOPPING:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
                pass
        self.kill()
        self.log.close()


def alternate(workers: dict, calls: int, cmd: str, **kwargs) -> tuple[dict[str, list[dict]], dict[str, str]]:
    """`calls` requests `cmd` to each worker (None: absent) in turn, a, b, a, b, ..., so that drifting
    load on a shared machine hits both alike. A worker whose request fails (no kernel for a dtype,
    out of memory) drops out and the other goes on alone. Returns each worker's answers and the
    reasons of those that failed ('cannot run: ...')."""
    answers: dict[str, list[dict]] = {name: [] for name, worker in workers.items() if worker is not None}
    failed: dict[str, str] = {}
    for _ in range(calls):
        for name in answers:
            if name in failed:
                continue
            try:
                answers[name].append(workers[name].ask(cmd, **kwargs))
            except WorkerError as e:
                failed[name] = str(e) if str(e).startswith("cannot run") else f"cannot run: {e}"
    return answers, failed


def make_input(path: Path, batch: int, size: int, seed: int) -> None:
    """A seeded batch of normalised NHWC images: blocky colour fields plus noise, in [0, 1] before
    the ImageNet normalisation."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((batch, size // 32, size // 32, 3), np.float32)
    images = np.repeat(np.repeat(coarse, 32, axis=1), 32, axis=2)
    images = np.clip(images + rng.normal(0, 0.05, images.shape).astype(np.float32), 0, 1)
    np.save(path, (images - MEAN) / STD)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def compare(ours: np.ndarray, reference: np.ndarray) -> dict:
    p, q = sigmoid(ours), sigmoid(reference)
    return {"max_abs_diff": float(np.max(np.abs(p - q))),
            "max_abs_diff_logits": float(np.max(np.abs(ours.astype(np.float64) - reference))),
            "mask_agreement": float(np.mean((p > MASK_THRESHOLD) == (q > MASK_THRESHOLD)))}


def median_per_image(seconds: list[float], batch: int) -> float:
    return statistics.median(seconds) / batch


def agreement(ours: Worker, original: Worker, tmp: Path, tag: str, key: tuple, dtype: str, original_ran: bool,
              gpu: bool, min_mask_agreement: float, references: dict) -> dict:
    """Our output against the original's float32 output of the same weights and input; the float32
    output is kept in `references` for the reduced-precision rows of the same backbone and batch."""
    ours_path = tmp / f"{tag}-ours.npy"
    ours.ask("save", path=str(ours_path))
    ours_logits = np.load(ours_path)
    if dtype == "float32" and original_ran:
        references[key] = tmp / f"{tag}-original.npy"
        original.ask("save", path=str(references[key]))
    elif key not in references:
        references[key] = tmp / f"{tag}-original-float32.npy"
        original.ask("reference", path=str(references[key]))
    reference = np.load(references[key])
    row = compare(ours_logits, reference)
    # What the agreement is measured on: random weights give small logits.
    row["reference_logits_min_max_std"] = [round(float(v), 4) for v in
                                           (reference.min(), reference.max(), reference.std())]
    row["reference_mask_fraction"] = round(float(np.mean(reference > 0)), 4)
    if dtype != "float32" and original_ran:
        own_path = tmp / f"{tag}-original.npy"
        original.ask("save", path=str(own_path))
        row["original_mask_agreement"] = compare(np.load(own_path), reference)["mask_agreement"]
    if dtype == "float32":
        row["tolerance"] = FLOAT32_TOLERANCE["gpu" if gpu else "cpu"]
        row["agree"] = row["max_abs_diff"] <= row["tolerance"]
    else:
        row["min_mask_agreement"] = min_mask_agreement
        row["agree"] = row["mask_agreement"] >= min_mask_agreement
    return row


@contextlib.contextmanager
def row_workers(row: dict):
    """The block of a row that talks to workers: those it puts in the yielded dict ('original',
    'ours') are closed when it ends; a WorkerError ends it early as row["error"]. A block that
    completes adds both sides' versions to the row; the load average is added in any case."""
    workers: dict[str, Worker] = {}
    try:
        yield workers
        original, ours = workers.get("original"), workers["ours"]
        versions = {"jax": ours.info["jax"], "flax": ours.info["flax"]}
        if original is not None:
            versions.update(torch=original.info["torch"], torchvision=original.info["torchvision"])
            row["original_threads"] = original.info["threads"]
        row["versions"] = versions
    except WorkerError as e:
        row["error"] = str(e)
    finally:
        for worker in workers.values():
            worker.close()
    row["load_average"] = load_average()


def run_configuration(args, backbone: str, batch: int, dtype: str, copy: Path | None, cpus: list[int],
                      tmp: Path, references: dict) -> dict:
    tag = f"{backbone}-b{batch}-{dtype}"
    row = {"backbone": backbone, "resolution": args.resolution, "batch": batch, "dtype": dtype,
           "ours_dtype": OURS_DTYPE[dtype], "original_dtype": None if copy is None else (
               "float32" if dtype == "float32" else f"autocast {dtype}"),
           "threads": len(cpus), "warmup": args.warmup, "repeats": args.repeats}
    input_path = tmp / f"input-{args.resolution}-{max(args.batch_sizes)}.npy"
    here = str(Path(__file__).resolve())
    env = {**os.environ, "OMP_NUM_THREADS": str(len(cpus)), "MKL_NUM_THREADS": str(len(cpus))}
    spec = {"backbone": backbone, "batch": batch, "resolution": args.resolution, "input": str(input_path),
            "cpus": cpus, "seed": args.seed}
    original = ours = None
    with row_workers(row) as started:
        if copy is not None:
            weights = tmp / f"{tag}.safetensors"
            original = started["original"] = Worker("original", [
                args.original_python, here, "--worker", "original", json.dumps(
                    {**spec, "dtype": dtype, "root": str(copy), "weights": str(weights)})], env,
                tmp / f"{tag}-original.log", args.timeout)
            spec["weights"] = str(weights)
        ours_env = {**env, "XLA_PYTHON_CLIENT_PREALLOCATE": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "false")}
        ours = started["ours"] = Worker("ours", [sys.executable, here, "--worker", "ours", json.dumps(
            {**spec, "dtype": OURS_DTYPE[dtype]})], ours_env, tmp / f"{tag}-ours.log", args.timeout)
        if original is not None:
            Path(spec["weights"]).unlink(missing_ok=True)  # read already; Swin-L's is 0.9 GB
        row["device"] = ours.info["device"]
        row["ours_build_s"] = ours.info["build_s"]
        if original is not None:
            row["original_device"] = original.info["device"]
            row["original_build_s"] = original.info["build_s"]

        # Warm-up and timed calls, alternating. A side that fails (no kernel for a dtype, out of
        # memory) says so in the row, and the other side goes on alone.
        workers = {"original": original, "ours": ours}
        answers, failed = alternate(workers, args.warmup + args.repeats, "time", repeats=1)
        times = {name: [a["seconds"][0] for a in got[args.warmup:]] for name, got in answers.items()}
        firsts = {name: got[0]["seconds"][0] for name, got in answers.items() if got}
        for name, worker in workers.items():
            if worker is None:
                continue
            if name in failed:
                row[name] = failed[name]
                row[f"{name}_s_per_image"] = None
                continue
            row[f"{name}_s_per_image"] = round(median_per_image(times[name], batch), 5)
            row[f"{name}_s_all"] = [round(t, 5) for t in times[name]]
            row[f"{name}_first_call_s"] = round(firsts[name], 2)
        if "ours" not in failed:
            row["ours_compile_s"] = round(firsts["ours"] - statistics.median(times["ours"]), 2)
        if original is not None:
            row["ratio"] = None if failed else round(
                median_per_image(times["original"], batch) / median_per_image(times["ours"], batch), 3)

        # Memory, before anything untimed runs.
        gpu = ours.info["platform"] != "cpu"
        ours_stats = ours.ask("stats")
        row["ours_xla_compile_s"] = ours_stats["compile_s"]
        row["peak_kind"] = "device" if gpu else "process rss"
        row["ours_peak_mb"] = ours_stats.get("device_peak_mb") if gpu else ours_stats["rss_peak_mb"]
        if not gpu:
            row["ours_run_rss_peak_mb"] = ours_stats["run_rss_peak_mb"]
        if original is not None:
            original_stats = original.ask("stats")
            original_gpu = "device_peak_mb" in original_stats
            row["original_peak_mb"] = original_stats.get("device_peak_mb") if original_gpu else (
                original_stats["rss_peak_mb"])
            if not original_gpu:
                row["original_run_rss_peak_mb"] = original_stats["run_rss_peak_mb"]
            if original_gpu != gpu:
                row["original_peak_kind"] = "device" if original_gpu else "process rss"
            if "ours" not in failed:
                try:
                    row.update(agreement(ours, original, tmp, tag, (backbone, batch), dtype, "original" not in failed,
                                         gpu or original_gpu, args.min_mask_agreement, references))
                except WorkerError as e:
                    row["agreement_error"] = str(e)
    return row


def check_original(args) -> None:
    """Fail early, naming the option to fix, if the checkout or its Python is not usable."""
    checkout = args.original
    if not (checkout / "models" / "birefnet.py").is_file() or not (checkout / "config.py").is_file():
        raise SystemExit(f"--original {checkout}: not a checkout of the original BiRefNet (no models/birefnet.py "
                         "and config.py); pass --original /path/to/BiRefNet (github.com/ZhengPeng7/BiRefNet), or "
                         "--ours-only")
    # What importing the original's model needs (its models/ and the dataset.py they import).
    probe = "import torch, torchvision, timm, einops, kornia, huggingface_hub, cv2, PIL, tqdm"
    try:
        out = subprocess.run([args.original_python, "-c", probe], capture_output=True, text=True, timeout=300)
    except OSError as e:
        raise SystemExit(f"--original-python {args.original_python}: cannot run it ({e})") from None
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["?"])[-1]
        raise SystemExit(f"--original-python {args.original_python} cannot import what the original needs ({last}); "
                         "pass --original-python /path/to/python with torch, torchvision, timm, einops, kornia, "
                         "huggingface_hub, opencv, pillow and tqdm")


def add_common_arguments(p: argparse.ArgumentParser, subject: str) -> None:
    """The options every side-by-side script here has (the workers' hidden ones included)."""
    p.add_argument("--original", type=Path, help="checkout of the original BiRefNet (github.com/ZhengPeng7/BiRefNet)")
    p.add_argument("--original-python", default=sys.executable,
                   help="Python with torch, torchvision, timm, einops, kornia for the original (default: this one)")
    p.add_argument("--ours-only", action="store_true", help=f"time {subject} alone (random weights)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPUs both sides use (default: all of this process's affinity)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3600, help="seconds a worker may take to answer one request")
    p.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    p.add_argument("--worker", choices=["original", "ours"], help=argparse.SUPPRESS)
    p.add_argument("spec", nargs="?", help=argparse.SUPPRESS)


def prepare_run(p: argparse.ArgumentParser, args) -> list[int]:
    """Check the common options (failing early, naming the option to fix), install the SIGTERM
    handler and print the setup line to stderr. Returns the CPUs both sides are pinned to."""
    if args.repeats < 1 or args.warmup < 0 or min(args.batch_sizes) < 1:
        p.error("--repeats and --batch-sizes must be at least 1, --warmup at least 0")
    if args.resolution < 32 or args.resolution % 32:
        p.error("--resolution must be a positive multiple of 32")
    if args.ours_only:
        args.original = None
    elif args.original is None:
        p.error("pass --original /path/to/BiRefNet (a checkout of the original), or --ours-only")
    else:
        args.original = args.original.resolve()
        check_original(args)

    available = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count()))
    threads = args.threads or len(available)
    if not 1 <= threads <= len(available):
        p.error(f"--threads {threads}: this process may use {len(available)} CPUs ({available})")
    cpus = available[:threads]

    signal.signal(signal.SIGTERM, on_sigterm)
    print(json.dumps({"kind": "setup", "python": platform.python_version(), "machine": platform.machine(),
                      "cpus": cpus, "original": str(args.original) if args.original else None,
                      "original_python": args.original_python if args.original else None,
                      "load_average": load_average()}), file=sys.stderr, flush=True)
    return cpus


def run_all(args, tmp: Path, run_one) -> None:
    """`run_one(backbone, batch, dtype, copy)` for every configuration, where `copy` is a copy of the
    original set to the backbone (None with --ours-only); each row is one JSON line on stdout,
    appended to --out as well."""
    out = open(args.out, "a") if args.out else None
    try:
        for backbone in args.backbones:
            copy = None
            if args.original is not None:
                folder = tmp / backbone
                folder.mkdir()
                copy = prepare_original(args.original, ORIGINAL_BACKBONES[backbone], folder)
            for batch in args.batch_sizes:
                for dtype in args.dtypes:
                    line = json.dumps(run_one(backbone, batch, dtype, copy))
                    print(line, flush=True)
                    if out:
                        out.write(line + "\n")
                        out.flush()
            if copy is not None:
                shutil.rmtree(copy.parent, ignore_errors=True)
    finally:
        if out:
            out.close()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(p, "our model")
    p.add_argument("--backbones", nargs="+", default=["swin_v1_t", "swin_v1_l", "pvt_v2_b2"],
                   choices=sorted(ORIGINAL_BACKBONES))
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=DTYPES,
                   help="float16: the original under float16 autocast against ours in bfloat16 (for CUDA)")
    p.add_argument("--resolution", type=int, default=1024, help="square input size, a multiple of 32")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed calls of each side first (ours compiles in the first)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls of each side, alternating")
    p.add_argument("--min-mask-agreement", type=float, default=0.99,
                   help="reduced-precision rows agree when at least this fraction of mask pixels does")
    args = p.parse_args()

    if args.worker:
        (original_worker if args.worker == "original" else ours_worker)(json.loads(args.spec))
        return
    cpus = prepare_run(p, args)
    with tempfile.TemporaryDirectory(prefix="birefnet-compare-") as tmp:
        tmp = Path(tmp)
        make_input(tmp / f"input-{args.resolution}-{max(args.batch_sizes)}.npy", max(args.batch_sizes),
                   args.resolution, args.seed)
        references: dict = {}
        run_all(args, tmp, lambda backbone, batch, dtype, copy: run_configuration(
            args, backbone, batch, dtype, copy, cpus, tmp, references))

if __name__ == "__main__":
    main()
