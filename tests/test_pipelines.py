"""ImageDiffusionPipeline: loading, determinism, schedulers, guidance, latent space, errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
)

from atdiff import DiTModel
from atdiff.pipelines import ImageDiffusionPipeline, scheduler_by_name

STEPS = 4


def tiny_dit(num_classes: int = 3, in_channels: int = 1, **overrides) -> DiTModel:
    config = dict(
        sample_size=8, patch_size=2, in_channels=in_channels, hidden_size=32, depth=2, num_heads=2,
        num_classes=num_classes, learn_sigma=False, token_mixer="atconv",
    )
    model = DiTModel(**{**config, **overrides}).eval()
    # DiT's zero init makes a fresh model output 0 for every input and label; random weights make
    # the images depend on the noise, the label and the guidance, so the comparisons below can fail.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model


def ddpm_pipe(**model_overrides) -> ImageDiffusionPipeline:
    return ImageDiffusionPipeline(model=tiny_dit(**model_overrides), scheduler=DDPMScheduler())


def flow_pipe(**model_overrides) -> ImageDiffusionPipeline:
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    return ImageDiffusionPipeline(model=tiny_dit(**model_overrides), scheduler=scheduler)


def sample(pipe, seed: int = 0, batch_size: int = 2, **kwargs) -> torch.Tensor:
    kwargs = {"class_labels": [0, 2][:batch_size] if pipe.num_classes else None, "output_type": "pt", **kwargs}
    generator = torch.Generator().manual_seed(seed)
    return pipe(batch_size=batch_size, num_inference_steps=STEPS, generator=generator, **kwargs).images


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    pipe = ddpm_pipe()
    folder = tmp_path_factory.mktemp("pipe")
    pipe.save_pretrained(folder)
    return pipe, folder


# ------------------------------------------------------------------------------------------------
# Loading and determinism
# ------------------------------------------------------------------------------------------------


def test_diffusion_pipeline_from_pretrained_loads_atdiff_class(saved):
    pipe, folder = saved
    loaded = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    assert type(loaded) is ImageDiffusionPipeline
    assert isinstance(loaded.model, DiTModel)
    torch.testing.assert_close(sample(loaded), sample(pipe))


def test_atdiff_class_loads_its_folder_without_flags(saved):
    pipe, folder = saved
    loaded = ImageDiffusionPipeline.from_pretrained(folder)
    assert loaded.config.prediction_type == "epsilon"
    torch.testing.assert_close(sample(loaded), sample(pipe))


def tampered_copy(folder, tmp_path, library: str = "evil"):
    """A copy of ``folder`` whose model_index.json makes diffusers import ``model/<library>.py``, and whose
    pipeline.py and that module would each write a marker file; returns (copy, markers)."""
    copy = tmp_path / "tampered"
    shutil.copytree(folder, copy)
    markers = [tmp_path / "pipeline-ran", tmp_path / "component-ran"]
    (copy / "pipeline.py").write_text(f"open({str(markers[0])!r}, 'w').close()\n" + (copy / "pipeline.py").read_text())
    (copy / "model" / f"{library}.py").write_text(f"open({str(markers[1])!r}, 'w').close()\nfrom atdiff import DiTModel\n")
    index = json.loads((copy / "model_index.json").read_text())
    index["model"] = [library, "DiTModel"]
    (copy / "model_index.json").write_text(json.dumps(index))
    (copy / "manifest.json").unlink()  # a folder from elsewhere: in one atdiff wrote, its manifest names the edits
    return copy, markers


@pytest.mark.parametrize("library", ["evil", "atdiff.models.dit"])
def test_tampered_folder_runs_no_code(saved, tmp_path, library):
    copy, markers = tampered_copy(saved[1], tmp_path, library)
    with pytest.raises(ValueError, match="atdiff runs no code from a pipeline folder"):
        ImageDiffusionPipeline.from_pretrained(copy)
    with pytest.raises(ValueError, match="trust_remote_code"):  # diffusers' own refusal
        DiffusionPipeline.from_pretrained(copy)
    assert not any(marker.exists() for marker in markers)


def test_edited_pipeline_module_is_never_imported(saved, tmp_path):
    pipe, folder = saved
    copy, markers = tampered_copy(folder, tmp_path)
    index = json.loads((copy / "model_index.json").read_text())
    (copy / "model_index.json").write_text(json.dumps({**index, "model": ["atdiff.models.dit", "DiTModel"]}))
    loaded = ImageDiffusionPipeline.from_pretrained(copy)
    assert type(loaded) is ImageDiffusionPipeline and not any(marker.exists() for marker in markers)
    torch.testing.assert_close(sample(loaded), sample(pipe))


def test_trust_remote_code_is_the_callers_choice(saved, tmp_path):
    copy, markers = tampered_copy(saved[1], tmp_path, library="trusted_by_caller")
    DiffusionPipeline.from_pretrained(copy, trust_remote_code=True)
    assert all(marker.exists() for marker in markers)  # the markers do detect execution


def test_component_library_other_than_atdiff_or_diffusers_is_refused(saved, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(saved[1], copy)
    index = json.loads((copy / "model_index.json").read_text())
    (copy / "model_index.json").write_text(json.dumps({**index, "model": ["os", "DiTModel"]}))
    with pytest.raises(ValueError, match="component 'model' comes from 'os'; atdiff loads components only from atdiff and diffusers"):
        ImageDiffusionPipeline.from_pretrained(copy)


def test_swapped_unet_named_as_the_stock_class_is_refused(tmp_path):
    """A pipeline folder whose model_index.json names UNet2DModel for a MixerUNet2DModel's weights: diffusers
    would return a model whose attention was never loaded; the pipeline refuses it, naming a missing weight."""
    from test_unet import tiny as tiny_unet

    ImageDiffusionPipeline(model=tiny_unet("atconv"), scheduler=DDPMScheduler()).save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    (tmp_path / "model_index.json").write_text(json.dumps({**index, "model": ["diffusers", "UNet2DModel"]}))
    (tmp_path / "manifest.json").unlink()  # saved elsewhere, without atdiff's manifest
    with pytest.raises(ValueError, match=r"model: \d+ parameters of UNet2DModel are not in its weights file \(e.g. [\w.]*attentions"):
        ImageDiffusionPipeline.from_pretrained(tmp_path)


def test_unet_denoiser_round_trip(tmp_path):
    from test_unet import tiny as tiny_unet

    pipe = ImageDiffusionPipeline(model=tiny_unet("atconv"), scheduler=DDPMScheduler())
    assert pipe.num_classes == 0  # UNet2DModel has no num_classes: unconditional
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(loaded.model).__name__ == "MixerUNet2DModel"
    images = sample(loaded)
    assert images.shape == (2, 1, 16, 16)
    torch.testing.assert_close(images, sample(pipe))


def test_same_seed_same_images_other_seed_other_images():
    pipe = ddpm_pipe()
    torch.testing.assert_close(sample(pipe, seed=1), sample(pipe, seed=1))
    assert not torch.allclose(sample(pipe, seed=1), sample(pipe, seed=2))


def test_image_depends_only_on_its_own_generator():
    pipe = ddpm_pipe()  # DDPM also draws per-step noise from the generators
    gens = lambda *seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    batch = pipe(class_labels=[1, 2, 0], generator=gens(5, 6, 7), num_inference_steps=STEPS, output_type="pt").images
    alone = pipe(class_labels=[2], generator=gens(6), num_inference_steps=STEPS, output_type="pt").images
    torch.testing.assert_close(batch[1:2], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("output_type", ["pil", "np", "pt"])
def test_output_types(output_type):
    images = ddpm_pipe()(class_labels=[0, 1], num_inference_steps=2, output_type=output_type).images
    if output_type == "pil":
        assert len(images) == 2 and images[0].size == (8, 8) and images[0].mode == "L"
    elif output_type == "np":
        assert images.shape == (2, 8, 8, 1) and images.min() >= 0 and images.max() <= 1
    else:
        assert images.shape == (2, 1, 8, 8) and images.min() >= 0 and images.max() <= 1


def test_unconditional_model_and_random_labels_for_conditional():
    assert sample(ddpm_pipe(num_classes=0), batch_size=3).shape == (3, 1, 8, 8)
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    pipe = ddpm_pipe()
    first = pipe(batch_size=3, num_inference_steps=STEPS, generator=gen(), output_type="pt").images
    torch.testing.assert_close(first, pipe(batch_size=3, num_inference_steps=STEPS, generator=gen(), output_type="pt").images)


# ------------------------------------------------------------------------------------------------
# Schedulers
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_pipe, name",
    [(ddpm_pipe, n) for n in ("ddpm", "ddim", "dpm++", "euler", "heun")] + [(flow_pipe, n) for n in ("euler", "heun", "dpm++", "sde", "ode-dopri5")],
)
def test_every_scheduler_gives_finite_images(make_pipe, name):
    pipe = make_pipe()
    pipe.scheduler = scheduler_by_name(name, pipe.scheduler.config, pipe.config.prediction_type)
    images = sample(pipe, batch_size=2, guidance_scale=2.0)
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()
    assert images.std() > 0  # not a constant image


def test_scheduler_swapped_the_usual_way():
    pipe = ddpm_pipe()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    assert torch.isfinite(sample(pipe)).all()


def test_v_prediction_carries_over_and_mismatch_is_refused():
    pipe = ImageDiffusionPipeline(model=tiny_dit(), scheduler=DDPMScheduler(prediction_type="v_prediction"))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    assert torch.isfinite(sample(pipe)).all()
    pipe.scheduler = DDIMScheduler()  # epsilon: would misread a v-prediction model
    with pytest.raises(ValueError, match="v_prediction"):
        sample(pipe)


def test_unfitting_scheduler_is_refused_naming_fitting_ones():
    pipe = flow_pipe()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match=r"\['euler', 'heun', 'dpm\+\+', 'sde', 'ode-dopri5'\]"):
        sample(pipe)
    with pytest.raises(ValueError, match="does not fit a flow-matching model"):
        scheduler_by_name("ddim", pipe.scheduler.config, "flow_prediction")
    with pytest.raises(ValueError, match="unknown scheduler 'lms'"):
        scheduler_by_name("lms", pipe.scheduler.config, "epsilon")


def test_prediction_type_survives_a_swap_and_save(tmp_path):
    pipe = flow_pipe()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(tmp_path)
    assert ImageDiffusionPipeline.from_pretrained(tmp_path).config.prediction_type == "flow_prediction"


# ------------------------------------------------------------------------------------------------
# Classifier-free guidance
# ------------------------------------------------------------------------------------------------


def test_guidance_formula_on_all_channels():
    pipe = ddpm_pipe(in_channels=2)
    x = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    t, labels = torch.tensor(500), torch.tensor([0, 2])
    model = lambda y: pipe.model(x, t, y).sample  # noqa: E731
    cond, uncond = model(labels), model(torch.full_like(labels, 3))
    torch.testing.assert_close(pipe.predict(x, t, labels, 1.0), cond)
    torch.testing.assert_close(pipe.predict(x, t, labels, 0.0), uncond, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pipe.predict(x, t, labels, 4.0), uncond + 4.0 * (cond - uncond), atol=1e-4, rtol=1e-4)


def test_guidance_on_the_first_channels_only():
    # DiT/SiT's convention: guide channels :3, the rest (here channel 3 of 4) is the conditional output.
    pipe = ddpm_pipe(in_channels=4)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t, labels = torch.tensor(500), torch.tensor([0, 2])
    cond, uncond = pipe.model(x, t, labels).sample, pipe.model(x, t, torch.full_like(labels, 3)).sample
    guided = pipe.predict(x, t, labels, 4.0, guidance_channels=3)
    torch.testing.assert_close(guided[:, :3], (uncond + 4.0 * (cond - uncond))[:, :3], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(guided[:, 3:], cond[:, 3:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pipe.predict(x, t, labels, 4.0, guidance_channels=4), pipe.predict(x, t, labels, 4.0))
    assert not torch.allclose(sample(pipe, guidance_scale=4.0, guidance_channels=3), sample(pipe, guidance_scale=4.0))
    with pytest.raises(ValueError, match="guidance_channels=5: must be between 1 and the model's 4 channels"):
        sample(pipe, guidance_scale=4.0, guidance_channels=5)


def test_guidance_scale_one_equals_unguided_and_other_scales_differ():
    pipe = ddpm_pipe()
    unguided = sample(pipe)
    torch.testing.assert_close(sample(pipe, guidance_scale=1.0), unguided)
    assert not torch.allclose(sample(pipe, guidance_scale=4.0), unguided, atol=1e-3)


def test_learned_sigma_channels():
    model = tiny_dit(learn_sigma=True)
    # Fixed-variance schedulers read only the prediction channels ...
    assert sample(ImageDiffusionPipeline(model=model, scheduler=DDPMScheduler()), guidance_scale=2.0).shape == (2, 1, 8, 8)
    # ... a learned-variance one also reads the sigma channels.
    pipe = ImageDiffusionPipeline(model=model, scheduler=DDPMScheduler(variance_type="learned_range"))
    assert torch.isfinite(sample(pipe, guidance_scale=2.0)).all()


# ------------------------------------------------------------------------------------------------
# Latent space
# ------------------------------------------------------------------------------------------------


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4, sample_size=16, scaling_factor=0.5,
    ).eval()


def test_latent_pipeline_decodes_with_scaling_factor(tmp_path):
    pipe = ImageDiffusionPipeline(model=tiny_dit(in_channels=4), scheduler=DDPMScheduler(), vae=tiny_vae())
    images = sample(pipe)
    assert images.shape == (2, 3, 16, 16)  # one 2x upsampling stage in the VAE
    latents = sample(pipe, output_type="latent")
    assert latents.shape == (2, 4, 8, 8)
    with torch.no_grad():
        expected = (pipe.vae.decode(latents / 0.5).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(images, expected)

    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)
    assert isinstance(loaded.vae, AutoencoderKL)
    torch.testing.assert_close(sample(loaded), images)


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


def test_class_label_out_of_range():
    with pytest.raises(ValueError, match=r"class label 3 is out of range: this model has classes 0..2"):
        sample(ddpm_pipe(), class_labels=[0, 3])


def test_guidance_on_unconditional_model():
    with pytest.raises(ValueError, match="unconditional"):
        sample(ddpm_pipe(num_classes=0), guidance_scale=2.0)
    with pytest.raises(ValueError, match="unconditional: pass no class_labels"):
        sample(ddpm_pipe(num_classes=0), class_labels=[1, 1])


def test_guidance_without_null_label():
    with pytest.raises(ValueError, match="without label dropout"):
        sample(ddpm_pipe(class_dropout_prob=0.0), guidance_scale=2.0)


def test_bad_generator_count_and_output_type():
    pipe = ddpm_pipe()
    with pytest.raises(ValueError, match="one per image"):
        pipe(class_labels=[0, 1], generator=[torch.Generator()], num_inference_steps=1)
    with pytest.raises(ValueError, match="output_type"):
        pipe(class_labels=[0], num_inference_steps=1, output_type="jpeg")
