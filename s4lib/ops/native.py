"""The 'native' backend: fused C++/OpenMP kernels on CPU and Triton kernels on CUDA, as torch custom ops.

CPU calls go to the C++ kernels in kernels/ (compiled on first use and cached, see native_build);
CUDA calls go to the Triton kernels (triton_kernels). Both sit behind the custom ops
`s4lib::cauchy`, `s4lib::log_vandermonde`, `s4lib::log_vandermonde_transpose` (native_ops), which
carry autograd and fake implementations so torch.compile does not graph-break at them.

`supports()` refuses what the kernels cannot serve — another dtype than complex64/complex128, a
device other than CPU/CUDA, a CPU build that failed, CUDA without Triton, an axis beyond the
Triton kernels' int32 indexing — with a reason; `s4lib.ops.dispatch` then warns once and falls back.
"""

from __future__ import annotations

import torch

from . import native_build, native_ops  # noqa: F401  (native_ops registers the s4lib::* ops)

SUPPORTED_DTYPES = (torch.complex64, torch.complex128)
TRITON_MIN_VERSION = (3, 2)


def triton_status() -> tuple[bool, str]:
    """(usable, reason) for the CUDA path."""
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    try:
        import triton
    except Exception as e:
        return False, f"triton not importable ({type(e).__name__}: {e}); pip install 'triton>=3.2'"
    version = tuple(int(p) for p in triton.__version__.split(".")[:2] if p.isdigit())
    if version < TRITON_MIN_VERSION:
        return False, f"triton {triton.__version__} is older than 3.2"
    return True, f"Triton {triton.__version__} on {torch.cuda.get_device_name()}"


class _Native:
    name = "native"

    def status(self) -> tuple[bool, str]:
        cpu_ok, cpu_reason = native_build.native_status()
        if not torch.cuda.is_available():
            return cpu_ok, cpu_reason
        gpu_ok, gpu_reason = triton_status()
        if cpu_ok or gpu_ok:
            return True, f"CPU: {cpu_reason}; CUDA: {gpu_reason}"
        return False, cpu_reason  # the same sentence supports() gives, so dispatch warns once

    def supports(self, op: str, *tensors: torch.Tensor) -> str | None:
        for t in tensors:
            if t.is_complex() and t.dtype not in SUPPORTED_DTYPES:
                return f"dtype {t.dtype} not supported (complex64, complex128)"
        device = tensors[0].device
        if device.type == "cpu":
            if native_build.is_loaded():
                return None
            try:
                native_build.load()
            except RuntimeError as e:
                return str(e)
            return None
        if device.type == "cuda":
            ok, reason = triton_status()
            if not ok:
                return reason
            if max(t.shape[-1] for t in tensors) >= 2**30:
                return "an axis of length >= 2**30 exceeds the Triton kernels' int32 indexing"
            return None
        return f"device {device.type} not supported (cpu, cuda)"

    def prepare(self, device: torch.device) -> None:
        """Build or load what supports() would need on `device` (raises RuntimeError if impossible)."""
        if device.type == "cpu":
            native_build.load()
        elif device.type == "cuda":
            ok, reason = triton_status()
            if not ok:
                raise RuntimeError(reason)
            from . import triton_kernels  # noqa: F401

    def cauchy(self, v, z, w):
        return torch.ops.s4lib.cauchy(v, z, w)

    def log_vandermonde(self, v, x, L):
        return torch.ops.s4lib.log_vandermonde(v, x, L)

    def log_vandermonde_transpose(self, u, v, x, L):
        return torch.ops.s4lib.log_vandermonde_transpose(u, v, x, L)


BACKEND = _Native()
