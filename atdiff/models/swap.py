"""ATConv in place of the self-attention of stock diffusers models, persistently.

``swap_attention(model)`` replaces the self-attention layers of a ``UNet2DModel``,
``UNet2DConditionModel`` (``attn1`` only: cross-attention stays) or ``DiTTransformer2DModel`` with
``ATConvAttention`` in place and turns the instance into the matching ``Mixer*`` subclass. Those
subclasses take every argument of their diffusers class plus the token-mixer keys (the fields of
``atdiff.nn.MixerSpec``: ``token_mixer``, ``atconv_*``) and rebuild the same layers in ``__init__``. That is what makes a swapped model persistent: ``save_pretrained``
writes the subclass's ``_class_name`` and keys, ``from_pretrained``/``from_config`` (and diffusers'
``EMAModel.save_pretrained``, which copies parameters by position) construct an identical module
tree, parameter order included, before any weights arrive. Nothing about the swap lives only in
the instance or only in the weights file: the token-grid hooks are installed by ``__init__`` too,
and non-persistent buffers (the DiT's sin-cos position table) are never touched.
"""

from __future__ import annotations

import dataclasses
import inspect
import math

import torch
from diffusers import DiTTransformer2DModel, Transformer2DModel, UNet2DConditionModel, UNet2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..nn.atconv import ATConv
from ..nn.mixer import MIXER_KEYS, MixerSpec
from .common import AtdiffModelMixin, realign_cpu_tensors_
from .conversion import init_atconv_from_attention_

INITS = ("fresh", "from_attention")

# Modules that turn a (B, C, H, W) sample into raster-ordered tokens for their transformer blocks,
# on a grid of (H / patch_size, W / patch_size); ATConv layers inside them learn that grid from a
# forward pre-hook, since diffusers passes blocks only the tokens.
TOKEN_GRID_CONTAINERS = (Transformer2DModel, DiTTransformer2DModel)


# ------------------------------------------------------------------------------------------------
# The layer
# ------------------------------------------------------------------------------------------------


class ATConvAttention(nn.Module):
    """ATConv standing in for a diffusers self-attention ``Attention`` layer.

    Takes the same call as ``Attention`` and does what its processor does around the attention
    itself (spatial/group norm, (B, C, H, W) <-> tokens, output dropout, residual connection,
    output rescaling), so the block around it is untouched. The parameters are those of
    ``self.atconv`` (``kernel_proj``, ``kernel_gen``, ``x_proj``, ``proj``, ``difference_control``)
    plus the attention's own norm, which it keeps.

    A feature map (B, C, H, W) carries its grid. Tokens (B, N, C) use ``grid``, which the enclosing
    ``Transformer2DModel``/``DiTTransformer2DModel`` sets before every forward; a layer called on
    its own falls back to a square grid.
    """

    def __init__(
        self,
        atconv: ATConv,
        *,
        group_norm: nn.GroupNorm | None = None,
        spatial_norm: nn.Module | None = None,
        dropout: float = 0.0,
        residual_connection: bool = False,
        rescale_output_factor: float = 1.0,
    ):
        super().__init__()
        self.spatial_norm = spatial_norm
        self.group_norm = group_norm
        self.atconv = atconv
        self.dropout = nn.Dropout(dropout)
        self.residual_connection = residual_connection
        self.rescale_output_factor = rescale_output_factor
        self.grid: tuple[int, int] | None = None

    @classmethod
    def replacing(cls, attn: Attention, init: str = "fresh", mixer: MixerSpec = MixerSpec()) -> "ATConvAttention":
        """A layer that can take ``attn``'s place (same widths, same norm module, same output handling),
        with ``mixer``'s ATConv settings.

        ``init="fresh"``: DiT initialisation (xavier-uniform weights, zero biases). ``"from_attention"``:
        ``x_proj`` and ``proj`` start as the attention's value and output projections (zero bias where
        it had none), the kernel generator fresh. ``difference_control`` starts at 0 either way.
        """
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        # Biases always: from_attention needs somewhere to put to_v's / to_out's, and DiT/SiT use them.
        atconv = ATConv(attn.query_dim, inner_dim=attn.inner_dim, out_dim=attn.out_dim, bias=True, **mixer.atconv_kwargs())
        for layer in (atconv.kernel_proj, atconv.kernel_gen, atconv.x_proj, atconv.proj):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        atconv.to(device=attn.to_v.weight.device, dtype=attn.to_v.weight.dtype)
        if init == "from_attention":
            init_atconv_from_attention_(atconv, attn)
        return cls(
            atconv,
            group_norm=attn.group_norm,
            spatial_norm=attn.spatial_norm,
            dropout=attn.dropout,
            residual_connection=attn.residual_connection,
            rescale_output_factor=attn.rescale_output_factor,
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **cross_attention_kwargs,
    ) -> torch.Tensor:
        """``Attention.forward``'s call. ``cross_attention_kwargs`` configure attention processors
        (LoRA scale, IP-adapter masks, ...); ATConv has no processor and ignores them."""
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(
                "ATConvAttention replaces self-attention and takes no encoder_hidden_states or attention_mask; "
                "cross-attention layers must stay attention"
            )
        residual = hidden_states
        if self.spatial_norm is not None:
            hidden_states = self.spatial_norm(hidden_states, temb)
        if hidden_states.ndim == 4:  # UNet attention blocks: a (B, C, H, W) feature map
            if self.group_norm is not None:
                hidden_states = self.group_norm(hidden_states)
            out = self.atconv(hidden_states)
        else:
            if self.group_norm is not None:
                hidden_states = self.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
            out = self.atconv(hidden_states, self.token_grid(hidden_states.shape[1]))
        out = self.dropout(out)
        if self.residual_connection:
            out = out + residual
        return out / self.rescale_output_factor

    def token_grid(self, num_tokens: int) -> tuple[int, int]:
        """The (H, W) of ``num_tokens`` raster-ordered tokens: the grid the enclosing model set, else a square."""
        if self.grid is not None and self.grid[0] * self.grid[1] == num_tokens:
            return self.grid
        side = math.isqrt(num_tokens)
        if side * side != num_tokens:
            raise ValueError(
                f"ATConvAttention got {num_tokens} tokens, which is not a square, and knows no (H, W) grid for them: "
                f"call it through its Transformer2DModel / DiTTransformer2DModel (which sets the grid) or set "
                f"layer.grid = (H, W) first"
            )
        return side, side


# ------------------------------------------------------------------------------------------------
# Finding and replacing self-attention
# ------------------------------------------------------------------------------------------------


def is_self_attention(attn: Attention) -> bool:
    """Plain self-attention: keys and values come from the same tokens as the queries."""
    return not attn.is_cross_attention and attn.added_kv_proj_dim is None and attn.to_v is not None


def self_attention_layers(model: nn.Module) -> list[tuple[nn.Module, str, Attention]]:
    """``(parent, child name, layer)`` of each self-attention layer ATConv can replace, in module order.

    These are the UNet attention blocks (the ``Attention`` modules in a block's ``attentions`` list,
    on feature maps) and ``attn1`` of ``BasicTransformerBlock`` (tokens of a 2D grid). Self-attention
    elsewhere (e.g. GLIGEN's fuser, which mixes image and object tokens) has no image grid to
    convolve over and is left alone.
    """
    found = []
    for parent_name, parent in model.named_modules():
        for name, child in parent.named_children():
            if not (isinstance(child, Attention) and is_self_attention(child)):
                continue
            in_unet_block = isinstance(parent, nn.ModuleList) and parent_name.rsplit(".", 1)[-1] == "attentions"
            in_transformer_block = isinstance(parent, BasicTransformerBlock) and name == "attn1"
            if in_unet_block or in_transformer_block:
                found.append((parent, name, child))
    return found


def record_token_grid(container: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of a ``TOKEN_GRID_CONTAINERS`` module: tell its ATConv layers the token grid.

    Reads everything from ``container`` (not a closure), so deep copies of a model hook their own
    layers. The grid stays set after the forward, which is what gradient checkpointing's
    recomputation in the backward pass needs.
    """
    sample = args[0] if args else kwargs.get("hidden_states")
    if sample is None or sample.ndim != 4:  # Transformer2DModel's discrete (token id) input has no grid
        return
    patch = container.config.patch_size or 1
    grid = (sample.shape[-2] // patch, sample.shape[-1] // patch)
    for module in container.modules():
        if isinstance(module, ATConvAttention):
            module.grid = grid


def replace_self_attention(model: nn.Module, mixer: MixerSpec, *, init: str) -> None:
    """Give ``model``'s self-attention layers the mixers ``mixer`` names (hybrid: attention, ATConv,
    attention, ... in module order) and hook the token grid in. Builds every replacement before
    installing any, so bad arguments leave the model untouched."""
    layers = self_attention_layers(model)
    replacements = [
        (parent, name, ATConvAttention.replacing(attn, init, mixer))
        for (parent, name, attn), kind in zip(layers, mixer.layer_kinds(len(layers)))
        if kind == "atconv"
    ]
    for parent, name, layer in replacements:
        setattr(parent, name, layer)
    containers = [m for m in model.modules() if isinstance(m, TOKEN_GRID_CONTAINERS)]
    for container in containers:
        if any(isinstance(m, ATConvAttention) for m in container.modules()):
            container.register_forward_pre_hook(record_token_grid, with_kwargs=True)


# ------------------------------------------------------------------------------------------------
# Public entry point and the persistent classes
# ------------------------------------------------------------------------------------------------


def swap_attention(model: ModelMixin, init: str = "fresh", mixer: MixerSpec | None = None, **mixer_keys) -> ModelMixin:
    """Replace the self-attention layers of a diffusers model with ATConv, in place; returns the model.

    Supports ``UNet2DModel``, ``UNet2DConditionModel`` (``attn1``; cross-attention ``attn2`` stays)
    and ``DiTTransformer2DModel``. The model becomes the matching ``Mixer*`` class, with the keyword
    arguments recorded in its config, so ``save_pretrained`` / ``from_pretrained`` round-trip it.

    Args:
        init: ``"fresh"`` (DiT initialisation) or ``"from_attention"`` (``x_proj``/``proj`` start as
            the attention's value/output projections; the kernel generator starts fresh).
        mixer: which layers become ATConv, with which settings (``MixerSpec``; ``token_mixer="atconv"``
            swaps every self-attention layer, ``"hybrid"`` every second one, ``"attention"`` none: an
            attention baseline of the same class). Default ``MixerSpec()``: every layer, kernel 3.
        mixer_keys: ``MixerSpec``'s fields instead of ``mixer``, e.g. ``token_mixer="hybrid", atconv_kernel_size=5``.
    """
    mixer_class = mixer_class_for(model)
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if mixer is not None and mixer_keys:
        raise TypeError(f"pass a MixerSpec or its fields ({', '.join(mixer_keys)}) as keywords, not both")
    mixer = mixer if mixer is not None else MixerSpec(**mixer_keys)
    if any(isinstance(m, ATConvAttention) for m in model.modules()):
        raise ValueError(f"this {type(model).__name__} already has ATConv layers; swap a model that has only attention")
    if not self_attention_layers(model):
        raise ValueError(f"this {type(model).__name__} has no self-attention layers to swap")
    replace_self_attention(model, mixer, init=init)
    realign_cpu_tensors_(model)  # so a reload (aligned, see there) computes exactly what this model does
    model.__class__ = mixer_class
    model.register_to_config(**mixer.config())
    if "_class_name" in model.config:  # set when the model came from from_pretrained
        model.register_to_config(_class_name=mixer_class.__name__)
    return model


# The config keys a Mixer* class adds to its diffusers class: MixerSpec's fields, with its defaults.
MIXER_CONFIG_PARAMETERS = [
    inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
    for f in dataclasses.fields(MixerSpec)
]


class MixerModelMixin(AtdiffModelMixin):
    """Makes ``class MixerX(MixerModelMixin, X)`` a diffusers model ``X`` whose self-attention layers
    are picked by config: it takes every argument of ``X`` plus ``MIXER_CONFIG_PARAMETERS`` and swaps
    in ``__init__`` (fresh init), so ``from_config``/``from_pretrained`` rebuild swapped models."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        base = next(c for c in cls.__mro__ if issubclass(c, ModelMixin) and not issubclass(c, MixerModelMixin))

        # ConfigMixin learns a class's config keys from its __init__ signature (from_config passes
        # only those), so the signature must spell out the base class's arguments and the mixer keys.
        def __init__(self, *args, **kwargs):
            MixerModelMixin.__init__(self, *args, **kwargs)

        __init__.__signature__ = signature_with_mixer_keys(base)
        __init__.__qualname__ = f"{cls.__qualname__}.__init__"
        __init__.__doc__ = f"``{base.__name__}``'s arguments plus ``{', '.join(MIXER_KEYS)}`` (a ``MixerSpec``)."
        cls.__init__ = register_to_config(__init__)

    def __init__(self, *args, **kwargs):
        mixer = MixerSpec(**{key: kwargs.pop(key) for key in MIXER_KEYS if key in kwargs})
        super().__init__(*args, **kwargs)
        replace_self_attention(self, mixer, init="fresh")


def signature_with_mixer_keys(base: type) -> inspect.Signature:
    params = list(inspect.signature(base.__init__).parameters.values())
    var_keyword = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]  # must stay last
    named = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
    return inspect.Signature(named + MIXER_CONFIG_PARAMETERS + var_keyword)


class MixerUNet2DModel(MixerModelMixin, UNet2DModel):
    """``UNet2DModel`` whose attention blocks use ATConv (default), attention or both (``hybrid``),
    chosen by the ``token_mixer`` config key."""


class MixerUNet2DConditionModel(MixerModelMixin, UNet2DConditionModel):
    """``UNet2DConditionModel`` whose self-attention (``attn1``) is ATConv, attention or both; the
    cross-attention to the text/condition tokens stays attention."""


class MixerDiTTransformer2DModel(MixerModelMixin, DiTTransformer2DModel):
    """diffusers' ``DiTTransformer2DModel`` whose self-attention is ATConv, attention or both.

    The sin-cos position embedding is kept (unlike ``atdiff.DiTModel`` with pure ATConv), so
    pretrained weights keep meaning what they meant."""


MIXER_CLASSES: dict[type, type] = {
    UNet2DModel: MixerUNet2DModel,
    UNet2DConditionModel: MixerUNet2DConditionModel,
    DiTTransformer2DModel: MixerDiTTransformer2DModel,
}


def mixer_class_for(model: nn.Module) -> type:
    """The ``Mixer*`` class a model of this type becomes; a clear error for unsupported types."""
    cls = type(model)
    if cls in MIXER_CLASSES.values():
        return cls
    if cls not in MIXER_CLASSES:
        supported = ", ".join(c.__name__ for c in MIXER_CLASSES)
        raise TypeError(f"swap_attention supports {supported} (and their Mixer* classes), not {cls.__name__}")
    return MIXER_CLASSES[cls]
