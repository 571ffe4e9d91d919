"""atdiff: diffusion models in which ATConv (Attentive Convolution) replaces self-attention."""

__version__ = "0.1.0"

from . import nn
# The public classes; pipeline folders name each model by its defining module
# (model_index.json: "model": ["atdiff.models.dit", "DiTModel"]), so these names are for users.
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
