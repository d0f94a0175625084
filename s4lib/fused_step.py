"""The fused native recurrent step of FFTConv / S4Block, its thread policy, and the shared parameter packing.

`FFTConv.step` and `S4Block.step` call `fast_call` here first: one native call that checks that
the layer packed for the module still matches it (attributes by identity, parameters by version
counter and data pointer) and that the call qualifies, and then runs the whole layer step
(kernels/s4_step_cpu.cpp, on the S4/S4D step of kernels/s4_layer_step.h that sashimi's generator
engine uses too). Otherwise the module checks its arguments and calls `fftconv_step` /
`block_step`, which (re)pack the layer or return None when the fused path does not apply, in
which case the module runs its eager step (the oracle). The fused step reads and writes states
in the eager format (complex (B, H, n)), so the two paths interchange at any step. It applies
when all of these hold:

- the native extension builds here (a C++ compiler; see s4lib.ops.native_build);
- CPU, float32 input, complex64 state, float32 parameters (float64 goes to the eager path);
- no autograd graph is needed (torch.no_grad / inference_mode, or nothing requires grad);
- not inside torch.compile (the traced eager step is compiled instead);
- the configuration is implemented (`unsupported_reason(module)` says why not): channels=1,
  activation identity / GELU (erf) / tanh / ReLU / SiLU / sigmoid, S4 step mode 'linear' with
  rank <= 4; for S4Block additionally no bottleneck, no gate, no mult_act, and final_act 'glu',
  None or 'id' (a plain linear). An S4Block outside that set still runs its FFTConv fused.

`module.step_backend` ('auto' default, 'eager', 'fused') chooses per module; 'fused' raises
FusedStepUnavailable instead of falling back. `set_step_backend(model, name)` sets it on every
module of a model that has one (sashimi's SaShiMi backbone has its own fused engine).

Threads: the members of a persistent native team split each step's work by columns (the SSM's
channels and the output linear's panels, one barrier between; kernels/step_team.h), so the
parameters each core streams are halved with two threads, at any batch size; every output is
computed by the same operations whatever the count (results are bitwise independent of it).
`default_threads(batch, work)` = 1 below SPLIT_BATCH (8) rows or when the step streams less than
SPLIT_BYTES / 8 of parameters, else min(torch.get_num_threads(), batch // 4). One thread at small
batches because a step called from Python is tens of microseconds: on a shared machine a partner
thread that is descheduled for a moment makes a split step's barrier wait far longer than the
split saves (measured: docs/benchmarks.md). `step_threads(n)` (a context manager) fixes the count
for both paths: the fused step uses n (so step_threads(2) splits a batch-1 step over two cores),
and torch runs the eager step with n threads (torch.set_num_threads, restored on exit).
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn as nn

from .ops import native_build

__all__ = ["FusedStepUnavailable", "step_threads", "default_threads", "fused_status", "unsupported_reason",
           "set_step_backend", "pack_ssm", "pack_linear", "fast_call", "ACTIVATIONS", "VECTOR", "SPLIT_BYTES"]

_NAME = "s4lib_step_cpu"
_SOURCES = ("s4_step_cpu.cpp",)
_HEADERS = ("step_simd.h", "s4_layer_step.h", "step_team.h")
VECTOR = 16  # floats per vector in the native step (activations are padded to a multiple)
MAX_RANK = 4
DIAG, DPLR = 0, 1
OUT_NONE, OUT_GLU, OUT_LINEAR = 0, 1, 2
# activation module type -> the native code (GELU only in its exact erf form)
ACTIVATIONS = {nn.Identity: 0, nn.GELU: 1, nn.Tanh: 2, nn.ReLU: 3, nn.SiLU: 4, nn.Sigmoid: 5}
BACKENDS = ("auto", "eager", "fused")


class FusedStepUnavailable(RuntimeError):
    """The fused step cannot serve this module or call (reason in the message)."""


def extra_cflags(headers=_HEADERS) -> tuple:
    """Compiler flags of the step extensions: fused multiply-adds, and the headers' hash in the build key."""
    import hashlib

    src = native_build.source_dir()
    digest = hashlib.sha256()
    for name in headers:
        path = src / name if src is not None else None
        digest.update(path.read_bytes() if path is not None and path.is_file() else name.encode())
    return ("-ffp-contract=fast", f"-DS4STEP_HEADERS_{digest.hexdigest()[:12]}")


native_build.declare(_NAME, _SOURCES, extra_cflags(), label="fused S4 layer step")  # listed by `s4lib info`
_ext = {"module": None, "error": None}


def load():
    """The compiled extension; raises FusedStepUnavailable with the reason."""
    if _ext["module"] is not None:
        return _ext["module"]
    if _ext["error"] is not None:
        raise FusedStepUnavailable(_ext["error"])
    try:
        module = native_build.load_module(_NAME, _SOURCES, extra_cflags=extra_cflags())
    except RuntimeError as e:
        _ext["error"] = f"fused step unavailable: {e}"
        raise FusedStepUnavailable(_ext["error"]) from e
    if module.VECTOR != VECTOR:
        _ext["error"] = f"fused step: extension vector width {module.VECTOR} != {VECTOR} (stale build?)"
        raise FusedStepUnavailable(_ext["error"])
    _ext["module"] = module
    return module


def fused_status() -> tuple[bool, str]:
    """(usable, reason) for the fused step extension, without building it."""
    if _ext["module"] is not None:
        return True, "fused step extension loaded"
    if _ext["error"] is not None:
        return False, _ext["error"]
    return native_build.module_status(_NAME, _SOURCES, extra_cflags())


# ------------------------------------------------------------------------------------- threads

_local = threading.local()


SPLIT_BYTES = 256 * 1024  # parameters a step streams per row (times the batch) below which it is not split
SPLIT_BATCH = 8  # below this many rows a step called from Python runs on one thread by default


def default_threads(batch: int, work: int = 0) -> int:
    """Threads the fused step uses for `batch` rows of a step that streams `work` bytes of
    parameters (see the module docstring; inside step_threads(n): n)."""
    override = getattr(_local, "threads", None)
    if override is not None:
        return override
    threads = torch.get_num_threads()
    if threads <= 1 or batch < SPLIT_BATCH or work * SPLIT_BATCH < SPLIT_BYTES:
        return 1
    return max(1, min(threads, batch // 4))


def threads_override() -> int | None:
    """n inside step_threads(n), else None."""
    return getattr(_local, "threads", None)


@contextlib.contextmanager
def step_threads(n: int):
    """Step with n threads inside the block: the fused step's row slices and torch's threads (eager)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"step_threads takes a positive int, got {n!r}")
    previous, torch_before = getattr(_local, "threads", None), torch.get_num_threads()
    _local.threads = n
    if n != torch_before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        _local.threads = previous
        if torch.get_num_threads() != torch_before:
            torch.set_num_threads(torch_before)


# ------------------------------------------------------------------------------------- packing

def _pad(n: int) -> int:
    return -(-n // VECTOR) * VECTOR


def pack_linear(linear: nn.Linear, in_groups: int = 1, out_groups: int = 1):
    """(packed weight (OUT/16, IN, 16), bias (OUT,)) float32 with features padded per group of channels.

    Input features are `in_groups` groups of in/in_groups channels, each padded to a multiple of
    16 (the native activation layout); likewise the outputs. Padding rows and columns are zero.
    """
    W = linear.weight.detach().to(torch.float32)
    out_features, in_features = W.shape
    hi, ho = in_features // in_groups, out_features // out_groups
    padded = torch.zeros(out_groups, _pad(ho), in_groups, _pad(hi))
    padded[:, :ho, :, :hi] = W.reshape(out_groups, ho, in_groups, hi)
    OUT, IN = out_groups * _pad(ho), in_groups * _pad(hi)
    bias = torch.zeros(out_groups, _pad(ho))
    if linear.bias is not None:
        bias[:, :ho] = linear.bias.detach().to(torch.float32).reshape(out_groups, ho)
    packed = padded.reshape(OUT // VECTOR, VECTOR, IN).transpose(1, 2).contiguous()
    return packed, bias.reshape(-1).contiguous()


def _interleave(t: torch.Tensor, conj_for_dot: bool = False) -> torch.Tensor:
    """complex (..., n) -> float64 (..., 2n) as (re, im) pairs; (re, -im) for planes used in Re(c x)."""
    t = t.to(torch.complex128)
    parts = (t.real, -t.imag) if conj_for_dot else (t.real, t.imag)
    return torch.stack(parts, dim=-1).reshape(*t.shape[:-1], 2 * t.shape[-1])


def pack_ssm(kernel, D: torch.Tensor):
    """(kind, rank, n, par (H, planes, npad), chan (H, chans)) float32: a kernel's step in the native layout.

    The layout and the rearranged DPLR step (FE, FdtB, G, QFE, K1, K2) are described in
    kernels/s4_layer_step.h; the products are formed in complex128 from kernel._step (setup_step()).
    """
    from .ssm_diag import SSMKernelDiag

    s, n, H = kernel._step, kernel.n, kernel.H

    def get(name, shape):
        t = s[name]
        if tuple(t.shape) != shape:
            raise FusedStepUnavailable(f"unexpected shape {tuple(t.shape)} of the step parameter {name!r} "
                                       f"(expected {shape}); the fused step does not support this kernel")
        return t.detach().to(torch.complex128 if t.is_complex() else torch.float64)

    D = D.detach().to(torch.float64).reshape(H)
    if isinstance(kernel, SSMKernelDiag):
        planes = [_interleave(get("dA", (H, n))), _interleave(get("dB", (H, n))),
                  _interleave(get("C", (1, H, n))[0], conj_for_dot=True)]
        kind, r, chan = DIAG, 0, D[:, None]
    else:
        r = kernel.rank
        E, F, dtB = get("E", (H, n)), get("F", (H, n)), get("dtB", (H, n))
        G, Qc, M = get("G", (r, H, n)), get("Qc", (r, H, n)), get("M", (H, r, r))
        C = get("C", (1, H, n))[0]
        FE, FdtB = F * E, F * dtB
        QFE = Qc * FE
        K1 = 2 * torch.einsum("ihn,jhn->hij", Qc, G).real  # (H, r, r)
        K2 = 2 * (Qc * FdtB).sum(-1).real  # (r, H)
        planes = [_interleave(FE), _interleave(FdtB), _interleave(C, conj_for_dot=True)]
        for j in range(r):
            planes += [_interleave(G[j]), _interleave(Qc[j], conj_for_dot=True), _interleave(QFE[j], conj_for_dot=True)]
        kind = DPLR
        chan = torch.cat([D[:, None], M.reshape(H, r * r), K1.reshape(H, r * r), K2.T], dim=1)
    par = torch.zeros(H, len(planes), _pad(2 * n), dtype=torch.float64)
    par[:, :, : 2 * n] = torch.stack(planes, dim=1)
    return kind, r, n, par.to(torch.float32).contiguous(), chan.to(torch.float32).contiguous()


# ------------------------------------------------------------------------------------- support

def _activation_code(module):
    code = ACTIVATIONS.get(type(module))
    if code == 1 and module.approximate != "none":
        return None
    return code


def _conv_reason(conv) -> str | None:
    from .ssm_diag import SSMKernelDiag
    from .ssm_dplr import SSMKernelDPLR

    if conv.bidirectional:
        return "a bidirectional layer has no recurrent step"
    if conv.channels != 1:
        return f"channels={conv.channels}; the fused step supports channels=1"
    if _activation_code(conv.activation) is None:
        return f"activation {conv.activation!r} is not implemented by the fused step"
    kernel = conv.kernel
    if not hasattr(kernel, "_step"):
        return "call setup_step() before step()"
    if isinstance(kernel, SSMKernelDPLR):
        if kernel._step.get("mode") != "linear":
            return f"S4 step mode {kernel._step.get('mode')!r}; the fused step needs setup_step(mode='linear')"
        if kernel.rank > MAX_RANK:
            return f"DPLR rank {kernel.rank} > {MAX_RANK} is not implemented"
    elif not isinstance(kernel, SSMKernelDiag):
        return f"unknown SSM kernel {type(kernel).__name__}"
    for name, t in [("D", conv.D)] + [(f"kernel._step[{k!r}]", v) for k, v in kernel._step.items()
                                      if isinstance(v, torch.Tensor)]:
        if t.device.type != "cpu" or t.dtype not in (torch.float32, torch.complex64):
            return f"the fused step runs float32 on CPU; {name} is {t.dtype} on {t.device}"
    return None


def _output_kind(block):
    """(kind, linear) of an S4Block's output stage, or None when the fused step does not implement it."""
    out = block.output_linear
    if isinstance(out, nn.Identity):
        return OUT_NONE, None
    if isinstance(out, nn.Linear):
        return OUT_LINEAR, out
    if isinstance(out, nn.Sequential) and len(out) == 2 and isinstance(out[0], nn.Linear):
        if isinstance(out[1], nn.GLU) and out[1].dim in (-1, 1):
            return OUT_GLU, out[0]
        if isinstance(out[1], nn.Identity):
            return OUT_LINEAR, out[0]
    return None


def _block_reason(block) -> str | None:
    """Why the whole S4Block step is not fused (its FFTConv may still be)."""
    if block.bottleneck is not None or block.gate is not None:
        return "S4Block with bottleneck/gate: only its FFTConv step is fused"
    if not isinstance(block.mult_activation, nn.Identity):
        return "S4Block mult_act: only its FFTConv step is fused"
    if _output_kind(block) is None:
        return "S4Block output stage other than final_act 'glu', None or a plain linear: only its FFTConv step is fused"
    linear = _output_kind(block)[1]
    if linear is not None and (linear.weight.dtype != torch.float32 or linear.weight.device.type != "cpu"):
        return f"the fused step runs float32 on CPU; output_linear is {linear.weight.dtype} on {linear.weight.device}"
    return None


def unsupported_reason(module) -> str | None:
    """Why `module` (FFTConv or S4Block) does not step fused as a whole, or None if it does."""
    from .block import S4Block
    from .fftconv import FFTConv

    if isinstance(module, S4Block):
        return _conv_reason(module.layer) or _block_reason(module)
    if isinstance(module, FFTConv):
        return _conv_reason(module)
    return f"expected an FFTConv or S4Block, got {type(module).__name__}"


def set_step_backend(model: nn.Module, backend: str) -> nn.Module:
    """Set step_backend ('auto', 'eager' or 'fused') on every module of `model` that has one
    (FFTConv, S4Block, and modules built on them such as sashimi's SaShiMi); returns `model`."""
    if backend not in BACKENDS:
        raise ValueError(f"step backend must be one of {BACKENDS}, got {backend!r}")
    for m in model.modules():
        if hasattr(m, "step_backend"):
            m.step_backend = backend
    return model


# ------------------------------------------------------------------------------------- dispatch
# A packed layer watches what it was packed from: the module attributes (dict, key, object: compared
# by identity in the native call, no nn.Module.__getattr__) and the parameter tensors (version counter
# and data pointer). Each step first tries the layer's native fast_step, which returns None when
# anything differs or the call does not qualify (dtype, shape, autograd); the checked path below
# then gives the reason, refuses, or repacks.

class _Cached:
    __slots__ = ("native", "reason", "rank", "work")

    def __init__(self, reason=None):
        self.native, self.reason, self.rank, self.work = None, reason, 0, 0


def _watch_list(module, is_block):
    """((dict, key, object) the fused step of `module` depends on, parameter tensors whose values it packs)."""
    entries = []

    def add(d, key):
        entries.append((d, key, d.get(key)))
        return d.get(key)

    if is_block:
        out = add(module._modules, "output_linear")
        linear = out if type(out) is nn.Linear else (out._modules.get("0") if type(out) is nn.Sequential else None)
        if type(out) is nn.Sequential:
            add(out._modules, "0")
            add(out._modules, "1")
        W = add(linear._parameters, "weight") if linear is not None else None
        b = add(linear._parameters, "bias") if linear is not None else None
        add(module._modules, "mult_activation")
        add(module._modules, "drop")
        add(module.__dict__, "training")
        conv = add(module._modules, "layer")
    else:
        conv, W, b = module, None, None
    kernel = add(conv._modules, "kernel")
    add(kernel.__dict__, "_step")
    add(conv._modules, "activation")
    D = add(conv._parameters, "D")
    return entries, [t for t in (D, W, b) if t is not None]


def _call_reason(x, state, H, n, tensors) -> str | None:
    """Why this call cannot run fused (dtype, device, shapes, autograd), or None."""
    if type(x) is not torch.Tensor and not isinstance(x, torch.Tensor) or x.dtype != torch.float32 \
            or x.device.type != "cpu" or x.dim() != 2:
        return f"the fused step takes float32 CPU input (batch, H), got {getattr(x, 'dtype', type(x).__name__)}"
    if not isinstance(state, torch.Tensor) or state.dtype != torch.complex64 or state.shape != (x.shape[0], H, n):
        return (f"the fused step takes a complex64 state of shape ({x.shape[0]}, {H}, {n}), got "
                f"{getattr(state, 'dtype', type(state).__name__)} {tuple(getattr(state, 'shape', ()))}")
    if torch.is_grad_enabled() and (x.requires_grad or state.requires_grad
                                    or any(t is not None and t.requires_grad for t in tensors)):
        return "autograd is recording (use torch.no_grad() or torch.inference_mode() to step fused)"
    return None


def _refuse(module, reason):
    if module.step_backend == "fused":
        raise FusedStepUnavailable(f"{type(module).__name__}.step cannot run fused: {reason}")
    return None


_EMPTY = torch.empty(0)


def _pack(module, is_block):
    """A _Cached for `module` as it is now: its packed native layer, or the reason it has none."""
    reason = unsupported_reason(module)
    if reason is None and is_block and module.training and getattr(module._modules["drop"], "p", 0) > 0:
        reason = "dropout is active (call model.eval())"
    if reason is not None:
        return _Cached(reason)
    conv = module.layer if is_block else module
    try:
        ext = load()
    except FusedStepUnavailable as e:
        return _Cached(str(e))
    entries, tensors = _watch_list(module, is_block)
    with torch.no_grad():
        kind, rank, n, par, chan = pack_ssm(conv.kernel, conv.D[0])
        out_kind, w, b = OUT_NONE, _EMPTY, _EMPTY
        if is_block:
            out_kind, linear = _output_kind(module)
            if linear is not None:
                w, b = pack_linear(linear, out_groups=2 if out_kind == OUT_GLU else 1)
    out_features = module.d_model if is_block else conv.d_model
    cached = _Cached()
    cached.native = ext.Layer(kind, rank, n, _activation_code(conv.activation), par, chan, out_kind, out_features, w, b)
    cached.rank = rank if kind == DPLR else 0
    cached.work = 4 * (par.numel() + chan.numel() + w.numel())  # bytes of parameters a step reads
    cached.native.watch(entries, tensors, SPLIT_BYTES, cached.work)
    return cached


def _step(module, is_block, x, state):
    """The checked path: why not, or (re)pack, then the native step."""
    kernel = (module.layer if is_block else module).kernel
    H, n = kernel.H, kernel.n
    _, tensors = _watch_list(module, is_block)
    reason = _call_reason(x, state, H, n, tensors)
    if reason is not None:
        return _refuse(module, reason)
    out = fast_call(module, x, state)
    if out is not None:
        return out
    cached = module.__dict__["_fused_cache"] = _pack(module, is_block)
    if cached.native is None:  # refused, for the module as it is now
        return _refuse(module, cached.reason)
    out = cached.native.fast_step(x, state, getattr(_local, "threads", None) or 0)
    if out is None:
        raise FusedStepUnavailable(f"{type(module).__name__}.step: the fused layer refused a call it was packed "
                                   "for (please report)")
    return out


def fast_call(module, x, state):
    """The hot path of FFTConv.step / S4Block.step: (y, next state) from the layer packed for `module`
    when nothing it was packed from changed and the call qualifies, else None (then the caller checks
    the arguments and takes fftconv_step / block_step). Needs no argument checks of its own."""
    cached = module.__dict__.get("_fused_cache")
    if cached is not None and cached.native is not None:
        return cached.native.fast_step(x, state, getattr(_local, "threads", None) or 0)
    return None


def fftconv_step(conv, x, state):
    """FFTConv.step fused (arguments checked): (y (B, H), next state), or None for the eager step."""
    return _step(conv, False, x, state)


def block_step(block, x, state):
    """S4Block.step fused as a whole (arguments checked): (y (B, d_model), next state), or None (the
    caller falls back)."""
    return _step(block, True, x, state)
