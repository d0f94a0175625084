"""HiPPO transition matrices, their normal-plus-low-rank (NPLR) form, and the S4/S4D initialisations.

Everything here is computed once, in float64 numpy, and returned as float64/complex128
arrays; the kernel modules cast to their parameter dtype.

Conventions (shared with the kernel modules): a state of true size N is stored as
n = N/2 complex coordinates, one per conjugate pair; eigenvalues with non-negative
imaginary part are kept. A real system (A, B, C) with A = V (diag(Lambda) - P P^*) V^*
in the full conjugate-pair basis W = [V, conj(V)] maps to half-coordinates by
x_real = 2 Re(V x), B_half = V^* B, P_half = V^* P, C_half = V^T C, y = 2 Re(C_half . x).
"""

from __future__ import annotations

import functools
import math

import numpy as np

MEASURES = ("legs", "legt", "lagt", "fout")
DPLR_INITS = ("legs", "legt", "lagt", "fout", "dplr-random")
DIAG_INITS = ("diag-lin", "diag-inv", "diag-legs", "diag-real", "diag-random")
INIT_ALIASES = {
    "hippo": ["legs", "fout"],
    "diag": ["diag-inv", "diag-lin"],
    "fourier": ["fout"],
    "s4d-lin": ["diag-lin"],
    "s4d-inv": ["diag-inv"],
    "s4d-legs": ["diag-legs"],
    "s4d-real": ["diag-real"],
}


def transition(measure: str, N: int) -> tuple[np.ndarray, np.ndarray]:
    """Continuous-time HiPPO (A, B) for a measure; A is (N, N), B is (N,)."""
    n = np.arange(N, dtype=np.float64)
    if measure == "legs":
        # A_nk = -sqrt(2n+1) sqrt(2k+1) for n > k, -(n+1) on the diagonal, 0 above
        r = np.sqrt(2 * n + 1)
        A = -np.tril(np.outer(r, r), -1) - np.diag(n + 1)
        B = r.copy()
    elif measure == "legt":
        # Translated Legendre, halved so that its timescale matches LegS
        r = np.sqrt(2 * n + 1)
        row, col = np.meshgrid(n, n, indexing="ij")
        sign = np.where(row < col, (-1.0) ** (row - col), 1.0)
        A = -0.5 * r[:, None] * sign * r[None, :]
        B = 0.5 * r
    elif measure == "lagt":
        # Translated Laguerre: A = I/2 - lower-triangular ones
        A = 0.5 * np.eye(N) - np.tril(np.ones((N, N)))
        B = np.ones(N)
    elif measure == "fout":
        # Translated Fourier: rotation blocks at frequencies pi*k, minus the endpoint correction B B^T
        freqs = np.arange(N // 2, dtype=np.float64)
        d = np.stack([np.zeros(N // 2), freqs], axis=-1).reshape(-1)[1:]
        A = np.pi * (-np.diag(d, 1) + np.diag(d, -1))
        B = np.zeros(N)
        B[0::2] = math.sqrt(2)
        B[0] = 1.0
        A = A - np.outer(B, B)
    else:
        raise ValueError(f"unknown HiPPO measure {measure!r}; expected one of {MEASURES}")
    return A, B


def low_rank_correction(measure: str, N: int, rank: int = 1) -> np.ndarray:
    """P of shape (rank, N) such that A + P^T P is normal (skew-symmetric plus a multiple of I)."""
    n = np.arange(N, dtype=np.float64)
    if measure == "legs":
        P = np.sqrt(n + 0.5)[None, :]
    elif measure == "legt":
        r = np.sqrt(0.5 * (2 * n + 1))
        P = np.stack([np.where(n % 2 == 0, r, 0.0), np.where(n % 2 == 1, r, 0.0)])
    elif measure == "lagt":
        P = np.full((1, N), math.sqrt(0.5))
    elif measure == "fout":
        P = np.zeros((1, N))
        P[0, 0::2] = math.sqrt(2)
        P[0, 0] = 1.0
    else:
        raise ValueError(f"unknown HiPPO measure {measure!r}; expected one of {MEASURES}")
    if rank < P.shape[0]:
        raise ValueError(f"measure {measure!r} needs rank >= {P.shape[0]}, got rank={rank}")
    if rank > P.shape[0]:
        P = np.concatenate([P, np.zeros((rank - P.shape[0], N))], axis=0)
    return P


@functools.lru_cache(maxsize=64)
def nplr(measure: str, N: int, rank: int = 1):
    """Normal-plus-low-rank form of a HiPPO matrix, in half (conjugate-pair) coordinates.

    Returns (Lambda, P, B, V): Lambda (n,), P (rank, n), B (n,) complex128 and V (N, n) with
    A = W (diag(Lambda_full) - P_full P_full^*) W^*, W = [V, conj(V)] unitary. Computed in float64:
    S = A + P^T P is (c I + skew); its skew part is diagonalised with eigh (as -i S, Hermitian).
    """
    if N % 2 != 0 or N < 2:
        raise ValueError(f"d_state N must be even and >= 2 for conjugate pairs, got N={N}")
    A, B = transition(measure, N)
    P = low_rank_correction(measure, N, rank)
    S = A + P.T @ P
    sym = 0.5 * (S + S.T)
    c = float(np.mean(np.diag(sym)))
    assert np.allclose(sym, c * np.eye(N), atol=1e-8), f"{measure}: A + P^T P is not skew + cI"
    skew = 0.5 * (S - S.T)
    mu, U = np.linalg.eigh(-1j * skew)  # eigenvalues i*mu of skew, real mu ascending
    tol = 1e-8 * max(1.0, float(np.abs(mu).max()))
    positive = mu > tol
    V_pos = U[:, positive]
    zero = np.abs(mu) <= tol
    n_zero = int(zero.sum())
    if n_zero % 2 != 0:
        raise ValueError(f"{measure} with N={N} has an odd number of zero eigenvalues; use even N")
    if n_zero:
        # The zero eigenspace of a real skew matrix is real: take a real orthonormal basis and pair it
        # up as (u1 + i u2)/sqrt(2), whose conjugates complete the unitary basis.
        _, _, vh = np.linalg.svd(skew)
        null = vh[-n_zero:].T  # (N, n_zero) real orthonormal null space
        pairs = (null[:, 0::2] + 1j * null[:, 1::2]) / math.sqrt(2)
        V = np.concatenate([V_pos, pairs], axis=1)
        mu_half = np.concatenate([mu[positive], np.zeros(n_zero // 2)])
    else:
        V = V_pos
        mu_half = mu[positive]
    assert V.shape[1] == N // 2, f"{measure}: expected {N // 2} eigenvalues with positive imaginary part"
    Lambda = c + 1j * mu_half
    Vh = V.conj().T
    result = (Lambda, (Vh @ P.T).T, Vh @ B, V)
    for array in result:  # cached: callers share these arrays, so make them read-only
        array.setflags(write=False)
    return result


def diagonal_init(init: str, N: int, rng: np.random.Generator | None = None):
    """(Lambda, B) of shape (n,) for the S4D initialisations, n = N/2.

    diag-lin:  Lambda_n = -1/2 + i pi n            (S4D-Lin), B = 1
    diag-inv:  Lambda_n = -1/2 + i N/pi (N/(2n+1) - 1)  (S4D-Inv), B = 1
    diag-legs: eigenvalues of the normal part of HiPPO-LegS, B = V^* B_legs  (S4D-LegS)
    diag-real: Lambda_n = -(n+1), B = 1             (S4D-Real)
    diag-random: Lambda_n = -1/2 + i exp(z), z ~ N(0,1), B = 1
    """
    n = np.arange(N // 2, dtype=np.float64)
    ones = np.ones(N // 2, dtype=np.complex128)
    if init == "diag-lin":
        return -0.5 + 1j * np.pi * n, ones
    if init == "diag-inv":
        return -0.5 + 1j * (N / np.pi) * (N / (2 * n + 1) - 1), ones
    if init == "diag-legs":
        Lambda, _, B, _ = nplr("legs", N)
        return Lambda, B
    if init == "diag-real":
        return -(n + 1) + 0j, ones
    if init == "diag-random":
        rng = rng or np.random.default_rng()
        return -0.5 + 1j * np.exp(rng.standard_normal(N // 2)), ones
    raise ValueError(f"unknown diagonal init {init!r}; expected one of {DIAG_INITS}")


def dplr_init(init: str, N: int, rank: int = 1, rng: np.random.Generator | None = None):
    """(Lambda (n,), P (rank, n), B (n,)) for the DPLR (S4) initialisations."""
    if init in MEASURES:
        Lambda, P, B, _ = nplr(init, N, rank)
        return Lambda, P, B
    if init == "dplr-random":
        rng = rng or np.random.default_rng()
        Lambda = -0.5 + 1j * np.exp(rng.standard_normal(N // 2))
        P = (rng.standard_normal((rank, N // 2)) + 1j * rng.standard_normal((rank, N // 2))) / math.sqrt(2)
        return Lambda, P, np.ones(N // 2, dtype=np.complex128)
    if init in DIAG_INITS:  # a diagonal init inside a DPLR kernel: zero low-rank part
        Lambda, B = diagonal_init(init, N, rng)
        return Lambda, np.zeros((rank, N // 2), dtype=np.complex128), B
    raise ValueError(f"unknown DPLR init {init!r}; expected one of {DPLR_INITS + DIAG_INITS}")


def split_inits(init, n_ssm: int) -> list[str]:
    """Expand an init spec ('legs', 'legs+diag-inv', ['legs', 'fout'], 'hippo') into one name per SSM copy.

    Combinations split the n_ssm copies into equal contiguous groups.
    """
    names = init.split("+") if isinstance(init, str) else list(init)
    expanded = []
    for name in names:
        name = name.strip().lower()
        expanded.extend(INIT_ALIASES.get(name, [name]))
    if n_ssm % len(expanded) != 0:
        raise ValueError(f"init {init!r} combines {len(expanded)} initialisations, which must divide "
                         f"the number of SSM copies n_ssm={n_ssm}")
    per = n_ssm // len(expanded)
    return [name for name in expanded for _ in range(per)]
