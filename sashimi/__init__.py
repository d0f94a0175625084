"""sashimi: raw-audio generative models (SaShiMi and flows) built on s4lib."""

from .backbone import SaShiMi
from .generate import Generator
from .model import PRESETS, ModelConfig, WaveformAR, build_model

__all__ = ["SaShiMi", "WaveformAR", "ModelConfig", "PRESETS", "build_model", "Generator"]
