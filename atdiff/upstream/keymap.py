"""State-dict key layouts of the upstream codebases and ``DiTModel``'s, in both directions.

- DiT / SiT / ATConv-SiT (facebookresearch/DiT, willisma/SiT, the ATConv authors): timm's layout.
  Only the timestep MLP and the token mixer are named differently; ``pos_embed`` (a fixed sin-cos
  table) is stored there and recomputed here.
- diffusers ``DiTTransformer2DModel``: q, k, v as separate linears, and the timestep and label
  embedders held by every block (identical copies of DiT's single ones).
"""

from __future__ import annotations

import re

import torch

from ..errors import UsageError

Weights = dict[str, torch.Tensor]

# ------------------------------------------------------------------------------------------------
# DiT / SiT / ATConv-SiT
# ------------------------------------------------------------------------------------------------

# (upstream pattern, atdiff replacement) and back; every other key has the same name in both.
TIMM_TO_ATDIFF = [
    (r"^t_embedder\.mlp\.0\.", "t_embedder.linear_1."),
    (r"^t_embedder\.mlp\.2\.", "t_embedder.linear_2."),
    (r"^blocks\.(\d+)\.attn\.", r"blocks.\1.mixer."),
]
ATDIFF_TO_TIMM = [
    (r"^t_embedder\.linear_1\.", "t_embedder.mlp.0."),
    (r"^t_embedder\.linear_2\.", "t_embedder.mlp.2."),
    (r"^blocks\.(\d+)\.mixer\.", r"blocks.\1.attn."),
]
POS_EMBED = "pos_embed"
# Keys every DiT/SiT state dict has, to recognise one (and name in errors when a file is something else).
TIMM_SIGNATURE = ("x_embedder.proj.weight", "t_embedder.mlp.0.weight", "blocks.0.adaLN_modulation.1.weight", "final_layer.linear.weight")


def rename(weights: Weights, rules: list[tuple[str, str]]) -> Weights:
    out = {}
    for key, value in weights.items():
        for pattern, replacement in rules:
            key, hits = re.subn(pattern, replacement, key)
            if hits:
                break
        out[key] = value
    return out


def timm_to_atdiff(weights: Weights) -> tuple[Weights, torch.Tensor | None]:
    """A DiT/SiT state dict in ``DiTModel``'s names, and the stored ``pos_embed`` (None if absent)."""
    weights = dict(weights)
    pos_embed = weights.pop(POS_EMBED, None)
    return rename(weights, TIMM_TO_ATDIFF), pos_embed


def atdiff_to_timm(weights: Weights, pos_embed: torch.Tensor | None) -> Weights:
    """A ``DiTModel`` state dict in DiT/SiT's names, ``pos_embed`` first as upstream stores it."""
    head = {POS_EMBED: pos_embed.clone()} if pos_embed is not None else {}
    return {**head, **rename(weights, ATDIFF_TO_TIMM)}


# ------------------------------------------------------------------------------------------------
# diffusers DiTTransformer2DModel
# ------------------------------------------------------------------------------------------------

# Per-block diffusers names of DiT's shared conditioning (copied into every block there).
SHARED_EMBEDDERS = {
    "t_embedder.linear_1.": "norm1.emb.timestep_embedder.linear_1.",
    "t_embedder.linear_2.": "norm1.emb.timestep_embedder.linear_2.",
    "y_embedder.embedding_table.": "norm1.emb.class_embedder.embedding_table.",
}
# Per-block names: atdiff block-relative -> diffusers block-relative (q, k, v handled apart).
BLOCK_KEYS = {
    "adaLN_modulation.1.": "norm1.linear.",
    "mixer.proj.": "attn1.to_out.0.",
    "mlp.fc1.": "ff.net.0.proj.",
    "mlp.fc2.": "ff.net.2.",
}
TOP_KEYS = {
    "x_embedder.proj.": "pos_embed.proj.",
    "final_layer.adaLN_modulation.1.": "proj_out_1.",
    "final_layer.linear.": "proj_out_2.",
}
QKV = ("to_q", "to_k", "to_v")
DIFFUSERS_SIGNATURE = ("pos_embed.proj.weight", "transformer_blocks.0.attn1.to_q.weight", "proj_out_2.weight")


def atdiff_to_diffusers(weights: Weights, depth: int) -> Weights:
    """An attention ``DiTModel`` state dict in ``DiTTransformer2DModel``'s names."""
    out = {}
    for key, value in weights.items():
        top = next((k for k in TOP_KEYS if key.startswith(k)), None)
        shared = next((k for k in SHARED_EMBEDDERS if key.startswith(k)), None)
        if top:
            out[TOP_KEYS[top] + key[len(top):]] = value
        elif shared:
            for n in range(depth):
                out[f"transformer_blocks.{n}.{SHARED_EMBEDDERS[shared]}{key[len(shared):]}"] = value.clone()
        else:
            n, rest = re.fullmatch(r"blocks\.(\d+)\.(.*)", key).groups()
            prefix = f"transformer_blocks.{n}."
            if rest.startswith("mixer.qkv."):  # timm's fused rows are q, k, v in that order
                for name, part in zip(QKV, value.chunk(3, dim=0)):
                    out[f"{prefix}attn1.{name}.{rest.rsplit('.', 1)[1]}"] = part.clone()
            else:
                block_key = next(k for k in BLOCK_KEYS if rest.startswith(k))
                out[prefix + BLOCK_KEYS[block_key] + rest[len(block_key):]] = value
    return out


def diffusers_to_atdiff(weights: Weights, depth: int) -> Weights:
    """A ``DiTTransformer2DModel`` state dict in ``DiTModel``'s names. The per-block embedder copies
    must be identical (DiTModel has one); block 0's are kept."""
    out = {}
    for atdiff_key, diffusers_key in TOP_KEYS.items():
        for suffix in ("weight", "bias"):
            out[atdiff_key + suffix] = weights[diffusers_key + suffix]
    for atdiff_key, block_key in SHARED_EMBEDDERS.items():
        for suffix in ("weight", "bias") if "embedding_table" not in atdiff_key else ("weight",):
            copies = [weights[f"transformer_blocks.{n}.{block_key}{suffix}"] for n in range(depth)]
            if any(not torch.equal(copies[0], copy) for copy in copies[1:]):
                raise UsageError(
                    f"the blocks' copies of {block_key}{suffix} differ; DiTModel shares one timestep/label "
                    f"embedder, so this DiTTransformer2DModel cannot be imported without changing what it computes"
                )
            out[atdiff_key + suffix] = copies[0]
    for n in range(depth):
        prefix = f"transformer_blocks.{n}."
        for suffix in ("weight", "bias"):
            out[f"blocks.{n}.mixer.qkv.{suffix}"] = torch.cat([weights[f"{prefix}attn1.{q}.{suffix}"] for q in QKV])
            for atdiff_key, block_key in BLOCK_KEYS.items():
                out[f"blocks.{n}.{atdiff_key}{suffix}"] = weights[prefix + block_key + suffix]
    return out
