"""S4Block: FFTConv followed by a position-wise output linear (GLU by default), with optional gating.

Keywords follow state-spaces/s4's standalone S4Block: S4Block(d_model, bottleneck=None,
gate=None, gate_act=None, mult_act=None, final_act='glu', dropout=0.0, tie_dropout=False,
transposed=True, **layer_args) where layer_args go to FFTConv (l_max, channels,
bidirectional, activation, mode, init, d_state, dt_min, dt_max, lr, hurwitz, ...).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from . import fused_step
from .fftconv import DropoutNd, FFTConv, activation_module, check_input, check_step_args


def linear_activation(d_input: int, d_output: int, activation: str | None = None) -> nn.Module:
    """Linear layer followed by an activation; 'glu' doubles the linear's width and halves it back."""
    if activation == "glu":
        return nn.Sequential(nn.Linear(d_input, 2 * d_output), nn.GLU(dim=-1))
    if activation is None:
        return nn.Linear(d_input, d_output)
    return nn.Sequential(nn.Linear(d_input, d_output), activation_module(activation))


def check_lengths(lengths, batch: int, length: int, device) -> torch.Tensor:
    """`lengths` as a (batch,) integer tensor with values in [0, length]; ValueError/TypeError otherwise."""
    t = torch.as_tensor(lengths, device=device)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"lengths must be integers (one per sequence), got dtype {t.dtype}")
    t = t.reshape(-1)
    if t.numel() != batch:
        raise ValueError(f"lengths must give one length per sequence: {batch} expected, got {t.numel()}")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) > length):
        raise ValueError(f"lengths must be in [0, {length}] (the input length), got values in "
                         f"[{int(t.min())}, {int(t.max())}]")
    return t


class S4Block(nn.Module):
    """A full S4 layer as users drop it into a model: (B, H, L) -> (B, H, L) (or (B, L, H) if not transposed).

    forward(x, state=None, rate=1.0, lengths=None) -> (y, next_state); in recurrent mode
    setup_step(), default_state(*batch_shape) and step(x_t, state) -> (y_t, state).
    """

    def __init__(self, d_model: int, bottleneck: int | None = None, gate: int | None = None,
                 gate_act: str | None = None, mult_act: str | None = None, final_act: str | None = "glu",
                 dropout: float = 0.0, tie_dropout: bool = False, transposed: bool = True, **layer_args):
        super().__init__()
        self.d_model, self.transposed = d_model, transposed
        self.gate, self.bottleneck = gate, bottleneck
        inner = d_model
        if bottleneck is not None:
            if d_model % bottleneck:
                raise ValueError(f"bottleneck={bottleneck} must divide d_model={d_model}")
            inner = d_model // bottleneck
            self.input_linear = nn.Linear(d_model, inner)
        self.layer = FFTConv(inner, transposed=False, dropout=dropout, tie_dropout=tie_dropout, **layer_args)
        if gate is not None:
            self.input_gate = linear_activation(d_model, inner * gate, gate_act)
            self.output_gate = nn.Linear(self.layer.d_output, inner * gate)
        self.mult_activation = activation_module(mult_act)
        self.drop = DropoutNd(dropout) if (tie_dropout and dropout > 0) else (nn.Dropout(dropout) if dropout > 0 else nn.Identity())
        d_inner_out = inner * gate if gate is not None else self.layer.d_output
        self.output_linear = nn.Identity() if final_act is None else linear_activation(d_inner_out, d_model, final_act)
        self.step_backend = "auto"  # 'auto' | 'eager' | 'fused': see s4lib.fused_step

    @property
    def d_output(self) -> int:
        return self.d_model

    def _features(self, x, y):
        """Everything after the SSM, position-wise on (..., features)."""
        if self.gate is not None:
            y = self.output_gate(y) * self.input_gate(x)
        y = self.mult_activation(y)
        if isinstance(self.drop, DropoutNd) and y.dim() == 3:
            y = self.drop(y.transpose(-1, -2)).transpose(-1, -2)
        else:
            y = self.drop(y)
        return self.output_linear(y)

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None, rate: float = 1.0,
                lengths=None, **kwargs):
        check_input(x, self.d_model, self.transposed)
        if self.transposed:
            x = x.transpose(-1, -2)  # (B, L, H)
        L = x.shape[1]
        if lengths is not None:  # zero the padding after each sequence's length
            lengths = check_lengths(lengths, x.shape[0], L, x.device)
            mask = torch.arange(L, device=x.device)[None, :] < lengths[:, None]
            x = x * mask.unsqueeze(-1).to(x.dtype)
        u = self.input_linear(x) if self.bottleneck is not None else x
        y, next_state = self.layer(u, state=state, rate=rate)
        y = self._features(x, y)
        if self.transposed:
            y = y.transpose(-1, -2)
        return y, next_state

    def setup_step(self, mode: str = "linear", **kwargs):
        self.layer.setup_step(mode=mode, **kwargs)

    def default_state(self, *batch_shape, device=None):
        return self.layer.default_state(*batch_shape, device=device)

    def step(self, x: torch.Tensor, state: torch.Tensor):
        """x (B, H) -> y (B, H), next state.

        The whole block runs as one fused native step when it applies (s4lib.fused_step), else its
        FFTConv steps fused or eager and the output stage runs eagerly; the state format is shared.
        """
        fused = self.step_backend != "eager" and not torch.compiler.is_compiling()
        if fused:  # the packed layer checks its own inputs, and declines anything it was not packed for
            out = fused_step.fast_call(self, x, state)
            if out is not None:
                return out
        check_step_args(x, state, self.d_model, self.layer.kernel)
        if fused:
            out = fused_step.block_step(self, x, state)
            if out is not None:
                return out
        u = self.input_linear(x) if self.bottleneck is not None else x
        y, state = self.layer.step(u, state)
        return self._features(x, y), state

    # Mamba-style alias: the recurrent state is the inference cache
    def allocate_inference_cache(self, batch_size: int, max_seqlen: int | None = None, dtype=None, **kwargs):
        state = self.default_state(batch_size)
        return state if dtype is None else state.to(dtype)
