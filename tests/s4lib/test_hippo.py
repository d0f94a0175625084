"""HiPPO matrices and their NPLR decomposition against the dense float64 definitions."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from s4lib.hippo import diagonal_init, dplr_init, low_rank_correction, nplr, split_inits, transition

RANKS = {"legs": 1, "legt": 2, "lagt": 1, "fout": 1}


def test_legs_matches_definition():
    N = 6
    A, B = transition("legs", N)
    for n in range(N):
        for k in range(N):
            expected = -np.sqrt(2 * n + 1) * np.sqrt(2 * k + 1) if n > k else (-(n + 1) if n == k else 0.0)
            assert A[n, k] == pytest.approx(expected)
    assert np.allclose(B, np.sqrt(2 * np.arange(N) + 1))


@pytest.mark.parametrize("measure", sorted(RANKS))
def test_low_rank_correction_makes_normal(measure):
    N = 16
    A, _ = transition(measure, N)
    P = low_rank_correction(measure, N, RANKS[measure])
    S = A + P.T @ P
    sym = (S + S.T) / 2
    assert np.allclose(sym, sym[0, 0] * np.eye(N), atol=1e-12)
    assert np.allclose(S @ S.T, S.T @ S, atol=1e-9)  # normal


@settings(max_examples=30, deadline=None)
@given(measure=st.sampled_from(sorted(RANKS)), half=st.integers(1, 48), extra_rank=st.integers(0, 1))
def test_nplr_reconstructs_A_and_B(measure, half, extra_rank):
    N = 2 * half
    rank = RANKS[measure] + extra_rank
    Lambda, P, B, V = nplr(measure, N, rank)
    A, B_real = transition(measure, N)
    W = np.concatenate([V, V.conj()], axis=1)
    assert np.allclose(W.conj().T @ W, np.eye(N), atol=1e-10)  # unitary
    Pf = np.concatenate([P, P.conj()], axis=1)
    Af = np.diag(np.concatenate([Lambda, Lambda.conj()])) - Pf.T @ Pf.conj()
    scale = max(1.0, np.abs(A).max())
    assert np.abs(W @ Af @ W.conj().T - A).max() < 1e-10 * scale * N
    assert np.abs(2 * (V @ B).real - B_real).max() < 1e-10 * scale * N
    assert np.all(Lambda.imag >= 0)


def test_rank_too_small_is_an_error():
    with pytest.raises(ValueError, match="rank >= 2"):
        nplr("legt", 8, rank=1)
    with pytest.raises(ValueError, match="even"):
        nplr("legs", 7)


def test_diagonal_inits():
    N = 8
    n = np.arange(N // 2)
    lam, B = diagonal_init("diag-lin", N)
    assert np.allclose(lam, -0.5 + 1j * np.pi * n) and np.allclose(B, 1)
    lam, _ = diagonal_init("diag-inv", N)
    assert np.allclose(lam, -0.5 + 1j * (N / np.pi) * (N / (2 * n + 1) - 1))
    lam, _ = diagonal_init("diag-real", N)
    assert np.allclose(lam, -(n + 1))
    lam, B = diagonal_init("diag-legs", N)
    assert np.allclose(lam.real, -0.5) and np.allclose(lam, nplr("legs", N)[0])
    with pytest.raises(ValueError, match="unknown diagonal init"):
        diagonal_init("diag-foo", N)
    Lambda, P, B = dplr_init("dplr-random", N, 2, np.random.default_rng(0))
    assert P.shape == (2, N // 2) and np.all(Lambda.real < 0)


def test_split_inits():
    assert split_inits("legs", 4) == ["legs"] * 4
    assert split_inits("legs+diag-inv", 4) == ["legs", "legs", "diag-inv", "diag-inv"]
    assert split_inits("hippo", 2) == ["legs", "fout"]
    with pytest.raises(ValueError, match="must divide"):
        split_inits("legs+fout+diag-lin", 4)
