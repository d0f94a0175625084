"""SaShiMi backbone and WaveformAR: shapes, sizes, causality, recurrent mode == convolution mode, bad input."""

import json
import math

import pytest
import torch

from sashimi import PRESETS, ModelConfig, SaShiMi, WaveformAR, build_model
from sashimi.models.autoregressive import count_parameters, describe, get_config
from sashimi.objectives.autoregressive import nll_bits

BACKEND = "naive"  # the oracle kernel ops; sequences here are short
# The HiPPO-LegS init diagonalises the same matrix once per channel (~20 s for sc09 on this
# CPU); shapes and sizes do not depend on the init, so the large presets use a random one.
FAST_INIT = {"init": "dplr-random"}


def preset_model(name, **overrides):
    init = {} if name == "tiny" else FAST_INIT
    return build_model(name, backend=BACKEND, **init, **overrides)


@pytest.fixture
def one_thread():
    """Step loops are thousands of tiny ops: one thread avoids thread-pool overhead."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small_backbone(**kwargs):
    kwargs = {"d_model": 16, "n_layers": 2, "pool": (4, 4), "d_state": 8, "backend": BACKEND, **kwargs}
    return SaShiMi(**kwargs)


def run_steps(model, inputs):
    """Feed inputs (B, L, ...) one step at a time; outputs stacked to (B, L, ...)."""
    state = model.default_state(inputs.shape[0])
    outputs = []
    for t in range(inputs.shape[1]):
        y, state = model.step(inputs[:, t], state)
        outputs.append(y)
    return torch.stack(outputs, dim=1)


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# ----------------------------------------------------------------------------- shapes and sizes

@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_shapes(name):
    torch.manual_seed(0)
    # shapes do not depend on d_state; the first forward of 48 full-size S4 layers is slow
    # on a loaded CPU (float64 kernel-length solves), so the large presets use a small one
    model = preset_model(name, sample_len=64, **({} if name == "tiny" else {"d_state": 8}))
    assert model.config.name == name
    print(describe(model))
    tokens = torch.randint(0, model.config.n_classes, (2, 64))
    with torch.no_grad():
        logits = model(tokens)
    assert logits.shape == (2, 64, 256)
    assert torch.isfinite(logits).all()
    x = torch.randn(2, 64, model.config.d_model)
    with torch.no_grad():
        assert model.backbone(x).shape == x.shape


def test_preset_contents():
    sc09 = PRESETS["sc09"]
    assert (sc09.d_model, sc09.n_layers, sc09.pool, sc09.expand, sc09.ff) == (64, 8, (4, 4), 2, 2)
    assert (sc09.sample_rate, sc09.sample_len, sc09.quantization, sc09.n_classes) == (16000, 16000, "mu_law", 256)
    assert PRESETS["beethoven"].quantization == "linear" and PRESETS["youtubemix"].quantization == "mu_law"
    for name in ("youtubemix", "beethoven"):
        assert PRESETS[name].sample_len >= 7 * PRESETS[name].sample_rate
    assert PRESETS["sc09-2layer"].n_layers == 2
    assert PRESETS["tiny"].d_model <= 32


def test_parameter_counts_match_the_paper():
    counts, models = {}, {}
    for name in ("sc09", "sc09-2layer", "tiny"):
        models[name] = preset_model(name)
        counts[name] = count_parameters(models[name])
        print(f"{name}: {counts[name]:,} parameters")
    assert 4e6 <= counts["sc09"] <= 6e6  # paper: 4.1M; the reference backbone: 5.4M
    assert 1.4e6 <= counts["sc09-2layer"] <= 1.8e6  # reference 2-layer: 1.6M
    assert counts["tiny"] < 1e6
    unet = count_parameters(preset_model("sc09", unet=True))
    print(f"sc09 U-Net: {unet:,} parameters")
    assert 6e6 <= unet <= 7.5e6  # paper's later U-Net: 6.8M
    assert describe(models["sc09"]).startswith(f"WaveformAR 'sc09': {counts['sc09']:,} parameters")


# ----------------------------------------------------------------------------- causality

def test_ar_model_is_causal_by_perturbation():
    torch.manual_seed(0)
    model = build_model("tiny", d_model=16, d_state=8, backend=BACKEND).eval()
    L = 48
    base = torch.randint(0, 256, (1, L))
    # row t keeps tokens[:t+1] and redraws everything after t
    perturbed = base.repeat(L, 1)
    redraw = torch.randint(0, 256, (L, L))
    after = torch.arange(L)[None, :] > torch.arange(L)[:, None]
    perturbed[after] = redraw[after]
    with torch.no_grad():
        ref = model(base)[0]
        out = model(perturbed)
    for t in range(L):
        torch.testing.assert_close(out[t, : t + 1], ref[: t + 1], rtol=1e-5, atol=1e-5)
        if t < L - 1:  # and the perturbation did reach the later outputs
            assert not torch.allclose(out[t, t + 1:], ref[t + 1:], atol=1e-4)


@pytest.mark.parametrize("unet", [False, True])
def test_causal_backbone_by_perturbation(unet):
    torch.manual_seed(1)
    model = small_backbone(unet=unet, bidirectional=False).eval()
    assert model.causal
    L = 32
    x = torch.randn(L, L, 16)
    for t in range(L):
        x[t, : t + 1] = x[0, : t + 1]
    with torch.no_grad():
        y = model(x)
    for t in range(L):
        torch.testing.assert_close(y[t, : t + 1], y[0, : t + 1], rtol=1e-5, atol=1e-5)


def test_unet_sees_both_sides():
    torch.manual_seed(2)
    model = small_backbone(unet=True).eval()
    assert model.bidirectional and not model.causal
    L = 32
    x = torch.randn(1, L, 16)
    # row t changes only the future of t; row L + t only the past of t
    x2 = x.repeat(2 * L, 1, 1)
    rows, times = torch.arange(L)[:, None], torch.arange(L)[None, :]
    change = torch.cat([times > rows, times < rows])
    x2[change] += torch.randn(int(change.sum()), 16)
    with torch.no_grad():
        y, y2 = model(x)[0], model(x2)
    for t in range(L):
        if t < L - 1:
            assert (y2[t, t] - y[t]).abs().max() > 1e-4, f"output {t} ignores later inputs"
        if t > 0:
            assert (y2[L + t, t] - y[t]).abs().max() > 1e-4, f"output {t} ignores earlier inputs"


# ----------------------------------------------------------------------------- recurrent mode

@pytest.mark.parametrize("mode", ["dplr", "diag"])
def test_backbone_step_matches_convolution(mode, one_thread):
    torch.manual_seed(3)
    model = small_backbone(mode=mode).eval()
    x = torch.randn(2, 1024, 16)
    with torch.no_grad():
        y = model(x)
        model.setup_step()
        y_step = run_steps(model, x)
    err = relative_error(y_step, y)
    print(f"backbone {mode}: step vs convolution, max relative error {err:.2e} over 1024 steps")
    assert err <= 1e-4


@pytest.mark.parametrize("mode", ["dplr", "diag"])
def test_ar_logits_step_matches_convolution(mode, one_thread):
    torch.manual_seed(4)
    model = build_model("tiny", d_model=16, d_state=8, mode=mode, backend=BACKEND)
    tokens = torch.randint(0, 256, (2, 1024))
    # a few training steps first: the recurrence must follow trained parameters, not only the init
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        bits, count = nll_bits(model(tokens[:, :256]), tokens[:, :256])
        optimizer.zero_grad()
        (bits / count).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        logits = model(tokens)
        model.setup_step()
        logits_step = run_steps(model, tokens)
    err = relative_error(logits_step, logits)
    print(f"WaveformAR {mode}: step vs convolution logits, max relative error {err:.2e} over 1024 steps")
    assert err <= 1e-4


def test_causal_unet_and_three_levels_step(one_thread):
    torch.manual_seed(5)
    for kwargs in ({"unet": True, "bidirectional": False}, {"pool": (2, 4, 2), "prenorm": False}):
        model = small_backbone(n_layers=1, **kwargs).eval()
        x = torch.randn(2, 256, 16)
        with torch.no_grad():
            y = model(x)
            model.setup_step()
            assert relative_error(run_steps(model, x), y) <= 1e-4, kwargs


@pytest.mark.parametrize("mode", ["dplr", "diag"])
def test_prefill_then_step_matches_convolution(mode, one_thread):
    torch.manual_seed(6)
    model = build_model("tiny", d_model=16, n_layers=1, d_state=8, mode=mode, backend=BACKEND).eval()
    tokens = torch.randint(0, 256, (2, 256))
    with torch.no_grad():
        logits = model(tokens)
        model.setup_step()
        state, pieces, t = model.default_state(2), [], 0
        # prompts of any length, from fresh and from mid-group states, mixed with steps
        for kind, n in (("prefill", 37), ("step", 5), ("prefill", 64), ("prefill", 1), ("step", 29), ("prefill", 120)):
            if kind == "prefill":
                out, state = model.prefill(tokens[:, t:t + n], state)
            else:
                out = run_steps_from(model, tokens[:, t:t + n], state)
            pieces.append(out)
            t += n
        assert t == tokens.shape[1]
    assert relative_error(torch.cat(pieces, dim=1), logits) <= 1e-4


def run_steps_from(model, tokens, state):
    outputs = []
    for t in range(tokens.shape[1]):
        y, state = model.step(tokens[:, t], state)
        outputs.append(y)
    return torch.stack(outputs, dim=1)


def test_state_structure():
    model = small_backbone()
    model.setup_step()
    state = model.default_state(3)
    assert len(state["pending"]) == 2 and state["pending"][0].shape == (3, 4 * 16)
    assert state["pending"][1].shape == (3, 4 * 32)
    assert all(len(b) == 0 for b in state["buffer"])
    s4_states = [s for s in state["center"] + sum(state["up"], []) if s is not None]
    assert len(s4_states) == 3 * 2 and all(s.is_complex() for s in s4_states)
    y, state = model.step(torch.randn(3, 16), state)
    assert y.shape == (3, 16) and len(state["buffer"][0]) == 1


# ----------------------------------------------------------------------------- bad input

def test_backbone_bad_inputs():
    model = small_backbone()
    with pytest.raises(ValueError, match=r"multiple of prod\(pool\)=16"):
        model(torch.randn(2, 50, 16))
    with pytest.raises(ValueError, match=r"\(batch, length, d_model=16\)"):
        model(torch.randn(2, 64, 8))
    with pytest.raises(ValueError, match=r"\(batch, length, d_model=16\)"):
        model(torch.randn(64, 16))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(2, 64, 16, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        model([[0.0] * 16] * 64)
    model.setup_step()
    with pytest.raises(ValueError, match=r"\(batch, d_model=16\)"):
        model.step(torch.randn(2, 3), model.default_state(2))
    with pytest.raises(ValueError, match="batch_size"):
        model.default_state(0)
    with pytest.raises(ValueError, match="pool"):
        SaShiMi(16, pool=(4, 0))
    with pytest.raises(ValueError, match="n_layers"):
        SaShiMi(16, n_layers=-1)


def test_non_causal_has_no_recurrent_mode():
    model = small_backbone(unet=True)
    for call in (model.setup_step, lambda: model.default_state(1)):
        with pytest.raises(RuntimeError, match="non-causal"):
            call()


def test_ar_model_bad_inputs():
    model = build_model("tiny", d_model=16, d_state=8, backend=BACKEND)
    with pytest.raises(TypeError, match="integer"):
        model(torch.rand(2, 64))
    with pytest.raises(TypeError, match="integer"):
        model(torch.zeros(2, 64, dtype=torch.bool))
    with pytest.raises(TypeError, match="torch.Tensor"):
        model([[0] * 64])
    with pytest.raises(ValueError, match=r"\(batch, length\)"):
        model(torch.zeros(64, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(batch, length\)"):
        model(torch.zeros(2, 64, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        model(torch.full((2, 64), 256))
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        model(torch.full((2, 64), -1))
    with pytest.raises(ValueError, match=r"multiple of prod\(pool\)"):
        model(torch.zeros(2, 60, dtype=torch.long))
    model.setup_step()
    state = model.default_state(2)
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        model.step(torch.tensor([3, 300]), state)
    with pytest.raises(TypeError, match="integer"):
        model.step(torch.tensor([0.5, 1.0]), state)
    with pytest.raises(ValueError, match=r"\(batch,\)"):
        model.step(torch.zeros(2, 1, dtype=torch.long), state)
    logits, _ = model.step(torch.tensor([0, 255], dtype=torch.int32), state)  # any integer dtype
    assert logits.shape == (2, 256)


def test_config_validation_and_round_trip():
    with pytest.raises(ValueError, match="unknown preset"):
        build_model("sc10")
    with pytest.raises(ValueError, match="multiple of prod"):
        ModelConfig(sample_len=1000)
    with pytest.raises(ValueError, match="quantization"):
        ModelConfig(quantization="alaw")
    with pytest.raises(ValueError, match="mode"):
        ModelConfig(mode="s5")
    with pytest.raises(ValueError, match="unknown model configuration keys"):
        ModelConfig.from_dict({"d_model": 64, "flux_capacitor": 1})
    with pytest.raises(ValueError, match="n_classes"):
        ModelConfig.from_dict({**PRESETS["sc09"].to_dict(), "n_classes": 512})
    assert ModelConfig(quantization="mu-law").quantization == "mu_law"
    for name, config in PRESETS.items():
        d = json.loads(json.dumps(config.to_dict()))
        assert d["n_classes"] == 256 and d["pool"] == [4, 4]
        assert ModelConfig.from_dict(d) == config
    d_state = PRESETS["tiny"].d_state
    assert get_config("tiny", d_state=2 * d_state).d_state == 2 * d_state
    assert PRESETS["tiny"].d_state == d_state
    model = build_model(PRESETS["tiny"].to_dict(), backend=BACKEND)
    assert isinstance(model, WaveformAR) and model.config == PRESETS["tiny"].replace(backend=BACKEND)
    # presets are never modified by overrides
    build_model("tiny", d_model=8, backend=BACKEND)
    assert PRESETS["tiny"].d_model == 32


def test_state_dict_round_trip():
    torch.manual_seed(7)
    model = build_model("tiny", d_model=16, d_state=8, backend=BACKEND).eval()
    tokens = torch.randint(0, 256, (1, 64))
    with torch.no_grad():
        expected = model(tokens)
    clone = build_model(model.config.to_dict())
    clone.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(clone.eval()(tokens), expected)


@pytest.mark.parametrize("frozen_embedding,variant", [(False, {}), (True, {}), (False, {"unet": True}),
                                                       (False, {"ff": 0})])
def test_gradient_checkpointing_gives_the_same_gradients(frozen_embedding, variant):
    """Checkpointing (per layer pair, or per block in the U-Net; reentrant when the input needs a
    gradient, else not) and the chunked loss of model(tokens, targets) give the gradients of the
    plain forward, dropout included."""
    torch.manual_seed(8)
    model = build_model("tiny", d_model=16, d_state=8, dropout=0.1, backend=BACKEND, **variant)
    model.embedding.weight.requires_grad_(not frozen_embedding)
    model.LOSS_CHUNK_TOKENS = 50  # several loss chunks, one of them ragged
    tokens = torch.randint(0, 256, (2, 64))
    mask = torch.rand(2, 64) > 0.3
    grads = []
    for enable, fused in ((False, False), (True, False), (False, True), (True, True)):
        model.set_gradient_checkpointing(enable)
        model.zero_grad()
        torch.manual_seed(9)  # same dropout masks
        bits, count = model(tokens, tokens, mask) if fused else nll_bits(model(tokens), tokens, mask)
        assert int(count) == int(mask.sum())
        (bits / count).backward()
        grads.append([p.grad.clone() if p.grad is not None else None for p in model.parameters()])
    for other in grads[1:]:
        for g0, g1 in zip(grads[0], other):
            assert (g0 is None) == (g1 is None)
            if g0 is not None:
                torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-6)
    n_with_grad = sum(g is not None for g in grads[0])
    assert n_with_grad == sum(p.requires_grad for p in model.parameters())


def test_loss_in_chunks_equals_the_loss_of_the_logits():
    torch.manual_seed(10)
    model = build_model("tiny", d_model=16, d_state=8, backend=BACKEND).eval()
    tokens, targets = torch.randint(0, 256, (3, 48)), torch.randint(0, 256, (3, 48))
    with torch.no_grad():
        want = nll_bits(model(tokens), targets)
        for chunk in (1, 7, 48, 10_000):
            model.LOSS_CHUNK_TOKENS = chunk
            got = model(tokens, targets)
            assert int(got[1]) == int(want[1]) and math.isclose(float(got[0]), float(want[0]), rel_tol=1e-5)
    with pytest.raises(ValueError, match="targets"):
        model(tokens, targets[:, :16])
    with pytest.raises(ValueError, match="mask"):
        model(tokens, targets, torch.ones(3, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask needs targets"):
        model(tokens, mask=torch.ones(3, 48, dtype=torch.bool))


def test_activation_estimate_tracks_the_model():
    from sashimi.models.autoregressive import activation_bytes

    sc09 = get_config("sc09")
    assert activation_bytes(sc09, 8) == 8 * activation_bytes(sc09, 1)
    assert 4.5e9 < activation_bytes(sc09, 8) < 7e9  # measured: 6.3 GB of saved tensors
    assert activation_bytes(get_config("sc09-2layer"), 1) == activation_bytes(sc09, 1) // 4
    assert activation_bytes(get_config("sc09", unet=True), 1) > activation_bytes(sc09, 1)


# ----------------------------------------------------------------------------- likelihood

def test_nll_bits():
    logits = torch.zeros(2, 5, 256)  # uniform over 256 levels: exactly 8 bits per sample
    targets = torch.randint(0, 256, (2, 5))
    bits, count = nll_bits(logits, targets)
    assert int(count) == 10 and math.isclose(bits.item() / 10, 8.0, rel_tol=1e-6)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    logits[1, 2:] = 50.0 * torch.randn(3, 256)  # masked positions must not count
    bits, count = nll_bits(logits, targets, mask)
    assert int(count) == 7 and math.isclose(bits.item() / 7, 8.0, rel_tol=1e-6)
    logits = torch.randn(2, 5, 256, requires_grad=True)
    bits, count = nll_bits(logits, targets)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), targets.reshape(-1)) / math.log(2)
    torch.testing.assert_close(bits / count, expected)
    bits.backward()
    assert logits.grad is not None
    with pytest.raises(ValueError, match="disagree"):
        nll_bits(torch.zeros(2, 5, 256), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="mask"):
        nll_bits(torch.zeros(2, 5, 256), targets, torch.ones(5, dtype=torch.bool))
