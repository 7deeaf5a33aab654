"""Seconds per foreground refinement (blur fusion, radius 90 then 6): this project against the original's
OpenCV (CPU) version.

    python benchmarks/refine.py [--sizes 1024x1024,3000x4000] [--radius 90] [--repeats 3]
                                [--border reflect101] [--original /path/to/BiRefNet] [--torch]

Prints one JSON line per image size (HxW). ``jax_s`` is `estimate_foreground` on arrays already on the
default JAX device, compiled beforehand (a warm-up call); ``jax_uint8_s`` is `refine_foreground` from host
uint8 arrays to a host uint8 array (transfers included). ``opencv_s`` is the original's CPU path on float32
arrays: with ``--original`` its own `FB_blur_fusion_foreground_estimator_cpu_2` (importing it needs torch
and torchvision), otherwise the same sequence of `cv2.blur` calls and NumPy arithmetic, written here.
``speedup`` is opencv_s / jax_s; ``max_abs_diff`` compares the two results (expect ~1e-6 with border
reflect101, which is what the OpenCV version computes). With ``--torch``, ``torch_s`` is the original's
tensor (GPU) path, written here with torch calls, against ``jax_replicate_s`` (border replicate, what that
path computes). Each figure is the median over repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import numpy as np

from birefnet_jax.inference.refine import estimate_foreground, refine_foreground


def make_inputs(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """A smooth colour image and a soft elliptic mask with a ramp a few pixels wide."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    image = np.stack([np.sin(xx / 37.0 + c) * np.cos(yy / 53.0 - c) for c in range(3)], -1) * 0.4 + 0.5
    image = np.clip(image + rng.random((h, w, 3), dtype=np.float32) * 0.1, 0, 1)
    r = np.hypot((yy - h / 2) / (0.35 * h), (xx - w / 2) / (0.3 * w))
    mask = np.clip((1 - r) * min(h, w) / 8, 0, 1)
    return (image * 255).astype(np.uint8), (mask * 255).astype(np.uint8)


def opencv_two_pass(image: np.ndarray, alpha: np.ndarray, r: int) -> np.ndarray:
    """The original CPU path, step for step: float32 arrays, cv2.blur with its default (reflect-101) border."""
    import cv2

    def fuse(f, b, a, size):
        blurred_a = cv2.blur(a, (size, size))[:, :, None]
        blurred_f = cv2.blur(f * a, (size, size)) / (blurred_a + 1e-5)
        blurred_b = cv2.blur(b * (1 - a), (size, size)) / ((1 - blurred_a) + 1e-5)
        f = blurred_f + a * (image - a * blurred_f - (1 - a) * blurred_b)
        return np.clip(f, 0, 1), blurred_b

    alpha = alpha[:, :, None]
    f, b = fuse(image, image, alpha, r)
    return fuse(f, b, alpha, 6)[0]


def torch_two_pass(image, alpha, r: int):
    """The original tensor path, step for step (NCHW tensors, replicate pad + average pool), on its device."""
    import torch
    import torch.nn.functional as F

    def mean_blur(x, size):
        lo, hi = (size - 1) // 2, size // 2
        return F.avg_pool2d(F.pad(x, (lo, hi, lo, hi), mode="replicate"), size, stride=1)

    def fuse(f, b, a, size):
        blurred_a = mean_blur(a, size)
        blurred_f = mean_blur(f * a, size) / (blurred_a + 1e-5)
        blurred_b = mean_blur(b * (1 - a), size) / ((1 - blurred_a) + 1e-5)
        f = blurred_f + a * (image - a * blurred_f - (1 - a) * blurred_b)
        return torch.clamp(f, 0, 1), blurred_b

    with torch.no_grad():
        f, b = fuse(image, image, alpha, r)
        out = fuse(f, b, alpha, 6)[0]
    if out.is_cuda:
        torch.cuda.synchronize()
    return out


def load_original(path: str):
    """The original's own CPU function, or None (with the reason on stderr) if it cannot be imported."""
    sys.path.insert(0, path)
    try:
        from image_proc import FB_blur_fusion_foreground_estimator_cpu_2  # type: ignore[import-not-found]
    except Exception as exc:  # torch / torchvision missing, wrong path
        print(f"--original: cannot import image_proc from {path} ({exc}); using the cv2 sequence", file=sys.stderr)
        return None
    finally:
        sys.path.remove(path)
    return FB_blur_fusion_foreground_estimator_cpu_2


def median_seconds(repeats: int, fn, *args, **kwargs) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args, **kwargs))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1024x1024,3000x4000", help="comma-separated HxW")
    parser.add_argument("--radius", type=int, default=90)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--border", default="reflect101", choices=["reflect101", "replicate"])
    parser.add_argument("--original", default=None, help="path of an original BiRefNet checkout (optional)")
    parser.add_argument("--skip-opencv", action="store_true", help="time this project only")
    parser.add_argument("--torch", action="store_true",
                        help="also time the original's tensor path (torch, on CUDA if available); compared with"
                             " this project's border replicate")
    args = parser.parse_args()

    original = load_original(args.original) if args.original else None
    baseline = original or opencv_two_pass
    try:
        import cv2

        cv2_threads = cv2.getNumThreads()
    except ImportError:
        cv2_threads, args.skip_opencv = None, True
    rng = np.random.default_rng(0)
    for spec in args.sizes.split(","):
        h, w = (int(v) for v in spec.lower().split("x"))
        image_u8, mask_u8 = make_inputs(rng, h, w)
        image = image_u8.astype(np.float32) / np.float32(255)
        alpha = mask_u8.astype(np.float32) / np.float32(255)
        image_d, alpha_d = jax.device_put(image), jax.device_put(alpha)

        t0 = time.perf_counter()
        fg = np.asarray(estimate_foreground(image_d, alpha_d, args.radius, border=args.border))  # compiles
        first = time.perf_counter() - t0
        refine_foreground(image_u8, mask_u8, args.radius, border=args.border)  # warm-up of the uint8 path
        row = {
            "size": f"{h}x{w}",
            "radius": args.radius,
            "border": args.border,
            "jax_backend": jax.default_backend(),
            "jax_device": str(jax.devices()[0].device_kind),
            "jax_first_call_s": round(first, 4),
            "jax_s": median_seconds(args.repeats, estimate_foreground, image_d, alpha_d, args.radius,
                                    border=args.border),
            "jax_uint8_s": median_seconds(args.repeats, refine_foreground, image_u8, mask_u8, args.radius,
                                          border=args.border),
        }
        if not args.skip_opencv:
            reference = baseline(image, alpha, args.radius)
            row["opencv_impl"] = "original image_proc" if original else "cv2 sequence"
            row["opencv_threads"] = cv2_threads
            row["opencv_s"] = median_seconds(args.repeats, baseline, image, alpha, args.radius)
            row["speedup"] = round(row["opencv_s"] / row["jax_s"], 3)
            row["max_abs_diff"] = float(np.abs(fg - reference).max())
        if args.torch:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
            timg = torch.from_numpy(image).permute(2, 0, 1)[None].to(device)
            talpha = torch.from_numpy(alpha)[None, None].to(device)
            tfg = torch_two_pass(timg, talpha, args.radius)[0].permute(1, 2, 0).cpu().numpy()
            rep = np.asarray(estimate_foreground(image_d, alpha_d, args.radius, border="replicate"))
            row["torch_device"] = torch.cuda.get_device_name() if device == "cuda" else "cpu"
            row["torch_s"] = median_seconds(args.repeats, torch_two_pass, timg, talpha, args.radius)
            row["jax_replicate_s"] = median_seconds(args.repeats, estimate_foreground, image_d, alpha_d, args.radius,
                                                    border="replicate")
            row["speedup_vs_torch"] = round(row["torch_s"] / row["jax_replicate_s"], 3)
            row["max_abs_diff_torch"] = float(np.abs(rep - tfg).max())
        row.update(repeats=args.repeats, cpus=os.cpu_count(), machine=platform.machine())
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
