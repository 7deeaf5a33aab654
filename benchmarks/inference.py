"""End-to-end inference speed: images/s through `birefnet_jax.inference.predict` on a folder of
generated images of mixed sizes (masks written), latency per prepared batch, compile time and
peak memory, printed as JSON lines; optionally the original PyTorch BiRefNet timed on the same
images in the same run, with the ratio ours / original per configuration.

Weights are random (speed does not depend on their values). Each configuration (implementation,
dtype, batch size) runs in a fresh process, so the peak memory reported is that configuration's.

    python benchmarks/inference.py --preset BiRefNet_lite --resolution 1024x1024 --batch-sizes 1 4 \\
        --dtypes float32 bfloat16 --images 8 --repeats 3 \\
        --original /path/to/BiRefNet --original-python /path/to/venv/bin/python

`--original` is a checkout of the original project, `--original-python` a Python with torch,
torchvision, opencv, timm, einops, kornia and huggingface_hub. The checkout is copied to a temporary
folder and the copy's `config.py` set to the preset's backbone; the checkout itself is not touched.
The original is timed with a small driver written here at run time that imports its
`models.birefnet.BiRefNet`, `config.Config` and its `utils` helpers and runs the loop of its
`inference.py`: OpenCV read and resize, ToTensor + Normalize, `model(x)[-1].sigmoid()`, bilinear
`align_corners=True` back to the image's size, PNG written; eager mode, default torch threads,
images read in the main process (the original uses DataLoader workers; on a few cores they compete
with the model anyway). bfloat16 runs under `torch.autocast`.

`--cold` times what a user waits for instead: the `birefnet-jax predict` command run twice, each in a
fresh process (a random checkpoint written as .safetensors first), with $BIREFNET_JAX_CACHE set to
`--cache-dir` (default: a new empty folder, so the first run compiles and the second may find its
programs in the persistent compile cache). Each run prints one JSON line: the process's wall time,
the summary's compile count and seconds, the compile cache's file count before and after, and the
summary's last lines.

    python benchmarks/inference.py --cold --preset BiRefNet_lite --resolution 512x512 --images 20 \\
        --batch-sizes 1 --dtypes float32 --label after

`--cli-flags "--no-compile-cache"` adds flags to the command; `--label` is copied into each line (say
which code ran: with PYTHONPATH=/path/to/another/checkout the command is that version's, which the
`source` and `commit` fields name).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MIN_SIZE = (640, 480)  # (width, height) of the generated images
MAX_SIZE = (1920, 1080)


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def peak_rss_mb() -> float:
    """This process's resident-set high-water mark (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def make_images(folder: Path, count: int, seed: int) -> list[dict]:
    """`count` seeded JPEGs of random sizes between MIN_SIZE and MAX_SIZE: a smooth background,
    noise, and a few filled shapes (something for the model to find)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    for i in range(count):
        w = int(rng.integers(MIN_SIZE[0], MAX_SIZE[0] + 1))
        h = int(rng.integers(MIN_SIZE[1], MAX_SIZE[1] + 1))
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = rng.uniform(0, 255, 3).astype(np.float32)
        slope = rng.uniform(-0.1, 0.1, (2, 3)).astype(np.float32)
        pixels = base + xx[..., None] * slope[0] + yy[..., None] * slope[1] + rng.normal(0, 8, (h, w, 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(1, 4))):
            x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
            x1, y1 = int(rng.integers(x0 + w // 8, w)), int(rng.integers(y0 + h // 8, h))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
        path = folder / f"image_{i:03d}.jpg"
        image.save(path, quality=90)
        made.append({"name": path.name, "width": w, "height": h})
    return made


# ----------------------------------------------------------------------------------------------
# Ours: one configuration per process.


def run_ours(job: dict) -> dict:
    import jax
    import jax.numpy as jnp
    from PIL import Image

    from birefnet_jax.inference import predict
    from birefnet_jax.inference.predictor import Predictor
    from birefnet_jax.model import random_model
    from birefnet_jax.pretrained import get_preset

    h, w = job["resolution"]
    batch, dtype = job["batch"], job["dtype"]
    cfg = get_preset(job["preset"]).replace(resolution=(h, w))
    compute = None if dtype == "float32" else jnp.dtype(dtype)

    start = time.perf_counter()
    model = random_model(cfg, compute)
    predictor = Predictor(model)
    del model
    build = time.perf_counter() - start

    names = sorted(os.listdir(job["images"]))
    x = np.stack([np.asarray(Image.open(os.path.join(job["images"], names[i % len(names)])).convert("RGB")
                             .resize((w, h), Image.BILINEAR)) for i in range(batch)])
    start = time.perf_counter()
    jax.block_until_ready(predictor.run(x, probabilities=True))  # compiles the program predict() uses too
    first = time.perf_counter() - start
    compile_s = predictor.compile_seconds
    times = []
    for _ in range(job["repeats"]):
        start = time.perf_counter()
        jax.block_until_ready(predictor.run(x, probabilities=True))
        times.append(time.perf_counter() - start)

    summary = predict(job["images"], predictor, job["output"], resolution=(h, w), batch_size=batch,
                      outputs=("mask",), overwrite=True, progress=False)
    written = len(list(Path(job["output"]).rglob("*.png")))
    device = jax.local_devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    peak_device = stats.get("peak_bytes_in_use") if stats else None
    return {
        "impl": "birefnet_jax", "device": str(device), "platform": device.platform,
        "build_s": round(build, 2), "compile_s": round(compile_s, 2),
        "first_call_s": round(first, 2),
        "latency_s_per_batch": round(float(np.median(times)), 3),
        "latency_s_all": [round(t, 3) for t in times],
        "images_per_s": round(summary.images_per_second, 3),
        "e2e_wall_s": round(summary.wall_seconds, 2),
        "e2e_compiles": summary.compile_count,  # 0: the end-to-end pass reused the warmed-up program
        "images_done": summary.done, "masks_written": written, "failed": len(summary.failed),
        "peak_rss_mb": peak_rss_mb(),
        "peak_device_mb": round(peak_device / 2**20, 1) if peak_device is not None else None,
    }


# ----------------------------------------------------------------------------------------------
# Cold runs: the command, in fresh processes, as a user runs it.


def write_checkpoint(preset: str, resolution: tuple[int, int], path: Path) -> Path:
    """A random checkpoint of `preset` as the original's .safetensors (what users pass to -m)."""
    from birefnet_jax.convert import model_to_state_dict, write_safetensors
    from birefnet_jax.model import random_model
    from birefnet_jax.pretrained import get_preset

    return write_safetensors(model_to_state_dict(random_model(get_preset(preset).replace(resolution=resolution))),
                             path)


def _files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


COMPILED = re.compile(r"(\d+) program\(s\) compiled in ([\d.]+) s")


def run_cold(ckpt: Path, images: Path, output: Path, cache: Path, *, resolution: tuple[int, int], batch: int,
             dtype: str, flags: list[str], run: int, timeout: float | None) -> dict:
    """One `birefnet-jax predict` in a fresh process with $BIREFNET_JAX_CACHE=`cache`."""
    h, w = resolution
    cmd = [sys.executable, "-m", "birefnet_jax", "predict", "-m", str(ckpt), "-o", str(output), str(images),
           "--resolution", f"{w}x{h}", "--batch-size", str(batch), "--dtype", dtype, "-q", "--overwrite", *flags]
    env = {**os.environ, "BIREFNET_JAX_CACHE": str(cache)}
    before = _files(cache)
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"run": run, "error": f"timed out after {timeout} s"}
    wall = time.perf_counter() - start
    report = (proc.stdout + proc.stderr).strip()
    out = {"run": run, "process_wall_s": round(wall, 2), "returncode": proc.returncode,
           "cache_files_before": before, "cache_files_after": _files(cache)}
    compiled = COMPILED.search(report)
    if compiled:
        out["compiles"], out["compile_s"] = int(compiled[1]), float(compiled[2])
    out["report"] = report.splitlines()[-6:]
    return out


def cold_main(args, resolution: tuple[int, int], common: dict, tmp: Path, images: Path) -> None:
    probe = subprocess.run([sys.executable, "-c", "import birefnet_jax, os; print(os.path.dirname("
                            "os.path.dirname(birefnet_jax.__file__)))"], capture_output=True, text=True)
    source = probe.stdout.strip()
    commit = subprocess.run(["git", "-C", source, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    changed = subprocess.run(["git", "-C", source, "status", "--porcelain", "--untracked-files=no"],
                             capture_output=True, text=True)
    start = time.perf_counter()
    ckpt = write_checkpoint(args.preset, resolution, tmp / "ckpt.safetensors")
    print(json.dumps({"kind": "cold_setup", **common, "checkpoint_write_s": round(time.perf_counter() - start, 1),
                      "source": source, "commit": commit.stdout.strip() or None,
                      "uncommitted_changes": bool(changed.stdout.strip()), "label": args.label,
                      "cli_flags": args.cli_flags}), flush=True)
    flags = shlex.split(args.cli_flags or "")
    for dtype in args.dtypes:
        for batch in args.batch_sizes:
            cache = args.cache_dir or tmp / f"cache-{dtype}-{batch}"
            for run in (1, 2):
                result = run_cold(ckpt, images, tmp / f"out-{dtype}-{batch}", cache, resolution=resolution,
                                  batch=batch, dtype=dtype, flags=flags, run=run, timeout=args.timeout)
                print(json.dumps({"kind": "cold", "label": args.label, "dtype": dtype, "batch": batch, **common,
                                  "cache_dir": str(cache), "cli_flags": args.cli_flags, **result,
                                  "load_average": load_average()}), flush=True)


# ----------------------------------------------------------------------------------------------
# The original: a driver written to a temporary file and run with --original-python.

ORIGINAL_DRIVER = r'''
import json, os, resource, sys, time
root, job = sys.argv[1], json.loads(sys.argv[2])
sys.path.insert(0, root)
os.chdir(root)
import cv2
import numpy as np
import torch
from torchvision import transforms
from config import Config
from models.birefnet import BiRefNet
from utils import path_to_image, save_tensor_img

assert Config().bb == job["backbone"], (Config().bb, job["backbone"])
h, w = job["resolution"]
batch = job["batch"]
autocast = job["dtype"] == "bfloat16"
torch.manual_seed(0)
start = time.perf_counter()
device = "cuda" if torch.cuda.is_available() else "cpu"  # the original runs on the GPU where there is one
model = BiRefNet(bb_pretrained=False).eval().to(device)
build = time.perf_counter() - start


def sync():
    if device == "cuda":
        torch.cuda.synchronize()

to_tensor = transforms.Compose([transforms.ToTensor(),
                                transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
names = sorted(os.listdir(job["images"]))
paths = [os.path.join(job["images"], n) for n in names]


def forward(x):
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        return model(x.to(device))[-1].sigmoid().to(torch.float32)


x = torch.stack([to_tensor(path_to_image(paths[i % len(paths)], size=(w, h), color_type="rgb"))
                 for i in range(batch)])
start = time.perf_counter()
forward(x)
sync()
first = time.perf_counter() - start
times = []
for _ in range(job["repeats"]):
    start = time.perf_counter()
    forward(x)
    sync()
    times.append(time.perf_counter() - start)

os.makedirs(job["output"], exist_ok=True)
start = time.perf_counter()
for i in range(0, len(paths), batch):
    group = paths[i:i + batch]
    preds = forward(torch.stack([to_tensor(path_to_image(p, size=(w, h), color_type="rgb")) for p in group]))
    for p, pred in zip(group, preds):
        size = cv2.imread(p, cv2.IMREAD_GRAYSCALE).shape[:2]  # as inference.py sizes each output
        res = torch.nn.functional.interpolate(pred.unsqueeze(0), size=size, mode="bilinear", align_corners=True)
        save_tensor_img(res, os.path.join(job["output"], os.path.splitext(os.path.basename(p))[0] + ".png"))
sync()
wall = time.perf_counter() - start
written = len([n for n in os.listdir(job["output"]) if n.endswith(".png")])
print(json.dumps({
    "impl": "original", "device": device, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
    "build_s": round(build, 2), "compile_s": None, "first_call_s": round(first, 2),
    "latency_s_per_batch": round(float(np.median(times)), 3), "latency_s_all": [round(t, 3) for t in times],
    "images_per_s": round(len(paths) / wall, 3), "e2e_wall_s": round(wall, 2),
    "images_done": len(paths), "masks_written": written,
    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    "peak_device_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device == "cuda" else None,
}))
'''


def prepare_original(checkout: Path, backbone: str, workdir: Path) -> Path:
    """A copy of the original checkout whose config.py selects `backbone`; the checkout is untouched."""
    copy = workdir / "original"
    shutil.copytree(checkout, copy, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.pth", "ckpts",
                                                                   "e_preds", "tutorials", "evaluation"))
    config = copy / "config.py"
    text = config.read_text()
    patched, n = re.subn(r"self\.bb = \[.*?\]\[\d+\]", f"self.bb = {backbone!r}", text, count=1, flags=re.S)
    if n != 1:
        raise SystemExit(f"could not find the backbone choice `self.bb = [...][i]` in {checkout / 'config.py'}")
    config.write_text(patched)
    return copy


# ----------------------------------------------------------------------------------------------


def run_job(job: dict, python: str, script: list[str], timeout: float | None) -> dict:
    """Run one configuration in a fresh process; its last stdout line is the JSON result."""
    start = time.perf_counter()
    try:
        proc = subprocess.run([python, *script, json.dumps(job)], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = [line.strip() for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
        return {"error": f"exit {proc.returncode}: {tail[-1] if tail else 'no output'}"}
    result = json.loads(lines[-1])
    result["process_wall_s"] = round(time.perf_counter() - start, 1)
    return result


def device_info(original_python: str | None) -> dict:
    import jax

    info = {
        "kind": "device_info", "python": platform.python_version(), "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "load_average": load_average(), "jax": jax.__version__,
        "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
    }
    if original_python:
        probe = "import torch, torchvision; print(torch.__version__, torchvision.__version__, torch.get_num_threads())"
        out = subprocess.run([original_python, "-c", probe], capture_output=True, text=True)
        info["original_python"] = original_python
        info["original_torch"] = out.stdout.strip() if out.returncode == 0 else f"error: {out.stderr.strip()[-300:]}"
    return info


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="BiRefNet_lite", help="preset or backbone name (default Swin-T)")
    p.add_argument("--resolution", default="1024x1024", help="model input size WxH")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--images", type=int, default=8, help="generated images of mixed sizes")
    p.add_argument("--repeats", type=int, default=3, help="timed calls for the latency (median), after one warm-up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--original", type=Path, help="checkout of the original BiRefNet to time on the same images")
    p.add_argument("--original-python", default=None,
                   help="Python with torch + torchvision for the original (default: this one)")
    p.add_argument("--device-info", action="store_true", help="print a line describing the host and devices first")
    p.add_argument("--timeout", type=float, default=None, help="seconds allowed to each configuration's process")
    p.add_argument("--cold", action="store_true",
                   help="time the predict command twice in fresh processes (first run, then with the compile cache "
                        "the first one left) instead of the warmed-up loop")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="with --cold: $BIREFNET_JAX_CACHE for both runs (default: a new empty folder)")
    p.add_argument("--cli-flags", default="", help="with --cold: extra flags for the command, e.g. --no-compile-cache")
    p.add_argument("--label", default=None, help="with --cold: a name copied into each line (which code ran)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one of our configurations
    args = p.parse_args()
    if args.repeats < 1 or args.images < 1 or min(args.batch_sizes) < 1:
        p.error("--repeats, --images and --batch-sizes must be at least 1")

    if args.worker:
        print(json.dumps(run_ours(json.loads(args.worker))), flush=True)
        return

    from birefnet_jax.cli import parse_size
    from birefnet_jax.config import backbone_name
    from birefnet_jax.pretrained import get_preset

    resolution = parse_size(args.resolution)
    cfg = get_preset(args.preset)
    backbone = backbone_name(cfg.backbone)
    if args.device_info:
        print(json.dumps(device_info(args.original_python if args.original else None)), flush=True)

    with tempfile.TemporaryDirectory(prefix="birefnet-bench-") as tmp:
        tmp = Path(tmp)
        images = make_images(tmp / "images", args.images, args.seed)
        common = {"preset": args.preset, "backbone": backbone, "resolution": list(resolution), "images": args.images,
                  "image_sizes": sorted({f"{m['width']}x{m['height']}" for m in images}),
                  "weights": "random (speed does not depend on their values)"}
        print(json.dumps({"kind": "setup", **common, "repeats": args.repeats, "load_average": load_average()}),
              flush=True)
        if args.cold:
            cold_main(args, resolution, common, tmp, tmp / "images")
            return
        original_script = None
        if args.original:
            if backbone is None:
                raise SystemExit(f"preset {args.preset} has a custom backbone the original's config cannot name")
            copy = prepare_original(args.original.resolve(), backbone, tmp)
            driver = tmp / "original_driver.py"
            driver.write_text(ORIGINAL_DRIVER)
            original_script = [str(driver), str(copy)]

        for dtype in args.dtypes:
            for batch in args.batch_sizes:
                job = {"preset": args.preset, "backbone": backbone, "resolution": list(resolution), "batch": batch,
                       "dtype": dtype, "repeats": args.repeats, "images": str(tmp / "images")}
                key = {"dtype": dtype, "batch": batch}
                ours = run_job({**job, "output": str(tmp / f"ours-{dtype}-{batch}")}, sys.executable,
                               [str(Path(__file__).resolve()), "--worker"], args.timeout)
                print(json.dumps({"kind": "result", **key, **common, **ours, "load_average": load_average()}),
                      flush=True)
                if original_script is None:
                    continue
                orig = run_job({**job, "output": str(tmp / f"orig-{dtype}-{batch}")},
                               args.original_python or sys.executable, original_script, args.timeout)
                print(json.dumps({"kind": "result", **key, **common, **orig, "load_average": load_average()}),
                      flush=True)
                if "error" not in ours and "error" not in orig:
                    print(json.dumps({
                        "kind": "ratio", **key, "preset": args.preset, "resolution": list(resolution),
                        "images_per_s_ours_over_original": round(ours["images_per_s"] / orig["images_per_s"], 3),
                        "latency_ours_over_original": round(ours["latency_s_per_batch"] / orig["latency_s_per_batch"],
                                                            3),
                        "peak_rss_ours_over_original": round(ours["peak_rss_mb"] / orig["peak_rss_mb"], 3),
                    }), flush=True)


if __name__ == "__main__":
    main()
