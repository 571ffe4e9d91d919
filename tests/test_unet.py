"""MixerUNet2DModel: a diffusers UNet2DModel whose attention blocks are attention, ATConv or both."""

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline, UNet2DModel
from diffusers.models.attention_processor import Attention

from atdiff import MixerUNet2DModel
from atdiff.models import ATConvAttention

# Attention at 16 x 16 / 8 x 8 (32 channels): down block, mid block and the two up-block layers.
TINY = dict(
    sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8, attention_head_dim=8,
)


def tiny(token_mixer: str, **kwargs) -> MixerUNet2DModel:
    torch.manual_seed(0)
    return MixerUNet2DModel(**{**TINY, **kwargs}, token_mixer=token_mixer)


def inputs(height=16, width=16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 1, height, width, generator=g), torch.tensor([1, 700])


def mixers(model) -> list[str]:
    """Mixer of each attention block, in module order."""
    kinds = {Attention: "attention", ATConvAttention: "atconv"}
    return [kinds[type(m)] for m in model.modules() if type(m) in kinds]


@pytest.mark.parametrize("token_mixer", ["attention", "atconv", "hybrid"])
def test_forward_layout_and_parameter_count(token_mixer, capsys):
    model = tiny(token_mixer).eval()
    x, t = inputs()
    assert model(x, t).sample.shape == x.shape
    assert model(*inputs(16, 32)).sample.shape == (2, 1, 16, 32)
    assert mixers(model) == {
        "attention": ["attention"] * 4,
        "atconv": ["atconv"] * 4,
        "hybrid": ["attention", "atconv", "attention", "atconv"],
    }[token_mixer]

    n = sum(p.numel() for p in model.parameters())
    with capsys.disabled():
        print(f"\ntiny MixerUNet2DModel {token_mixer}: {n:,} parameters")
    # Per 32-channel layer attention has q, k, v, out with biases (4C^2 + 4C); ATConv has three
    # C x C linears (3C^2 + 3C), kernel_gen (9*9 + 9) and difference_control (C): C^2 - 90 fewer.
    n_attention = sum(p.numel() for p in tiny("attention").parameters())
    assert n == n_attention - mixers(model).count("atconv") * (32 * 32 - 90)


def test_attention_variant_is_the_stock_unet():
    """token_mixer="attention" builds exactly diffusers' UNet2DModel: weights load both ways."""
    mixer = tiny("attention").eval()
    torch.manual_seed(0)
    stock = UNet2DModel(**TINY).eval()
    stock.load_state_dict(mixer.state_dict())
    x, t = inputs()
    assert torch.equal(stock(x, t).sample, mixer(x, t).sample)


def test_from_stock_config_keeps_every_unet_argument():
    """The Mixer class accepts every UNet2DModel config key (from_config passes only known keys)."""
    stock = UNet2DModel(**TINY)
    model = MixerUNet2DModel.from_config(stock.config, token_mixer="atconv")
    assert model.config.block_out_channels == (16, 32) and model.config.norm_num_groups == 8
    assert {k: v.shape for k, v in stock.state_dict().items() if ".attentions." not in k} == {
        k: v.shape for k, v in model.state_dict().items() if ".attentions." not in k
    }


@pytest.mark.parametrize("token_mixer", ["atconv", "hybrid"])
def test_save_load_round_trip_is_bit_exact(token_mixer, tmp_path):
    model = tiny(token_mixer, atconv_kernel_size=5, atconv_pooling="2d").eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = MixerUNet2DModel.from_pretrained(tmp_path).eval()
    assert loaded.config.token_mixer == token_mixer and loaded.config.atconv_kernel_size == 5
    layers = [m for m in loaded.modules() if isinstance(m, ATConvAttention)]
    assert layers and all(m.atconv.kernel_size == 5 and m.atconv.pooling == "2d" for m in layers)
    x, t = inputs()
    assert torch.equal(model(x, t).sample, loaded(x, t).sample)


def test_stock_class_on_a_swapped_folder_does_what_the_readme_says(tmp_path):
    """diffusers only warns when UNet2DModel loads a MixerUNet2DModel folder (unused ATConv weights, missing
    attention weights); the README describes the result, which this test pins."""
    model = tiny("atconv").eval()
    model.save_pretrained(tmp_path)
    attention = {n for n, p in UNet2DModel(**TINY).named_parameters() if ".attentions." in n and "group_norm" not in n}

    default = UNet2DModel.from_pretrained(tmp_path)  # low_cpu_mem_usage=True: never-loaded weights stay on meta
    assert {n for n, p in default.named_parameters() if p.is_meta} == attention
    x, t = inputs()
    with pytest.raises(RuntimeError, match="meta"):
        default(x, t)

    random_attention = UNet2DModel.from_pretrained(tmp_path, low_cpu_mem_usage=False).eval()
    assert not any(p.is_meta for p in random_attention.parameters())
    assert not torch.allclose(random_attention(x, t).sample, model(x, t).sample)


def test_pipeline_folder_loads_through_the_atdiff_library(tmp_path):
    """model_index.json names the model ["atdiff", "MixerUNet2DModel"]; diffusers imports atdiff for it."""
    model = tiny("hybrid").eval()
    DDPMPipeline(unet=model, scheduler=DDPMScheduler(num_train_timesteps=10)).save_pretrained(tmp_path)
    pipe = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(pipe.unet) is MixerUNet2DModel
    x, t = inputs()
    assert torch.equal(model(x, t).sample, pipe.unet(x, t).sample)


def test_training_step_reaches_atconv_parameters():
    model = tiny("atconv")
    x, t = inputs()
    model(x, t).sample.square().mean().backward()
    for layer in (m for m in model.modules() if isinstance(m, ATConvAttention)):
        assert layer.atconv.difference_control.grad.abs().sum() > 0
        assert layer.atconv.kernel_gen.weight.grad.abs().sum() > 0


def test_no_weight_decay_names():
    assert tiny("hybrid").no_weight_decay() == {
        "up_blocks.0.attentions.0.atconv.difference_control",
        "mid_block.attentions.0.atconv.difference_control",
    }


def test_bad_token_mixer():
    with pytest.raises(ValueError, match="token_mixer must be one of"):
        tiny("mamba")
