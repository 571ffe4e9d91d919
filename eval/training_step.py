"""One training step of a DiT in its variants, measured as ``atdiff train`` measures a run: median
step time of interleaved repeats and the model's peak memory (``atdiff.memory.model_peak_memory``:
weights, gradients and AdamW state, plus the peak the step allocates on top).

    python -m atdiff.eval.training_step --size S/2 --mixer atconv --batch 8 --latent 32 --variants plain checkpointing
    python -m atdiff.eval.training_step --size XS/4 --variants plain compile --out eval/results --stem compile-cpu-xs4

    python -m atdiff.eval.training_step --size S/2 --variants plain repa --stem repa-s2-atconv

Variants: ``plain``; ``checkpointing`` (``enable_gradient_checkpointing()``, what
``training.gradient_checkpointing`` does); ``compile`` (``torch.compile`` of the model, as
``training.compile``; its first step, which compiles, is reported apart and left out of the median);
``repa`` (``objective.repa_encoder``: the same step plus REPA's term, block 8's hidden states through
the projector against the encoder's features of 8x-sized images; ``--encoder`` is a DINOv2 folder or
hub id, by default a tiny random one: hidden 32, 2 layers, patch 4).
Writes ``STEM.json`` and ``STEM.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from atdiff.files import write_atomic
from atdiff.memory import model_peak_memory, module_tensors
from atdiff.models import DiTModel, dit_size
from atdiff.objectives import FlowMatchingObjective

VARIANTS = ("plain", "checkpointing", "compile", "repa")
TINY_ENCODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=4, image_size=32)


class FixedInputs(FlowMatchingObjective):
    """Flow matching on fixed noisy inputs, times and targets, so that every variant (and REPA, which
    wraps it) times exactly the same regression."""

    def __init__(self, x_t: torch.Tensor, t: torch.Tensor, target: torch.Tensor):
        super().__init__()
        self.inputs = x_t, t, target

    def training_inputs(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.inputs


def tiny_encoder(folder: str) -> str:
    from transformers import Dinov2Config, Dinov2Model

    Dinov2Model(Dinov2Config(**TINY_ENCODER)).save_pretrained(folder)
    return folder


def make_step(size: str, mixer: str, latent: int, batch: int, variant: str, seed: int = 0, encoder: str | None = None):
    """A training step (forward, backward, AdamW) of a fresh DiT, and the tensors it keeps between steps."""
    torch.manual_seed(seed)
    model = DiTModel(sample_size=latent, in_channels=4, num_classes=1000, learn_sigma=False, token_mixer=mixer, **dit_size(size))
    model.train()
    if variant == "checkpointing":
        model.enable_gradient_checkpointing()
    network = torch.compile(model) if variant == "compile" else model
    x, target = torch.randn(batch, 4, latent, latent), torch.randn(batch, 4, latent, latent)
    t, y = torch.rand(batch) * 1000, torch.randint(0, 1000, (batch,))
    trained, frozen = [model], []
    regression = FixedInputs(x, t, target)  # the mean squared error of the prediction
    if variant == "repa":
        from accelerate import Accelerator

        from atdiff.objectives.repa import RepresentationAlignment

        objective = RepresentationAlignment(regression, encoder, depth=min(8, model.config.depth))
        objective.prepare(Accelerator(cpu=True), model)
        images = torch.rand(batch, 3, latent * 8, latent * 8) * 2 - 1  # the pixels of 8x-downsampling VAE latents
        trained.append(objective.trained_module())
        frozen.append(objective.encoder)
        loss = partial(objective.loss, network, x, y, images)
    else:
        loss = partial(regression.loss, network, x, y)

    parameters = [p for module in trained for p in module.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)

    def step():
        loss().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # gradients stay allocated, as they are between training steps

    def resident() -> list[torch.Tensor]:
        state = [v for values in optimizer.state.values() for v in values.values() if torch.is_tensor(v)]
        modules = [t for module in trained + frozen for t in module_tensors(module)]
        return [*modules, *(p.grad for p in parameters if p.grad is not None), *state]

    return step, resident


def measure(args: argparse.Namespace) -> dict:
    steps, results = {}, {}
    encoder = None
    if "repa" in args.variants:
        encoder = args.encoder or tiny_encoder(tempfile.mkdtemp(prefix="tiny-dinov2-"))
    for variant in args.variants:
        step, resident = make_step(args.size, args.mixer, args.latent, args.batch, variant, encoder=encoder)
        start = time.perf_counter()
        step()  # warm-up: allocates gradients and AdamW state (and compiles)
        first = time.perf_counter() - start
        memory = model_peak_memory(step, torch.device("cpu"), resident())
        steps[variant] = step
        results[variant] = {"first_step_s": first, **memory, "times_s": []}
    for _ in range(args.repeats):  # interleaved, so that a busy machine slows every variant alike
        for variant, step in steps.items():
            start = time.perf_counter()
            step()
            results[variant]["times_s"].append(time.perf_counter() - start)
    for result in results.values():
        result["median_s"] = statistics.median(result["times_s"])
        result["images_per_s"] = args.batch / result["median_s"]
    return results


def report(args: argparse.Namespace, results: dict, command: str, wall_s: float) -> str:
    base = results[args.variants[0]]
    lines = [
        f"# DiT-{args.size} ({args.mixer}) training step: {', '.join(args.variants)}", "",
        f"Command: `{command}`", "",
        f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; batch {args.batch}, {args.latent}x{args.latent}x4 "
        f"latents ({(args.latent // dit_size(args.size)['patch_size']) ** 2} tokens); median of {args.repeats} interleaved "
        f"steps after one warm-up; {wall_s:.0f} s in all. Model memory: weights, gradients and AdamW state plus the "
        f"peak the step allocates on top (CPU profiler events, atdiff.memory).", "",
        "| variant | median step s | images/s | model memory MB | of which resident | time vs " + args.variants[0]
        + " | memory vs " + args.variants[0] + " | first step s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for variant, r in results.items():
        lines.append(f"| {variant} | {r['median_s']:.3f} | {r['images_per_s']:.1f} | {r['model_memory_mb']:.0f} | "
                     f"{r['model_resident_mb']:.0f} | {r['median_s'] / base['median_s']:.2f}x | "
                     f"{r['model_memory_mb'] / base['model_memory_mb']:.2f}x | {r['first_step_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m atdiff.eval.training_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="S/2", help="DiT size (default S/2)")
    parser.add_argument("--mixer", default="atconv", choices=("attention", "atconv", "hybrid"))
    parser.add_argument("--latent", type=int, default=32, help="latent side (default 32: ImageNet-256)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["plain", "checkpointing"], help="the first is the reference")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--encoder", help="repa: a DINOv2 folder or hub id (default: a tiny random one, see above)")
    parser.add_argument("--out", default=".", help="folder for STEM.json and STEM.md")
    parser.add_argument("--stem", default="training-step")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.batch < 1:
        parser.error("--repeats and --batch must be at least 1")
    command = "python -m atdiff.eval.training_step " + shlex.join(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    results = measure(args)
    wall_s = time.perf_counter() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"command": command, "args": vars(args), "threads": torch.get_num_threads(), "wall_s": wall_s,
              "results": results}
    write_atomic(out / f"{args.stem}.json", json.dumps(record, indent=1) + "\n")
    write_atomic(out / f"{args.stem}.md", report(args, results, command, wall_s))
    print((out / f"{args.stem}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
