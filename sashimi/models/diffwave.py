"""The DiffWave diffusion baseline on the SaShiMi U-Net (eps-prediction, T = 200): presets and its objective."""

from __future__ import annotations

from ..objectives.base import Objective
from ..objectives.diffwave import diffwave_objective
from ..objectives.rectified_flow import flow_count
from .flow_config import FlowConfig
from .flow_model import FlowModel, register_flow_family

__all__ = ["PRESETS", "DiffWaveModel", "objective", "build"]

_BASE = dict(family="diffwave", T=200, beta_start=1e-4, beta_end=0.02)
_TINY = dict(d_model=16, n_layers=1, d_state=16, d_embed=64, d_sinusoid=32)

PRESETS: dict[str, FlowConfig] = {
    "diffwave-tiny": FlowConfig(name="diffwave-tiny", sample_rate=8000, sample_len=2048, **_TINY, **_BASE),
    "diffwave-small": FlowConfig(name="diffwave-small", d_model=32, n_layers=2, d_state=32, d_embed=128,
                                 sample_rate=8000, sample_len=4096, **_BASE),
    "diffwave-wave-5m": FlowConfig(name="diffwave-wave-5m", d_model=64, n_layers=4, **_BASE),
    # the SaShiMi paper's SC09 DiffWave U-Net: d_model 128, n_layers 6, pool [4, 4], expand 2, ff 2
    # (23.48M parameters here; the paper quotes 23.0M), unconditional as in the paper
    "diffwave-sc09": FlowConfig(name="diffwave-sc09", d_model=128, n_layers=6, condition="none", p_uncond=0.0,
                                **_BASE),
}

objective = Objective(diffwave_objective, metric="mse", unit="MSE/element (eps)", summary_key="mse", count=flow_count)


class DiffWaveModel(FlowModel):
    """A FlowModel that predicts the noise eps of a DDPM (see sashimi.objectives.diffwave)."""

    objective = objective  # what sashimi.training minimises


build = register_flow_family("diffwave", DiffWaveModel, PRESETS, "diffwave-tiny", "DiffWave", "a DiffWave config")
