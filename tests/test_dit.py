"""DiTModel: shapes, mixers, parameter counts, persistence."""

import pytest
import torch
from diffusers.training_utils import EMAModel

from atdiff import ATConv, DiTModel, dit_size
from atdiff.nn import SelfAttention


def tiny(token_mixer="atconv", **kwargs) -> DiTModel:
    torch.manual_seed(0)
    cfg = dict(sample_size=16, patch_size=2, in_channels=1, hidden_size=32, depth=4, num_heads=2,
               num_classes=10, learn_sigma=False, token_mixer=token_mixer)
    return DiTModel(**{**cfg, **kwargs})


def perturb(model: torch.nn.Module) -> torch.nn.Module:
    """Zero-init adaLN makes a fresh DiT output zeros; give every parameter a value."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def inputs(batch=3, size=16, channels=1):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(batch, channels, size, size, generator=g), torch.tensor([1, 500, 999][:batch]),
            torch.tensor([0, 5, 9][:batch]))


@pytest.mark.parametrize("size", ["XS/2", "T/4", "S/2"])
@pytest.mark.parametrize("token_mixer", ["attention", "atconv", "hybrid"])
def test_forward_shape_and_parameter_count(size, token_mixer, capsys):
    model = DiTModel(sample_size=32, in_channels=1, num_classes=10, learn_sigma=False, token_mixer=token_mixer, **dit_size(size))
    x, t, y = inputs(2, 32)
    out = model.eval()(x, t[:2], y[:2]).sample
    assert out.shape == x.shape
    n = sum(p.numel() for p in model.parameters())
    with capsys.disabled():
        print(f"\nDiT-{size} {token_mixer}: {n:,} parameters, output {tuple(out.shape)}")

    # Only the mixers differ: per block attention has qkv + proj = 4C^2 + 4C parameters, ATConv
    # three C x C linears (3C^2 + 3C), the k*k mixer (81 + 9) and difference_control (C).
    C, depth = dit_size(size)["hidden_size"], dit_size(size)["depth"]
    attention = DiTModel(sample_size=32, in_channels=1, num_classes=10, learn_sigma=False, token_mixer="attention", **dit_size(size))
    n_attention = sum(p.numel() for p in attention.parameters())
    per_block_saving = (4 * C * C + 4 * C) - (3 * C * C + 3 * C + 90 + C)
    swapped = {"attention": 0, "atconv": depth, "hybrid": depth // 2}[token_mixer]
    assert n == n_attention - swapped * per_block_saving


def test_mixer_layout_and_position_embedding():
    assert all(isinstance(b.mixer, SelfAttention) for b in tiny("attention").blocks)
    assert all(isinstance(b.mixer, ATConv) for b in tiny("atconv").blocks)
    hybrid = [type(b.mixer) for b in tiny("hybrid").blocks]
    assert hybrid == [SelfAttention, ATConv, SelfAttention, ATConv]
    # ATConv carries position itself (authors drop the absolute embedding); any attention keeps it.
    assert tiny("atconv").x_embedder.pos_embed is None
    assert tiny("hybrid").x_embedder.pos_embed is not None
    # the sin-cos table is recomputed at load, never stored
    assert not any("pos_embed" in k for k in tiny("attention").state_dict())


def test_fresh_model_outputs_zero():
    """adaLN-Zero + zero output layer: training starts from the identity residual stream."""
    x, t, y = inputs()
    assert torch.count_nonzero(tiny()(x, t, y).sample) == 0


@pytest.mark.parametrize("token_mixer", ["attention", "atconv", "hybrid"])
def test_save_load_round_trip_is_bit_exact(token_mixer, tmp_path):
    model = perturb(tiny(token_mixer)).eval()
    x, t, y = inputs()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = DiTModel.from_pretrained(tmp_path).eval()
    assert loaded.config.token_mixer == token_mixer
    assert torch.equal(model(x, t, y).sample, loaded(x, t, y).sample)


def test_ema_save_pretrained_round_trip(tmp_path):
    """diffusers' EMAModel rebuilds from config and copies parameters by position."""
    model = perturb(tiny("hybrid")).eval()
    ema = EMAModel(model.parameters(), model_cls=DiTModel, model_config=model.config)
    ema.save_pretrained(tmp_path)
    loaded = DiTModel.from_pretrained(tmp_path).eval()
    x, t, y = inputs()
    assert torch.equal(model(x, t, y).sample, loaded(x, t, y).sample)


def test_label_dropout_uses_the_null_label():
    model = perturb(tiny(class_dropout_prob=1.0))
    x, t, y = inputs()
    dropped = model.train()(x, t, y).sample
    null = model.eval()(x, t, torch.full_like(y, 10)).sample
    assert torch.equal(dropped, null)
    assert not torch.equal(null, model(x, t, y).sample)


def test_learned_sigma_doubles_output_channels():
    model = tiny(learn_sigma=True, in_channels=3)
    x, t, y = inputs(channels=3)
    assert model(x, t, y).sample.shape == (3, 6, 16, 16)


def test_unconditional_and_scalar_timestep():
    model = perturb(tiny(num_classes=0))
    x, _, _ = inputs()
    assert model(x, 10).sample.shape == x.shape


def test_non_square_samples():
    model = perturb(tiny("hybrid", sample_size=(8, 16)))
    out = model(torch.randn(2, 1, 8, 16), torch.tensor([3, 4]), torch.tensor([0, 1])).sample
    assert out.shape == (2, 1, 8, 16)


def test_no_weight_decay_names():
    names = tiny("hybrid").no_weight_decay()
    assert names == {"blocks.1.mixer.difference_control", "blocks.3.mixer.difference_control"}


def test_errors():
    model = tiny()
    x, t, y = inputs()
    with pytest.raises(ValueError, match="class_labels"):
        model(x, t)
    with pytest.raises(ValueError, match=r"\(B, 1, 16, 16\)"):
        model(torch.randn(1, 1, 8, 8), t[:1], y[:1])
    with pytest.raises(ValueError, match="token_mixer"):
        tiny("mamba")
    with pytest.raises(ValueError, match="SIZE/PATCH"):
        dit_size("M/2")
