"""FFTConv: the SSM as a long convolution, y = irfft(rfft(u) * rfft(K)) + D u, with recurrent stepping.

Keywords follow state-spaces/s4's standalone FFTConv so that models can switch:
FFTConv(d_model, l_max=None, channels=1, bidirectional=False, activation='gelu',
transposed=True, dropout=0.0, mode='dplr'|'diag', **kernel_args).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import fused_step
from .ssm_diag import SSMKernelDiag
from .ssm_dplr import SSMKernelDPLR

KERNELS = {"dplr": SSMKernelDPLR, "s4": SSMKernelDPLR, "nplr": SSMKernelDPLR,
           "diag": SSMKernelDiag, "s4d": SSMKernelDiag}


def activation_module(name: str | None, dim: int = -1) -> nn.Module:
    table = {None: nn.Identity, "id": nn.Identity, "identity": nn.Identity, "linear": nn.Identity,
             "gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU, "silu": nn.SiLU,
             "swish": nn.SiLU, "sigmoid": nn.Sigmoid, "softplus": nn.Softplus}
    if name == "glu":
        return nn.GLU(dim=dim)
    if name not in table:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(k for k in table if k)} or 'glu'")
    return table[name]()


class DropoutNd(nn.Module):
    """Dropout with the mask tied across the sequence (like Dropout1d), for (B, H, L) inputs."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        mask = torch.rand(*x.shape[:2], *([1] * (x.dim() - 2)), device=x.device) < 1 - self.p
        return x * mask / (1 - self.p)


# Bytes of one complex spectrum block in _FFTConv. The channel axis is processed in blocks of
# this size: temporaries stay small and same-sized, so the allocator reuses them instead of
# fragmenting the heap with a new B*C*H*n-sized buffer per step.
SPECTRUM_BLOCK_BYTES = 8 * 2**20


def _channel_blocks(B: int, C: int, H: int, n: int, element_size: int):
    """Slices of the channel axis such that one block of the (B, C) product spectrum fits the budget."""
    row_bytes = B * C * (n // 2 + 1) * 2 * element_size
    step = max(1, min(H, SPECTRUM_BLOCK_BYTES // max(row_bytes, 1)))
    return [slice(i, min(i + step, H)) for i in range(0, H, step)]


class _FFTConv(torch.autograd.Function):
    """y = irfft(rfft(u, n) * rfft(K, n), n)[..., :L] + D u, with a hand-written backward.

    Autograd through torch.fft would save both spectra (2 x B*H*(n/2+1) complex values) and run
    the r2c backward as a zero-padded complex FFT of twice the size. Here only u and K are
    saved; the backward recomputes their spectra and uses the adjoint of a circular
    convolution, a circular correlation: grad_u = irfft(G conj(K^)), grad_K = irfft(G conj(U^)).
    Forward and backward run over blocks of channels (see SPECTRUM_BLOCK_BYTES).
    """

    @staticmethod
    def forward(ctx, u, K, D, n):
        (B, H, L), C = u.shape, K.shape[0]
        y = u.new_empty(B, C, H, L)
        for h in _channel_blocks(B, C, H, n, u.element_size()):
            u_f = torch.fft.rfft(u[:, h], n=n).unsqueeze(1)  # (B, 1, h, n/2+1)
            k_f = torch.fft.rfft(K[:, h], n=n)  # (C, h, n/2+1)
            prod = u_f.mul_(k_f) if C == 1 else u_f * k_f
            del u_f, k_f
            y_h = torch.fft.irfft(prod, n=n)[..., :L]
            del prod
            if D is None:
                y[:, :, h] = y_h
            else:
                torch.addcmul(y_h, u[:, h].unsqueeze(1), D[:, h].unsqueeze(-1), out=y[:, :, h])
        ctx.save_for_backward(u, K, D)
        ctx.n = n
        return y

    @staticmethod
    def backward(ctx, g):
        u, K, D = ctx.saved_tensors
        n, (B, H, L), (C, _, Lk) = ctx.n, u.shape, K.shape
        need_u, need_K = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if torch.is_grad_enabled():  # create_graph=True: a differentiable backward (no in-place ops)
            return _FFTConv.differentiable_backward(u, K, D, n, g, ctx.needs_input_grad)
        grad_u = torch.empty_like(u) if need_u else None
        grad_K = torch.empty_like(K) if need_K else None
        for h in _channel_blocks(B, C, H, n, u.element_size()):
            g_h = g[:, :, h]
            g_f = torch.fft.rfft(g_h, n=n)  # (B, C, h, n/2+1)
            if need_u:
                k_f = torch.fft.rfft(K[:, h], n=n).conj_physical_()
                t = g_f[:, 0].mul_(k_f[0]) if C == 1 and not need_K else (g_f * k_f).sum(1)
                del k_f
                gu = torch.fft.irfft(t, n=n)[..., :L]
                del t
                if D is None:
                    grad_u[:, h] = gu
                elif C == 1:
                    torch.addcmul(gu, g_h[:, 0], D[0, h].unsqueeze(-1), out=grad_u[:, h])
                else:
                    grad_u[:, h] = gu + (g_h * D[:, h].unsqueeze(-1)).sum(1)
                del gu
            if need_K:
                u_f = torch.fft.rfft(u[:, h], n=n).conj_physical_()
                t = g_f[0].mul_(u_f[0]) if B == 1 else g_f.mul_(u_f.unsqueeze(1)).sum(0)
                del u_f, g_f
                grad_K[:, h] = torch.fft.irfft(t, n=n)[..., :Lk]
                del t
        grad_D = None
        if D is not None and ctx.needs_input_grad[2]:
            grad_D = (g * u.unsqueeze(1)).sum((0, 3)) if B > 1 else (g[0] * u).sum(-1)
        return grad_u, grad_K, grad_D, None

    @staticmethod
    def differentiable_backward(u, K, D, n, g, needs):
        """The same gradients with out-of-place ops on whole tensors, for higher-order derivatives."""
        L, Lk = u.shape[-1], K.shape[-1]
        g_f = torch.fft.rfft(g, n=n)  # (B, C, H, n/2+1)
        grad_u = grad_K = grad_D = None
        if needs[0]:
            grad_u = torch.fft.irfft((g_f * torch.fft.rfft(K, n=n).conj()).sum(1), n=n)[..., :L]
            if D is not None:
                grad_u = grad_u + (g * D.unsqueeze(-1)).sum(1)
        if needs[1]:
            grad_K = torch.fft.irfft((g_f * torch.fft.rfft(u, n=n).conj().unsqueeze(1)).sum(0), n=n)[..., :Lk]
        if D is not None and needs[2]:
            grad_D = (g * u.unsqueeze(1)).sum((0, 3))
        return grad_u, grad_K, grad_D, None


def fft_conv(u: torch.Tensor, K: torch.Tensor, n: int, D: torch.Tensor | None = None) -> torch.Tensor:
    """Circular convolution of u (B, H, L) with K (C, H, Lk) by FFT of size n, first L outputs: (B, C, H, L).

    With n >= L + Lk - 1 this is the causal linear convolution. D (C, H), if given, adds the skip
    term D u. The backward saves only u and K (see _FFTConv), so it costs no more memory than
    the forward; it is itself differentiable (double backward works). Half-precision inputs are computed, and returned, in float32.
    """
    if n < max(u.shape[-1], K.shape[-1]):
        raise ValueError(f"FFT size n={n} is shorter than the input ({u.shape[-1]}) or kernel ({K.shape[-1]})")
    if u.is_complex() or K.is_complex():
        raise TypeError("fft_conv takes real u and K")
    # pocketfft has no half types: bfloat16/float16 inputs (e.g. under CPU autocast, which runs the
    # forward FFTs in float32 by itself but not the backward's) are computed and returned in float32
    dtype = torch.promote_types(torch.promote_types(u.dtype, K.dtype), torch.float32)
    u, K = u.to(dtype), K.to(dtype)
    D = D.to(dtype) if D is not None else None
    if u.shape[0] == 0:  # an empty batch: an empty (0, C, H, L) result, still connected to K and D for autograd
        return u.unsqueeze(1) * (K[..., :1] + (D.unsqueeze(-1) if D is not None else 0))
    return _FFTConv.apply(u, K, D, n)


def check_input(x: torch.Tensor, d_model: int, transposed: bool, name: str = "x") -> None:
    layout = f"(batch, d_model={d_model}, length)" if transposed else f"(batch, length, d_model={d_model})"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float32/float64) of shape {layout}, got {x.dtype}")
    if x.dim() != 3:
        raise ValueError(f"{name} must have shape {layout}, got {x.dim()}-D shape {tuple(x.shape)}")
    H = x.shape[1] if transposed else x.shape[2]
    if H != d_model:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(x.shape)} "
                         f"(channel axis has {H}, expected {d_model}; transposed={transposed})")
    if x.shape[-1 if transposed else 1] < 1:
        raise ValueError(f"{name} must have length >= 1, got shape {tuple(x.shape)}")


# d_state above this warns: building an S4 (DPLR) kernel costs O(N^3) (N=1024: ~5 s per layer on one core,
# N=4096: minutes), and the kernel O(H N L) per forward
D_STATE_WARN = 512


def check_step_args(x: torch.Tensor, state, d_model: int, kernel) -> None:
    """step(x, state) arguments: x (B, d_model) floating point, state as made by default_state(B)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"step input must be a floating-point tensor of shape (batch, d_model={d_model}), "
                        f"got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() != 2 or x.shape[-1] != d_model:
        raise ValueError(f"step input must have shape (batch, d_model={d_model}), got {tuple(x.shape)}")
    if state is None:
        raise TypeError(f"step needs a state: start from default_state({x.shape[0]}) (shape "
                        f"({x.shape[0]}, {kernel.H}, {kernel.n}) complex), then pass the state step returned")
    kernel._check_state(state, (x.shape[0],))


class FFTConv(nn.Module):
    """SSM convolution layer: K from an SSM kernel module, FFT convolution, D skip, activation, dropout.

    d_model (H) channels in; output has channels*H features. `transposed=True` takes
    (B, H, L), otherwise (B, L, H). `l_max=None` serves any length. `bidirectional` sums a
    causal kernel and a flipped anti-causal one. forward(x, state=None, rate=1.0) returns
    (y, next_state); next_state is None unless a state was passed (state forwarding).
    """

    def __init__(self, d_model: int, l_max: int | None = None, channels: int = 1, bidirectional: bool = False,
                 activation: str | None = "gelu", transposed: bool = True, dropout: float = 0.0,
                 tie_dropout: bool = False, mode: str = "dplr", kernel: str | None = None, **kernel_args):
        super().__init__()
        mode = kernel if kernel is not None else mode
        if mode not in KERNELS:
            raise ValueError(f"unknown mode {mode!r}; expected one of {sorted(KERNELS)}")
        if not (isinstance(channels, int) and channels >= 1):
            raise ValueError(f"channels must be an int >= 1, got {channels!r}")
        if l_max is not None and not (isinstance(l_max, int) and l_max >= 1):
            raise ValueError(f"l_max must be None or an int >= 1, got {l_max!r}")
        self.d_model, self.channels, self.l_max = d_model, channels, l_max
        self.bidirectional, self.transposed, self.mode = bidirectional, transposed, mode
        self.activation = activation_module(activation, dim=1 if transposed else -1)
        if activation == "glu" and channels % 2:
            raise ValueError("activation='glu' halves the channels: use an even number of channels")
        d_state = kernel_args.get("d_state", 64)
        if isinstance(d_state, int) and d_state > D_STATE_WARN:
            warnings.warn(f"d_state={d_state} is above {D_STATE_WARN}: building each S4 layer costs O(d_state^3) "
                          f"(d_state=1024 takes seconds per layer, 4096 minutes) and every forward "
                          f"O(d_model * d_state * length)", stacklevel=3)
        self.D = nn.Parameter(torch.randn(channels, d_model))
        kernel_channels = 2 * channels if bidirectional else channels
        if KERNELS[mode] is SSMKernelDPLR:
            kernel_args["l_max"] = l_max
        self.kernel = KERNELS[mode](d_model, channels=kernel_channels, **kernel_args)
        dropout_cls = DropoutNd if tie_dropout else nn.Dropout
        self.drop = dropout_cls(dropout) if dropout > 0 else nn.Identity()
        self.step_backend = "auto"  # 'auto' | 'eager' | 'fused': see s4lib.fused_step

    @property
    def d_output(self) -> int:
        return self.d_model * self.channels

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None, rate: float = 1.0, **kwargs):
        check_input(x, self.d_model, self.transposed)
        if not rate > 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        if state is not None and self.bidirectional:
            raise ValueError("state forwarding is causal: not available with bidirectional=True")
        u = x if self.transposed else x.transpose(-1, -2)  # (B, H, L)
        B, H, L = u.shape
        if state is not None:
            self.kernel._check_state(state, (B,))
        l_kernel = L if self.l_max is None else min(L, round(self.l_max / rate))
        if state is not None and l_kernel < L:
            raise ValueError(f"state forwarding needs the whole kernel: input length {L} exceeds l_max={self.l_max}")
        K, K_state = self.kernel(L=l_kernel, state=state, rate=rate)  # (C', H, l_kernel)
        K = K.to(u.dtype)
        if self.bidirectional:
            K_fwd, K_bwd = K[: self.channels], K[self.channels:]
            # causal part at lags 0..; anti-causal part at lags -1, -2, ... (lag 0 counted once)
            # with FFT size l_kernel + L the circular wrap puts the anti-causal part on future inputs
            K = F.pad(K_fwd, (0, L)) + F.pad(K_bwd.flip(-1), (L, 0))
        y = fft_conv(u, K, n=l_kernel + L, D=self.D.to(u.dtype))  # (B, C, H, L), D u included
        next_state = None
        if state is not None:
            y = y + K_state.to(u.dtype)
            next_state = self.kernel.forward_state(u, state)
        y = y.reshape(B, self.channels * H, L)
        y = self.drop(y)
        if not self.transposed:
            y = y.transpose(-1, -2)
        return self.activation(y), next_state

    # ---------------------------------------------------------------- recurrent mode
    def setup_step(self, mode: str = "linear", **kwargs):
        """Prepare the recurrence (call after training / after moving the module)."""
        if self.bidirectional:
            raise ValueError("a bidirectional layer cannot run as a recurrence")
        self.kernel.setup_step(mode=mode, **kwargs)

    def default_state(self, *batch_shape, device=None) -> torch.Tensor:
        return self.kernel.default_state(*batch_shape, device=device)

    def step(self, x: torch.Tensor, state: torch.Tensor):
        """x (B, H) -> y (B, channels*H), next state.

        Runs the fused native step when it applies (s4lib.fused_step: CPU float32, no autograd
        graph, a supported configuration), else this eager step; both read and write the same state.
        """
        fused = self.step_backend != "eager" and not torch.compiler.is_compiling()
        if fused:  # the packed layer checks its own inputs, and declines anything it was not packed for
            out = fused_step.fast_call(self, x, state)
            if out is not None:
                return out
        if not hasattr(self.kernel, "_step"):
            raise RuntimeError("call setup_step() before step()")
        check_step_args(x, state, self.d_model, self.kernel)  # before either path
        if fused:
            out = fused_step.fftconv_step(self, x, state)
            if out is not None:
                return out
        y, state = self.kernel.step(x, state)  # (B, C, H)
        y = y + x.unsqueeze(1) * self.D
        y = y.reshape(x.shape[0], -1)
        return self.activation(y), state
