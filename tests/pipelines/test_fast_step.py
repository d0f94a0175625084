"""The fused step engine (sashimi.pipelines.fast_step) against the eager step (the oracle) and convolution mode.

Logits within 1e-4 relative at every step over 4096 steps (batch 1 and 3), identical greedy token
sequences (engine, eager loop, and the argmaxes of convolution mode on the generated tokens), state
round trips with prefill, the sampling rule against a plain-Python transcription of its definition,
and the cases the engine must refuse.
"""

import math
import os
import subprocess
import sys

import pytest
from conftest import skip_unless_ci
import torch

import s4lib

from sashimi import build_model
from sashimi.models.autoregressive import ModelConfig, WaveformAR
from sashimi.objectives.autoregressive import nll_bits
from sashimi.pipelines.generate import _torch_threads  # the library's own thread-count context
from sashimi.pipelines.sampling import sample as sample_oracle

fast_step = pytest.importorskip("sashimi.pipelines.fast_step")
from sashimi.pipelines.fast_step import FastPathUnavailable, FastStepper, engine_sample, fast_path_status  # noqa: E402

BACKEND = "naive"
STEPS = 4096
TOL = 1e-4


def _engine_or_skip():
    torch.manual_seed(0)
    model = build_model("tiny", d_model=16, n_layers=1, d_state=4, backend=BACKEND).eval()
    model.setup_step()
    try:
        FastStepper(model, 1)
    except FastPathUnavailable as e:
        if os.environ.get("CI"):
            raise
        skip_unless_ci(f"fused engine unavailable here: {e}")


@pytest.fixture(scope="module", autouse=True)
def engine_built():
    _engine_or_skip()


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def make_model(name, mode, trained, seed, **overrides):
    torch.manual_seed(seed)
    overrides = {"d_state": 8, **overrides} if name != "tiny" else overrides
    model = build_model(name, mode=mode, backend=BACKEND, **overrides)
    if trained:  # the engine must follow trained parameters, not only the init
        tokens = torch.randint(0, 256, (2, 256))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(3):
            bits, count = nll_bits(model(tokens), tokens)
            optimizer.zero_grad()
            (bits / count).backward()
            optimizer.step()
    model.eval()
    return model


# ----------------------------------------------------------------------------- fast == eager == conv

@pytest.mark.parametrize("trained", [False, True], ids=["init", "trained"])
@pytest.mark.parametrize("mode", ["dplr", "diag"])
@pytest.mark.parametrize("name", ["tiny", "sc09-2layer"])
def test_fast_matches_eager_and_convolution(name, mode, trained):
    model = make_model(name, mode, trained, seed=10 + 2 * trained + (mode == "diag"))
    B = 3
    first = torch.tensor([128, 7, 250])
    with torch.no_grad():
        model.setup_step()
        # the oracle: eager greedy decoding, recording logits
        state, token = model.default_state(B), first
        eager_logits = torch.empty(B, STEPS, 256)
        eager_tokens = torch.empty(B, STEPS, dtype=torch.long)
        with _torch_threads(1):
            for t in range(STEPS):
                logits, state = model.step(token, state)
                token = logits.argmax(-1)
                eager_logits[:, t], eager_tokens[:, t] = logits, token
        inputs = torch.cat([first[:, None], eager_tokens[:, :-1]], dim=1)

        # greedy decoding in the engine: the same tokens
        stepper = FastStepper(model, B)
        tokens, logprobs = stepper.generate(first, torch.zeros(B, STEPS), temperature=0)
        assert torch.equal(tokens, eager_tokens), f"greedy tokens differ from step {first_difference(tokens, eager_tokens)}"
        eager_logprobs = torch.log_softmax(eager_logits.double(), -1).gather(-1, eager_tokens[..., None])[..., 0]
        assert (logprobs - eager_logprobs).abs().max() < 1e-4

        # logits at every step, teacher-forced, batch 3 and batch 1
        worst = 0.0
        for rows in (slice(0, 3), slice(0, 1)):
            stepper = FastStepper(model, rows.stop - rows.start)
            for t in range(STEPS):
                fast = stepper.step(inputs[rows, t])
                err = relative_error(fast, eager_logits[rows, t])
                worst = max(worst, err)
                assert err <= TOL, f"batch {rows.stop}: step {t}: relative error {err:.2e}"

        # convolution mode on the generated tokens: the same argmaxes
        conv_logits = model(inputs)
        assert torch.equal(conv_logits.argmax(-1), eager_tokens)
        conv_err = relative_error(eager_logits, conv_logits)
    print(f"{name} {mode} {'trained' if trained else 'init'}: fast vs eager max relative logit error "
          f"{worst:.2e} over {STEPS} steps (eager vs conv {conv_err:.2e}); greedy tokens identical")


def first_difference(a, b):
    diff = (a != b).any(0).nonzero()
    return int(diff[0]) if len(diff) else None


class _RankTwo(ModelConfig):
    def s4_kwargs(self):
        return {**super().s4_kwargs(), "rank": 2}


def _variant_config(base: dict, changes: dict) -> ModelConfig:
    """A small ModelConfig from `base` with `changes`; "rank": 2 makes it the DPLR rank-2 variant."""
    changes = dict(changes)
    rank_two = changes.pop("rank", None)
    config = ModelConfig(**{**ModelConfig(name="t", **base).__dict__, **changes})
    return _RankTwo(**config.__dict__) if rank_two else config


@pytest.mark.parametrize("kwargs", [
    {"unet": True},                                      # causal U-Net: down blocks and skips
    {"pool": (2, 4, 2), "prenorm": False},               # three levels, postnorm
    {"d_model": 20, "d_state": 6, "ff": 3},               # widths that need padding
    {"mode": "dplr", "hurwitz": False, "ff": 0},         # original S4 (separate Q), no FF blocks
    {"rank": 2},                                          # DPLR rank 2
    {"n_layers": 0},                                      # no blocks at all
], ids=["unet", "3-levels-postnorm", "padding", "non-hurwitz-no-ff", "rank-2", "no-layers"])
def test_fast_matches_eager_variants(kwargs):
    torch.manual_seed(20)
    config = _variant_config(dict(d_model=16, n_layers=1, d_state=8), kwargs)
    model = WaveformAR(config).eval()
    B = 3
    tokens = torch.randint(0, 256, (B, 256))
    with torch.no_grad():
        model.setup_step()
        stepper = FastStepper(model, B)  # B = 3 rows on 2 threads splitting every layer's columns
        state = model.default_state(B)
        for t in range(tokens.shape[1]):
            with _torch_threads(1):
                eager, state = model.step(tokens[:, t], state)
            with s4lib.step_threads(2):
                fast = stepper.step(tokens[:, t])
            assert relative_error(fast, eager) <= TOL, (kwargs, t)


# ----------------------------------------------------------------------------- state round trips

@pytest.mark.parametrize("mode", ["dplr", "diag"])
def test_state_round_trip_with_prefill(mode):
    with _torch_threads(1):
        _state_round_trip(mode)


def _state_round_trip(mode):
    model = make_model("tiny", mode, trained=False, seed=30)
    B = 2
    tokens = torch.randint(0, 256, (B, 200))
    with torch.no_grad():
        model.setup_step()
        # 37 prompt samples: mid-group at both pooling levels
        _, state = model.prefill(tokens[:, :37], model.default_state(B))
        stepper = FastStepper(model, B)
        stepper.set_state(state)
        back = stepper.get_state()
        assert_states_equal(back, state)  # set -> get is the identity
        # engine 29 steps, then eager continues from the engine's state ...
        fast = [stepper.step(tokens[:, t]) for t in range(37, 66)]
        mixed_state = stepper.get_state()
        assert [len(b) for b in mixed_state["buffer"]] == [66 % 4, (66 // 4) % 4]
        mixed = fast + [model.step(tokens[:, t], mixed_state)[0] for t in range(66, 200)]
        # ... exactly as eager all along
        eager_state = state
        eager = [model.step(tokens[:, t], eager_state)[0] for t in range(37, 200)]
    assert relative_error(torch.stack(mixed), torch.stack(eager)) <= TOL


def assert_states_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        def flat(x):
            if isinstance(x, list):
                return [y for item in x for y in flat(item)]
            return [x]
        fa, fb = flat(a[key]), flat(b[key])
        assert len(fa) == len(fb), key
        for x, y in zip(fa, fb):
            if x is None or y is None:
                assert x is None and y is None
            else:
                assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), key


def test_reset_and_bad_states():
    model = make_model("tiny", "dplr", trained=False, seed=31)
    model.setup_step()
    stepper = FastStepper(model, 2)
    tokens = torch.tensor([1, 2])
    first = stepper.step(tokens)
    stepper.step(tokens)
    stepper.reset()
    assert torch.equal(stepper.step(tokens), first)
    assert_states_equal(FastStepper(model, 2).get_state(), model.default_state(2))
    state = model.default_state(2)
    with pytest.raises(ValueError, match="keys"):
        stepper.set_state({"down": []})
    bad = model.default_state(3)
    with pytest.raises(ValueError, match="complex"):
        stepper.set_state(bad)
    state["buffer"][0] = [torch.zeros(2, 32)] * 4
    with pytest.raises(ValueError, match="fewer than 4"):
        stepper.set_state(state)
    with pytest.raises(ValueError, match="levels in"):
        stepper.step(torch.tensor([0, 256]))
    with pytest.raises(ValueError, match="shape"):
        stepper.step(torch.tensor([0, 1, 2]))


# ----------------------------------------------------------------------------- the sampling rule

def sample_rule(logits, u, temperature, top_k, top_p):
    """The rule of sashimi.pipelines.fast_step's docstring, transcribed in plain Python floats."""
    l = [float(x) for x in logits]
    V, m = len(l), max(l)
    S = 0.0
    for x in l:
        S += math.exp(x - m)
    if temperature == 0:
        chosen = l.index(m)
    else:
        order = sorted(range(V), key=lambda i: (-l[i], i))
        K = min(top_k, V) if top_k > 0 else V
        order = order[:K]
        cum, c = [], 0.0
        for i in order:
            c += math.exp((l[i] - m) / temperature)
            cum.append(c)
        threshold = top_p * cum[-1]
        M = next(j + 1 for j in range(K) if cum[j] >= threshold)
        target = u * cum[M - 1]
        chosen = order[next((j for j in range(M) if cum[j] > target), M - 1)]
    return chosen, (l[chosen] - m) - math.log(S)


HAND_MADE = [
    # logits, u, temperature, top_k, top_p, expected token
    ([0.0, 0.0, 0.0, 0.0], 0.25, 1.0, 0, 1.0, 1),     # cumulative 1/4 is not > 1/4: the next one
    ([0.0, 0.0, 0.0, 0.0], 0.2499, 1.0, 0, 1.0, 0),
    ([0.0, 0.0, 0.0, 0.0], 0.99, 1.0, 0, 0.5, 1),     # top-p 0.5 keeps two of four equal levels
    ([1.0, 3.0, 3.0, 0.0, 3.0], 0.0, 0.0, 0, 1.0, 1),  # greedy: the lowest index among ties
    ([1.0, 3.0, 3.0, 0.0, 3.0], 0.5, 1.0, 0, 1.0, 2),  # ties sorted by index: 1, 2, 4, 0, 3
    ([1.0, 3.0, 3.0, 0.0, 3.0], 0.999, 1.0, 2, 1.0, 2),  # top-k 2 keeps levels 1 and 2
    ([5.0, 1.0, 4.0, -2.0], 0.999, 1.0, 0, 1e-6, 0),  # tiny top-p: the argmax only
    ([5.0, 1.0, 4.0, -2.0], 0.999, 1.0, 1, 1.0, 0),   # top-k 1: the argmax only
    ([5.0, 1.0, 4.0, -2.0], 0.8, 1.0, 0, 1.0, 2),     # p = .721, .265, ...: u = .8 falls in level 2
    ([5.0, 1.0, 4.0, -2.0], 0.8, 0.01, 0, 1.0, 0),    # cold: all mass on the argmax
    ([5.0, 1.0, 4.0, -2.0], 0.6, 100.0, 0, 1.0, 1),   # hot: nearly uniform, order 0, 2, 1, 3
    ([-0.0, 0.0, -1.0], 0.6, 1.0, 0, 1.0, 1),         # -0 equals +0: a tie broken by index
]


@pytest.mark.parametrize("case", HAND_MADE)
def test_sampling_rule_hand_made(case):
    logits, u, temperature, top_k, top_p, expected = case
    x = torch.tensor([logits])
    token, logprob = engine_sample(x, torch.tensor([u], dtype=torch.float64), temperature, top_k, top_p)
    ref_token, ref_logprob = sample_rule(logits, u, temperature, top_k, top_p)
    assert int(token) == ref_token == expected
    assert float(logprob) == ref_logprob  # the same float64 operations in the same order
    oracle_token, oracle_logprob = sample_oracle(x, torch.tensor([u]), temperature, top_k, top_p)
    assert int(oracle_token) == expected
    assert abs(float(oracle_logprob) - ref_logprob) < 1e-12


@pytest.mark.parametrize("settings", [(1.0, 0, 1.0), (0.7, 0, 0.9), (1.3, 20, 1.0), (1.0, 5, 0.5), (0.0, 0, 1.0),
                                      (2.0, 300, 0.95)])
def test_sampling_rule_random_logits(settings):
    temperature, top_k, top_p = settings
    gen = torch.Generator().manual_seed(40)
    for V in (7, 256):
        logits = torch.randn(200, V, generator=gen) * 3
        logits[:20, :3] = logits[:20, 3:6]  # some exact ties
        u = torch.rand(200, generator=gen, dtype=torch.float64)
        tokens, logprobs = engine_sample(logits, u, temperature, top_k, top_p)
        for b in range(logits.shape[0]):
            ref_token, ref_logprob = sample_rule(logits[b].tolist(), float(u[b]), temperature, top_k, top_p)
            assert int(tokens[b]) == ref_token and float(logprobs[b]) == ref_logprob
        oracle_tokens, oracle_logprobs = sample_oracle(logits, u, temperature, top_k, top_p)
        assert torch.equal(tokens, oracle_tokens)
        assert torch.allclose(logprobs, oracle_logprobs, rtol=0, atol=1e-12)


def test_generate_sampling_matches_eager_loop_and_is_reproducible():
    model = make_model("tiny", "dplr", trained=True, seed=50)
    B, n = 3, 512
    settings = {"temperature": 0.9, "top_k": 50, "top_p": 0.9}
    uniforms = torch.rand(B, n, generator=torch.Generator().manual_seed(51), dtype=torch.float64)
    first = torch.full((B,), 128)
    with torch.no_grad():
        model.setup_step()
        state, token = model.default_state(B), first
        eager_tokens, eager_logprobs = [], []
        with _torch_threads(1):
            for t in range(n):
                logits, state = model.step(token, state)
                token, logprob = sample_oracle(logits, uniforms[:, t], **settings)
                eager_tokens.append(token)
                eager_logprobs.append(logprob)
        eager_tokens, eager_logprobs = torch.stack(eager_tokens, 1), torch.stack(eager_logprobs, 1)
        stepper = FastStepper(model, B)
        tokens, logprobs = stepper.generate(first, uniforms, **settings)
        assert torch.equal(tokens, eager_tokens)
        assert (logprobs - eager_logprobs).abs().max() < 1e-4
        # same uniforms -> same tokens; chunked generation == one call
        stepper.reset()
        again, _ = stepper.generate(first, uniforms, **settings)
        stepper.reset()
        part1, _ = stepper.generate(first, uniforms[:, :200], **settings)
        part2, _ = stepper.generate(part1[:, -1], uniforms[:, 200:], **settings)
    assert torch.equal(again, tokens) and torch.equal(torch.cat([part1, part2], 1), tokens)
    assert len(set(tokens[0].tolist())) > 10  # it did sample


def test_generate_bad_settings():
    model = make_model("tiny", "diag", trained=False, seed=52)
    model.setup_step()
    stepper = FastStepper(model, 2)
    first, u = torch.zeros(2, dtype=torch.long), torch.rand(2, 5)
    for kwargs, match in (({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
                          ({"top_k": -1}, "top_k")):
        with pytest.raises(ValueError, match=match):
            stepper.generate(first, u, **kwargs)
    with pytest.raises(ValueError, match="uniforms"):
        stepper.generate(first, torch.rand(3, 5))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        stepper.generate(first, u + 1)
    tokens, logprobs = stepper.generate(first, torch.rand(2, 0))
    assert tokens.shape == (2, 0) and logprobs.shape == (2, 0)


# ----------------------------------------------------------------------------- refusals

def test_unsupported_models_are_refused():
    def fresh(**kwargs):
        torch.manual_seed(60)
        return build_model("tiny", d_model=16, n_layers=1, d_state=4, backend=BACKEND, **kwargs).eval()

    ok, reason = fast_path_status(fresh())
    assert not ok and "setup_step" in reason  # not prepared yet
    with pytest.raises(FastPathUnavailable, match="setup_step"):
        FastStepper(fresh(), 1)

    model = fresh()
    model.setup_step(mode="dense")
    with pytest.raises(FastPathUnavailable, match="linear"):
        FastStepper(model, 1)

    model = fresh().double()
    model.setup_step()
    with pytest.raises(FastPathUnavailable, match="float32"):
        FastStepper(model, 1)

    model = fresh(dropout=0.1).train()
    model.setup_step()
    with pytest.raises(FastPathUnavailable, match="eval"):
        FastStepper(model, 1)

    class TwoChannels(ModelConfig):
        def s4_kwargs(self):
            return {**super().s4_kwargs(), "channels": 2}

    torch.manual_seed(61)
    model = WaveformAR(TwoChannels(d_model=16, n_layers=1, d_state=4)).eval()
    model.setup_step()
    model.step(torch.zeros(1, dtype=torch.long), model.default_state(1))  # eager works
    ok, reason = fast_path_status(model)
    assert not ok and "channels=1" in reason
    with pytest.raises(FastPathUnavailable, match="channels"):
        FastStepper(model, 1)

    model = fresh()
    model.setup_step()
    assert fast_path_status(model)[0]
    with pytest.raises(ValueError, match="batch_size"):
        FastStepper(model, 0)


def test_missing_compiler_is_a_clear_error(tmp_path):
    code = ("import torch\nfrom sashimi import build_model\n"
            "from sashimi.pipelines.fast_step import FastStepper, FastPathUnavailable, fast_path_status\n"
            "m = build_model('tiny', d_model=16, n_layers=1, d_state=4, backend='naive').eval(); m.setup_step()\n"
            "print(fast_path_status(m))\n"
            "try:\n    FastStepper(m, 1)\nexcept FastPathUnavailable as e:\n    print('UNAVAILABLE', e)\n")
    env = {**os.environ, "CXX": "/nonexistent/c++", "S4LIB_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "(False," in out.stdout and "UNAVAILABLE" in out.stdout and "compiler" in out.stdout


def test_inference_mode():
    """A stepper made under torch.inference_mode keeps working outside it (and vice versa)."""
    model = make_model("tiny", "dplr", trained=False, seed=70)
    model.setup_step()
    tokens = torch.randint(0, 256, (2, 40))
    with torch.inference_mode():
        stepper = FastStepper(model, 2)
        _, state = model.prefill(tokens[:, :37], model.default_state(2))
        stepper.set_state(state)
        inside = stepper.step(tokens[:, 37])
        saved = stepper.get_state()
    stepper.set_state(saved)
    stepper.set_state(state)
    assert torch.equal(stepper.step(tokens[:, 37]), inside)
    stepper.generate(tokens[:, 38], torch.rand(2, 3))


@pytest.mark.parametrize("B", [5, 1])
def test_threads_split_the_batch_without_changing_a_token(B):
    """The engine splits a step over threads by rows (slices of the batch) or by columns (every
    layer's channels and output panels); 1, 2 and 3 threads either way give identical tokens and
    log-likelihoods."""
    model = make_model("tiny", "dplr", trained=True, seed=53)
    n = 300
    settings = {"temperature": 0.9, "top_k": 50, "top_p": 0.95}
    uniforms = torch.rand(B, n, generator=torch.Generator().manual_seed(54), dtype=torch.float64)
    first = torch.full((B,), 128)
    model.setup_step()
    outputs = []
    for threads in (1, 2, 3):
        for split in ("rows", "columns"):
            with s4lib.step_threads(threads):
                stepper = FastStepper(model, B)
                stepper.set_split(split)
                assert stepper.threads() == threads
                outputs.append(stepper.generate(first, uniforms, **settings))
                logits = stepper.step(outputs[-1][0][:, -1])
            outputs[-1] = outputs[-1] + (logits,)
    for tokens, logprobs, logits in outputs[1:]:
        assert torch.equal(tokens, outputs[0][0]) and torch.equal(logprobs, outputs[0][1])
        assert torch.equal(logits, outputs[0][2])
    with pytest.raises(ValueError, match="split"):
        stepper.set_split("diagonal")


@pytest.mark.parametrize("kwargs", [
    {},                                                   # two pooling levels
    {"pool": (2, 4, 2), "prenorm": False},               # three pooling levels, postnorm
    {"ff": 0},                                            # S4 blocks only
    {"n_layers": 0},                                      # no blocks: pools and head only
], ids=["two-levels", "3-levels-postnorm", "no-ff", "no-layers"])
def test_columns_split_loop_gives_the_one_thread_tokens(kwargs):
    """A sampling loop split over two threads by columns (member 1 keeps its own copies of the pooling
    buffers and pending outputs through the loop) gives one thread's tokens, log-likelihoods and next
    logits, over enough steps for every level to fire many times, whatever the levels and blocks."""
    torch.manual_seed(61)
    config = ModelConfig(**{**ModelConfig(name="t", d_model=16, n_layers=2, d_state=8).__dict__, **kwargs})
    model = WaveformAR(config).eval()
    model.setup_step()
    n = 333  # not a multiple of any pooling product: the loop ends mid-group
    uniforms = torch.rand(2, n, generator=torch.Generator().manual_seed(62), dtype=torch.float64)
    first = torch.tensor([128, 7])
    outputs = []
    for threads in (1, 2):
        with s4lib.step_threads(threads):
            stepper = FastStepper(model, 2)
            stepper.set_split("columns")
            tokens, logprobs = stepper.generate(first, uniforms, temperature=1.0, top_p=0.9)
            outputs.append((tokens, logprobs, stepper.step(tokens[:, -1]), stepper.step(tokens[:, -2])))
    assert all(torch.equal(a, b) for a, b in zip(outputs[0], outputs[1])), kwargs
    assert len(set(outputs[0][0].flatten().tolist())) > 10  # sampled, not one token throughout


FP16_TOL = 2e-3  # weights='float16': documented in FastStepper's docstring and docs/generation.md


@pytest.mark.parametrize("B", [1, 3])
def test_float16_weights_stay_within_their_tolerance(B):
    """weights='float16' stores the Linear layers' weights in half precision (float32 arithmetic, SSM
    parameters in float32): logits within FP16_TOL of the eager step (relative to the largest logit)
    at every one of 2048 teacher-forced steps, and 1 and 2 threads agree exactly."""
    model = make_model("sc09-2layer", "dplr", trained=True, seed=81)
    model.setup_step()
    steps_ = 2048
    tokens = torch.randint(0, 256, (B, steps_), generator=torch.Generator().manual_seed(82))
    with torch.no_grad(), _torch_threads(1):
        state, eager = model.default_state(B), []
        for t in range(steps_):
            logits, state = model.step(tokens[:, t], state)
            eager.append(logits)
    eager = torch.stack(eager, dim=1)
    runs = []
    for threads in (1, 2):
        with s4lib.step_threads(threads):
            stepper = FastStepper(model, B, weights="float16")
            runs.append(torch.stack([stepper.step(tokens[:, t]) for t in range(steps_)], dim=1))
    assert torch.equal(runs[0], runs[1])
    worst = max(relative_error(runs[0][:, t], eager[:, t]) for t in range(steps_))
    assert worst <= FP16_TOL, f"float16 weights: worst relative logit error {worst:.2e} > {FP16_TOL}"
    print(f"float16 weights, batch {B}: worst relative logit error {worst:.2e} over {steps_} steps")
    with pytest.raises(ValueError, match="weights"):
        FastStepper(model, B, weights="bfloat16")


def test_tuned_default_threads_give_the_one_thread_result():
    """With torch given 2 threads a large enough model steps on 1 or 2 threads, as timing finds faster,
    chunk by chunk of the sampling loop: the tokens are those of one thread."""
    model = make_model("sc09-2layer", "dplr", trained=False, seed=91)
    model.setup_step()
    uniforms = torch.rand(1, 700, generator=torch.Generator().manual_seed(92), dtype=torch.float64)
    first = torch.tensor([128])
    with s4lib.step_threads(1):
        expected = FastStepper(model, 1).generate(first, uniforms, top_p=0.95)
    with _torch_threads(2):
        stepper = FastStepper(model, 1)
        assert stepper._thread_arg() == -2  # 1 or 2 threads, as the engine's timing finds faster
        got = stepper.generate(first, uniforms, top_p=0.95)
        logits = [stepper.step(got[0][:, -1]) for _ in range(40)]
    with s4lib.step_threads(1):
        one = FastStepper(model, 1)
        one.generate(first, uniforms, top_p=0.95)
        expected_logits = [one.step(got[0][:, -1]) for _ in range(40)]
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert all(torch.equal(a, b) for a, b in zip(logits, expected_logits))


@pytest.mark.parametrize("kwargs", [
    {"mode": "dplr"},
    {"mode": "diag"},
    {"mode": "dplr", "rank": 2},
    {"mode": "dplr", "d_model": 20, "d_state": 6, "ff": 3},   # a partial tile of channels, tiny state
    {"mode": "diag", "d_model": 40, "d_state": 10},
], ids=["dplr", "diag", "dplr-rank-2", "dplr-padding", "diag-padding"])
def test_tiled_ssm_step_matches_the_float64_eager_step(kwargs):
    """The engine's S4 layers run on states tiled over channels (kernels/s4_layer_step.h, TiledSSM):
    logits and exported states against the eager step of the same model in float64, over 300 steps
    (1 and 2 threads splitting the tiles; the state leaves the tiles through get_state)."""
    torch.manual_seed(33)
    config = _variant_config(dict(d_model=32, n_layers=1, d_state=16), kwargs)
    model = WaveformAR(config).eval()
    model.setup_step()
    B = 2
    tokens = torch.randint(0, 256, (B, 300))
    reference = WaveformAR(config).double().eval()
    reference.load_state_dict(model.state_dict())
    reference.setup_step()
    with torch.no_grad():
        steppers = {threads: FastStepper(model, B) for threads in (1, 2)}
        state = reference.default_state(B)
        for t in range(tokens.shape[1]):
            exact, state = reference.step(tokens[:, t], state)
            for threads, stepper in steppers.items():
                with s4lib.step_threads(threads):
                    fast = stepper.step(tokens[:, t])
                err = relative_error(fast.double(), exact)
                assert err <= 1e-5, (kwargs, threads, t, err)
        for stepper in steppers.values():
            got = stepper.get_state()
            for key in ("down", "up", "center"):
                flat_got = [s for level in got[key] for s in (level if isinstance(level, list) else [level])]
                flat_ref = [s for level in state[key] for s in (level if isinstance(level, list) else [level])]
                for a, b in zip(flat_got, flat_ref):
                    if b is not None:
                        assert relative_error(a.to(torch.complex128), b) <= 1e-5, (kwargs, key)
