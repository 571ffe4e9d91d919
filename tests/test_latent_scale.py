"""``python -m atdiff.eval.latent_scale`` at toy sizes: FLOPs match the published count, the loader
timing reads a real store and leaves nothing behind."""

import tempfile
from pathlib import Path

import torch

from atdiff.eval import latent_scale


def test_sit_xl2_forward_flops_match_dits_published_count():
    costs = latent_scale.training_costs(gpu_tflops=400.0, sizes=("xl2",), sizes_512=("xl2",))
    xl = costs["xl2-attention"]
    # DiT-XL/2: 118.6 Gflops in the DiT paper, counted as multiply-adds (fvcore); 675M parameters.
    assert abs(xl["forward_gflops_per_image"] / 2 - 118.6) < 0.6 and abs(xl["params_m"] - 675) < 1
    assert costs["xl2-atconv"]["forward_gflops_per_image"] < costs["xl2-hybrid"]["forward_gflops_per_image"] < xl["forward_gflops_per_image"]
    assert xl["gpu_hours"] == round(400_000 * 256 * 3 * xl["forward_gflops_per_image"] * 1e9 / 400e12 / 3600, 1)
    # At 512 px (1024 tokens): DiT-XL/2-512's published 524.6 Gflops (multiply-adds); ATConv gains more there.
    xl512 = costs["512-xl2-attention"]
    assert abs(xl512["forward_gflops_per_image"] / 2 - 524.6) < 2.5
    saving = {res: 1 - costs[f"{res}xl2-atconv"]["forward_gflops_per_image"] / costs[f"{res}xl2-attention"]["forward_gflops_per_image"]
              for res in ("", "512-")}
    assert saving["512-"] > saving[""]


def test_loader_throughput_on_a_small_synthetic_store():
    before = set(Path(tempfile.gettempdir()).glob("atdiff-latent-scale-*"))
    torch.set_num_threads(1)
    out = latent_scale.loader_throughput(count=5000, batch_size=8, workers=[0], seconds=0.2)
    assert out["images"] == 5000 and out["store_gb"] == 0.16  # 5000 x 32 KiB of posteriors (+ labels) in 2 shards
    assert set(out["images_per_s"]) == {"workers=0,cold", "workers=0,warm"} and min(out["images_per_s"].values()) > 0
    assert set(Path(tempfile.gettempdir()).glob("atdiff-latent-scale-*")) == before
