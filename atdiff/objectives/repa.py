"""REPA (Yu et al., ICLR 2025): representation alignment as a term added to any objective.

The hidden states after block ``depth`` of a diffusion transformer, put through a trained MLP
projector, are pulled towards the patch features a frozen pretrained vision encoder (DINOv2) sees
in the clean image: ``coeff * mean_batch mean_patches(-cos(projector(h), features))`` is added to
the wrapped objective's loss. The projector trains with the model (the loop optimises and
checkpoints ``trained_module``) and is no part of the network, so sampling pipelines never hold it.

The hidden state is read by a forward hook on the bare network's block, so the network keeps its
signature and DDP (which calls the bare module) or gradient checkpointing (non-reentrant: the
block's output is the one the rest of the forward uses) change nothing. The encoder sees the
clean pixels: ``x0`` itself, or for latent data the images the latents came from, mirrored alike
(``atdiff.latents.LatentDataset``), resized so that its patch grid is the model's token grid.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError, one_line
from .base import Objective

# transformers model types whose last_hidden_state is [class token, register tokens, patch tokens],
# layer-normed: DINOv2's normalised patch tokens, REPA's targets.
ENCODER_TYPES = ("dinov2", "dinov2_with_registers")


def load_encoder(source: str | os.PathLike) -> nn.Module:
    """A DINOv2 encoder from a hub id (``facebook/dinov2-base``) or a local folder, from safetensors
    only, frozen, in eval mode; one line naming ``objective.repa_encoder`` when it does not load."""
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModel

    folder = Path(source).expanduser()
    if (folder.is_absolute() or str(source).startswith((".", "~"))) and not folder.is_dir():  # a path, not a hub id
        raise UsageError(f"objective.repa_encoder: no such folder {source}; pass a folder written by save_pretrained or a hub id such as facebook/dinov2-base")
    try:
        kind = AutoConfig.from_pretrained(source).model_type
        encoder = AutoModel.from_pretrained(source, use_safetensors=True) if kind in ENCODER_TYPES else None
    except (OSError, ValueError, SafetensorError) as err:  # no such hub id, offline, no or damaged safetensors weights
        raise UsageError(
            f"objective.repa_encoder: cannot load a DINOv2 encoder from {source} ({one_line(str(err)).rstrip('.')}); pass a "
            f"folder written by save_pretrained (with model.safetensors) or a hub id such as facebook/dinov2-base (needs internet once)"
        ) from None
    if encoder is None:
        raise UsageError(f"objective.repa_encoder: {source} is a {kind} model; REPA here takes DINOv2 encoders "
                         f"(facebook/dinov2-small, -base, -large, -giant, or a folder of one)")
    return encoder.eval().requires_grad_(False)


def check_repa_fits(depth: int, model_type: str, model: Mapping[str, Any]) -> None:
    """REPA aligns the hidden states after block ``depth`` of a DiT (``model``: its resolved arguments;
    the encoder itself loads when training starts)."""
    if model_type != "dit":
        raise UsageError(f"objective.repa_encoder: REPA is not supported on model.type {model_type} (it aligns a DiT's "
                         f"token states with the encoder's patches); use model.type dit or drop objective.repa_encoder")
    if depth > model["depth"]:
        raise UsageError(f"objective.repa_encoder_depth={depth} is beyond the model's {model['depth']} blocks; "
                         f"use 1 to {model['depth']} (REPA: 8 of SiT-XL's 28)")


def encoder_input(images: torch.Tensor, grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """Images in [-1, 1] -> the encoder's input, as REPA makes it: [0, 1], ImageNet mean/std, then a
    bicubic resize to ``grid`` patches (16 x 16 patches of 14 px = 224 px for SiT-XL/2 at 256 px).
    Grey images are repeated to RGB."""
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    images = images.float().expand(-1, 3, -1, -1) if images.shape[1] == 1 else images.float()
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD, device=images.device).view(1, 3, 1, 1)
    normalised = ((images + 1) / 2 - mean) / std
    return F.interpolate(normalised, size=(grid[0] * patch_size, grid[1] * patch_size), mode="bicubic")


def alignment_loss(projected: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """``mean_batch mean_patches(-cos(projected, features))`` for (B, N, D) tensors."""
    return -F.cosine_similarity(projected.float(), features.float(), dim=-1).mean()


def projector(hidden_size: int, projector_dim: int, feature_dim: int) -> nn.Sequential:
    """REPA's 3-layer MLP, applied per token."""
    return nn.Sequential(
        nn.Linear(hidden_size, projector_dim), nn.SiLU(),
        nn.Linear(projector_dim, projector_dim), nn.SiLU(),
        nn.Linear(projector_dim, feature_dim),
    )


class RepresentationAlignment(Objective):
    """``objective``'s loss plus ``coeff`` times the alignment of block ``depth``'s hidden states
    with ``encoder``'s patch features. Sampling is ``objective``'s own.

    ``load`` loads the encoder (atdiff train calls it before the run folder exists, so a bad one
    writes nothing); ``prepare`` builds the projector on the network's width and hooks its block.
    """

    needs_pixels = True

    def __init__(self, objective: Objective, encoder: str, depth: int = 8, coeff: float = 0.5, projector_dim: int = 2048):
        self.objective, self.encoder_source, self.depth, self.coeff, self.projector_dim = objective, encoder, depth, coeff, projector_dim
        self.encoder: nn.Module | None = None
        self.projector: nn.Module | None = None  # as the accelerator prepared it (DDP: its gradients are averaged)
        self.bare_projector: nn.Module | None = None
        self.grid: tuple[int, int] | None = None
        self.autocast: Callable = nullcontext
        self.hidden: torch.Tensor | None = None
        self.capturing = False

    def make_scheduler(self):
        return self.objective.make_scheduler()

    def training_inputs(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.objective.training_inputs(x0)

    def load(self) -> None:
        if self.encoder is None:
            self.encoder = load_encoder(self.encoder_source)

    def prepare(self, accelerator, network: nn.Module) -> None:
        """Called under the model's seed, so every process starts with the same projector."""
        self.objective.prepare(accelerator, network)
        self.load()
        blocks = getattr(network, "blocks", None)
        if not isinstance(blocks, nn.ModuleList) or not hasattr(network, "grid"):  # config checks refuse this first
            raise UsageError(f"objective.repa_encoder: REPA needs a DiT (model.type dit), not a {type(network).__name__}")
        blocks[self.depth - 1].register_forward_hook(self.capture)
        self.grid = tuple(network.grid)
        self.bare_projector = projector(network.config.hidden_size, self.projector_dim, self.encoder.config.hidden_size)
        self.projector = accelerator.prepare_model(self.bare_projector)
        self.encoder.to(accelerator.device)
        self.autocast = accelerator.autocast

    def trained_module(self) -> nn.Module | None:
        return self.bare_projector

    def capture(self, module: nn.Module, inputs, output: torch.Tensor) -> None:
        # Only inside ``loss``: not in sampling, nor when gradient checkpointing reruns the block in backward.
        if self.capturing:
            self.hidden = output

    @contextmanager
    def hidden_state(self):
        self.capturing, self.hidden = True, None
        try:
            yield
        finally:
            self.capturing = False

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The encoder's normalised patch tokens (B, N, D) of images in [-1, 1]."""
        skip = 1 + getattr(self.encoder.config, "num_register_tokens", 0)  # the class token, any registers
        with torch.no_grad(), self.autocast():
            pixels = encoder_input(images, self.grid, self.encoder.config.patch_size)
            return self.encoder(pixel_values=pixels).last_hidden_state[:, skip:]

    def loss(self, model, x0: torch.Tensor, class_labels: torch.Tensor | None = None, images: torch.Tensor | None = None) -> torch.Tensor:
        """``images``: the pixels ``x0`` encodes when it is a latent; None: ``x0`` is the image."""
        with self.hidden_state():
            denoising = self.objective.loss(model, x0, class_labels)
        hidden, self.hidden = self.hidden, None
        if hidden is None:
            raise RuntimeError(f"REPA: block {self.depth} did not run in the model's forward")
        target = self.features(x0 if images is None else images)
        return denoising + self.coeff * alignment_loss(self.projector(hidden), target)
