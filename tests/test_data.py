"""Datasets: Fashion-MNIST from its IDX files, preprocessing, ImageFolder, errors, the batch stream."""

from __future__ import annotations

import gzip
import io
import shutil
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
from PIL import Image

from assets import needs_fashion_mnist
from atdiff.data import (
    DATASETS,
    FASHION_MNIST_DIR,
    DataConfig,
    batch_stream,
    load_dataset,
    random_flip,
    read_idx,
)
from atdiff.errors import UsageError

@pytest.fixture(scope="module")
def fashion_test():
    return load_dataset(DataConfig(dataset="fashion-mnist", split="test", resolution=32))


def test_dataset_names():
    assert DATASETS == ("fashion-mnist", "mnist", "cifar10", "imagefolder")


@needs_fashion_mnist
def test_fashion_mnist_is_padded_to_32_in_unit_range(fashion_test):
    image, label = fashion_test[0]
    assert len(fashion_test) == 10_000 and len(fashion_test.classes) == 10
    assert image.shape == (1, 32, 32) and image.dtype == torch.float32 and isinstance(label, int)
    assert image.min() >= -1 and image.max() <= 1 and image.max() > 0.9
    # 28x28 pixels centred: a 2-pixel border of zeros, i.e. -1 after normalisation.
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (image[0][border] == -1).all()
    raw = read_idx(Path(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz"))
    torch.testing.assert_close(image[0, 2:30, 2:30], raw[0].float() / 127.5 - 1)
    labels = read_idx(Path(FASHION_MNIST_DIR, "t10k-labels-idx1-ubyte.gz"))
    assert label == labels[0] and sorted(labels.unique().tolist()) == list(range(10))


@needs_fashion_mnist
def test_center_crop_and_channels():
    dataset = load_dataset(DataConfig(dataset="fashion-mnist", split="test", resolution=16, resize_mode="center_crop", channels=3))
    image, _ = dataset[0]
    assert image.shape == (3, 16, 16)
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    assert (image > -1).sum() > 50  # scaled down, not cropped away


@needs_fashion_mnist
def test_any_folder_with_uncompressed_idx_files(tmp_path):
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        with gzip.open(Path(FASHION_MNIST_DIR, f"{name}.gz")) as src, open(tmp_path / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    dataset = load_dataset(DataConfig(dataset="fashion-mnist", split="test", resolution=28, root=str(tmp_path)))
    assert dataset[5][0].shape == (1, 28, 28)


def write_idx(path: Path, array: torch.Tensor) -> bytes:
    """``array`` (uint8) as an IDX file at ``path``, gzipped for a .gz name; returns the raw bytes."""
    data = bytes([0, 0, 8, array.dim()]) + b"".join(n.to_bytes(4, "big") for n in array.shape) + array.numpy().tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return data


IDX_DAMAGE = {
    "truncated gzip": ("train-images-idx3-ubyte.gz", lambda raw: gzip.compress(raw)[:60]),
    "gzip that is not": ("train-images-idx3-ubyte.gz", lambda raw: b"\x1f\x8b" + b"\x00" * 40),
    "truncated pixels": ("train-images-idx3-ubyte", lambda raw: raw[:-5]),
    "two bytes": ("train-images-idx3-ubyte", lambda raw: raw[:2]),
    "header only": ("train-images-idx3-ubyte", lambda raw: raw[:9]),
}


@pytest.mark.parametrize("damage", list(IDX_DAMAGE))
def test_a_damaged_idx_file_is_named(tmp_path, damage):
    name, damaged = IDX_DAMAGE[damage]
    raw = write_idx(tmp_path / "train-images-idx3-ubyte", torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8))
    (tmp_path / "train-images-idx3-ubyte").unlink()
    (tmp_path / name).write_bytes(damaged(raw))
    write_idx(tmp_path / "train-labels-idx1-ubyte", torch.tensor([0, 1, 2], dtype=torch.uint8))
    with pytest.raises(UsageError, match=f"{tmp_path / name} is not"):
        load_dataset(DataConfig(dataset="fashion-mnist", root=str(tmp_path)))


def test_labels_that_do_not_match_the_images_are_named(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", torch.zeros(3, 28, 28, dtype=torch.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", torch.tensor([0, 1], dtype=torch.uint8))
    with pytest.raises(UsageError, match="train-labels-idx1-ubyte.gz has 2 labels for the 3 images"):
        load_dataset(DataConfig(dataset="fashion-mnist", root=str(tmp_path)))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", torch.tensor([0, 1, 2], dtype=torch.uint8))
    assert len(load_dataset(DataConfig(dataset="fashion-mnist", root=str(tmp_path)))) == 3


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
    with pytest.raises(UsageError, match="apt-get install dataset-fashion-mnist"):
        load_dataset(DataConfig(dataset="fashion-mnist", root=str(tmp_path)))


def test_download_failure_is_a_clear_error(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(UsageError, match=r"cifar10 is not in .* downloading it failed.*internet"):
        load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path)))


def test_a_data_root_that_is_no_folder_is_refused_before_torchvision_creates_it(tmp_path, monkeypatch):
    import torchvision.datasets

    def downloading(root, **kwargs):  # what torchvision does first with download=True
        Path(root).mkdir(parents=True, exist_ok=True)
        raise URLError("offline")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", downloading)
    typo = tmp_path / "datsets"
    with pytest.raises(UsageError, match=r"data.root .*datsets is not a folder"):
        load_dataset(DataConfig(dataset="cifar10", root=str(typo)))
    assert not typo.exists()


def test_image_folder(tmp_path):
    colours = {"blue": (0, 0, 255), "red": (255, 0, 0)}
    for name, colour in colours.items():
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.new("RGB", (40, 20), colour).save(tmp_path / name / f"{i}.png")
    dataset = load_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path), resolution=16, resize_mode="center_crop"))
    assert dataset.classes == ["blue", "red"] and len(dataset) == 6
    image, label = dataset[3]
    assert label == 1 and image.shape == (3, 16, 16)
    torch.testing.assert_close(image[:, 8, 8], torch.tensor([1.0, -1.0, -1.0]))
    gray = load_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path), resolution=16, channels=1))
    assert gray[0][0].shape == (1, 16, 16)


def image_folder_with(tmp_path, bad_name: str | None = None, bad_bytes: bytes = b"") -> Path:
    """Two classes of 4 images of mixed sizes, plus one file ``bad_name`` holding ``bad_bytes``."""
    for name, size in (("a", (8, 8)), ("b", (12, 10))):
        (tmp_path / name).mkdir(parents=True)
        for i in range(4):
            Image.new("L", (size[0] + i, size[1]), 40 * i).save(tmp_path / name / f"{i}.png")
    if bad_name:
        (tmp_path / "b" / bad_name).write_bytes(bad_bytes)
    return tmp_path


def test_image_folder_fits_mixed_sizes(tmp_path):
    for mode in ("pad", "center_crop"):
        dataset = load_dataset(DataConfig(dataset="imagefolder", root=str(image_folder_with(tmp_path / mode)), resolution=8, resize_mode=mode))
        images, _ = next(batch_stream(dataset, 8, seed=0))
        assert images.shape == (8, 3, 8, 8)


def truncated_png() -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((16, 16), 64).save(buffer, format="PNG")
    return buffer.getvalue()[:60]


@pytest.mark.parametrize("num_workers", [0, 1])
@pytest.mark.parametrize("name, data", [("cut.png", "truncated"), ("notes.png", b"not an image"), ("empty.jpg", b"")])
def test_unreadable_image_is_named(tmp_path, name, data, num_workers):
    root = image_folder_with(tmp_path, name, truncated_png() if data == "truncated" else data)
    dataset = load_dataset(DataConfig(dataset="imagefolder", root=str(root), resolution=8))
    stream = batch_stream(dataset, 3, seed=0, num_workers=num_workers)
    with pytest.raises(UsageError) as info:
        for _ in range(3):  # one epoch: all 9 files are read
            next(stream)
    message = str(info.value)
    assert message.startswith(f"{root / 'b' / name} is not a readable image (") and message.endswith("; remove or replace it")
    assert "\n" not in message


def train_on_image_folder(root: Path, out: Path) -> int:
    """``atdiff train`` of a tiny 2-class DiT on the ImageFolder ``root``."""
    from atdiff.cli import main

    config = Path(__file__).resolve().parents[1] / "configs" / "fashion-mnist-dit-t4-atconv.yaml"
    return main(["train", "--config", str(config), "--output-dir", str(out), "--max-steps", "3", "--batch-size", "9",
                 "data.dataset=imagefolder", f"data.root={root}", "data.resolution=8", "data.channels=1", "model.size=null",
                 "model.sample_size=8", "model.hidden_size=16", "model.depth=1", "model.num_heads=1", "model.patch_size=4",
                 "model.num_classes=2", "training.log_with=none", "training.num_sample_images=1", "sampling.num_inference_steps=1"])


def test_atdiff_train_names_the_unreadable_image(tmp_path, capsys):
    root = image_folder_with(tmp_path / "images", "cut.png", truncated_png())
    assert train_on_image_folder(root, tmp_path / "run") == 2
    err = capsys.readouterr().err
    last_line = err.splitlines()[-1]
    assert "Traceback" not in err and last_line.startswith(f"atdiff train: error: {root / 'b' / 'cut.png'} is not a readable image (")


@pytest.mark.parametrize(("layout", "problem"), [
    ("missing", "data.root: imagefolder needs a folder with one subfolder of images per class"),
    ("no classes", "data.root: Couldn't find any class folder"),
    ("one class", "the model is conditioned on 2 classes but data (imagefolder) has 1"),
])
def test_bad_data_root_leaves_no_run_folder(tmp_path, capsys, layout, problem):
    root = tmp_path / "images"
    if layout != "missing":
        root.mkdir()
    if layout == "one class":
        (root / "a").mkdir()
        Image.new("L", (8, 8)).save(root / "a" / "0.png")
    out = tmp_path / "runs" / "run"
    assert train_on_image_folder(root, out) == 2
    assert problem in capsys.readouterr().err
    assert not out.exists()


def test_image_folder_needs_a_folder(tmp_path):
    with pytest.raises(UsageError, match="data.root"):
        load_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path / "nope")))


def test_unknown_dataset():
    with pytest.raises(UsageError, match="imagefolder"):
        load_dataset(DataConfig(dataset="imagenet"))


def test_random_flip_mirrors_about_half():
    torch.manual_seed(0)
    images = torch.arange(64 * 4, dtype=torch.float32).view(64, 1, 1, 4)
    flipped = random_flip(images)
    mirrored = (flipped == images.flip(-1)).all(dim=(1, 2, 3))
    assert ((flipped == images).all(dim=(1, 2, 3)) | mirrored).all()
    assert 16 < mirrored.sum() < 48


# ------------------------------------------------------------------------------------------------
# Batch stream
# ------------------------------------------------------------------------------------------------


class Indices(torch.utils.data.Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, index):
        return torch.tensor([float(index)]), index


def take(stream, n):
    return [labels.tolist() for _, labels in (next(stream) for _ in range(n))]


def test_stream_starts_anywhere_without_touching_the_global_rng():
    torch.manual_seed(0)
    state = torch.get_rng_state()
    full = take(batch_stream(Indices(), 3, seed=1), 9)  # 3 batches per epoch (one image dropped)
    assert torch.equal(torch.get_rng_state(), state)
    assert take(batch_stream(Indices(), 3, seed=1, start=4), 5) == full[4:]
    epochs = [sorted(sum(full[i : i + 3], [])) for i in (0, 3, 6)]
    assert all(len(set(e)) == 9 for e in epochs) and full[:3] != full[3:6]
    assert take(batch_stream(Indices(), 3, seed=2), 3) != full[:3]


def test_stream_shards_over_processes():
    ranks = [take(batch_stream(Indices(), 2, seed=0, num_replicas=2, rank=r), 2) for r in (0, 1)]
    seen = [i for batches in ranks for batch in batches for i in batch]
    assert len(seen) == len(set(seen)) == 8


def test_stream_needs_enough_images():
    with pytest.raises(UsageError, match="training.batch_size"):
        next(batch_stream(Indices(), 11, seed=0))
