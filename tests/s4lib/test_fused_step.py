"""The fused native step of FFTConv / S4Block (s4lib.fused_step) against the eager step and convolution mode.

For random configurations: fused step == eager step == convolution mode over 4096 steps (S4 and
S4D), states interchangeable between the paths mid-sequence, results independent of the thread
count, and the cases that must take the eager path (float64, autograd, torch.compile) or be refused.
"""

import os

import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import skip_unless_ci
import s4lib
from s4lib import FFTConv, S4Block, fused_step
from s4lib.fused_step import FusedStepUnavailable

STEPS = 4096
TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def extension_built():
    try:
        fused_step.load()
    except FusedStepUnavailable as e:
        if os.environ.get("CI"):
            raise
        skip_unless_ci(f"fused step extension unavailable here: {e}")


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def make_block(mode, d_model, d_state, activation="gelu", final_act="glu", seed=0, **kwargs):
    torch.manual_seed(seed)
    block = S4Block(d_model, d_state=d_state, mode=mode, activation=activation, final_act=final_act,
                    transposed=False, backend="naive", **kwargs).eval()
    with torch.no_grad():  # a trained-looking D and output layer, not only the init
        block.layer.D.normal_()
    return block


def run_steps(module, xs, state, backend):
    module.step_backend = backend
    ys = []
    for t in range(xs.shape[1]):
        y, state = module.step(xs[:, t], state)
        ys.append(y)
    return torch.stack(ys, dim=1), state


configs = st.fixed_dictionaries({
    "mode": st.sampled_from(["dplr", "diag"]),
    "d_model": st.integers(1, 40),
    "d_state": st.sampled_from([2, 4, 6, 10, 16, 18, 32]),
    "batch": st.integers(1, 3),
    "activation": st.sampled_from(["gelu", "tanh", "relu", "silu", "id", "sigmoid"]),
    "final_act": st.sampled_from(["glu", None, "id"]),
    "seed": st.integers(0, 2**16),
})


@settings(max_examples=8)
@given(configs)
def test_fused_equals_eager_equals_convolution(cfg):
    block = make_block(cfg["mode"], cfg["d_model"], cfg["d_state"], cfg["activation"], cfg["final_act"], cfg["seed"])
    x = torch.randn(cfg["batch"], STEPS, cfg["d_model"])
    with torch.no_grad():
        y_conv, _ = block(x)
        block.setup_step()
        assert fused_step.unsupported_reason(block) is None
        y_eager, s_eager = run_steps(block, x, block.default_state(cfg["batch"]), "eager")
        y_fused, s_fused = run_steps(block, x, block.default_state(cfg["batch"]), "fused")
    assert rel(y_fused, y_eager) <= TOL
    assert rel(y_fused, y_conv) <= TOL
    assert rel(y_eager, y_conv) <= TOL
    assert s_fused.dtype == s_eager.dtype and s_fused.shape == s_eager.shape
    assert rel(s_fused, s_eager) <= TOL


@pytest.mark.parametrize("mode", ["dplr", "diag"])
def test_fftconv_step_fused_equals_eager(mode):
    torch.manual_seed(1)
    conv = FFTConv(24, d_state=16, mode=mode, transposed=False, backend="naive").eval()
    conv.setup_step()
    x = torch.randn(2, 300, 24)
    with torch.no_grad():
        y_conv, _ = conv(x)
        y_eager, _ = run_steps(conv, x, conv.default_state(2), "eager")
        y_fused, _ = run_steps(conv, x, conv.default_state(2), "fused")
    assert rel(y_fused, y_eager) <= TOL and rel(y_fused, y_conv) <= TOL


@pytest.mark.parametrize("mode", ["dplr", "diag"])
def test_state_interchanges_between_paths_mid_sequence(mode):
    block = make_block(mode, 20, 12)
    block.setup_step()
    x = torch.randn(2, 90, 20)
    with torch.no_grad():
        y_ref, s_ref = run_steps(block, x, block.default_state(2), "eager")
        parts, state = [], block.default_state(2)
        for (a, b), backend in zip([(0, 30), (30, 50), (50, 70), (70, 90)], ["fused", "eager", "fused", "eager"]):
            y, state = run_steps(block, x[:, a:b], state, backend)
            parts.append(y)
        # a fused step from a state it did not produce (and an old state passed again) is still exact
        y_a, s_a = run_steps(block, x[:, :1], s_ref, "fused")
        y_b, s_b = run_steps(block, x[:, :1], s_ref, "fused")
        y_e, s_e = run_steps(block, x[:, :1], s_ref, "eager")
    assert rel(torch.cat(parts, dim=1), y_ref) <= TOL and rel(state, s_ref) <= TOL
    assert torch.equal(y_a, y_b) and torch.equal(s_a, s_b)
    assert rel(y_a, y_e) <= TOL and rel(s_a, s_e) <= TOL


@pytest.mark.parametrize("final_act", ["glu", None, "id"])
@pytest.mark.parametrize("batch", [7, 1])
@pytest.mark.parametrize("mode", ["dplr", "diag"])
def test_results_do_not_depend_on_the_thread_count(mode, batch, final_act):
    """Threads split each step's channels and output panels: 1, 2 and 3 threads, bitwise the same."""
    block = make_block(mode, 40, 8, final_act=final_act)  # 40 channels: panels of 16, 16 and 8
    block.setup_step()
    x = torch.randn(batch, 40, 40)
    results = []
    for threads in (1, 2, 3):
        with torch.no_grad(), s4lib.step_threads(threads):
            assert fused_step.default_threads(batch) == threads
            results.append(run_steps(block, x, block.default_state(batch), "fused"))
            results.append(run_steps(block.layer, x, block.default_state(batch), "fused"))  # FFTConv alone
    for i, (y, s) in enumerate(results[2:]):
        assert torch.equal(y, results[i % 2][0]) and torch.equal(s, results[i % 2][1])
    with torch.no_grad():
        y_e, s_e = run_steps(block, x, block.default_state(batch), "eager")
    assert rel(results[0][0], y_e) <= TOL and rel(results[0][1], s_e) <= TOL


def test_default_threads_at_batch_one_give_the_one_thread_result():
    """A large layer with torch given 2 threads steps on one thread by default at batch 1 (the policy),
    and its outputs are those of step_threads(1)."""
    block = make_block("dplr", 256, 64)
    block.setup_step()
    x = torch.randn(1, 120, 256)
    with torch.no_grad():
        with s4lib.step_threads(1):
            expected = run_steps(block, x, block.default_state(1), "fused")
        before = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            assert fused_step.default_threads(1, work=10 * fused_step.SPLIT_BYTES) == 1
            got = run_steps(block, x, block.default_state(1), "fused")
        finally:
            torch.set_num_threads(before)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_thread_policy_and_context():
    before = torch.get_num_threads()
    assert fused_step.default_threads(1) == 1  # a step of nothing: not worth a barrier
    assert fused_step.default_threads(1, work=fused_step.SPLIT_BYTES) == 1  # batch 1: one thread
    assert fused_step.default_threads(8, work=fused_step.SPLIT_BYTES) == max(1, min(before, 2))  # rows: split
    with s4lib.step_threads(2):
        assert torch.get_num_threads() == 2 and fused_step.default_threads(1) == 2
        with s4lib.step_threads(1):
            assert torch.get_num_threads() == 1 and fused_step.default_threads(64) == 1
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="positive int"):
        with s4lib.step_threads(0):
            pass


def test_inference_mode_and_inplace_state_changes():
    block = make_block("dplr", 16, 8)
    block.setup_step()
    x = torch.randn(1, 20, 16)
    with torch.no_grad():
        y_ref, _ = run_steps(block, x, block.default_state(1), "eager")
    with torch.inference_mode():
        y_inf, _ = run_steps(block, x, block.default_state(1), "fused")
    assert rel(y_inf, y_ref) <= TOL
    with torch.no_grad():  # the auxiliaries of a state are not reused once it was changed in place
        _, state = run_steps(block, x[:, :5], block.default_state(1), "fused")
        state.zero_()
        y_zero, _ = run_steps(block, x[:, :1], state, "fused")
    assert rel(y_zero, y_ref[:, :1]) <= TOL


def test_parameter_changes_are_followed():
    block = make_block("diag", 16, 8)
    block.setup_step()
    x = torch.randn(1, 16)
    with torch.no_grad():
        run_steps(block, x[:, None], block.default_state(1), "fused")
        block.layer.D.mul_(3)
        block.output_linear[0].bias.add_(1)
        y_f, _ = run_steps(block, x[:, None], block.default_state(1), "fused")
        y_e, _ = run_steps(block, x[:, None], block.default_state(1), "eager")
    assert rel(y_f, y_e) <= TOL


def test_eager_fallbacks_float64_autograd_and_unsupported_blocks():
    block = make_block("dplr", 8, 4).double()
    block.setup_step()
    x = torch.randn(2, 8, dtype=torch.float64)
    with torch.no_grad():
        y, state = block.step(x, block.default_state(2))  # auto: eager, float64 result
    assert y.dtype == torch.float64 and state.dtype == torch.complex128
    block.step_backend = "fused"
    with pytest.raises(FusedStepUnavailable, match="float32"):
        with torch.no_grad():
            block.step(x, block.default_state(2))
    # autograd recording: the eager step, with a graph
    block = make_block("diag", 8, 4)
    block.setup_step()
    y, _ = block.step(torch.randn(2, 8), block.default_state(2))
    assert y.requires_grad
    # a gated block: its FFTConv steps fused, the rest eagerly; same result as all-eager
    gated = make_block("dplr", 8, 4, gate=2, gate_act="tanh")
    gated.setup_step()
    assert "gate" in fused_step.unsupported_reason(gated)
    assert fused_step.unsupported_reason(gated.layer) is None
    xs = torch.randn(2, 10, 8)
    with torch.no_grad():
        y_auto, _ = run_steps(gated, xs, gated.default_state(2), "auto")
        s4lib.set_step_backend(gated, "eager")
        y_eager, _ = run_steps(gated, xs, gated.default_state(2), "eager")
    assert rel(y_auto, y_eager) <= TOL
    with pytest.raises(ValueError, match="step backend"):
        s4lib.set_step_backend(gated, "gpu")


def test_bidirectional_and_unsupported_configurations_are_refused_clearly():
    bi = FFTConv(8, d_state=4, bidirectional=True, transposed=False, backend="naive")
    assert "bidirectional" in fused_step.unsupported_reason(bi)
    with pytest.raises(ValueError, match="bidirectional"):
        bi.setup_step()
    multi = FFTConv(8, d_state=4, channels=2, transposed=False, backend="naive")
    multi.setup_step()
    multi.step_backend = "fused"
    with pytest.raises(FusedStepUnavailable, match="channels=2"):
        with torch.no_grad():
            multi.step(torch.randn(1, 8), multi.default_state(1))
    multi.step_backend = "auto"  # falls back to the eager step
    with torch.no_grad():
        y, _ = multi.step(torch.randn(1, 8), multi.default_state(1))
    assert y.shape == (1, 16)
    dense = S4Block(8, d_state=4, transposed=False, backend="naive")
    dense.setup_step(mode="dense")
    assert "linear" in fused_step.unsupported_reason(dense)
    assert "setup_step" in fused_step.unsupported_reason(S4Block(8, d_state=4, backend="naive"))


def test_torch_compile_of_step_keeps_working():
    block = make_block("diag", 16, 8)
    block.setup_step()
    x = torch.randn(2, 16)
    compiled = torch.compile(block.step)
    with torch.no_grad():
        y_c, s_c = compiled(x, block.default_state(2))
        block.step_backend = "eager"
        y_e, s_e = block.step(x, block.default_state(2))
    assert rel(y_c, y_e) <= TOL and rel(s_c, s_e) <= TOL
