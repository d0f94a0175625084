"""Tests of sashimi.data.quantize: exact round trips, edge values, clamping, NaN, other bit depths."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sashimi.data.quantize import Quantizer, linear_decode, linear_encode, mu_law_decode, mu_law_encode

KINDS = ["mu_law", "linear"]
BITS = [1, 2, 4, 8, 12, 16]


def mu_law_ref(x, bits=8):
    """float64 reference written straight from the formulas."""
    Q = 2 ** bits
    mu = Q - 1
    out = []
    for v in np.clip(np.asarray(x, dtype=np.float64), -1, 1).ravel():
        y = math.copysign(math.log1p(mu * abs(v)) / math.log1p(mu), v)
        out.append(math.floor((y + 1) / 2 * (Q - 1) + 0.5))
    return np.array(out)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bits", BITS)
def test_round_trip_every_level(kind, bits):
    quantizer = Quantizer(kind, bits)
    q = torch.arange(quantizer.levels)
    x = quantizer.decode(q)
    assert x.dtype == torch.float32
    assert torch.equal(quantizer.encode(x), q)
    assert torch.equal(quantizer.encode(quantizer.decode(q, dtype=torch.float64)), q)
    assert torch.all(x[1:] > x[:-1])  # strictly monotone


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bits", BITS)
def test_edges_and_zero_level(kind, bits):
    quantizer = Quantizer(kind, bits)
    top = quantizer.levels - 1
    assert quantizer.zero_level == quantizer.levels // 2
    assert quantizer.encode(torch.tensor([-1.0, 0.0, -0.0, 1.0])).tolist() == [0, quantizer.zero_level,
                                                                              quantizer.zero_level, top]
    assert quantizer.decode(torch.tensor([0, top])).tolist() == [-1.0, 1.0]
    # out of range and infinities clamp
    assert quantizer.encode(torch.tensor([-5.0, 5.0, -math.inf, math.inf])).tolist() == [0, top, 0, top]


def test_eight_bit_facts():
    quantizer = Quantizer()
    assert (quantizer.kind, quantizer.bits, quantizer.levels, quantizer.mu, quantizer.zero_level) == \
        ("mu_law", 8, 256, 255.0, 128)
    # tiny values: positive (and zero) sit at 128, negative at 127
    assert quantizer.encode(torch.tensor([1e-12, 1e-6, -1e-12, -1e-6])).tolist() == [128, 128, 127, 127]
    # mu-law resolves small amplitudes finely: the two middle levels are ~8.6e-5 from zero
    mid = quantizer.decode(torch.tensor([127, 128]))
    assert torch.allclose(mid, torch.tensor([-1.0, 1.0]) * (256 ** (1 / 255) - 1) / 255)
    assert Quantizer("linear").decode(torch.tensor([128])).item() == pytest.approx(1 / 255)


def test_matches_reference_formula():
    x = np.concatenate([np.linspace(-1.2, 1.2, 2001), [-1e-7, 0.0, 1e-7, 0.5, -0.5]])
    assert np.array_equal(mu_law_encode(x).numpy(), mu_law_ref(x))
    assert np.array_equal(linear_encode(x).numpy(), np.floor((np.clip(x, -1, 1) + 1) / 2 * 255 + 0.5))


def test_nan_raises():
    for quantizer in (Quantizer("mu_law"), Quantizer("linear")):
        with pytest.raises(ValueError, match="NaN"):
            quantizer.encode(torch.tensor([0.0, float("nan")]))
        with pytest.raises(ValueError, match="NaN"):
            quantizer.encode(np.array([np.nan]))


def test_bad_levels_and_arguments():
    quantizer = Quantizer()
    with pytest.raises(ValueError):
        quantizer.decode(torch.tensor([256]))
    with pytest.raises(ValueError):
        quantizer.decode(torch.tensor([-1]))
    with pytest.raises(ValueError):
        quantizer.decode(torch.tensor([1.5]))
    with pytest.raises(ValueError):
        Quantizer("alaw")
    with pytest.raises(ValueError):
        Quantizer(bits=0)
    with pytest.raises(ValueError):
        Quantizer(bits=17)
    with pytest.raises(ValueError):
        Quantizer("linear", mu=10)


def test_inputs_shapes_dtypes():
    quantizer = Quantizer()
    assert quantizer.encode(0.5).shape == ()
    assert quantizer.encode(torch.tensor(0.5)).shape == ()
    assert quantizer.encode(np.zeros((2, 3), np.float32)).shape == (2, 3)
    assert quantizer.encode([0.1, -0.1]).dtype == torch.int64
    assert quantizer.encode(torch.zeros(4, dtype=torch.float16)).tolist() == [128] * 4
    assert quantizer.decode(np.array([0, 255], dtype=np.uint8)).tolist() == [-1.0, 1.0]
    assert quantizer.decode(torch.tensor(128)).shape == ()
    assert Quantizer("mu", 4) == Quantizer("mu_law", 4) != Quantizer("linear", 4)
    assert "bits=4" in repr(Quantizer("linear", 4))


def test_function_forms_match_object():
    x = torch.linspace(-1, 1, 513)
    assert torch.equal(mu_law_encode(x, 4), Quantizer("mu_law", 4).encode(x))
    assert torch.equal(linear_encode(x, 4), Quantizer("linear", 4).encode(x))
    q = torch.arange(16)
    assert torch.equal(mu_law_decode(q, 4), Quantizer("mu_law", 4).decode(q))
    assert torch.equal(linear_decode(q, 4), Quantizer("linear", 4).decode(q))
    assert Quantizer("mu_law", 4).zero_level == 8


floats = st.floats(min_value=-1.0, max_value=1.0, allow_nan=False, width=32)


@settings(max_examples=200, deadline=None)
@given(st.lists(floats, min_size=1, max_size=64), st.sampled_from(KINDS), st.sampled_from([4, 8, 16]))
def test_property_encode_is_nearest_level(values, kind, bits):
    """decode(encode(x)) is the decoded level nearest to x in the (compressed) grid: error <= half a step."""
    quantizer = Quantizer(kind, bits)
    x = torch.tensor(values, dtype=torch.float32)
    q = quantizer.encode(x)
    assert q.min() >= 0 and q.max() < quantizer.levels
    xd = x.double()
    if kind == "mu_law":
        mu = quantizer.mu
        xd = torch.sign(xd) * torch.log1p(mu * xd.abs()) / math.log1p(mu)
    grid = 2.0 * q.double() / (quantizer.levels - 1) - 1.0
    assert torch.all((grid - xd).abs() <= 1.0 / (quantizer.levels - 1) + 1e-9)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(allow_nan=False, allow_infinity=True, width=64), min_size=1, max_size=32),
       st.sampled_from(KINDS))
def test_property_monotone_and_clamped(values, kind):
    quantizer = Quantizer(kind)
    x = torch.tensor(sorted(values), dtype=torch.float64)
    q = quantizer.encode(x)
    assert torch.all(q[1:] >= q[:-1])
    assert torch.equal(q, quantizer.encode(x.clamp(-1, 1)))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 255), min_size=1, max_size=64), st.sampled_from(KINDS))
def test_property_decode_encode_identity(levels, kind):
    quantizer = Quantizer(kind)
    q = torch.tensor(levels)
    assert torch.equal(quantizer.encode(quantizer.decode(q)), q)
    assert quantizer.decode(q).abs().max() <= 1.0
