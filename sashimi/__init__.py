"""sashimi: raw-audio generative models (SaShiMi and flows) built on s4lib."""

from .nn.backbone import SaShiMi
from .pipelines.generate import Generator
from .models.autoregressive import PRESETS, ModelConfig, WaveformAR, build_model

__all__ = ["SaShiMi", "WaveformAR", "ModelConfig", "PRESETS", "build_model", "Generator"]
