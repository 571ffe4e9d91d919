"""The token-mixer switch shared by every atdiff model: attention, ATConv, or a hybrid of both."""

from __future__ import annotations

from torch import nn

from .atconv import ATConv
from .attention import SelfAttention

TOKEN_MIXERS = ("attention", "atconv", "hybrid")


def check_token_mixer(name: str) -> str:
    if name not in TOKEN_MIXERS:
        raise ValueError(f"token_mixer must be one of {TOKEN_MIXERS}, got {name!r}")
    return name


def layer_mixers(name: str, depth: int) -> list[str]:
    """Mixer of each of ``depth`` layers. ``hybrid`` alternates attention, ATConv, attention, ...
    (the authors put ATConv in every second block)."""
    check_token_mixer(name)
    if name == "hybrid":
        return ["atconv" if i % 2 else "attention" for i in range(depth)]
    return [name] * depth


def token_mixer(kind: str, dim: int, num_heads: int, **atconv_kwargs) -> nn.Module:
    """Build one layer's mixer; both take ``(x, grid)`` with x of shape (B, N, C)."""
    if kind == "attention":
        return SelfAttention(dim, num_heads)
    if kind == "atconv":
        return ATConv(dim, **atconv_kwargs)
    raise ValueError(f"a single layer's mixer is 'attention' or 'atconv', got {kind!r}")
