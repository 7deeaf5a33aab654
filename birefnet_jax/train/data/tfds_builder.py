"""TensorFlow Datasets builders for data sets in the original's folder layout, and DIS5K.

Two builders (``tfds.core.GeneratorBasedBuilder``), defined on first use so that importing this
module never imports TensorFlow Datasets (the core install has neither it nor TensorFlow):

- ``birefnet_folder``: any ``<data_root>/<task>/<set>/{im,gt}`` data set; one split per set.
  `folder_builder(data_root, task, "A+B", data_dir=...)`. Its config name is ``<task>-<sets>``
  unless given, so builds of different set selections live side by side.
- ``dis5k``: DIS5K from a manual download. Put the extracted ``DIS5K`` folder (holding ``DIS-TR``,
  ``DIS-VD``, ``DIS-TE1``..``DIS-TE4``) or ``DIS5K.zip`` in the manual folder (default
  ``<data_dir>/downloads/manual``). Splits: ``DIS-TR``, ``DIS-VD``, ``DIS-TE1``..``DIS-TE4``.

Features of every example: ``image`` (uint8 (H, W, 3)), ``mask`` (uint8 (H, W, 1)), ``stem``
(the file name without extension), ``class_name`` (the fourth ``#`` field of the name, or "") and
``class_label`` (int32: its index in `folders.DIS5K_CLASSES`, or -1; the folder builder gives -1
to all unless ``class_labels=True``, which then requires every class to be known).

Stored bytes. Images that are plain 8-bit RGB JPEGs without an EXIF rotation are stored as the
original file's bytes (no second JPEG generation, and no growth); every other image (PNG, grey,
16-bit, palette, rotated, ...) and every mask is stored as a PNG of what `folders.load_image` /
`folders.load_mask` decode, so a built data set holds the same pixels the folder pipeline reads.

Examples are stored in `folders.find_pairs` order (TFDS's shuffling on write is off), so example
i of a split is pair i of the folder source; the training pipeline does its own shuffling.

Feeding the training pipeline. `build` writes ArrayRecord files by default, and `TfdsSource`
reads a split of a built data set by random access (``as_data_source``, no ``tf.data``), as an
`pipeline.ExampleSource`: ``TrainPipeline(TfdsSource(builder, "DIS-TR"), ...)``. The folder source
(a list of `folders.Pair`) stays the simplest and fastest path on a local disk; a built data set
is one set of large files, better on network storage and for sharing a fixed, checked copy.
"""

from __future__ import annotations

import functools
import io
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from birefnet_jax.train.data.folders import (
    DIS5K_CLASSES,
    DatasetError,
    Pair,
    class_name,
    find_pairs,
    load_image,
    load_mask,
    split_sets,
)

FOLDER_BUILDER_NAME = "birefnet_folder"
DIS5K_BUILDER_NAME = "dis5k"
DIS5K_SPLITS: tuple[str, ...] = ("DIS-TR", "DIS-VD", "DIS-TE1", "DIS-TE2", "DIS-TE3", "DIS-TE4")
DIS5K_ARCHIVE = "DIS5K.zip"

DIS5K_INSTRUCTIONS = f"""\
DIS5K cannot be downloaded automatically. Get DIS5K.zip from the links in
https://github.com/xuebinqin/DIS (the authors' page), then either put {DIS5K_ARCHIVE} itself in
the manual folder, or extract it there so that the manual folder holds DIS5K/DIS-TR/im,
DIS5K/DIS-TR/gt, DIS5K/DIS-VD/..., DIS5K/DIS-TE1/... to DIS5K/DIS-TE4/...
(a DIS5K folder's contents directly in the manual folder work too).
"""

_ORIENTATION_TAG = 0x0112
_PNG_COMPRESS_LEVEL = 1  # masks are mostly flat and compress well anyway; the default level is much slower


def _tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(
            "building TensorFlow Datasets data sets needs tensorflow-datasets (and TensorFlow): "
            "pip install 'birefnet-jax[train]'"
        ) from e
    return tfds


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG", compress_level=_PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def _plain_jpeg(path: Path) -> bool:
    """An 8-bit RGB JPEG that every decoder reads upright as it is."""
    try:
        with Image.open(path) as img:
            if img.format != "JPEG" or img.mode != "RGB":
                return False
            return int(img.getexif().get(_ORIENTATION_TAG, 1)) == 1
    except Exception:
        return False  # load_image will name the problem


def encode_image(path: str | os.PathLike) -> bytes:
    """The bytes stored for an image: the file itself if it is a plain RGB JPEG, else a PNG of
    `folders.load_image`."""
    path = Path(path)
    if _plain_jpeg(path):
        return path.read_bytes()
    return _png(load_image(path))


def encode_mask(path: str | os.PathLike) -> bytes:
    """The bytes stored for a mask: a grey PNG of `folders.load_mask`."""
    return _png(load_mask(path))


def _example(pair: Pair, classes: Sequence[str] | None) -> dict:
    cls = class_name(pair.stem) or ""
    label = pair.class_label
    if classes is not None and label < 0:  # lenient labelling (DIS5K's test sets): unknown is -1
        label = classes.index(cls) if cls in classes else -1
    return {
        "image": encode_image(pair.image),
        "mask": encode_mask(pair.mask),
        "stem": pair.stem,
        "class_name": cls,
        "class_label": np.int32(label),
    }


def split_name(set_name: str) -> str:
    """A set name as a TFDS split name (letters, digits, ``_`` and ``-``)."""
    return re.sub(r"[^\w-]", "_", set_name)


def _config_name(task: str, sets: Sequence[str]) -> str:
    return re.sub(r"[^\w+.-]", "_", f"{task}-{'+'.join(sets)}")


@dataclass(frozen=True)
class FolderSpec:
    """What the folder builder reads: ``<data_root>/<task>/<set>`` for each set."""

    data_root: str
    task: str
    sets: tuple[str, ...]
    class_labels: bool = False
    classes: tuple[str, ...] = field(default=DIS5K_CLASSES, repr=False)


def _features(tfds):
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8),
            "mask": tfds.features.Image(shape=(None, None, 1), dtype=np.uint8, encoding_format="png"),
            "stem": tfds.features.Text(),
            "class_name": tfds.features.Text(),
            "class_label": tfds.features.Scalar(dtype=np.int32),
        }
    )


def _splits(pairs: Sequence[Pair]) -> dict[str, list[Pair]]:
    by_set: dict[str, list[Pair]] = {}
    for p in pairs:
        by_set.setdefault(p.set_name, []).append(p)
    names = {}
    for set_name in by_set:
        names.setdefault(split_name(set_name), []).append(set_name)
    clashes = [" and ".join(v) for v in names.values() if len(v) > 1]
    if clashes:
        raise DatasetError("sets whose TFDS split names would be the same", clashes)
    return {split_name(s): ps for s, ps in by_set.items()}


def _find_dis5k_root(manual_dir: Path, extract) -> Path:
    for candidate in (manual_dir / "DIS5K", manual_dir):
        if (candidate / DIS5K_SPLITS[0]).is_dir():
            return candidate
    archive = manual_dir / DIS5K_ARCHIVE
    if archive.is_file():
        extracted = Path(extract(archive))
        for candidate in (extracted / "DIS5K", extracted):
            if (candidate / DIS5K_SPLITS[0]).is_dir():
                return candidate
        raise DatasetError(f"{archive} holds no DIS5K/{DIS5K_SPLITS[0]} folder", [f"extracted to {extracted}"])
    raise DatasetError(
        f"no DIS5K data in the manual folder {manual_dir}",
        [f"expected {manual_dir / 'DIS5K' / DIS5K_SPLITS[0]} (extracted) or {archive}", DIS5K_INSTRUCTIONS],
    )


@functools.cache
def builder_classes() -> tuple[type, type]:
    """(BirefnetFolder, Dis5k): the builder classes, defined (and registered with TFDS under
    ``birefnet_folder`` and ``dis5k``) on the first call."""
    tfds = _tfds()

    @dataclass(eq=False)
    class FolderConfig(tfds.core.BuilderConfig):
        spec: FolderSpec | None = None

    class BirefnetFolder(tfds.core.GeneratorBasedBuilder):
        """Image/mask pairs in BiRefNet's folder layout, one split per set."""

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "First version."}
        code_path = None  # no files beside the code (such as download checksums) to look for

        def __init__(
            self,
            *,
            data_root: str | os.PathLike | None = None,
            task: str | None = None,
            sets: str | Sequence[str] | None = None,
            class_labels: bool = False,
            classes: Sequence[str] = DIS5K_CLASSES,
            config_name: str | None = None,
            **kwargs,
        ):
            if "config" not in kwargs:
                if data_root is None or task is None or sets is None:
                    raise TypeError("BirefnetFolder needs data_root, task and sets (or a config)")
                names = tuple(split_sets(sets))
                spec = FolderSpec(str(Path(data_root).expanduser()), task, names, class_labels, tuple(classes))
                kwargs["config"] = FolderConfig(name=config_name or _config_name(task, names), spec=spec)
            super().__init__(**kwargs)

        def _info(self):
            return self.dataset_info_from_configs(
                description="Images and binary masks in BiRefNet's <data_root>/<task>/<set>/{im,gt} layout.",
                features=_features(tfds),
                supervised_keys=("image", "mask"),
                disable_shuffling=True,  # `find_pairs` order: example i is the folder source's i
            )

        def _split_generators(self, dl_manager):
            spec = self.builder_config.spec
            if spec is None:
                raise ValueError("this builder has no folder to read (FolderConfig.spec is None)")
            pairs = find_pairs(
                spec.data_root, spec.task, spec.sets, class_labels=spec.class_labels, classes=spec.classes,
                check="headers",
            )
            return {name: self._generate_examples(ps) for name, ps in _splits(pairs).items()}

        def _generate_examples(self, pairs):
            for pair in pairs:
                yield pair.stem, _example(pair, None)

    class Dis5k(tfds.core.GeneratorBasedBuilder):
        """DIS5K (Qin et al., ECCV 2022): 5470 high-resolution images with highly accurate masks."""

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "First version."}
        code_path = None
        MANUAL_DOWNLOAD_INSTRUCTIONS = DIS5K_INSTRUCTIONS

        def _info(self):
            return self.dataset_info_from_configs(
                description="DIS5K, dichotomous image segmentation: training (DIS-TR), validation (DIS-VD) "
                "and four test sets (DIS-TE1..4); class labels index the 219 training classes (-1: other).",
                features=_features(tfds),
                supervised_keys=("image", "mask"),
                disable_shuffling=True,
                homepage="https://xuebinqin.github.io/dis/index.html",
            )

        def _split_generators(self, dl_manager):
            root = _find_dis5k_root(Path(dl_manager.manual_dir), dl_manager.extract)
            pairs = find_pairs(root.parent, root.name, DIS5K_SPLITS, check="headers")
            return {name: self._generate_examples(ps) for name, ps in _splits(pairs).items()}

        def _generate_examples(self, pairs):
            for pair in pairs:
                yield pair.stem, _example(pair, DIS5K_CLASSES)

    return BirefnetFolder, Dis5k


def folder_builder(
    data_root: str | os.PathLike,
    task: str,
    sets: str | Sequence[str],
    *,
    data_dir: str | os.PathLike | None = None,
    class_labels: bool = False,
    classes: Sequence[str] = DIS5K_CLASSES,
    config_name: str | None = None,
):
    """The ``birefnet_folder`` builder of ``<data_root>/<task>/<set>`` for the sets ``"A+B"``,
    writing under `data_dir` (TFDS's default when None). Build it with `build`."""
    folder_cls, _ = builder_classes()
    return folder_cls(
        data_root=data_root, task=task, sets=sets, class_labels=class_labels, classes=classes,
        config_name=config_name, data_dir=None if data_dir is None else os.fspath(data_dir),
    )


def dis5k_builder(*, data_dir: str | os.PathLike | None = None):
    """The ``dis5k`` builder, writing under `data_dir`. Build it with
    ``build(builder, manual_dir=<folder holding DIS5K or DIS5K.zip>)``."""
    _, dis5k_cls = builder_classes()
    return dis5k_cls(data_dir=None if data_dir is None else os.fspath(data_dir))


def build(builder, *, manual_dir: str | os.PathLike | None = None, file_format: str = "array_record"):
    """``builder.download_and_prepare`` with what these builders need: nothing fetched from the
    network (TFDS would otherwise look for a prepared copy on GCS), `manual_dir` for DIS5K, and
    ArrayRecord files by default so that `TfdsSource` can read them by random access. A data set
    already built is reused. Returns the builder."""
    tfds = _tfds()
    config = tfds.download.DownloadConfig(
        manual_dir=None if manual_dir is None else os.fspath(manual_dir), try_download_gcs=False
    )
    builder.download_and_prepare(download_config=config, file_format=file_format)
    return builder


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class TfdsSource:
    """A split of a built data set (ArrayRecord files) as an `pipeline.ExampleSource`.

    `builder` is a builder (from `folder_builder`, `dis5k_builder`) or the directory of a built
    data set (``<data_dir>/<name>/<config>/<version>``). Pickles as that directory and split, so
    Grain worker processes reopen it themselves.
    """

    def __init__(self, builder, split: str):
        self.builder_dir = os.fspath(builder if isinstance(builder, (str, os.PathLike)) else builder.data_dir)
        self.split = split
        self._source = None
        self._length = len(self._open())

    def _open(self):
        if self._source is None:
            tfds = _tfds()
            self._source = tfds.builder_from_directory(self.builder_dir).as_data_source(split=self.split)
        return self._source

    def __getstate__(self) -> dict:
        return {"builder_dir": self.builder_dir, "split": self.split, "_length": self._length, "_source": None}

    def __len__(self) -> int:
        return self._length

    def example(self, index: int) -> dict:
        """The decoded example: image (H, W, 3), mask (H, W, 1), stem, class_name, class_label."""
        ex = dict(self._open()[index])
        ex["stem"], ex["class_name"] = _text(ex["stem"]), _text(ex["class_name"])
        return ex

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, int]:
        ex = self._open()[index]
        image, mask = np.asarray(ex["image"]), np.asarray(ex["mask"])
        if image.ndim == 2:  # a decoder may drop the channel axis of grey data
            image = np.repeat(image[..., None], 3, axis=2)
        return image, mask.reshape(mask.shape[:2]), int(ex["class_label"])
