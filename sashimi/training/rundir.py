"""The run directory's safety rules: what counts as a run, never training over one, output paths checked early.

    decision = prepare_run_dir(out, resume=..., overwrite=..., log=print)   # before anything is built

A directory holding any run artefact (config.json, metrics.jsonl, curves.png or a checkpoint) is
never trained into without resume; resume without last.pt stops unless overwrite, which moves the
old files into `replaced-<UTC time>/` inside the directory (never deletes them). Stale temporary
files of atomic writes killed half-way are removed, output folders are checked for being
writable before any training or evaluation, and errors are OSError/FileExistsError with one line
naming the path and what to do.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
import time

__all__ = ["RUN_ARTEFACTS", "run_artefacts", "prepare_run_dir", "move_aside", "remove_stale_temporaries",
           "check_writable_dir", "check_output_file", "OutputPathError"]

# files a training run writes at the top of its directory (checkpoints: any *.pt)
RUN_ARTEFACTS = ("config.json", "metrics.jsonl", "curves.png")
# atomic_write's temporary names: "." + target name + "." + random + ".tmp" (and check_writable_dir's probe files)
_TEMPORARY = re.compile(r"^\.(config\.json|metrics\.jsonl|curves\.png|[^/]+\.pt|write-test)\.[^/]+\.tmp$")


class OutputPathError(OSError):
    """An output path cannot be written (inside a file, read-only, a folder where a file is wanted, ...)."""


def run_artefacts(out: str) -> list[str]:
    """The run artefacts at the top of `out` (sorted names; none if it does not exist)."""
    try:
        names = os.listdir(out)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(n for n in names if n in RUN_ARTEFACTS or (n.endswith(".pt") and not n.startswith(".")))


def _reason(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


def check_writable_dir(path: str, what: str = "output folder") -> None:
    """Create `path` (and parents) if needed and prove it writable by creating and removing a file in it."""
    path = os.path.abspath(path)
    probe = path
    while not os.path.exists(probe):  # the first existing ancestor must be a folder
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise OutputPathError(errno.ENOTDIR, f"{what} {path} cannot be created: {probe} is a file, not a folder; "
                                             f"choose another path")
    try:
        os.makedirs(path, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path, prefix=".write-test.", suffix=".tmp")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise OutputPathError(e.errno, f"{what} {path} is not writable ({_reason(e)}); choose another path or "
                                       f"fix its permissions") from e


def check_output_file(path: str, flag: str = "output file") -> None:
    """Before any work: `path` can be written as a file (its folder writable, and it is not a folder)."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        raise OutputPathError(errno.EISDIR, f"{flag} {path} is a folder; give a file name, e.g. "
                                            f"{os.path.join(path, 'result.json')}")
    check_writable_dir(os.path.dirname(path), f"the folder of {flag} {path}:")


def remove_stale_temporaries(out: str, log=None) -> list[str]:
    """Remove temporary files that killed atomic writes left in `out`; returns their names."""
    removed = []
    try:
        names = os.listdir(out)
    except OSError:
        return removed
    for name in sorted(names):
        if _TEMPORARY.match(name) and os.path.isfile(os.path.join(out, name)):
            try:
                os.unlink(os.path.join(out, name))
                removed.append(name)
            except OSError:
                pass
    if removed and log is not None:
        log(f"removed {len(removed)} temporary file(s) of interrupted writes in {out}: {', '.join(removed)}")
    return removed


def move_aside(out: str, names: list[str]) -> str:
    """Move `names` of `out` into a new folder out/replaced-<UTC time>[-k]; returns that folder."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target, k = os.path.join(out, f"replaced-{stamp}"), 1
    while os.path.exists(target):
        k += 1
        target = os.path.join(out, f"replaced-{stamp}-{k}")
    os.makedirs(target)
    for name in names:
        shutil.move(os.path.join(out, name), os.path.join(target, name))
    return target


def prepare_run_dir(out: str, resume: bool, overwrite: bool, last_name: str = "last.pt", log=print) -> bool:
    """Check (and make) the run directory before anything is built; True if training resumes from last.pt.

    - out must be creatable and writable (OutputPathError otherwise);
    - stale temporary files are removed;
    - a fresh run (no resume) refuses a directory holding run artefacts (FileExistsError), unless
      overwrite, which moves them aside;
    - resume with last.pt resumes; resume without last.pt but with other artefacts refuses unless
      overwrite (moves them aside and starts over); resume in a directory without artefacts starts.
    """
    check_writable_dir(out, "run directory")
    remove_stale_temporaries(out, log)
    found = run_artefacts(out)
    has_last = last_name in found
    if resume and has_last:
        return True
    if found and not overwrite:
        if resume:
            raise FileExistsError(
                f"{out} holds a run with no {last_name} to resume ({', '.join(found)}; it stopped before its first "
                f"checkpoint): pass --overwrite to move these files aside and start over, or choose another --out")
        raise FileExistsError(
            f"{out} already holds a run ({', '.join(found)}); pass --resume to continue it, --overwrite to move "
            f"its files aside and start over, or choose another --out")
    if found:
        log(f"--overwrite: moved {', '.join(found)} to {move_aside(out, found)}")
    elif resume:
        log(f"--resume: {out} holds no run yet; starting a new one")
    return False
