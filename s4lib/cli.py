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


def cmd_info(args: argparse.Namespace) -> int:
    import torch
    from torch.utils.cpp_extension import is_ninja_available

    import s4lib
    from s4lib.ops import backend_status
    from s4lib.ops import native_build
    from s4lib.ops.dispatch import BACKEND_MODULES

    print(f"s4lib {s4lib.__version__}  python {platform.python_version()}  torch {torch.__version__}")
    print(f"cpu     {_cpu_model()}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"cuda:{i}  {torch.cuda.get_device_name(i)}")
    else:
        print("cuda    not available")
    compiler = native_build.compiler_path()
    print(f"c++     {compiler or 'not found'} (CXX={native_build.compiler()!r}); "
          f"ninja {'found' if is_ninja_available() else 'not found'}")
    try:
        import triton

        triton_line = f"{triton.__version__} (runs the native backend on CUDA tensors)"
    except Exception as e:
        triton_line = f"not available ({type(e).__name__})"
    print(f"triton  {triton_line}")
    print(f"cache   {native_build.cache_root()}")
    print(f"default backend: {os.environ.get('S4LIB_BACKEND', 'auto')} (S4LIB_BACKEND)")
    print("backends:")
    for name in BACKEND_MODULES:
        ok, reason = backend_status(name)
        print(f"  {name:<8} {'yes' if ok else 'no ':<4} {reason}")
    return 0


def cmd_build_kernels(args: argparse.Namespace) -> int:
    from s4lib.ops import native_build

    print(f"building the native CPU kernels (cache {native_build.cache_root()}) ...", flush=True)
    start = time.perf_counter()
    try:
        native_build.load(verbose=args.verbose)
    except RuntimeError as e:
        print(f"FAILED after {time.perf_counter() - start:.1f} s: {e}", file=sys.stderr)
        return 1
    built = native_build.last_build_seconds()
    print(f"ok in {time.perf_counter() - start:.1f} s ({'compiled' if built and built > 5 else 'cached'}): "
          f"{native_build.native_status()[1]}")
    return 0


@dataclass
class Command:
    run: Callable[[argparse.Namespace], int]
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None


def _build_kernels_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", help="show the compiler commands and output")


COMMANDS: dict[str, Command] = {
    "info": Command(cmd_info, "torch version, devices, threads, compiler, and each kernel backend's status"),
    "build-kernels": Command(cmd_build_kernels, "compile the native CPU kernels now (otherwise on first use)",
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
