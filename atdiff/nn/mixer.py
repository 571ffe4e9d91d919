"""The token-mixer switch shared by every atdiff model: attention, ATConv, or a hybrid of both."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from .atconv import ATConv
from .attention import SelfAttention

TOKEN_MIXERS = ("attention", "atconv", "hybrid")


@dataclass(frozen=True)
class MixerSpec:
    """Which mixer each token-mixing layer of a model gets, and ATConv's settings.

    The field names are the model config keys (what ``config.json`` records) of every atdiff model
    class: ``DiTModel`` and the ``Mixer*`` diffusers classes take them as flat keyword arguments
    (diffusers registers a model's config from its ``__init__`` keywords) and build one ``MixerSpec``
    from them; ``swap_attention`` takes one and records ``config()``.

    ``token_mixer``: ``"atconv"`` every layer, ``"attention"`` none (an attention baseline of the same
    class), ``"hybrid"`` every second layer (attention, ATConv, attention, ...: the authors put ATConv
    in every second block). ``atconv_*``: ``ATConv``'s ``kernel_size``, ``pooling``, ``inhibition``.
    """

    token_mixer: str = "atconv"
    atconv_kernel_size: int = 3
    atconv_pooling: str = "1d"
    atconv_inhibition: bool = True

    def __post_init__(self):
        if self.token_mixer not in TOKEN_MIXERS:
            raise ValueError(f"token_mixer must be one of {TOKEN_MIXERS}, got {self.token_mixer!r}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> MixerSpec:
        """The spec recorded in a model config (or any mapping): its mixer keys, defaults for those it lacks."""
        return cls(**{key: config[key] for key in MIXER_KEYS if key in config})

    def config(self) -> dict[str, Any]:
        """The model config keys and values of this spec."""
        return dataclasses.asdict(self)

    def layer_kinds(self, num_layers: int) -> list[str]:
        """``"attention"`` or ``"atconv"`` for each of ``num_layers`` token-mixing layers, in order."""
        if self.token_mixer == "hybrid":
            return ["atconv" if i % 2 else "attention" for i in range(num_layers)]
        return [self.token_mixer] * num_layers

    def atconv_kwargs(self) -> dict[str, Any]:
        """``ATConv``'s keyword arguments for these settings."""
        return dict(kernel_size=self.atconv_kernel_size, pooling=self.atconv_pooling, inhibition=self.atconv_inhibition)

    def layer(self, kind: str, dim: int, num_heads: int) -> nn.Module:
        """One layer's mixer of kind ``kind`` (one of ``layer_kinds``)."""
        return token_mixer(kind, dim, num_heads, **(self.atconv_kwargs() if kind == "atconv" else {}))


# The model config keys of the token mixer.
MIXER_KEYS = tuple(f.name for f in dataclasses.fields(MixerSpec))


def token_mixer(kind: str, dim: int, num_heads: int, **atconv_kwargs) -> nn.Module:
    """Build one layer's mixer; both take ``(x, grid)`` with x of shape (B, N, C)."""
    if kind == "attention":
        return SelfAttention(dim, num_heads)
    if kind == "atconv":
        return ATConv(dim, **atconv_kwargs)
    raise ValueError(f"a single layer's mixer is 'attention' or 'atconv', got {kind!r}")
