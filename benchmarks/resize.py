"""Seconds per input resize (`birefnet_jax.io.resize.resize_linear`, the original's cv2.resize INTER_LINEAR)
and agreement of its two backends: OpenCV against the NumPy path of the core install.

    python benchmarks/resize.py [--sizes 3000x4000:1024x1024,480x640:1024x1024] [--repeats 7] [--seed 0]

Prints one JSON line per size pair (source HxW -> output HxW), on uint8 RGB images (a smooth colour
pattern with noise, like a photo; the comparison does not depend on the content). ``opencv_s`` is
cv2.resize with OpenCV's default threads, ``opencv_1thread_s`` with `cv2.setNumThreads(1)` (what each of
predict's decoding workers gets when they all resize at once), ``numpy_s`` the NumPy path; each the
fastest of the repeats. ``differing_pixels`` is the share of output values where the NumPy path and
OpenCV differ (expect 0: the NumPy path is OpenCV's fixed-point arithmetic), ``max_abs_diff`` the
largest difference in levels; ``float32_max_abs_diff`` the same for float32 inputs in [0, 1] (rounding:
~1e-7).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np

from birefnet_jax.io.resize import resize_linear

DEFAULT_SIZES = "3000x4000:1024x1024,1080x1920:1024x1024,480x640:1024x1024,2048x2048:1024x1024,333x517:1024x1024"


def make_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    image = np.stack([np.sin(xx / 37.0 + c) * np.cos(yy / 53.0 - c) for c in range(3)], -1) * 0.4 + 0.5
    image += rng.random((h, w, 3), dtype=np.float32) * 0.2 - 0.1
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def best_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def parse_sizes(text: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    pairs = []
    for item in text.split(","):
        src, dst = item.split(":")
        pairs.append((tuple(int(v) for v in src.split("x")), tuple(int(v) for v in dst.split("x"))))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="comma-separated SRC_HxW:DST_HxW pairs")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import cv2

    rng = np.random.default_rng(args.seed)
    threads = cv2.getNumThreads()
    for src, dst in parse_sizes(args.sizes):
        x = make_image(rng, *src)
        row = {"src": f"{src[0]}x{src[1]}", "dst": f"{dst[0]}x{dst[1]}", "channels": 3,
               "opencv": cv2.__version__, "opencv_threads": threads, "numpy": np.__version__,
               "machine": platform.machine(), "python": platform.python_version()}
        ref = resize_linear(x, dst, backend="opencv")
        got = resize_linear(x, dst, backend="numpy")
        diff = np.abs(got.astype(np.int16) - ref)
        row["differing_pixels"] = float((diff > 0).mean())
        row["max_abs_diff"] = int(diff.max())
        xf = x.astype(np.float32) / 255
        row["float32_max_abs_diff"] = float(np.abs(resize_linear(xf, dst, backend="numpy")
                                                   - resize_linear(xf, dst, backend="opencv")).max())
        row["opencv_s"] = best_time(lambda: resize_linear(x, dst, backend="opencv"), args.repeats)  # noqa: B023
        cv2.setNumThreads(1)
        try:
            row["opencv_1thread_s"] = best_time(lambda: resize_linear(x, dst, backend="opencv"), args.repeats)  # noqa: B023
        finally:
            cv2.setNumThreads(threads)
        row["numpy_s"] = best_time(lambda: resize_linear(x, dst, backend="numpy"), args.repeats)  # noqa: B023
        row["numpy_over_opencv"] = row["numpy_s"] / row["opencv_s"]
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
