"""Where compiled kernels live, and whether a folder or library there can be trusted before it is loaded.

Loading a shared library runs its constructors, so a library is only loaded from a folder that
no one else can write to:

* The cache root is $S4LIB_CACHE, else $XDG_CACHE_HOME/s4lib, else ~/.cache/s4lib. It is created
  with mode 0700, and an existing one of ours is tightened to 0700.
* A folder is trusted when it is owned by the current user and not writable by group or others,
  and every folder above it is owned by the user or by root and, if others can write to it, has
  the sticky bit (as /tmp has: then no one else can rename or replace what is inside).
* If the cache root fails that test, this process warns once and builds in a fresh private
  folder (tempfile.mkdtemp: mode 0700, an unpredictable name) that is removed at exit.
* Every built library gets a `<library>.sha256` beside it, written after the build; a library
  is loaded from the cache only if that hash matches (otherwise it is rebuilt from source).
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import stat
import tempfile
import warnings
from pathlib import Path

_state: dict = {"root": None, "configured": None, "private": None}


def configured_root() -> Path:
    """The cache root the environment asks for (it may not exist yet, and may not be trusted)."""
    if os.environ.get("S4LIB_CACHE"):
        return Path(os.environ["S4LIB_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "s4lib"


def _uid() -> int | None:
    return os.getuid() if hasattr(os, "getuid") else None  # no ownership model on Windows


def untrusted_reason(folder: Path) -> str | None:
    """Why `folder` (which must exist) may hold files planted by someone else, or None if it cannot."""
    uid = _uid()
    if uid is None:
        return None
    folder = Path(folder)
    try:
        info = folder.lstat()
        if stat.S_ISLNK(info.st_mode):
            info = folder.stat()
            folder = folder.resolve()
        if not stat.S_ISDIR(info.st_mode):
            return f"{folder} is not a folder"
        if info.st_uid != uid:
            return f"{folder} is owned by uid {info.st_uid}, not by this user (uid {uid})"
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return f"{folder} is writable by others (mode {stat.S_IMODE(info.st_mode):o})"
        for parent in folder.resolve().parents:
            p = parent.stat()
            if p.st_uid not in (uid, 0):
                return f"{parent} (above {folder}) is owned by uid {p.st_uid}"
            if p.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not p.st_mode & stat.S_ISVTX:
                return f"{parent} (above {folder}) is writable by others and not sticky"
    except OSError as e:
        return f"{folder} cannot be checked ({e.strerror or e})"
    return None


def untrusted_file_reason(path: Path) -> str | None:
    """Why the file `path` may have been written by someone else, or None."""
    uid = _uid()
    if uid is None:
        return None
    info = Path(path).lstat()
    if not stat.S_ISREG(info.st_mode):
        return f"{path} is not a regular file"
    if info.st_uid != uid:
        return f"{path} is owned by uid {info.st_uid}, not by this user"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by others"
    return None


def make_private_dir(folder: Path) -> Path:
    """Create `folder` (and missing parents) with mode 0700; tighten an existing one of ours to 0700."""
    folder = Path(folder)
    if not folder.exists():
        missing = [p for p in (folder, *folder.parents) if not p.exists()]
        for p in reversed(missing):
            try:
                p.mkdir(mode=0o700)
            except FileExistsError:
                pass
    uid = _uid()
    info = folder.stat()
    if uid is not None and info.st_uid == uid and stat.S_IMODE(info.st_mode) & 0o077:
        if not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):  # readable by others: tighten; writable: refuse
            folder.chmod(0o700)
    return folder


def _private_fallback(reason: str, wanted: Path) -> Path:
    if _state["private"] is None:
        private = Path(tempfile.mkdtemp(prefix="s4lib-cache-"))
        atexit.register(shutil.rmtree, private, ignore_errors=True)
        _state["private"] = private
        warnings.warn(f"s4lib: not loading compiled kernels from {wanted}: {reason}; building in the private "
                      f"folder {private} for this process instead (fix the folder's owner or mode, or set "
                      f"S4LIB_CACHE)", RuntimeWarning, stacklevel=3)
    return _state["private"]


def cache_root() -> Path:
    """The trusted cache root for this process (created 0700), or a private fallback (with a warning)."""
    wanted = configured_root()
    if _state["root"] is not None and _state["configured"] == wanted:
        return _state["root"]
    try:
        make_private_dir(wanted)
        reason = untrusted_reason(wanted)
    except OSError as e:
        reason = f"it cannot be created ({e.strerror or e})"
    root = wanted if reason is None else _private_fallback(reason, wanted)
    _state.update(root=root, configured=wanted)
    return root


def trusted_subdir(name: str) -> Path:
    """cache_root()/name, created 0700 and checked (a folder planted there is refused)."""
    root = cache_root()
    folder = make_private_dir(root / name)
    reason = untrusted_reason(folder)
    if reason is not None:
        raise PermissionError(f"s4lib: refusing the kernel cache folder {folder}: {reason}")
    return folder


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def record_hash(library: Path) -> None:
    """Write `<library>.sha256` (atomically, 0600) for a library this process just built."""
    digest = sha256_of(library)
    tmp = library.with_name(library.name + ".sha256.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{digest}  {library.name}\n")
    os.replace(tmp, library.with_name(library.name + ".sha256"))


def verified(library: Path) -> str | None:
    """None if `library` is ours and matches its recorded sha256, else the reason it must not be loaded."""
    record = library.with_name(library.name + ".sha256")
    if not record.is_file():
        return "no recorded sha256"
    for path in (library, record):
        reason = untrusted_file_reason(path)
        if reason is not None:
            return reason
    expected = record.read_text().split()[0] if record.read_text().split() else ""
    if sha256_of(library) != expected:
        return f"{library.name} does not match its recorded sha256"
    return None
