"""Starting a model from a pretrained one with other token mixers (``model.init_from``).

Every weight of the pretrained model that still fits (same name, same shape) is copied; each ATConv
layer that takes an attention layer's place starts from that attention: ``x_proj`` from its value
projection, ``proj`` from its output projection (what ``swap_attention(init="from_attention")``
does), the kernel generator fresh. Fine-tuning (or distillation) then teaches the kernels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..errors import UsageError
from ..files import read_json_object
from ..integrity import check_pipeline_folder, check_weight_files
from ..nn import ATConv, SelfAttention

# Classes a pretrained folder may hold, by the name its config.json gives: nothing else is imported.
PRETRAINED_CLASSES = ("DiTModel", "MixerUNet2DModel", "UNet2DModel")


# ------------------------------------------------------------------------------------------------
# Pretrained folders
# ------------------------------------------------------------------------------------------------


def pretrained_model_dir(path: str | Path) -> Path:
    """The model folder of an atdiff pipeline folder (``model/``), or ``path`` itself if it is a model folder."""
    path = Path(path)
    for folder in (path / "model", path):
        if (folder / "config.json").is_file():
            return folder
    raise UsageError(
        f"{path} is not a pipeline folder (from atdiff train or atdiff import) nor a model folder (config.json); "
        f"upstream DiT/SiT checkpoints convert with `atdiff import` first"
    )


def model_config_json(path: str | Path) -> dict:
    return read_json_object(pretrained_model_dir(path) / "config.json", "pass a folder written by atdiff train or save_pretrained")


def pretrained_class_name(path: str | Path) -> str:
    name = model_config_json(path).get("_class_name")
    if name not in PRETRAINED_CLASSES:
        raise UsageError(f"{path} holds a {name}; model.init_from and objective.distill_from take {', '.join(PRETRAINED_CLASSES)}")
    return name


def pretrained_config(path: str | Path) -> dict:
    """The constructor arguments of the pretrained model (a stock ``UNet2DModel`` has attention only)."""
    config = model_config_json(path)
    if pretrained_class_name(path) == "UNet2DModel":
        config["token_mixer"] = "attention"
    return {k: v for k, v in config.items() if not k.startswith("_")}


def load_pretrained(path: str | Path) -> ModelMixin:
    """The model of a pipeline folder (verified like any pipeline: see ``atdiff.integrity``) or a model folder."""
    from . import DiTModel, MixerUNet2DModel

    classes = {"DiTModel": DiTModel, "MixerUNet2DModel": MixerUNet2DModel, "UNet2DModel": UNet2DModel}
    model_dir = pretrained_model_dir(path)
    if model_dir == Path(path, "model"):
        check_pipeline_folder(Path(path))
    else:
        check_weight_files(model_dir)
    return classes[pretrained_class_name(path)].from_pretrained(model_dir)


# ------------------------------------------------------------------------------------------------
# Copying weights across token mixers
# ------------------------------------------------------------------------------------------------


@dataclass
class Transfer:
    """What ``initialize_from_`` did, by parameter/buffer name and ATConv module path."""

    copied: list[str] = field(default_factory=list)
    from_attention: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)

    def summary(self) -> str:
        fresh = f"; fresh: {', '.join(self.fresh[:6])}{' ...' if len(self.fresh) > 6 else ''}" if self.fresh else ""
        return (f"{len(self.copied)} tensors copied, {len(self.from_attention)} ATConv layers started from the "
                f"attention they replace{fresh}")


@torch.no_grad()
def initialize_from_(target: nn.Module, source: nn.Module) -> Transfer:
    """Give ``target`` every weight of ``source`` that fits, and its ATConv layers the value/output
    projections of the attention at the same place in ``source``."""
    source_state = source.state_dict()
    target_state = target.state_dict()
    fitting = {k: v for k, v in source_state.items() if k in target_state and target_state[k].shape == v.shape}
    target.load_state_dict(fitting, strict=False)
    transfer = Transfer(copied=list(fitting))
    source_modules = dict(source.named_modules())
    for path, module in target.named_modules():
        attn = replaced_attention(source_modules, path) if isinstance(module, ATConv) else None
        if attn is not None and fits(module, attn):  # a changed width leaves the layer fresh
            init_atconv_from_attention_(module, attn)
            transfer.from_attention.append(path)
    started = {f"{path}.{p}.{w}" for path in transfer.from_attention for p in ("x_proj", "proj") for w in ("weight", "bias")}
    transfer.fresh = [k for k in target_state if k not in fitting and k not in started]
    return transfer


def replaced_attention(source_modules: dict[str, nn.Module], atconv_path: str) -> nn.Module | None:
    """The source's attention where the target has an ATConv: at the same path (DiTModel's mixers) or at
    its parent's (a swapped diffusers ``Attention``, whose ATConv sits in ``ATConvAttention.atconv``)."""
    parent = atconv_path.rpartition(".")[0]
    for candidate in (source_modules.get(atconv_path), source_modules.get(parent)):
        if isinstance(candidate, (SelfAttention, Attention)):
            return candidate
    return None


Projection = tuple[torch.Tensor, torch.Tensor | None]  # (weight, bias)


def attention_projections(attn: nn.Module) -> tuple[Projection, Projection]:
    """The value and output projections of atdiff's fused-qkv ``SelfAttention`` or diffusers' ``Attention``."""
    if isinstance(attn, SelfAttention):
        width = attn.proj.in_features
        value_bias = None if attn.qkv.bias is None else attn.qkv.bias[2 * width:]
        return (attn.qkv.weight[2 * width:], value_bias), (attn.proj.weight, attn.proj.bias)  # qkv rows: q, k, v
    return (attn.to_v.weight, attn.to_v.bias), (attn.to_out[0].weight, attn.to_out[0].bias)


def fits(atconv: ATConv, attn: nn.Module) -> bool:
    (value, _), (output, _) = attention_projections(attn)
    return atconv.x_proj.weight.shape == value.shape and atconv.proj.weight.shape == output.shape


@torch.no_grad()
def init_atconv_from_attention_(atconv: ATConv, attn: nn.Module) -> None:
    """``x_proj`` <- the attention's value projection, ``proj`` <- its output projection (zero bias
    where it has none)."""
    if not fits(atconv, attn):
        raise ValueError(f"cannot start ATConv {atconv.extra_repr()} from an attention layer of other widths")
    for layer, (weight, bias) in zip((atconv.x_proj, atconv.proj), attention_projections(attn)):
        layer.weight.copy_(weight)
        layer.bias.copy_(bias) if bias is not None else layer.bias.zero_()
