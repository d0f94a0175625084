"""The configuration shared by the flow-style families (rectified flow, DiffWave): network, conditioning, space."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .config import S4Settings

__all__ = ["FlowConfig", "SPACES", "CONDITIONS", "STAGES"]

SPACES = ("waveform", "mel")
CONDITIONS = ("none", "label", "text", "embedding")
STAGES = ("1-rf", "2-rf", "distilled")


def _check_int(name, value, low=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


@dataclass
class FlowConfig(S4Settings):
    """Everything needed to rebuild a FlowModel. `family` picks the objective and the samplers.

    space: 'waveform' (the network runs over raw samples, one channel) or 'mel' (over log-mel
    frames, n_mels channels, decoded to audio by a WaveFlow vocoder). condition: 'none', 'label'
    (n_classes ids plus a learned null id), 'text' (short prompts through a small trainable text
    encoder) or 'embedding' (a user tensor of d_condition features per clip). p_uncond: the
    probability of dropping the condition in training (classifier-free guidance needs > 0).
    The S4 settings (sashimi.models.config.S4Settings) go to every S4 layer of the U-Net.
    """

    name: str = "custom"
    family: str = "rectified_flow"
    space: str = "waveform"
    # network (FlowUNet)
    d_model: int = 64
    n_layers: int = 4
    pool: tuple = (4, 4)
    expand: int = 2
    ff: int = 2
    dropout: float = 0.0
    d_sinusoid: int = 128
    d_embed: int = 512
    # (the S4 layer settings mode ... backend: keyword-only fields from S4Settings)
    # conditioning
    condition: str = "label"
    n_classes: int = 10
    d_condition: int = 0
    p_uncond: float = 0.1
    text_d_model: int = 128
    text_layers: int = 2
    text_max_len: int = 64
    # audio and its representation
    sample_rate: int = 16000
    sample_len: int = 16000
    n_mels: int = 80
    hop_length: int = 256
    n_fft: int = 1024
    mel_mean: float = -5.0
    mel_std: float = 2.5
    # rectified flow training: stage '1-rf' (data and fresh noise), '2-rf' (reflow pairs),
    # 'distilled' (one-step distillation on reflow pairs)
    stage: str = "1-rf"
    timestep_sampler: str = "logit_normal"
    timestep_params: dict = field(default_factory=lambda: {"m": 0.0, "s": 1.0})
    immiscible: bool = False
    # diffusion (family 'diffwave')
    T: int = 200
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def __post_init__(self):
        self.pool = tuple(self.pool)
        if self.family not in ("rectified_flow", "diffwave"):
            raise ValueError(f"family must be 'rectified_flow' or 'diffwave', got {self.family!r}")
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {self.space!r}")
        if self.condition not in CONDITIONS:
            raise ValueError(f"condition must be one of {CONDITIONS}, got {self.condition!r}")
        for name in ("d_model", "expand", "sample_rate", "sample_len", "d_embed", "n_mels", "hop_length", "T"):
            _check_int(name, getattr(self, name))
        _check_int("n_layers", self.n_layers, 0)
        _check_int("ff", self.ff, 0)
        self.check_s4()
        if any(isinstance(p, bool) or not isinstance(p, int) or p < 1 for p in self.pool):
            raise ValueError(f"pool must be a list of ints >= 1, got {list(self.pool)!r}")
        if self.condition == "label":
            _check_int("n_classes", self.n_classes)
        if self.condition == "embedding":
            _check_int("d_condition", self.d_condition)
        if not 0 <= self.p_uncond < 1 or not 0 <= self.dropout < 1:
            raise ValueError(f"p_uncond and dropout must be in [0, 1), got {self.p_uncond}, {self.dropout}")
        if self.frames % self.stride:
            unit = "samples" if self.space == "waveform" else f"mel frames (sample_len / hop_length={self.hop_length})"
            raise ValueError(f"the model sees {self.frames} {unit}, which must be a multiple of prod(pool)="
                             f"{self.stride} (pool={list(self.pool)})")

    @property
    def stride(self) -> int:
        return math.prod(self.pool)

    @property
    def channels(self) -> int:
        return 1 if self.space == "waveform" else self.n_mels

    @property
    def frames(self) -> int:
        """The length of the sequence the network sees (samples, or mel frames)."""
        return self.sample_len if self.space == "waveform" else self.sample_len // self.hop_length

    def replace(self, **changes) -> "FlowConfig":
        return dataclasses.replace(self, **changes)

    def with_stage(self, stage: str) -> "FlowConfig":
        """This config at a training stage (what `--stage` of the training loop asks for): for a rectified
        flow '1-rf', '2-rf' (reflow pairs, Mix-Exp(4) times, immiscible pairing) or 'distilled'."""
        if self.family != "rectified_flow":
            raise ValueError(f"a {self.family!r} model has no training stages (reflow and distillation are for "
                             f"rectified flows)")
        if stage == "1-rf":
            return self.replace(stage=stage)
        if stage == "2-rf":
            return self.replace(stage=stage, timestep_sampler="mix_exp", timestep_params={"a": 4.0}, immiscible=True)
        if stage == "distilled":
            return self.replace(stage=stage)
        raise ValueError(f"unknown stage {stage!r}; a rectified flow trains at one of {list(STAGES)}")

    def make_dataset(self, data, split: str = "train", *, n_items: int | None = None, **kwargs):
        """The items this model trains on (sashimi.data.flow_data.flow_dataset)."""
        from ..data.flow_data import flow_dataset

        return flow_dataset(self, data, split, n_items=n_items, **kwargs)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["pool"] = list(self.pool)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "FlowConfig":
        if not isinstance(d, dict):
            raise TypeError(f"a model configuration must be a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown flow configuration keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**d)
