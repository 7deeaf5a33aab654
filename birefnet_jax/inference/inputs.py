"""Finding inputs: files, folders (recursive, hidden entries skipped), globs and list files,
each with the relative path its outputs mirror.

A path found but not usable (a symbolic link loop, a broken link, a folder that cannot be listed)
is an input with an `error`, which `predict` reports as failed; it never stops the others."""

from __future__ import annotations

import errno
import glob
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from birefnet_jax.io.images import IMAGE_EXTENSIONS, LIST_EXTENSIONS, VIDEO_EXTENSIONS


class InputError(ValueError):
    """An input spec that names nothing usable, or inputs whose outputs would collide."""


@dataclass(frozen=True)
class InputItem:
    """An input file, and the relative path under which its outputs are written. `error` says why
    a path that was found cannot be used (it is then reported as failed, never predicted)."""

    path: Path
    rel: Path
    error: str | None = None


def _unusable(e: OSError) -> str:
    """Why a path found on disk cannot be used as an input, in user terms."""
    if e.errno == errno.ELOOP:
        return "symbolic link loop (the path cannot be resolved)"
    if e.errno == errno.ENOENT:
        return "broken symbolic link (its target does not exist)"
    if isinstance(e, PermissionError):
        return "permission denied"
    return f"cannot resolve the path ({e.strerror or e})"


_GLOB_MAGIC = re.compile(r"[*?[]")


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _walk(folder: Path, exts: frozenset[str], prefix: Path = Path()) -> list[InputItem]:
    """Files under `folder` with a wanted extension, hidden files and folders skipped."""
    found = []

    def unlistable(e: OSError) -> None:  # a folder that cannot be read fails; the walk goes on
        where = Path(e.filename) if e.filename else folder
        try:
            rel = prefix / where.relative_to(folder)
        except ValueError:
            rel = prefix / where.name
        found.append(InputItem(where, rel, f"cannot list the folder ({e.strerror or e})"))

    for dirpath, dirnames, filenames in os.walk(folder, onerror=unlistable):
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
    if os.path.islink(p) and not p.exists():  # a loop or a broken link: found, but unusable
        try:
            os.stat(p)
        except OSError as e:
            return [InputItem(p, Path(p.name), _unusable(e))]
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
    their deepest common folder (a/img.png, b/img.png), so that outputs still mirror the inputs.
    A path that cannot be resolved (symbolic link loop, broken link) is kept as an item with its
    `error`, out of the naming."""
    unique, seen = [], set()
    for item in items:
        if item.error is None:
            try:
                key = os.path.realpath(item.path, strict=True)
            except OSError as e:
                item = InputItem(item.path, item.rel, _unusable(e))
        if item.error is not None:
            key = ("unusable", os.path.abspath(item.path))
        if key not in seen:
            seen.add(key)
            unique.append(item)
    by_rel: dict[Path, list[int]] = {}
    for i, item in enumerate(unique):
        if item.error is None:
            by_rel.setdefault(item.rel, []).append(i)
    for indices in by_rel.values():
        if len(indices) > 1:
            paths = [os.path.abspath(unique[i].path) for i in indices]
            common = os.path.commonpath(paths)
            for i, p in zip(indices, paths, strict=True):
                unique[i] = InputItem(unique[i].path, Path(os.path.relpath(p, common)))
    clashes: dict[Path, list[Path]] = {}
    for item in unique:
        if item.error is None:
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
    A path that is found but cannot be used (a symbolic link loop or a broken link, a folder that
    cannot be listed) comes back with its `error` set, for the caller to report.

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
