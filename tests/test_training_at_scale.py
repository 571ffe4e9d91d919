"""What GPU users train with, tested on the CPU: gradient checkpointing through diffusers' own API (the
same gradients for every model family atdiff trains or converts, the same trained weights),
torch.compile, bf16 autocast and the TF32 switch."""

from __future__ import annotations

import json

import pytest
import yaml
import torch
from diffusers import UNet2DConditionModel

from assets import needs_fashion_mnist
from atdiff import DiTModel, MixerUNet2DModel, swap_attention
from safetensors.torch import load_file

from atdiff.pipelines import ImageDiffusionPipeline
from atdiff.training import pipeline_at_checkpoint, train
from test_training import assert_same_run, assert_same_weights, one_thread, straight, tiny  # noqa: F401


def gradients(model: torch.nn.Module, forward, checkpointing: bool) -> tuple[dict[str, torch.Tensor], int]:
    """The gradients of a loss, and how many modules were checkpointed on the way."""
    calls = []

    def checkpointed(module, *args):  # diffusers' default, counted
        calls.append(module)
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)

    model.train()
    if checkpointing:
        model.enable_gradient_checkpointing(checkpointed)
    else:
        model.disable_gradient_checkpointing()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # label dropout draws from the global RNG
    forward(model).square().mean().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}, len(calls)


def assert_same_gradients(model: torch.nn.Module, forward) -> None:
    (plain, none), (checkpointed, calls) = gradients(model, forward, False), gradients(model, forward, True)
    assert none == 0 and calls > 0
    assert plain.keys() == checkpointed.keys() and len(plain) == len(list(model.parameters()))
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("mixer", ["attention", "atconv", "hybrid"])
def test_dit(mixer):
    torch.manual_seed(0)
    model = DiTModel(sample_size=16, patch_size=4, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                     num_classes=10, token_mixer=mixer, learn_sigma=False)
    with torch.no_grad():  # zero-initialised adaLN and output would leave most gradients zero
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    x, t, y = torch.randn(4, 1, 16, 16), torch.rand(4) * 1000, torch.tensor([0, 1, 2, 3])
    assert_same_gradients(model, lambda m: m(x, t, y).sample)


def test_mixer_unet():
    torch.manual_seed(0)
    model = MixerUNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                             down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                             norm_num_groups=4, attention_head_dim=8, token_mixer="hybrid")
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 500])
    assert_same_gradients(model, lambda m: m(x, t).sample)


def test_swapped_text_to_image_unet():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8)
    swap_attention(unet, init="from_attention", token_mixer="atconv")
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 3, 16)
    assert_same_gradients(unet, lambda m: m(x, t, encoder_hidden_states=text).sample)


@needs_fashion_mnist
@pytest.mark.usefixtures("one_thread")
def test_training_with_checkpointing_ends_with_the_same_weights(straight, tmp_path):
    out = tmp_path / "run"
    train(tiny(out, log_with="tensorboard", gradient_checkpointing=True))
    assert_same_run(straight[0], out)


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one mixed-precision setting per process (a command is a process); tests run many."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@needs_fashion_mnist
@pytest.mark.usefixtures("one_thread")
def test_bf16_autocast_trains_on_the_cpu_and_resumes_exactly(straight, tmp_path, fresh_accelerate_state):
    out, resumed = tmp_path / "run", tmp_path / "resumed"
    result = train(tiny(out, mixed_precision="bf16"))
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert result.losses != straight[1].losses  # the forward really ran in bf16
    weights = load_file(out / "checkpoint-6" / "model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.float32}  # autocast: the weights stay fp32
    train(tiny(resumed, mixed_precision="bf16", max_steps=3))
    train(tiny(resumed, mixed_precision="bf16"), resume="latest")
    assert_same_run(out, resumed)


@needs_fashion_mnist
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("tf32", [False, True])
def test_tf32_follows_the_config(tmp_path, tf32):
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not tf32
        train(tiny(tmp_path / "run", max_steps=1, sample_every=0, num_sample_images=1, tf32=tf32))
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (tf32, tf32)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@needs_fashion_mnist
@pytest.mark.slow  # compiling the tiny DiT's forward and backward: about a minute on two cores
@pytest.mark.usefixtures("one_thread")
def test_compiled_training_writes_what_a_plain_model_loads(straight, tmp_path, monkeypatch):
    compiled, compile = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: compiled.append(model) or compile(model, **kwargs))
    out = tmp_path / "run"
    result = train(tiny(out, log_with="tensorboard", compile=True))
    assert len([m for m in compiled if isinstance(m, torch.nn.Module)]) == 1  # the model (a tiny function is compiled first, as a check)
    # The same training, not the same numbers: compiled kernels round differently and draw the label
    # dropout inside the graph from another random stream.
    assert result.losses == pytest.approx(straight[1].losses, rel=0.1)
    weights = load_file(out / "checkpoint-6" / "model.safetensors")
    assert weights.keys() == load_file(straight[0] / "checkpoint-6" / "model.safetensors").keys()  # no _orig_mod. prefix
    pipeline_at_checkpoint(out / "checkpoint-6")
    pipe = ImageDiffusionPipeline.from_pretrained(out)
    assert not hasattr(pipe.model, "_orig_mod")


def test_the_training_step_benchmark_writes_its_report(tmp_path):
    from atdiff.eval import training_step

    assert training_step.main(["--size", "T/4", "--latent", "16", "--batch", "2", "--repeats", "2",
                               "--variants", "plain", "checkpointing", "repa", "--out", str(tmp_path), "--stem", "toy"]) == 0
    record = json.loads((tmp_path / "toy.json").read_text())
    assert set(record["results"]) == {"plain", "checkpointing", "repa"}
    for result in record["results"].values():
        assert len(result["times_s"]) == 2 and result["median_s"] > 0
        # resident: weights, gradients and AdamW state; the step allocates more on top
        assert result["model_memory_mb"] > result["model_resident_mb"] > 0
    assert "| checkpointing |" in (tmp_path / "toy.md").read_text()


@needs_fashion_mnist
def test_compile_on_a_backend_that_cannot_is_one_line_before_the_run(tmp_path, monkeypatch, capsys):
    import torch._dynamo
    import torch._inductor.config

    from atdiff.cli import main

    torch._dynamo.reset()  # nothing compiled earlier in this process may be reused
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", (None, "/nonexistent-c++"))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny(tmp_path / "run", compile=True).to_dict()))
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("atdiff train: error: training.compile: torch.compile cannot build kernels on cpu here (")
    assert "No working C++ compiler" in err and err.strip().endswith("set training.compile=false") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
    torch._dynamo.reset()
