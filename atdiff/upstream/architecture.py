"""The ``DiTModel`` config of upstream weights: read from the weights where they imply it, from
hints (the file's ``args``, a diffusers config, command-line flags) where they do not."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from ..errors import UsageError
from ..models.dit import DIT_SIZES, dit_size
from .keymap import Weights

FAMILIES = ("dit", "sit")
# Constants of each source's code (see DiTModel's docstring).
FAMILY_CONFIG = {
    "dit": dict(time_convention="atdiff", timestep_freq_shift=0.0, mlp_norm_eps=1e-6),
    "sit": dict(time_convention="sit", timestep_freq_shift=0.0, mlp_norm_eps=1e-6),
    "diffusers": dict(time_convention="atdiff", timestep_freq_shift=1.0, mlp_norm_eps=1e-5),
}
DEFAULT_DROPOUT = 0.1  # DiT's and SiT's class_dropout_prob: what a null-label row implies
# Upstream model names: DiT-XL/2, SiT-B/2, SiT-ATConv-XL/2, SiT-ATConv-S/2-Hybrid (atdiff also writes T, XS).
MODEL_NAME = re.compile(r"(?P<family>DiT|SiT)(?P<atconv>-ATConv)?-(?P<size>[A-Z]+/\d+)(?P<hybrid>-Hybrid)?")


@dataclass
class Hints:
    """What weights do not hold. Each field names the flag that sets it, for error messages."""

    family: str | None = None  # --family
    size: str | None = None  # --size, e.g. "XL/2": heads (and a check of width, depth, patch)
    num_heads: int | None = None  # from a diffusers config or atdiff's own args
    num_classes: int | None = None  # --num-classes
    class_dropout_prob: float | None = None
    sample_size: int | list[int] | None = None  # --sample-size (latent size)

    def overridden_by(self, other: "Hints") -> "Hints":
        """These hints with every field ``other`` sets."""
        return replace(self, **{f.name: value for f in fields(other) if (value := getattr(other, f.name)) is not None})


def hints_from_args(args: dict[str, Any]) -> Hints:
    """Hints from a ``train.py`` checkpoint's args (DiT, SiT, the ATConv authors' or atdiff's export)."""
    hints = Hints(family=args.get("family"), num_classes=args.get("num_classes"), num_heads=args.get("num_heads"))
    name = MODEL_NAME.fullmatch(str(args.get("model", "")))
    if name:
        hints.family, hints.size = name["family"].lower(), name["size"]
    if "class_dropout_rate" in args:  # the ATConv authors' flag (DiT/SiT hard-code 0.1)
        hints.class_dropout_prob = float(args["class_dropout_rate"])
    if args.get("sample_size") is not None:  # atdiff's exports: the exact latent grid
        hints.sample_size = args["sample_size"]
    elif args.get("image_size"):  # upstream trains on VAE latents at 1/8 of the image size
        hints.sample_size = int(args["image_size"]) // 8
    if hints.family == "sit":
        path_type, prediction = args.get("path_type", "Linear"), args.get("prediction", "velocity")
        if (path_type, prediction) != ("Linear", "velocity"):
            raise UsageError(f"this SiT was trained with path_type={path_type}, prediction={prediction}; atdiff imports the Linear path with velocity prediction only")
    return hints


def hints_from_diffusers(config: dict[str, Any]) -> Hints:
    if not config.get("attention_bias", True) or config.get("norm_type", "ada_norm_zero") != "ada_norm_zero":
        raise UsageError("this DiTTransformer2DModel has no attention biases or another norm_type than ada_norm_zero; DiT's layout needs both")
    return Hints(
        family="diffusers",
        num_heads=config["num_attention_heads"],
        num_classes=config["num_embeds_ada_norm"],
        class_dropout_prob=DEFAULT_DROPOUT,  # CombinedTimestepLabelEmbeddings' fixed value
        sample_size=config["sample_size"],
    )


# ------------------------------------------------------------------------------------------------
# Reading the config off the weights
# ------------------------------------------------------------------------------------------------


def model_config(weights: Weights, pos_embed: torch.Tensor | None, hints: Hints) -> dict[str, Any]:
    """``DiTModel`` keyword arguments for ``weights`` (in DiTModel's names)."""
    if hints.family is None:
        raise UsageError("the file does not say whether it is a DiT (DDPM) or a SiT (flow) model: pass --family dit or --family sit")
    hidden, in_channels, patch, _ = weights["x_embedder.proj.weight"].shape
    depth = 1 + max(int(m.group(1)) for k in weights if (m := re.match(r"blocks\.(\d+)\.", k)))
    mixers = [mixer_kind(weights, n) for n in range(depth)]
    token_mixer = token_mixer_of(mixers)
    out_rows = weights["final_layer.linear.weight"].shape[0]
    if out_rows not in (patch * patch * in_channels, 2 * patch * patch * in_channels):
        raise UsageError(f"final_layer.linear has {out_rows} rows; a DiT with {in_channels} input channels and patch {patch} has {patch * patch * in_channels} (or twice that with learned sigma)")
    config = dict(
        sample_size=sample_size_of(pos_embed, patch, hints),
        patch_size=patch,
        in_channels=in_channels,
        hidden_size=hidden,
        depth=depth,
        num_heads=num_heads_of(hints, hidden, depth, patch, needed="attention" in mixers),
        mlp_ratio=weights["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
        learn_sigma=out_rows == 2 * patch * patch * in_channels,
        token_mixer=token_mixer,
        **label_config(weights, hints),
        **FAMILY_CONFIG[hints.family],
    )
    if "atconv" in mixers:
        kernel_taps = weights[f"blocks.{mixers.index('atconv')}.mixer.kernel_gen.weight"].shape[0]
        config.update(atconv_kernel_size=math.isqrt(kernel_taps), atconv_pooling="1d", atconv_inhibition=True)
    return config


def mixer_kind(weights: Weights, block: int) -> str:
    if f"blocks.{block}.mixer.qkv.weight" in weights:
        return "attention"
    if f"blocks.{block}.mixer.kernel_proj.weight" in weights:
        return "atconv"
    raise UsageError(f"block {block} has neither attention (attn.qkv) nor ATConv (attn.kernel_proj) weights")


def token_mixer_of(mixers: list[str]) -> str:
    """``DiTModel``'s ``token_mixer`` for a per-block list; the authors' hybrid has attention in even blocks."""
    for name in ("attention", "atconv"):
        if all(m == name for m in mixers):
            return name
    if all(m == ("atconv" if i % 2 else "attention") for i, m in enumerate(mixers)):
        return "hybrid"
    raise UsageError(f"blocks mix attention and ATConv as {mixers}; DiTModel supports all-attention, all-ATConv or the authors' hybrid (ATConv in odd blocks)")


def num_heads_of(hints: Hints, hidden: int, depth: int, patch: int, needed: bool) -> int:
    if hints.size is not None:
        try:
            size = dit_size(hints.size)
        except ValueError as err:
            raise UsageError(f"--size: {err}") from None
        found = dict(hidden_size=hidden, depth=depth, patch_size=patch)
        if any(size[k] != v for k, v in found.items()):
            raise UsageError(f"--size {hints.size} means {', '.join(f'{k}={size[k]}' for k in found)}, but the weights have {', '.join(f'{k}={v}' for k, v in found.items())}")
        return size["num_heads"]
    if hints.num_heads is not None:
        return int(hints.num_heads)
    if needed:
        names = "/".join(DIT_SIZES)
        raise UsageError(f"the file does not say how many attention heads the model has: pass --size (SIZE/PATCH, SIZE in {names}; e.g. XL/{patch} for width 1152)")
    return 1  # no attention layer: heads are unused


def sample_size_of(pos_embed: torch.Tensor | None, patch: int, hints: Hints) -> int | list[int]:
    """From the stored position table (N tokens of a square grid), else the hints."""
    if pos_embed is not None:
        side = math.isqrt(pos_embed.shape[1])
        if side * side != pos_embed.shape[1]:
            raise UsageError(f"pos_embed has {pos_embed.shape[1]} positions, not a square grid")
        return side * patch
    if hints.sample_size is None:
        raise UsageError("the weights have no position table to read the latent size from: pass --sample-size (e.g. 32 for 256x256 images)")
    return hints.sample_size


def label_config(weights: Weights, hints: Hints) -> dict[str, Any]:
    """``num_classes`` and ``class_dropout_prob``: a table with a row more than the classes holds the null label."""
    table = weights.get("y_embedder.embedding_table.weight")
    if table is None:
        return dict(num_classes=0, class_dropout_prob=0.0)
    rows = table.shape[0]
    num_classes = hints.num_classes if hints.num_classes is not None else rows - 1  # DiT/SiT release files
    if rows not in (num_classes, num_classes + 1):
        raise UsageError(f"the label table has {rows} rows, which does not fit --num-classes {num_classes} (it should have that many, or one more for the null label)")
    has_null = rows == num_classes + 1
    dropout = hints.class_dropout_prob if hints.class_dropout_prob else DEFAULT_DROPOUT
    return dict(num_classes=num_classes, class_dropout_prob=dropout if has_null else 0.0)
