"""Latent diffusion at the paper's scale, on paper and on the CPU: what ImageNet-256 training costs
(from FLOPs) and whether the latent-store loader keeps up with a GPU.

    python -m atdiff.eval.latent_scale                 # FLOPs, GPU-hours, loader on a 100k-image store
    python -m atdiff.eval.latent_scale --skip-loader   # FLOPs and GPU-hours only (seconds)

FLOPs are counted by ``torch.utils.flop_counter`` on meta tensors (no memory, no compute) for the
``configs/imagenet256-sit-*.yaml`` models at batch 1; a training step costs 3x the forward (measured
on the same counter: backward = 2x forward). The loader part writes a synthetic store of random
posteriors shaped like ImageNet-256's (100k images, 32 KiB each, ~3.3 GB) in a temporary folder,
reads it through ``LatentDataset`` and ``batch_stream`` as training does, and deletes it.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from atdiff.config import build_model, load_config
from atdiff.data import DataConfig, batch_stream
from atdiff.latents import DEFAULT_SHARD_SIZE, LatentDataset, ShardWriter, StoreSource, new_manifest, write_manifest

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SIZES, MIXERS = ("s2", "b2", "xl2"), ("attention", "atconv", "hybrid")
SIZES_512 = ("b2", "xl2")
# stabilityai/sd-vae-ft-ema's architecture (diffusers AutoencoderKL config), for the encoding cost.
SD_VAE = dict(
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=256,
    scaling_factor=0.18215,
)
IMAGENET_TRAIN = 1_281_167
TRAIN_FLOPS_PER_FORWARD = 3  # forward + backward (2x)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m atdiff.eval.latent_scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu-tflops", type=float, default=400.0, help="sustained bf16 TFLOP/s per GPU assumed (default 400: an H100 SXM's 989 dense at ~40%% utilisation)")
    parser.add_argument("--images", type=int, default=100_000, help="images in the synthetic store")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch and process (SiT's 256 over 8 GPUs: 32)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1], help="DataLoader worker counts to time")
    parser.add_argument("--seconds", type=float, default=10.0, help="timing per measurement")
    parser.add_argument("--skip-loader", action="store_true", help="only FLOPs and GPU-hours")
    args = parser.parse_args(argv)

    costs = training_costs(args.gpu_tflops)
    result = {"gpu_tflops_assumed": args.gpu_tflops, "models": costs, "encode": encoding_cost(args.gpu_tflops)}
    if not args.skip_loader:
        result["loader"] = loader_throughput(args.images, args.batch_size, args.workers, args.seconds)
    print(json.dumps(result, indent=2))
    return 0


# ------------------------------------------------------------------------------------------------
# On paper: FLOPs
# ------------------------------------------------------------------------------------------------


def forward_flops(model: torch.nn.Module, *inputs: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        model(*inputs)
    return counter.get_total_flops()


def training_costs(gpu_tflops: float, sizes: tuple[str, ...] = SIZES, sizes_512: tuple[str, ...] = SIZES_512) -> dict[str, dict]:
    """Per config: forward GFLOPs per image, the images/s one GPU sustains at ``gpu_tflops`` and the
    GPU-hours of the config's run: steps x batch x 3 x forward FLOPs / throughput. Keys: ``b2-atconv``
    for 256 px, ``512-b2-atconv`` for 512 px."""
    out = {}
    runs = [("", "imagenet256", size) for size in sizes] + [("512-", "imagenet512", size) for size in sizes_512]
    for prefix, family, size in runs:
        for mixer in MIXERS:
            cfg = load_config(CONFIGS / f"{family}-sit-{size}-{mixer}.yaml")
            with torch.device("meta"):
                model = build_model(cfg.model)
                size_px = cfg.model.resolved()["sample_size"]
                flops = forward_flops(model, torch.randn(1, 4, size_px, size_px), torch.ones(1), torch.zeros(1, dtype=torch.long))
            per_image = TRAIN_FLOPS_PER_FORWARD * flops
            images = cfg.training.max_steps * cfg.training.batch_size
            out[f"{prefix}{size}-{mixer}"] = {
                "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
                "forward_gflops_per_image": round(flops / 1e9, 2),
                "gpu_images_per_s": round(gpu_tflops * 1e12 / per_image),
                "gpu_hours": round(images * per_image / (gpu_tflops * 1e12) / 3600, 1),
            }
    return out


def encoding_cost(gpu_tflops: float) -> dict:
    """The VAE encoder over ImageNet train, each image and its mirror."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(**SD_VAE)
        flops = forward_flops(vae.encode, torch.randn(1, 3, 256, 256))
    return {
        "vae_encoder_gflops_per_image": round(flops / 1e9, 1),
        "gpu_hours_imagenet_with_mirrors": round(2 * IMAGENET_TRAIN * flops / (gpu_tflops * 1e12) / 3600, 2),
    }


# ------------------------------------------------------------------------------------------------
# On the CPU: the loader
# ------------------------------------------------------------------------------------------------


def synthetic_store(folder: Path, count: int) -> dict:
    """A complete store of ``count`` ImageNet-256-shaped posteriors (random, one block repeated per
    shard: the bytes do not matter to the loader, their size and layout do)."""
    data = DataConfig(dataset="imagefolder", root=str(folder), resolution=256, channels=3, vae="synthetic")
    vae_config = {**SD_VAE, "shift_factor": None}
    source = StoreSource.of(data, "0" * 64)
    manifest = new_manifest(source, data, vae_config, count, DEFAULT_SHARD_SIZE, [f"class{i}" for i in range(1000)])
    block = torch.randn(256, 2, 2, *manifest["latent_shape"])
    for index in range(manifest["num_shards"]):
        writer = ShardWriter(folder, manifest, index)
        while not writer.full:
            n = min(len(block), len(writer.labels) - writer.filled)
            writer.add(block[:n], torch.randint(1000, (n,)))
        writer.close()
    manifest["complete"] = True
    write_manifest(folder, manifest)
    return manifest


def evict_from_page_cache(folder: Path) -> None:
    """Drop the store's pages from the OS cache (our own files only), so reads come from the disk."""
    for path in folder.glob("*.npy"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def time_batches(batches, batch_size: int, seconds: float) -> float:
    for _ in range(3):  # worker start-up, first page faults
        next(batches)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(batches)
        count += batch_size
    return count / (time.perf_counter() - start)


def loader_throughput(count: int, batch_size: int, workers: list[int], seconds: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="atdiff-latent-scale-") as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        manifest = synthetic_store(folder, count)
        written = time.perf_counter() - start
        dataset = LatentDataset(folder, manifest, random_flip=True)
        out = {"images": count, "store_gb": round(sum(p.stat().st_size for p in folder.iterdir()) / 1e9, 2),
               "write_s": round(written, 1), "batch_size": batch_size, "images_per_s": {}}
        for num_workers in workers:
            for cache in ("cold", "warm"):
                if cache == "cold":
                    evict_from_page_cache(folder)
                batches = batch_stream(dataset, batch_size, seed=0, num_workers=num_workers)
                out["images_per_s"][f"workers={num_workers},{cache}"] = round(time_batches(batches, batch_size, seconds))
                del batches
        posteriors = torch.stack([dataset[i][0] for i in range(batch_size)])
        start = time.perf_counter()
        for _ in range(20):
            dataset.augment(posteriors)
        out["augment_images_per_s_cpu"] = round(20 * batch_size / (time.perf_counter() - start))
    return out


if __name__ == "__main__":
    raise SystemExit(main())
