"""The fused engine for a SaShiMi backbone's recurrent step: building it, its state, and SaShiMi.step's fast path.

kernels/sashimi_step_cpu.cpp steps a whole causal SaShiMi (every level, S4 and FF block) in one
C++ call; its S4 layers run s4lib's fused layer step (kernels/s4_layer_step.h, packed by
s4lib.fused_step.pack_ssm). `BackboneEngine` builds it from a backbone and converts its state to
and from SaShiMi.default_state's format; sashimi.pipelines.fast_step.FastStepper adds the
WaveformAR embedding, head and sampling loop. `backbone_step` is SaShiMi.step's fused path.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn

from s4lib import SSMKernelDiag, SSMKernelDPLR
from s4lib import fused_step as s4_fused
from s4lib.block import S4Block
from s4lib.fftconv import FFTConv
from s4lib.ops import native_build

from .backbone import FFBlock, ResidualBlock

_NAME = "sashimi_step_cpu"
_SOURCES = ("sashimi_step_cpu.cpp",)
_HEADERS = ("step_simd.h", "s4_layer_step.h", "step_team.h", "sashimi_engine_model.h", "sashimi_sampling.h",
            "sashimi_state_dict.h")
_VECTOR = 16  # floats per vector in the engine (activations are padded to a multiple)
native_build.declare(_NAME, _SOURCES, s4_fused.extra_cflags(_HEADERS), label="SaShiMi step engine")


class FastPathUnavailable(RuntimeError):
    """The fused engine cannot serve this model here (reason in the message): use the eager step."""


def load_engine():
    """The engine's compiled extension; raises FastPathUnavailable with the reason."""
    try:
        ext = native_build.load_module(_NAME, _SOURCES, extra_cflags=s4_fused.extra_cflags(_HEADERS))
    except RuntimeError as e:
        raise FastPathUnavailable(str(e)) from e
    if ext.VECTOR != _VECTOR:
        raise FastPathUnavailable(f"engine vector width {ext.VECTOR} != {_VECTOR} (stale build?)")
    return ext


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
        if kernel.rank > s4_fused.MAX_RANK:
            return f"{where}: DPLR rank {kernel.rank} > {s4_fused.MAX_RANK} is not implemented"
    elif not isinstance(kernel, SSMKernelDiag):
        return f"{where}: unknown SSM kernel {type(kernel).__name__}"
    return None


def backbone_reason(backbone, final_norm_allowed: bool = True) -> str | None:
    """Why the fused engine cannot run the SaShiMi `backbone` (None if it can)."""
    if not backbone.causal:
        return "the backbone is non-causal (bidirectional) and has no recurrent mode"
    if not isinstance(backbone.norm, nn.Identity) and not (final_norm_allowed and _plain_layer_norm(backbone.norm)):
        return "a backbone final_norm is not implemented by the fused engine"
    for name, p in list(backbone.named_parameters()) + list(backbone.named_buffers()):
        if p.is_floating_point() and (p.dtype != torch.float32 or p.device.type != "cpu"):
            return f"the fused engine runs float32 on CPU; {name} is {p.dtype} on {p.device}"
    if backbone.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in backbone.modules()):
        return "the model is in training mode with dropout: call model.eval() first"
    for m in [b.norm for b in _all_blocks(backbone)]:
        if not _plain_layer_norm(m):
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


def _plain_layer_norm(m) -> bool:
    return isinstance(m, nn.LayerNorm) and m.normalized_shape == (m.normalized_shape[0],)


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


def engine_status() -> tuple[bool, str]:
    """(usable, reason) for the engine's extension, without building it."""
    return native_build.module_status(_NAME, _SOURCES, s4_fused.extra_cflags(_HEADERS))


# ------------------------------------------------------------------------------------------- packing

def _pad(n: int) -> int:
    return -(-n // _VECTOR) * _VECTOR


def _pad_vector(t, width: int, fill: float = 0.0) -> torch.Tensor:
    out = torch.full((width,), fill, dtype=torch.float32)
    if t is not None:
        out[: t.numel()] = t.detach().reshape(-1).to(torch.float32)
    return out


_pack_linear = s4_fused.pack_linear  # the packed GEMM layout shared with s4lib's fused layer step


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


class BackboneEngine:
    """A SaShiMi backbone's step parameters and recurrent state for `batch_size` rows in the fused engine.

    embedding (V, d_model) and head (norm, linear) make a token-in, logits-out engine (WaveformAR,
    sashimi.pipelines.fast_step.FastStepper); without them the engine steps features
    (SaShiMi.step: backbone_step), with the backbone's final norm. States convert to and from SaShiMi.default_state's format.
    """

    WEIGHTS = ("float32", "float16")

    def _linear(self, linear, **groups):
        """A Linear packed for the engine, its weights stored in self.weights' precision."""
        w, b = _pack_linear(linear, **groups)
        return (w.half() if self.weights == "float16" else w), b

    @_plain_tensors
    def _build(self, backbone, batch_size: int, embedding=None, head=None, weights: str = "float32"):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if weights not in self.WEIGHTS:
            raise ValueError(f"weights must be one of {self.WEIGHTS}, got {weights!r}")
        self.weights = weights
        bytes_per = 2 if weights == "float16" else 4
        ext = load_engine()
        self.batch_size = B = batch_size
        self.pool = tuple(backbone.pool)
        self.widths = list(backbone.widths)
        padded = [_pad(h) for h in self.widths]
        V = 0 if embedding is None else embedding.shape[0]
        table = torch.zeros(V, padded[0])
        if embedding is not None:
            table[:, : self.widths[0]] = embedding.detach().to(torch.float32)
        engine = ext.Engine(B, V, table.contiguous())
        self._buffers, self._pending = [], []
        self._level_bytes = [0] * (len(self.pool) + 1)  # parameter bytes a step of each level reads
        for i, p in enumerate(self.pool):
            down_w, down_b = self._linear(backbone.down_pools[i].linear, in_groups=p)
            up_w, up_b = self._linear(backbone.up_pools[i].linear, out_groups=p)
            self._level_bytes[i + 1] += bytes_per * (down_w.numel() + up_w.numel())
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
        if head is not None:
            norm, linear = head
            head_w, head_b = self._linear(linear)
            self._level_bytes[0] += bytes_per * head_w.numel()
            engine.set_head(*_norm(norm, padded[0]), head_w, head_b)
        else:
            has_norm = not isinstance(backbone.norm, nn.Identity)
            engine.set_output_norm(has_norm, *(_norm(backbone.norm, padded[0]) if has_norm else
                                               (torch.zeros(padded[0]), torch.zeros(padded[0]), 1e-5)))
        engine.finalize()
        self._engine = engine
        self._ext = ext
        self.split = "auto"
        # parameter bytes an average step reads (level i runs every prod(pool[:i]) steps): the thread policy's input
        every, self.work = 1, 0
        for i, nbytes in enumerate(self._level_bytes):
            self.work += nbytes // every
            every *= self.pool[i] if i < len(self.pool) else 1

    SPLITS = ("auto", "rows", "columns")

    def threads(self) -> int:
        """Threads a step of this engine may use now (s4lib.fused_step.default_threads, or step_threads(n))."""
        return s4_fused.default_threads(self.batch_size, self.work)

    def _thread_arg(self) -> int:
        """The engine's thread argument for SaShiMi.step: step_threads(n)'s n, else the policy's count."""
        return self.threads()

    def set_split(self, split: str) -> None:
        """How threads share a step: 'auto' (columns below 8 rows, else rows), 'rows' (each thread a
        slice of the rows) or 'columns' (two threads, each all rows and one half of every SSM's channels
        and of every Linear's inputs).
        The results are the same whichever way."""
        if split not in self.SPLITS:
            raise ValueError(f"split must be one of {self.SPLITS}, got {split!r}")
        self.split = split
        self._engine.set_threads(0, self.SPLITS.index(split))

    def _add_blocks(self, engine, group: int, level: int, blocks, Hp: int, B: int):
        states = []
        for block in blocks:
            norm_w, norm_b, eps = _norm(block.norm, Hp)
            if block.stateful:
                s4 = block.layer
                kernel = s4.layer.kernel
                kind, rank, n, planes, chan = s4_fused.pack_ssm(kernel, s4.layer.D[0])
                out_w, out_b = self._linear(s4.output_linear[0], out_groups=2)
                state = torch.zeros(B, s4.d_model, n, dtype=torch.complex64)  # model.default_state's format
                aux = torch.zeros(B, s4.d_model, 2 * rank)
                engine.add_s4_block(group, level, block.prenorm, norm_w, norm_b, eps, kind, rank, n, planes, chan,
                                    out_w, out_b, state, aux)
                self._level_bytes[level] += 4 * (planes.numel() + chan.numel()) + out_w.element_size() * out_w.numel()
                states.append(state)
            else:
                w1, b1 = self._linear(block.layer.input_linear)
                w2, b2 = self._linear(block.layer.output_linear)
                engine.add_ff_block(group, level, block.prenorm, norm_w, norm_b, eps, w1, b1, w2, b2)
                self._level_bytes[level] += w1.element_size() * (w1.numel() + w2.numel())
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

    @staticmethod
    def _complex_states(group):
        """Copies of the engine's states: complex (B, H, n) as model.default_state makes them."""
        return [None if state is None else state.clone() for state, _ in group]

    @_plain_tensors
    def get_state(self) -> dict:
        """A copy of the state in WaveformAR.default_state's format (continues in model.step)."""
        B, phases = self.batch_size, self._engine.phases()
        self._engine.export_states()  # the step runs on its own (tiled) copy of the S4 states
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
            if not isinstance(t, torch.Tensor) or not t.is_complex() or t.shape != state.shape:
                raise ValueError(f"state {name}[{j}] must be complex {tuple(state.shape)}, got "
                                 f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
            state.copy_(t.detach())



# ------------------------------------------------------------------------------ SaShiMi.step fused

class _Fused(BackboneEngine):
    """SaShiMi.step's engine, with what it was built from; the engine mirrors each step into the state dict."""

    def __init__(self, backbone, batch_size, generation):
        self._build(backbone, batch_size)
        self._engine.watch(list(backbone.parameters()) + list(backbone.buffers()))
        self.generation = generation
        # where each S4 state of a level lives in the state dict, in the engine's order
        codes = {"down": 0, "up": 1, "center": 2}
        slots = []
        for i in range(len(self.pool) + 1):
            groups = [("center", None)] if i == len(self.pool) else [("down", i), ("up", i)]
            level_slots = []
            for key, level in groups:
                mine = self._states[key] if level is None else self._states[key][level]
                level_slots += [(codes[key], level or 0, j) for j, t in enumerate(mine) if t is not None]
            slots.append(level_slots)
        # level 0's DownPool takes the input itself unless U-Net down blocks come first
        self._engine.set_dict_layout(slots, not backbone.unet)


def _rebuild(backbone, batch_size):
    """(a new _Fused for `backbone`, None) or (None, the reason it cannot be built); cached on the backbone."""
    reason, engine = backbone_reason(backbone), None
    if reason is None:
        try:
            engine = _Fused(backbone, batch_size, backbone._step_generation)
        except FastPathUnavailable as e:
            reason = str(e)
    backbone.__dict__["_fused_engine"] = engine
    return engine, reason


def backbone_step(backbone, x, state):
    """SaShiMi.step on the fused engine: (y, state) with the state dict updated as the eager step does,
    or None when the fused path does not apply (the caller runs the eager step).

    One native call per step: the engine keeps the state between calls and mirrors each step into
    the dict (kernels/sashimi_state_dict.h); it reloads the dict whenever it is not the one the
    previous fused step returned with the same containers and tensors. It is rebuilt when a
    parameter changes (version counters, data pointers) or setup_step() runs again.
    """
    backend = backbone.step_backend
    if backend == "eager" or torch.compiler.is_compiling():
        return None
    reason = None
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 2:
        reason = "the fused step takes float32 CPU input (batch, d_model)"
    elif not isinstance(state, dict):
        reason = "the state must be the dict made by default_state()"
    elif torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in backbone.parameters())):
        reason = "autograd is recording (use torch.no_grad() or torch.inference_mode() to step fused)"
    else:
        engine = backbone.__dict__.get("_fused_engine")
        for _ in range(2):  # the second time after a parameter changed
            if engine is None or engine.batch_size != x.shape[0] or engine.generation != backbone._step_generation:
                engine, reason = _rebuild(backbone, x.shape[0])
                if reason is not None:
                    break
            y, status = engine._engine.step_dict(x, state, engine._thread_arg(), False)
            if status == 1:  # not the dict this engine returned last: load it (checks it), then step
                engine.set_state(state)
                y, status = engine._engine.step_dict(x, state, engine._thread_arg(), True)
            if status == 0:
                return y, state
            engine, reason = None, "a parameter changed while the engine was rebuilt"  # status 2
    if backend == "fused":
        raise FastPathUnavailable(f"SaShiMi.step cannot run fused: {reason}")
    return None
