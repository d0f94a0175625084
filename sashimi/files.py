"""Writing files safely: atomic_write (temporary file, fsync, rename) and write_json on top of it."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Callable

__all__ = ["atomic_write", "write_json"]


def _umask() -> int:
    """The process's umask, read without changing it where Linux allows (/proc), else by setting it back."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path, data: bytes | Callable) -> None:
    """Write `data` (bytes, or a function called with the open binary file) to path atomically.

    The bytes go to a temporary file in the same folder, which is fsynced and renamed over path
    (then the folder is fsynced, so the rename survives a crash): a reader sees the old file or
    the new one, never a part. The file gets mode 0666 & ~umask, like a file open() creates.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def write_json(path, obj, **dumps_kwargs) -> None:
    """obj as indented JSON (plus a newline), written atomically."""
    atomic_write(path, (json.dumps(obj, indent=2, **dumps_kwargs) + "\n").encode())
