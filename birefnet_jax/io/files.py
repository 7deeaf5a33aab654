"""Writing files so that a crash never leaves half a file under the final name, with the
permissions the user's umask asks for (`tempfile.mkstemp` alone would leave 0600).

Every temporary file is hidden beside its destination and named `.<name>.<random>.tmp` (video
writers add the container's extension: `.<name>.<random>.tmp.mkv`), so that `temporary_target`
recognises the ones a killed process left.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

_UMASK_LOCK = threading.Lock()
_umask_once: int | None = None


def _proc_umask() -> int | None:
    """Linux reports the umask in /proc/self/status: read without changing it (thread-safe)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def umask() -> int:
    """The process's umask. Where /proc does not tell it, reading it means setting it (and straight
    back), which races with other threads' file creation: that is done once, under a lock, and the
    value kept (a later `os.umask` change is then not seen)."""
    global _umask_once
    mask = _proc_umask()
    if mask is not None:
        return mask
    with _UMASK_LOCK:
        if _umask_once is None:
            _umask_once = os.umask(0)
            os.umask(_umask_once)
        return _umask_once


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, mode: int = 0o666) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block succeeds, give it `mode & ~umask` and
    rename it onto `path` (atomic on one file system); when it fails, delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, mode & ~umask())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_paths(paths: Sequence[str | os.PathLike], *, mode: int = 0o666) -> Iterator[list[Path]]:
    """`atomic_path` for several files that belong together: yield a temporary path beside each;
    when the block succeeds, rename them all into place (in order); when it fails, delete the
    temporaries, so that nothing of this call is left. Should a rename itself fail, the files this
    call already renamed into place are deleted too (a file they replaced is not restored)."""
    paths = [Path(p) for p in paths]
    tmps: list[Path] = []
    placed: list[Path] = []
    try:
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            tmps.append(Path(tmp))
        yield list(tmps)
        for tmp in tmps:
            os.chmod(tmp, mode & ~umask())
        for tmp, path in zip(tmps, paths, strict=True):
            os.replace(tmp, path)
            placed.append(path)
    except BaseException:
        for path in placed:
            path.unlink(missing_ok=True)
        raise
    finally:
        for tmp in tmps:
            if tmp.exists():
                tmp.unlink()


# `.<name>.<random>.tmp`, optionally followed by the extension a video writer needs (mkstemp's
# random part: letters, digits and underscores).
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.[A-Za-z0-9_]+\.tmp(?P<ext>\.[A-Za-z0-9]+)?")


def temporary_target(name: str) -> str | None:
    """The destination name a temporary file named `name` was written for (see the module doc),
    or None when `name` is not such a temporary."""
    m = _TEMPORARY.fullmatch(name)
    if m is None or (m["ext"] and not m["name"].endswith(m["ext"])):
        return None
    return m["name"]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)
