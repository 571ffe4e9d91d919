"""``atdiff export PIPELINE_DIR --to dit|sit|diffusers --out PATH``: an atdiff ``DiTModel`` back in an
upstream layout, for DiT/SiT/the ATConv authors' code or diffusers.

``dit``/``sit`` write one ``torch.save`` file ``{"model", "ema", "args"}`` (the same tensors under both
names, stored once): DiT's and SiT's ``find_model`` take ``ema``, the ATConv authors' ``train.py
--ckpt`` takes ``model``, and ``args`` is a plain dict (loadable with ``weights_only=True``) naming
the model as their scripts do. ``diffusers`` writes a ``DiTTransformer2DModel`` folder, or a
``DiTPipeline`` folder when the pipeline has a VAE. A model is only exported to a layout whose code
computes what it computes; otherwise the error says which constant differs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, DiTPipeline, DiTTransformer2DModel

from ..errors import UsageError
from ..files import atomic_path
from ..integrity import write_pipeline_manifest
from ..models.dit import DIT_SIZES, DiTModel
from ..pipelines import ImageDiffusionPipeline
from ..pipelines.schedulers import FLOW_PREDICTION
from ..generation.loading import load_pipeline
from .architecture import FAMILY_CONFIG
from .importing import check_out, save_pipeline_folder
from .keymap import atdiff_to_diffusers, atdiff_to_timm

TARGETS = ("dit", "sit", "diffusers")
# What each target's sampler expects the model to predict.
TARGET_PREDICTION = {"dit": "epsilon", "sit": FLOW_PREDICTION, "diffusers": "epsilon"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pipeline_dir", metavar="PIPELINE_DIR", help="an atdiff pipeline folder with a DiTModel (from atdiff train or atdiff import)")
    parser.add_argument("--to", required=True, choices=TARGETS, help="dit / sit: a .pt for facebookresearch/DiT, willisma/SiT or the ATConv authors' SiT; diffusers: a DiTTransformer2DModel (or DiTPipeline) folder")
    parser.add_argument("--out", required=True, help="file (dit, sit) or folder (diffusers) to write; must not exist")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    check_out(out)
    export_pipeline(load_pipeline(Path(args.pipeline_dir), scheduler=None, device="cpu"), args.to, out)
    print(f"exported {args.pipeline_dir} -> {out} ({args.to} layout)")
    return 0


def export_pipeline(pipe: ImageDiffusionPipeline, to: str, out: Path) -> None:
    model = pipe.model
    check_exportable(model, pipe.config.prediction_type, to)
    if to == "diffusers":
        save_diffusers(pipe, out)
    else:
        weights = timm_weights(model)
        # To a file object: torch.save names the zip's inner folder after a path's stem, which here would
        # be the temporary name; a file object's is "archive".
        with atomic_path(out) as partial, open(partial, "wb") as file:
            torch.save({"model": weights, "ema": weights, "args": upstream_args(pipe, to)}, file)


def timm_weights(model: DiTModel) -> dict:
    """The model's state dict in DiT/SiT's names, with their stored ``pos_embed`` where they have one."""
    return atdiff_to_timm(model.state_dict(), model.x_embedder.pos_embed)


# ------------------------------------------------------------------------------------------------
# What each layout can hold
# ------------------------------------------------------------------------------------------------


def check_exportable(model, prediction_type: str, to: str) -> None:
    if not isinstance(model, DiTModel):
        raise UsageError(f"only DiTModel pipelines export to upstream layouts; this one holds a {type(model).__name__}")
    config = model.config
    family = "diffusers" if to == "diffusers" else to
    differing = [f"{k}={config[k]} (the {to} layout needs {v})" for k, v in FAMILY_CONFIG[family].items() if config[k] != v]
    if differing:
        raise UsageError(f"the {to} code would compute something else for this model: {', '.join(differing)}")
    if prediction_type != TARGET_PREDICTION[to]:
        raise UsageError(f"this model predicts {prediction_type}, {to}'s sampler expects {TARGET_PREDICTION[to]}")
    if to == "diffusers":
        if config.token_mixer != "attention":
            raise UsageError(f"diffusers' DiTTransformer2DModel has attention only; this model's token_mixer is {config.token_mixer} (export --to sit/dit)")
        if not config.num_classes or not config.class_dropout_prob or not isinstance(config.sample_size, int):
            raise UsageError("diffusers' DiTTransformer2DModel needs a class-conditional model with a null label (class_dropout_prob > 0) on a square latent")


def size_name(config) -> str | None:
    dims = dict(hidden_size=config.hidden_size, depth=config.depth, num_heads=config.num_heads)
    return next((name for name, size in DIT_SIZES.items() if size == dims), None)


def upstream_args(pipe: ImageDiffusionPipeline, to: str) -> dict[str, Any]:
    """``train.py``-style args: the model name their scripts use, plus the exact values atdiff reads back."""
    config = pipe.model.config
    args: dict[str, Any] = {}
    size = size_name(config)
    if size is not None:
        atconv = "-ATConv" if config.token_mixer != "attention" else ""
        hybrid = "-Hybrid" if config.token_mixer == "hybrid" else ""
        args["model"] = f"{'SiT' if to == 'sit' else 'DiT'}{atconv}-{size}/{config.patch_size}{hybrid}"
    sample_size = config.sample_size
    downscale = 2 ** (len(pipe.vae.config.block_out_channels) - 1) if pipe.vae is not None else 1
    args.update(
        family=to,  # atdiff's own key: the model name above exists only for the published sizes
        image_size=(sample_size if isinstance(sample_size, int) else max(sample_size)) * downscale,
        sample_size=sample_size,
        num_heads=config.num_heads,
        num_classes=config.num_classes,
        class_dropout_rate=config.class_dropout_prob,
        learn_sigma=config.learn_sigma,
    )
    if to == "sit":
        args.update(path_type="Linear", prediction="velocity")
    return args


# ------------------------------------------------------------------------------------------------
# diffusers
# ------------------------------------------------------------------------------------------------


def diffusers_transformer(model: DiTModel) -> DiTTransformer2DModel:
    config = model.config
    transformer = DiTTransformer2DModel(
        num_attention_heads=config.num_heads,
        attention_head_dim=config.hidden_size // config.num_heads,
        in_channels=config.in_channels,
        out_channels=model.out_channels,
        num_layers=config.depth,
        sample_size=config.sample_size,
        patch_size=config.patch_size,
        num_embeds_ada_norm=config.num_classes,
        norm_eps=config.mlp_norm_eps,
    )
    transformer.load_state_dict(atdiff_to_diffusers(model.state_dict(), config.depth), strict=True)
    return transformer.eval()


def save_diffusers(pipe: ImageDiffusionPipeline, out: Path) -> None:
    transformer = diffusers_transformer(pipe.model)
    if pipe.vae is None:
        save_pipeline_folder(transformer, out)
        return
    # DiTPipeline drops the learned-sigma channels before the scheduler, so its DDPM uses fixed variances.
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config, variance_type="fixed_small")
    with atomic_path(out) as partial:
        DiTPipeline(transformer=transformer, vae=pipe.vae, scheduler=scheduler).save_pretrained(partial)
        write_pipeline_manifest(partial)  # diffusers writes none; `atdiff import` verifies it
