"""ATConv (Attentive Convolution), Yu et al. 2025, arXiv 2510.20092.

A 3x3 convolution whose kernel is generated from the input (adaptive routing, like attention's
content-dependent weights) and made differential by subtracting a learned fraction of its mean
(lateral inhibition, like softmax's competition). Linear in the number of tokens.

Parameter names follow the authors' code so their checkpoints load 1:1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .functional import CONV_IMPLS, per_sample_depthwise_conv2d

POOLINGS = ("1d", "2d")
# "linear": nn.Linear projections (the authors' SiT integration); "conv1x1": 1x1 nn.Conv2d weights
# of shape (out, in, 1, 1) (the authors' ImageNet AttNet), so either file loads as is.
WEIGHT_LAYOUTS = ("linear", "conv1x1")
# GELU of the kernel generator: tanh approximation (SiT integration) or exact erf (AttNet).
ACTIVATIONS = {"gelu_tanh": "tanh", "gelu": "none"}


def resolve_grid(num_tokens: int, grid: tuple[int, int] | None) -> tuple[int, int]:
    """Return (H, W) for ``num_tokens`` raster-ordered tokens; square when ``grid`` is None."""
    if grid is None:
        side = math.isqrt(num_tokens)
        if side * side != num_tokens:
            raise ValueError(
                f"{num_tokens} tokens do not form a square grid; pass grid=(H, W) with H*W == {num_tokens}"
            )
        return side, side
    H, W = int(grid[0]), int(grid[1])
    if H * W != num_tokens:
        raise ValueError(f"grid {H}x{W} has H*W = {H * W} positions but the input has N = {num_tokens} tokens")
    return H, W


class ATConv(nn.Module):
    """Attentive convolution token mixer.

    Args:
        dim: input channels C.
        kernel_size: size k of the generated depthwise kernel (paper: 3).
        inner_dim: channels of the value path and generated kernels (default ``dim``); lets ATConv
            stand in for an attention layer whose inner width differs from its input width.
        out_dim: output channels (default ``dim``).
        bias: biases on the linear layers.
        pooling: ``"1d"`` pools the raster-flattened sequence to k*k bins (the authors' choice);
            ``"2d"`` pools the H x W grid to k x k, so each kernel tap sees its own image region.
        inhibition: subtract ``sigmoid(difference_control)`` times the kernel mean (paper: on).
        conv_impl: per-sample depthwise conv implementation (``"auto"`` picks the fastest measured
            for the device and grid size; see ``atdiff.nn.functional``).
        weight_layout: ``"linear"`` (``kernel_proj``, ``x_proj``, ``proj`` are ``nn.Linear``, as in the
            authors' SiT) or ``"conv1x1"`` (1x1 ``nn.Conv2d``, as in their ImageNet AttNet); the same
            computation either way, only the stored weight shapes differ.
        activation: ``"gelu_tanh"`` (the authors' SiT) or ``"gelu"`` (exact, their AttNet) in the
            kernel generator.

    Input: tokens ``(B, N, C)`` with ``grid=(H, W)`` (square if omitted), or a feature map
    ``(B, C, H, W)``. Output has the same layout, with ``out_dim`` channels.
    """

    def __init__(
        self,
        dim: int,
        kernel_size: int = 3,
        *,
        inner_dim: int | None = None,
        out_dim: int | None = None,
        bias: bool = True,
        pooling: str = "1d",
        inhibition: bool = True,
        conv_impl: str = "auto",
        weight_layout: str = "linear",
        activation: str = "gelu_tanh",
    ):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive (same-size output), got {kernel_size}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if conv_impl not in ("auto",) + CONV_IMPLS:
            raise ValueError(f"conv_impl must be one of {('auto',) + CONV_IMPLS}, got {conv_impl!r}")
        if weight_layout not in WEIGHT_LAYOUTS:
            raise ValueError(f"weight_layout must be one of {WEIGHT_LAYOUTS}, got {weight_layout!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
        inner_dim = inner_dim or dim
        out_dim = out_dim or dim
        self.dim, self.inner_dim, self.out_dim = dim, inner_dim, out_dim
        self.kernel_size = kernel_size
        self.pooling = pooling
        self.inhibition = inhibition
        self.conv_impl = conv_impl
        self.weight_layout = weight_layout
        self.activation = activation

        k2 = kernel_size * kernel_size
        self.kernel_proj = projection(dim, inner_dim, bias, weight_layout)
        self.kernel_gen = nn.Linear(k2, k2, bias=bias)
        self.x_proj = projection(dim, inner_dim, bias, weight_layout)
        self.proj = projection(inner_dim, out_dim, bias, weight_layout)
        # sigmoid(0) = 0.5: inhibition starts at half the kernel mean, as in the paper.
        self.difference_control = nn.Parameter(torch.zeros(inner_dim))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, inner_dim={self.inner_dim}, out_dim={self.out_dim}, kernel_size={self.kernel_size}, "
            f"pooling={self.pooling!r}, inhibition={self.inhibition}, conv_impl={self.conv_impl!r}, "
            f"weight_layout={self.weight_layout!r}, activation={self.activation!r}"
        )

    @staticmethod
    def no_weight_decay() -> set[str]:
        """Parameter names to exclude from weight decay (as the authors do)."""
        return {"difference_control"}

    # -- kernel generation ------------------------------------------------------------------------

    def pool(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """Average (B, N, C) tokens of an H x W grid down to (B, k*k, C) bins (per ``pooling``)."""
        k = self.kernel_size
        if self.pooling == "1d":
            pooled = F.adaptive_avg_pool1d(x.transpose(1, 2), k * k)  # (B, C, k*k)
        else:
            pooled = F.adaptive_avg_pool2d(x.transpose(1, 2).unflatten(2, (H, W)), k).flatten(2)
        return pooled.transpose(1, 2)

    def generate_kernels(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """Context-to-kernel plus lateral inhibition: (B, N, C) tokens -> (B, inner_dim, k, k).

        The authors project all N tokens with ``kernel_proj`` and then average-pool. Pooling is a
        mean and ``kernel_proj`` is affine, so pooling first and projecting k*k bins gives the same
        kernels while skipping an N x C x C matmul: a third of ATConv's multiply-adds.
        """
        B = x.shape[0]
        k = self.kernel_size
        context = project(self.kernel_proj, self.pool(x, H, W))  # (B, k*k, inner)
        context = F.gelu(context.transpose(1, 2), approximate=ACTIVATIONS[self.activation])
        kernels = self.kernel_gen(context)  # (B, inner, k*k)
        if self.inhibition:
            factor = torch.sigmoid(self.difference_control).to(kernels.dtype).unsqueeze(-1)
            kernels = kernels - factor * kernels.mean(dim=-1, keepdim=True)
        return kernels.view(B, self.inner_dim, k, k)

    # -- forward ----------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        if x.dim() == 4:  # feature map (B, C, H, W)
            if grid is not None:
                raise ValueError("grid is only for token input (B, N, C); a feature map carries its own H, W")
            H, W = x.shape[-2:]
            return self._forward_tokens(x.flatten(2).transpose(1, 2), H, W).transpose(1, 2).unflatten(2, (H, W))
        if x.dim() != 3:
            raise ValueError(f"ATConv takes tokens (B, N, C) or a feature map (B, C, H, W), got shape {tuple(x.shape)}")
        H, W = resolve_grid(x.shape[1], grid)
        return self._forward_tokens(x, H, W)

    def _forward_tokens(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, N, C = x.shape
        if C != self.dim:
            raise ValueError(f"ATConv(dim={self.dim}) got {C} input channels")
        kernels = self.generate_kernels(x, H, W)
        values = project(self.x_proj, x).view(B, H, W, self.inner_dim)
        mixed = per_sample_depthwise_conv2d(values, kernels, self.conv_impl)
        return project(self.proj, mixed.reshape(B, N, self.inner_dim))


def projection(in_dim: int, out_dim: int, bias: bool, weight_layout: str) -> nn.Module:
    """A channel projection stored as ``nn.Linear`` or, in AttNet's layout, as a 1x1 ``nn.Conv2d``."""
    if weight_layout == "conv1x1":
        return nn.Conv2d(in_dim, out_dim, kernel_size=1, bias=bias)
    return nn.Linear(in_dim, out_dim, bias=bias)


def project(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a ``projection`` to channels-last tokens (B, ..., C): a 1x1 conv is a linear map with its
    weight viewed as (out, in), and applying both as one ``F.linear`` keeps the two layouts bit-identical."""
    return F.linear(x, layer.weight.flatten(1), layer.bias)
