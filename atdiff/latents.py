"""Latent stores: a dataset's VAE posteriors on disk, written by ``atdiff encode``, read memory-mapped.

A store is a folder::

    manifest.json                  what was encoded, with which VAE, and whether it is complete
    shard-00000.latents.npy        float16 (n, 2, 2, C, h, w): [image, its mirror] x [posterior mean, std]
    shard-00000.labels.npy         int64 (n,) class labels
    ...

Every shard holds ``shard_size`` images (the last one the rest) and is written under a temporary
name and renamed, labels first, so a killed encode resumes at the first missing shard; a shard file
cut short otherwise (a partial copy) counts as missing too. Training opens shards with ``np.load(mmap_mode="r")``:
only the pages of the images a batch reads come into memory (ImageNet-256 is ~42 GB here).

Storing the posterior of the image and of its mirror, not one latent, lets training see a flip and a
fresh latent sample every epoch (``sample_latents``), as training on the images would: the VAE is not
flip-equivariant, so the mirror's latent is encoded, not the latent mirrored.

Made from the images of ``atdiff.data``; whether training reads a store or the images themselves
is ``atdiff.training_data``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .data import DataConfig, load_dataset
from .errors import UsageError, one_line
from .files import cache_dir, temp_path, write_atomic

MANIFEST = "manifest.json"
FORMAT = "atdiff-latent-store"
VERSION = 1
DTYPE = np.float16  # half the disk and page cache of float32; posteriors need no more precision
DEFAULT_SHARD_SIZE = 4096  # images per shard: 128 MiB at ImageNet-256 (32 KiB per image)


class MissingLatents(UsageError):
    """The latent store a config needs is absent or incomplete: run ``atdiff encode`` first."""

    def __init__(self, problem: str, encode_command: str = "atdiff encode --config CONFIG (the same config and overrides)"):
        self.problem = problem
        super().__init__(f"{problem}; run `{encode_command}` (under `accelerate launch` for several GPUs), then train again")


# ------------------------------------------------------------------------------------------------
# The VAE
# ------------------------------------------------------------------------------------------------


def load_vae(source: str | os.PathLike, subfolder: str | None = None, setting: str = "data.vae"):
    """The ``AutoencoderKL`` of a folder or hub id (``subfolder``: a pipeline's ``vae``), frozen, in eval
    mode; one line naming ``setting`` (the config key or flag that gave ``source``) when it does not load."""
    from diffusers import AutoencoderKL

    where = os.fspath(source) + (f" (subfolder {subfolder!r})" if subfolder else "")
    try:
        vae = AutoencoderKL.from_pretrained(source, subfolder=subfolder)
    except (OSError, ValueError) as err:  # no such folder/hub id, offline, not an AutoencoderKL
        reason = one_line(str(err)).rstrip(".")
        raise UsageError(
            f"{setting}: cannot load a diffusers AutoencoderKL from {where} ({reason}). Pass a folder written by "
            f"AutoencoderKL.save_pretrained or a hub id such as stabilityai/sd-vae-ft-ema (needs internet once)"
        ) from None
    return vae.eval().requires_grad_(False)


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 of a model's weights (names, dtypes, shapes, bytes), whatever file format they came from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def latent_shape(vae_config, resolution: int) -> tuple[int, int, int]:
    """(channels, height, width) of the latents of ``resolution``-pixel images."""
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    if resolution % factor:
        raise UsageError(f"data.resolution={resolution} is not a multiple of the VAE's downsampling factor {factor}")
    return vae_config["latent_channels"], resolution // factor, resolution // factor


# ------------------------------------------------------------------------------------------------
# What a store holds, and where it is
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoreSource:
    """Everything that decides a store's latents: the images and the VAE weights."""

    dataset: str
    split: str
    root: str | None
    resolution: int
    resize_mode: str
    channels: int
    vae_sha256: str

    @classmethod
    def of(cls, data: DataConfig, vae_sha256: str) -> "StoreSource":
        root = str(Path(data.root).expanduser().resolve()) if data.root else None
        return cls(data.dataset, data.split, root, data.resolution, data.resize_mode, data.num_channels, vae_sha256)

    def differences(self, other: "StoreSource") -> list[str]:
        """How ``other`` (a store's) differs from this (a config's), one phrase per key."""
        out = []
        for key, mine in asdict(self).items():
            theirs = getattr(other, key)
            if mine != theirs:
                if key == "vae_sha256":
                    out.append(f"other VAE weights (sha256 {theirs[:12]}..., data.vae has {mine[:12]}...)")
                else:
                    out.append(f"data.{key}={theirs!r} (config: {mine!r})")
        return out


def store_dir(data: DataConfig, source: StoreSource) -> Path:
    """``data.latent_dir``, else ``<cache>/latents/<dataset>-<split>-<res>px-<hash of source>``: one
    store per images+VAE, so changing either picks a new folder instead of mixing latents."""
    if data.latent_dir:
        return Path(data.latent_dir).expanduser()
    key = hashlib.sha256(json.dumps(asdict(source), sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / "latents" / f"{data.dataset}-{data.split}-{data.resolution}px-{key}"


def new_manifest(source: StoreSource, data: DataConfig, vae_config, count: int, shard_size: int, classes: list[str]) -> dict:
    """The manifest of a store yet to be encoded; ``vae_config`` is the VAE's diffusers config."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "complete": False,
        "source": asdict(source),
        "vae": {
            "name": data.vae,
            "subfolder": data.vae_subfolder,
            "scaling_factor": vae_config["scaling_factor"],
            "shift_factor": vae_config.get("shift_factor") or 0.0,
        },
        "count": count,
        "shard_size": shard_size,
        "num_shards": -(-count // shard_size),
        "latent_shape": list(latent_shape(vae_config, data.resolution)),
        "dtype": np.dtype(DTYPE).name,
        "layout": "latents (n, 2, 2, C, h, w): [image, mirrored image] x [posterior mean, posterior std]",
        "classes": list(classes),
    }


def read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise UsageError(f"{path} is not an atdiff latent store (version {VERSION}); point data.latent_dir elsewhere")
    return manifest


def write_manifest(folder: Path, manifest: dict) -> None:
    write_atomic(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def check_source(manifest: dict, source: StoreSource, folder: Path) -> None:
    """Refuse a store made from other images or another VAE, naming each difference."""
    differences = source.differences(StoreSource(**manifest["source"]))
    if differences:
        raise UsageError(
            f"the latent store {folder} was made with {'; '.join(differences)}. Use this config's own store "
            f"(unset data.latent_dir for the default) or another data.latent_dir"
        )


# ------------------------------------------------------------------------------------------------
# Shards
# ------------------------------------------------------------------------------------------------


def shard_paths(folder: Path, index: int) -> tuple[Path, Path]:
    """(latents, labels) of shard ``index``."""
    return folder / f"shard-{index:05d}.latents.npy", folder / f"shard-{index:05d}.labels.npy"


def shard_range(manifest: dict, index: int) -> range:
    """The dataset indices shard ``index`` holds."""
    start = index * manifest["shard_size"]
    return range(start, min(start + manifest["shard_size"], manifest["count"]))


def shard_done(folder: Path, manifest: dict, index: int) -> bool:
    """Both files of the shard are there, whole, with the shapes the manifest implies. Renames make a
    killed encode leave no partial shard, but a store copied in part or a full disk can."""
    count = len(shard_range(manifest, index))
    latents, labels = shard_paths(folder, index)
    return whole_npy(labels, (count,), np.int64) and whole_npy(latents, (count, 2, 2, *manifest["latent_shape"]), DTYPE)


def whole_npy(path: Path, shape: tuple[int, ...], dtype) -> bool:
    """``path`` is a ``.npy`` of this shape and dtype, no byte short: its header is read, not its data."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            stored_shape, fortran_order, stored_dtype = read_header(f)
            data_offset = f.tell()
    except (OSError, ValueError):
        return False
    expected_size = data_offset + int(np.prod(shape)) * np.dtype(dtype).itemsize
    return (stored_shape == tuple(shape) and stored_dtype == np.dtype(dtype) and not fortran_order
            and path.stat().st_size == expected_size)


def missing_shards(folder: Path, manifest: dict) -> list[int]:
    return [i for i in range(manifest["num_shards"]) if not shard_done(folder, manifest, i)]


class ShardWriter:
    """One shard, filled batch by batch into memory-mapped temporary files, renamed when ``close``d."""

    def __init__(self, folder: Path, manifest: dict, index: int):
        self.final = shard_paths(folder, index)
        self.partial = [temp_path(path) for path in self.final]
        count = len(shard_range(manifest, index))
        self.latents = np.lib.format.open_memmap(self.partial[0], "w+", DTYPE, (count, 2, 2, *manifest["latent_shape"]))
        self.labels = np.lib.format.open_memmap(self.partial[1], "w+", np.int64, (count,))
        self.filled = 0

    @property
    def full(self) -> bool:
        return self.filled == len(self.labels)

    def add(self, posteriors: torch.Tensor, labels: torch.Tensor) -> None:
        """Append a batch: posteriors (B, 2, 2, C, h, w), labels (B,)."""
        end = self.filled + len(labels)
        self.latents[self.filled : end] = posteriors.to("cpu", torch.float16).numpy()
        self.labels[self.filled : end] = labels.numpy()
        self.filled = end

    def close(self) -> None:
        if not self.full:
            raise RuntimeError(f"shard {self.final[0].name}: {self.filled} of {len(self.labels)} images written")
        for array in (self.labels, self.latents):
            array.flush()
        del self.latents, self.labels  # unmap before renaming
        for partial, final in zip(reversed(self.partial), reversed(self.final)):  # labels, then latents
            os.replace(partial, final)


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------


class LatentDataset(Dataset):
    """A complete store as a dataset of ``(posteriors, label)``: float16 (2, 2, C, h, w) per image;
    with ``images`` (the dataset the store was encoded from, in the same order) ``(posteriors, label,
    image)``, for objectives that see the pixels too (REPA).

    Shards are memory-mapped on first use in each process (DataLoader workers included: nothing
    mapped is pickled). ``augment`` turns a batch of posteriors into scaled latent samples.
    """

    def __init__(self, folder: Path, manifest: dict, random_flip: bool, images: Dataset | None = None):
        self.folder, self.manifest, self.images = Path(folder), manifest, images
        self.classes = manifest["classes"]
        self.sample_shape = tuple(manifest["latent_shape"])
        if images is not None and len(images) != len(self):
            raise UsageError(f"the latent store {folder} holds {len(self)} images but data now has {len(images)}; "
                             f"the encoder needs the images the latents came from: restore them or encode again into a new data.latent_dir")
        vae = manifest["vae"]
        self.augment = partial(
            sample_latents, flip=random_flip, scaling_factor=vae["scaling_factor"], shift_factor=vae["shift_factor"]
        )
        self._shards: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.manifest["count"]

    def __getitem__(self, index: int) -> tuple:
        shard, offset = divmod(index, self.manifest["shard_size"])
        latents, labels = self.shard(shard)
        item = torch.from_numpy(np.array(latents[offset])), int(labels[offset])
        if self.images is None:
            return item
        image, label = self.images[index]
        if label != item[1]:  # the store's order is the dataset's: another label means other images
            raise UsageError(f"image {index} of data has label {label} but its latent in {self.folder} has {item[1]}; "
                             f"the images changed since `atdiff encode`: encode again into a new data.latent_dir")
        return (*item, image)

    def shard(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if index not in self._shards:
            self._shards[index] = tuple(np.load(p, mmap_mode="r", allow_pickle=False) for p in shard_paths(self.folder, index))
        return self._shards[index]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_shards": {}}


def sample_latents(
    posteriors: torch.Tensor, images: torch.Tensor | None = None, *, flip: bool, scaling_factor: float, shift_factor: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Posteriors (B, 2, 2, C, h, w) -> (latents (B, C, h, w) as the model sees them, ``images``
    mirrored alike): the mirrored image's posterior for a random half of the batch (with ``flip``),
    one sample from it, shifted and scaled as diffusers' latent pipelines do. Draws from the device's
    global RNG (checkpointed by the training loop, so a resumed run draws the same)."""
    posteriors = posteriors.float()
    batch = torch.arange(len(posteriors), device=posteriors.device)
    mirrored = (torch.rand(len(posteriors), device=posteriors.device) < 0.5).long() if flip else torch.zeros_like(batch)
    mean, std = posteriors[batch, mirrored].unbind(1)
    if images is not None:
        images = torch.where(mirrored.bool()[:, None, None, None], images.flip(-1), images)
    return (mean + std * torch.randn_like(mean) - shift_factor) * scaling_factor, images


def open_store(data: DataConfig, vae, with_images: bool = False) -> LatentDataset:
    """The complete store of ``data`` encoded with ``vae``; ``MissingLatents`` when there is none yet.
    ``with_images``: its items carry the images they were encoded from (``data``'s, in store order)."""
    source = StoreSource.of(data, weights_sha256(vae))
    folder = store_dir(data, source)
    manifest = read_manifest(folder)
    if manifest is None:
        raise MissingLatents(f"no latent store for this config's data and VAE in {folder}")
    check_source(manifest, source, folder)
    missing = missing_shards(folder, manifest)
    if missing or not manifest["complete"]:
        raise MissingLatents(
            f"the latent store {folder} is incomplete ({manifest['num_shards'] - len(missing)} of "
            f"{manifest['num_shards']} shards encoded)"
        )
    return LatentDataset(folder, manifest, data.random_flip, load_dataset(data) if with_images else None)

