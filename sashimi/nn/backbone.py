"""SaShiMi: the multi-scale S4 backbone (B, L, H) -> (B, L, H), in convolution mode and as an RNN.

Level i runs at 1 / prod(pool[:i]) of the input rate with width d_model * expand**i:

    level 0 (L, H) ──[down blocks]── DownPool ─> level 1 (L/4, 2H) ── ... ─> centre (L/16, 4H)
    level 0 (L, H) <─[up blocks]──── UpPool  <── level 1 ...         <──── centre blocks

A block is a residual pair (prenorm LayerNorm -> S4Block or FF -> dropout -> + input).
Causal model (the paper's, default): no blocks on the way down; at each level the UpPool
output (shifted right by one coarse step) plus the level's input forms u, and the level
returns blocks(u) + u; the centre returns blocks(x) + x. U-Net (`unet=True`, for flows and
diffusion): blocks on the way down as well, bidirectional S4, no shift, and a skip
connection from each down block to its mirror image in the up path.

Recurrent mode (causal only): a DownPool buffers p inputs and fires on the p-th; the
coarser level then runs one step and its UpPool output refills the p pending outputs used
by the next p fine steps. Level i therefore runs once every prod(pool[:i]) steps.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as checkpoint_call

from s4lib import S4Block

from ..checks import check_int, check_int_tuple
from .norms import make_block_norm

__all__ = ["SaShiMi", "DownPool", "UpPool", "FFBlock", "ResidualBlock"]


def _outputs_only(blocks, y: torch.Tensor) -> torch.Tensor:
    """Blocks in convolution mode without states: what one gradient checkpoint recomputes."""
    for block in blocks:
        y, _ = block(y)
    return y


def _fused_backbone():
    from . import fused_backbone  # imports this module: loaded on first use

    return fused_backbone


class DownPool(nn.Module):
    """(B, L*p, H) -> (B, L, H*expand): fold p consecutive steps into the features, then Linear."""

    def __init__(self, d_input: int, expand: int, pool: int):
        super().__init__()
        self.d_input, self.pool = d_input, pool
        self.d_output = d_input * expand
        # input features ordered (step s, channel h): step s of the group at s*H : (s+1)*H
        self.linear = nn.Linear(d_input * pool, self.d_output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, H = x.shape
        return self.linear(x.reshape(B, L // self.pool, self.pool * H))

    def fire(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        """Recurrent mode: the p buffered inputs (each (B, H)) -> one coarse step (B, H*expand)."""
        return self.linear(torch.cat(inputs, dim=-1))


class UpPool(nn.Module):
    """(B, L, H) -> (B, L*p, H/expand): Linear to p*H/expand features, then unfold them into p steps.

    causal=True shifts the result right by one coarse step (p fine steps, filled with zeros)
    so that fine step t only sees coarse steps that ended before t.
    """

    def __init__(self, d_input: int, expand: int, pool: int, causal: bool = True):
        super().__init__()
        if d_input % expand:
            raise ValueError(f"expand={expand} must divide the width {d_input}")
        self.pool, self.causal = pool, causal
        self.d_output = d_input // expand
        self.linear = nn.Linear(d_input, self.d_output * pool)  # output features ordered (step, channel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        if self.causal:  # output group g comes from coarse step g - 1; group 0 is zero
            y = F.pad(self.linear(x[:, :-1]), (0, 0, 1, 0))
        else:
            y = self.linear(x)
        return y.reshape(B, L * self.pool, self.d_output)

    def expand_step(self, x: torch.Tensor) -> torch.Tensor:
        """Recurrent mode: one coarse step (B, H) -> the next p fine outputs, flat (B, p*H/expand)."""
        return self.linear(x)


class FFBlock(nn.Module):
    """Position-wise feed-forward: Linear(H, ff*H) -> GELU -> dropout -> Linear(ff*H, H)."""

    def __init__(self, d_model: int, ff: int = 2, dropout: float = 0.0):
        super().__init__()
        self.input_linear = nn.Linear(d_model, d_model * ff)
        self.activation = nn.GELU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.output_linear = nn.Linear(d_model * ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_linear(self.dropout(self.activation(self.input_linear(x))))


class ResidualBlock(nn.Module):
    """x + dropout(layer(norm(x))) (prenorm), or norm(x + dropout(layer(x))) (postnorm).

    `layer` is an S4Block (stateful, returns (y, state)) or an FFBlock (stateless); norm is
    'layer' (nn.LayerNorm) or 'scalar' (sashimi.nn.norms.ScalarLayerNorm).
    """

    def __init__(self, d_model: int, layer: nn.Module, dropout: float = 0.0, prenorm: bool = True,
                 norm: str = "layer"):
        super().__init__()
        self.layer, self.prenorm = layer, prenorm
        self.stateful = isinstance(layer, S4Block)
        self.norm = make_block_norm(norm, d_model)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, state=None):
        """x (B, L, H) -> (y (B, L, H), next_state): the S4 layer's state after the sequence, continuing
        from `state` (None: from zero); a stateless (FF) block returns None for it."""
        z = self.norm(x) if self.prenorm else x
        if self.stateful:
            z, next_state = self.layer(z, state=state)
        else:
            z, next_state = self.layer(z), None
        x = x + self.dropout(z)
        if not self.prenorm:
            x = self.norm(x)
        return x, next_state

    def step(self, x: torch.Tensor, state):
        """x (B, H) -> (y (B, H), state)."""
        z = self.norm(x) if self.prenorm else x
        if self.stateful:
            z, state = self.layer.step(z, state)
        else:
            z = self.layer(z)
        x = x + self.dropout(z)
        if not self.prenorm:
            x = self.norm(x)
        return x, state

    def default_state(self, batch_size: int, device=None):
        return self.layer.default_state(batch_size, device=device) if self.stateful else None


class SaShiMi(nn.Module):
    """The SaShiMi backbone: (B, L, d_model) -> (B, L, d_model), L divisible by prod(pool).

    d_model: width at the finest level (level i has d_model * expand**i).
    n_layers: (S4 block, FF block) pairs per level in the up path and in the centre
        (and, with unet=True, in the down path).
    pool: pooling factor per level (one level per entry); expand: width factor per level.
    ff: FF expansion factor (0 drops the FF blocks).
    bidirectional: bidirectional S4 layers (non-causal). None (default) follows `unet`.
    unet: S4/FF blocks in the down path too, with layer-wise skip connections; with the
        default bidirectional=None this is the non-causal variant for flows/diffusion.
    dropout: in the S4 and FF layers and on each residual branch.
    prenorm: LayerNorm before each layer (True) or after each residual add (False).
    final_norm: a LayerNorm on the output (as in the reference backbone).
    block_norm: the residual blocks' normalisation, 'layer' (LayerNorm) or 'scalar' (one gain
        and shift, as in the reference's training code; see sashimi.nn.norms).
    checkpoint: gradient checkpointing in training, one checkpoint per (S4, FF) layer pair
        (per block in the U-Net's skip-connected paths); the `checkpoint` attribute may be
        switched at any time. Activations are recomputed in the backward pass, trading about
        one extra forward for a several-fold smaller activation memory.
    s4_kwargs: to every S4Block / FFTConv / SSM kernel (mode 'dplr'|'diag', d_state,
        hurwitz, init, dt_min, dt_max, lr, n_ssm, backend, ...).

    The model is causal (output t depends on inputs <= t) iff its S4 layers are not
    bidirectional; only then does it have a recurrent mode (setup_step/default_state/step).
    """

    def __init__(self, d_model: int = 64, n_layers: int = 8, pool=(4, 4), expand: int = 2, ff: int = 2,
                 bidirectional: bool | None = None, unet: bool = False, dropout: float = 0.0,
                 prenorm: bool = True, final_norm: bool = True, checkpoint: bool = False, block_norm: str = "layer",
                 **s4_kwargs):
        super().__init__()
        for name, value, low in (("d_model", d_model, 1), ("n_layers", n_layers, 0), ("expand", expand, 1),
                                 ("ff", ff, 0)):
            check_int(name, value, low)
        pool = check_int_tuple("pool", pool, low=1)
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        for key in ("transposed", "d_model"):
            if key in s4_kwargs:
                raise ValueError(f"{key!r} is set by SaShiMi, not an S4 keyword here")
        make_block_norm(block_norm, 1)  # validates the name
        bidirectional = unet if bidirectional is None else bool(bidirectional)
        self.block_norm = block_norm
        self.d_model, self.n_layers, self.pool, self.expand, self.ff = d_model, n_layers, pool, expand, ff
        self.unet, self.bidirectional = bool(unet), bidirectional
        self.causal = not bidirectional
        self.checkpoint = bool(checkpoint)
        self.stride = math.prod(pool)  # L must be a multiple of this
        self.widths = [d_model * expand**i for i in range(len(pool) + 1)]

        def blocks(width: int) -> nn.ModuleList:
            layers = []
            for _ in range(n_layers):
                s4 = S4Block(width, transposed=False, dropout=dropout, bidirectional=bidirectional, **s4_kwargs)
                layers.append(ResidualBlock(width, s4, dropout, prenorm, block_norm))
                if ff > 0:
                    layers.append(ResidualBlock(width, FFBlock(width, ff, dropout), dropout, prenorm, block_norm))
            return nn.ModuleList(layers)

        levels = range(len(pool))
        self.down_blocks = nn.ModuleList(blocks(self.widths[i]) if unet else nn.ModuleList() for i in levels)
        self.down_pools = nn.ModuleList(DownPool(self.widths[i], expand, pool[i]) for i in levels)
        self.center_blocks = blocks(self.widths[-1])
        self.up_pools = nn.ModuleList(UpPool(self.widths[i + 1], expand, pool[i], causal=self.causal) for i in levels)
        self.up_blocks = nn.ModuleList(blocks(self.widths[i]) for i in levels)
        self.norm = nn.LayerNorm(d_model) if final_norm else nn.Identity()
        # recurrent step: 'auto' runs the fused engine when it applies (sashimi.nn.fused_backbone),
        # 'eager' always the module-by-module step (the oracle), 'fused' raises if it cannot run fused
        self.step_backend = "auto"
        self._step_generation = 0  # bumped by setup_step(): the fused engine is rebuilt

    @property
    def d_output(self) -> int:
        return self.d_model

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_layers={self.n_layers}, pool={self.pool}, expand={self.expand}, "
                f"ff={self.ff}, unet={self.unet}, causal={self.causal}")

    # ---------------------------------------------------------------- convolution mode
    def check_input(self, x) -> None:
        layout = f"(batch, length, d_model={self.d_model})"
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor of shape {layout}, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor of shape {layout}, got {x.dtype}")
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape {layout}, got {tuple(x.shape)}")
        L = x.shape[1]
        if L < 1 or L % self.stride:
            raise ValueError(f"sequence length must be a positive multiple of prod(pool)={self.stride} "
                             f"(pool={list(self.pool)}), got {L}; pad or crop the input")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L, d_model) -> (B, L, d_model), the whole sequence at once (convolution mode)."""
        self.check_input(x)
        return self.norm(self._forward_level(0, x))

    def _run_blocks(self, blocks, x: torch.Tensor, states: list | None = None, record: list | None = None,
                    add: list | None = None) -> torch.Tensor:
        """A chain of residual blocks in convolution mode: the one way every path runs them.

        states: per-block states, continued and replaced in place (prefill); None starts from zero.
        record: list that receives each block's output (U-Net skips on the way down); add: stack
        whose top is added to each block's output (U-Net skips on the way up). When training with
        gradient checkpointing (and no states), each checkpoint covers one layer, an (S4, FF) pair
        (one block when skips come between blocks): half as many saved inputs as one per block, at
        the same speed (docs/benchmarks.md).
        """
        blocks = list(blocks)
        if self.checkpoint and self.training and torch.is_grad_enabled() and states is None:
            group = 2 if self.ff > 0 and record is None and add is None else 1
            for k in range(0, len(blocks), group):
                # The reentrant variant runs the first forward under no_grad, which frees each layer's
                # temporaries at once (on CPU the heap fragments less, docs/benchmarks.md). It only records
                # the graph when its input needs a gradient, so an input that does not (a frozen
                # embedding) takes the non-reentrant variant.
                x = checkpoint_call(_outputs_only, blocks[k:k + group], x, use_reentrant=x.requires_grad)
                x = self._skips(x, record, add)
            return x
        for j, block in enumerate(blocks):
            x, state = block(x, None if states is None else states[j])
            if states is not None:
                states[j] = state
            x = self._skips(x, record, add)
        return x

    @staticmethod
    def _skips(x: torch.Tensor, record: list | None, add: list | None) -> torch.Tensor:
        if add is not None:
            x = x + add.pop()
        if record is not None:
            record.append(x)
        return x

    def _forward_level(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if i == len(self.pool):  # centre
            return self._run_blocks(self.center_blocks, x) + x
        skips = [x]
        x = self._run_blocks(self.down_blocks[i], x, record=skips)
        y = self.up_pools[i](self._forward_level(i + 1, self.down_pools[i](x)))
        if self.unet:  # the UpPool and each up block get their mirror image's skip
            return self._run_blocks(self.up_blocks[i], y + skips.pop(), add=skips)
        u = y + skips[0]
        return self._run_blocks(self.up_blocks[i], u) + u

    # ---------------------------------------------------------------- recurrent mode
    def _require_causal(self, what: str):
        if not self.causal:
            raise RuntimeError(f"{what}: this SaShiMi is non-causal (bidirectional S4"
                               f"{', unet=True' if self.unet else ''}) and has no recurrent mode; "
                               "build it with bidirectional=False for step-by-step generation")

    def _stateful_blocks(self):
        for group in (*self.down_blocks, self.center_blocks, *self.up_blocks):
            for block in group:
                if block.stateful:
                    yield block

    def setup_step(self, mode: str = "linear", **kwargs):
        """Prepare every S4 layer's recurrence (after training, after moving the model)."""
        self._require_causal("setup_step")
        for block in self._stateful_blocks():
            block.layer.setup_step(mode=mode, **kwargs)
        self._step_generation += 1

    def default_state(self, batch_size: int, device=None) -> dict:
        """The state before the first step: a dict of lists (one entry per level / block).

        down, up, center: per-block S4 states (complex (B, H, n); None for FF blocks);
        buffer: per level, the DownPool inputs received since it last fired (a list, < p);
        pending: per level, the UpPool's outputs for the current group of p fine steps (B, p*H).
        """
        self._require_causal("default_state")
        check_int("batch_size", batch_size, 1)
        weight = next(self.parameters())
        device = weight.device if device is None else device

        def states(group):
            return [block.default_state(batch_size, device=device) for block in group]

        return {
            "down": [states(g) for g in self.down_blocks],
            "buffer": [[] for _ in self.pool],
            "pending": [torch.zeros(batch_size, self.pool[i] * self.widths[i], dtype=weight.dtype, device=device)
                        for i in range(len(self.pool))],
            "center": states(self.center_blocks),
            "up": [states(g) for g in self.up_blocks],
        }

    def prefill(self, x: torch.Tensor, state: dict):
        """Consume x (B, L, d_model) in convolution mode, continuing from `state`: (y, state).

        Equivalent to L calls of step() (same outputs, same final state) for any L >= 1,
        not only multiples of prod(pool), and from any state (fresh or mid-sequence): a
        prompt is read in one pass and generation continues with step(). Every level
        runs as a convolution with state forwarding; pooling buffers and pending outputs
        are carried exactly as step() would leave them.
        """
        self._require_causal("prefill")
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 3 \
                or x.shape[-1] != self.d_model or x.shape[1] < 1:
            raise ValueError(f"prefill input must be a float tensor (batch, length >= 1, d_model={self.d_model}), "
                             f"got {tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        return self.norm(self._prefill_level(0, x, state)), state

    def _prefill_level(self, i: int, x: torch.Tensor, state: dict) -> torch.Tensor:
        if i == len(self.pool):  # centre
            return self._run_blocks(self.center_blocks, x, state["center"]) + x
        skips = [x]
        x = self._run_blocks(self.down_blocks[i], x, state["down"][i], record=skips)
        B, L, H = x.shape
        p, buffer = self.pool[i], state["buffer"][i]
        k = len(buffer)  # inputs already waiting in the DownPool: x continues their group
        seq = torch.cat([torch.stack(buffer, dim=1), x], dim=1) if k else x
        n_groups = (k + L) // p
        pending = state["pending"][i].unsqueeze(1)  # (B, 1, p*H): outputs for the current group
        if n_groups:
            coarse = self.down_pools[i](seq[:, :n_groups * p])
            coarse = self._prefill_level(i + 1, coarse, state)
            expanded = self.up_pools[i].expand_step(coarse)  # group g + 1's outputs, (B, n_groups, p*H)
            pending = torch.cat([pending, expanded], dim=1)
            state["pending"][i] = expanded[:, -1]
        state["buffer"][i] = list(seq[:, n_groups * p:].unbind(1))
        y = pending.reshape(B, -1, H)[:, k:k + L]
        states = state["up"][i]
        if self.unet:
            return self._run_blocks(self.up_blocks[i], y + skips.pop(), states, add=skips)
        u = y + skips[0]
        return self._run_blocks(self.up_blocks[i], u, states) + u

    def step(self, x: torch.Tensor, state: dict):
        """One time step: x (B, d_model) -> (y (B, d_model), state).

        The state's containers (dict and lists) are updated in place and returned; its tensors
        are never modified in place, so copying the containers (not the tensors) snapshots it.
        Runs on the fused engine when it applies (CPU float32, no autograd graph, a supported
        configuration: sashimi.nn.fused_backbone), else block by block; both keep this state format.
        """
        if x.dim() != 2 or x.shape[-1] != self.d_model:
            raise ValueError(f"step input must have shape (batch, d_model={self.d_model}), got {tuple(x.shape)}")
        if self.step_backend != "eager" and not torch.compiler.is_compiling():
            out = _fused_backbone().backbone_step(self, x, state)
            if out is not None:
                return out
        return self.norm(self._step_level(0, x, state)), state

    @staticmethod
    def _step_blocks(blocks, x: torch.Tensor, states: list, record: list | None = None,
                     add: list | None = None) -> torch.Tensor:
        """The recurrent twin of _run_blocks: one step through a chain of blocks (states replaced in place)."""
        for j, block in enumerate(blocks):
            x, states[j] = block.step(x, states[j])
            x = SaShiMi._skips(x, record, add)
        return x

    def _step_level(self, i: int, x: torch.Tensor, state: dict) -> torch.Tensor:
        if i == len(self.pool):  # centre
            return self._step_blocks(self.center_blocks, x, state["center"]) + x
        skips = [x]
        x = self._step_blocks(self.down_blocks[i], x, state["down"][i], record=skips)
        # This step's output uses the pending UpPool outputs from the previous coarse step,
        # so the up path runs before the DownPool can fire and refresh them.
        buffer, H = state["buffer"][i], self.widths[i]
        phase = len(buffer)
        y = state["pending"][i][:, phase * H:(phase + 1) * H]
        if self.unet:
            y = self._step_blocks(self.up_blocks[i], y + skips.pop(), state["up"][i], add=skips)
        else:
            u = y + skips[0]
            y = self._step_blocks(self.up_blocks[i], u, state["up"][i]) + u
        buffer.append(x)
        if len(buffer) == self.pool[i]:
            coarse = self.down_pools[i].fire(buffer)
            buffer.clear()
            coarse = self._step_level(i + 1, coarse, state)
            state["pending"][i] = self.up_pools[i].expand_step(coarse)
        return y
