"""Shape buckets: the few input sizes a folder of mixed images is resized to, so that a folder
compiles a handful of programs rather than one per image size."""

from __future__ import annotations

import dataclasses
import math

STEP = 32  # the backbone downsamples 32x: every model input side is a multiple of this


@dataclasses.dataclass(frozen=True)
class SizePolicy:
    """How an image's size becomes the model's input size (height, width).

    fixed: every image goes to this size (the checkpoint's resolution, or `--resolution WxH`), as the
      original's loader does.
    auto: each image keeps its aspect ratio and, up to `max_pixels`, its size; the sides are rounded to
      multiples of `step` (a multiple of 32). A coarser step means fewer buckets (compilations) and a
      little more aspect distortion; 32 is the finest the model takes.
    """

    fixed: tuple[int, int] | None = None
    max_pixels: int = 1024 * 1024
    step: int = 128

    def __post_init__(self):
        if self.fixed is not None:
            h, w = self.fixed
            if h < STEP or w < STEP or h % STEP or w % STEP:
                raise ValueError(f"resolution {w}x{h}: both sides must be positive multiples of {STEP}")
        if self.step < STEP or self.step % STEP:
            raise ValueError(f"bucket step {self.step} must be a positive multiple of {STEP}")
        if self.max_pixels < self.step * self.step:
            raise ValueError(f"max pixels {self.max_pixels} is below one {self.step}x{self.step} bucket")

    def bucket(self, width: int, height: int) -> tuple[int, int]:
        """The model input size (height, width) for an image of `width` x `height` pixels."""
        if self.fixed is not None:
            return self.fixed
        scale = min(1.0, math.sqrt(self.max_pixels / (width * height)))
        s = self.step
        h = max(s, round(height * scale / s) * s)
        w = max(s, round(width * scale / s) * s)
        while h * w > self.max_pixels:  # rounding up may overshoot the cap: shave the longer side
            if h >= w and h > s:
                h -= s
            elif w > s:
                w -= s
            else:
                break
        return h, w

    def describe(self) -> str:
        if self.fixed is not None:
            return f"{self.fixed[1]}x{self.fixed[0]}"
        return f"auto (up to {self.max_pixels / 1e6:.2f} MP, sides in steps of {self.step})"


def parse_size(text: str) -> tuple[int, int]:
    """'WxH' (or one number for a square), as the command line and the original write sizes ->
    (height, width), each a positive multiple of 32. Raises ValueError (the command line turns it into a
    usage error)."""
    w, sep, h = text.lower().partition("x")
    try:
        width, height = int(w), int(h if sep else w)
    except ValueError:
        raise ValueError(f"{text!r}: expected WIDTHxHEIGHT, e.g. 1024x1024") from None
    if width < 32 or height < 32 or width % 32 or height % 32:
        near = f"{max(32, round(width / 32) * 32)}x{max(32, round(height / 32) * 32)}"
        raise ValueError(f"{text!r}: width and height must be positive multiples of 32 "
                         f"(the backbone downsamples 32x), e.g. {near}")
    return height, width
