"""SaShiMi.step on the fused engine (sashimi.nn.fused_backbone) against the eager step and convolution mode.

Same outputs and the same state dict as the eager step (also when the two alternate mid-sequence or a
state is snapshotted by copying its containers), results independent of the thread count, parameter
changes followed, and the fallbacks (float64, autograd, non-causal) and refusals.
"""

import os

import pytest
import torch

import s4lib
from conftest import skip_unless_ci
from sashimi.nn.backbone import SaShiMi
from sashimi.nn.fused_backbone import FastPathUnavailable, load_engine

TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def engine_built():
    try:
        load_engine()
    except FastPathUnavailable as e:
        if os.environ.get("CI"):
            raise
        skip_unless_ci(f"fused engine unavailable here: {e}")


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def backbone(seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs = {"d_model": 16, "n_layers": 2, "pool": (4, 4), "d_state": 8, "backend": "naive", **kwargs}
    model = SaShiMi(**kwargs).eval()
    model.setup_step()
    return model


def steps(model, xs, state, backend):
    s4lib.set_step_backend(model, backend)
    ys = []
    for t in range(xs.shape[1]):
        y, state = model.step(xs[:, t], state)
        ys.append(y)
    return torch.stack(ys, dim=1), state


def assert_states_close(a, b):
    for key in ("down", "up"):
        for ga, gb in zip(a[key], b[key]):
            for ta, tb in zip(ga, gb):
                assert (ta is None) == (tb is None) and (ta is None or rel(ta, tb) <= TOL)
    for ta, tb in zip(a["center"], b["center"]):
        assert (ta is None) == (tb is None) and (ta is None or rel(ta, tb) <= TOL)
    for la, lb in zip(a["buffer"], b["buffer"]):
        assert len(la) == len(lb) and all(rel(ta, tb) <= TOL for ta, tb in zip(la, lb))
    for ta, tb in zip(a["pending"], b["pending"]):
        assert ta.shape == tb.shape and (tb.abs().max() == 0 and ta.abs().max() == 0 or rel(ta, tb) <= TOL)


@pytest.mark.parametrize("kwargs", [{"mode": "dplr"}, {"mode": "diag"}, {"unet": True, "bidirectional": False},
                                    {"pool": (2, 4, 2), "prenorm": False, "n_layers": 1}, {"final_norm": False}],
                         ids=["dplr", "diag", "causal-unet", "three-levels-postnorm", "no-final-norm"])
def test_fused_equals_eager_equals_convolution(kwargs):
    model = backbone(**kwargs)
    x = torch.randn(2, 512, 16)
    with torch.no_grad():
        y_conv = model(x)
        y_eager, s_eager = steps(model, x, model.default_state(2), "eager")
        y_fused, s_fused = steps(model, x, model.default_state(2), "fused")
    assert rel(y_fused, y_eager) <= TOL and rel(y_fused, y_conv) <= TOL
    assert_states_close(s_fused, s_eager)


def test_paths_interchange_and_snapshots_work():
    model = backbone(1)
    x = torch.randn(1, 200, 16)
    with torch.no_grad():
        y_ref, s_ref = steps(model, x, model.default_state(1), "eager")
        parts, state = [], model.default_state(1)
        for (a, b), backend in zip([(0, 37), (37, 90), (90, 131), (131, 200)], ["fused", "eager", "fused", "eager"]):
            y, state = steps(model, x[:, a:b], state, backend)
            parts.append(y)
        assert rel(torch.cat(parts, 1), y_ref) <= TOL
        assert_states_close(state, s_ref)
        # a snapshot by copying the containers continues like the original (the engine reloads it)
        _, state = steps(model, x[:, :50], model.default_state(1), "fused")
        snapshot = {key: [list(group) for group in state[key]] for key in ("down", "up", "buffer")}
        snapshot.update(center=list(state["center"]), pending=list(state["pending"]))
        y_a, _ = steps(model, x[:, 50:80], state, "fused")
        y_b, _ = steps(model, x[:, 50:80], snapshot, "fused")
    assert torch.equal(y_a, y_b)
    assert rel(y_a, y_ref[:, 50:80]) <= TOL


@pytest.mark.parametrize("B, kwargs", [(8, {}), (1, {}), (3, {"unet": True, "bidirectional": False}),
                                       (1, {"pool": (2, 4, 2), "prenorm": False, "n_layers": 1, "d_model": 40})],
                         ids=["rows", "columns", "columns-unet", "columns-postnorm-padding"])
def test_threads_and_parameter_changes(B, kwargs):
    """1, 2 and 3 threads give identical outputs (8 rows: split by rows; fewer: every layer's columns)."""
    model = backbone(2, **kwargs)
    H = model.d_model
    x = torch.randn(B, 40, H)
    results = []
    with torch.no_grad():
        for threads in (1, 2, 3):
            with s4lib.step_threads(threads):
                results.append(steps(model, x, model.default_state(B), "fused")[0])
        assert all(torch.equal(r, results[0]) for r in results[1:])
        y_e, _ = steps(model, x, model.default_state(B), "eager")
        assert rel(results[0], y_e) <= TOL
        model.up_blocks[0][1].layer.output_linear.bias.add_(0.5)  # an FF layer changes: the engine is rebuilt
        y_f, _ = steps(model, x[:1], model.default_state(1), "fused")
        y_e, _ = steps(model, x[:1], model.default_state(1), "eager")
    assert rel(y_f, y_e) <= TOL


def test_fallbacks_and_refusals():
    model = backbone(3).double()
    model.setup_step()
    x = torch.randn(1, 16, dtype=torch.float64)
    with torch.no_grad():
        y, _ = model.step(x, model.default_state(1))  # auto: eager, float64
        assert y.dtype == torch.float64
        model.step_backend = "fused"
        with pytest.raises(FastPathUnavailable, match="float32"):
            model.step(x, model.default_state(1))
    model = backbone(4)
    y, _ = model.step(torch.randn(1, 16), model.default_state(1))  # autograd recording: eager, with a graph
    assert y.requires_grad
    model = backbone(5, d_state=8)
    model.step_backend = "fused"
    model.train()
    model.center_blocks[0].dropout = torch.nn.Dropout(0.5)
    with torch.no_grad(), pytest.raises(FastPathUnavailable, match="dropout"):
        model.step(torch.randn(1, 16), model.default_state(1))
