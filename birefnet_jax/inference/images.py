"""The image side of batch inference: finding inputs, decoding any image PIL reads, resizing.

Light core: only NumPy, PIL and the standard library at import time, so planning and decoding
workers start fast and never need OpenCV. The two resizes reproduce what the original does
around the model: OpenCV's ``INTER_LINEAR`` on the way in (its test loader) and PyTorch's
``align_corners=True`` bilinear on the way out (its ``inference.py``).
"""

from __future__ import annotations

import glob
import os
import re
import struct
import threading
from collections.abc import Iterable, Iterator
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

# Elements per intermediate block in the resizes: 2 MB of float32, small enough to stay in cache
# (measured fastest for 1024 -> 12000 x 9000), large enough that the Python loop costs nothing; a
# resize never holds more than a few of these beyond its input and output.
_BLOCK_ELEMENTS = 1 << 19

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


class ImageReadError(ValueError):
    """A file that cannot be used as an image; the message names the file and why, in user terms."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")


class InputError(ValueError):
    """An input spec that names nothing usable, or inputs whose outputs would collide."""


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


@dataclass(frozen=True)
class InputItem:
    """An input file, and the relative path under which its outputs are written."""

    path: Path
    rel: Path


# --------------------------------------------------------------------------- decoding


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


# --------------------------------------------------------------------------- finding inputs

_GLOB_MAGIC = re.compile(r"[*?[]")


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _walk(folder: Path, exts: frozenset[str], prefix: Path = Path()) -> list[InputItem]:
    """Files under `folder` with a wanted extension, hidden files and folders skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not _is_hidden(d)]
        base = Path(dirpath)
        for name in filenames:
            if not _is_hidden(name) and os.path.splitext(name)[1].lower() in exts:
                p = base / name
                found.append(InputItem(p, prefix / p.relative_to(folder)))
    return found


def _glob(pattern: str, exts: frozenset[str]) -> list[InputItem]:
    """Matches of `pattern` (``**`` recursive), relative to its leading non-wildcard folders.

    Matched folders are walked like folder specs; matched files are filtered by extension too, as
    a ``**`` pattern would otherwise pick up every sidecar file. Wildcards skip hidden names
    (Python's glob rules) unless the pattern spells the leading dot.
    """
    parts = Path(pattern).parts
    fixed = next(i for i, part in enumerate(parts) if _GLOB_MAGIC.search(part))
    root = Path(*parts[:fixed]) if fixed else Path()
    found = []
    for match in glob.glob(pattern, recursive=True):
        p = Path(match)
        rel = Path(os.path.relpath(p, root))
        if p.is_dir():
            found.extend(_walk(p, exts, rel))
        elif p.is_file() and p.suffix.lower() in exts:
            found.append(InputItem(p, rel))
    return found


def _read_list(list_file: Path, exts: frozenset[str]) -> list[InputItem]:
    try:
        text = list_file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read list file {list_file}: {e}") from None
    found = []
    for lineno, line in enumerate(text.splitlines(), 1):
        entry = line.strip()
        if entry and not entry.startswith("#"):
            found.extend(_expand(entry, exts, base=list_file.parent, where=f"{list_file}, line {lineno}: "))
    if not found:
        raise InputError(f"list file {list_file} names no inputs")
    return found


def _expand(spec: str | os.PathLike, exts: frozenset[str], *, base: Path | None, where: str = "") -> list[InputItem]:
    """The items of one spec: a file, a folder, a glob, or (given directly, not from a list) a list
    file. `base` resolves a list's relative entries; `where` prefixes errors with the list line."""
    text = os.path.expanduser(os.fspath(spec))
    if base is not None and not os.path.isabs(text):
        text = os.path.join(base, text)
    p = Path(text)
    if p.is_file():
        if base is None and p.suffix.lower() in LIST_EXTENSIONS:
            return _read_list(p, exts)
        return [InputItem(p, Path(p.name))]  # explicit: kept whatever its extension
    if p.is_dir():
        found = _walk(p, exts)
        if not found:
            wanted = ", ".join(sorted(exts))
            raise InputError(f"{where}folder {p} holds no files with a supported extension ({wanted})")
        return sorted(found, key=lambda item: item.rel.parts)
    if _GLOB_MAGIC.search(text):
        found = _glob(text, exts)
        if not found:
            raise InputError(f"{where}pattern {text} matches no files with a supported extension")
        return sorted(found, key=lambda item: item.rel.parts)
    raise InputError(f"{where}no such file, folder or pattern match: {text}")


def _deduplicate(items: list[InputItem]) -> list[InputItem]:
    """Drops repeats of the same file; gives different files that share a rel their path below
    their deepest common folder (a/img.png, b/img.png), so that outputs still mirror the inputs."""
    unique, seen = [], set()
    for item in items:
        key = os.path.realpath(item.path)
        if key not in seen:
            seen.add(key)
            unique.append(item)
    by_rel: dict[Path, list[int]] = {}
    for i, item in enumerate(unique):
        by_rel.setdefault(item.rel, []).append(i)
    for indices in by_rel.values():
        if len(indices) > 1:
            paths = [os.path.abspath(unique[i].path) for i in indices]
            common = os.path.commonpath(paths)
            for i, p in zip(indices, paths, strict=True):
                unique[i] = InputItem(unique[i].path, Path(os.path.relpath(p, common)))
    clashes: dict[Path, list[Path]] = {}
    for item in unique:
        clashes.setdefault(item.rel, []).append(item.path)
    clashes = {rel: paths for rel, paths in clashes.items() if len(paths) > 1}
    if clashes:
        shown = "; ".join(f"{rel}: {', '.join(map(str, paths))}" for rel, paths in list(clashes.items())[:5])
        raise InputError(f"{len(clashes)} output names are claimed by several inputs ({shown})")
    return unique


def list_inputs(
    specs: str | os.PathLike | Iterable[str | os.PathLike],
    *,
    extensions: Iterable[str] = IMAGE_EXTENSIONS + VIDEO_EXTENSIONS,
) -> list[InputItem]:
    """The input files named by `specs`, in order, each with the relative path its outputs mirror.

    A spec is a file (rel: its name; kept whatever its extension), a folder (recursive, sorted,
    hidden entries skipped, rel below the folder), a glob (``**`` recursive, rel below the
    pattern's leading fixed folders), or a ``.txt``/``.lst`` list of such specs, one per line
    (blank lines and ``#`` comments skipped, relative entries resolved against the list's folder).
    Folders and globs keep only `extensions` (any case); symlinked folders are not descended.

    The same file named twice is listed once (first mention wins). Different files that would
    share a rel (``a/img.png`` and ``b/img.png`` given directly) are told apart by their path below
    their deepest common folder (rels ``a/img.png``, ``b/img.png``); only the clashing files move.
    Raises InputError for a spec that yields nothing, or if rels still clash after that.
    """
    if isinstance(specs, (str, os.PathLike)):
        specs = [specs]
    exts = frozenset(e.lower() for e in extensions)
    items: list[InputItem] = []
    for spec in specs:
        items.extend(_expand(spec, exts, base=None))
    return _deduplicate(items)


# --------------------------------------------------------------------------- resizing


def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV INTER_LINEAR taps: half-pixel centres, source coordinate clamped to the image
    (so the border pixel is repeated, not blended with a zero)."""
    src = ((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5).astype(np.float32)
    i0 = np.floor(src).astype(np.intp)
    frac = (src - i0.astype(np.float32)).astype(np.float32)
    low, high = i0 < 0, i0 >= n_in - 1
    i0[low], frac[low] = 0, 0
    i0[high], frac[high] = n_in - 1, 0
    return i0, np.minimum(i0 + 1, n_in - 1), frac


def _blend(x: np.ndarray, i0: np.ndarray, i1: np.ndarray, frac: np.ndarray, axis: int) -> np.ndarray:
    """float32 (1 - frac) * x[i0] + frac * x[i1] along `axis` (0 or 1); gathers in x's own dtype,
    so uint8 is widened only after the gather."""
    shape = [1] * x.ndim
    shape[axis] = frac.size
    w1 = frac.reshape(shape)
    a = np.take(x, i0, axis=axis).astype(np.float32, copy=False)
    b = np.take(x, i1, axis=axis).astype(np.float32, copy=False)
    a *= np.float32(1) - w1
    b *= w1
    a += b
    return a


def resize_linear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize to (out_h, out_w) as ``cv2.resize(image, (out_w, out_h), INTER_LINEAR)``:
    half-pixel centres, clamped borders, no antialiasing (the original's test-time loader).

    (H, W) or (H, W, C); uint8 in -> uint8 out (rounded; OpenCV's fixed-point arithmetic differs
    by at most 1), float in -> float32 out. Separable like OpenCV (along the width, then the
    height), in blocks of output rows that read only the input rows they need: a 12000 x 9000
    photo is reduced to 1024 x 1024 without ever being converted to float, in O(output) memory.
    """
    x = np.asarray(image)
    out_h, out_w = int(size[0]), int(size[1])
    if x.ndim not in (2, 3):
        raise ValueError(f"resize_linear takes (H, W) or (H, W, C) arrays, got shape {x.shape}")
    if out_h < 1 or out_w < 1 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"cannot resize {x.shape[:2]} to {(out_h, out_w)}")
    is_u8 = x.dtype == np.uint8
    if not is_u8 and not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"resize_linear takes uint8 or float arrays, got {x.dtype}")
    out_dtype = np.uint8 if is_u8 else np.float32
    h, w = x.shape[:2]
    if (h, w) == (out_h, out_w):
        return x.astype(out_dtype, copy=True)
    r0, r1, fr = _linear_taps(h, out_h)
    c0, c1, fc = _linear_taps(w, out_w)
    channels = x.shape[2] if x.ndim == 3 else 1
    out = np.empty((out_h, out_w) + x.shape[2:], out_dtype)
    step = max(1, _BLOCK_ELEMENTS // (max(w, out_w) * channels))
    for a in range(0, out_h, step):
        b = min(a + step, out_h)
        lo, hi = int(r0[a]), int(r1[b - 1]) + 1
        if 2 * (b - a) < hi - lo:  # downscaling: only the two rows each output row reads
            src = np.take(x, np.concatenate([r0[a:b], r1[a:b]]), axis=0)
            j0, j1 = np.arange(b - a), np.arange(b - a, 2 * (b - a))
        else:  # upscaling: the band of rows, each read by several output rows
            src, j0, j1 = x[lo:hi], r0[a:b] - lo, r1[a:b] - lo
        t = _blend(_blend(src, c0, c1, fc, 1), j0, j1, fr[a:b], 0)
        if is_u8:
            np.rint(t, out=t)
            np.clip(t, 0, 255, out=t)
        out[a:b] = t
    return out


def resize_align_corners(prob: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """float32 bilinear resize with aligned corners, as PyTorch's
    ``F.interpolate(..., mode='bilinear', align_corners=True)`` brings the original's predictions
    back to the image size: the model's own taps (`align_corners_taps`), width then height.

    (H, W) or (H, W, C). Computed in blocks of output rows, each reading only the input rows it
    needs, so a 12000 x 9000 output costs little beyond itself.
    """
    from birefnet_jax.nn.layers import align_corners_taps  # imports JAX: only when first needed

    x = np.asarray(prob, dtype=np.float32)
    out_h, out_w = int(size[0]), int(size[1])
    if x.ndim not in (2, 3):
        raise ValueError(f"resize_align_corners takes (H, W) or (H, W, C) arrays, got shape {x.shape}")
    if out_h < 1 or out_w < 1 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"cannot resize {x.shape[:2]} to {(out_h, out_w)}")
    h, w = x.shape[:2]
    if (h, w) == (out_h, out_w):
        return x.copy()
    c0, c1, fc = align_corners_taps(w, out_w)
    r0, r1, fr = align_corners_taps(h, out_h)
    tail = (1,) * (x.ndim - 2)
    wc1 = fc.reshape((1, -1) + tail)
    wc0 = (1 - fc).reshape((1, -1) + tail)
    out = np.empty((out_h, out_w) + x.shape[2:], np.float32)
    channels = x.shape[2] if x.ndim == 3 else 1
    step = max(1, _BLOCK_ELEMENTS // (max(w, out_w) * channels))
    for a in range(0, out_h, step):
        b = min(a + step, out_h)
        rows = np.unique(np.concatenate([r0[a:b], r1[a:b]]))
        band = x[rows]
        across = band[:, c0] * wc0 + band[:, c1] * wc1
        fb = fr[a:b].reshape((-1, 1) + tail)
        np.multiply(across[np.searchsorted(rows, r0[a:b])], 1 - fb, out=out[a:b])
        lower = across[np.searchsorted(rows, r1[a:b])]
        lower *= fb
        out[a:b] += lower
    return out
