"""Writing files so that a crash at any moment leaves the old file or the complete new one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable

__all__ = ["chmod_default", "fsync_dir", "write_atomically"]


def fsync_dir(path: str) -> None:
    """Make the renames in directory `path` durable (Windows cannot open a directory; its
    renames are durable when they return)."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask. Linux shows it in /proc; os.umask reads it only by setting it,
    which for that moment changes it for every thread (the Recorder writes in its own)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def chmod_default(path: str) -> None:
    """Give path the mode open() gives a new file, 0666 less the umask: mkstemp and safetensors'
    save_file (which writes through a temporary file of its own) make files private, 0600."""
    os.chmod(path, 0o666 & ~_umask())


def write_atomically(path: str, write: Callable[[str], None]) -> None:
    """write(tmp) to a temporary file beside path, fsync it, rename it onto path and fsync the
    directory: path is never half-written, and a failure leaves no temporary file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        chmod_default(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync_dir(folder)
