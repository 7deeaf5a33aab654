"""Make the README's picture, docs/images/example.png: an input image, its predicted mask and its
cut-out (RGBA over a checkerboard) side by side, all made by this project.

    python docs/make_readme_figure.py [--workdir runs/figure] [--image syn_00004] [--out docs/images/example.png]

1. Trains the quickstart model (`python train.py --config configs/quickstart.py --workdir runs/figure`:
   a small BiRefNet on a generated data set of thin structures, a few minutes on a CPU), or reuses
   that workdir where the run has finished (it wrote `predictions.png`); an unfinished run resumes.
2. Predicts one of the synthetic validation images with the last checkpoint, through the command a
   user runs: `birefnet-jax predict -m <workdir>/checkpoints/<last step> -o <tmp> <image> --cutout`.
3. Composes image | mask | cut-out over a checkerboard with Pillow, scaled up for legibility.

Run from anywhere; paths are relative to the repository root.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
VALIDATION = Path("data") / "DIS5K" / "SYN-VD" / "im"  # under the workdir: the quickstart's held-out set

SCALE = 2  # the quickstart works at 128x128; show each panel at 256x256
GAP = 8
LABEL_HEIGHT = 20
CHECKER = 16  # checkerboard square, in output pixels
BACKGROUND = (255, 255, 255)


def train(workdir: Path) -> None:
    """Train the quickstart model into `workdir` unless a finished run is there."""
    if (workdir / "predictions.png").exists():
        print(f"reusing the finished quickstart run in {workdir}")
        return
    command = [sys.executable, "train.py", "--config", "configs/quickstart.py", "--workdir", str(workdir)]
    print("running:", " ".join(command))
    subprocess.run(command, cwd=ROOT, check=True)


def last_checkpoint(workdir: Path) -> Path:
    """The newest step folder under <workdir>/checkpoints (each is a model checkpoint)."""
    steps = [p for p in (workdir / "checkpoints").iterdir() if p.is_dir() and p.name.isdigit()]
    if not steps:
        sys.exit(f"no checkpoint under {workdir / 'checkpoints'}")
    return max(steps, key=lambda p: int(p.name))


def predict(checkpoint: Path, image: Path, output: Path) -> tuple[Path, Path]:
    """The mask and cut-out of `image`, written by `birefnet-jax predict` under `output`."""
    exe = shutil.which("birefnet-jax")
    command = [exe] if exe else [sys.executable, "-m", "birefnet_jax"]
    command += ["predict", "-m", str(checkpoint), "-o", str(output), str(image), "--cutout", "--quiet"]
    print("running:", " ".join(command))
    subprocess.run(command, cwd=ROOT, check=True)
    return output / f"{image.stem}.png", output / f"{image.stem}_cutout.png"


def checkerboard(size: tuple[int, int]) -> Image.Image:
    board = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(board)
    for y in range(0, size[1], CHECKER):
        for x in range(0, size[0], CHECKER):
            if (x // CHECKER + y // CHECKER) % 2:
                draw.rectangle([x, y, x + CHECKER - 1, y + CHECKER - 1], fill=(204, 204, 204))
    return board


def compose(image: Image.Image, mask: Image.Image, cutout: Image.Image) -> Image.Image:
    """image | mask | cut-out over a checkerboard, each scaled by SCALE, with a label above each."""
    w, h = image.size[0] * SCALE, image.size[1] * SCALE
    panels = [image.convert("RGB").resize((w, h), Image.Resampling.LANCZOS),
              mask.convert("RGB").resize((w, h), Image.Resampling.LANCZOS)]
    rgba = cutout.convert("RGBA").resize((w, h), Image.Resampling.LANCZOS)
    over = checkerboard((w, h))
    over.paste(rgba, (0, 0), rgba)  # alpha-composited over the board
    panels.append(over)
    labels = ["input", "predicted mask", "cut-out (RGBA)"]
    figure = Image.new("RGB", (3 * w + 2 * GAP, h + LABEL_HEIGHT), BACKGROUND)
    draw = ImageDraw.Draw(figure)
    for i, (panel, label) in enumerate(zip(panels, labels, strict=True)):
        x = i * (w + GAP)
        figure.paste(panel, (x, LABEL_HEIGHT))
        draw.text((x + 2, 4), label, fill=(0, 0, 0))
    return figure


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("runs/figure"), help="quickstart run to train or reuse")
    parser.add_argument("--image", default="syn_00004", help="stem of a synthetic validation image")
    parser.add_argument("--out", type=Path, default=Path("docs/images/example.png"))
    args = parser.parse_args(argv)
    workdir = args.workdir if args.workdir.is_absolute() else ROOT / args.workdir
    out = args.out if args.out.is_absolute() else ROOT / args.out

    train(workdir)
    checkpoint = last_checkpoint(workdir)
    (image_path,) = (workdir / VALIDATION).glob(f"{args.image}.*")
    with tempfile.TemporaryDirectory() as tmp:
        mask_path, cutout_path = predict(checkpoint, image_path, Path(tmp))
        with Image.open(image_path) as image, Image.open(mask_path) as mask, Image.open(cutout_path) as cutout:
            figure = compose(image, mask, cutout)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.save(out, optimize=True)
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out} "
          f"({figure.size[0]}x{figure.size[1]}, {out.stat().st_size / 1024:.0f} KB) from {checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
