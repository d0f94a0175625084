"""The `s4lib` console script: `s4lib info` (what can run here, and why not) and `s4lib build-kernels`.

Subcommands live in COMMANDS (name -> Command); adding one is adding an entry.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Callable


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return platform.processor() or platform.machine()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 platform.machine())
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    simd = next((s for s in ("avx512f", "avx2", "avx", "sse4_2") if s in flags), None)
    return f"{model}" + (f" ({simd})" if simd else "")


# Python modules that declare native modules of their own (native_build.declare) when imported: a
# module that builds a C++ extension through native_build.load_module is listed here, so that
# `s4lib info` and `s4lib build-kernels` know it before its first use.
NATIVE_MODULE_PROVIDERS = ("s4lib.fused_step", "sashimi.nn.fused_backbone")


def _native_modules():
    """Every declared native module: the CPU kernels, then those of the providers that import here."""
    import importlib

    from s4lib.ops import native_build

    for name in NATIVE_MODULE_PROVIDERS:
        try:
            importlib.import_module(name)
        except ImportError:
            continue
    return native_build.declared_modules()


def _build_all(modules, verbose: bool) -> list:
    """Build (or load from the cache) each module now, retrying earlier failures: [(module, error or None)]."""
    from s4lib.ops import native_build

    results = []
    for module in modules:
        print(f"building {module.label} ({module.name}) ...", flush=True)
        start = time.perf_counter()
        try:
            native_build.build(module, force=True, verbose=verbose)
            info = native_build.last_build(module) or {}
            how = "compiled" if info.get("compiled") else "cached, sha256 verified"
            print(f"  ok in {time.perf_counter() - start:.1f} s ({how}): {info.get('path')}")
            results.append((module, None))
        except RuntimeError as e:
            print(f"  FAILED after {time.perf_counter() - start:.1f} s: {e}", file=sys.stderr)
            log = getattr(e, "log", None)
            if log is not None:
                print(f"  log: {log}", file=sys.stderr)
            results.append((module, e))
    return results


def _print_native_modules(modules, verbose: bool) -> None:
    """One line per native module: loaded / built / failed (reason, log) / not tried yet."""
    from s4lib.ops import native_build

    print("native modules:")
    for module in modules:
        status = native_build.status(module)
        if status.state == "built":  # show that it loads, not only that a file is there
            try:
                native_build.build(module)
                status = native_build.status(module)
            except RuntimeError as e:
                status = native_build.Status("failed", str(e), log=str(getattr(e, "log", None) or ""))
        words = {"loaded": "built, loads", "failed": "FAILED", "unavailable": "off", "not built": "not tried yet"}
        detail = {"loaded": status.path, "failed": status.reason, "unavailable": status.reason,
                  "not built": "compiles on first use (about a minute), or now with `s4lib build-kernels`"}
        print(f"  {module.label:<20} {words[status.state]:<14} {detail[status.state]}")
        if status.state == "failed" and status.log:
            print(f"  {'':<20} {'':<14} log: {status.log}")
            if verbose and os.path.isfile(status.log):
                print(f"----- {status.log}")
                with open(status.log, errors="replace") as f:
                    print(f.read().rstrip())
                print("-----")


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    import s4lib
    from s4lib.ops import backend_status, native_build, native_cache
    from s4lib.ops.dispatch import BACKEND_MODULES

    print(f"s4lib {s4lib.__version__}  python {platform.python_version()}  torch {torch.__version__}")
    print(f"cpu     {_cpu_model()}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"cuda:{i}  {torch.cuda.get_device_name(i)}")
    else:
        print("cuda    not available")
    compiler = native_build.compiler_path()
    ninja = native_build.ninja_found()
    print(f"c++     {compiler or 'not found'} (CXX={native_build.compiler()!r}"
          f"{', ' + native_build.compiler_version() if compiler else ''}); ninja {'found' if ninja else 'not found'}")
    if compiler:
        print(f"flags   {' '.join(native_build.build_flags())} (C++ standard: torch's own)")
    try:
        import triton

        triton_line = f"{triton.__version__} (runs the native backend on CUDA tensors)"
    except Exception as e:
        triton_line = f"not available ({type(e).__name__})"
    print(f"triton  {triton_line}")
    root = native_build.cache_root()
    trusted = "private folder for this process" if root != native_cache.configured_root() else "owned by you, 0700"
    print(f"cache   {root} ({trusted})")
    modules = _native_modules()
    if args.build:
        _build_all(modules, args.verbose)
    _print_native_modules(modules, args.verbose)
    print(f"default backend: {os.environ.get('S4LIB_BACKEND', 'auto')} (S4LIB_BACKEND)")
    print("backends:")
    for name in BACKEND_MODULES:
        ok, reason = backend_status(name)
        print(f"  {name:<8} {'yes' if ok else 'no ':<4} {reason}")
    return 0


def cmd_build_kernels(args: argparse.Namespace) -> int:
    from s4lib.ops import native_build

    print(f"native modules (cache {native_build.cache_root()}, flags {' '.join(native_build.build_flags())}):")
    results = _build_all(_native_modules(), args.verbose)
    failed = [module.label for module, error in results if error is not None]
    if failed:
        if not args.verbose:
            print(f"see the full log with: s4lib build-kernels --verbose (or {native_build.LOG_COMMAND})",
                  file=sys.stderr)
        return 1
    return 0


@dataclass
class Command:
    run: Callable[[argparse.Namespace], int]
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None


def _build_kernels_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", help="show the compiler commands and output")


def _info_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", help="print the full log of each failed build")
    parser.add_argument("--build", action="store_true",
                        help="build (or retry) every native module now and report the result")


COMMANDS: dict[str, Command] = {
    "info": Command(cmd_info, "torch version, devices, threads, compiler, native modules and each kernel "
                              "backend's status", _info_arguments),
    "build-kernels": Command(cmd_build_kernels, "compile every native module now (the CPU kernels and the fused "
                                                "step engine; otherwise on first use), retrying failed builds",
                             _build_kernels_arguments),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="s4lib", description="S4/S4D state-space layers for PyTorch.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        sub = subparsers.add_parser(name, help=command.help, description=command.help)
        if command.add_arguments is not None:
            command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
