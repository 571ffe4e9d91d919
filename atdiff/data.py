"""Image datasets for training and FID: Fashion-MNIST (IDX files), MNIST, CIFAR-10, any ImageFolder.

The ``data`` config section (``DataConfig``), the pixel datasets it names and the shuffled batches
training draws from them. Latent stores of these images are ``atdiff.latents``; which of the two a
config trains on is ``atdiff.training_data``.

Every dataset yields ``(image, label)``: a float tensor in [-1, 1] of shape (C, R, R) and an int
class label. Images are deterministic functions of their index; the random flip is a batch op
(``random_flip``) that the training loop applies, so its randomness comes from the RNG the loop
checkpoints and a resumed run sees the same flips as one that never stopped.
"""

from __future__ import annotations

import gzip
import math
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal, get_args

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from accelerate import skip_first_batches
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .errors import UsageError
from .settings import APPLIED, REFUSED, SET, setting

DatasetName = Literal["fashion-mnist", "mnist", "cifar10", "imagefolder"]
DATASETS: tuple[str, ...] = get_args(DatasetName)
ResizeMode = Literal["pad", "center_crop", "adm_center_crop"]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
DOWNLOAD_DIR = "~/.cache/atdiff/datasets"  # where torchvision datasets are downloaded and cached
NATURAL_CHANNELS = {"fashion-mnist": 1, "mnist": 1, "cifar10": 3, "imagefolder": 3}
DATA_WHY = "the run resumes at its position in the data it trained on, which this key defines"
FOLDER_WHY = "another folder may hold other data, so the run's position in it would mean nothing (move the data back, or link it there)"


@dataclass
class DataConfig:
    """Which images, at what size. ``DataConfig(dataset=..., split=..., resolution=...)`` is enough."""

    dataset: DatasetName = setting("fashion-mnist", on_resume=REFUSED, why=DATA_WHY)
    split: Literal["train", "test"] = setting("train", on_resume=REFUSED, why=DATA_WHY)
    resolution: int = setting(32, on_resume=REFUSED, why=DATA_WHY, range="[1, inf)")
    # default: FASHION_MNIST_DIR, DOWNLOAD_DIR; required for imagefolder
    root: str | None = setting(None, on_resume=REFUSED, why=FOLDER_WHY)
    # default: the dataset's own (1 for the MNISTs, 3 otherwise)
    channels: int | None = setting(None, on_resume=REFUSED, why=DATA_WHY, choices=(1, 3), null="the dataset's own")
    # pad: keep the pixels, zero-pad (or center-crop) to the resolution (28 -> 32 for the MNISTs);
    # center_crop: scale the short side to the resolution, then center-crop;
    # adm_center_crop: ADM's (and DiT/SiT's) exact crop: box-halve while the short side is at least
    # twice the resolution, bicubic-resize it to the resolution, center-crop (PIL, as theirs).
    resize_mode: ResizeMode = setting("pad", on_resume=REFUSED, why=DATA_WHY)
    # horizontal; applied to batches by the training loop
    random_flip: bool = setting(False, on_resume=REFUSED, why="the flips draw from the RNG stream the checkpoint restores; another setting shifts every draw after it")
    # in-memory datasets need none; ImageFolder decodes files and wants some. The batches do not
    # depend on it (the order comes from the sampler's own generator).
    num_workers: int = setting(0, on_resume=APPLIED, range="[0, inf)")
    # Latent diffusion: a diffusers AutoencoderKL (folder or hub id); training then reads the latent
    # store `atdiff encode` writes (atdiff.latents), in latent_dir (default: under the cache dir).
    vae: str | None = setting(None, on_resume=REFUSED, why=DATA_WHY)
    vae_subfolder: str | None = setting(None, on_resume=REFUSED, why=DATA_WHY, applies_if=("vae", SET))
    latent_dir: str | None = setting(None, on_resume=REFUSED, why=FOLDER_WHY, applies_if=("vae", SET))

    @property
    def num_channels(self) -> int:
        return self.channels or NATURAL_CHANNELS[self.dataset]

    def check(self) -> None:
        """What this section's declarations cannot say on their own."""
        if self.dataset == "imagefolder" and not self.root:
            raise UsageError("data.root: imagefolder needs the folder that holds one subfolder of images per class")


# ------------------------------------------------------------------------------------------------
# Datasets
# ------------------------------------------------------------------------------------------------


class ImageTensorDataset(Dataset):
    """Images already at their final size, held in memory as uint8 (N, C, R, R)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str]):
        self.images, self.labels, self.classes = images, labels.long(), list(classes)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return to_unit_range(self.images[index]), int(self.labels[index])


def load_dataset(cfg: DataConfig) -> Dataset:
    """The dataset ``cfg`` names, preprocessed to (C, R, R) in [-1, 1]; ``.classes`` lists its labels."""
    if cfg.dataset not in DATASETS:
        raise UsageError(f"data.dataset: unknown dataset {cfg.dataset!r}; choose one of {list(DATASETS)}")
    if cfg.dataset == "imagefolder":
        return image_folder(cfg)
    images, labels, classes = {"fashion-mnist": fashion_mnist, "mnist": mnist, "cifar10": cifar10}[cfg.dataset](cfg)
    return ImageTensorDataset(fit_image(images, cfg), labels, classes)


def fit_image(images: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """uint8 (..., C, H, W) -> (..., cfg.num_channels, R, R), per ``cfg.resize_mode``."""
    if images.shape[-3] == 1 and cfg.num_channels == 3:
        images = TF.grayscale_to_rgb(images)
    elif images.shape[-3] == 3 and cfg.num_channels == 1:
        images = TF.rgb_to_grayscale(images)
    if cfg.resize_mode == "adm_center_crop":
        flat = images.reshape(-1, *images.shape[-3:])
        cropped = [TF.pil_to_tensor(adm_center_crop(TF.to_pil_image(image), cfg.resolution)) for image in flat]
        return torch.stack(cropped).reshape(*images.shape[:-2], cfg.resolution, cfg.resolution)
    if cfg.resize_mode == "center_crop":
        images = TF.resize(images, cfg.resolution, antialias=True)
    return TF.center_crop(images, [cfg.resolution, cfg.resolution])  # zero-pads what is smaller


def adm_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """ADM's ``center_crop_arr`` (guided-diffusion, used by DiT and SiT for ImageNet), in PIL as there,
    since FID against their reference batches depends on these exact pixels."""
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    left, top = (image.size[0] - resolution) // 2, (image.size[1] - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return images.float() / 127.5 - 1


def random_flip(images: torch.Tensor) -> torch.Tensor:
    """Mirror a random half of a batch (B, C, H, W) horizontally; draws from the device's global RNG."""
    flip = torch.rand(images.shape[0], device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


# ------------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------------

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def fashion_mnist(cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    root = Path(cfg.root or FASHION_MNIST_DIR).expanduser()
    prefix = "train" if cfg.split == "train" else "t10k"
    images_file, labels_file = find_idx(root, f"{prefix}-images-idx3-ubyte"), find_idx(root, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(images_file), read_idx(labels_file)
    if len(labels) != len(images):
        raise UsageError(f"{labels_file} has {len(labels)} labels for the {len(images)} images of {images_file}; use the files of one split")
    return images.unsqueeze(1), labels, FASHION_MNIST_CLASSES


def find_idx(root: Path, name: str) -> Path:
    for path in (root / f"{name}.gz", root / name):
        if path.is_file():
            return path
    raise UsageError(
        f"Fashion-MNIST not found: {root} has no {name}.gz (or {name}). Install it with "
        f"`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu, puts the four IDX files in "
        f"{FASHION_MNIST_DIR}) or set data.root to a folder holding the four IDX files."
    )


def read_idx(path: Path) -> torch.Tensor:
    """A uint8 IDX file (the MNIST format), gzipped or not. Our own reader because torchvision's
    (``read_sn3_pascalvincent_tensor``) only opens uncompressed files, and Debian ships them gzipped."""
    fix = "replace it with the original file"
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as file:
            data = file.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:  # a truncated or damaged download
        raise UsageError(f"{path} is not a readable gzip file ({err}); {fix}") from None
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":  # two zero bytes, then 8: unsigned bytes
        raise UsageError(f"{path} is not a uint8 IDX file; {fix}")
    offset = 4 + 4 * data[3]
    shape = [int.from_bytes(data[i : i + 4], "big") for i in range(4, offset, 4)]
    if len(data) < offset or len(data) - offset != math.prod(shape):
        raise UsageError(f"{path} is not a complete IDX file (its header promises {shape} bytes); {fix}")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=offset).view(shape)


def mnist(cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    from torchvision.datasets import MNIST

    ds = torchvision_dataset(MNIST, cfg)
    return ds.data.unsqueeze(1), ds.targets, ds.classes


def cifar10(cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    from torchvision.datasets import CIFAR10

    ds = torchvision_dataset(CIFAR10, cfg)
    return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets), ds.classes


def torchvision_dataset(cls: type, cfg: DataConfig):
    root = Path(cfg.root or DOWNLOAD_DIR).expanduser()
    if cfg.root and not root.is_dir():  # torchvision would create it (a mistyped path included) before failing
        raise UsageError(
            f"data.root {root} is not a folder; point it at the folder holding torchvision's {cls.__name__} "
            f"files, create it to download into it, or leave data.root unset ({DOWNLOAD_DIR})"
        )
    try:  # download=True only downloads what root does not already hold
        return cls(str(root), train=cfg.split == "train", download=True)
    except (OSError, RuntimeError) as err:  # URLError is an OSError; torchvision wraps failed mirrors in RuntimeError
        raise UsageError(
            f"{cfg.dataset} is not in {root} and downloading it failed ({type(err).__name__}: {err}). "
            f"Run once with internet access (torchvision caches it there), or copy torchvision's "
            f"{cls.__name__} folder from a machine that has it and set data.root to its parent."
        ) from err


class UnreadableImage(UsageError):
    """An image file that does not decode (truncated, not an image); the message names it."""

    @classmethod
    def from_loader(cls, err: "UnreadableImage") -> "UnreadableImage":
        # A DataLoader worker re-raises it as UnreadableImage("Caught ... Original Traceback ...: <message>");
        # the message is the text after the last "UnreadableImage: " (all of it when no worker ran).
        return cls(str(err).rstrip().rsplit(f"{cls.__name__}: ", 1)[-1])


def read_image(path: str | Path, mode: str) -> Image.Image:
    """The image file ``path``, decoded whole and converted to ``mode``; an ``UnreadableImage`` naming it
    when it does not decode (truncated, not an image: PIL raises OSError, SyntaxError or ValueError,
    and DecompressionBombError for one too large to be a real photo)."""
    try:
        with Image.open(path) as image:
            return image.convert(mode)  # convert decodes the whole file: a truncated one fails here
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise UnreadableImage(f"{path} is not a readable image ({err}); remove or replace it") from None


def image_loader(mode: str) -> Callable[[str], Image.Image]:
    """ImageFolder's loader: ``read_image`` to ``mode``."""
    return partial(read_image, mode=mode)


def image_folder(cfg: DataConfig) -> Dataset:
    """One class per subfolder (torchvision's ImageFolder). Images of any size are fit to the resolution
    per ``cfg.resize_mode``; a file that does not decode stops training with its path, when it is first read."""
    from torchvision.datasets import ImageFolder

    if cfg.root is None or not Path(cfg.root).expanduser().is_dir():
        raise UsageError(
            f"data.root: imagefolder needs a folder with one subfolder of images per class, got {cfg.root!r}"
        )

    def transform(image: Image.Image) -> torch.Tensor:
        if cfg.resize_mode == "adm_center_crop":  # on the PIL image: no round trip through a tensor
            return to_unit_range(TF.pil_to_tensor(adm_center_crop(image, cfg.resolution)))
        return to_unit_range(fit_image(TF.pil_to_tensor(image), cfg))

    loader = image_loader("L" if cfg.num_channels == 1 else "RGB")
    try:
        return ImageFolder(str(Path(cfg.root).expanduser()), transform=transform, loader=loader)
    except FileNotFoundError as err:
        raise UsageError(f"data.root: {err}") from err


# ------------------------------------------------------------------------------------------------
# Batches for training
# ------------------------------------------------------------------------------------------------


def batch_stream(
    dataset: Dataset,
    batch_size: int,
    *,
    seed: int,
    start: int = 0,
    num_workers: int = 0,
    num_replicas: int = 1,
    rank: int = 0,
    pin_memory: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled batches for process ``rank`` of ``num_replicas``, from batch number ``start``.

    The order is a pure function of (seed, epoch), as with DiT's DistributedSampler, so a resumed
    run starts at any batch without replaying the ones before, and loading never draws from the
    global RNG that the training loop checkpoints (the loader has its own generator).
    """
    sampler = DistributedSampler(dataset, num_replicas, rank, shuffle=True, seed=seed, drop_last=True)
    loader = DataLoader(
        dataset,
        batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )
    if len(loader) == 0:
        raise UsageError(
            f"the dataset has {len(dataset)} images, too few for one batch of {batch_size} on each of "
            f"{num_replicas} processes; lower training.batch_size"
        )
    epoch, skip = divmod(start, len(loader))
    while True:
        sampler.set_epoch(epoch)
        try:
            yield from skip_first_batches(loader, skip) if skip else loader
        except UnreadableImage as err:
            raise UnreadableImage.from_loader(err) from None
        epoch, skip = epoch + 1, 0
