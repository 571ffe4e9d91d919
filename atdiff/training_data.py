"""What training reads for a ``data`` section: its images (``atdiff.data``) or, with ``data.vae``, their
latent store (``atdiff.latents``); the batch augmentation that goes with it; and the one check that
the model takes it.

Above both data modules, so that neither needs the other: a latent store is made from images, and
the choice between the two is made here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset

from .data import DataConfig, load_dataset, random_flip
from .errors import UsageError
from .latents import LatentDataset, load_vae, open_store

if TYPE_CHECKING:
    from diffusers import AutoencoderKL


def load_training_data(cfg: DataConfig, with_images: bool = False) -> tuple[Dataset, "AutoencoderKL | None"]:
    """What training reads: the images, or with ``cfg.vae`` their latent store and the VAE that decodes
    the samples; a missing store raises ``atdiff.latents.MissingLatents``. ``with_images``: a store's
    items carry the images their latents came from (for objectives that see pixels)."""
    if not cfg.vae:
        return load_dataset(cfg), None
    vae = load_vae(cfg.vae, cfg.vae_subfolder)
    return open_store(cfg, vae, with_images), vae


def batch_augmentation(dataset: Dataset, cfg: DataConfig) -> Callable[[torch.Tensor, torch.Tensor | None], tuple] | None:
    """What the training loop applies to each batch on the device, drawing from the global RNG it
    checkpoints: ``(x, images) -> (x, images)``, where ``images`` are the pixels of latent ``x`` (or
    None) and are mirrored alike. The dataset's own ``augment`` (a latent store samples its
    posteriors), else the random flip when ``cfg.random_flip``, else nothing (None)."""
    own = getattr(dataset, "augment", None)
    if own is not None:
        return own
    return flip_pixels if cfg.random_flip else None


def flip_pixels(images: torch.Tensor, pixels: None = None) -> tuple[torch.Tensor, None]:
    """``random_flip`` as a batch augmentation of pixel data (which has no separate pixels)."""
    return random_flip(images), None


def check_model_fits(model_config: Mapping[str, Any], data: DataConfig, dataset: Dataset | None = None) -> None:
    """The model takes what training feeds it: ``in_channels`` and ``sample_size`` of ``data``'s images,
    or with ``data.vae`` of its latents. The images' shape is known from the config, so a config is
    checked when it loads; the latents' only from the store (the VAE decides it), so a latent config
    is checked when training opens it (``dataset``: what ``load_training_data`` returned)."""
    if data.vae:
        if not isinstance(dataset, LatentDataset):
            return
        (channels, height, width), source, other_key = dataset.sample_shape, "the VAE's latents", {}
    else:
        channels, height, width = data.num_channels, data.resolution, data.resolution
        source, other_key = "data's images", {"in_channels": " (or data.channels)", "sample_size": " (or data.resolution)"}
    if model_config.get("in_channels") != channels:
        raise UsageError(f"model.in_channels is {model_config.get('in_channels')} but {source} have {channels} channels; "
                         f"set model.in_channels={channels}{other_key.get('in_channels', '')}")
    size = model_config.get("sample_size")
    if size is not None and tuple(size if not isinstance(size, int) else (size, size)) != (height, width):
        raise UsageError(f"model.sample_size is {size} but {source} are {height}x{width}; "
                         f"set model.sample_size={height}{other_key.get('sample_size', '')}")
