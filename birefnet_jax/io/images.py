"""Decoding any image PIL reads into 8-bit RGB (plus alpha), with the checks a batch tool needs:
EXIF orientation, every mode (grayscale, palette, 16-bit, CMYK), a pixel limit, and errors that
name the file and the cause. Also the ImageNet normalisation the model's input expects.

Light core: only NumPy, PIL and the standard library, so decoding workers start fast and never
need OpenCV.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")
VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".avi", ".mov", ".webm", ".mkv")
LIST_EXTENSIONS: tuple[str, ...] = (".txt", ".lst")

# 20000 x 20000: far above any photo, low enough that one image cannot take the machine's memory
# (an RGB decode of this size is 1.2 GB). PIL's own limit (~89 Mpx) is too low for big scans.
DEFAULT_MAX_PIXELS = 400_000_000

# The model's input normalisation (the original's loader: ImageNet statistics, RGB, values in [0, 1]).
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)

_ORIENTATION_TAG = 0x0112
_EXIF_TRANSPOSE = {  # the mapping of PIL.ImageOps.exif_transpose
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# What PIL raises for files it identified but cannot decode (truncated GIF/PNG raise the last two).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)

# PIL's limits are module globals; they are only switched under this lock, and only for the short
# header parse (or, if someone turned LOAD_TRUNCATED_IMAGES on, for the load).
_PIL_GLOBALS = threading.Lock()


def normalize(images: np.ndarray) -> np.ndarray:
    """RGB images (..., H, W, 3) -> float32 normalised with the ImageNet mean and std, as the
    original's loader does.

    Unsigned integer images are scaled by their type's maximum (uint8: 255, uint16: 65535); float
    images must already be in [0, 1]. Anything else is refused rather than guessed at: images
    normalised already, floats in [0, 255], and signed integers (`np.array(a_list)` gives int64,
    whose maximum would turn 0..255 pixels black).
    """
    images = np.asarray(images)
    if images.shape[-1:] != (3,):
        raise ValueError(f"expected RGB images with 3 channels last, got shape {images.shape}")
    if np.issubdtype(images.dtype, np.signedinteger):
        raise ValueError(f"signed integer images ({images.dtype}) have no pixel scale: convert 0..255 values with "
                         "images.astype(np.uint8) (16-bit ones with images.astype(np.uint16)), or pass floats in "
                         "[0, 1] (images / 255)")
    if np.issubdtype(images.dtype, np.integer):
        scaled = images.astype(np.float32) / np.float32(np.iinfo(images.dtype).max)
    elif np.issubdtype(images.dtype, np.floating):
        lo, hi = (float(images.min()), float(images.max())) if images.size else (0.0, 1.0)
        if lo < 0 or hi > 1:
            raise ValueError(f"float images must be in [0, 1] (got values in [{lo:.3g}, {hi:.3g}]); already "
                             "normalised input needs no normalize(), and 0..255 floats should be divided by 255")
        scaled = images.astype(np.float32)
    else:
        raise ValueError(f"cannot normalise images of dtype {images.dtype}")
    return (scaled - IMAGENET_MEAN) / IMAGENET_STD


class ImageReadError(ValueError):
    """A file that cannot be used as an image; the message names the file and why, in user terms."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")


@dataclass
class DecodedImage:
    """One decoded image: 8-bit RGB plus the alpha channel when the file has one.

    The arrays are read-only (PIL's buffer, not copied); copy before writing to them.
    """

    rgb: np.ndarray  # (H, W, 3) uint8, EXIF orientation applied
    alpha: np.ndarray | None  # (H, W) uint8, or None when the file has no transparency
    path: Path
    mode: str  # PIL's mode of the file's first frame, before any conversion
    frames: int  # frames (or pages) in the file; only the first is decoded



@contextmanager
def _without_pil_bomb_check() -> Iterator[None]:
    """PIL's decompression-bomb limit off, for one header parse: `max_pixels` replaces it."""
    with _PIL_GLOBALS:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _reason(e: BaseException, what: str) -> str:
    """User-facing reason for a decoding exception: file-system errors (which carry an errno) as
    such, anything else as `what`, with PIL's words in brackets for whoever digs further."""
    if isinstance(e, PermissionError):
        return "permission denied"
    if isinstance(e, OSError) and e.errno is not None:
        return f"cannot read the file ({e.strerror or e})"
    return f"{what} ({e})" if str(e) else what


def _check_file(path: Path) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ImageReadError(path, "no such file") from None
    except OSError as e:
        raise ImageReadError(path, f"cannot access the file ({e.strerror or e})") from None
    if path.is_dir():
        raise ImageReadError(path, "is a folder, not an image file")
    if st.st_size == 0:
        raise ImageReadError(path, "empty file (0 bytes)")


def _open(path: Path) -> tuple[Image.Image, int]:
    """The opened (not decoded) image at its first frame, and its number of frames."""
    try:
        with _without_pil_bomb_check():
            img = Image.open(path)
            try:
                frames = int(getattr(img, "n_frames", 1) or 1)
                if frames > 1:
                    img.seek(0)  # counting frames may have moved through the file
            except BaseException:
                img.close()
                raise
    except UnidentifiedImageError:
        raise ImageReadError(path, "not an image or unsupported format") from None
    except Image.DecompressionBombError as e:  # not expected with the check off; kept for safety
        raise ImageReadError(path, f"too large for PIL ({e})") from None
    except _DECODE_ERRORS as e:
        raise ImageReadError(path, _reason(e, "truncated or corrupt image header")) from None
    return img, frames


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation (1-8) from the header; 1 when absent or unreadable.

    For PNG only an eXIf chunk before the pixel data counts: PIL would decode the whole image to
    look for a later one, and `image_size` must stay cheap and agree with `read_image`.
    """
    if img.format == "PNG" and "exif" not in img.info:
        return 1
    try:
        value = int(img.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # broken metadata must not make a readable image unreadable
        return 1
    return value if value in _EXIF_TRANSPOSE else 1


def _check_size(path: Path, size: tuple[int, int], max_pixels: int | None) -> None:
    w, h = size
    if max_pixels is not None and w * h > max_pixels:
        raise ImageReadError(
            path, f"image of {w}x{h} pixels exceeds the limit of {max_pixels} pixels; raise --max-image-pixels"
        )


def image_size(path: str | os.PathLike, *, max_pixels: int | None = None) -> tuple[int, int]:
    """(width, height) as `read_image` will return it (EXIF orientation applied), from the header
    only: cheap enough to plan shape buckets over a whole folder before decoding anything."""
    path = Path(path)
    _check_file(path)
    img, _ = _open(path)
    with img:
        w, h = img.size
        _check_size(path, (w, h), max_pixels)
        if _orientation(img) >= 5:  # 5-8 transpose the axes
            w, h = h, w
    return w, h


def _load(img: Image.Image) -> None:
    """Decodes, refusing truncated data even if some library switched PIL's tolerance on
    (a silently grey lower half is worse than an error)."""
    if not ImageFile.LOAD_TRUNCATED_IMAGES:
        img.load()
        return
    with _PIL_GLOBALS:
        saved = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            img.load()
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=2)


def _deep_to_8bit(arr: np.ndarray, mode: str) -> np.ndarray:
    """16/32-bit integer and float grey to uint8.

    - I;16*: the high byte (``>> 8``), as OpenCV's reader (the original's loader) and PIL's own
      16-bit RGB reading do.
    - I (32-bit signed): taken as 16-bit data (what PIL's "I" holds for PNGs and most TIFFs),
      clipped to [0, 65535], then ``>> 8``.
    - F: [0, 1] data (all finite values within it) is scaled by 255; anything else is taken as
      already on the 0..255 scale. Rounded, clipped; NaN -> 0.
    """
    if mode == "F":
        f = np.asarray(arr, np.float32)
        finite = f[np.isfinite(f)]
        unit = finite.size > 0 and float(finite.min()) >= 0.0 and float(finite.max()) <= 1.0
        f = np.nan_to_num(f * (255.0 if unit else 1.0), nan=0.0, posinf=255.0, neginf=0.0)
        return np.clip(np.rint(f), 0, 255).astype(np.uint8)
    wide = np.clip(arr.astype(np.int64, copy=False), 0, 65535) if mode == "I" else arr
    return (wide >> 8).astype(np.uint8)


def _to_arrays(img: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """(rgb, alpha) of a decoded image, whatever its mode."""
    mode = img.mode
    keyed = "transparency" in img.info  # palette index or colour key that means "transparent"
    if mode == "RGB" and not keyed:
        return np.asarray(img), None
    if mode == "L" and not keyed:
        return _gray_to_rgb(np.asarray(img)), None
    if mode == "1":
        return _gray_to_rgb(np.asarray(img).astype(np.uint8) * np.uint8(255)), None
    if mode == "LA":
        la = np.asarray(img)
        return _gray_to_rgb(la[..., 0]), np.ascontiguousarray(la[..., 1])
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _gray_to_rgb(_deep_to_8bit(np.asarray(img), mode)), None
    if mode == "RGBA" or keyed or "A" in img.getbands() or "a" in img.getbands():
        rgba = np.asarray(img if mode == "RGBA" else img.convert("RGBA"))
        return np.ascontiguousarray(rgba[..., :3]), np.ascontiguousarray(rgba[..., 3])
    return np.asarray(img.convert("RGB")), None  # P, CMYK, YCbCr, RGBX, HSV, ...


def read_image(path: str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decodes the first frame of any image PIL reads into 8-bit RGB (+ alpha), upright.

    `max_pixels` is checked on the header size, before decoding (None: no limit); PIL's own
    decompression-bomb limit does not apply. Raises ImageReadError naming the file and the reason.
    """
    path = Path(path)
    _check_file(path)
    img, frames = _open(path)
    with img:
        mode = img.mode
        _check_size(path, img.size, max_pixels)
        orientation = _orientation(img)  # before load(), exactly as image_size sees it
        try:
            _load(img)
            if orientation != 1:
                img = img.transpose(_EXIF_TRANSPOSE[orientation])
            try:
                rgb, alpha = _to_arrays(img)
            except ValueError as e:
                raise ImageReadError(path, f"unsupported colour mode {mode} ({e})") from None
        except ImageReadError:
            raise
        except Image.DecompressionBombError as e:
            raise ImageReadError(path, f"too large for PIL ({e})") from None
        except _DECODE_ERRORS as e:
            raise ImageReadError(path, _reason(e, "truncated or corrupt image data")) from None
    for a in (rgb, alpha):
        if a is not None:
            a.flags.writeable = False
    return DecodedImage(rgb=rgb, alpha=alpha, path=path, mode=mode, frames=frames)
