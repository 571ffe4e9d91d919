"""Reusable layers: the ATConv operator, the attention baseline and the token-mixer switch."""

from .atconv import ATConv, resolve_grid
from .attention import SelfAttention
from .functional import per_sample_depthwise_conv2d
from .mixer import MIXER_KEYS, TOKEN_MIXERS, MixerSpec, token_mixer

__all__ = ["ATConv", "MIXER_KEYS", "MixerSpec", "SelfAttention", "TOKEN_MIXERS", "per_sample_depthwise_conv2d", "resolve_grid", "token_mixer"]
