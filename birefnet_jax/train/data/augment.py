"""Training augmentations of the original BiRefNet, on NumPy arrays, with an explicit random generator.

What happens to one training pair, in this order (the original's `MyData.__getitem__` then `preproc`):

1. background synthesis (only with ``background_synthesis=True``): the background is replaced by a plain
   colour and the foreground kept, ``image * alpha + colour * (1 - alpha)`` with ``alpha = mask / 255``.
   The colour is, with probability 0.4, a grey level uniform in 0..255; with probability 0.4, the
   foreground's mean colour (the sum of ``image * alpha`` divided by the number of pixels where the mask is
   non-zero, as the original computes it) moved towards 255 or towards 0, each with probability 1/2, by a
   uniform fraction in [0, 0.2) of its distance to that end; otherwise a uniform random level per channel.
   The composite is truncated to uint8, as the original's ``astype`` does.
2. ``flip``: left-right mirror of image and mask, probability 0.5.
3. ``crop``: always applied when asked for; with ``border = int(0.1 * min(w, h))``, a window of width
   uniform in [w - border, w) and height uniform in [h - border, h), centred.
4. ``rotate``: probability 0.2, an integer angle uniform in [-15, 14] degrees, counter-clockwise, the same
   size, bicubic (PIL) on both image and mask, black outside.
5. ``enhance`` (image only): PIL ``ImageEnhance`` Brightness and Contrast with factors k/10, k uniform in
   5..15, then Color with k in 0..20, then Sharpness with k in 0..30 (all bounds inclusive).
6. ``pepper`` (image only): ``int(0.0015 * H * W)`` positions drawn uniformly (with replacement, so they may
   coincide) are set to 0 or 255 (all three channels, each value with probability 1/2).

The order is fixed whatever the order of ``methods``; a name given twice counts once.  The original's
default is ``DEFAULT_METHODS`` (flip, enhance, rotate, pepper; crop is opt-in) and, when it synthesises
backgrounds, only ``BACKGROUND_SYNTHESIS_METHODS`` (flip); `default_methods` returns the one that fits.

Randomness.  Every draw comes from the ``numpy.random.Generator`` passed in, so an example is a function of
its seed.  The original draws from Python's ``random`` module (flip and rotate decisions, enhancement
factors, background choice, pepper) and from NumPy's global state (crop sizes, rotation angle), interleaved
in that order and seeded by nobody in particular.  Here the distributions are the same (``rng.random() < p``
for an event of probability p, ``rng.integers(lo, hi)`` where the original used ``np.random.randint(lo, hi)``
with hi excluded, ``rng.integers(lo, hi, endpoint=True)`` where it used ``random.randint(lo, hi)`` with hi
included), but the streams are not: the same seed does not reproduce the original's samples.  Other stream
differences: all parameters are drawn before any pixel is touched (`sample_params`), in the order the
operations run; the background's direction and fraction are drawn as two separate numbers; the pepper
noise draws all rows, then all columns, then all values (the original draws row, column, value per pixel).

Where the original fails, this module decides: a crop of an image under 10 pixels on a side
(``border == 0``, where ``np.random.randint(w, w)`` raises) keeps the whole image and draws nothing; the
"similar colour" background of an empty mask (a division by zero in the original) uses the whole image's
mean colour.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageEnhance

# The operations, in the order they run.
METHODS: tuple[str, ...] = ("flip", "crop", "rotate", "enhance", "pepper")
# The original's `preproc_methods` without and with background synthesis.
DEFAULT_METHODS: tuple[str, ...] = ("flip", "enhance", "rotate", "pepper")
BACKGROUND_SYNTHESIS_METHODS: tuple[str, ...] = ("flip",)

FLIP_PROB = 0.5
# Crop window: border = int(CROP_BORDER_FRACTION * min(w, h)); sizes uniform in [size - border, size).
CROP_BORDER_FRACTION = 0.1
ROTATE_PROB = 0.2
# Rotation angle in degrees, uniform over the integers in [ROTATE_ANGLE_LOW, ROTATE_ANGLE_HIGH).
ROTATE_ANGLE_LOW = -15
ROTATE_ANGLE_HIGH = 15
# Enhancement factors are k / ENHANCE_DIVISOR with k uniform over these integers, both bounds included.
ENHANCE_DIVISOR = 10.0
BRIGHTNESS_RANGE = (5, 15)
CONTRAST_RANGE = (5, 15)
COLOR_RANGE = (0, 20)
SHARPNESS_RANGE = (0, 30)
# Pepper noise: int(PEPPER_FRACTION * H * W) pixels set to one of PEPPER_VALUES.
PEPPER_FRACTION = 0.0015
PEPPER_VALUES = (0, 255)
# Background synthesis: a grey level with BG_GREY_PROB, a colour near the foreground's mean with
# BG_SIMILAR_PROB, a random colour otherwise; the near colour moves by up to BG_SIMILAR_MAX_SHIFT of the
# way towards 255 or 0.
BG_GREY_PROB = 0.4
BG_SIMILAR_PROB = 0.4
BG_SIMILAR_MAX_SHIFT = 0.2

_BG_KINDS = ("grey", "similar", "random")


def default_methods(background_synthesis: bool = False) -> tuple[str, ...]:
    """The original's methods: `DEFAULT_METHODS`, or only the flip when backgrounds are synthesised."""
    return BACKGROUND_SYNTHESIS_METHODS if background_synthesis else DEFAULT_METHODS


@dataclass(frozen=True)
class BackgroundParams:
    """How the background is replaced.

    kind: "grey" (``colour`` holds the level three times), "similar" (``direction`` +1 towards 255 or -1
    towards 0, by ``shift`` of the distance; the colour depends on the image), or "random" (``colour``).
    """

    kind: str
    colour: tuple[int, int, int] | None = None
    direction: int = 0
    shift: float = 0.0


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields, not instances
class AugmentParams:
    """Every random choice for one example, drawn by `sample_params` and applied by `apply_params`.

    size: (height, width) of the input.  crop: (left, top, right, bottom), right/bottom excluded, or None.
    angle: degrees counter-clockwise, or None when the rotation does not fire.  enhance: the Brightness,
    Contrast, Color and Sharpness factors, or None.  pepper_rows / pepper_cols / pepper_values: the noise,
    on the image as it is after the crop.
    """

    size: tuple[int, int]
    background: BackgroundParams | None = None
    flip: bool = False
    crop: tuple[int, int, int, int] | None = None
    angle: int | None = None
    enhance: tuple[float, float, float, float] | None = None
    pepper_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    pepper_cols: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    pepper_values: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) after the crop (the other operations keep the size)."""
        if self.crop is None:
            return self.size
        left, top, right, bottom = self.crop
        return bottom - top, right - left


def _check_methods(methods: Sequence[str]) -> frozenset[str]:
    if isinstance(methods, (str, bytes)):
        raise TypeError(f"methods must be a sequence of names such as ('flip', 'rotate'), not the string {methods!r}")
    try:
        names = list(methods)
    except TypeError:
        raise TypeError(f"methods must be a sequence of names, got {type(methods).__name__}") from None
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise ValueError(
            f"unknown augmentation method(s) {', '.join(repr(m) for m in unknown)}; valid: {', '.join(METHODS)}"
        )
    return frozenset(names)


def _check_rng(rng) -> None:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), got {type(rng).__name__}"
        )


def _check_pair(image, mask) -> None:
    for name, value in (("image", image), ("mask", mask)):
        if not isinstance(value, np.ndarray):
            raise TypeError(f"{name} must be a NumPy array, got {type(value).__name__} (use np.asarray)")
        if value.dtype != np.uint8:
            raise TypeError(f"{name} must have dtype uint8 (0..255), got {value.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must have shape (H, W, 3) (RGB), got {image.shape}")
    if mask.ndim != 2:
        raise ValueError(f"mask must have shape (H, W) (one channel), got {mask.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image is empty: shape {image.shape}")
    if image.shape[:2] != mask.shape:
        raise ValueError(f"image and mask sizes differ: image (H, W) = {image.shape[:2]}, mask {mask.shape}")


def _draw_background(rng: np.random.Generator) -> BackgroundParams:
    choice = rng.random()
    if choice < BG_GREY_PROB:
        level = int(rng.integers(0, 255, endpoint=True))
        return BackgroundParams("grey", colour=(level, level, level))
    if choice < BG_GREY_PROB + BG_SIMILAR_PROB:
        direction = 1 if rng.random() < 0.5 else -1
        return BackgroundParams("similar", direction=direction, shift=float(rng.random() * BG_SIMILAR_MAX_SHIFT))
    r, g, b = (int(v) for v in rng.integers(0, 255, size=3, endpoint=True))
    return BackgroundParams("random", colour=(r, g, b))


def _draw_enhance(rng: np.random.Generator) -> tuple[float, float, float, float]:
    ranges = (BRIGHTNESS_RANGE, CONTRAST_RANGE, COLOR_RANGE, SHARPNESS_RANGE)
    return tuple(int(rng.integers(lo, hi, endpoint=True)) / ENHANCE_DIVISOR for lo, hi in ranges)


def sample_params(
    rng: np.random.Generator,
    height: int,
    width: int,
    methods: Sequence[str] = DEFAULT_METHODS,
    background_synthesis: bool = False,
) -> AugmentParams:
    """Draw every random choice for an image of ``height`` x ``width``, without touching pixels.

    The draws are made in the order the operations run, so ``augment(image, mask, rng, ...)`` equals
    ``apply_params(image, mask, sample_params(rng, *mask.shape, ...))`` for the same state of ``rng``.
    """
    _check_rng(rng)
    wanted = _check_methods(methods)
    height, width = int(height), int(width)
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be positive, got {height} x {width}")

    background = _draw_background(rng) if background_synthesis else None
    flip = "flip" in wanted and bool(rng.random() < FLIP_PROB)

    crop = None
    h, w = height, width
    if "crop" in wanted:
        border = int(min(width, height) * CROP_BORDER_FRACTION)
        if border > 0:
            win_w = int(rng.integers(width - border, width))
            win_h = int(rng.integers(height - border, height))
            crop = ((width - win_w) >> 1, (height - win_h) >> 1, (width + win_w) >> 1, (height + win_h) >> 1)
            w, h = crop[2] - crop[0], crop[3] - crop[1]

    angle = None
    if "rotate" in wanted and rng.random() < ROTATE_PROB:
        angle = int(rng.integers(ROTATE_ANGLE_LOW, ROTATE_ANGLE_HIGH))

    enhance = _draw_enhance(rng) if "enhance" in wanted else None

    params = dict(size=(height, width), background=background, flip=flip, crop=crop, angle=angle, enhance=enhance)
    if "pepper" in wanted:
        count = int(PEPPER_FRACTION * h * w)
        params["pepper_rows"] = rng.integers(0, h, size=count)
        params["pepper_cols"] = rng.integers(0, w, size=count)
        params["pepper_values"] = np.asarray(PEPPER_VALUES, np.uint8)[rng.integers(0, len(PEPPER_VALUES), size=count)]
    return AugmentParams(**params)


def synthesize_background(image: np.ndarray, mask: np.ndarray, background: BackgroundParams) -> np.ndarray:
    """The image with its background (where ``mask < 255``) blended towards the colour ``background`` gives."""
    if background.kind not in _BG_KINDS:
        raise ValueError(f"unknown background kind {background.kind!r}; valid: {', '.join(_BG_KINDS)}")
    foreground = image.astype(np.float32)
    alpha = (mask / 255.0).astype(np.float32)[..., None]
    if background.kind == "similar":
        count = np.count_nonzero(mask)
        if count:
            mean = (foreground * alpha).sum(axis=(0, 1), dtype=np.float64) / count
        else:
            mean = foreground.mean(axis=(0, 1), dtype=np.float64)
        if background.direction > 0:
            colour = mean + (255.0 - mean) * background.shift
        else:
            colour = mean - mean * background.shift
    else:
        colour = np.asarray(background.colour, np.float64)
    colour = colour.astype(np.float32)
    blended = foreground * alpha + colour * (1.0 - alpha)
    return np.clip(blended, 0, 255).astype(np.uint8)


def enhance_colour(image: np.ndarray, factors: tuple[float, float, float, float]) -> np.ndarray:
    """PIL Brightness, Contrast, Color and Sharpness enhancement, in that order, with ``factors``."""
    pil = Image.fromarray(image, "RGB")
    enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color, ImageEnhance.Sharpness)
    if len(factors) != len(enhancers):
        raise ValueError(f"expected {len(enhancers)} factors (brightness, contrast, color, sharpness), got {factors!r}")
    for enhancer, factor in zip(enhancers, factors, strict=True):
        pil = enhancer(pil).enhance(factor)
    return np.array(pil)


def apply_params(image: np.ndarray, mask: np.ndarray, params: AugmentParams) -> tuple[np.ndarray, np.ndarray]:
    """Apply the choices in ``params`` to an image/mask pair; returns new arrays (the inputs are not changed)."""
    _check_pair(image, mask)
    if tuple(mask.shape) != tuple(params.size):
        raise ValueError(f"params were drawn for (H, W) = {tuple(params.size)}, but the mask is {mask.shape}")

    if params.background is not None:
        image = synthesize_background(image, mask, params.background)
    if params.flip:
        image, mask = image[:, ::-1], mask[:, ::-1]
    if params.crop is not None:
        left, top, right, bottom = params.crop
        image, mask = image[top:bottom, left:right], mask[top:bottom, left:right]
    if params.angle is not None:
        resample = Image.Resampling.BICUBIC
        image = np.array(Image.fromarray(np.ascontiguousarray(image), "RGB").rotate(params.angle, resample))
        mask = np.array(Image.fromarray(np.ascontiguousarray(mask), "L").rotate(params.angle, resample))
    if params.enhance is not None:
        image = enhance_colour(np.ascontiguousarray(image), params.enhance)

    image = np.array(image, dtype=np.uint8, order="C")  # a fresh, writable array in every case
    mask = np.array(mask, dtype=np.uint8, order="C")
    if len(params.pepper_rows):
        image[params.pepper_rows, params.pepper_cols] = params.pepper_values[:, None]
    return image, mask


def augment(
    image: np.ndarray,
    mask: np.ndarray,
    rng: np.random.Generator,
    methods: Sequence[str] = DEFAULT_METHODS,
    background_synthesis: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Augment one training pair as the original does (see the module docstring).

    image: uint8 (H, W, 3) RGB; mask: uint8 (H, W).  Returns new uint8 arrays of the same kinds; their size
    changes only with ``crop``.  All randomness comes from ``rng``.
    """
    _check_pair(image, mask)
    params = sample_params(rng, mask.shape[0], mask.shape[1], methods, background_synthesis)
    return apply_params(image, mask, params)
