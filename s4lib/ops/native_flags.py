"""The C++ compiler and the one set of flags every native module is built with (probed once per compiler)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile

from . import native_cache

# Flags every supported compiler accepts. -fno-math-errno / -fno-trapping-math let the vector loops
# use the hardware sqrt/exp paths; they change no result the kernels rely on.
BASE_CFLAGS = ("-O3", "-fno-math-errno", "-fno-trapping-math")
# Used where the compiler accepts them (probed). -march=native: the kernels are built on and for
# this CPU (hence the CPU in the key). -fopenmp matters: at::parallel_for in ATen's headers is a
# serial loop unless the translation unit is compiled with OpenMP (the call then runs on torch's
# own OpenMP pool, whose libgomp the extension shares through its soname); Apple's clang has none.
OPTIONAL_CFLAGS = ("-march=native", "-mprefer-vector-width=512", "-fopenmp-simd", "-fopenmp")
OPENMP_FLAG = "-fopenmp"

_probe: dict = {}


def compiler() -> str:
    """The C++ compiler torch.utils.cpp_extension will use ($CXX, else c++)."""
    return os.environ.get("CXX", "c++")


def compiler_path() -> str | None:
    return shutil.which(compiler())


def compiler_version() -> str:
    """The first line of `$CXX --version` (cached per compiler path)."""
    path = compiler_path()
    if path is None:
        return "not found"
    key = ("version", os.path.realpath(path))
    if key not in _probe:
        try:
            out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
            lines = (out.stdout or out.stderr).strip().splitlines()
            _probe[key] = (lines[0] if lines else "") if out.returncode == 0 else f"unknown (exit {out.returncode})"
        except (OSError, subprocess.SubprocessError) as e:
            _probe[key] = f"unknown ({type(e).__name__})"
    return _probe[key]


def _compiles(path: str, flags) -> bool:
    """Does `path flags` compile and link an empty C++ program (warnings count as refusal)?"""
    with tempfile.TemporaryDirectory(prefix="s4lib-probe-") as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write("int main() { return 0; }\n")
        try:
            out = subprocess.run([path, *flags, "-Werror", src, "-o", os.path.join(tmp, "probe")],
                                 capture_output=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return False
        return out.returncode == 0


def accepted_optional_flags() -> tuple:
    """The OPTIONAL_CFLAGS this compiler accepts, probed once per compiler (cached in memory and on disk)."""
    path = compiler_path()
    if path is None:
        return ()
    ident = f"{os.path.realpath(path)}\n{compiler_version()}\n{' '.join(OPTIONAL_CFLAGS)}\n{platform.machine()}"
    key = ("flags", ident)
    if key in _probe:
        return _probe[key]
    record = None
    with contextlib.suppress(OSError):
        record = native_cache.trusted_subdir("probes") / (hashlib.sha256(ident.encode()).hexdigest()[:16]
                                                          + ".json")
    accepted = None
    if record is not None and record.is_file():
        with contextlib.suppress(OSError, ValueError, TypeError):
            stored = json.loads(record.read_text())
            if stored.get("ident") == ident:
                accepted = tuple(f for f in OPTIONAL_CFLAGS if f in stored["accepted"])  # known flags only
    if accepted is None:
        everything = _compiles(path, OPTIONAL_CFLAGS)
        accepted = OPTIONAL_CFLAGS if everything else tuple(f for f in OPTIONAL_CFLAGS if _compiles(path, [f]))
        if record is not None:
            with contextlib.suppress(OSError):
                record.write_text(json.dumps({"ident": ident, "accepted": list(accepted)}))
    _probe[key] = accepted
    return accepted


def build_flags(extra_cflags=()) -> tuple:
    """The compiler flags of every native module: the one place that decides them.

    No C++ standard: torch.utils.cpp_extension adds the one the torch in use needs.
    """
    extra = tuple(extra_cflags)
    for flag in extra:
        if flag.startswith(("-std=", "/std:")):
            raise ValueError(f"extra flag {flag!r}: the C++ standard comes from torch's extension builder")
    return BASE_CFLAGS + accepted_optional_flags() + extra


def link_flags() -> tuple:
    return (OPENMP_FLAG,) if OPENMP_FLAG in accepted_optional_flags() else ()


def cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return platform.machine() + line
    except OSError:
        pass
    return platform.machine() + platform.processor()
