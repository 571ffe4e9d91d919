"""swap_attention on stock diffusers models, ATConvAttention, and persistence of swapped models."""

import copy

import pytest
import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel, UNet2DConditionModel, UNet2DModel
from diffusers.models.attention_processor import Attention
from diffusers.training_utils import EMAModel

from atdiff import ATConv, MixerDiTTransformer2DModel, MixerUNet2DConditionModel, MixerUNet2DModel, swap_attention
from atdiff.models import ATConvAttention
from atdiff.nn import MIXER_KEYS, MixerSpec


def stock_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8,
    )


def stock_cond_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=8, norm_num_groups=8,
    )


def stock_dit() -> DiTTransformer2DModel:
    torch.manual_seed(0)
    return DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=1, num_layers=2, sample_size=8, patch_size=2,
        num_embeds_ada_norm=10,
    )


def run(model, height=16, width=16):
    """One forward pass with fixed inputs fitting the model's kind."""
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([1, 7])
    if isinstance(model, DiTTransformer2DModel):
        return model(torch.randn(2, 1, 8, 8, generator=g), t, torch.tensor([3, 4])).sample
    x = torch.randn(2, 1, height, width, generator=g)
    if isinstance(model, UNet2DConditionModel):
        return model(x, t, torch.randn(2, 5, 24, generator=g)).sample
    return model(x, t).sample


def attention_layers(model) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention)]


def swapped_layers(model) -> dict[str, ATConvAttention]:
    return {name: m for name, m in model.named_modules() if isinstance(m, ATConvAttention)}


MODELS = {
    "UNet2DModel": (stock_unet, MixerUNet2DModel),
    "UNet2DConditionModel": (stock_cond_unet, MixerUNet2DConditionModel),
    "DiTTransformer2DModel": (stock_dit, MixerDiTTransformer2DModel),
}


# ------------------------------------------------------------------------------------------------
# Which layers are swapped, and how they are initialised
# ------------------------------------------------------------------------------------------------


def test_unet2d_all_attention_blocks_swapped_in_place():
    model = stock_unet().eval()
    names = [name for name, m in model.named_modules() if isinstance(m, Attention)]
    norms = {name: m.group_norm for name, m in model.named_modules() if isinstance(m, Attention)}
    assert swap_attention(model) is model
    assert type(model) is MixerUNet2DModel and model.config.token_mixer == "atconv"
    assert attention_layers(model) == []
    assert list(swapped_layers(model)) == names
    # The attention's GroupNorm is kept (same module), the residual and rescaling come along.
    for name, layer in swapped_layers(model).items():
        assert layer.group_norm is norms[name] and layer.residual_connection
    assert run(model).shape == (2, 1, 16, 16)
    assert run(model, 16, 32).shape == (2, 1, 16, 32)  # non-square: feature maps carry their grid


def test_cond_unet_swaps_attn1_and_keeps_cross_attention():
    model = stock_cond_unet().eval()
    cross = [m.attn2 for m in model.modules() if hasattr(m, "attn2")]
    swap_attention(model)
    blocks = [m for m in model.modules() if hasattr(m, "attn2")]
    assert len(blocks) == 4
    assert all(isinstance(b.attn1, ATConvAttention) for b in blocks)
    assert [b.attn2 for b in blocks] == cross  # the very same cross-attention modules
    assert all(a.is_cross_attention for a in attention_layers(model))


def test_cond_unet_non_square_tokens_get_their_grid():
    """Transformer2DModel passes its blocks only tokens; the pre-hook tells ATConv the (H, W)."""
    model = swap_attention(stock_cond_unet().eval())
    assert run(model, 16, 24).shape == (2, 1, 16, 24)
    grids = {name.split(".transformer_blocks")[0]: layer.grid for name, layer in swapped_layers(model).items()}
    assert grids == {"down_blocks.0.attentions.0": (16, 24), "mid_block.attentions.0": (8, 12),
                     "up_blocks.1.attentions.0": (16, 24), "up_blocks.1.attentions.1": (16, 24)}


def test_dit_swap_and_hybrid_alternates_in_module_order():
    model = swap_attention(stock_dit().eval(), token_mixer="hybrid")
    assert type(model) is MixerDiTTransformer2DModel
    assert [type(b.attn1) for b in model.transformer_blocks] == [Attention, ATConvAttention]
    assert model.pos_embed.pos_embed is not None  # swapping touches attention only
    assert run(model).shape == (2, 1, 8, 8)


def test_from_attention_copies_value_and_output_projections():
    model = stock_cond_unet()  # attention_bias=False: to_v has no bias, to_out[0] has one
    originals = [(b.attn1.to_v, b.attn1.to_out[0]) for b in model.modules() if hasattr(b, "attn1")]
    swap_attention(model, init="from_attention")
    for layer, (to_v, to_out) in zip(swapped_layers(model).values(), originals):
        atconv = layer.atconv
        assert torch.equal(atconv.x_proj.weight, to_v.weight)
        assert to_v.bias is None and torch.count_nonzero(atconv.x_proj.bias) == 0
        assert torch.equal(atconv.proj.weight, to_out.weight) and torch.equal(atconv.proj.bias, to_out.bias)
        assert torch.count_nonzero(atconv.kernel_proj.bias) == 0 and torch.count_nonzero(atconv.difference_control) == 0


def test_fresh_init_is_xavier_with_zero_bias():
    model = swap_attention(stock_unet(), init="fresh")
    for layer in swapped_layers(model).values():
        w = layer.atconv.x_proj.weight
        xavier_std = (2 / (w.shape[0] + w.shape[1])) ** 0.5  # PyTorch's default init has ~0.58x this
        assert abs(w.std().item() - xavier_std) < 0.1 * xavier_std
        assert torch.count_nonzero(layer.atconv.proj.bias) == 0


# ------------------------------------------------------------------------------------------------
# Persistence
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("init", ["fresh", "from_attention"])
def test_save_from_pretrained_round_trip_is_bit_exact(kind, init, tmp_path):
    build, mixer_class = MODELS[kind]
    model = swap_attention(build(), init=init, token_mixer="hybrid" if kind == "DiTTransformer2DModel" else "atconv")
    model.eval().save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = mixer_class.from_pretrained(tmp_path).eval()
    assert type(loaded) is mixer_class and loaded.config.token_mixer == model.config.token_mixer
    assert list(swapped_layers(loaded)) == list(swapped_layers(model))
    assert torch.equal(run(model), run(loaded))


def test_pretrained_stock_model_swapped_then_reloaded_is_bit_exact(tmp_path):
    """The usual path: a stock checkpoint, swapped from its attention weights, saved and reloaded."""
    stock_unet().save_pretrained(tmp_path / "stock")
    model = swap_attention(UNet2DModel.from_pretrained(tmp_path / "stock"), init="from_attention").eval()
    assert model.config._class_name == "MixerUNet2DModel"
    model.save_pretrained(tmp_path / "swapped")
    loaded = MixerUNet2DModel.from_pretrained(tmp_path / "swapped").eval()
    assert torch.equal(run(model), run(loaded))


@pytest.mark.parametrize("kind", list(MODELS))
def test_ema_save_pretrained_round_trip(kind, tmp_path):
    """EMAModel.save_pretrained rebuilds the model from its config and copies parameters by position:
    the rebuilt model must have the swapped instance's parameter order."""
    build, mixer_class = MODELS[kind]
    model = swap_attention(build(), token_mixer="hybrid").eval()
    ema = EMAModel(model.parameters(), model_cls=type(model), model_config=model.config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ema.step(model.parameters())
    ema.save_pretrained(tmp_path)
    loaded = mixer_class.from_pretrained(tmp_path).eval()
    ema.copy_to(model.parameters())
    expected = model.state_dict()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in loaded.state_dict().items())
    assert torch.equal(run(model), run(loaded))


def test_deep_copy_hooks_its_own_layers():
    model = swap_attention(stock_cond_unet().eval())
    clone = copy.deepcopy(model)
    run(clone, 16, 24)
    assert all(layer.grid is None for layer in swapped_layers(model).values())
    assert torch.equal(run(clone, 16, 24), run(model, 16, 24))


# ------------------------------------------------------------------------------------------------
# ATConvAttention on its own
# ------------------------------------------------------------------------------------------------


def test_attention_layer_matches_its_parts_on_feature_maps_and_tokens():
    torch.manual_seed(0)
    attn = Attention(16, heads=2, dim_head=8, norm_num_groups=4, residual_connection=True, rescale_output_factor=2.0)
    layer = ATConvAttention.replacing(attn, init="fresh").eval()
    x = torch.randn(2, 16, 4, 6)
    expected = (layer.atconv(layer.group_norm(x)) + x) / 2.0
    torch.testing.assert_close(layer(x), expected)

    tokens = x.flatten(2).transpose(1, 2)
    layer.grid = (4, 6)
    torch.testing.assert_close(layer(tokens), expected.flatten(2).transpose(1, 2))


def test_attention_layer_grid_fallback_and_errors():
    layer = ATConvAttention(ATConv(8))
    assert layer(torch.randn(1, 16, 8)).shape == (1, 16, 8)  # no grid: square 4 x 4
    with pytest.raises(ValueError, match="not a square.*layer.grid"):
        layer(torch.randn(1, 12, 8))
    with pytest.raises(ValueError, match="self-attention"):
        layer(torch.randn(1, 16, 8), encoder_hidden_states=torch.randn(1, 3, 8))
    with pytest.raises(ValueError, match="init must be one of"):
        ATConvAttention.replacing(Attention(8, heads=1, dim_head=8), init="copy")


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


def test_swap_errors_leave_the_model_untouched():
    model = stock_unet()
    before = [name for name, _ in model.named_parameters()]
    with pytest.raises(ValueError, match="fresh.*from_attention"):
        swap_attention(model, init="copy")
    with pytest.raises(ValueError, match="token_mixer"):
        swap_attention(model, token_mixer="mamba")
    with pytest.raises(ValueError, match="kernel_size"):
        swap_attention(model, atconv_kernel_size=2)
    assert type(model) is UNet2DModel and [name for name, _ in model.named_parameters()] == before

    swap_attention(model)
    with pytest.raises(ValueError, match="already has ATConv"):
        swap_attention(model)


def test_swap_converts_a_mixer_attention_baseline():
    model = MixerUNet2DModel.from_config(stock_unet().config, token_mixer="attention")
    assert swapped_layers(model) == {}
    swap_attention(model, init="from_attention", token_mixer="hybrid")
    assert type(model) is MixerUNet2DModel and model.config.token_mixer == "hybrid"
    assert len(swapped_layers(model)) == 2


def test_swap_rejects_unsupported_and_attention_free_models():
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=2)
    with pytest.raises(TypeError, match="UNet2DModel, UNet2DConditionModel, DiTTransformer2DModel"):
        swap_attention(vae)
    plain = UNet2DModel(block_out_channels=(8, 8), down_block_types=("DownBlock2D",) * 2,
                        up_block_types=("UpBlock2D",) * 2, add_attention=False, norm_num_groups=4, layers_per_block=1)
    with pytest.raises(ValueError, match="no self-attention"):
        swap_attention(plain)


def test_a_mixer_spec_is_the_keywords_it_holds(tmp_path):
    """swap_attention takes a MixerSpec or its fields as keywords, alike; the model reads its spec back
    from config.json, whose keys are the spec's fields."""
    spec = MixerSpec("hybrid", atconv_kernel_size=5, atconv_pooling="2d")
    by_spec = swap_attention(stock_unet().eval(), "from_attention", spec)
    by_keys = swap_attention(stock_unet().eval(), "from_attention", token_mixer="hybrid", atconv_kernel_size=5, atconv_pooling="2d")
    assert by_spec.mixer_spec == by_keys.mixer_spec == spec
    assert {key: by_spec.config[key] for key in MIXER_KEYS} == spec.config()
    assert torch.equal(run(by_spec), run(by_keys))
    by_spec.save_pretrained(tmp_path)
    assert MixerUNet2DModel.from_pretrained(tmp_path).mixer_spec == spec
    with pytest.raises(TypeError, match="not both"):
        swap_attention(stock_unet(), mixer=spec, token_mixer="atconv")
    with pytest.raises(ValueError, match="token_mixer"):
        MixerSpec("mamba")
