"""Latent diffusion end to end on the CPU: a tiny random AutoencoderKL, a few dozen Fashion-MNIST
images at 64x64 as an image folder, `atdiff encode` (store, resume, refusals), the memory-mapped
dataset, training in latent space and sampling back to images."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file

from assets import needs_fashion_mnist
from atdiff.cli import main
from atdiff.config import config_from_dict
from atdiff.data import FASHION_MNIST_DIR, DataConfig, adm_center_crop, load_dataset, read_idx
from atdiff.encode import encode, posteriors
from atdiff.errors import UsageError
from atdiff.files import TEMP_PREFIX
from atdiff.latents import MissingLatents, ShardWriter, open_store, read_manifest, sample_latents, shard_paths
from atdiff.pipelines import ImageDiffusionPipeline

pytestmark = needs_fashion_mnist

NUM_IMAGES = 20  # 3 shards of 8, 8 and 4
SHARD_SIZE = 8


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_vae(seed: int = 0, **config) -> AutoencoderKL:
    """An 8x-downsampling AutoencoderKL (like SD's) of 25k parameters; factors set so their use shows."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=8,
        sample_size=64, **{"scaling_factor": 0.5, "shift_factor": 0.1, **config},
    )


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("vae")
    tiny_vae().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """The first NUM_IMAGES Fashion-MNIST test images as PNGs, one subfolder per class."""
    folder = tmp_path_factory.mktemp("fashion")
    images = read_idx(Path(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz"))[:NUM_IMAGES]
    labels = read_idx(Path(FASHION_MNIST_DIR, "t10k-labels-idx1-ubyte.gz"))[:NUM_IMAGES]
    for i, (image, label) in enumerate(zip(images, labels)):
        (folder / f"class{int(label)}").mkdir(exist_ok=True)
        Image.fromarray(image.numpy()).save(folder / f"class{int(label)}" / f"{i:03d}.png")
    return folder


def data_config(image_folder: Path, vae_dir: Path, latent_dir: Path, **changes) -> DataConfig:
    fields = dict(dataset="imagefolder", root=str(image_folder), resolution=64, resize_mode="adm_center_crop",
                  channels=3, random_flip=True, vae=str(vae_dir), latent_dir=str(latent_dir))
    return DataConfig(**{**fields, **changes})


@pytest.fixture(scope="module")
def store(tmp_path_factory, image_folder, vae_dir) -> DataConfig:
    """A complete store, encoded in one go."""
    data = data_config(image_folder, vae_dir, tmp_path_factory.mktemp("store") / "latents")
    encode(data, batch_size=3, shard_size=SHARD_SIZE)
    return data


# ------------------------------------------------------------------------------------------------
# Encoding
# ------------------------------------------------------------------------------------------------


def test_adm_center_crop_halves_then_resizes_the_short_side():
    image = Image.new("RGB", (600, 400), (10, 200, 30))
    image.paste((255, 0, 0), (0, 0, 40, 400))  # a red band on the left, cropped away
    out = adm_center_crop(image, 64)
    assert out.size == (64, 64)
    assert np.array(out).reshape(-1, 3).min(0).tolist() == [10, 200, 30] == np.array(out).reshape(-1, 3).max(0).tolist()


def test_store_holds_the_posteriors_of_each_image_and_its_mirror(store):
    folder = Path(store.latent_dir)
    manifest = read_manifest(folder)
    assert manifest["complete"] and manifest["count"] == NUM_IMAGES and manifest["num_shards"] == 3
    assert manifest["latent_shape"] == [4, 8, 8]
    assert manifest["vae"]["scaling_factor"] == 0.5 and manifest["vae"]["shift_factor"] == 0.1
    assert manifest["source"]["resolution"] == 64 and len(manifest["source"]["vae_sha256"]) == 64
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json"] + [
        f"shard-{i:05d}.{kind}.npy" for i in range(3) for kind in ("labels", "latents")
    ]

    images = load_dataset(store)
    vae = AutoencoderKL.from_pretrained(store.vae)
    dataset = open_store(store, vae)
    assert len(dataset) == NUM_IMAGES and dataset.classes == images.classes
    for index in (0, 9, NUM_IMAGES - 1):  # in the first, second and last (short) shard
        pixels, label = images[index]
        stored, stored_label = dataset[index]
        assert stored.dtype == torch.float16 and stored.shape == (2, 2, 4, 8, 8) and stored_label == label
        with torch.no_grad():
            image, mirror = vae.encode(torch.stack([pixels, pixels.flip(-1)])).latent_dist.mean
        torch.testing.assert_close(stored[0, 0].float(), image, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(stored[1, 0].float(), mirror, atol=2e-3, rtol=2e-3)
        assert (stored[:, 1] > 0).all()  # posterior std


def test_dataset_memory_maps_its_shards_and_pickles_without_them(store):
    dataset = open_store(store, AutoencoderKL.from_pretrained(store.vae))
    dataset[0]
    assert isinstance(dataset._shards[0][0], np.memmap)
    clone = pickle.loads(pickle.dumps(dataset))  # what a spawned DataLoader worker receives
    assert clone._shards == {} and torch.equal(clone[3][0], dataset[3][0])


def test_killed_encode_resumes_at_the_missing_shards(tmp_path, store, monkeypatch):
    data = data_config(Path(store.root), Path(store.vae), tmp_path / "latents")
    closed = []
    real_close = ShardWriter.close

    def close_then_die(writer):
        if len(closed) == 1:  # the second shard: killed mid-write
            raise KeyboardInterrupt
        real_close(writer)
        closed.append(writer.final[0].name)

    monkeypatch.setattr(ShardWriter, "close", close_then_die)
    with pytest.raises(KeyboardInterrupt):
        encode(data, batch_size=3, shard_size=SHARD_SIZE)
    assert not read_manifest(tmp_path / "latents")["complete"]
    left = sorted(p.name for p in (tmp_path / "latents").glob(f"{TEMP_PREFIX}*"))
    assert left == [f"{TEMP_PREFIX}shard-00001.labels.npy", f"{TEMP_PREFIX}shard-00001.latents.npy"]  # the killed shard
    with pytest.raises(MissingLatents, match="incomplete \\(1 of 3 shards encoded\\)"):
        open_store(data, AutoencoderKL.from_pretrained(data.vae))

    closed.clear()
    monkeypatch.setattr(ShardWriter, "close", lambda writer: (real_close(writer), closed.append(writer.final[0].name)))
    encode(data, batch_size=3, shard_size=SHARD_SIZE)
    assert closed == ["shard-00001.latents.npy", "shard-00002.latents.npy"]
    assert read_manifest(tmp_path / "latents")["complete"]
    closed.clear()
    encode(data, batch_size=3, shard_size=SHARD_SIZE)  # complete: nothing to do
    assert closed == []
    assert not list((tmp_path / "latents").glob(f"{TEMP_PREFIX}*"))
    for i in range(3):
        for mine, straight in zip(shard_paths(tmp_path / "latents", i), shard_paths(Path(store.latent_dir), i)):
            assert mine.read_bytes() == straight.read_bytes()


def test_a_damaged_shard_counts_as_missing_and_is_encoded_again(tmp_path, store):
    """A shard cut short (a partial copy of the store, a full disk) is not read as data: training asks
    for `atdiff encode`, which rewrites just that shard."""
    import shutil

    data = data_config(Path(store.root), Path(store.vae), tmp_path / "latents")
    shutil.copytree(store.latent_dir, data.latent_dir)
    damaged = shard_paths(Path(data.latent_dir), 1)[0]
    damaged.write_bytes(damaged.read_bytes()[:500])
    with pytest.raises(MissingLatents, match="incomplete \\(2 of 3 shards encoded\\)"):
        open_store(data, AutoencoderKL.from_pretrained(data.vae))
    encode(data, batch_size=3, shard_size=SHARD_SIZE)
    assert damaged.read_bytes() == shard_paths(Path(store.latent_dir), 1)[0].read_bytes()
    assert len(open_store(data, AutoencoderKL.from_pretrained(data.vae))) == NUM_IMAGES


def test_store_made_otherwise_is_refused_naming_the_difference(store, tmp_path):
    vae = AutoencoderKL.from_pretrained(store.vae)
    with pytest.raises(UsageError, match=r"data.resolution=64 \(config: 32\)"):
        open_store(DataConfig(**{**vars(store), "resolution": 32}), vae)
    with pytest.raises(UsageError, match=r"data.root="):
        open_store(DataConfig(**{**vars(store), "root": str(tmp_path)}), vae)
    with pytest.raises(UsageError, match="data.dataset='imagefolder' \\(config: 'fashion-mnist'\\)"):
        open_store(DataConfig(**{**vars(store), "dataset": "fashion-mnist", "root": None}), vae)
    with pytest.raises(UsageError, match="other VAE weights"):
        open_store(store, tiny_vae(seed=1))
    other_vae = tmp_path / "other-vae"
    tiny_vae(seed=1).save_pretrained(other_vae)
    with pytest.raises(UsageError, match="other VAE weights"):  # encoding into it too
        encode(DataConfig(**{**vars(store), "vae": str(other_vae)}), shard_size=SHARD_SIZE)
    with pytest.raises(UsageError, match="^data.vae: cannot load a diffusers AutoencoderKL from .*no-vae[^\n]*$"):
        encode(DataConfig(**{**vars(store), "vae": str(tmp_path / "no-vae")}))
    with pytest.raises(MissingLatents, match="no latent store"):
        open_store(DataConfig(**{**vars(store), "latent_dir": str(tmp_path / "empty")}), vae)


def test_encode_refuses_a_config_without_a_vae_in_one_line(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data": {"dataset": "fashion-mnist"}, "model": {"size": "XS/4", "in_channels": 1}}))
    assert main(["encode", "--config", str(config)]) == 2
    assert capsys.readouterr().err.startswith("atdiff encode: error: data.vae is not set")


def test_latent_samples_flip_and_scale_as_the_vae_expects():
    mean = torch.randn(64, 2, 4, 2, 2)
    posterior = torch.stack([mean, torch.zeros_like(mean)], dim=2)  # std 0: the sample is the mean
    plain, no_images = sample_latents(posterior, flip=False, scaling_factor=0.5, shift_factor=0.1)
    torch.testing.assert_close(plain, (mean[:, 0] - 0.1) * 0.5)
    assert no_images is None
    images = torch.randn(64, 3, 8, 8)
    torch.manual_seed(0)
    flipped, seen = sample_latents(posterior, images, flip=True, scaling_factor=1.0, shift_factor=0.0)
    mirrored = (flipped == mean[:, 1]).flatten(1).all(1)
    assert ((flipped == mean[:, 0]).flatten(1).all(1) ^ mirrored).all() and 16 < mirrored.sum() < 48
    # the images a latent came from are mirrored with it (REPA's encoder sees what the latent shows)
    assert torch.equal(seen[mirrored], images[mirrored].flip(-1)) and torch.equal(seen[~mirrored], images[~mirrored])
    torch.manual_seed(0)
    assert torch.equal(sample_latents(posterior, flip=True, scaling_factor=1.0, shift_factor=0.0)[0], flipped)

    noisy = torch.stack([torch.zeros(1024, 2, 4, 2, 2), torch.full((1024, 2, 4, 2, 2), 2.0)], dim=2)
    samples, _ = sample_latents(noisy, flip=False, scaling_factor=1.0, shift_factor=0.0)
    assert abs(samples.std().item() - 2.0) < 0.05  # a fresh draw from N(mean, std^2)


def test_posteriors_encode_mirrors_in_the_same_call(vae_dir):
    vae = AutoencoderKL.from_pretrained(vae_dir)
    pixels = torch.rand(3, 3, 64, 64) * 2 - 1
    out = posteriors(vae, pixels)
    assert out.shape == (3, 2, 2, 4, 8, 8)
    with torch.no_grad():
        dist = vae.encode(pixels[1:2].flip(-1)).latent_dist
    torch.testing.assert_close(out[1, 1, 0], dist.mean[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[1, 1, 1], dist.std[0], atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# Several processes
# ------------------------------------------------------------------------------------------------


def test_two_processes_split_the_shards_and_match_one(tmp_path, store):
    data = data_config(Path(store.root), Path(store.vae), tmp_path / "latents")
    config = tmp_path / "encode.yaml"
    config.write_text(yaml.safe_dump({"data": vars(data), "model": {"size": "XS/2", "in_channels": 4, "sample_size": 8}}))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "atdiff", "encode", "--config", str(config),
               "--shard-size", str(SHARD_SIZE), "--batch-size", "3"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(process 0 of 2)" in done.stderr and read_manifest(tmp_path / "latents")["complete"]
    for i in range(3):
        for mine, straight in zip(shard_paths(tmp_path / "latents", i), shard_paths(Path(store.latent_dir), i)):
            assert mine.read_bytes() == straight.read_bytes()


# ------------------------------------------------------------------------------------------------
# Training on latents, sampling back to images
# ------------------------------------------------------------------------------------------------


def latent_run(data: DataConfig, output_dir: Path, **training) -> dict:
    """A tiny class-conditional DiT on the 8x8x4 latents: 3 steps, grids decoded every 2."""
    return {
        "model": {"type": "dit", "sample_size": 8, "patch_size": 2, "hidden_size": 32, "depth": 2, "num_heads": 2,
                  "in_channels": 4, "num_classes": 10, "learn_sigma": False, "token_mixer": "atconv"},
        "objective": {"type": "flow_matching"},
        "data": {k: v for k, v in vars(data).items() if v is not None},
        "training": {"output_dir": str(output_dir), "max_steps": 4, "batch_size": 4, "learning_rate": 1e-3,
                     "checkpoint_every": 2, "sample_every": 2, "num_sample_images": 4, "log_with": "none", **training},
        "sampling": {"num_inference_steps": 2},
    }


@pytest.fixture(scope="module")
def latent_training(tmp_path_factory, store):
    from atdiff.training import train

    out = tmp_path_factory.mktemp("latent-run") / "run"
    train(config_from_dict(latent_run(store, out)))
    return out


def test_training_on_latents_leaves_a_pipeline_that_decodes_to_images(latent_training):
    out = latent_training
    assert (out / "vae" / "config.json").is_file()
    assert json.loads((out / "model_index.json").read_text())["vae"] == ["diffusers", "AutoencoderKL"]
    pipe = ImageDiffusionPipeline.from_pretrained(out)
    images = pipe(batch_size=2, class_labels=[0, 1], num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 64, 64, 3)
    latents = pipe(batch_size=2, class_labels=[0, 1], num_inference_steps=2, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images
    with torch.no_grad():  # decoded with the VAE's own factors (0.5, 0.1)
        expected = pipe.vae.decode(latents / 0.5 + 0.1).sample
    decoded = pipe(batch_size=2, class_labels=[0, 1], num_inference_steps=2, output_type="pt",
                   generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(decoded, (expected / 2 + 0.5).clamp(0, 1))
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-0000002.png", "step-0000004.png"]
    assert Image.open(out / "samples" / "step-0000004.png").size == (128, 128)  # 4 decoded 64x64 images, 2 x 2


def test_sample_and_fid_read_the_latent_pipeline_with_no_extra_flag(latent_training, tmp_path):
    from atdiff.eval.fid import PipelineSampling, sample_pipeline_sides

    assert main(["sample", str(latent_training), "--num-images", "2", "--steps", "2", "--out", str(tmp_path / "png")]) == 0
    assert [Image.open(p).size for p in sorted((tmp_path / "png").glob("*.png"))] == [(64, 64)] * 2
    (images,) = sample_pipeline_sides([(str(latent_training), 2)], PipelineSampling(device="cpu"))
    assert images[0].shape == (3, 64, 64) and images[0].dtype == torch.uint8


def test_resumed_latent_run_draws_the_same_latents(latent_training, tmp_path, store):
    from atdiff.training import train

    first = train(config_from_dict(latent_run(store, tmp_path / "run", max_steps=2)))
    assert first.step == 2
    train(config_from_dict(latent_run(store, tmp_path / "run")), resume="latest")
    straight = load_file(latent_training / "model" / "diffusion_pytorch_model.safetensors")
    resumed = load_file(tmp_path / "run" / "model" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_train_without_a_store_prints_the_encode_command(tmp_path, store, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(latent_run(store, tmp_path / "run")))
    empty = tmp_path / "nothing-here"
    assert main(["train", "--config", str(config), f"data.latent_dir={empty}", "--max-steps", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"atdiff train: error: no latent store for this config's data and VAE in {empty}")
    assert f"run `atdiff encode --config {config} data.latent_dir={empty}`" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_train_refuses_a_model_that_does_not_take_the_latents(tmp_path, store):
    from atdiff.training import train

    raw = latent_run(store, tmp_path / "run")
    raw["model"]["in_channels"] = 3
    with pytest.raises(UsageError, match="model.in_channels=4"):
        train(config_from_dict(raw))
    raw["model"].update(in_channels=4, sample_size=16)
    with pytest.raises(UsageError, match="model.sample_size=8"):
        train(config_from_dict(raw))


def test_repa_on_latents_shows_the_encoder_the_image_each_latent_came_from(tmp_path, store, monkeypatch):
    from atdiff.objectives.repa import RepresentationAlignment
    from atdiff.training import train
    from test_repa import tiny_encoder

    images = load_dataset(store)
    dataset = open_store(store, AutoencoderKL.from_pretrained(store.vae), with_images=True)
    posterior, label, image = dataset[5]
    assert torch.equal(posterior, open_store(store, AutoencoderKL.from_pretrained(store.vae))[5][0])
    assert torch.equal(image, images[5][0]) and label == images[5][1]

    seen, features = [], RepresentationAlignment.features
    monkeypatch.setattr(RepresentationAlignment, "features", lambda self, pixels: seen.append(pixels) or features(self, pixels))
    raw = latent_run(store, tmp_path / "run", max_steps=3, sample_every=0, checkpoint_every=0)
    raw["objective"].update(repa_encoder=str(tiny_encoder(tmp_path / "encoder")), repa_encoder_depth=1, repa_projector_dim=8)
    assert train(config_from_dict(raw)).step == 3
    originals = torch.stack([images[i][0] for i in range(len(images))])
    shown = torch.cat(seen)  # 64x64 images, mirrored with their latents
    mirrored = [next(flip for flip in (False, True) if any(torch.equal(s, o.flip(-1) if flip else o) for o in originals)) for s in shown]
    assert len(shown) == 12 and 0 < sum(mirrored) < 12
