"""Finds, compiles (once, cached) and loads the C++ CPU kernels in `kernels/`.

The sources live in `<repo>/kernels` in a source checkout and are shipped as the package data
`s4lib._kernels_src` when installed. They are compiled on first use with
torch.utils.cpp_extension (ninja) into a build directory keyed by the torch version, the
compiler, the flags, the CPU and a hash of the sources:

    $S4LIB_CACHE (default $XDG_CACHE_HOME/s4lib or ~/.cache/s4lib) / native-torch<ver>-<key>/

The build uses -march=native (hence the CPU in the key). Loading registers the `s4lib_cpu::*`
torch ops. A failure (no compiler, no ninja, compile error) is remembered for the process and
reported by `native_status()` as one clear sentence; nothing is retried until the process restarts.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import threading
import time
from pathlib import Path

import torch

SOURCES = ("cauchy_cpu.cpp", "vandermonde_cpu.cpp", "torch_bindings_cpu.cpp")
HEADERS = ("s4lib_cpu.h",)
# -fopenmp matters: at::parallel_for in ATen's headers is a serial loop unless the translation
# unit is compiled with OpenMP (the call then runs on torch's own OpenMP pool, whose libgomp the
# extension shares through its soname). Apple's clang has no -fopenmp: there the kernels run serially.
_OPENMP = () if platform.system() == "Darwin" else ("-fopenmp",)
CFLAGS = ("-O3", "-std=c++17", "-march=native", "-mprefer-vector-width=512", "-fopenmp-simd",
          "-fno-math-errno", "-fno-trapping-math") + _OPENMP
LDFLAGS = _OPENMP

_lock = threading.Lock()
_state: dict = {"loaded": False, "error": None, "path": None, "seconds": None}


def source_dir() -> Path | None:
    """Directory holding the C++ sources: the checkout's kernels/ or the installed package data."""
    candidates = [Path(__file__).resolve().parents[2] / "kernels"]
    try:
        import s4lib._kernels_src as shipped  # installed wheel: kernels/ mapped to this package
        candidates.append(Path(shipped.__file__).resolve().parent if shipped.__file__ else
                          Path(list(shipped.__path__)[0]))
    except ImportError:
        pass
    for path in candidates:
        if all((path / name).is_file() for name in SOURCES + HEADERS):
            return path
    return None


def cache_root() -> Path:
    if os.environ.get("S4LIB_CACHE"):
        return Path(os.environ["S4LIB_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "s4lib"


def compiler() -> str:
    """The C++ compiler torch.utils.cpp_extension will use ($CXX, else c++)."""
    return os.environ.get("CXX", "c++")


def compiler_path() -> str | None:
    return shutil.which(compiler())


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return platform.machine() + line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def build_key(src: Path, names=SOURCES + HEADERS, flags=CFLAGS) -> str:
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode())
        h.update((src / name).read_bytes())
    for part in (torch.__version__, compiler(), str(compiler_path()), " ".join(flags), _cpu_signature()):
        h.update(part.encode())
    return h.hexdigest()[:16]


def build_dir(src: Path, names=SOURCES + HEADERS, flags=CFLAGS, prefix: str = "native") -> Path:
    version = torch.__version__.replace("+", "_")
    return cache_root() / f"{prefix}-torch{version}-{build_key(src, names, flags)}"


def _problem() -> str | None:
    """Why a build cannot even be attempted, or None."""
    from torch.utils.cpp_extension import is_ninja_available

    if source_dir() is None:
        return "C++ sources not found (expected <repo>/kernels or the installed s4lib._kernels_src)"
    if compiler_path() is None:
        return f"no C++ compiler: CXX={compiler()!r} not found on PATH"
    if not is_ninja_available():
        return "ninja not found (pip install ninja)"
    return None


def _short(error: BaseException) -> str:
    text = str(error).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    detail = (errors or lines or [type(error).__name__])[-3:]
    return " | ".join(s.strip()[:300] for s in detail)


def load(verbose: bool = False) -> None:
    """Compile (if not cached) and load the CPU kernels; raise RuntimeError with the reason if impossible."""
    with _lock:
        if _state["loaded"]:
            return
        if _state["error"] is not None:
            raise RuntimeError(_state["error"])
        problem = _problem()
        if problem is not None:
            _state["error"] = f"native CPU kernels unavailable: {problem}"
            raise RuntimeError(_state["error"])
        src = source_dir()
        directory = build_dir(src)
        directory.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        try:
            from torch.utils.cpp_extension import load as cpp_load

            cpp_load(
                name="s4lib_native_cpu",
                sources=[str(src / name) for name in SOURCES],
                extra_cflags=list(CFLAGS),
                extra_ldflags=list(LDFLAGS),
                extra_include_paths=[str(src)],
                build_directory=str(directory),
                is_python_module=False,
                verbose=verbose,
            )
        except Exception as e:  # compiler errors, missing headers, link errors
            _state["error"] = f"native CPU kernels failed to build with {compiler()!r}: {_short(e)}"
            raise RuntimeError(_state["error"]) from e
        _state.update(loaded=True, path=str(directory), seconds=time.perf_counter() - start)


_modules: dict = {}  # name -> {"module", "error", "path", "seconds"}


def load_module(name: str, sources, extra_cflags=(), verbose: bool = False):
    """Compile (if not cached) and import the pybind11 extension `name` built from kernels/`sources`.

    Same compiler, flags (CFLAGS + extra_cflags) and cache layout as the CPU kernels, in its own
    build directory (`<name>-torch<ver>-<key>`). Returns the Python module; raises RuntimeError with
    one clear sentence if it cannot be built. A failure is remembered per name for the process.
    """
    with _lock:
        entry = _modules.setdefault(name, {"module": None, "error": None, "path": None, "seconds": None})
        if entry["module"] is not None:
            return entry["module"]
        if entry["error"] is not None:
            raise RuntimeError(entry["error"])
        problem = _problem()
        src = source_dir()
        if problem is None and not all((src / s).is_file() for s in sources):
            problem = f"C++ sources {list(sources)} not found in {src}"
        if problem is not None:
            entry["error"] = f"{name} unavailable: {problem}"
            raise RuntimeError(entry["error"])
        flags = tuple(CFLAGS) + tuple(extra_cflags)
        names = tuple(sources) + HEADERS
        directory = build_dir(src, names, flags, prefix=name)
        directory.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        try:
            from torch.utils.cpp_extension import load as cpp_load

            module = cpp_load(name=name, sources=[str(src / s) for s in sources], extra_cflags=list(flags),
                              extra_ldflags=list(LDFLAGS), extra_include_paths=[str(src)],
                              build_directory=str(directory),
                              is_python_module=True, verbose=verbose)
        except Exception as e:  # compiler errors, missing headers, link errors
            entry["error"] = f"{name} failed to build with {compiler()!r}: {_short(e)}"
            raise RuntimeError(entry["error"]) from e
        entry.update(module=module, path=str(directory), seconds=time.perf_counter() - start)
        return module


def module_status(name: str, sources, extra_cflags=()) -> tuple[bool, str]:
    """(usable, reason) for a load_module extension without building it."""
    entry = _modules.get(name, {})
    if entry.get("module") is not None:
        return True, f"{name} loaded from {entry['path']}"
    if entry.get("error") is not None:
        return False, entry["error"]
    problem = _problem()
    src = source_dir()
    if problem is None and not all((src / s).is_file() for s in sources):
        problem = f"C++ sources {list(sources)} not found in {src}"
    if problem is not None:
        return False, f"{name} unavailable: {problem}"
    directory = build_dir(src, tuple(sources) + HEADERS, tuple(CFLAGS) + tuple(extra_cflags), prefix=name)
    how = "cached build" if any(directory.glob("*.so")) else "will compile on first use (~30 s)"
    return True, f"{name}: {how}, compiler {compiler_path()}"


def is_loaded() -> bool:
    return _state["loaded"]


def native_status() -> tuple[bool, str]:
    """(usable, reason) for the CPU kernels without building them."""
    if _state["loaded"]:
        return True, f"C++ kernels loaded from {_state['path']}"
    if _state["error"] is not None:
        return False, _state["error"]
    problem = _problem()
    if problem is not None:
        return False, f"native CPU kernels unavailable: {problem}"
    src = source_dir()
    cached = any(build_dir(src).glob("*.so"))
    how = "cached build" if cached else "will compile on first use (~1 min)"
    return True, f"C++ kernels {how}, compiler {compiler_path()}"


def last_build_seconds() -> float | None:
    return _state["seconds"]
