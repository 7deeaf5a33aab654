"""The planning stage of `predict`: which inputs, which outputs, what is already done.

Reads the file system and decides, before any model is loaded:

* the inputs named by the specs (see `inputs.list_inputs`); a path that cannot be resolved (a
  symbolic link loop, a broken link, a folder that cannot be listed) is one failure, not the end;
* minus our own files under the output folder: the names some input's outputs take, and our
  temporaries (any other file under the output folder is an input like the rest, so `-o .` works);
* every input's output names (see `outputs`), for every kind `predict` can write, whatever this
  call asks for. A name is a function of the input's path alone, so two inputs that would share
  one (`x.jpg` and `x.png`; `photo.jpg`'s cut-out and `photo_cutout.jpg`'s mask), or an input its
  own output would replace (a PNG predicted into its own folder), are refused here, with the list;
* this process's share, when several processes predict the same inputs (`predict --distributed`,
  see `process_share`): every process lists and checks the whole plan, so they all refuse or none
  does, then keeps its own share of it;
* the images and videos whose asked-for outputs all exist, skipped unless `overwrite` (videos are
  then planned frame by frame by `video.predict_videos`).

Nothing is written or deleted here; `PredictPlan.check_writable` probes the output folder and
`PredictPlan.remove_stale_temporaries` clears what a killed run left, when the caller is about to
write.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from birefnet_jax.inference.inputs import InputError, InputItem, list_inputs
from birefnet_jax.inference.outputs import (
    KINDS,
    SUFFIXES,
    OutputPaths,
    output_stem,
    plan_outputs,
    remove_stale_temporaries,
)
from birefnet_jax.inference.video import VIDEO_KINDS, plan_video_outputs
from birefnet_jax.io.files import temporary_target
from birefnet_jax.io.images import VIDEO_EXTENSIONS

InputSpecs = str | os.PathLike | Sequence[str | os.PathLike]


class OutputFolderError(OSError, ValueError):
    """The output folder cannot be written (found before any model is loaded)."""


@dataclasses.dataclass(frozen=True)
class PredictPlan:
    """What one `predict` call has to do (of this process's share: `process_index` of
    `process_count`, see `process_share`; everything when there is one process).

    images: the images to predict, each with its output paths (only those not done, unless
      `overwrite`), in input order.
    videos: the video inputs whose outputs do not all exist (all, with `overwrite`); those asked
      only for outputs that videos do not have are kept, for `video.predict_videos` to report.
    skipped: images and videos whose outputs all exist (left alone).
    failed: (path, reason) for every input found but unusable (a symbolic link loop, ...).
    owned: every file name the inputs' outputs may take, of every kind (the names whose
      temporaries a killed run may have left); the share's inputs only, so that a process never
      deletes the temporaries another one is writing.
    """

    output: Path
    kinds: tuple[str, ...]
    images: list[tuple[InputItem, OutputPaths]]
    videos: list[InputItem]
    skipped: int
    failed: list[tuple[Path, str]] = dataclasses.field(default_factory=list)
    owned: tuple[str, ...] = ()
    process_index: int = 0
    process_count: int = 1

    def remove_stale_temporaries(self) -> int:
        """Delete the temporary files a killed run left beside any output of these inputs (images
        done or not, videos; every kind, asked for this time or not; this process's share only);
        returns how many."""
        return remove_stale_temporaries(self.owned or [p for _, paths in self.images for p in paths.paths.values()])

    def check_writable(self) -> None:
        """Raise `OutputFolderError` (a ValueError and an OSError) unless the outputs can be written:
        the output folder created where missing, files written into it (and into the sub-folders
        that exist). Probes with a temporary file in the output folder, or a temporary folder in
        its nearest existing parent, removed at once (the output folder is not created here); run
        it before loading a model, so that a wrong `-o` costs nothing."""
        folders = {paths_parent for _, paths in self.images for paths_parent in
                   (p.parent for p in paths.paths.values())}
        check_writable(self.output, sorted(folders))


def all_outputs(rel: Path, root: Path, *, video: bool) -> dict[str, Path]:
    """Every output an input of relative path `rel` may have under `root`, by kind (all kinds,
    whatever a call asks for; videos' kinds are "video mask", "video cutout")."""
    return {kind: root / name for kind, name in _names(rel, video).items()}


@functools.cache
def _suffixes(video: bool) -> dict[str, str]:
    if video:
        return {f"video {k}": str(p)[1:] for k, p in plan_video_outputs([Path("x")], Path(), VIDEO_KINDS)[0].items()}
    return {k: SUFFIXES[k] for k in KINDS}


def _names(rel: Path, video: bool) -> dict[str, str]:
    """`all_outputs` relative to the output folder, as strings (planning makes them for every input)."""
    stem = output_stem(rel)
    return {kind: stem + suffix for kind, suffix in _suffixes(video).items()}


def _is_video(item: InputItem) -> bool:
    return item.path.suffix.lower() in VIDEO_EXTENSIONS


def plan_predictions(inputs: InputSpecs, output: str | os.PathLike, *, outputs: Sequence[str] = ("mask",),
                     overwrite: bool = False, process_index: int = 0, process_count: int = 1) -> PredictPlan:
    """The plan for predicting `inputs` (files, folders, globs, list files) into `output`: of
    process `process_index`'s share when `process_count` processes share the work (see
    `process_share`).

    Raises ValueError (`InputError` for specs that name nothing usable, and for inputs whose outputs
    would meet: see the module doc) when there is nothing to do at all (in all processes: a share
    may be empty), and FileExistsError if `output` is a file.
    """
    check_share(process_index, process_count)
    specs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not specs:
        raise ValueError("no inputs given")
    items = list_inputs(specs)
    if not items:
        raise ValueError(f"no images found in {', '.join(map(str, specs))}")
    kinds = tuple(dict.fromkeys(outputs))
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"--output {output} is a file; give a folder")
    unusable = [it for it in items if it.error is not None]
    items = [it for it in items if it.error is None]
    items = _without_our_files(items, output)
    if not items and not unusable:
        raise ValueError(f"the inputs hold nothing but this tool's own outputs in the output folder {output}")
    _refuse_clashes(items, output)  # the whole plan, in every process: all refuse or none does
    if process_count > 1:
        mine = {id(it) for it in process_share(items + unusable, process_index, process_count)}
        items = [it for it in items if id(it) in mine]
        unusable = [it for it in unusable if id(it) in mine]
    failed = [(it.path, it.error) for it in unusable]

    images = [it for it in items if not _is_video(it)]
    all_videos = [it for it in items if _is_video(it)]
    videos, skipped = [], 0
    video_kinds = [k for k in kinds if k in VIDEO_KINDS]
    for item, paths in zip(all_videos, plan_video_outputs([v.rel for v in all_videos], output, video_kinds),
                           strict=True):
        if video_kinds and not overwrite and all(p.exists() for p in paths.values()):
            skipped += 1
        else:
            videos.append(item)
    todo = []
    for item, paths in zip(images, plan_outputs([it.rel for it in images], output, kinds), strict=True):
        if not overwrite and not paths.missing():
            skipped += 1
        else:
            todo.append((item, paths))
    owned = tuple(os.path.join(output, name) for it in items for name in _names(it.rel, _is_video(it)).values())
    return PredictPlan(output=output, kinds=kinds, images=todo, videos=videos, skipped=skipped, failed=failed,
                       owned=owned, process_index=process_index, process_count=process_count)


def check_share(process_index, process_count) -> None:
    """ValueError unless `process_index` is one of `process_count` (a positive int) processes."""
    if not _is_int(process_count) or process_count < 1:
        raise ValueError(f"process_count must be a positive number of processes, got {process_count!r}")
    if not _is_int(process_index) or not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be 0 to {process_count - 1} (process_count {process_count}), "
                         f"got {process_index!r}")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def process_share(items: Sequence[InputItem], process_index: int, process_count: int) -> list[InputItem]:
    """The items process `process_index` of `process_count` predicts, in their given order.

    Dealt round-robin from one order that every process computes alike, without talking to the
    others, whatever order the inputs were given in and whatever is already done: the videos, then
    the images, then the unusable paths, each sorted by their relative path (then the path as given);
    the i-th of that order goes to process i % process_count. So the shares are disjoint, their union
    is `items`, and a rerun after a partial run gives every process the same share again (each then
    skips what it finished). Round-robin rather than contiguous blocks: sizes often cluster (a folder
    of large photos, one of thumbnails; a few long videos), and dealing one by one, videos first,
    spreads them evenly.
    """
    check_share(process_index, process_count)

    def key(it: InputItem):
        rank = 2 if it.error is not None else 0 if _is_video(it) else 1
        return rank, it.rel.parts, os.fspath(it.path)

    order = sorted(range(len(items)), key=lambda i: key(items[i]))
    mine = {i for turn, i in enumerate(order) if turn % process_count == process_index}
    return [it for i, it in enumerate(items) if i in mine]


def _inside(items: list[InputItem], output: Path) -> tuple[str, dict[int, str]]:
    """(the output folder's real path, {index: real path} of the items under it)."""
    root = os.path.realpath(output)
    under = root.rstrip(os.sep) + os.sep
    reals = ((i, os.path.realpath(it.path)) for i, it in enumerate(items))
    return root, {i: real for i, real in reals if real.startswith(under)}


def _without_our_files(items: list[InputItem], output: Path) -> list[InputItem]:
    """`items` less the files under `output` that are ours: temporaries, and the names that another
    input's outputs take (an earlier run's masks, when the output folder holds the inputs)."""
    root, inside = _inside(items, output)
    if not inside:
        return items
    claimed: dict[str, set[int]] = {}  # real output path -> the inputs whose outputs take it
    for i, it in enumerate(items):
        for name in _names(it.rel, _is_video(it)).values():
            claimed.setdefault(os.path.join(root, name), set()).add(i)
    ours = {i for i, real in inside.items()
            if temporary_target(items[i].path.name) is not None or claimed.get(real, set()) - {i}}
    return [it for i, it in enumerate(items) if i not in ours]


def _refuse_clashes(items: list[InputItem], output: Path) -> None:
    """InputError listing the output files that two inputs would share, or that would replace
    their own input; nothing is predicted then (see the module doc)."""
    claims: dict[str, list[tuple[InputItem, str]]] = {}
    for it in items:
        for kind, name in _names(it.rel, _is_video(it)).items():
            claims.setdefault(name, []).append((it, kind))
    groups: dict[tuple[Path, ...], list[str]] = {}  # the clashing inputs -> the files they would share
    for name, owners in claims.items():
        if len(owners) > 1:
            kinds = {kind for _, kind in owners}
            what = "" if len(kinds) == 1 else f" ({', '.join(f'{kind} of {it.path.name}' for it, kind in owners)})"
            groups.setdefault(tuple(it.path for it, _ in owners), []).append(f"{output / name}{what}")
    if groups:
        shown = "; ".join(f"{' and '.join(map(str, paths))} would {'both' if len(paths) == 2 else 'all'} write "
                          f"{', '.join(files)}"
                          for paths, files in list(groups.items())[:5])
        more = f"; and {len(groups) - 5} more" if len(groups) > 5 else ""
        raise InputError(f"{len(groups)} group(s) of inputs would overwrite each other's outputs: {shown}{more}. "
                         "Output names drop the input's extension (x.jpg -> x.png, x_cutout.png, x.npy); "
                         "rename one input of each group, or predict them into separate output folders")
    root, inside = _inside(items, output)
    own = [(items[i], kind) for i, real in inside.items()
           for kind, name in _names(items[i].rel, _is_video(items[i])).items() if os.path.join(root, name) == real]
    if own:
        shown = "; ".join(f"{it.path} (its {kind})" for it, kind in own[:5])
        more = f"; and {len(own) - 5} more" if len(own) > 5 else ""
        raise InputError(f"{len(own)} input(s) would be replaced by their own output: {shown}{more}. "
                         "Predict into another output folder")


def check_writable(output: Path, folders: Sequence[Path] = ()) -> None:
    """`OutputFolderError` unless `output` (and the sub-folders in `folders`, where they exist)
    can be written; see `PredictPlan.check_writable`."""
    base = output
    while not base.exists() and not base.is_symlink() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise OutputFolderError(f"cannot create the output folder {output}: {base} is not a folder")
    try:
        if base == output:
            fd, probe = tempfile.mkstemp(prefix=".birefnet-jax-write-check.", suffix=".tmp", dir=base)
            os.close(fd)
            os.unlink(probe)
        else:
            os.rmdir(tempfile.mkdtemp(prefix=".birefnet-jax-write-check.", suffix=".tmp", dir=base))
    except OSError as e:
        what = "write into the output folder" if base == output else f"create the output folder (in {base})"
        raise OutputFolderError(f"cannot {what} {output}: {e.strerror or e}; choose another output folder "
                                "or fix its permissions") from e
    for folder in folders:
        p = folder
        while p != output and not p.exists() and not p.is_symlink():
            p = p.parent
        if p == output:
            continue
        if not p.is_dir():
            raise OutputFolderError(f"cannot write outputs into {folder}: {p} is a file, not a folder")
        if not os.access(p, os.W_OK | os.X_OK):
            raise OutputFolderError(f"cannot write outputs into {folder}: {p} is not writable")
