"""One training step of birefnet-jax against the original PyTorch BiRefNet, side by side on the same
weights, batch, device and threads: seconds per step, images per second, compile time, peak memory,
and whether the first step's losses agree.

    python benchmarks/train_step.py --original .orig/BiRefNet --original-python venv-orig/bin/python \\
        --backbones swin_v1_t --resolution 512 --batch-size 2 --dtypes float32 bfloat16

The machinery is `compare_original.py`'s (read its docstring): per configuration (backbone, batch
size, dtype) two fresh worker processes, the original's (under `--original-python`, in a temporary
copy of `--original` whose config.py names the backbone) and ours, each pinned to the same
`--threads` CPUs and answering one JSON line per request; the original's worker builds its model
without a pretrained backbone, randomises its deformable offsets and BatchNorm statistics and
writes the state dict that our worker loads (`model_from_state_dict`). Requests alternate, original
step, our step, ..., `--warmup` times untimed then `--repeats` times timed.

The step, ours: `birefnet_jax.train.step.make_train_step()` (the DIS5K loss weights, gradients,
one AdamW update through `nnx.Optimizer(model, tx, wrt=nnx.Param)` with `make_optimizer(OptimConfig(lr=...))`),
after `set_train_mode(model, global_batch_size=B)`; the batch is a dict {image (B, H, W, 3)
normalised, mask (B, H, W, 1)} already on the device, and the timed call returns once the step's
outputs are ready. In bfloat16 the model computes in bfloat16 with float32 parameters
(`dtype=jnp.bfloat16`). `--remat` turns on our rematerialisation (`birefnet_jax.model.set_remat`:
backbone passes and decoder blocks recomputed in the backward pass).

The step, the original's (its trainer's `_train_batch`, written here from what it does): the model in
training mode, `optimizer.zero_grad()`, the forward, its `PixLoss` (the config's DIS5K weights:
BCE 30, IoU 0.5, SSIM 10, on every prediction level) on the mask clamped to [0, 1], plus the BCE of
the sigmoid of each gradient-attention prediction (resized to its label, bilinear with aligned corners)
against the sigmoid of its label, backward, `torch.optim.AdamW(lr, weight_decay=1e-2)` step, and
`loss.item()` (which its trainer logs, and which waits for the step). Eager: the original's config
turns `torch.compile` on, which on a CPU needs a C++ toolchain and minutes per shape;
`--original-compile` wraps the model in `torch.compile` as its train.py does. Reduced precision is
what its `accelerate` path does: the forward under `torch.autocast` (bfloat16, or float16 with a
`GradScaler`), its outputs cast to float32 for the loss. On a CPU, autocast bfloat16 may have no
kernel for torchvision's deformable convolution: the row then says `"original": "cannot run: ..."`.

Both sides: drop path (stochastic depth) and the ASPP dropout off (rate 0), so that the same
weights and batch give the same loss; the comparison is of the deterministic step. With a batch of
one, the original's BatchNorms cannot use batch statistics (PyTorch refuses one value per channel in
the ASPP's pooled branch), so they run in eval mode (running statistics, not updated), which is what
ours does at batch 1 (`set_train_mode`'s 'auto'); from batch 2 on both use batch statistics.
The learning rate is the original's DIS5K rule, 1e-4 * sqrt(B / 4), on both (or `--lr`).

Agreement: `loss_rel_diff` is |ours - original| / |original| of the first step's total loss (before
any update: same weights, same batch). float32 rows compare with the original's own first step and
agree within `--loss-tolerance` (1e-3); reduced-precision rows compare with the original's float32
loss of the same weights and batch (computed, without gradients, in its worker's setup), within
`--reduced-loss-tolerance`; `original_loss_rel_diff` gives the original's own autocast loss against
that, for scale. Every step's loss is listed (`*_losses`); from the second step on the two drift
apart as much as float32 rounding makes any run drift: Adam's first updates are about lr * sign(gradient)
and BatchNorm over a batch of two is ill-conditioned (at 64x64, batch 2, ours and the original differ
by 0.2% at step 2 and 3% at step 3, the original's own float32 and float64 runs by 0.3% and 2%).

Timing and memory: `*_s_per_step` is the median timed step, `*_images_per_s` the batch over it,
`ratio` original / ours seconds (our speed-up), `ours_compile_s` our first step minus the median
(tracing, lowering and XLA compilation; `ours_xla_compile_s` is XLA's part alone and `ours_compiles`
the number of programs compiled, 1 when nothing recompiles), `original_first_step_s` the
original's first step (its own warm-up: allocator, oneDNN primitives). Our worker commits the model,
optimiser state and batch to the device before the first step, as the sharded training path does.
Peak memory on a CPU is each worker's resident set: `*_peak_mb` the whole process's (setup, compile
and steps), `*_run_rss_peak_mb` from the first step through the warm-up (ours: XLA compilation
included), `*_steady_rss_peak_mb` over the timed steps alone (with a warm-up; the heap's free memory is
handed back to the OS first, `malloc_trim`, else it holds what compilation freed); on a GPU the device
peak (`peak_bytes_in_use`, `torch.cuda.max_memory_allocated`), weights and optimiser state included.
`memory_ratio` (and `steady_memory_ratio`) is ours / original. One JSON line per configuration on
stdout (and appended to `--out`); `--ours-only` times our step alone (random weights).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Shared with compare_original.py and inference.py (this folder is on sys.path when a script of it runs).
import compare_original as co
import numpy as np
from inference import peak_rss_mb

LOSS_KEYS = ("loss", "loss_pix", "loss_gdt")
CACHE_HIT = "/jax/compilation_cache/cache_hits"
COMPILE_EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
                  "/jax/core/compile/backend_compile_duration": "xla"}


def step_handler(timer: co.Timer):
    """The request both workers answer per step: run one (timed, synchronised) and give its seconds
    and losses; a failure to run at all is reported as 'cannot run: ...'."""

    def step() -> dict:
        try:
            seconds = timer.time(1)["seconds"][0]
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RuntimeError(f"cannot run: {first}") from e
        return {"seconds": seconds, "losses": timer.last}

    return step


def reset_peak() -> dict:
    """After the warm-up: hand the heap's free memory back to the OS (glibc keeps what XLA's compiler
    freed, gigabytes, resident) and start the resident-set high-water mark afresh, so that the
    timed steps' peak is what they use."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        trimmed = True
    except (OSError, AttributeError):
        trimmed = False
    return {"reset": co.reset_rss_peak(), "trimmed": trimmed}


# ----------------------------------------------------------------------------------------------
# The original's worker (runs under --original-python: only the standard library, NumPy and torch).


def deterministic_original(model, torch) -> dict:
    """Dropout and drop path off (rate 0), in place; how many of each were switched."""
    counts = {"dropout": 0, "drop_path": 0}
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
            counts["dropout"] += 1
        elif hasattr(module, "drop_prob"):  # timm's DropPath
            module.drop_prob = 0.0
            counts["drop_path"] += 1
    return counts


def original_train_worker(spec: dict) -> None:
    torch = co.enter_original(spec)
    import torch.nn.functional as F

    timer = co.Timer()
    state = {}

    def objective(amp):
        """The original trainer's loss of the batch (total, pixel part, gradient part)."""
        with torch.autocast(state["device"], dtype=amp or torch.float32, enabled=amp is not None):
            (gdt_preds, gdt_labels), preds = state["model"](state["x"])[0]
        # What accelerate's mixed precision hands the loss: the model's outputs in float32.
        preds = [p.float() for p in preds]
        loss_pix, _ = state["pix_loss"](preds, torch.clamp(state["gt"], 0, 1), pix_loss_lambda=1.0)
        loss_gdt = 0.0
        for pred, label in zip(gdt_preds, gdt_labels, strict=True):
            pred = F.interpolate(pred.float(), size=label.shape[2:], mode="bilinear", align_corners=True)
            loss_gdt = loss_gdt + F.binary_cross_entropy(pred.sigmoid(), label.float().sigmoid())
        return loss_pix + loss_gdt, loss_pix, loss_gdt

    def setup() -> dict:
        from loss import PixLoss

        model, device, info = co.build_original(spec)
        info["switched_off"] = deterministic_original(model, torch)
        model.to(device)
        model.train()
        if spec["batch"] == 1:
            for module in model.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.eval()
        info["batch_norm"] = "frozen" if spec["batch"] == 1 else "batch"
        optimizer = torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=1e-2)
        net = torch.compile(model) if spec["compile"] else model
        images = np.load(spec["input"], mmap_mode="r")[: spec["batch"]]
        masks = np.load(spec["mask"], mmap_mode="r")[: spec["batch"]]
        amp = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[spec["dtype"]]
        state.update(model=net, device=device, optimizer=optimizer, pix_loss=PixLoss().to(device), amp=amp,
                     scaler=torch.amp.GradScaler(device) if amp is torch.float16 else None,
                     x=torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(device),
                     gt=torch.from_numpy(np.ascontiguousarray(masks.transpose(0, 3, 1, 2))).to(device))
        if amp is not None:  # the float32 loss our reduced-precision loss is compared with
            with torch.no_grad():
                info["reference_loss"] = objective(None)[0].item()
        timer.setup_peak_mb = peak_rss_mb()
        return info

    def train_step() -> dict:
        optimizer, scaler = state["optimizer"], state["scaler"]
        optimizer.zero_grad()
        loss, loss_pix, loss_gdt = objective(state["amp"])
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        losses = {"loss": loss.item(), "loss_pix": loss_pix.item(), "loss_gdt": float(loss_gdt)}
        if state["device"] == "cuda":
            torch.cuda.synchronize()
        return losses

    timer.forward = train_step

    def stats() -> dict:
        out = timer.rss()
        if state["device"] == "cuda":
            out["device_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        return out

    co.serve({"setup": setup, "step": step_handler(timer), "stats": stats, "reset_peak": reset_peak})


# ----------------------------------------------------------------------------------------------
# Our worker (runs under this Python).


def deterministic_config(cfg):
    """`cfg` with the ASPP dropout and the backbone's drop path at rate 0."""
    cfg = cfg.replace(dropout=0.0)
    if hasattr(cfg.backbone, "drop_path_rate"):
        cfg = cfg.replace(backbone=dataclasses.replace(cfg.backbone, drop_path_rate=0.0))
    return cfg


def ours_train_worker(spec: dict) -> None:
    co.pin_cpus(spec["cpus"])
    if (co.REPO / "birefnet_jax" / "__init__.py").is_file():  # the package beside this script
        sys.path.insert(0, str(co.REPO))
    timer = co.Timer()
    state = {}
    compile_events: list[tuple[str, float]] = []
    cache_hits = [0]

    def setup() -> dict:
        import flax
        import jax
        import jax.numpy as jnp
        from flax import nnx

        import birefnet_jax
        from birefnet_jax.convert import infer_config, read_state_dict
        from birefnet_jax.loading import model_from_state_dict
        from birefnet_jax.model import random_model, set_remat
        from birefnet_jax.pretrained import get_preset
        from birefnet_jax.train.batchnorm import set_train_mode
        from birefnet_jax.train.optim import OptimConfig, make_optimizer
        from birefnet_jax.train.step import make_train_step

        jax.monitoring.register_event_duration_secs_listener(
            lambda event, seconds, **_: compile_events.append((event, seconds)) if event in COMPILE_EVENTS else None)
        jax.monitoring.register_event_listener(
            lambda event, **_: cache_hits.__setitem__(0, cache_hits[0] + 1) if event == CACHE_HIT else None)
        if spec.get("compile_cache"):  # as train.py's config.compile_cache_dir
            jax.config.update("jax_compilation_cache_dir", spec["compile_cache"])
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        size, batch = spec["resolution"], spec["batch"]
        dtype = None if spec["dtype"] == "float32" else jnp.dtype(spec["dtype"])
        start = time.perf_counter()
        state_dict = read_state_dict(spec["weights"]) if spec.get("weights") else None
        cfg = get_preset(spec["backbone"]) if state_dict is None else infer_config(state_dict)
        cfg = deterministic_config(cfg.replace(resolution=(size, size)))
        step_kwargs, remat = {}, bool(spec["remat"])
        if state_dict is None:
            model = random_model(cfg, dtype, spec["seed"])
        else:
            model = model_from_state_dict(state_dict, cfg, dtype=dtype)
            del state_dict
        set_remat(model, remat)
        batch_norm = set_train_mode(model, global_batch_size=batch)
        tx, _ = make_optimizer(OptimConfig(lr=spec["lr"]), nnx.state(model, nnx.Param), global_batch_size=batch,
                               epochs=1, steps_per_epoch=1)
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        device = jax.devices()[0]
        # Everything committed to the device, as the sharded training path places it: a batch put on
        # a device with parameters left uncommitted (as the builders leave them) compiles step 2 again.
        nnx.update((model, optimizer), jax.device_put(nnx.state((model, optimizer)), device))
        arrays = {"image": np.load(spec["input"], mmap_mode="r")[:batch],
                  "mask": np.load(spec["mask"], mmap_mode="r")[:batch]}
        state.update(model=model, optimizer=optimizer, step=make_train_step(**step_kwargs), device=device,
                     batch=jax.block_until_ready({k: jax.device_put(np.ascontiguousarray(v), device)
                                                  for k, v in arrays.items()}))
        build = time.perf_counter() - start
        compile_events.clear()  # setup's small eager programs are not the step's
        cache_hits[0] = 0
        timer.setup_peak_mb = peak_rss_mb()
        params = sum(v.size for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
        return {"device": "cpu" if device.platform == "cpu" else device.device_kind, "platform": device.platform,
                "build_s": round(build, 2), "jax": jax.__version__, "flax": flax.__version__,
                "package": str(Path(birefnet_jax.__file__).parent), "batch_norm": batch_norm, "remat": remat,
                "params": int(params),
                "threads": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None}

    def train_step() -> dict:
        import jax

        logs = jax.block_until_ready(state["step"](state["model"], state["optimizer"], state["batch"]))
        return {k: float(logs[k]) for k in (*LOSS_KEYS, "grad_norm") if k in logs}

    timer.forward = train_step

    def stats() -> dict:
        out = timer.rss()
        for event, name in COMPILE_EVENTS.items():
            out[f"{name}_s"] = round(sum(s for e, s in compile_events if e == event), 2)
        out["compiles"] = sum(1 for e, _ in compile_events if e == "/jax/core/compile/backend_compile_duration")
        out["cache_hits"] = cache_hits[0]
        out.update(co.jax_device_peak(state["device"]))
        return out

    co.serve({"setup": setup, "step": step_handler(timer), "stats": stats, "reset_peak": reset_peak})


# ----------------------------------------------------------------------------------------------
# The orchestrator.


def make_masks(path: Path, batch: int, size: int, seed: int) -> None:
    """Seeded binary masks (B, H, W, 1): blocky foreground, about half of the pixels."""
    rng = np.random.default_rng(seed)
    coarse = (rng.random((batch, size // 32, size // 32, 1)) > 0.5).astype(np.float32)
    np.save(path, np.repeat(np.repeat(coarse, 32, axis=1), 32, axis=2))


def rel_diff(value: float, reference: float) -> float:
    return abs(value - reference) / max(abs(reference), 1e-30)


def summarise(row: dict, name: str, answers: list[dict], warmup: int, batch: int) -> list[float]:
    """Timing fields of one side; returns its timed seconds."""
    seconds = [a["seconds"] for a in answers]
    timed = seconds[warmup:]
    median = statistics.median(timed)
    row[f"{name}_s_per_step"] = round(median, 4)
    row[f"{name}_images_per_s"] = round(batch / median, 4)
    row[f"{name}_s_all"] = [round(s, 4) for s in timed]
    row[f"{name}_first_step_s"] = round(seconds[0], 2)
    row[f"{name}_losses"] = [round(a["losses"]["loss"], 6) for a in answers]
    return timed


def memory(row: dict, name: str, warm: dict | None, stats: dict) -> None:
    """Peak fields of one side from its stats after the warm-up (None: no warm-up) and at the end."""
    if "device_peak_mb" in stats:
        row[f"{name}_peak_mb"] = stats["device_peak_mb"]
        row[f"{name}_peak_kind"] = "device"
        return
    # The kernel's counters restart at each reset: the whole process's peak is the largest seen.
    seen = [s[k] for s in (warm, stats) if s for k in ("rss_peak_mb", "run_rss_peak_mb") if s.get(k)]
    row[f"{name}_peak_mb"] = max(seen)
    row[f"{name}_peak_kind"] = "process rss"
    row[f"{name}_run_rss_peak_mb"] = (warm or stats)["run_rss_peak_mb"]
    if warm:
        row[f"{name}_steady_rss_peak_mb"] = stats["run_rss_peak_mb"]


def run_configuration(args, backbone: str, batch: int, dtype: str, copy: Path | None, cpus: list[int],
                      tmp: Path) -> dict:
    tag = f"{backbone}-b{batch}-{dtype}"
    lr = args.lr if args.lr is not None else 1e-4 * math.sqrt(batch / 4)  # the original's DIS5K rule
    row = {"kind": "train_step", "backbone": backbone, "resolution": args.resolution, "batch": batch,
           "dtype": dtype, "ours_dtype": co.OURS_DTYPE[dtype], "original_dtype": None if copy is None else (
               "float32" if dtype == "float32" else f"autocast {dtype}"),
           "original_compiled": bool(args.original_compile) if copy is not None else None,
           "lr": lr, "drop_path": 0.0, "dropout": 0.0, "threads": len(cpus), "warmup": args.warmup,
           "repeats": args.repeats}
    here = str(Path(__file__).resolve())
    env = {**os.environ, "OMP_NUM_THREADS": str(len(cpus)), "MKL_NUM_THREADS": str(len(cpus))}
    spec = {"backbone": backbone, "batch": batch, "resolution": args.resolution, "cpus": cpus, "seed": args.seed,
            "lr": lr, "input": str(tmp / f"input-{args.resolution}.npy"),
            "mask": str(tmp / f"mask-{args.resolution}.npy")}
    original = ours = None
    with co.row_workers(row) as started:
        if copy is not None:
            weights = tmp / f"{tag}.safetensors"
            original = started["original"] = co.Worker("original", [
                args.original_python, here, "--worker", "original", json.dumps(
                    {**spec, "dtype": dtype, "root": str(copy), "weights": str(weights),
                     "compile": args.original_compile})], env, tmp / f"{tag}-original.log", args.timeout)
            spec["weights"] = str(weights)
        # Preallocation off: on a GPU the two processes share the device, and the peak is what is used.
        ours_env = {**env, "XLA_PYTHON_CLIENT_PREALLOCATE": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "false")}
        ours = started["ours"] = co.Worker("ours", [sys.executable, here, "--worker", "ours", json.dumps(
            {**spec, "dtype": co.OURS_DTYPE[dtype], "remat": args.remat,
             "compile_cache": args.compile_cache})], ours_env, tmp / f"{tag}-ours.log",
            args.timeout)
        if original is not None:
            Path(spec["weights"]).unlink(missing_ok=True)  # read already
        row.update(device=ours.info["device"], ours_build_s=ours.info["build_s"], ours_params=ours.info["params"],
                   ours_batch_norm=ours.info["batch_norm"])
        if args.remat:
            row["ours_remat"] = ours.info["remat"]
        if args.compile_cache:
            row["ours_compile_cache"] = args.compile_cache
        if original is not None:
            row.update(original_device=original.info["device"], original_build_s=original.info["build_s"],
                       original_batch_norm=original.info["batch_norm"],
                       original_switched_off=original.info["switched_off"])

        workers = {"original": original, "ours": ours}
        answers, failed = co.alternate(workers, args.warmup, "step")
        warm = {}
        if args.warmup:  # peaks so far (ours: compilation), then the timed steps' own
            for name, worker in workers.items():
                if worker is not None and name not in failed:
                    warm[name] = worker.ask("stats")
                    worker.ask("reset_peak")
        more, failed_later = co.alternate({name: None if name in failed else worker
                                          for name, worker in workers.items()}, args.repeats, "step")
        failed.update(failed_later)
        for name, got in more.items():
            answers[name] += got
        timed = {}
        for name, got in answers.items():
            if name in failed:
                row[name] = failed[name]
                row[f"{name}_s_per_step"] = None
            else:
                timed[name] = summarise(row, name, got, args.warmup, batch)
        if "ours" in timed:
            row["ours_compile_s"] = round(row["ours_first_step_s"] - statistics.median(timed["ours"]), 2)
        if original is not None:
            row["ratio"] = None if failed else round(
                statistics.median(timed["original"]) / statistics.median(timed["ours"]), 3)

        ours_stats = ours.ask("stats")
        row.update(ours_xla_compile_s=ours_stats["xla_s"], ours_trace_lower_s=round(
            ours_stats["trace_s"] + ours_stats["lower_s"], 2), ours_compiles=ours_stats["compiles"])
        if args.compile_cache:
            row["ours_cache_hits"] = ours_stats["cache_hits"]
        memory(row, "ours", warm.get("ours"), ours_stats)
        if original is not None:
            memory(row, "original", warm.get("original"), original.ask("stats"))
            if not failed:
                row["memory_ratio"] = round(row["ours_peak_mb"] / row["original_peak_mb"], 3)
                if "ours_steady_rss_peak_mb" in row:
                    row["steady_memory_ratio"] = round(
                        row["ours_steady_rss_peak_mb"] / row["original_steady_rss_peak_mb"], 3)

        # Agreement of the first step's losses (before any update).
        reference = original.info.get("reference_loss") if original is not None else None
        if original is not None and "original" not in failed:
            row["original_first_losses"] = answers["original"][0]["losses"]
            if dtype == "float32":
                reference = row["original_first_losses"]["loss"]
        if "ours" not in failed:
            row["ours_first_losses"] = answers["ours"][0]["losses"]
        if reference is not None and "ours" not in failed:
            row["reference_loss"] = reference
            row["loss_rel_diff"] = rel_diff(answers["ours"][0]["losses"]["loss"], reference)
            row["tolerance"] = args.loss_tolerance if dtype == "float32" else args.reduced_loss_tolerance
            row["agree"] = row["loss_rel_diff"] <= row["tolerance"]
            if dtype != "float32" and "original" not in failed:
                row["original_loss_rel_diff"] = rel_diff(answers["original"][0]["losses"]["loss"], reference)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    co.add_common_arguments(p, "our step")
    p.add_argument("--backbones", nargs="+", default=["swin_v1_t"], choices=sorted(co.ORIGINAL_BACKBONES))
    p.add_argument("--batch-sizes", "--batch-size", nargs="+", type=int, default=[2])
    p.add_argument("--dtypes", nargs="+", default=["float32"], choices=co.DTYPES,
                   help="bfloat16: ours in bfloat16, the original under bfloat16 autocast; float16 (CUDA): the "
                        "original under float16 autocast with a GradScaler against ours in bfloat16")
    p.add_argument("--resolution", type=int, default=512, help="square input size, a multiple of 32")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed steps of each side first (ours compiles in the first)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps of each side, alternating")
    p.add_argument("--lr", type=float, default=None, help="learning rate of both (default: 1e-4 * sqrt(batch / 4))")
    p.add_argument("--remat", action="store_true", help="our rematerialisation, where this version has it")
    p.add_argument("--compile-cache", default="",
                   help="our persistent XLA compilation cache (a folder): the first run fills it, a second run "
                        "loads the step from it and compiles nothing (ours_cache_hits)")
    p.add_argument("--original-compile", action="store_true", help="the original's model under torch.compile")
    p.add_argument("--loss-tolerance", type=float, default=1e-3,
                   help="float32: largest relative difference of the first step's losses that agrees")
    p.add_argument("--reduced-loss-tolerance", type=float, default=1e-2,
                   help="bfloat16 / float16: the same, against the original's float32 loss")
    args = p.parse_args()

    if args.worker:
        (original_train_worker if args.worker == "original" else ours_train_worker)(json.loads(args.spec))
        return
    cpus = co.prepare_run(p, args)
    with tempfile.TemporaryDirectory(prefix="birefnet-train-step-") as tmp:
        tmp = Path(tmp)
        co.make_input(tmp / f"input-{args.resolution}.npy", max(args.batch_sizes), args.resolution, args.seed)
        make_masks(tmp / f"mask-{args.resolution}.npy", max(args.batch_sizes), args.resolution, args.seed + 1)
        co.run_all(args, tmp, lambda backbone, batch, dtype, copy: run_configuration(
            args, backbone, batch, dtype, copy, cpus, tmp))

if __name__ == "__main__":
    main()
