"""``atdiff encode``: precompute the VAE latents of a config's images once, into a latent store.

The store (``atdiff.latents``) goes to ``data.latent_dir`` or, by default, to a folder under the
cache dir named after the images and the VAE weights, which is where ``atdiff train`` looks. Work is
split by shard: a killed encode resumes at the first missing shard, and under ``accelerate launch``
process r of N encodes shards r, r + N, ... (on N GPUs, N times faster).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .config import load_config
from .data import DataConfig, load_dataset
from .devices import launched_without_gpu
from .errors import UsageError, writing_to
from .latents import (
    DEFAULT_SHARD_SIZE,
    ShardWriter,
    StoreSource,
    check_source,
    load_vae,
    missing_shards,
    new_manifest,
    read_manifest,
    shard_range,
    store_dir,
    weights_sha256,
    write_manifest,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML experiment config whose data section names a VAE (data.vae)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per VAE call and process (changes the latents only by float rounding)")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="images per shard file (a new store only; resuming keeps the store's)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override config keys, as for `atdiff train` (give the same ones)")


def run(args: argparse.Namespace) -> int:
    for flag in ("batch_size", "shard_size"):
        if getattr(args, flag) <= 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    cfg = load_config(args.config, args.overrides)
    encode(cfg.data, batch_size=args.batch_size, shard_size=args.shard_size)
    return 0


def encode(data: DataConfig, batch_size: int = 64, shard_size: int = DEFAULT_SHARD_SIZE) -> Path:
    """Complete the latent store of ``data`` (start it, or finish the shards it lacks); returns its folder."""
    if not data.vae:
        raise UsageError("data.vae is not set, so there are no latents to encode; name a diffusers AutoencoderKL, e.g. data.vae=stabilityai/sd-vae-ft-ema")
    accelerator = Accelerator(cpu=launched_without_gpu())
    vae = load_vae(data.vae, data.vae_subfolder)
    if vae.config.in_channels != data.num_channels:
        raise UsageError(f"the VAE takes {vae.config.in_channels}-channel images but data gives {data.num_channels}; set data.channels={vae.config.in_channels}")
    images = load_dataset(data)
    source = StoreSource.of(data, weights_sha256(vae))
    folder = store_dir(data, source)
    manifest = open_for_writing(folder, new_manifest(source, data, vae.config, len(images), shard_size, images.classes), accelerator)

    todo = [i for i in missing_shards(folder, manifest) if i % accelerator.num_processes == accelerator.process_index]
    if todo:
        with writing_to(folder, "free some space (or set data.latent_dir elsewhere) and rerun: finished shards are kept"):
            encode_shards(vae.to(accelerator.device), images, folder, manifest, todo, batch_size, data.num_workers, accelerator)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        missing = missing_shards(folder, manifest)
        if missing:  # another process failed; its error is on its own output
            raise RuntimeError(f"{len(missing)} shards of {folder} are still missing (e.g. {missing[0]}); rerun to finish them")
        if not manifest["complete"]:
            write_manifest(folder, {**manifest, "complete": True})
        print(f"latent store complete: {manifest['count']} images in {folder}", flush=True)
    accelerator.wait_for_everyone()
    return folder


def open_for_writing(folder: Path, manifest: dict, accelerator: Accelerator) -> dict:
    """The manifest to encode under: the folder's own when resuming (after checking it describes the
    same images and VAE), else ``manifest``, written by the main process as the store's header."""
    existing = read_manifest(folder)  # every process checks, so a refusal stops all of them alike
    if existing is None and folder.is_dir() and any(folder.iterdir()):
        raise UsageError(f"data.latent_dir {folder} is neither empty nor an atdiff latent store; pick a new folder")
    accelerator.wait_for_everyone()  # all have looked before the main process writes the header
    if existing is not None:
        check_source(existing, StoreSource(**manifest["source"]), folder)
        if existing["count"] != manifest["count"]:
            raise UsageError(f"the dataset now has {manifest['count']} images but the store {folder} was started with {existing['count']}; use a new data.latent_dir")
        if existing["shard_size"] != manifest["shard_size"] and accelerator.is_main_process:
            print(f"resuming {folder} with its own shard size {existing['shard_size']}", flush=True)
        return existing
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        write_manifest(folder, manifest)
    accelerator.wait_for_everyone()
    return manifest


def encode_shards(vae, images, folder: Path, manifest: dict, shards: list[int], batch_size: int, num_workers: int, accelerator: Accelerator) -> None:
    """Encode ``shards`` one after the other, each written whole or not at all. One DataLoader over
    all of them (batches never straddle a shard), so workers start once and prefetch across shards."""
    plan = [(index, batch) for index in shards for batch in batched(shard_range(manifest, index), batch_size)]
    loader = DataLoader(images, batch_sampler=[batch for _, batch in plan], num_workers=num_workers,
                        pin_memory=accelerator.device.type == "cuda")
    total = sum(len(shard_range(manifest, i)) for i in shards)
    where = f" (process {accelerator.process_index} of {accelerator.num_processes})" if accelerator.num_processes > 1 else ""
    started, writer = time.perf_counter(), None
    with tqdm(total=total, unit="img", desc=f"encode{where}", disable=not accelerator.is_local_main_process) as bar:
        for (index, _), (pixels, labels) in zip(plan, loader):
            if writer is None:
                writer = ShardWriter(folder, manifest, index)
            writer.add(posteriors(vae, pixels.to(accelerator.device, non_blocking=True)), labels)
            if writer.full:
                writer.close()
                writer = None
            bar.update(len(labels))
    seconds = time.perf_counter() - started
    accelerator.print(f"encoded {total} images in {seconds:.1f} s ({total / seconds:.1f} images/s{' per process' if where else ''})")


def batched(indices: range, size: int) -> list[list[int]]:
    return [list(indices[start : start + size]) for start in range(0, len(indices), size)]


@torch.no_grad()
def posteriors(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> (B, 2, 2, C, h, w): [image, mirror] x [posterior mean, std]."""
    dist = vae.encode(torch.cat([pixels, pixels.flip(-1)]).to(vae.dtype)).latent_dist
    both = torch.stack([dist.mean, dist.std], dim=1)  # (2B, 2, C, h, w): images first, then mirrors
    return both.unflatten(0, (2, len(pixels))).transpose(0, 1)
