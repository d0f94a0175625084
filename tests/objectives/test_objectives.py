"""The objective contract: the autoregressive objective against a float64 reference, objective_for, clear errors."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from sashimi.models.autoregressive import WaveformAR, build_model
from sashimi.objectives.autoregressive import AUTOREGRESSIVE, LN2, nll_bits, shift_right
from sashimi.objectives.base import Objective, count_real_samples, objective_for


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model("tiny", sample_len=64).eval()


def reference_nats(model, tokens, mask) -> float:
    """Next-sample NLL in nats over the masked-in positions, in float64 from the model's logits."""
    with torch.no_grad():
        logits = model(shift_right(tokens, model.config.zero_level)).double()
    log_p = torch.log_softmax(logits, dim=-1).gather(-1, tokens[..., None])[..., 0]
    return float(-(log_p * mask).sum())


def test_shift_right():
    tokens = torch.tensor([[5, 6, 7], [1, 2, 3]])
    assert shift_right(tokens, 128).tolist() == [[128, 5, 6], [128, 1, 2]]


@settings(max_examples=8)
@given(batch=st.integers(1, 3), cut=st.integers(1, 64), seed=st.integers(0, 2**16))
def test_autoregressive_objective_matches_a_float64_reference(tiny, batch, cut, seed):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 256, (batch, 64), generator=g)
    mask = torch.zeros(batch, 64, dtype=torch.bool)
    mask[:, :cut] = True
    batch_dict = {"tokens": tokens, "mask": mask, "wav": torch.zeros(batch, 64), "label": torch.full((batch,), -1)}
    with torch.no_grad():
        loss_sum, count, metrics = AUTOREGRESSIVE(tiny, batch_dict)
    want = reference_nats(tiny, tokens, mask)
    assert int(count) == batch * cut == int(count_real_samples(batch_dict)) == int(AUTOREGRESSIVE.count(batch_dict))
    assert float(loss_sum) == pytest.approx(want, rel=1e-5)
    assert float(metrics["bits"]) == pytest.approx(want / math.log(2), rel=1e-5)
    assert float(loss_sum) == pytest.approx(float(metrics["bits"]) * LN2, rel=1e-6)


def test_loss_is_differentiable_and_matches_nll_bits_of_the_logits(tiny):
    tokens = torch.randint(0, 256, (2, 64))
    mask = torch.ones(2, 64, dtype=torch.bool)
    tiny.train()
    try:
        loss_sum, count, metrics = AUTOREGRESSIVE(tiny, {"tokens": tokens, "mask": mask})
        loss_sum.backward()
    finally:
        tiny.eval()
        tiny.zero_grad(set_to_none=True)
    with torch.no_grad():
        bits, n = nll_bits(tiny(shift_right(tokens, 128)), tokens, mask)
    assert float(metrics["bits"]) == pytest.approx(float(bits), rel=1e-5) and int(n) == int(count) == 128


def test_objective_for_finds_the_class_objective_and_refuses_other_modules(tiny):
    assert objective_for(tiny) is AUTOREGRESSIVE is WaveformAR.objective
    assert (AUTOREGRESSIVE.metric, AUTOREGRESSIVE.unit) == ("bits", "bits/sample")
    with pytest.raises(TypeError, match="declares no training objective"):
        objective_for(torch.nn.Linear(2, 2))

    class Custom(torch.nn.Module):
        objective = Objective(lambda model, batch: (torch.zeros(()), 1, {}), metric="mse", unit="MSE/sample",
                              summary_key="mse_per_sample")

    assert objective_for(Custom()).metric == "mse"


def test_missing_tokens_is_a_clear_error(tiny):
    with pytest.raises(KeyError, match="tokens.*quantiser"):
        AUTOREGRESSIVE(tiny, {"wav": torch.zeros(1, 64), "mask": torch.ones(1, 64, dtype=torch.bool)})
