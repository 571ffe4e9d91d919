"""atdiff: diffusion models in which ATConv (Attentive Convolution) replaces self-attention."""

__version__ = "0.1.0"

from . import nn
# diffusers' pipeline loader imports the library a model class came from by its top-level name
# (model_index.json says ["atdiff", "MixerUNet2DModel"]) and looks the class up there: export them here.
from .models import (
    DIT_SIZES,
    DiTModel,
    MixerDiTTransformer2DModel,
    MixerUNet2DConditionModel,
    MixerUNet2DModel,
    dit_size,
    swap_attention,
)
from .nn import ATConv

__all__ = [
    "ATConv",
    "DIT_SIZES",
    "DiTModel",
    "MixerDiTTransformer2DModel",
    "MixerUNet2DConditionModel",
    "MixerUNet2DModel",
    "dit_size",
    "nn",
    "swap_attention",
    "__version__",
]
