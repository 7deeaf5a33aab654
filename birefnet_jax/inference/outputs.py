"""What `predict` writes for one image, where, and how: every file appears whole or not at all
(temporary file, then rename), so an interrupted run never leaves a truncated output and a rerun
knows exactly what is done.

Output names are a function of the input's relative path alone: `<rel without extension><suffix>`
(`photo.jpg` -> `photo.png`, `photo_cutout.png`, `photo.npy`), whatever other files exist. Inputs
whose names would meet (`x.jpg` and `x.png`; `photo.jpg`'s cut-out and `photo_cutout.jpg`'s mask)
are refused by the plan (`birefnet_jax.inference.plan`) with the list, before any work, rather
than named by which siblings happen to exist: a name that changed when a sibling appeared would
predict an image again under the new name and leave the old file looking like the sibling's mask.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from birefnet_jax.io.files import temporary_target

KINDS = ("mask", "cutout", "prob")
SUFFIXES = {"mask": ".png", "cutout": "_cutout.png", "prob": ".npy"}  # after the input's name less its extension


@dataclasses.dataclass(frozen=True)
class OutputPaths:
    """The files one input produces (only the kinds asked for)."""

    paths: dict[str, Path]

    def missing(self) -> dict[str, Path]:
        return {k: p for k, p in self.paths.items() if not p.exists()}


def output_stem(rel: str | os.PathLike) -> str:
    """`rel` without its extension, as `Path.with_suffix("")` drops it (`a/x.jpg` -> `a/x`,
    `x.tar.gz` -> `x.tar`, `.x` and `x.` kept), on strings: planning calls it for every input."""
    head, sep, name = os.fspath(rel).rpartition(os.sep)
    dot = name.rfind(".")
    return head + sep + (name[:dot] if 0 < dot < len(name) - 1 else name)


def output_name(rel: str | os.PathLike, suffix: str) -> Path:
    """`<rel without extension><suffix>`: the same for an input whatever its siblings."""
    return Path(output_stem(rel) + suffix)


def mirror_paths(rels: Sequence[Path], root: Path, suffixes: dict[str, str]) -> list[dict[str, Path]]:
    """Output paths mirroring the input tree: `<root>/<rel without extension><suffix>` per kind
    (`output_name`). Given inputs whose names differ only by extension (a.mp4, a.avi) in one list,
    it keeps the extension in their names (a.mp4_mask.mkv) rather than give two the same file;
    `predict` never gets there: its plan refuses such inputs first, so that a name never depends on
    which other inputs are present."""
    stems = [r.with_suffix("") for r in rels]
    counts: dict[Path, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    return [{k: root / (str(rel if counts[stem] > 1 else stem) + suffix) for k, suffix in suffixes.items()}
            for rel, stem in zip(rels, stems, strict=True)]


def plan_outputs(rels: Sequence[Path], root: Path, kinds: Sequence[str]) -> list[OutputPaths]:
    """The image outputs of each input, each named by `output_name` alone (clashes are the plan's to
    refuse: see the module doc)."""
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"output kinds must be some of {KINDS}, got {list(kinds)}")
    return [OutputPaths({k: root / output_name(rel, SUFFIXES[k]) for k in kinds}) for rel in rels]


def remove_stale_temporaries(outputs: Iterable[str | os.PathLike | OutputPaths]) -> int:
    """Delete the temporary files a killed run left beside any of `outputs` (output paths, or
    `OutputPaths`): `.<name>.<random>.tmp`, and `.<name>.<random>.tmp.<ext>` as video writers
    name them (see `birefnet_jax.io.files`); returns how many."""
    by_folder: dict[str, set[str]] = {}
    for out in outputs:
        for p in out.paths.values() if isinstance(out, OutputPaths) else (out,):
            folder, name = os.path.split(os.fspath(p))
            by_folder.setdefault(folder, set()).add(name)
    removed = 0
    for folder, names in by_folder.items():
        try:
            entries = os.listdir(folder or ".")
        except OSError:  # no such folder (nothing written there yet), or not one
            continue
        for entry in entries:
            if entry.startswith(".") and temporary_target(entry) in names:
                try:
                    os.unlink(os.path.join(folder, entry))
                except OSError:  # gone already, or not ours to delete after all (permissions)
                    continue
                removed += 1
    return removed
