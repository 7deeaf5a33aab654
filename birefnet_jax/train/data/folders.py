"""Training data sets in the original's folder layout: finding image/mask pairs, checking the files,
decoding them, and the DIS5K class labels for the auxiliary classification head.

Layout (as the original's ``MyData`` reads it)::

    <data_root>/<task>/<set>/im/<stem>.jpg    the image (png, jpg, jpeg, webp, bmp, tif, tiff; any case)
    <data_root>/<task>/<set>/gt/<stem>.png    its mask, same stem, any of those extensions

Several sets are joined with ``+`` (``"DIS-TR+DIS-TE1"``). Files are paired by stem; hidden files
(``.name``, such as macOS's ``._x.jpg``) and other extensions are skipped. Everything that is wrong
with a data set is reported at once, in one `DatasetError`, so one run tells the whole story.

Class labels (``class_labels=True``): DIS5K names its files ``<n>#<group>#<n>#<Class>#<name>``, and the
label is the index of the fourth ``#`` field in the sorted class list (`DIS5K_CLASSES` by default),
as the original computes it for its auxiliary classification; without class labels every pair gets -1.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from birefnet_jax.io.images import ImageReadError, image_size, read_image

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
IMAGE_FOLDER = "im"
MASK_FOLDER = "gt"

# How many names one line of an error message lists before it says how many more there are
# (`DatasetError.problems` keeps every line; a data set can have thousands of stray files).
MAX_LISTED = 20

# The 219 object classes of DIS5K's training set, sorted: the targets of the auxiliary
# classification (the label of a file is the index of its class here).
DIS5K_CLASSES: tuple[str, ...] = (
    "Airplane", "Ant", "Antenna", "Archery", "Axe", "BabyCarriage", "Bag", "BalanceBeam", "Balcony", "Balloon",
    "Basket", "BasketballHoop", "Beatle", "Bed", "Bee", "Bench", "Bicycle", "BicycleFrame", "BicycleStand", "Boat",
    "Bonsai", "BoomLift", "Bridge", "BunkBed", "Butterfly", "Button", "Cable", "CableLift", "Cage", "Camcorder",
    "Cannon", "Canoe", "Car", "CarParkDropArm", "Carriage", "Cart", "Caterpillar", "CeilingLamp", "Centipede",
    "Chair", "Clip", "Clock", "Clothes", "CoatHanger", "Comb", "ConcretePumpTruck", "Crack", "Crane", "Cup",
    "DentalChair", "Desk", "DeskChair", "Diagram", "DishRack", "DoorHandle", "Dragonfish", "Dragonfly", "Drum",
    "Earphone", "Easel", "ElectricIron", "Excavator", "Eyeglasses", "Fan", "Fence", "Fencing", "FerrisWheel",
    "FireExtinguisher", "Fishing", "Flag", "FloorLamp", "Forklift", "GasStation", "Gate", "Gear", "Goal", "Golf",
    "GymEquipment", "Hammock", "Handcart", "Handcraft", "Handrail", "HangGlider", "Harp", "Harvester", "Headset",
    "Helicopter", "Helmet", "Hook", "HorizontalBar", "Hydrovalve", "IroningTable", "Jewelry", "Key",
    "KidsPlayground", "Kitchenware", "Kite", "Knife", "Ladder", "LaundryRack", "Lightning", "Lobster", "Locust",
    "Machine", "MachineGun", "MagazineRack", "Mantis", "Medal", "MemorialArchway", "Microphone", "Missile",
    "MobileHolder", "Monitor", "Mosquito", "Motorcycle", "MovingTrolley", "Mower", "MusicPlayer", "MusicStand",
    "ObservationTower", "Octopus", "OilWell", "OlympicLogo", "OperatingTable", "OutdoorFitnessEquipment",
    "Parachute", "Pavilion", "Piano", "Pipe", "PlowHarrow", "PoleVault", "Punchbag", "Rack", "Racket", "Rifle",
    "Ring", "Robot", "RockClimbing", "Rope", "Sailboat", "Satellite", "Scaffold", "Scale", "Scissor", "Scooter",
    "Sculpture", "Seadragon", "Seahorse", "Seal", "SewingMachine", "Ship", "Shoe", "ShoppingCart",
    "ShoppingTrolley", "Shower", "Shrimp", "Signboard", "Skateboarding", "Skeleton", "Skiing", "Spade", "SpeedBoat",
    "Spider", "Spoon", "Stair", "Stand", "Stationary", "SteeringWheel", "Stethoscope", "Stool", "Stove",
    "StreetLamp", "SweetStand", "Swing", "Sword", "TV", "Table", "TableChair", "TableLamp", "TableTennis", "Tank",
    "Tapeline", "Teapot", "Telescope", "Tent", "TobaccoPipe", "Toy", "Tractor", "TrafficLight", "TrafficSign",
    "Trampoline", "TransmissionTower", "Tree", "Tricycle", "TrimmerCover", "Tripod", "Trombone", "Truck", "Trumpet",
    "Tuba", "UAV", "Umbrella", "UnevenBars", "UtilityPole", "VacuumCleaner", "Violin", "Wakesurfing", "Watch",
    "WaterTower", "WateringPot", "Well", "WellLid", "Wheel", "Wheelchair", "WindTurbine", "Windmill", "WineGlass",
    "WireWhisk", "Yacht",
)

# Modes whose decoded RGB is grey already (all three channels equal): the mask is one channel.
_GREY_MODES = frozenset({"1", "L", "LA", "I", "F"})
# At most this many problem lines in an error message; `DatasetError.problems` has all of them.
_MAX_PROBLEM_LINES = 60


class DatasetError(ValueError):
    """A training data set that cannot be used as it is.

    `problems` has one line per problem found (missing folders, unpaired or duplicate files, empty
    sets, unknown classes, unreadable or mismatched files); the message shows all of them (very
    long lists shortened), under a header that names the data set and the expected layout.
    """

    def __init__(self, header: str, problems: Sequence[str]):
        self.header = header
        self.problems = list(problems)
        shown = self.problems[:_MAX_PROBLEM_LINES]
        text = header + "".join(f"\n  - {p}" for p in shown)
        if len(self.problems) > len(shown):
            text += f"\n  ... and {len(self.problems) - len(shown)} more problems (see DatasetError.problems)"
        super().__init__(text)


@dataclass(frozen=True)
class Pair:
    """One training example on disk: an image, its mask, and where they come from."""

    image: Path
    mask: Path
    stem: str
    set_name: str
    class_label: int = -1  # index into the class list, or -1 (no class labels asked for)


def _names(items: Iterable[str], limit: int = MAX_LISTED) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown}, ... ({len(items) - limit} more)"


def _count(n: int, noun: str, plural: str | None = None) -> str:
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def split_sets(sets: str | Sequence[str]) -> list[str]:
    """Set names from ``"A+B"`` (or a sequence of names), stripped of surrounding spaces."""
    names = sets.split("+") if isinstance(sets, str) else list(sets)
    return [str(n).strip() for n in names]


def class_name(stem: str) -> str | None:
    """The class field of a DIS5K-style name (the fourth ``#``-separated field), or None."""
    fields = stem.split("#")
    return fields[3] if len(fields) > 3 else None


def _scan(folder: Path) -> tuple[dict[str, list[Path]], list[Path], list[Path]]:
    """Image files of `folder` by stem (sorted paths), the empty ones, and broken links."""
    by_stem: dict[str, list[Path]] = {}
    empty: list[Path] = []
    broken: list[Path] = []
    with os.scandir(folder) as entries:
        for entry in entries:
            stem, ext = os.path.splitext(entry.name)
            if entry.name.startswith(".") or ext.lower() not in IMAGE_EXTENSIONS:
                continue
            path = Path(entry.path)
            if not entry.is_file():
                if entry.is_symlink() and not path.exists():
                    broken.append(path)
                continue  # a folder that happens to be called x.png
            by_stem.setdefault(stem, []).append(path)
            if entry.stat().st_size == 0:
                empty.append(path)
    for paths in by_stem.values():
        paths.sort()
    return by_stem, sorted(empty), sorted(broken)


def _subfolders(folder: Path) -> list[str]:
    try:
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []


def _read_set(
    task_dir: Path, name: str, class_index: dict[str, int] | None
) -> tuple[list[Pair], list[str], list[Path]]:
    """The pairs of one set, its problems (without the set's name), and its empty files."""
    set_dir = task_dir / name
    if not set_dir.is_dir():
        return [], [f"folder {set_dir} not found (sets in {task_dir}: {_names(_subfolders(task_dir)) or 'none'})"], []
    im_dir, gt_dir = set_dir / IMAGE_FOLDER, set_dir / MASK_FOLDER
    missing = [f"folder {d} not found (the {what} go there)"
               for d, what in ((im_dir, "images"), (gt_dir, "masks")) if not d.is_dir()]
    if missing:
        return [], missing, []
    problems: list[str] = []
    images, empty_im, broken_im = _scan(im_dir)
    masks, empty_gt, broken_gt = _scan(gt_dir)
    for folder, by_stem in ((im_dir, images), (gt_dir, masks)):
        dups = {s: p for s, p in sorted(by_stem.items()) if len(p) > 1}
        if dups:
            listed = [f"{s} ({', '.join(p.name for p in ps)})" for s, ps in dups.items()]
            problems.append(f"{_count(len(dups), 'stem')} with several files in {folder}: {_names(listed)}")
    no_mask = sorted(images.keys() - masks.keys())
    if no_mask:
        problems.append(f"{_count(len(no_mask), 'image')} without a mask in {gt_dir}: {_names(no_mask)}")
    no_image = sorted(masks.keys() - images.keys())
    if no_image:
        problems.append(f"{_count(len(no_image), 'mask')} without an image in {im_dir}: {_names(no_image)}")
    empty = empty_im + empty_gt
    if empty:
        listed = [str(p.relative_to(set_dir)) for p in empty]
        problems.append(f"{_count(len(empty), 'empty file')} (0 bytes) in {set_dir}: {_names(listed)}")
    broken = broken_im + broken_gt
    if broken:
        listed = [str(p.relative_to(set_dir)) for p in broken]
        problems.append(f"{_count(len(broken), 'broken link')} in {set_dir}: {_names(listed)}")
    stems = sorted(images.keys() & masks.keys())
    if not stems:
        problems.append(f"no image/mask pairs ({_count(len(images), 'image')} in {im_dir}, "
                        f"{_count(len(masks), 'mask')} in {gt_dir})")
    pairs, unknown = [], []
    for stem in stems:
        label = -1
        if class_index is not None:
            cls = class_name(stem)
            label = class_index.get(cls, -1) if cls is not None else -1
            if label < 0:
                unknown.append(f"{stem} ({'no 4th #-field' if cls is None else repr(cls)})")
        pairs.append(Pair(images[stem][0], masks[stem][0], stem, name, label))
    if unknown:
        problems.append(f"{_count(len(unknown), 'file')} whose class (the 4th '#'-separated field of the name) "
                        f"is not one of the {len(class_index)} classes: {_names(unknown)}")
    return pairs, problems, empty


def find_pairs(
    data_root: str | os.PathLike,
    task: str,
    sets: str | Sequence[str],
    *,
    class_labels: bool = False,
    classes: Sequence[str] = DIS5K_CLASSES,
    check: bool | str = False,
    workers: int | None = None,
) -> list[Pair]:
    """The image/mask pairs of ``<data_root>/<task>/<set>`` for each set in `sets` (``"A+B"``).

    Pairs come in the order of `sets`, sorted by stem within a set, so every process and every run
    sees the same list. `class_labels`: label each pair with the index of its class (the fourth
    ``#`` field of its name) in `classes`. `check`: also open every paired file (see `check_files`,
    with `workers` threads): True decodes them all (reads the whole data set), ``"headers"`` reads
    only their headers (sizes and formats; fast).

    Raises DatasetError naming every problem at once: a missing task, set, ``im`` or ``gt``
    folder, images without masks and masks without images (stems per set), several files with one
    stem in a folder, empty (0-byte) files, broken links, sets without pairs, unknown classes, and
    with `check` unreadable files and images whose mask has another size.
    """
    root = Path(data_root).expanduser()
    task_dir = root / task
    names = split_sets(sets)
    header = (
        f"the training data in {task_dir} (sets {'+'.join(names)}) cannot be used; expected layout: "
        f"{task_dir}/<set>/{IMAGE_FOLDER}/<stem>.<jpg|png|...> with masks in "
        f"{task_dir}/<set>/{MASK_FOLDER}/<stem>.<png|jpg|...>"
    )
    if check not in (False, True, "headers"):
        raise ValueError(f"check must be False, True or 'headers', got {check!r}")
    problems: list[str] = []
    if not names or any(not n for n in names):
        problems.append(f"an empty set name in {sets!r} (sets are joined with '+', as in 'DIS-TR+DIS-TE1')")
    seen: dict[str, int] = {}
    for n in names:
        seen[n] = seen.get(n, 0) + 1
    problems += [f"set '{n}' is listed {k} times" for n, k in seen.items() if n and k > 1]
    names = [n for n in dict.fromkeys(names) if n]

    if not task_dir.is_dir():
        if root.is_dir():
            found = _subfolders(root)
            where = f"{root} holds {_names(found)}" if found else f"{root} has no subfolders"
        else:
            where = f"{root} does not exist either"
        problems.append(f"task folder {task_dir} not found ({where})")
        raise DatasetError(header, problems)

    class_index = {c: i for i, c in enumerate(classes)}
    pairs: list[Pair] = []
    empty_files: set[Path] = set()
    for name in names:
        set_pairs, set_problems, empty = _read_set(task_dir, name, class_index if class_labels else None)
        pairs += set_pairs
        problems += [f"set '{name}': {p}" for p in set_problems]
        empty_files.update(empty)
    if check:
        to_check = [p for p in pairs if not {p.image, p.mask} & empty_files]
        problems += _check_pairs(to_check, workers, decode=check is True)
    if problems:
        raise DatasetError(header, problems)
    return pairs


def _check_pair(pair: Pair, decode: bool) -> list[str]:
    out: list[str] = []
    sizes: dict[str, tuple[int, int]] = {}
    for kind, path in (("image", pair.image), ("mask", pair.mask)):
        try:
            if decode:
                rgb = read_image(path).rgb
                sizes[kind] = (rgb.shape[1], rgb.shape[0])
            else:
                sizes[kind] = image_size(path)
        except ImageReadError as e:
            out.append(f"set '{pair.set_name}': unreadable {kind} {e.path}: {e.reason}")
        except Exception as e:  # whatever else a broken file makes a decoder raise
            out.append(f"set '{pair.set_name}': unreadable {kind} {path}: {type(e).__name__}: {e}")
    if len(sizes) == 2 and sizes["image"] != sizes["mask"]:
        (iw, ih), (mw, mh) = sizes["image"], sizes["mask"]
        out.append(f"set '{pair.set_name}': image and mask differ in size: {pair.image} is {iw}x{ih}, "
                   f"{pair.mask} is {mw}x{mh} (width x height)")
    return out


def _check_pairs(pairs: Sequence[Pair], workers: int | None, decode: bool) -> list[str]:
    if not pairs:
        return []
    workers = workers or min(32, (os.cpu_count() or 1) + 4)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return [line for lines in pool.map(lambda p: _check_pair(p, decode), pairs) for line in lines]


def check_files(pairs: Sequence[Pair], *, workers: int | None = None, decode: bool = True) -> None:
    """Open every image and mask of `pairs` (in `workers` threads) and raise one DatasetError
    naming each file that is unreadable (corrupt, truncated, empty, not an image) and each pair
    whose image and mask differ in size (after EXIF orientation). `decode=False` reads only the
    headers: much faster, but a file truncated after its header passes."""
    problems = _check_pairs(list(pairs), workers, decode)
    if problems:
        raise DatasetError(f"{len(problems)} problems with the files of {len(pairs)} image/mask pairs", problems)


def load_image(path: str | os.PathLike) -> np.ndarray:
    """An image as (H, W, 3) uint8 RGB, upright (EXIF orientation applied), writable.

    Grey, palette, CMYK and 16-bit files become 8-bit RGB (16-bit keeps the high byte, as OpenCV's
    reader in the original does); an alpha channel is dropped, as OpenCV's colour read drops it.
    """
    return np.array(read_image(path).rgb)


def load_mask(path: str | os.PathLike) -> np.ndarray:
    """A mask as (H, W) uint8, upright, writable.

    Grey files (8-bit, 1-bit, 16-bit by the high byte, float in [0, 1] scaled to 255) give their
    values; colour files give their luma (ITU-R 601, PIL's formula; OpenCV's grey read, which the
    original uses, agrees within 1). An alpha channel is ignored, as in the original.
    """
    decoded = read_image(path)
    if decoded.mode in _GREY_MODES or decoded.mode.startswith("I;16"):
        return np.array(decoded.rgb[..., 0])
    return np.array(Image.fromarray(np.ascontiguousarray(decoded.rgb)).convert("L"))


def load_pair(pair: Pair) -> tuple[np.ndarray, np.ndarray]:
    """(image (H, W, 3) uint8, mask (H, W) uint8) of a pair."""
    return load_image(pair.image), load_mask(pair.mask)
