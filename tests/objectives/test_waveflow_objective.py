"""The WaveFlow objective: nats per sample, masking, cropping, and a few training steps that lower it."""

import math

import pytest
import torch

from sashimi.models.waveflow import WaveFlow, WaveFlowConfig
from sashimi.objectives.waveflow import padded_lengths, prepare, waveflow_objective


def tiny(**kw):
    return WaveFlowConfig(**{"h": 8, "n_flows": 2, "n_layers": 3, "residual_channels": 8, "hop_length": 64,
                             "n_fft": 256, "win_length": 256, "sample_rate": 16000, **kw})


def test_objective_at_init_is_the_gaussian_nll_of_the_audio():
    torch.manual_seed(0)
    model = WaveFlow(tiny(dequantize_step=0.0)).double()
    wav = 0.2 * torch.randn(2, 1001, dtype=torch.float64)  # padded to 1008 (h = 8), the mel to 1024 (hop 64)
    assert padded_lengths(model.config, 1001) == (1008, 1024)
    loss_sum, count, metrics = waveflow_objective(model, {"wav": wav, "mask": torch.ones(2, 1001, dtype=torch.bool)})
    assert int(count) == 2 * 1001
    expected = -torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0).log_prob(wav).sum()
    torch.testing.assert_close(loss_sum, expected)
    torch.testing.assert_close(metrics["nll"], expected)  # metrics are sums over the same count
    assert float(metrics["nll_bits"]) == pytest.approx(float(metrics["nll"]) / math.log(2))


def test_padding_is_excluded():
    torch.manual_seed(0)
    model = WaveFlow(tiny(dequantize_step=0.0)).double()
    wav = 0.2 * torch.randn(1, 512, dtype=torch.float64)
    mask = torch.ones(1, 512, dtype=torch.bool)
    mask[:, 300:] = False
    loss_sum, count, _ = waveflow_objective(model, {"wav": wav, "mask": mask})
    assert int(count) == 300
    expected = -torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0).log_prob(wav[:, :300]).sum()
    torch.testing.assert_close(loss_sum, expected)


def test_silence_gives_a_finite_loss_and_short_clips_a_clear_error():
    model = WaveFlow(tiny())
    model.eval()
    first = waveflow_objective(model, {"wav": torch.zeros(2, 512)})[0]
    assert torch.equal(first, waveflow_objective(model, {"wav": torch.zeros(2, 512)})[0])  # eval: fixed noise
    loss_sum, count, _ = waveflow_objective(model, {"wav": torch.zeros(2, 512)})
    assert torch.isfinite(loss_sum)
    with pytest.raises(ValueError, match="too short"):
        waveflow_objective(model, {"wav": torch.zeros(2, 40)})
    with pytest.raises(KeyError, match="wav"):
        waveflow_objective(model, {"x": torch.zeros(2, 512)})
    x, mel, _ = prepare(model, torch.zeros(2, 512), dequantize=False)
    assert torch.equal(x, torch.zeros(2, 512)) and mel.shape == (2, 80, 8)


@pytest.mark.parametrize("kw", [{}, {"width_model": "s4", "d_state": 8}, {"condition": "none"}])
def test_a_few_adam_steps_lower_the_nll(kw):
    torch.manual_seed(0)
    model = WaveFlow(tiny(**kw))
    t = torch.arange(1024) / 16000
    wav = (0.5 * torch.sin(2 * math.pi * 440 * t) * torch.ones(2, 1))
    wav = wav + 0.01 * torch.randn_like(wav)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(15):
        loss_sum, count, _ = waveflow_objective(model, {"wav": wav})
        loss = loss_sum / count
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2, losses
