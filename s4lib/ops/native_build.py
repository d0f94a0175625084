"""Builds, caches and loads every C++ extension of the project: one place decides flags, cache keys and failures.

The sources live in `<repo>/kernels` in a source checkout and are shipped as the package data
`s4lib._kernels_src` when installed. A module is compiled on first use with
torch.utils.cpp_extension (ninja) into a folder keyed by everything that changes the binary:

    <cache root> / <name>-torch<version>-<key> /     (cache root: see native_cache)

key = sha256 of the sources and headers, the torch version and build, the Python ABI, the
compiler's path and `--version`, the flags (native_flags.build_flags) and the CPU. The C++ standard is the
one torch's extension builder picks for the torch in use (torch >= 2.14's headers need C++20);
no -std flag is passed. -march=native and the other optional flags are used only where the
compiler accepts them (probed once per compiler, cached).

A built library is loaded only after its recorded sha256 matches (native_cache). A failed build
is remembered on disk in the same folder (`failed.json`, with the whole compiler output in
`build.log`): later processes with the same key fall back at once with a one-line reason; a new
key (torch, compiler, flags, sources) tries again, and `s4lib build-kernels` retries on demand.
`s4lib info` reports each declared module as loaded / built / failed / not tried yet.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import platform
import re
import shutil
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent first builds are not serialised there
    fcntl = None

from . import native_cache
from .native_flags import (BASE_CFLAGS, OPTIONAL_CFLAGS, accepted_optional_flags, build_flags,  # noqa: F401
                           compiler, compiler_path, compiler_version, cpu_signature, link_flags)

SOURCES = ("cauchy_cpu.cpp", "vandermonde_cpu.cpp", "torch_bindings_cpu.cpp")
HEADERS = ("s4lib_cpu.h",)
KERNELS = "s4lib_native_cpu"
LOG_COMMAND = "s4lib info --verbose"  # shows the full log of a failed build
BUILD_FORMAT = "2"  # bump when the layout of a build folder changes


class NativeBuildError(RuntimeError):
    """A native module cannot be used here; str() is one line: the reason, and where the full log is."""

    def __init__(self, reason: str, log: Path | None = None):
        self.reason, self.log = reason, log
        super().__init__(f"{reason}; full log: {LOG_COMMAND}" if log is not None else reason)


@dataclass(frozen=True)
class Module:
    """A native module's recipe: its name (the library's), its sources in kernels/, its extra flags."""

    name: str
    sources: tuple
    extra_cflags: tuple = ()
    label: str = ""
    python_module: bool = True


_lock = threading.RLock()
_declared: dict[str, Module] = {}
_loaded: dict[str, dict] = {}   # key -> {"module", "path", "seconds", "compiled"}
_failed: dict[str, NativeBuildError] = {}  # key -> error, for this process


def declare(name: str, sources, extra_cflags=(), label: str = "", python_module: bool = True) -> Module:
    """Make a native module known to `s4lib info` / `s4lib build-kernels` (load_module declares it too)."""
    module = Module(name, tuple(sources), tuple(extra_cflags), label or name, python_module)
    _declared[name] = module
    return module


def declared_modules() -> list[Module]:
    return list(_declared.values())


KERNELS_MODULE = declare(KERNELS, SOURCES, (), "native C++ kernels", python_module=False)


# ------------------------------------------------------------------------------------ toolchain

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
    return native_cache.cache_root()


def _cpp_extension():
    """torch.utils.cpp_extension, imported without its CUDA_HOME notice (these builds are CPU-only)."""
    import logging

    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import torch.utils.cpp_extension as cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


def ninja_found() -> bool:
    """Is ninja on PATH, where torch.utils.cpp_extension runs it from? Checked without importing that
    module, which takes half a second (setuptools): a process that falls back after a recorded failure
    never needs it. A ninja installed beside this Python (a venv's bin/, used without activating the
    venv) is put on PATH."""
    if shutil.which("ninja") is not None:
        return True
    beside = Path(sys.executable).parent
    if shutil.which("ninja", path=str(beside)) is None:
        return False
    os.environ["PATH"] = str(beside) + os.pathsep + os.environ.get("PATH", "")
    return True


def _problem(module: Module) -> str | None:
    """Why a build of `module` cannot even be attempted, or None."""

    src = source_dir()
    if src is None:
        return "C++ sources not found (expected <repo>/kernels or the installed s4lib._kernels_src)"
    missing = [s for s in module.sources if not (src / s).is_file()]
    if missing:
        return f"C++ sources {missing} not found in {src}"
    if compiler_path() is None:
        return f"no C++ compiler (CXX={compiler()!r} not found)"
    if not ninja_found():
        return "ninja not found (pip install ninja)"
    return None


def build_key(module: Module) -> str:
    """Hash of everything that changes `module`'s binary."""
    src = source_dir()
    h = hashlib.sha256()
    for name in tuple(module.sources) + HEADERS:
        h.update(name.encode() + b"\0" + (src / name).read_bytes() + b"\0")
    parts = (BUILD_FORMAT, module.name, str(module.python_module), torch.__version__,
             str(getattr(torch.version, "git_version", "")), str(torch._C._GLIBCXX_USE_CXX11_ABI),
             sys.implementation.cache_tag, platform.machine(), os.path.realpath(compiler_path() or compiler()),
             compiler_version(), " ".join(build_flags(module.extra_cflags)), " ".join(link_flags()),
             cpu_signature())
    for part in parts:
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


_memo: dict = {}  # (module, environment) -> (problem, key)


def _resolve(module: Module) -> tuple:
    """(why it cannot be built or None, its build key), computed once per module and environment."""
    memo_key = (module, compiler(), os.environ.get("PATH", ""), str(native_cache.configured_root()))
    if memo_key not in _memo:
        problem = _problem(module)
        _memo[memo_key] = (problem, None if problem else build_key(module))
    return _memo[memo_key]


def build_dir(module: Module) -> Path:
    version = torch.__version__.replace("+", "_")
    return cache_root() / f"{module.name}-torch{version}-{_resolve(module)[1] or build_key(module)}"


# ------------------------------------------------------------------------------------ failures

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def summarize(log: str, limit: int = 72) -> str | None:
    """A compiler log in a few words: its first error message, or None if it names none."""
    lines = [_ANSI.sub("", line).strip() for line in log.splitlines() if line.strip()]
    for pattern in (r"(?:fatal )?error: (.+)", r"(undefined reference to .+)", r"(cannot find -l\S+)"):
        message = next((m.group(1) for m in map(re.compile(pattern).search, lines) if m), None)
        if message:
            message = message.strip()
            return message if len(message) <= limit else message[: limit - 1] + "…"
    return None


def _record_failure(directory: Path, log: Path, reason: str) -> None:
    record = {"reason": reason, "log": str(log), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
              "torch": torch.__version__, "compiler": f"{compiler_path()} ({compiler_version()})"}
    tmp = directory / "failed.json.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, directory / "failed.json")


def recorded_failure(directory: Path) -> NativeBuildError | None:
    path = directory / "failed.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        return NativeBuildError(str(record["reason"]), Path(record["log"]))
    except (OSError, ValueError, KeyError, TypeError):
        return NativeBuildError("C++ build failed earlier (unreadable record)", directory / "build.log")


# ------------------------------------------------------------------------------------ building

def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()


@contextlib.contextmanager
def _output_to(log_path: Path):
    """Send this process's stdout and stderr (Python's and the file descriptors') to log_path."""
    _flush()
    saved = [os.dup(1), os.dup(2)]
    with open(log_path, "a", buffering=1) as log:
        try:
            os.dup2(log.fileno(), 1), os.dup2(log.fileno(), 2)
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                yield log
        finally:
            _flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])


@contextlib.contextmanager
def _folder_lock(directory: Path):
    """One process at a time builds (or inspects a build) in a folder; the others wait."""
    if fcntl is None:
        yield
        return
    with open(directory / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _library_path(directory: Path, module: Module) -> Path:
    return directory / f"{module.name}{'.pyd' if sys.platform == 'win32' else '.so'}"  # cpp_extension's LIB_EXT


def _import_library(module: Module, path: Path):
    """Load a verified library: register its torch ops, or import it as a Python module."""
    if not module.python_module:
        torch.ops.load_library(str(path))
        return str(path)
    spec = importlib.util.spec_from_file_location(module.name, str(path))
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


def _compile(module: Module, directory: Path, verbose: bool):
    """Clean build of `module` in `directory`: (loaded module, library path); records a failure and raises."""
    cpp_load = _cpp_extension().load
    src = source_dir()
    for entry in directory.iterdir():  # nothing left over (or planted) is linked in
        if entry.name == ".lock":
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    log = directory / "build.log"
    cflags, ldflags = build_flags(module.extra_cflags), link_flags()
    if verbose or (sys.stderr is not None and sys.stderr.isatty()):  # a minute of silence would look like a hang
        print(f"s4lib: compiling the {module.label or module.name} (once for this torch and compiler; about a "
              f"minute) in {directory}", file=sys.stderr, flush=True)
    log.write_text(f"# {module.label or module.name}: torch {torch.__version__}, compiler {compiler_path()} "
                   f"({compiler_version()})\n# flags {' '.join(cflags)} | link {' '.join(ldflags)}\n")
    os.chmod(log, 0o600)
    try:
        with _output_to(log):
            result = cpp_load(name=module.name, sources=[str(src / s) for s in module.sources],
                              extra_cflags=list(cflags), extra_ldflags=list(ldflags),
                              extra_include_paths=[str(src)], build_directory=str(directory),
                              is_python_module=module.python_module, verbose=True)
    except Exception as e:  # compiler errors, missing headers, link errors, a failing import
        with open(log, "a") as f:
            f.write(f"\n# {type(e).__name__}: {e}\n")
        first_line = (str(e).strip().splitlines() or [""])[0][:72]
        why = summarize(log.read_text()) or f"{type(e).__name__}: {first_line}"
        reason = f"{module.label or module.name} build failed: {why}"
        _record_failure(directory, log, reason)
        if verbose:
            print(log.read_text(), file=sys.stderr)
        raise NativeBuildError(reason, log) from e
    library = Path(result if isinstance(result, str) else result.__file__)
    native_cache.record_hash(library)
    if verbose:
        print(log.read_text())
    return result, library


def build(module: Module, force: bool = False, verbose: bool = False):
    """Load `module` from the cache, or compile it; returns the Python module (or the library path).

    force: retry a build that failed before (and show its log with verbose). Raises
    NativeBuildError with a one-line reason when the module cannot be used.
    """
    with _lock:
        _declared.setdefault(module.name, module)
        problem, key = _resolve(module)
        if problem is not None:
            raise NativeBuildError(f"{module.label or module.name} off: {problem}")
        if key in _loaded:
            return _loaded[key]["module"]
        if key in _failed and not force:
            raise _failed[key]
        try:
            directory = native_cache.trusted_subdir(build_dir(module).name)
        except (PermissionError, OSError) as e:
            raise NativeBuildError(f"{module.label or module.name} off: {e}") from e
        start = time.perf_counter()
        with _folder_lock(directory):
            failure = recorded_failure(directory)
            if failure is not None and not force:
                _failed[key] = failure
                raise failure
            library, compiled = _library_path(directory, module), False
            refusal = native_cache.verified(library) if library.exists() else "not built"
            if refusal is None:
                loaded = _import_library(module, library)
            else:
                if library.exists():
                    warnings.warn(f"s4lib: rebuilding {library}: {refusal}", RuntimeWarning, stacklevel=3)
                try:
                    loaded, library = _compile(module, directory, verbose)
                except NativeBuildError as e:
                    _failed[key] = e
                    raise
                compiled = True
        _failed.pop(key, None)
        _loaded[key] = {"name": module.name, "module": loaded, "path": str(library),
                        "seconds": time.perf_counter() - start, "compiled": compiled}
        return loaded


def load_module(name: str, sources, extra_cflags=(), verbose: bool = False):
    """Compile (if not cached) and import the pybind11 extension `name` built from kernels/`sources`.

    Same flags (build_flags(extra_cflags)), cache and failure memory as the CPU kernels, in its
    own build folder. Returns the Python module; raises NativeBuildError (a RuntimeError) with
    one line saying why if it cannot be used.
    """
    module = _declared.get(name)
    if module is None or module.sources != tuple(sources) or module.extra_cflags != tuple(extra_cflags):
        module = declare(name, sources, extra_cflags, label=module.label if module else "")
    return build(module, verbose=verbose)


def load(verbose: bool = False) -> None:
    """Compile (if not cached) and load the CPU kernels (the s4lib_cpu::* ops); raise NativeBuildError if impossible."""
    build(KERNELS_MODULE, verbose=verbose)


# ------------------------------------------------------------------------------------ status

@dataclass
class Status:
    """What is known about a module here without building it."""

    state: str            # 'loaded', 'built', 'failed', 'unavailable' or 'not built'
    reason: str           # one line
    path: str | None = None
    log: str | None = None

    @property
    def usable(self) -> bool:
        return self.state in ("loaded", "built", "not built")


def status(module: Module) -> Status:
    """The module's state: loaded in this process, built on disk, failed (with its log), or not built yet."""
    label = module.label or module.name
    problem, key = _resolve(module)
    if problem is not None:
        return Status("unavailable", f"{label} off: {problem}")
    if key in _loaded:
        return Status("loaded", f"{label} loaded from {_loaded[key]['path']}", _loaded[key]["path"])
    if key in _failed:
        e = _failed[key]
        return Status("failed", str(e), log=str(e.log) if e.log else None)
    directory = build_dir(module)
    failure = recorded_failure(directory)
    if failure is not None:
        _failed[key] = failure  # later calls in this process answer from memory
        return Status("failed", str(failure), str(directory), str(failure.log))
    library = _library_path(directory, module)
    if library.exists() and native_cache.verified(library) is None:
        return Status("built", f"built in {directory}", str(library))
    return Status("not built", f"not built yet: compiles on first use (about a minute) or with "
                               f"`s4lib build-kernels` ({compiler_path()})", str(directory))


def module_status(name: str, sources, extra_cflags=()) -> tuple[bool, str]:
    """(usable, reason) for a load_module extension without building it."""
    module = _declared.get(name)
    if module is None or module.sources != tuple(sources) or module.extra_cflags != tuple(extra_cflags):
        module = Module(name, tuple(sources), tuple(extra_cflags), module.label if module else name)
    s = status(module)
    return s.usable, s.reason


def is_loaded() -> bool:
    return any(v["name"] == KERNELS for v in _loaded.values())


def native_status() -> tuple[bool, str]:
    """(usable, reason) for the CPU kernels without building them."""
    s = status(KERNELS_MODULE)
    return s.usable, s.reason


def last_build(module: Module = KERNELS_MODULE) -> dict | None:
    """{'path', 'seconds', 'compiled'} of the module's load in this process, or None."""
    for value in _loaded.values():
        if value["name"] == module.name:
            return {k: v for k, v in value.items() if k not in ("module", "name")}
    return None


def last_build_seconds() -> float | None:
    info = last_build()
    return info["seconds"] if info else None
