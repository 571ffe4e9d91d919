"""diffusers model classes whose token mixer is attention, ATConv or a hybrid."""

from .dit import DIT_SIZES, DiTModel, dit_size
from .swap import (
    ATConvAttention,
    MixerDiTTransformer2DModel,
    MixerUNet2DConditionModel,
    MixerUNet2DModel,
    swap_attention,
)

__all__ = [
    "ATConvAttention",
    "DIT_SIZES",
    "DiTModel",
    "MixerDiTTransformer2DModel",
    "MixerUNet2DConditionModel",
    "MixerUNet2DModel",
    "dit_size",
    "swap_attention",
]
