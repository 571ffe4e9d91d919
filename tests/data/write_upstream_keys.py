"""Writes upstream_keys.json: the state-dict keys and shapes the upstream model classes have at
XL/2, transcribed from their module definitions (facebookresearch/DiT models.py, willisma/SiT
models.py, price112/Attentive-Convolution generation/SiT/models.py), independently of atdiff's code.

    python tests/data/write_upstream_keys.py
"""

import json
from pathlib import Path

HIDDEN, DEPTH, PATCH, IN_CHANNELS, LATENT, CLASSES, FREQ = 1152, 28, 2, 4, 32, 1000, 256
K2 = 9  # ATConv kernel taps (3x3)


def linear(name, out_dim, in_dim):
    return [[f"{name}.weight", [out_dim, in_dim]], [f"{name}.bias", [out_dim]]]


def attention(prefix):
    return linear(f"{prefix}.qkv", 3 * HIDDEN, HIDDEN) + linear(f"{prefix}.proj", HIDDEN, HIDDEN)


def atconv(prefix):  # the module's own parameter first, then its children in definition order
    return ([[f"{prefix}.difference_control", [HIDDEN]]] + linear(f"{prefix}.kernel_proj", HIDDEN, HIDDEN)
            + linear(f"{prefix}.kernel_gen", K2, K2) + linear(f"{prefix}.x_proj", HIDDEN, HIDDEN)
            + linear(f"{prefix}.proj", HIDDEN, HIDDEN))


def model(mixer_of_block, pos_embed=True):
    keys = [["pos_embed", [1, (LATENT // PATCH) ** 2, HIDDEN]]] if pos_embed else []
    keys += [["x_embedder.proj.weight", [HIDDEN, IN_CHANNELS, PATCH, PATCH]], ["x_embedder.proj.bias", [HIDDEN]]]
    keys += linear("t_embedder.mlp.0", HIDDEN, FREQ) + linear("t_embedder.mlp.2", HIDDEN, HIDDEN)
    keys += [["y_embedder.embedding_table.weight", [CLASSES + 1, HIDDEN]]]  # + the null label (dropout 0.1)
    for n in range(DEPTH):
        keys += mixer_of_block(n)(f"blocks.{n}.attn")
        keys += linear(f"blocks.{n}.mlp.fc1", 4 * HIDDEN, HIDDEN) + linear(f"blocks.{n}.mlp.fc2", HIDDEN, 4 * HIDDEN)
        keys += linear(f"blocks.{n}.adaLN_modulation.1", 6 * HIDDEN, HIDDEN)
    keys += linear("final_layer.linear", PATCH * PATCH * 2 * IN_CHANNELS, HIDDEN)  # learned sigma: 2x channels
    keys += linear("final_layer.adaLN_modulation.1", 2 * HIDDEN, HIDDEN)
    return keys


tables = {
    "_about": __doc__.strip().splitlines()[0] + " See write_upstream_keys.py.",
    "DiT-XL/2": model(lambda n: attention),
    "SiT-XL/2": model(lambda n: attention),  # SiT's network is DiT's
    "SiT-ATConv-XL/2": model(lambda n: atconv, pos_embed=False),
    "SiT-ATConv-XL/2-Hybrid": model(lambda n: atconv if n % 2 else attention),
}
Path(__file__).with_name("upstream_keys.json").write_text(json.dumps(tables, separators=(",", ":")) + "\n")
