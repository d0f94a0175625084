"""sashimi: raw-audio generative models (SaShiMi and flows) built on s4lib."""

from .nn.backbone import SaShiMi
from .pipelines.generate import Generator
from .models.autoregressive import PRESETS, ModelConfig, WaveformAR
from .models.registry import build_model, families, preset_names, register_family
from .models.pretrained import from_pretrained, save_pretrained
from .models.state_spaces import from_state_spaces

# PRESETS is the autoregressive family's (as before); preset_names() lists every family's presets,
# and build_model / from_pretrained take any family's.
__all__ = ["SaShiMi", "WaveformAR", "ModelConfig", "PRESETS", "build_model", "Generator", "families",
           "preset_names", "register_family", "from_pretrained", "save_pretrained", "from_state_spaces"]
