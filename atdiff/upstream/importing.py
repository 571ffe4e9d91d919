"""``atdiff import SRC --out DIR``: an upstream DiT/SiT/ATConv-SiT/diffusers checkpoint as an atdiff
pipeline folder (``atdiff sample``, ``atdiff fid``, ``model.init_from`` all take it).

The imported ``DiTModel`` computes what the original computes: same weights, and the config
constants of the source's code (SiT's time convention, diffusers' timestep shift and norm epsilon).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ..errors import UsageError
from ..files import atomic_path, check_writable
from ..integrity import check_weights
from ..latents import load_vae
from ..models.dit import DiTModel, sincos_position_table
from ..objectives import ObjectiveConfig, build_objective
from ..pipelines import ImageDiffusionPipeline
from .architecture import FAMILIES, Hints, hints_from_args, hints_from_diffusers, model_config
from .keymap import diffusers_to_atdiff, timm_to_atdiff
from .sources import WEIGHT_CHOICES, Source, read_source


@dataclass
class ImportOptions:
    """What the command-line flags give; None: from the file."""

    family: str | None = None
    size: str | None = None
    num_classes: int | None = None
    sample_size: int | None = None
    weights: str = "ema"
    vae: str | None = None

    def hints(self) -> Hints:
        return Hints(family=self.family, size=self.size, num_classes=self.num_classes, sample_size=self.sample_size)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="a DiT/SiT .pt (state dict or train.py checkpoint), a .safetensors state dict, or a diffusers DiTPipeline / DiTTransformer2DModel folder")
    parser.add_argument("--out", required=True, help="the atdiff pipeline folder to write (must not exist)")
    parser.add_argument("--vae", help="AutoencoderKL folder (or a pipeline folder with vae/) the model's latents decode with; default: SRC's own, if it has one")
    parser.add_argument("--size", help="model size SIZE/PATCH (e.g. XL/2): the number of heads, which a state dict does not hold")
    parser.add_argument("--family", choices=FAMILIES, help="dit (DDPM) or sit (flow); needed for a bare state dict")
    parser.add_argument("--weights", choices=WEIGHT_CHOICES, default="ema", help="which weights of a train.py checkpoint (default: ema)")
    parser.add_argument("--num-classes", type=int, help="classes, when the label table may lack the null row (default: the file's args, else rows - 1)")
    parser.add_argument("--sample-size", type=int, help="latent size, for models without a position table (pure ATConv) and without args")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    check_out(out)
    options = ImportOptions(args.family, args.size, args.num_classes, args.sample_size, args.weights, args.vae)
    pipe = import_checkpoint(Path(args.src), options)
    save_pipeline_folder(pipe, out)
    config = pipe.model.config
    sigma = "learned sigma, " if config.learn_sigma else ""
    latents_only = pipe.vae is None and config.in_channels == 4  # DiT/SiT work on SD-VAE latents
    print(
        f"imported {args.src} -> {out}: DiTModel {config.token_mixer}, width {config.hidden_size}, depth {config.depth}, "
        f"{config.num_classes} classes, {sigma}time convention {config.time_convention}, "
        f"scheduler {type(pipe.scheduler).__name__}{'; no VAE: pass --vae to decode images' if latents_only else ''}"
    )
    return 0


def check_out(out: Path) -> None:
    """Refuse, before any conversion work, an ``--out`` that exists or cannot be written."""
    if out.exists():
        raise UsageError(f"--out {out} already exists; pass a new path (atdiff never writes over one)")
    if not out.parent.exists():
        raise UsageError(f"--out {out}: folder {out.parent} does not exist; create it or choose another --out")
    check_writable(out)


# ------------------------------------------------------------------------------------------------
# Import
# ------------------------------------------------------------------------------------------------


def import_checkpoint(src: Path, options: ImportOptions | None = None) -> ImageDiffusionPipeline:
    """The atdiff pipeline of an upstream checkpoint (see ``atdiff import --help``)."""
    options = options or ImportOptions()
    if options.vae:
        vae_subfolder(Path(options.vae))  # a bad --vae fails before the (possibly large) checkpoint loads
    source = read_source(src, options.weights)
    check_weights(source.weights.items(), src)
    hints = source_hints(source).overridden_by(options.hints())
    if source.layout == "diffusers":
        weights, pos_embed = diffusers_to_atdiff(source.weights, source.diffusers_config["num_layers"]), None
    else:
        weights, pos_embed = timm_to_atdiff(source.weights)
    config = model_config(weights, pos_embed, hints)
    model = load_model(config, weights, pos_embed, src)
    vae_dir = options.vae or source.vae_dir
    return ImageDiffusionPipeline(
        model=model.eval(),
        scheduler=scheduler_for(hints.family, model.config.learn_sigma, source.scheduler_config),
        vae=vae_for_model(Path(vae_dir), model.config.in_channels) if vae_dir else None,
    )


def source_hints(source: Source) -> Hints:
    return hints_from_diffusers(source.diffusers_config) if source.layout == "diffusers" else hints_from_args(source.args)


def load_model(config: dict, weights: dict[str, torch.Tensor], pos_embed: torch.Tensor | None, src: Path) -> DiTModel:
    try:
        model = DiTModel(**config)
    except ValueError as err:
        raise UsageError(f"{src}: {err}") from None
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise UsageError(
            f"{src} does not fit a DiTModel {config['token_mixer']} of width {config['hidden_size']}: "
            f"missing {missing[:4]}, unexpected {unexpected[:4]} (a REPA checkpoint's projectors.* are not part of the model)"
        )
    if pos_embed is not None:  # ours is recomputed; a file with another table would compute something else
        table = sincos_position_table(config["hidden_size"], model.grid)
        if pos_embed.shape != table.shape or not torch.allclose(pos_embed.float(), table, atol=1e-5):
            raise UsageError(f"{src}: pos_embed is not DiT's fixed sin-cos table (learned or interpolated?); atdiff recomputes that table and cannot keep another")
    return model


def scheduler_for(family: str, learn_sigma: bool, source_config: dict | None) -> SchedulerMixin:
    """SiT: atdiff's flow scheduler. DiT/diffusers: DDPM on the source's betas (DiT's linear 1e-4..0.02
    by default) without sample clipping (DiT samples unclipped), with the learned variance if any."""
    if family == "sit":
        return build_objective(ObjectiveConfig(type="flow_matching")).make_scheduler()
    config = source_config or build_objective(ObjectiveConfig(type="ddpm")).make_scheduler().config
    return DDPMScheduler.from_config(
        config, variance_type="learned_range" if learn_sigma else "fixed_small", clip_sample=False, prediction_type="epsilon"
    )


def vae_subfolder(path: Path) -> str | None:
    """``"vae"`` for a pipeline folder, None for an AutoencoderKL folder; a UsageError for anything else."""
    if (path / "vae" / "config.json").is_file():
        return "vae"
    if (path / "config.json").is_file():
        return None
    raise UsageError(f"--vae {path} is not an AutoencoderKL folder (no config.json, nor vae/config.json)")


def vae_for_model(path: Path, latent_channels: int) -> AutoencoderKL:
    """The VAE folder ``path`` (or a pipeline folder's ``vae/``), refused unless it makes the model's latents."""
    vae = load_vae(path, vae_subfolder(path), setting="--vae")
    if vae.config.latent_channels != latent_channels:
        raise UsageError(f"--vae {path} has {vae.config.latent_channels} latent channels, the model {latent_channels}")
    return vae


def save_pipeline_folder(pipe, out: Path) -> None:
    """``pipe.save_pretrained(out)`` (a pipeline or a model); ``out`` exists only once complete."""
    with atomic_path(out) as partial:
        pipe.save_pretrained(partial)
