"""The rectified-flow family (FlashAudio's recipe on the SaShiMi U-Net): presets and the objective it trains with."""

from __future__ import annotations

from ..objectives.base import Objective
from ..objectives.distill import distillation_objective
from ..objectives.rectified_flow import flow_count, rectified_flow_objective
from .flow_config import FlowConfig
from .flow_model import FlowModel, register_flow_family

__all__ = ["PRESETS", "FlowConfig", "RectifiedFlowModel", "objective", "build", "reflow_config", "distill_config"]

_TINY = dict(d_model=16, n_layers=1, d_state=16, d_embed=64, d_sinusoid=32, text_d_model=32, text_layers=1)

PRESETS: dict[str, FlowConfig] = {
    # CPU demos and tests on the builtin data: a quarter second, 8 kHz
    "rf-tiny": FlowConfig(name="rf-tiny", sample_rate=8000, sample_len=2048, **_TINY),
    "rf-tiny-text": FlowConfig(name="rf-tiny-text", condition="text", sample_rate=8000, sample_len=2048, **_TINY),
    "rf-small": FlowConfig(name="rf-small", d_model=32, n_layers=2, d_state=32, d_embed=128, sample_rate=8000,
                           sample_len=4096),
    # <= 6M parameters over 1 s of 16 kHz audio (5.38M)
    "rf-wave-5m": FlowConfig(name="rf-wave-5m", d_model=64, n_layers=4),
    # the SC09 DiffWave U-Net of the SaShiMi paper as a rectified flow (23.48M)
    "rf-sc09": FlowConfig(name="rf-sc09", d_model=128, n_layers=6),
    # FlashAudio's compressed-space design: log-mel frames (1 s at hop 256 = 62 frames -> 64 with 4 x 4 pool)
    "rf-mel-tiny": FlowConfig(name="rf-mel-tiny", space="mel", sample_len=16384, hop_length=256, n_mels=80,
                              pool=(2, 2), **_TINY),
    "rf-mel": FlowConfig(name="rf-mel", space="mel", sample_len=16384, hop_length=256, n_mels=80, pool=(2, 2),
                         d_model=128, n_layers=4),
}

def stage_loss(model, batch: dict):
    """The family's loss at the model's stage: the flow MSE (1-RF, 2-RF) or the one-step distillation MSE."""
    if model.config.stage == "distilled":
        return distillation_objective(model, batch)
    return rectified_flow_objective(model, batch)


objective = Objective(stage_loss, metric="mse", unit="MSE/element", summary_key="mse", count=flow_count)


class RectifiedFlowModel(FlowModel):
    """A FlowModel that regresses the straight velocity x1 - x0 (see sashimi.objectives.rectified_flow)."""

    objective = objective  # what sashimi.training minimises


def reflow_config(config: FlowConfig, a: float = 4.0, immiscible: bool = True) -> FlowConfig:
    """The 2-RF stage of a 1-RF config: reflow pairs, Mix-Exp(a) times, immiscible pairing."""
    return config.replace(stage="2-rf", timestep_sampler="mix_exp", timestep_params={"a": a}, immiscible=immiscible)


def distill_config(config: FlowConfig) -> FlowConfig:
    """The one-step distillation stage (trained on reflow pairs at t = 0)."""
    return config.replace(stage="distilled")


build = register_flow_family("rectified_flow", RectifiedFlowModel, PRESETS, "rf-tiny", "rectified-flow",
                             "a rectified flow")
