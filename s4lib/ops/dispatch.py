"""Backend registry and selection for the kernel ops (Cauchy, log-Vandermonde).

A backend is a module under `s4lib.ops` that exposes `BACKEND`, an object with

    name: str
    status() -> (bool, str)                 # can it run at all here, and if not why
    supports(op, *tensors) -> str | None    # None if it can serve this call, else the reason
    cauchy(v, z, w)                         # v, w: (B, N) complex; z: (L,) -> (B, L) complex
    log_vandermonde(v, x, L)                # v, x: (B, N) complex -> (B, L) real
    log_vandermonde_transpose(u, v, x, L)   # u: (B, L) real; v, x: (B, N) -> (B, N) complex

Inputs reaching a backend are already validated, broadcast, flattened to one batch
dimension and contiguous. Selection order: the `backend=` argument, else the
environment variable S4LIB_BACKEND, else 'auto'. A backend that is missing, cannot
serve a call, or raises while computing it is skipped with a one-time, one-line warning
(which backend is off, which one is used instead, why) and the next one in the chain is
used; the chain always ends in 'chunked' and 'naive'.
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch

BACKEND_MODULES = {
    "naive": "s4lib.ops.naive",
    "chunked": "s4lib.ops.chunked",
    "keops": "s4lib.ops.keops",
    "native": "s4lib.ops.native",
}
BACKEND_NAMES = tuple(BACKEND_MODULES) + ("auto",)

_loaded: dict[str, object] = {}
_import_errors: dict[str, str] = {}
_broken: dict[str, str] = {}
_warned: set = set()


def _warn_once(key, message):
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def get_backend(name: str):
    """The backend object for `name`, or None if its module cannot be imported."""
    if name in _loaded:
        return _loaded[name]
    if name in _import_errors:
        return None
    try:
        module = importlib.import_module(BACKEND_MODULES[name])
        _loaded[name] = module.BACKEND
        return module.BACKEND
    except Exception as e:  # ImportError, or a broken optional dependency
        _import_errors[name] = f"{type(e).__name__}: {e}"
        return None


def backend_status(name: str) -> tuple[bool, str]:
    """(available, reason) for one backend, without running any kernel."""
    if name not in BACKEND_MODULES:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKEND_NAMES}")
    if name in _broken:
        return False, _broken[name]
    backend = get_backend(name)
    if backend is None:
        return False, _import_errors[name]
    return backend.status()


def available_backends() -> list[str]:
    return [name for name in BACKEND_MODULES if backend_status(name)[0]]


def resolve_name(backend: str | None) -> str:
    name = backend if backend is not None else os.environ.get("S4LIB_BACKEND", "auto")
    name = name.strip().lower()
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown kernel backend {name!r}; expected one of {BACKEND_NAMES} "
                         f"(from {'the backend argument' if backend is not None else 'S4LIB_BACKEND'})")
    return name


def chain(name: str, device: torch.device) -> list[str]:
    """Backends to try, in order, for a requested name on a device."""
    if device.type == "cuda":
        auto = ["native", "keops", "chunked"]
    else:
        auto = ["native", "chunked"]
    order = auto if name == "auto" else [name] + [b for b in auto if b != name]
    for last in ("chunked", "naive"):
        if last not in order:
            order.append(last)
    return order


def prepare(backend: str | None = None, device="cpu") -> str | None:
    """Import, and for 'native' build or load, the backend that call() will pick on `device`.

    Layers call this when they are built, so that the first call of an op inside
    torch.compile only reads cached state (an import or a compiler run cannot be traced).
    Returns the backend's name, or None if none is usable; never raises for a broken backend
    (call() then warns and falls back as usual).
    """
    device = torch.device(device)
    for candidate in chain(resolve_name(backend), device):
        if not backend_status(candidate)[0]:
            continue
        impl = get_backend(candidate)
        try:
            if hasattr(impl, "prepare"):
                impl.prepare(device)
        except Exception:
            continue
        return candidate
    return None


def call(op: str, backend: str | None, tensors: tuple, *args):
    """Run `op` on the first backend of the chain that can serve it.

    Each backend skipped on the way is reported once (per backend and reason) in one line that
    names the backend that is off, the one used instead, and why.
    """
    name = resolve_name(backend)
    device = tensors[0].device
    skipped = []
    for candidate in chain(name, device):
        ok, reason = backend_status(candidate)
        if ok:
            impl = get_backend(candidate)
            reason = impl.supports(op, *tensors)
            if reason is None:
                try:
                    result = getattr(impl, op)(*tensors, *args)
                except (torch.cuda.OutOfMemoryError, KeyboardInterrupt):
                    raise
                except Exception as e:  # a backend fault, never a user error (inputs were validated)
                    reason = f"failed: {type(e).__name__}: {_one_line(str(e))}"
                    if not isinstance(e, MemoryError):
                        _broken[candidate] = reason
                else:
                    for off, why in skipped:
                        _warn_once((off, why), f"s4lib: kernel backend '{off}' off, using '{candidate}' "
                                               f"for {op}: {_one_line(why)}")
                    return result
        skipped.append((candidate, reason))
    raise RuntimeError(f"no kernel backend could compute {op}: " +
                       "; ".join(f"'{off}': {why}" for off, why in skipped))


def _one_line(text: str, limit: int = 160) -> str:
    """The first line of an exception message, clipped (a compiler's output never reaches a warning)."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first if len(first) <= limit else first[: limit - 1] + "…"
