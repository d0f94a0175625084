"""The autoregressive waveform model: quantised samples -> embedding -> SaShiMi -> LayerNorm -> logits.

`ModelConfig` is a plain dataclass (JSON-able through to_dict/from_dict, for checkpoints),
`PRESETS` holds the paper's configurations and a CPU-sized `tiny`, `build_model` makes a
`WaveformAR` from either. Its training objective (the likelihood in bits per sample that
training and evaluation report) is sashimi.objectives.autoregressive.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint as checkpoint_call

from ..data.quantize import QUANTIZATIONS, Quantizer, quantization_kind
from ..nn.backbone import SaShiMi
from ..nn.norms import BLOCK_NORMS
from ..objectives.autoregressive import AUTOREGRESSIVE, nll_bits
from ..checks import check_choice, check_int, check_int_tuple, check_number
from .config import ConfigMixin, S4Settings
from .pretrained import PretrainedMixin
from .registry import register_family

__all__ = ["ModelConfig", "PRESETS", "WaveformAR", "build_model", "count_parameters", "describe"]


@dataclass
class ModelConfig(ConfigMixin, S4Settings):
    """Everything needed to rebuild a WaveformAR (architecture, S4 settings, audio format).

    The S4 settings (sashimi.models.config.S4Settings: mode, hurwitz, d_state, n_ssm, init,
    dt_min, dt_max, ssm_lr, backend) go to every S4 layer. family is the registry key
    (sashimi.models.registry); configs saved without it are autoregressive.
    """

    name: str = "custom"
    # architecture
    d_model: int = 64
    n_layers: int = 8
    pool: tuple = (4, 4)
    expand: int = 2
    ff: int = 2
    dropout: float = 0.0
    prenorm: bool = True
    unet: bool = False  # S4 blocks in the down path too (the causal U-Net of the paper's later model)
    # (the S4 layer settings mode ... backend: keyword-only fields from S4Settings)
    # audio
    sample_rate: int = 16000
    sample_len: int = 16000
    quantization: str = "mu_law"
    bits: int = 8
    # the residual blocks' normalisation: 'layer', or 'scalar' for models imported from the
    # reference's training code (sashimi.from_state_spaces)
    block_norm: str = "layer"
    # registry key (the last positional field; the S4 settings are keyword-only)
    family: str = "autoregressive"

    def __post_init__(self):
        self.check_family("autoregressive")
        self.pool = check_int_tuple("pool", self.pool, low=1)
        for name in ("d_model", "n_layers", "expand", "sample_rate", "sample_len"):
            check_int(name, getattr(self, name), 0 if name == "n_layers" else 1)
        check_int("ff", self.ff, 0)
        self.check_s4()
        check_choice("block_norm", self.block_norm, BLOCK_NORMS)
        try:
            self.quantization = quantization_kind(self.quantization)
        except ValueError:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}") from None
        check_int("bits", self.bits, 1, 16)
        for name in ("prenorm", "unet"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        check_number("dropout", self.dropout, 0, 1, high_open=True)
        if self.sample_len % self.stride:
            raise ValueError(f"sample_len={self.sample_len} must be a multiple of prod(pool)={self.stride} "
                             f"(pool={list(self.pool)})")

    @property
    def n_classes(self) -> int:
        return 2**self.bits

    @property
    def zero_level(self) -> int:
        """The quantisation level of silence: the first input of every sequence."""
        return self.n_classes // 2

    def quantizer(self) -> Quantizer:
        """The quantiser of the model's tokens (datasets encode with it, generation decodes with it)."""
        return Quantizer(self.quantization, self.bits)

    @property
    def stride(self) -> int:
        """Sequence lengths must be multiples of this (the product of the pooling factors)."""
        return math.prod(self.pool)

    def to_dict(self) -> dict:
        """JSON-able dict (pool as a list; family, and n_classes for readers, included)."""
        d = super().to_dict()
        d["n_classes"] = self.n_classes
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """The config of a to_dict() output; without a family key (older checkpoints): autoregressive."""
        if not isinstance(d, dict):
            raise TypeError(f"a model configuration must be a dict, got {type(d).__name__}")
        d = dict(d)
        n_classes = d.pop("n_classes", None)
        config = super().from_dict(d)
        if n_classes is not None and n_classes != config.n_classes:
            raise ValueError(f"inconsistent configuration: n_classes={n_classes} but bits={config.bits} "
                             f"gives {config.n_classes}")
        return config


PRESETS: dict[str, ModelConfig] = {
    # the paper's SC09 model: 1 s of 16 kHz speech, 8-bit mu-law
    "sc09": ModelConfig(name="sc09"),
    # 2 layers per level: the reference's throughput/generation benchmark configuration
    "sc09-2layer": ModelConfig(name="sc09-2layer", n_layers=2),
    # music, ~8 s clips (the reference uses 2**17 = 131072 samples for YouTubeMix)
    "youtubemix": ModelConfig(name="youtubemix", sample_len=128000),
    "beethoven": ModelConfig(name="beethoven", sample_len=128000, quantization="linear"),
    # CPU demos and tests: trains to well below 8 bits/sample on the builtin data in minutes
    "tiny": ModelConfig(name="tiny", d_model=32, n_layers=2, d_state=16, sample_len=4000),
}


def get_config(config, **overrides) -> ModelConfig:
    """A ModelConfig from a preset name, a dict (to_dict output) or a ModelConfig, with overrides."""
    if isinstance(config, str):
        if config not in PRESETS:
            raise ValueError(f"unknown preset {config!r}; expected one of {sorted(PRESETS)}")
        config = PRESETS[config]
    elif isinstance(config, dict):
        config = ModelConfig.from_dict(config)
    elif not isinstance(config, ModelConfig):
        raise TypeError(f"expected a preset name, a dict or a ModelConfig, got {type(config).__name__}")
    return dataclasses.replace(config, **overrides)  # a copy: presets are never modified


class WaveformAR(PretrainedMixin, nn.Module):
    """Next-sample model over quantised audio: tokens (B, L) -> logits (B, L, n_classes).

    Causal: logits[:, t] depend on tokens[:, :t+1] only (inputs are the targets shifted
    right by one, see sashimi.data.datasets). Recurrent mode: setup_step(), default_state(B),
    step(token (B,), state) -> (logits (B, n_classes), state), and prefill(tokens (B, L),
    state) to read a prompt in convolution mode before stepping.
    """

    objective = AUTOREGRESSIVE  # what sashimi.training minimises: the NLL of the next sample

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"WaveformAR needs a ModelConfig (see build_model), got {type(config).__name__}")
        self.config = config
        self.n_classes = config.n_classes
        self.embedding = nn.Embedding(config.n_classes, config.d_model)
        self.backbone = SaShiMi(config.d_model, config.n_layers, config.pool, config.expand, config.ff,
                                bidirectional=False, unet=config.unet, dropout=config.dropout,
                                prenorm=config.prenorm, final_norm=False, block_norm=config.block_norm,
                                **config.s4_kwargs())
        self.norm = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.n_classes)

    def set_gradient_checkpointing(self, enable: bool = True) -> "WaveformAR":
        """Recompute each layer's activations in the backward pass (much less training memory).

        A runtime switch, not part of the configuration: it does not change the model.
        """
        self.backbone.checkpoint = bool(enable)
        return self

    def activation_bytes(self, batch_size: int) -> int:
        """Estimated activation memory of one training forward of batch_size clips without checkpointing."""
        return activation_bytes(self.config, batch_size)

    def check_tokens(self, tokens, shape: str = "(batch, length)", dim: int = 2) -> None:
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"tokens must be an integer torch.Tensor of shape {shape}, got {type(tokens).__name__}")
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise TypeError(f"tokens must be quantised levels in an integer tensor (e.g. torch.long), got {tokens.dtype}")
        if tokens.dim() != dim:
            raise ValueError(f"tokens must have shape {shape}, got {tuple(tokens.shape)}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.n_classes):
            raise ValueError(f"tokens must be levels in [0, {self.n_classes}), got values in "
                             f"[{int(tokens.min())}, {int(tokens.max())}]")

    # tokens per chunk of the head + cross-entropy in forward(tokens, targets): the (B, L, n_classes)
    # logits are never materialised whole (autograd would keep several copies; docs/benchmarks.md)
    LOSS_CHUNK_TOKENS = 16384

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        """tokens (B, L) integer levels, L a multiple of prod(pool) -> logits (B, L, n_classes).

        With targets (B, L) (and optionally mask (B, L) bool), returns nll_bits of the logits,
        (sum_bits, count), computed over chunks of time so that the logits of the whole batch
        never exist at once; with gradient checkpointing on, each chunk's logits are recomputed
        in the backward pass. Same value as nll_bits(model(tokens), targets, mask).
        """
        self.check_tokens(tokens)
        features = self.backbone(self.embedding(tokens))
        if targets is None:
            if mask is not None:
                raise ValueError("mask needs targets")
            return self.head(self.norm(features))
        if targets.shape != tokens.shape:
            raise ValueError(f"targets {tuple(targets.shape)} must have the tokens' shape {tuple(tokens.shape)}")
        if mask is not None and mask.shape != tokens.shape:
            raise ValueError(f"mask {tuple(mask.shape)} must have the tokens' shape {tuple(tokens.shape)}")
        B, L = tokens.shape
        step = max(1, self.LOSS_CHUNK_TOKENS // max(B, 1))
        recompute = self.backbone.checkpoint and self.training and torch.is_grad_enabled()
        total_bits, total_count = 0.0, 0
        for t0 in range(0, L, step):
            part = slice(t0, t0 + step)
            args = (features[:, part], targets[:, part], None if mask is None else mask[:, part])
            if recompute:
                bits, count = checkpoint_call(self._chunk_bits, *args, use_reentrant=False)
            else:
                bits, count = self._chunk_bits(*args)
            total_bits, total_count = total_bits + bits, total_count + count
        return total_bits, total_count

    def _chunk_bits(self, features, targets, mask):
        return nll_bits(self.head(self.norm(features)).float(), targets, mask)

    # ---------------------------------------------------------------- recurrent mode
    def setup_step(self, mode: str = "linear", **kwargs):
        self.backbone.setup_step(mode=mode, **kwargs)

    def default_state(self, batch_size: int, device=None) -> dict:
        return self.backbone.default_state(batch_size, device=device)

    def prefill(self, tokens: torch.Tensor, state: dict):
        """Consume a prompt tokens (B, L) (any L >= 1) in convolution mode from `state`.

        Returns (logits (B, L, n_classes), state), exactly as L calls of step() would.
        """
        self.check_tokens(tokens)
        y, state = self.backbone.prefill(self.embedding(tokens), state)
        return self.head(self.norm(y)), state

    def step(self, token: torch.Tensor, state: dict):
        """token (B,) integer levels -> (logits (B, n_classes), state)."""
        if not isinstance(token, torch.Tensor) or token.is_floating_point() or token.is_complex() \
                or token.dtype == torch.bool:
            self.check_tokens(token, "(batch,)", 1)  # raises the TypeError
        if token.dim() != 1:
            raise ValueError(f"step input must be one level per sequence, shape (batch,), got {tuple(token.shape)}")
        try:
            x = self.embedding(token)
        except IndexError:  # out of range: say which levels are valid
            self.check_tokens(token, "(batch,)", 1)
            raise
        y, state = self.backbone.step(x, state)
        return self.head(self.norm(y)), state


def build_model(config="tiny", **overrides) -> WaveformAR:
    """WaveformAR from a preset name, a config dict or a ModelConfig; overrides are config fields.

    Autoregressive presets only; sashimi.build_model (sashimi.models.registry) takes any family's.
    """
    return WaveformAR(get_config(config, **overrides))


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared ones counted once; buffers not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def describe(model: nn.Module) -> str:
    """One line: the model, its size, and where the parameters are."""
    total = count_parameters(model)
    if isinstance(model, WaveformAR):
        c = model.config
        backbone = count_parameters(model.backbone)
        return (f"WaveformAR '{c.name}': {total:,} parameters ({total / 1e6:.2f}M; backbone {backbone:,}) | "
                f"d_model={c.d_model} n_layers={c.n_layers} pool={list(c.pool)} expand={c.expand} ff={c.ff} "
                f"mode={c.mode} d_state={c.d_state}{' unet' if c.unet else ''}"
                f"{'' if c.block_norm == 'layer' else ' block_norm=' + c.block_norm} | "
                f"{c.sample_rate} Hz, {c.sample_len} samples, {c.bits}-bit {c.quantization}")
    return f"{type(model).__name__}: {total:,} parameters ({total / 1e6:.2f}M)"


def activation_bytes(config: ModelConfig, batch_size: int, length: int | None = None) -> int:
    """Estimated memory of the activations autograd keeps for one training forward (no checkpointing).

    Per (S4, FF) block pair and level: about 7 tensors of the level's (batch, length, width) size
    for the S4 block and 1 + 2 ff for the FF block, in float32 (a slight underestimate: the loss
    and the S4 kernels come on top; docs/benchmarks.md compares it with a measurement). The centre
    has n_layers pairs; each pooling level n_layers (2 n_layers with unet=True).
    """
    length = config.sample_len if length is None else length
    per_pair = 7 + (1 + 2 * config.ff if config.ff > 0 else 0)
    units, steps, width = 0, length, config.d_model
    for i in range(len(config.pool) + 1):
        pairs = config.n_layers * (2 if config.unet and i < len(config.pool) else 1)
        units += batch_size * steps * width * pairs
        if i < len(config.pool):
            steps, width = steps // config.pool[i], width * config.expand
    return 4 * per_pair * units


register_family("autoregressive", ModelConfig, WaveformAR, PRESETS)
