"""``atdiff info``: the attention, ATConv and hybrid variants of a config's model, side by side.

Builds each variant (only ``model.token_mixer`` changes), and prints its parameter count and the
median time of a forward pass on random inputs: a quick check of a config before training it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from .config import load_config
from .devices import check_device
from .errors import UsageError
from .limits import check_forward
from .models.model_config import build_model
from .nn.mixer import TOKEN_MIXERS

MAX_REPEATS = 1000  # a median of more passes says nothing more, and each pass of a big model may take seconds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="configs/fashion-mnist-dit-t4-atconv.yaml", help="YAML experiment config")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    parser.add_argument("--repeats", type=int, default=5, help="timed forward passes (median reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override config keys, e.g. model.size=S/2")


def forward_seconds(model: torch.nn.Module, batch_size: int, repeats: int, device: torch.device) -> float:
    cfg = model.config
    size = cfg.sample_size if isinstance(cfg.sample_size, (tuple, list)) else (cfg.sample_size, cfg.sample_size)
    x = torch.randn(batch_size, cfg.in_channels, *size, device=device)
    t = torch.randint(0, 1000, (batch_size,), device=device)
    labels = torch.randint(0, cfg.num_classes, (batch_size,), device=device) if getattr(cfg, "num_classes", 0) else None
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):  # the first pass warms up allocator and kernels
            start = time.perf_counter()
            model(x, t, labels)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or not 1 <= args.repeats <= MAX_REPEATS:
        raise UsageError(f"--batch-size must be at least 1 and --repeats in [1, {MAX_REPEATS}], got {args.batch_size} and {args.repeats}")
    check_device(args.device)
    cfg = load_config(args.config, args.overrides)
    device = torch.device(args.device)
    check_forward(f"--batch-size {args.batch_size}", cfg.model.resolved(), args.batch_size, device, "lower --batch-size")
    name = f"{cfg.model.type} {cfg.model.size or ''}".strip()
    print(f"{args.config}: {name}, batch {args.batch_size}, {device}, median of {args.repeats} forward passes")
    print(f"{'token mixer':<12} {'parameters':>12} {'forward ms':>11} {'images/s':>9}")
    for mixer in TOKEN_MIXERS:
        cfg.model.kwargs["token_mixer"] = mixer
        torch.manual_seed(0)
        model = build_model(cfg.model).to(device).eval()
        seconds = forward_seconds(model, args.batch_size, args.repeats, device)
        params = sum(p.numel() for p in model.parameters())
        print(f"{mixer:<12} {params:>12,} {1e3 * seconds:>11.1f} {args.batch_size / seconds:>9.1f}")
    return 0
