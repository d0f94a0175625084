"""Plain float64 reference computations for the SSM tests (dense matrices, explicit loops)."""

import torch

from s4lib.discretize import output_functional


def dense_kernel_dplr(kernel, L):
    """K[c, h, l] = c^T dA^l dB from the dense real float64 system and the true C, by explicit powers."""
    dA, dB = kernel.dense_system()
    c = output_functional(kernel.true_C())  # (C, H, N)
    x = dB.clone()
    out = []
    for _ in range(L):
        out.append(torch.einsum("chn,hn->ch", c, x))
        x = torch.einsum("hij,hj->hi", dA, x)
    return torch.stack(out, -1)


def diag_kernel(kernel, L):
    """S4D kernel from its discretisation, with the Vandermonde matrix materialised in float64."""
    x, dB, C = kernel._discrete(1.0, L)
    x, dB, C = x.to(torch.complex128), dB.to(torch.complex128), C.to(torch.complex128)
    l = torch.arange(L, dtype=torch.float64)
    return 2 * (C[..., None] * dB[..., None] * torch.exp(x[..., None] * l)).sum(-2).real


def causal_conv(u, K):
    """y[b, c, h, t] = sum_{j<=t} K[c, h, t-j] u[b, h, j], by an explicit loop over t (float64)."""
    B, H, L = u.shape
    y = torch.zeros(B, K.shape[0], H, L, dtype=torch.float64)
    for t in range(L):
        n = min(t + 1, K.shape[-1])
        y[..., t] = torch.einsum("chj,bhj->bch", K[..., :n].flip(-1).double(), u[..., t + 1 - n: t + 1].double())
    return y
