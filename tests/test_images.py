"""birefnet_jax.io.images and io.resize, inference.inputs: decoding odd files, finding inputs, the two resizes."""

from __future__ import annotations

import ast
import io
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from birefnet_jax.inference.inputs import InputError, list_inputs
from birefnet_jax.io import images, resize
from birefnet_jax.io.images import IMAGE_EXTENSIONS, ImageReadError, image_size, read_image
from birefnet_jax.io.resize import align_corners_taps, resize_align_corners, resize_linear

RNG = np.random.default_rng(0)
PIL_LIMITS = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)


LIGHT = {"__future__", "functools", "glob", "os", "re", "struct", "threading", "collections", "contextlib",
         "dataclasses", "pathlib", "numpy", "PIL"}


def _import_roots(nodes) -> set[str]:
    roots = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_light_imports():
    """Only NumPy, PIL and the standard library (decoding workers stay light); the one exception is
    OpenCV, imported inside a function of io.resize when a resize first asks for it."""
    for module, lazy_allowed in ((images, set()), (resize, {"cv2"})):
        tree = ast.parse(Path(module.__file__).read_text())
        in_functions = [n for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                        for n in ast.walk(f)]
        lazy = _import_roots(in_functions)
        nested = {id(n) for n in in_functions}
        top = _import_roots(n for n in ast.walk(tree) if id(n) not in nested)
        assert top <= LIGHT, (module.__name__, top - LIGHT)
        assert lazy <= LIGHT | lazy_allowed, (module.__name__, lazy - LIGHT - lazy_allowed)


# --------------------------------------------------------------------------- decoding


def _save(path, img, **kw):
    img.save(path, **kw)
    return path


def test_rgb_and_grayscale(tmp_path):
    rgb = RNG.integers(0, 256, (12, 17, 3), dtype=np.uint8)
    got = read_image(_save(tmp_path / "c.png", Image.fromarray(rgb)))
    assert got.mode == "RGB" and got.alpha is None and got.frames == 1 and got.path == tmp_path / "c.png"
    np.testing.assert_array_equal(got.rgb, rgb)
    assert not got.rgb.flags.writeable

    gray = RNG.integers(0, 256, (12, 17), dtype=np.uint8)
    got = read_image(_save(tmp_path / "g.png", Image.fromarray(gray)))
    assert got.mode == "L" and got.rgb.shape == (12, 17, 3) and got.alpha is None
    np.testing.assert_array_equal(got.rgb, np.repeat(gray[..., None], 3, axis=2))


def test_alpha_modes(tmp_path):
    gray = RNG.integers(0, 256, (9, 11), dtype=np.uint8)
    a = RNG.integers(0, 256, (9, 11), dtype=np.uint8)
    got = read_image(_save(tmp_path / "la.png", Image.fromarray(np.stack([gray, a], -1), "LA")))
    assert got.mode == "LA"
    np.testing.assert_array_equal(got.rgb, np.repeat(gray[..., None], 3, axis=2))
    np.testing.assert_array_equal(got.alpha, a)

    rgba = RNG.integers(0, 256, (9, 11, 4), dtype=np.uint8)
    rgba[0, :, 3] = 0  # fully transparent pixels keep their colour (not composited)
    got = read_image(_save(tmp_path / "rgba.png", Image.fromarray(rgba, "RGBA")))
    assert got.mode == "RGBA" and got.rgb.flags.c_contiguous
    np.testing.assert_array_equal(got.rgb, rgba[..., :3])
    np.testing.assert_array_equal(got.alpha, rgba[..., 3])


def _palette_image(index):
    img = Image.fromarray(index, "P")
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    return img


def test_palette(tmp_path):
    index = RNG.integers(0, 3, (8, 10), dtype=np.uint8)
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    got = read_image(_save(tmp_path / "p.png", _palette_image(index)))
    assert got.mode == "P" and got.alpha is None
    np.testing.assert_array_equal(got.rgb, colours[index])

    got = read_image(_save(tmp_path / "pt.png", _palette_image(index), transparency=1))
    assert got.mode == "P"
    np.testing.assert_array_equal(got.rgb, colours[index])
    np.testing.assert_array_equal(got.alpha, np.where(index == 1, 0, 255))


def test_colour_key_transparency(tmp_path):
    """tRNS in grey and RGB PNGs: the keyed value becomes alpha 0."""
    gray = np.array([[0, 50, 100]], np.uint8)
    got = read_image(_save(tmp_path / "lt.png", Image.fromarray(gray), transparency=50))
    np.testing.assert_array_equal(got.rgb[..., 0], gray)
    np.testing.assert_array_equal(got.alpha, [[255, 0, 255]])
    rgb = np.array([[[1, 2, 3], [4, 5, 6]]], np.uint8)
    got = read_image(_save(tmp_path / "ct.png", Image.fromarray(rgb), transparency=(4, 5, 6)))
    np.testing.assert_array_equal(got.rgb, rgb)
    np.testing.assert_array_equal(got.alpha, [[255, 0]])


def test_deep_grayscale(tmp_path):
    deep = RNG.integers(0, 65536, (7, 13), dtype=np.uint16)
    deep[0, :4] = [0, 255, 256, 65535]
    got = read_image(_save(tmp_path / "d.png", Image.fromarray(deep)))
    assert got.mode.startswith("I") and got.rgb.dtype == np.uint8
    np.testing.assert_array_equal(got.rgb[..., 0], deep >> 8)  # as OpenCV's reader
    np.testing.assert_array_equal(got.rgb[0, :4, 0], [0, 0, 1, 255])

    wide = deep.astype(np.int32)
    wide[1, 0], wide[1, 1] = -5, 100000  # clipped to the 16-bit range
    got = read_image(_save(tmp_path / "i.tif", Image.fromarray(wide, "I")))
    assert got.mode == "I"
    expected = np.clip(wide, 0, 65535) >> 8
    np.testing.assert_array_equal(got.rgb[..., 2], expected)

    unit = RNG.random((5, 6), dtype=np.float32)
    got = read_image(_save(tmp_path / "f.tif", Image.fromarray(unit, "F")))
    assert got.mode == "F"
    np.testing.assert_array_equal(got.rgb[..., 1], np.rint(unit * 255).astype(np.uint8))
    scaled = unit * 300 - 20  # not [0, 1]: taken as 0..255, clipped
    scaled[0, 0] = np.nan
    got = read_image(_save(tmp_path / "f255.tif", Image.fromarray(scaled, "F")))
    expected = np.clip(np.rint(np.nan_to_num(scaled)), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(got.rgb[..., 0], expected)


def test_cmyk_and_bilevel(tmp_path):
    got = read_image(_save(tmp_path / "k.jpg", Image.new("CMYK", (16, 8), (0, 255, 255, 0)), quality=95))
    assert got.mode == "CMYK" and got.rgb.shape == (8, 16, 3)
    assert np.abs(got.rgb.astype(int) - [255, 0, 0]).max() <= 8  # red

    bits = RNG.integers(0, 2, (10, 21), dtype=bool)
    got = read_image(_save(tmp_path / "b.png", Image.fromarray(bits)))
    assert got.mode == "1"
    np.testing.assert_array_equal(got.rgb[..., 0], bits * 255)


def _quadrants(h, w):
    """Red top-left, green top-right, blue bottom-left, white bottom-right."""
    q = np.zeros((h, w, 3), np.uint8)
    q[: h // 2, : w // 2] = [255, 0, 0]
    q[: h // 2, w // 2 :] = [0, 255, 0]
    q[h // 2 :, : w // 2] = [0, 0, 255]
    q[h // 2 :, w // 2 :] = 255
    return q


def _corner_colours(rgb):
    h, w = rgb.shape[:2]
    at = [(h // 4, w // 4), (h // 4, 3 * w // 4), (3 * h // 4, w // 4), (3 * h // 4, 3 * w // 4)]
    return [tuple(int(round(v / 255)) * 255 for v in rgb[y, x]) for y, x in at]  # TL, TR, BL, BR


RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


@pytest.mark.parametrize(
    "orientation, corners",
    [
        (1, [RED, GREEN, BLUE, WHITE]),
        (6, [BLUE, RED, WHITE, GREEN]),  # stored rotated 90 degrees counter-clockwise: turn clockwise
        (8, [GREEN, WHITE, RED, BLUE]),
        (3, [WHITE, BLUE, GREEN, RED]),
    ],
)
def test_exif_orientation(tmp_path, orientation, corners):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _save(tmp_path / "o.jpg", Image.fromarray(_quadrants(32, 48)), quality=95, exif=exif.tobytes())
    got = read_image(path)
    expected_shape = (48, 32, 3) if orientation in (6, 8) else (32, 48, 3)
    assert got.rgb.shape == expected_shape
    assert _corner_colours(got.rgb) == corners
    assert image_size(path) == (expected_shape[1], expected_shape[0])
    cv2 = pytest.importorskip("cv2")  # the original's reader applies EXIF orientation too
    ref = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    assert ref.shape == got.rgb.shape and _corner_colours(ref) == corners


def test_first_frame_of_multi_frame_files(tmp_path):
    frames = [Image.new("RGB", (10, 6), c) for c in (RED, GREEN, BLUE)]
    gif = _save(tmp_path / "a.gif", frames[0], save_all=True, append_images=frames[1:], duration=50, loop=0)
    got = read_image(gif)
    assert got.frames == 3 and got.rgb.shape == (6, 10, 3)
    assert (got.rgb == RED).all()

    tif = _save(tmp_path / "m.tiff", frames[1], save_all=True, append_images=[frames[2]])
    got = read_image(tif)
    assert got.frames == 2 and (got.rgb == GREEN).all()

    webp = _save(tmp_path / "a.webp", frames[2], save_all=True, append_images=frames[:2], lossless=True)
    got = read_image(webp)
    assert got.frames == 3 and (got.rgb == BLUE).all()


def test_pil_bomb_limit_overridden_locally(tmp_path, monkeypatch):
    """PIL would refuse this image (limit lowered to make a small one a 'bomb'); we do not, and
    leave PIL's global as it was."""
    path = _save(tmp_path / "wide.png", Image.new("L", (300, 200), 7))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = read_image(path)
        assert image_size(path) == (300, 200)
    assert got.rgb.shape == (200, 300, 3) and (got.rgb == 7).all()
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_concurrent_reads(tmp_path, monkeypatch):
    """Decoding threads share PIL's globals: none of them may see another's temporary switch."""
    from concurrent.futures import ThreadPoolExecutor

    paths = [_save(tmp_path / f"{i}.png", Image.new("RGB", (120 + i, 90), (i, 0, 0))) for i in range(16)]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(read_image, paths * 4))
    assert [g.rgb.shape[1] for g in got] == [120 + i for i in range(16)] * 4
    assert Image.MAX_IMAGE_PIXELS == 1000


@pytest.fixture(scope="module")
def huge_png(tmp_path_factory):
    """12000 x 9000 bilevel PNG: above PIL's warning limit, tens of kB on disk, fast to decode."""
    path = tmp_path_factory.mktemp("huge") / "huge.png"
    Image.new("1", (12000, 9000), 1).save(path)
    return path


def test_huge_image(huge_png):
    limit = Image.MAX_IMAGE_PIXELS
    assert image_size(huge_png) == (12000, 9000)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        got = read_image(huge_png)
    assert got.rgb.shape == (9000, 12000, 3) and got.rgb[-1, -1, 0] == 255
    assert Image.MAX_IMAGE_PIXELS == limit
    with pytest.raises(ImageReadError, match=r"huge\.png.*12000x9000 pixels exceeds the limit of 1000000 pixels; "
                       r"raise --max-image-pixels"):
        read_image(huge_png, max_pixels=1_000_000)
    with pytest.raises(ImageReadError, match="exceeds the limit"):
        image_size(huge_png, max_pixels=1_000_000)
    assert image_size(huge_png, max_pixels=None) == (12000, 9000)


def _truncated(tmp_path, name, fmt):
    buf = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, fmt)
    data = buf.getvalue()
    (tmp_path / name).write_bytes(data[: len(data) // 2])
    return tmp_path / name


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("empty.png", b"", r"empty file \(0 bytes\)"),
        ("x.png", b"hello, I am text\n" * 20, "not an image or unsupported format"),
        ("half.jpg", "JPEG", "truncated or corrupt image data"),
        ("half.png", "PNG", "truncated or corrupt image data"),
    ],
)
def test_unreadable_files(tmp_path, name, content, reason):
    path = _truncated(tmp_path, name, content) if isinstance(content, str) else tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    with pytest.raises(ImageReadError, match=reason) as e:
        read_image(path)
    assert str(path) in str(e.value) and e.value.path == path
    assert isinstance(e.value, ValueError)


def test_truncated_refused_even_if_pil_tolerates_it(tmp_path, monkeypatch):
    path = _truncated(tmp_path, "half.jpg", "JPEG")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    Image.open(path).load()  # PIL alone would hand back a partly grey image
    with pytest.raises(ImageReadError, match="truncated"):
        read_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


def test_missing_and_folder(tmp_path):
    with pytest.raises(ImageReadError, match=r"nope\.png: no such file"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(ImageReadError, match="is a folder"):
        read_image(tmp_path)
    with pytest.raises(ImageReadError, match="no such file"):
        image_size(tmp_path / "nope.png")
    (tmp_path / "t.jpg").write_bytes(b"\x00" * 10)
    with pytest.raises(ImageReadError, match="not an image"):
        image_size(tmp_path / "t.jpg")


# --------------------------------------------------------------------------- finding inputs


def _touch(root, *names):
    for name in names:
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "in"
    _touch(root, "a.png", "sub/b.jpg", "sub/deeper/c.PNG", "video.mp4", ".hidden.png", ".git/d.png",
           "sub/.cache/e.png", "notes.txt", "data.xyz", "sub/readme.md")
    return root


def _rels(items):
    return [item.rel.as_posix() for item in items]


def test_folder_recursive(tree):
    items = list_inputs([tree])
    assert _rels(items) == ["a.png", "sub/b.jpg", "sub/deeper/c.PNG", "video.mp4"]
    assert items[1].path == tree / "sub" / "b.jpg"
    assert _rels(list_inputs(str(tree), extensions=IMAGE_EXTENSIONS)) == ["a.png", "sub/b.jpg", "sub/deeper/c.PNG"]
    assert _rels(list_inputs(tree / "sub")) == ["b.jpg", "deeper/c.PNG"]


def test_single_files(tree):
    items = list_inputs([tree / "sub" / "deeper" / "c.PNG", tree / "data.xyz"])
    assert _rels(items) == ["c.PNG", "data.xyz"]  # an explicit file is kept whatever its extension
    assert items[0].path == tree / "sub" / "deeper" / "c.PNG"


def test_globs(tree):
    assert _rels(list_inputs(str(tree / "**" / "*.png"))) == ["a.png"]  # glob is case-sensitive; hidden skipped
    assert _rels(list_inputs(str(tree / "**" / "*.[pP][nN][gG]"))) == ["a.png", "sub/deeper/c.PNG"]
    assert _rels(list_inputs(str(tree / "sub" / "*.jpg"))) == ["b.jpg"]
    assert _rels(list_inputs(str(tree / "s*"))) == ["sub/b.jpg", "sub/deeper/c.PNG"]  # matched folders walked
    assert _rels(list_inputs(str(tree / "*"))) == ["a.png", "sub/b.jpg", "sub/deeper/c.PNG", "video.mp4"]


def test_glob_relative_to_cwd(tree, monkeypatch):
    monkeypatch.chdir(tree)
    items = list_inputs("sub/**/*.PNG")
    assert _rels(items) == ["deeper/c.PNG"] and items[0].path.resolve() == (tree / "sub/deeper/c.PNG").resolve()


def test_list_file(tree, tmp_path):
    lst = tmp_path / "lists" / "batch.txt"
    lst.parent.mkdir()
    lst.write_text(
        "# photos for today\n\n"
        f"../in/sub/b.jpg\n"
        f"   {tree / 'a.png'}   \n"
        "../in/sub/deeper\n"
        "# ../in/video.mp4\n"
    )
    items = list_inputs(lst)
    assert _rels(items) == ["b.jpg", "a.png", "c.PNG"]
    assert items[0].path.resolve() == (tree / "sub" / "b.jpg").resolve()

    bad = tmp_path / "bad.lst"
    bad.write_text("in/a.png\nin/missing.png\n")
    with pytest.raises(InputError, match=r"bad\.lst, line 2.*missing\.png"):
        list_inputs(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(InputError, match="names no inputs"):
        list_inputs(empty)


def test_specs_that_match_nothing(tree, tmp_path):
    with pytest.raises(InputError, match=r"no such file, folder or pattern match: .*missing\.png"):
        list_inputs([tree / "a.png", tree / "missing.png"])
    with pytest.raises(InputError, match=r"\*\.bmp matches no files"):
        list_inputs(str(tree / "*.bmp"))
    (tmp_path / "void").mkdir()
    _touch(tmp_path / "void", ".x.png", "y.doc")
    with pytest.raises(InputError, match="void holds no files"):
        list_inputs(tmp_path / "void")
    assert list_inputs([]) == []


def test_duplicates(tree, tmp_path):
    # The same file twice: kept once, with the rel of its first mention.
    items = list_inputs([tree / "a.png", tree, str(tree / "*.png")])
    assert _rels(items) == ["a.png", "sub/b.jpg", "sub/deeper/c.PNG", "video.mp4"]
    # Different files, same rel: told apart by their path below the deepest common folder.
    _touch(tmp_path, "x/img.png", "y/img.png", "y/sub/b.jpg")
    items = list_inputs([tmp_path / "x" / "img.png", tmp_path / "y" / "img.png"])
    assert _rels(items) == ["x/img.png", "y/img.png"]
    items = list_inputs([tree, tmp_path / "y"])  # only the clashing pair moves
    assert _rels(items) == ["a.png", "in/sub/b.jpg", "sub/deeper/c.PNG", "video.mp4", "img.png", "y/sub/b.jpg"]
    assert len({item.rel for item in items}) == len(items)


def test_duplicates_that_cannot_be_told_apart(tmp_path):
    # x/img.png and y/img.png become x/img.png and y/img.png, which a folder spec already claims.
    _touch(tmp_path, "x/img.png", "y/img.png", "z/x/img.png")
    with pytest.raises(InputError, match=r"claimed by several inputs.*x/img\.png"):
        list_inputs([tmp_path / "x" / "img.png", tmp_path / "y" / "img.png", tmp_path / "z"])


# --------------------------------------------------------------------------- resizing

SIZES = [
    ((37, 53), (100, 80)),  # up, non-square
    ((100, 80), (37, 53)),  # down
    ((64, 64), (32, 32)),  # exactly 2x down
    ((48, 40), (96, 120)),  # exactly 2x / 3x up
    ((301, 199), (64, 1000)),  # down one axis, up the other
    ((10, 10), (1, 1)),
    ((1, 1), (5, 7)),
    ((1, 10), (4, 3)),
    ((5, 1), (5, 9)),
    ((2, 3), (1, 200)),
]


def _ref_linear(x, out_h, out_w):
    """float64 half-pixel bilinear with clamped borders, written out per axis."""

    def taps(n_in, n_out):
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        return i0, np.minimum(i0 + 1, n_in - 1), src - i0

    r0, r1, fr = taps(x.shape[0], out_h)
    c0, c1, fc = taps(x.shape[1], out_w)
    fc = fc.reshape((1, -1) + (1,) * (x.ndim - 2))
    fr = fr.reshape((-1, 1) + (1,) * (x.ndim - 2))
    x = x.astype(np.float64)
    across = x[:, c0] * (1 - fc) + x[:, c1] * fc
    return across[r0] * (1 - fr) + across[r1] * fr


# Beyond SIZES, for the comparison with OpenCV: its special cases (exactly 2x down in both axes is its
# INTER_AREA; 2x up), integer and odd factors, a photo and a video frame to the model's size.
OPENCV_SIZES = SIZES + [
    ((64, 64), (128, 128)),
    ((99, 31), (33, 31)),  # 3x down one axis, the other kept
    ((120, 96), (30, 24)),  # 4x down
    ((33, 17), (64, 64)),
    ((17, 33), (1024, 1024)),
    ((480, 640), (1024, 1024)),
    ((1080, 1920), (1024, 1024)),
    ((1500, 2000), (1024, 1024)),
]
BACKENDS = ["numpy", pytest.param("opencv", marks=pytest.mark.skipif(resize._opencv() is None,
                                                                    reason="OpenCV is not installed"))]


@pytest.mark.parametrize("src, dst", SIZES)
@pytest.mark.parametrize("channels", [None, 3])
@pytest.mark.parametrize("backend", BACKENDS)
def test_resize_linear_reference(src, dst, channels, backend):
    shape = src if channels is None else src + (channels,)
    x = RNG.integers(0, 256, shape, dtype=np.uint8)
    got = resize_linear(x, dst, backend=backend)
    assert got.dtype == np.uint8 and got.shape == dst + shape[2:]
    ref = _ref_linear(x, *dst)
    # OpenCV's 11-bit weights and truncating shifts: within one level of the exact value (up to ~0.8).
    assert np.abs(got - ref).max() < 1
    xf = x.astype(np.float64) / 255
    gotf = resize_linear(xf, dst, backend=backend)
    assert gotf.dtype == np.float32
    np.testing.assert_allclose(gotf, _ref_linear(xf, *dst), atol=1e-5)  # float32 coordinates, like OpenCV


@pytest.mark.parametrize("src, dst", OPENCV_SIZES)
@pytest.mark.parametrize("channels", [None, 1, 2, 3, 4, 5])
def test_resize_linear_numpy_is_opencv(src, dst, channels):
    """The NumPy path gives cv2.resize's bytes (its fixed-point uint8 arithmetic, reproduced), and the
    default path is cv2.resize itself where OpenCV is installed."""
    cv2 = pytest.importorskip("cv2")
    shape = src if channels is None else src + (channels,)
    x = RNG.integers(0, 256, shape, dtype=np.uint8)
    ref = cv2.resize(x, dst[::-1], interpolation=cv2.INTER_LINEAR).reshape(dst + shape[2:])
    np.testing.assert_array_equal(resize_linear(x, dst, backend="numpy"), ref)
    np.testing.assert_array_equal(resize_linear(x, dst), ref)
    xf = (x / 255).astype(np.float32)
    reff = cv2.resize(xf, dst[::-1], interpolation=cv2.INTER_LINEAR).reshape(dst + shape[2:])
    np.testing.assert_array_equal(resize_linear(xf, dst), reff)
    np.testing.assert_allclose(resize_linear(xf, dst, backend="numpy"), reff, atol=2e-5, rtol=0)  # rounding


def test_resize_linear_numpy_is_opencv_on_random_sizes():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(7)
    for _ in range(60):
        src = tuple(int(v) for v in rng.integers(1, 160, 2))
        dst = tuple(int(v) for v in rng.integers(1, 320, 2))
        x = rng.integers(0, 256, src + (3,), dtype=np.uint8)
        np.testing.assert_array_equal(resize_linear(x, dst, backend="numpy"),
                                      cv2.resize(x, dst[::-1], interpolation=cv2.INTER_LINEAR), err_msg=f"{src}->{dst}")


def test_resize_linear_opencv_takes_any_array():
    """Read-only, non-contiguous and float64 inputs through OpenCV, as through NumPy."""
    pytest.importorskip("cv2")
    x = RNG.integers(0, 256, (41, 57, 3), dtype=np.uint8)
    x.flags.writeable = False
    for view in (x, x[::-1, ::2, ::-1], x[..., :1]):
        np.testing.assert_array_equal(resize_linear(view, (30, 70), backend="opencv"),
                                      resize_linear(view, (30, 70), backend="numpy"))
    xf = x / 255
    got = resize_linear(xf, (30, 70), backend="opencv")
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, resize_linear(xf, (30, 70), backend="numpy"), atol=2e-5, rtol=0)


def test_resize_backend_choice(monkeypatch):
    monkeypatch.delenv(resize.RESIZE_BACKEND_ENV, raising=False)
    installed = resize._opencv() is not None
    assert resize.resize_backend() == ("opencv" if installed else "numpy")
    assert resize.resize_backend("numpy") == "numpy"
    with pytest.raises(ValueError, match="backend must be one of"):
        resize.resize_backend("pil")

    class Refusing:  # an OpenCV that must not be called
        INTER_LINEAR = 1

        def resize(self, *args, **kw):
            raise AssertionError("OpenCV called")

    monkeypatch.setattr(resize, "_opencv", lambda: Refusing())
    x = RNG.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    monkeypatch.setenv(resize.RESIZE_BACKEND_ENV, "numpy")
    assert resize.resize_backend() == "numpy"
    expected = resize_linear(x, (7, 9))
    monkeypatch.setenv(resize.RESIZE_BACKEND_ENV, "auto")
    with pytest.raises(AssertionError, match="OpenCV called"):
        resize_linear(x, (7, 9))
    np.testing.assert_array_equal(resize_linear(x, (7, 9), backend="numpy"), expected)  # the argument wins
    monkeypatch.setenv(resize.RESIZE_BACKEND_ENV, "cuda")
    with pytest.raises(ValueError, match="BIREFNET_JAX_RESIZE"):
        resize_linear(x, (7, 9))


def test_resize_without_opencv(monkeypatch):
    """The core install: no cv2, the NumPy path; asking for OpenCV says what to install."""
    monkeypatch.delenv(resize.RESIZE_BACKEND_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 now raises ImportError
    resize._opencv.cache_clear()
    try:
        assert resize._opencv() is None
        assert resize.resize_backend() == "numpy"
        x = RNG.integers(0, 256, (20, 30, 3), dtype=np.uint8)
        assert resize_linear(x, (7, 9)).shape == (7, 9, 3)
        with pytest.raises(ImportError, match="opencv-python-headless"):
            resize_linear(x, (7, 9), backend="opencv")
    finally:
        resize._opencv.cache_clear()  # found again by the next resize, once cv2 is back


@pytest.mark.parametrize("backend", BACKENDS)
def test_resize_linear_blocks_and_edges(monkeypatch, backend):
    x = RNG.integers(0, 256, (203, 157, 3), dtype=np.uint8)
    sizes = [(50, 40), (611, 300), (203, 400), (101, 78)]  # the last: exactly half, OpenCV's area case
    whole = {dst: resize_linear(x, dst, backend=backend) for dst in sizes}
    monkeypatch.setattr(resize, "_BLOCK_ELEMENTS", 1000)  # many small, uneven blocks
    for dst, expected in whole.items():
        np.testing.assert_array_equal(resize_linear(x, dst, backend=backend), expected)
    xf = x / 255  # float: OpenCV's float path rounds a little differently (uint8 is what predict resizes)
    np.testing.assert_allclose(resize_linear(xf, (611, 300), backend=backend),
                               resize_linear(xf, (611, 300), backend="numpy"), atol=2e-5, rtol=0)
    same = resize_linear(x, (203, 157), backend=backend)
    np.testing.assert_array_equal(same, x)
    assert same is not x
    const = np.full((31, 17), 0.25, np.float32)
    np.testing.assert_array_equal(resize_linear(const, (64, 5), backend=backend), np.full((64, 5), 0.25, np.float32))
    with pytest.raises(TypeError):
        resize_linear(x.astype(np.uint16), (10, 10), backend=backend)
    with pytest.raises(ValueError):
        resize_linear(x, (0, 10), backend=backend)


def _ref_align_corners(x, out_h, out_w):
    """float64 bilinear with aligned corners: output i samples input i * (n_in - 1) / (n_out - 1)."""

    def taps(n_in, n_out):
        src = np.arange(n_out) * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        return i0, np.minimum(i0 + 1, n_in - 1), src - i0

    r0, r1, fr = taps(x.shape[0], out_h)
    c0, c1, fc = taps(x.shape[1], out_w)
    x = x.astype(np.float64)
    across = x[:, c0] * (1 - fc) + x[:, c1] * fc
    return across[r0] * (1 - fr)[:, None] + across[r1] * fr[:, None]


AC_SIZES = SIZES + [((64, 64), (1000, 700)), ((32, 32), (32, 48))]


@pytest.mark.parametrize("src, dst", AC_SIZES)
def test_resize_align_corners_reference(src, dst):
    x = RNG.random(src, dtype=np.float32)
    got = resize_align_corners(x, dst)
    assert got.dtype == np.float32 and got.shape == dst
    np.testing.assert_allclose(got, _ref_align_corners(x, *dst), atol=5e-5)  # float32 coordinates, as PyTorch


def test_resize_align_corners_like_torch():
    torch = pytest.importorskip("torch")
    for src, dst in AC_SIZES:
        x = RNG.random(src, dtype=np.float32)
        ref = torch.nn.functional.interpolate(torch.from_numpy(x)[None, None], size=dst, mode="bilinear",
                                              align_corners=True)[0, 0].numpy()
        np.testing.assert_allclose(resize_align_corners(x, dst), ref, atol=1e-6, rtol=0, err_msg=f"{src}->{dst}")


def test_resize_align_corners_matches_model_taps(monkeypatch):
    """Same numbers as the model's taps applied whole (eval.py's way), in small blocks or not."""
    x = RNG.random((77, 51), dtype=np.float32)
    c0, c1, fc = align_corners_taps(51, 700)
    r0, r1, fr = align_corners_taps(77, 333)
    across = x[:, c0] * (1 - fc) + x[:, c1] * fc
    whole = across[r0] * (1 - fr)[:, None] + across[r1] * fr[:, None]
    np.testing.assert_array_equal(resize_align_corners(x, (333, 700)), whole)
    monkeypatch.setattr(resize, "_BLOCK_ELEMENTS", 999)
    np.testing.assert_array_equal(resize_align_corners(x, (333, 700)), whole)
    x3 = np.stack([x, 1 - x], -1)
    got3 = resize_align_corners(x3, (333, 700))
    np.testing.assert_array_equal(got3[..., 0], whole)
    y = 1 - x
    np.testing.assert_array_equal(got3[..., 1], resize_align_corners(y, (333, 700)))
    np.testing.assert_array_equal(resize_align_corners(x, (77, 51)), x)


def test_pil_globals_untouched():
    """Decoding leaves PIL's module-level limits as it found them."""
    assert Image.MAX_IMAGE_PIXELS == PIL_LIMITS[0]
    assert ImageFile.LOAD_TRUNCATED_IMAGES is PIL_LIMITS[1]
