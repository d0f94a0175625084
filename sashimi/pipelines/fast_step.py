"""Fused step path for WaveformAR: the whole recurrent step (and the sampling loop) in one C++ engine.

`FastStepper(model, batch_size)` exports a WaveformAR's step parameters (after
`model.setup_step()`) into the engine in kernels/sashimi_step_cpu.cpp, which holds the recurrent
state and runs embedding -> SaShiMi step (each level only on the steps where it fires) ->
LayerNorm -> head on raw float32 arrays. The eager `model.step` stays the oracle: the engine
follows it to float32 round-off, and its state converts to and from `model.default_state`'s
format, so a prompt read by `model.prefill` continues in the engine and the engine's state
continues in eager mode. When the engine cannot serve a model (no compiler, failed build, a
feature it does not implement) the constructor raises `FastPathUnavailable` with the reason and
the caller uses the eager step; it never returns a silently different result.

    model.eval(); model.setup_step()
    stepper = FastStepper(model, batch_size=4)
    stepper.set_state(state)                  # optional: e.g. after model.prefill(prompt, state)
    logits = stepper.step(tokens)             # (4,) -> (4, n_classes), like model.step
    tokens, logprobs = stepper.generate(first, uniforms, temperature=1.0, top_k=0, top_p=0.95)

Sampling rule (generate, and `sample` on given logits). For one row of float32 logits l[0..V)
and one uniform u in [0, 1), all arithmetic in IEEE float64 (each l_i converted exactly),
sums taken sequentially in the order stated:

1. m = max_i l_i. The log-probability reported for the chosen token c is
   logprob = (l_c - m) - log(S), with S = sum over i = 0, 1, ..., V-1 (index order) of exp(l_i - m):
   log_softmax of the raw logits (temperature 1, no truncation), whatever the settings.
2. temperature == 0: c = argmax_i l_i, the lowest index among equal maxima (u is not used).
3. Otherwise order the indices by logit descending, ties by lower index (-0.0 equals +0.0):
   o_0, o_1, ..., o_{V-1}. Keep the first K = min(top_k, V) of them (top_k = 0: K = V).
4. Weights w_j = exp((l_{o_j} - m) / temperature); cumulative sums c_j = c_{j-1} + w_j (c_{-1} = 0)
   for j = 0 .. K-1.
5. Nucleus: M = the smallest j + 1 with c_j >= top_p * c_{K-1} (top_p in (0, 1]; top_p = 1
   keeps all K, up to trailing zero weights).
6. Pick: c = o_j for the first j < M with c_j > u * c_{M-1}; if there is none, j = M - 1.
   (Mathematically: renormalise over the kept set, pick the first index in sorted order whose
   cumulative probability exceeds u.)

`sashimi.pipelines.sampling.sample` implements the same rule with torch ops (the eager path's sampler);
an implementation that sums in another order agrees except when u lies within round-off
(~1e-16 relative) of a cumulative boundary. Non-finite logits give an arbitrary token and a
NaN log-probability.

generate(first, uniforms (B, n)) feeds `first` (B,), samples token t of each row with
uniforms[:, t], and feeds it back; afterwards the state has consumed first and tokens[:, :-1]
(tokens[:, -1] is the next input), exactly as this eager loop:

    token = first
    for t in range(n):
        logits, state = model.step(token, state)
        token = sample(logits, uniforms[:, t], ...)
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn

from s4lib.block import S4Block
from s4lib.fftconv import FFTConv
from s4lib.ops import native_build
from s4lib.ssm import SSMKernelDiag, SSMKernelDPLR

from ..nn.backbone import FFBlock, ResidualBlock
from ..models.autoregressive import WaveformAR
from .sampling import check_sampling

__all__ = ["FastPathUnavailable", "FastStepper", "fast_path_status", "engine_sample"]

_NAME = "sashimi_step_cpu"
_SOURCES = ("sashimi_step_cpu.cpp",)
_EXTRA_CFLAGS = ("-ffp-contract=fast",)  # fused multiply-adds in the vector loops
native_build.declare(_NAME, _SOURCES, _EXTRA_CFLAGS, label="fused step engine")  # listed by `s4lib info`
_VECTOR = 16  # floats per vector in the engine (activations are padded to a multiple)
_MAX_RANK = 4
_DIAG, _DPLR = 0, 1


class FastPathUnavailable(RuntimeError):
    """The fused engine cannot serve this model here (reason in the message): use the eager step."""


def _load():
    try:
        return native_build.load_module(_NAME, _SOURCES, extra_cflags=_EXTRA_CFLAGS)
    except RuntimeError as e:
        raise FastPathUnavailable(str(e)) from e  # one line: "fused step engine ...: why; full log: ..."


# ----------------------------------------------------------------------------------- support checks

def _gelu_ok(module) -> bool:
    return isinstance(module, nn.GELU) and module.approximate == "none"


def _check_s4(block: S4Block, where: str) -> str | None:
    if block.bottleneck is not None or block.gate is not None:
        return f"{where}: S4Block with bottleneck/gate is not implemented by the fused engine"
    if not isinstance(block.mult_activation, nn.Identity):
        return f"{where}: S4Block mult_act is not implemented by the fused engine"
    out = block.output_linear
    if not (isinstance(out, nn.Sequential) and len(out) == 2 and isinstance(out[0], nn.Linear)
            and isinstance(out[1], nn.GLU) and out[1].dim in (-1, 1)):
        return f"{where}: only the GLU output linear (final_act='glu') is implemented"
    layer = block.layer
    if not isinstance(layer, FFTConv) or layer.bidirectional:
        return f"{where}: a causal FFTConv is required"
    if layer.channels != 1:
        return f"{where}: channels={layer.channels}; the fused engine supports channels=1 only"
    if not _gelu_ok(layer.activation):
        return f"{where}: SSM activation {layer.activation!r}; the fused engine implements GELU (erf form) only"
    kernel = layer.kernel
    if not hasattr(kernel, "_step"):
        return f"{where}: call model.setup_step() before building the fused engine"
    if isinstance(kernel, SSMKernelDPLR):
        if kernel._step.get("mode") != "linear":
            return f"{where}: S4 step mode {kernel._step.get('mode')!r}; the fused engine needs setup_step(mode='linear')"
        if kernel.rank > _MAX_RANK:
            return f"{where}: DPLR rank {kernel.rank} > {_MAX_RANK} is not implemented"
    elif not isinstance(kernel, SSMKernelDiag):
        return f"{where}: unknown SSM kernel {type(kernel).__name__}"
    return None


def unsupported_reason(model) -> str | None:
    """Why the fused engine cannot run `model` (None if it can)."""
    if not isinstance(model, WaveformAR):
        return f"expected a WaveformAR, got {type(model).__name__}"
    backbone = model.backbone
    if not backbone.causal:
        return "the backbone is non-causal (bidirectional) and has no recurrent mode"
    if not isinstance(backbone.norm, nn.Identity):
        return "a backbone final_norm is not implemented by the fused engine"
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if p.is_floating_point() and (p.dtype != torch.float32 or p.device.type != "cpu"):
            return f"the fused engine runs float32 on CPU; {name} is {p.dtype} on {p.device}"
    if model.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()):
        return "the model is in training mode with dropout: call model.eval() first"
    for m in (model.norm, *[b.norm for b in _all_blocks(backbone)]):
        if not isinstance(m, nn.LayerNorm) or m.normalized_shape != (m.normalized_shape[0],):
            return "only LayerNorm over the feature axis is implemented"
    for where, block in _named_blocks(backbone):
        if not isinstance(block, ResidualBlock):
            return f"{where}: unexpected block {type(block).__name__}"
        if block.stateful:
            reason = _check_s4(block.layer, where)
            if reason:
                return reason
        elif not (isinstance(block.layer, FFBlock) and _gelu_ok(block.layer.activation)):
            return f"{where}: only FFBlock (Linear -> GELU -> Linear) is implemented"
    return None


def _named_blocks(backbone):
    for i, group in enumerate(backbone.down_blocks):
        for j, b in enumerate(group):
            yield f"down[{i}][{j}]", b
    for j, b in enumerate(backbone.center_blocks):
        yield f"center[{j}]", b
    for i, group in enumerate(backbone.up_blocks):
        for j, b in enumerate(group):
            yield f"up[{i}][{j}]", b


def _all_blocks(backbone):
    return [b for _, b in _named_blocks(backbone)]


def fast_path_status(model=None) -> tuple[bool, str]:
    """(usable, reason): can the fused engine be built here (and serve `model`, if given)?

    Does not compile anything: a build that failed before (in any process, with the same
    torch, compiler, flags and sources) is reported as failed; one not tried yet as usable.
    """
    if model is not None:
        reason = unsupported_reason(model)
        if reason:
            return False, reason
    return native_build.module_status(_NAME, _SOURCES, _EXTRA_CFLAGS)


# ------------------------------------------------------------------------------------------- packing

def _pad(n: int) -> int:
    return -(-n // _VECTOR) * _VECTOR


def _pad_vector(t, width: int, fill: float = 0.0) -> torch.Tensor:
    out = torch.full((width,), fill, dtype=torch.float32)
    if t is not None:
        out[: t.numel()] = t.detach().reshape(-1).to(torch.float32)
    return out


def _pack_linear(linear: nn.Linear, in_groups: int = 1, out_groups: int = 1):
    """(packed weight (OUT/16, IN, 16), bias (OUT,)) with features padded per group of channels.

    Input features are `in_groups` groups of in/in_groups channels, each padded to a multiple of
    16 (the engine's activation layout); likewise the outputs. Padding rows and columns are zero.
    """
    W = linear.weight.detach().to(torch.float32)
    out_features, in_features = W.shape
    hi, ho = in_features // in_groups, out_features // out_groups
    padded = torch.zeros(out_groups, _pad(ho), in_groups, _pad(hi))
    padded[:, :ho, :, :hi] = W.reshape(out_groups, ho, in_groups, hi)
    OUT, IN = out_groups * _pad(ho), in_groups * _pad(hi)
    bias = torch.zeros(out_groups, _pad(ho))
    if linear.bias is not None:
        bias[:, :ho] = linear.bias.detach().to(torch.float32).reshape(out_groups, ho)
    packed = padded.reshape(OUT // _VECTOR, _VECTOR, IN).transpose(1, 2).contiguous()
    return packed, bias.reshape(-1).contiguous()


def _tiles(rows: torch.Tensor, Hp: int) -> torch.Tensor:
    """(count, H, *rest) real -> (Hp / 16, *rest, count, 16): channels padded and cut into tiles of 16."""
    count, H = rows.shape[:2]
    padded = torch.zeros(count, Hp, *rows.shape[2:], dtype=torch.float64)
    padded[:, :H] = rows
    tiled = padded.reshape(count, Hp // _VECTOR, _VECTOR, *rows.shape[2:])  # (count, T, 16, *rest)
    order = [1] + list(range(3, tiled.dim())) + [0, 2]
    return tiled.permute(*order).to(torch.float32).contiguous()


def _re_im(*tensors):
    """Complex (H, n) tensors -> their real and imaginary parts, in order."""
    return [part for t in tensors for part in (t.real, t.imag)]


def _ssm_tensors(kernel, H: int, Hp: int, D: torch.Tensor):
    """(kind, rank, ssm (T, n, planes, 16), chan (T, chans, 16)) in the engine's layout.

    The layout and the rearranged DPLR step (FE, FdtB, G, QFE, K1, K2) are described in
    kernels/sashimi_step_cpu.cpp (`enum Kind`); the products are formed in complex128.
    """
    s, n = kernel._step, kernel.n

    def get(name, shape):
        t = s[name]
        if tuple(t.shape) != shape:
            raise FastPathUnavailable(f"unexpected shape {tuple(t.shape)} of the step parameter {name!r} "
                                      f"(expected {shape}); the fused engine does not support this kernel")
        return t.detach().to(torch.complex128 if t.is_complex() else torch.float64)

    D = D.detach().to(torch.float64).reshape(1, H)
    if isinstance(kernel, SSMKernelDiag):
        planes = torch.stack(_re_im(get("dA", (H, n)), get("dB", (H, n)), get("C", (1, H, n))[0]))
        return _DIAG, 0, _tiles(planes, Hp), _tiles(D, Hp)
    r = kernel.rank
    E, F, dtB = get("E", (H, n)), get("F", (H, n)), get("dtB", (H, n))
    G, Qc, M = get("G", (r, H, n)), get("Qc", (r, H, n)), get("M", (H, r, r))
    C = get("C", (1, H, n))[0]
    FE, FdtB = F * E, F * dtB
    QFE = Qc * FE
    K1 = 2 * torch.einsum("ihn,jhn->hij", Qc, G).real  # (H, r, r)
    K2 = 2 * (Qc * FdtB).sum(-1).real  # (r, H)
    planes = _re_im(FE, FdtB, C)
    for j in range(r):
        planes += _re_im(G[j], Qc[j], QFE[j])
    chan = torch.cat([M.reshape(H, r * r).T, K1.reshape(H, r * r).T, K2, D])  # (2 r^2 + r + 1, H)
    return _DPLR, r, _tiles(torch.stack(planes), Hp), _tiles(chan, Hp)


def _norm(norm: nn.LayerNorm, Hp: int):
    H = norm.normalized_shape[0]
    weight = norm.weight if norm.weight is not None else torch.ones(H)
    bias = norm.bias if norm.bias is not None else torch.zeros(H)
    return _pad_vector(weight, Hp), _pad_vector(bias, Hp), float(norm.eps)


# ------------------------------------------------------------------------------------------- engine

def _plain_tensors(method):
    """Run with autograd and inference mode off: the engine's tensors are updated in place later,
    which inference tensors (made under torch.inference_mode) would refuse."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with torch.inference_mode(False), torch.no_grad():
            return method(*args, **kwargs)

    return wrapper


class FastStepper:
    """The fused recurrent step of a WaveformAR for `batch_size` sequences (CPU, float32).

    Build after `model.setup_step()` (and again after the parameters change). The state starts
    as `model.default_state(batch_size)`; see the module docstring for the sampling rule.
    Raises FastPathUnavailable when the engine cannot serve the model or cannot be built.
    One stepper serves one caller at a time (it is not thread-safe); the engine itself splits a
    batch over torch.get_num_threads() threads.
    """

    @_plain_tensors
    def __init__(self, model: WaveformAR, batch_size: int):
        reason = unsupported_reason(model)
        if reason:
            raise FastPathUnavailable(f"fused step engine cannot run this model: {reason}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        ext = _load()
        if ext.VECTOR != _VECTOR:
            raise FastPathUnavailable(f"engine vector width {ext.VECTOR} != {_VECTOR} (stale build?)")
        backbone = model.backbone
        self.model_config = model.config
        self.batch_size = B = batch_size
        self.n_classes = V = model.n_classes
        self.pool = tuple(backbone.pool)
        self.widths = list(backbone.widths)
        padded = [_pad(h) for h in self.widths]
        embedding = torch.zeros(V, padded[0])
        embedding[:, : self.widths[0]] = model.embedding.weight.detach().to(torch.float32)
        engine = ext.Engine(B, V, embedding.contiguous())
        self._buffers, self._pending = [], []
        for i, p in enumerate(self.pool):
            down_w, down_b = _pack_linear(backbone.down_pools[i].linear, in_groups=p)
            up_w, up_b = _pack_linear(backbone.up_pools[i].linear, out_groups=p)
            buffer = torch.zeros(B, p, padded[i])
            pending = torch.zeros(B, p * padded[i])
            engine.add_level(p, self.widths[i], down_w, down_b, up_w, up_b, buffer, pending)
            self._buffers.append(buffer)
            self._pending.append(pending)
        engine.set_center(self.widths[-1])
        # per group: list of S4 state tensors (None for FF blocks), in the state dict's order
        self._states = {"down": [], "center": [], "up": []}
        for i in range(len(self.pool)):
            self._states["down"].append(self._add_blocks(engine, 0, i, backbone.down_blocks[i], padded[i], B))
        for i in range(len(self.pool)):
            self._states["up"].append(self._add_blocks(engine, 1, i, backbone.up_blocks[i], padded[i], B))
        self._states["center"] = self._add_blocks(engine, 1, len(self.pool), backbone.center_blocks,
                                                  padded[-1], B)
        head_w, head_b = _pack_linear(model.head)
        engine.set_head(*_norm(model.norm, padded[0]), head_w, head_b)
        engine.finalize()
        self._engine = engine
        self._ext = ext

    @staticmethod
    def _add_blocks(engine, group: int, level: int, blocks, Hp: int, B: int):
        states = []
        for block in blocks:
            norm_w, norm_b, eps = _norm(block.norm, Hp)
            if block.stateful:
                s4 = block.layer
                kernel = s4.layer.kernel
                kind, rank, planes, chan = _ssm_tensors(kernel, s4.d_model, Hp, s4.layer.D[0])
                out_w, out_b = _pack_linear(s4.output_linear[0], out_groups=2)
                tiles = Hp // _VECTOR
                state = torch.zeros(B, tiles, kernel.n, 2, _VECTOR)
                aux = torch.zeros(B, tiles, 2 * rank, _VECTOR)
                engine.add_s4_block(group, level, block.prenorm, norm_w, norm_b, eps, kind, rank, planes, chan,
                                    out_w, out_b, state, aux)
                states.append(state)
            else:
                w1, b1 = _pack_linear(block.layer.input_linear)
                w2, b2 = _pack_linear(block.layer.output_linear)
                engine.add_ff_block(group, level, block.prenorm, norm_w, norm_b, eps, w1, b1, w2, b2)
                states.append(None)
        return states

    # ------------------------------------------------------------------------------------ state
    @_plain_tensors
    def reset(self) -> None:
        """Back to model.default_state(batch_size): zero states, empty pooling buffers."""
        for group in self._states["down"] + self._states["up"] + [self._states["center"]]:
            for state in group:
                if state is not None:
                    state.zero_()
        for t in self._buffers + self._pending:
            t.zero_()
        self._engine.refresh()
        self._engine.set_phases([0] * len(self.pool))

    def _complex_states(self, group):
        """Engine states (B, T, n, 2, 16) -> complex (B, H, n) as model.default_state makes them."""
        out = []
        for state, H in group:
            if state is None:
                out.append(None)
            else:
                B, T, n = state.shape[:3]
                x = torch.complex(state[:, :, :, 0], state[:, :, :, 1])  # (B, T, n, 16)
                out.append(x.permute(0, 1, 3, 2).reshape(B, T * _VECTOR, n)[:, :H].contiguous())
        return out

    @_plain_tensors
    def get_state(self) -> dict:
        """A copy of the state in WaveformAR.default_state's format (continues in model.step)."""
        B, phases = self.batch_size, self._engine.phases()
        state = {"down": [], "buffer": [], "pending": [], "center": [], "up": []}
        for i, p in enumerate(self.pool):
            H = self.widths[i]
            state["down"].append(self._complex_states([(e, H) for e in self._states["down"][i]]))
            state["up"].append(self._complex_states([(e, H) for e in self._states["up"][i]]))
            state["buffer"].append([self._buffers[i][:, s, :H].clone() for s in range(phases[i])])
            state["pending"].append(self._pending[i].view(B, p, -1)[:, :, :H].reshape(B, p * H).clone())
        state["center"] = self._complex_states([(e, self.widths[-1]) for e in self._states["center"]])
        return state

    @_plain_tensors
    def set_state(self, state: dict) -> None:
        """Load a state in WaveformAR.default_state's format (e.g. after model.prefill)."""
        B = self.batch_size
        if not isinstance(state, dict) or set(state) != {"down", "buffer", "pending", "center", "up"}:
            raise ValueError("state must be the dict made by WaveformAR.default_state / prefill / step "
                             "(keys down, buffer, pending, center, up)")
        n_levels = len(self.pool)
        for key in ("down", "buffer", "pending", "up"):
            if len(state[key]) != n_levels:
                raise ValueError(f"state[{key!r}] must have one entry per level ({n_levels}), got {len(state[key])}")
        phases = []
        with torch.no_grad():
            for i, p in enumerate(self.pool):
                H = self.widths[i]
                self._load_group(state["down"][i], self._states["down"][i], H, f"down[{i}]")
                self._load_group(state["up"][i], self._states["up"][i], H, f"up[{i}]")
                buffer = list(state["buffer"][i])
                if len(buffer) >= p:
                    raise ValueError(f"state['buffer'][{i}] holds {len(buffer)} inputs; a DownPool of pool {p} "
                                     f"holds fewer than {p}")
                for s, t in enumerate(buffer):
                    self._check(t, (B, H), f"buffer[{i}][{s}]")
                    self._buffers[i][:, s, :H] = t
                self._buffers[i][:, len(buffer):] = 0
                self._check(state["pending"][i], (B, p * H), f"pending[{i}]")
                self._pending[i].view(B, p, -1)[:, :, :H] = state["pending"][i].reshape(B, p, H)
                phases.append(len(buffer))
            self._load_group(state["center"], self._states["center"], self.widths[-1], "center")
        self._engine.set_phases(phases)
        self._engine.refresh()

    def _check(self, t, shape, name):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.is_complex():
            raise ValueError(f"state {name} must be a real tensor of shape {shape}, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")

    def _load_group(self, given, mine, H, name):
        if len(given) != len(mine):
            raise ValueError(f"state {name} has {len(given)} entries, the model has {len(mine)} blocks")
        for j, (t, state) in enumerate(zip(given, mine)):
            if state is None:
                if t is not None:
                    raise ValueError(f"state {name}[{j}] belongs to an FF block and must be None")
                continue
            B, T, n = state.shape[:3]
            if not isinstance(t, torch.Tensor) or not t.is_complex() or tuple(t.shape) != (B, H, n):
                raise ValueError(f"state {name}[{j}] must be complex ({B}, {H}, {n}), got "
                                 f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
            x = torch.zeros(B, T * _VECTOR, n, dtype=torch.complex64)
            x[:, :H] = t.detach()
            x = x.reshape(B, T, _VECTOR, n).permute(0, 1, 3, 2)  # (B, T, n, 16)
            state.copy_(torch.stack([x.real, x.imag], dim=3))

    # ------------------------------------------------------------------------------------- steps
    def _tokens(self, tokens, name="tokens") -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor) or tokens.is_floating_point() or tokens.is_complex() \
                or tokens.dtype == torch.bool or tuple(tokens.shape) != (self.batch_size,):
            raise ValueError(f"{name} must be an integer tensor of shape ({self.batch_size},), got "
                             f"{getattr(tokens, 'dtype', type(tokens).__name__)} {tuple(getattr(tokens, 'shape', ()))}")
        tokens = tokens.to(torch.long).contiguous()
        if int(tokens.min()) < 0 or int(tokens.max()) >= self.n_classes:
            raise ValueError(f"{name} must be levels in [0, {self.n_classes}), got values in "
                             f"[{int(tokens.min())}, {int(tokens.max())}]")
        return tokens

    @_plain_tensors
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B,) integer levels -> logits (B, n_classes) float32; the state advances one step."""
        tokens = self._tokens(tokens)
        logits = torch.empty(self.batch_size, self.n_classes)
        self._engine.step(tokens, logits)
        return logits

    @_plain_tensors
    def generate(self, first_tokens: torch.Tensor, uniforms: torch.Tensor, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0):
        """Sample uniforms.shape[1] tokens per row: (tokens (B, n) int64, logprobs (B, n) float64).

        first_tokens (B,) is fed first; token t of row b is drawn with uniforms[b, t] by the rule
        in the module docstring; logprobs are the model's log-probabilities of the chosen tokens
        (temperature 1, untruncated).
        """
        first_tokens = self._tokens(first_tokens, "first_tokens")
        uniforms = _check_sampling(uniforms, temperature, top_k, top_p, (self.batch_size, None))
        n = uniforms.shape[1]
        tokens = torch.empty(self.batch_size, n, dtype=torch.long)
        logprobs = torch.empty(self.batch_size, n, dtype=torch.float64)
        self._engine.generate(first_tokens, uniforms, float(temperature), int(top_k), float(top_p), tokens, logprobs)
        return tokens, logprobs


def _check_sampling(uniforms, temperature, top_k, top_p, shape):
    check_sampling(temperature, top_k, top_p)
    if not isinstance(uniforms, torch.Tensor) or not uniforms.is_floating_point() or uniforms.dim() != len(shape) \
            or any(s is not None and s != d for s, d in zip(shape, uniforms.shape)):
        want = ", ".join("n" if s is None else str(s) for s in shape)
        raise ValueError(f"uniforms must be a float tensor of shape ({want}), got "
                         f"{getattr(uniforms, 'dtype', type(uniforms).__name__)} {tuple(getattr(uniforms, 'shape', ()))}")
    uniforms = uniforms.detach().to(torch.float64).contiguous()
    if uniforms.numel() and not (float(uniforms.min()) >= 0 and float(uniforms.max()) < 1):
        raise ValueError("uniforms must lie in [0, 1)")
    return uniforms


def engine_sample(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0):
    """The engine's own sampling code on given logits (B, V): (tokens (B,) int64, logprobs (B,) float64).

    The same rule as sashimi.pipelines.sampling.sample (the oracle the tests compare it with).
    """
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.dim() != 2:
        raise ValueError(f"logits must be a float tensor (batch, n_classes), got {getattr(logits, 'shape', logits)}")
    B = logits.shape[0]
    uniforms = _check_sampling(uniforms, temperature, top_k, top_p, (B,))
    ext = _load()
    tokens = torch.empty(B, dtype=torch.long)
    logprobs = torch.empty(B, dtype=torch.float64)
    ext.sample(logits.detach().to(torch.float32).contiguous(), uniforms, float(temperature), int(top_k),
               float(top_p), tokens, logprobs)
    return tokens, logprobs
