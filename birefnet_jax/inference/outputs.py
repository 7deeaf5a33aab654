"""What `predict` writes for one image, where, and how: every file appears whole or not at all
(temporary file, then rename), so an interrupted run never leaves a truncated output and a rerun
knows exactly what is done."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

KINDS = ("mask", "cutout", "prob")
_SUFFIX = {"mask": ".png", "cutout": "_cutout.png", "prob": ".npy"}


@dataclasses.dataclass(frozen=True)
class OutputPaths:
    """The files one input produces (only the kinds asked for)."""

    paths: dict[str, Path]

    def missing(self) -> dict[str, Path]:
        return {k: p for k, p in self.paths.items() if not p.exists()}


def mirror_paths(rels: Sequence[Path], root: Path, suffixes: dict[str, str]) -> list[dict[str, Path]]:
    """Output paths mirroring the input tree: `<root>/<rel without extension><suffix>` per kind. Inputs
    whose names differ only by extension (a.jpg, a.png) keep the extension in the name (a.jpg.png)."""
    stems = [r.with_suffix("") for r in rels]
    counts: dict[Path, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    return [{k: root / (str(rel if counts[stem] > 1 else stem) + suffix) for k, suffix in suffixes.items()}
            for rel, stem in zip(rels, stems, strict=True)]


def plan_outputs(rels: Sequence[Path], root: Path, kinds: Sequence[str]) -> list[OutputPaths]:
    """The image outputs of each input (see `mirror_paths`)."""
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"output kinds must be some of {KINDS}, got {list(kinds)}")
    return [OutputPaths(p) for p in mirror_paths(rels, root, {k: _SUFFIX[k] for k in kinds})]


def remove_stale_temporaries(plans: Sequence[OutputPaths]) -> int:
    """Delete the temporary files a killed run left beside the outputs it was writing
    (`.<name>.<random>.tmp`, see `birefnet_jax.io.files.atomic_path`); returns how many."""
    by_folder: dict[Path, set[str]] = {}
    for plan in plans:
        for p in plan.paths.values():
            by_folder.setdefault(p.parent, set()).add(p.name)
    removed = 0
    for folder, names in by_folder.items():
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            n = entry.name
            if n.startswith(".") and n.endswith(".tmp") and n[1:].rsplit(".", 2)[0] in names:
                entry.unlink(missing_ok=True)
                removed += 1
    return removed
