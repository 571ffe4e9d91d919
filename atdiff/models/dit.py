"""DiT/SiT-style class-conditional diffusion transformer with a switchable token mixer.

Follows Peebles & Xie's DiT (and SiT, which shares the network): patchify, adaLN-Zero blocks
conditioned on timestep + class, label dropout for classifier-free guidance, optional learned
sigma. ``token_mixer`` picks self-attention, ATConv (no absolute position embedding: the
convolution carries position, as the ATConv authors do) or a hybrid that alternates the two and
keeps the position embedding.

Written as our own ModelMixin rather than a subclass of diffusers' ``DiTTransformer2DModel``:
that class gives every block its own timestep/label embedder (far more parameters than DiT) and
hard-wires attention inside ``BasicTransformerBlock``.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import (
    LabelEmbedding,
    PatchEmbed,
    TimestepEmbedding,
    Timesteps,
    get_2d_sincos_pos_embed_from_grid,
)
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..nn.mixer import MixerSpec
from .common import AtdiffModelMixin

# Widths of the published DiT/SiT sizes, plus CPU-sized ones for Fashion-MNIST-scale work.
DIT_SIZES: dict[str, dict[str, int]] = {
    "XS": dict(hidden_size=96, depth=4, num_heads=3),
    "T": dict(hidden_size=192, depth=6, num_heads=3),
    "S": dict(hidden_size=384, depth=12, num_heads=6),
    "B": dict(hidden_size=768, depth=12, num_heads=12),
    "L": dict(hidden_size=1024, depth=24, num_heads=16),
    "XL": dict(hidden_size=1152, depth=28, num_heads=16),
}
PATCH_SIZES = (2, 4, 8)

# How the network reads its timestep and what its output means (see DiTModel).
TIME_CONVENTIONS = ("atdiff", "sit")
SIT_TIMESTEPS = 1000  # atdiff's flow timestep is 1000 * sigma (objective.num_train_timesteps)


def dit_size(name: str) -> dict[str, int]:
    """Config kwargs for a DiT size name such as ``"S/2"`` or ``"T/4"``."""
    size, _, patch = name.upper().partition("/")
    if size not in DIT_SIZES or not patch.isdigit() or int(patch) not in PATCH_SIZES:
        raise ValueError(f"unknown DiT size {name!r}; use SIZE/PATCH with SIZE in {list(DIT_SIZES)} and PATCH in {PATCH_SIZES}")
    return dict(DIT_SIZES[size], patch_size=int(patch))


def sincos_position_table(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """MAE/DiT 2-D sin-cos table (1, H*W, dim) with integer positions on both axes.

    diffusers' ``PatchEmbed`` stretches non-square grids onto a square base size; this keeps
    DiT's table for square grids and unit spacing for non-square ones.
    """
    h, w = grid
    coords = torch.meshgrid(torch.arange(w, dtype=torch.float32), torch.arange(h, dtype=torch.float32), indexing="xy")
    return get_2d_sincos_pos_embed_from_grid(dim, torch.stack(coords), output_type="pt").float().unsqueeze(0)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# ------------------------------------------------------------------------------------------------
# Blocks
# ------------------------------------------------------------------------------------------------


class FeedForward(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """adaLN-Zero block: only ``mixer`` differs between attention and ATConv models."""

    def __init__(self, dim: int, mixer: nn.Module, mlp_ratio: float, mlp_norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mixer = mixer
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=mlp_norm_eps)
        self.mlp = FeedForward(dim, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1.unsqueeze(1) * self.mixer(modulate(self.norm1(x), shift1, scale1), grid)
        x = x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------


def check_arguments(*, num_classes: int, class_dropout_prob: float, mlp_ratio: float, **widths: int) -> None:
    """ValueError naming the first out-of-range argument; without it a bad width surfaces as a shape
    error deep inside torch (or a division by zero) that names no argument."""
    for name, value in widths.items():
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if not mlp_ratio > 0:
        raise ValueError(f"mlp_ratio must be positive, got {mlp_ratio}")
    if num_classes < 0:
        raise ValueError(f"num_classes must be 0 (unconditional) or more, got {num_classes}")
    if not 0 <= class_dropout_prob <= 1:
        raise ValueError(f"class_dropout_prob must be in [0, 1], got {class_dropout_prob}")



class DiTModel(AtdiffModelMixin, ModelMixin, ConfigMixin):
    """Class-conditional (or unconditional, ``num_classes=0``) DiT with a switchable token mixer.

    ``forward(sample, timestep, class_labels)`` returns the noise/velocity prediction with
    ``out_channels`` = ``in_channels`` (the learned-sigma channels, if any, follow in channels
    ``in_channels:``). ``class_labels == num_classes`` is the null label used for guidance.
    ``token_mixer`` and ``atconv_*`` are the fields of the blocks' ``atdiff.nn.MixerSpec`` (here with
    attention by default).

    Constants that differ between the upstream codebases, so that their weights compute here what
    they computed there (``atdiff import`` sets them; the defaults are DiT's):

    - ``time_convention``: ``"atdiff"`` feeds ``timestep`` to the embedder as is and returns the
      prediction as is (DDPM's epsilon, or the flow velocity noise - data at timestep 1000 * sigma).
      ``"sit"``: the network is a SiT one, trained on t = 1 - sigma in [0, 1] (t = 1 is data) to
      predict data - noise; it is fed ``1 - timestep / 1000`` and its output negated, so it plugs
      into atdiff's flow-matching objective and schedulers unchanged.
    - ``timestep_freq_shift``: ``downscale_freq_shift`` of the sinusoidal timestep embedding (DiT/SiT
      0, diffusers' ``DiTTransformer2DModel`` 1).
    - ``mlp_norm_eps``: epsilon of the LayerNorm before each MLP (DiT/SiT 1e-6, diffusers 1e-5).
    """

    # diffusers' API: model.enable_gradient_checkpointing() recomputes each block in the backward pass.
    _supports_gradient_checkpointing = True
    # Units that are never split: Accelerate's FSDP TRANSFORMER_BASED_WRAP shards each block on its own.
    _no_split_modules = ["DiTBlock"]

    @register_to_config
    def __init__(
        self,
        sample_size: int | tuple[int, int] = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        class_dropout_prob: float = 0.1,
        learn_sigma: bool = True,
        token_mixer: str = "attention",
        atconv_kernel_size: int = MixerSpec.atconv_kernel_size,
        atconv_pooling: str = MixerSpec.atconv_pooling,
        atconv_inhibition: bool = MixerSpec.atconv_inhibition,
        time_convention: str = "atdiff",
        timestep_freq_shift: float = 0.0,
        mlp_norm_eps: float = 1e-6,
    ):
        super().__init__()
        if time_convention not in TIME_CONVENTIONS:
            raise ValueError(f"time_convention must be one of {TIME_CONVENTIONS}, got {time_convention!r}")
        height, width = (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
        check_arguments(
            sample_size=min(height, width), patch_size=patch_size, in_channels=in_channels, hidden_size=hidden_size,
            depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, num_classes=num_classes,
            class_dropout_prob=class_dropout_prob,
        )
        if height % patch_size or width % patch_size:
            raise ValueError(f"sample_size {height}x{width} is not divisible by patch_size {patch_size}")
        mixer = MixerSpec(token_mixer, atconv_kernel_size, atconv_pooling, atconv_inhibition)
        mixers = mixer.layer_kinds(depth)
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.grid = (height // patch_size, width // patch_size)

        # Any attention layer needs absolute positions; pure ATConv gets them from its convolution.
        use_pos_embed = "attention" in mixers
        # The sin-cos table is a non-persistent buffer: recomputed at load, never stored in weights.
        self.x_embedder = PatchEmbed(
            height, width, patch_size, in_channels, hidden_size, pos_embed_type="sincos" if use_pos_embed else None
        )
        if use_pos_embed:
            self.x_embedder.pos_embed = sincos_position_table(hidden_size, self.grid)
        self.t_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=timestep_freq_shift)
        self.t_embedder = TimestepEmbedding(256, hidden_size)
        self.y_embedder = LabelEmbedding(num_classes, hidden_size, class_dropout_prob) if num_classes > 0 else None

        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, mixer.layer(kind, hidden_size, num_heads), mlp_ratio, mlp_norm_eps) for kind in mixers
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.gradient_checkpointing = False
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT initialisation: xavier linears, zero-init adaLN and output (each block starts as identity)."""

        def basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(basic_init)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(self.t_embedder.linear_2.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) -> (B, C, H, W)."""
        p, (h, w) = self.config.patch_size, self.grid
        x = x.view(x.shape[0], h, w, p, p, self.out_channels)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], self.out_channels, h * p, w * p)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        expected = (self.in_channels, *(g * self.config.patch_size for g in self.grid))
        if tuple(sample.shape[1:]) != expected:
            raise ValueError(f"DiTModel expects samples of shape (B, {', '.join(map(str, expected))}), got {tuple(sample.shape)}")
        batch = sample.shape[0]
        timestep = torch.as_tensor(timestep, device=sample.device)
        timestep = timestep.expand(batch) if timestep.dim() == 0 else timestep
        sit = self.config.time_convention == "sit"
        if sit:  # SiT's time runs the other way: t = 1 - sigma
            timestep = 1 - timestep.float() / SIT_TIMESTEPS

        x = self.x_embedder(sample)
        c = self.t_embedder(self.t_proj(timestep).to(x.dtype))
        if self.y_embedder is not None:
            if class_labels is None:
                raise ValueError("this DiTModel is class-conditional: pass class_labels (num_classes is the null label)")
            c = c + self.y_embedder(class_labels)
        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, c, self.grid)
            else:
                x = block(x, c, self.grid)
        out = self.unpatchify(self.final_layer(x, c))
        if sit:  # SiT predicts data - noise, atdiff's flow noise - data
            out = -out
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)
