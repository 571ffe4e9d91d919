"""Inputs that scale memory or disk, checked against an estimate of what they need before any work.

A batch of 100000000 images, a 4096-pixel model or 10^11 PNGs would otherwise reach the allocator
(a traceback deep in torch, or the OS killing the process without a word) or fill the disk hours
later. Each check names the input, the estimate and the limit. The estimates are lower bounds (the
widest single activation of one forward pass, one file-system block per PNG), so a refusal means
the work cannot fit; what passes may still be too big, and then fails as before.
"""

from __future__ import annotations

import math
import os
import resource
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil
import torch

from .errors import UsageError

FLOAT_BYTES = 4  # activations are float32 (mixed precision halves some of them: still a lower bound's order)
FILE_BLOCK = 4096  # the smallest space a file takes on common file systems (ext4, xfs, apfs)


def size_text(n: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 2**10:.1f} KiB"


def available_memory(device: torch.device) -> int:
    """Bytes this process can still allocate on ``device``: a GPU's free memory; on the CPU the
    system's available memory, within the process's address-space limit (``ulimit -v``)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    available = psutil.virtual_memory().available
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit != resource.RLIM_INFINITY:
        available = min(available, max(limit - psutil.Process().memory_info().vms, 0))
    return available


def check_memory(what: str, needed: float, device: torch.device | str, fix: str) -> None:
    device = torch.device(device)
    available = available_memory(device)
    if needed > available:
        raise UsageError(f"{what} needs at least {size_text(needed)} of memory, more than the "
                         f"{size_text(available)} available on {device}; {fix}")


def check_disk(what: str, needed: float, path: Path, fix: str) -> None:
    """``needed`` bytes must fit in the free space of the file system ``path`` (or its nearest existing parent) is on."""
    existing = next(p for p in [path, *path.absolute().parents] if p.exists())
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise UsageError(f"{what} needs at least {size_text(needed)} of disk, more than the {size_text(free)} free in {existing}; {fix}")


def png_folder_bytes(num_images: int) -> int:
    """A lower bound on the disk a folder of ``num_images`` PNGs takes: a file-system block each."""
    return num_images * FILE_BLOCK


def forward_bytes(model_config: Mapping[str, Any], batch: int) -> int:
    """A lower bound on the memory of one forward pass of ``batch`` inputs of a model with this config
    (``model/config.json``, or a config's resolved ``model`` section): the input and its widest single
    activation (a DiT's MLP over its tokens; a UNet's first block over its pixels)."""
    size = model_config.get("sample_size") or 0
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    pixels = height * width
    values = (model_config.get("in_channels") or 1) * pixels
    if "hidden_size" in model_config and model_config.get("patch_size"):  # DiT
        tokens = pixels // model_config["patch_size"] ** 2
        values += tokens * math.ceil(model_config["hidden_size"] * model_config.get("mlp_ratio", 4.0))
    elif model_config.get("block_out_channels"):  # UNet
        values += pixels * model_config["block_out_channels"][0]
    return batch * values * FLOAT_BYTES


def model_batch(images: int, guidance_scale: float) -> int:
    """Inputs per model call when sampling ``images`` at once: guidance calls the model on the conditional and unconditional halves."""
    return images * (1 if guidance_scale == 1 else 2)


def check_forward(what: str, model_config: Mapping[str, Any], batch: int, device: torch.device | str, fix: str) -> None:
    """Refuse a forward pass of ``batch`` inputs (``what``: the input that sets it) that cannot fit in ``device``'s memory."""
    check_memory(what, forward_bytes(model_config, batch), device, fix)


def default_device() -> torch.device:
    """Where this process will compute when nothing names a device: its GPU if it has one."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")
