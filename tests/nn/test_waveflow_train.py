"""The fused training path of FlowNet (sashimi.nn.waveflow_train) against the module path, in float64."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sashimi.models.waveflow import WaveFlow, WaveFlowConfig
from sashimi.nn.waveflow import FlowNet
from sashimi.nn.waveflow_train import _FusedFlowNet, _folded_weights
from sashimi.objectives.waveflow import waveflow_objective


def perturbed(module, seed, scale=0.3):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


def run(net, x, cond, fused, weights):
    """(log_s, b) and the gradients of a loss that mixes them nonlinearly, w.r.t. x, cond and every parameter."""
    net.fused = fused
    log_s, b = net(x, cond)
    loss = (log_s.sin() * weights + b * b.cos()).sum()
    wrt = [x] + ([cond] if cond is not None else []) + list(net.parameters())
    return [log_s, b, *torch.autograd.grad(loss, wrt)]


def assert_same(fast, ref, names):
    # one scale per tensor, floored by the largest gradient: the start conv has one input channel, so
    # its weight-norm direction gets a zero gradient that both paths give as round-off
    floor = max(r.abs().max().item() for r in ref[2:])
    for name, a, b in zip(names, fast, ref):
        scale = max(b.abs().max().item(), 1e-3 * floor)
        assert (a - b).abs().max().item() <= 1e-11 * scale, name


@settings(max_examples=25)
@given(r=st.integers(1, 6), n_layers=st.integers(1, 4), cond_channels=st.sampled_from([0, 3]),
       H=st.integers(1, 9), batch=st.integers(1, 3), W=st.integers(1, 9),
       dh=st.lists(st.integers(1, 5), min_size=4, max_size=4),
       dw=st.lists(st.integers(1, 12), min_size=4, max_size=4), seed=st.integers(0, 1000))
def test_fused_forward_and_gradients_equal_the_module_path(r, n_layers, cond_channels, H, batch, W, dh, dw, seed):
    net = perturbed(FlowNet(r, n_layers, cond_channels, dh[:n_layers], dw[:n_layers]).double(), seed)
    assert net.fused  # the conv width model's default
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, H, W, dtype=torch.float64, generator=g, requires_grad=True)
    cond = (torch.randn(batch, cond_channels, H, W, dtype=torch.float64, generator=g, requires_grad=True)
            if cond_channels else None)
    weights = torch.randn(batch, 1, H, W, dtype=torch.float64, generator=g)
    names = ["log_s", "b", "x"] + (["cond"] if cond_channels else []) + [n for n, _ in net.named_parameters()]
    ref = run(net, x, cond, False, weights)
    fast = run(net, x, cond, True, weights)
    assert_same(fast, ref, names)


def test_fused_function_gradcheck():
    """The hand-written backward against finite differences, every input at once (tiny shapes)."""
    net = perturbed(FlowNet(3, 3, 2, (1, 2, 1), (1, 3, 2)).double(), 0)
    B, H, W = 2, 4, 5
    N = B * H * W
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, dtype=torch.float64, generator=g)
    cond_aug = torch.cat([torch.randn(2, N, dtype=torch.float64, generator=g), torch.ones(1, N, dtype=torch.float64)])
    with torch.no_grad():
        weights = [w.clone() for w in _folded_weights(net)]
    inputs = [t.requires_grad_() for t in [x, cond_aug, *weights]]
    meta = (H, B * W, W, net.height_dilations, net.width_dilations)
    assert torch.autograd.gradcheck(lambda *a: _FusedFlowNet.apply(*a, meta), inputs, eps=1e-6, atol=1e-7)


def tiny(**kw):
    return WaveFlowConfig(**{"h": 8, "n_flows": 3, "n_layers": 3, "residual_channels": 6, **kw})


@pytest.mark.parametrize("kw", [{}, {"condition": "none"}, {"checkpointing": True},
                                {"h": 32, "n_layers": 5, "height_dilations": (1, 2, 4, 8, 16)}])
def test_log_likelihood_and_its_gradients_equal_the_module_path(kw):
    model = perturbed(WaveFlow(tiny(**kw)).double(), 1, scale=0.1)
    g = torch.Generator().manual_seed(2)
    wav = 0.3 * torch.randn(2, 1100, dtype=torch.float64, generator=g)
    results = {}
    for fused in (False, True):
        for net in model.flows:
            net.fused = fused
        torch.manual_seed(3)  # the same dequantisation noise
        loss_sum, count, _ = waveflow_objective(model, {"wav": wav})
        grads = torch.autograd.grad(loss_sum / count, list(model.parameters()))
        x, mel = wav[:, :1024], model.mel(wav[:, :1024]) if model.conditional else None
        results[fused] = [loss_sum, model.log_likelihood(x, mel), model.log_likelihood_terms(x, mel), *grads]
    floor = max(r.abs().max().item() for r in results[False][3:])
    for a, b in zip(results[True], results[False]):
        assert (a - b).abs().max().item() <= 1e-11 * max(b.abs().max().item(), 1e-3 * floor)


def test_float32_fused_path_is_close_to_the_module_path():
    net = perturbed(FlowNet(16, 4, 5, (1, 1, 2, 1), (1, 2, 4, 8)), 4, scale=0.05)
    x = torch.randn(2, 1, 15, 40, requires_grad=True)
    cond = torch.randn(2, 5, 15, 40, requires_grad=True)
    weights = torch.randn(2, 1, 15, 40)
    ref = run(net, x, cond, False, weights)
    fast = run(net, x, cond, True, weights)
    floor = max(r.norm().item() for r in ref[2:])  # as in assert_same: the start conv's zero direction gradient
    for a, b in zip(fast, ref):
        assert (a - b).norm().item() <= 1e-5 * max(b.norm().item(), 1e-3 * floor)


def test_kept_buffers_are_not_reused_while_a_graph_holds_them():
    """Two graphs alive at once, each backward run twice (retain_graph): every gradient stays the module path's."""
    net = perturbed(FlowNet(4, 3, 2, (1, 2, 1), (1, 2, 4)).double(), 5)
    x = torch.randn(2, 1, 5, 6, dtype=torch.float64, requires_grad=True)
    cond = torch.randn(2, 2, 5, 6, dtype=torch.float64)
    losses = {}
    for fused in (False, True):
        net.fused = fused
        losses[fused] = [sum((t * t.cos()).sum() for t in net(x * k, cond)) for k in (1.0, -0.5)]
    for fused in (True, True, False):
        grads = [torch.autograd.grad(loss, x, retain_graph=True)[0] for loss in losses[fused]]
        if fused:
            fast = grads
    for a, b in zip(fast, grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_the_s4_width_model_runs_the_modules():
    net = FlowNet(4, 2, 0, (1, 1), (1, 2), width_model="s4", s4={"d_state": 4})
    assert not net.fused
    assert math.isfinite(float(net(torch.randn(1, 1, 3, 8), None)[0].sum()))
