"""Writing files so that a crash never leaves half a file under the final name, with the
permissions the user's umask asks for (`tempfile.mkstemp` alone would leave 0600)."""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

_UMASK_LOCK = threading.Lock()
_umask: int | None = None


def _read_umask() -> int:
    """Linux reports the umask in /proc without changing it; elsewhere reading it means setting it
    (and straight back), which is why it is done once, under a lock, not from every writer thread."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def umask() -> int:
    """The process's umask, read once (a later `os.umask` change is not seen)."""
    global _umask
    if _umask is None:
        with _UMASK_LOCK:
            if _umask is None:
                _umask = _read_umask()
    return _umask


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


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)
