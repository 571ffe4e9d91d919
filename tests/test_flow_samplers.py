"""SiT's SDE (Euler-Maruyama) and adaptive ODE (dopri5) samplers against an exact oracle.

The data are N(MU, S^2) in every coordinate; along x = (1 - sigma) x0 + sigma noise the marginal is
N(m, V) with m = (1 - sigma) MU, V = (1 - sigma)^2 S^2 + sigma^2, and the velocity E[noise - x0 | x]
is (sigma - (1 - sigma) S^2) / V * (x - m) - MU in closed form. A "model" computing it makes the
samplers' only errors their own: the sampled mean and variance must be MU and S^2.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from atdiff.pipelines import FlowMatchDopri5Scheduler, FlowMatchEulerMaruyamaScheduler, ImageDiffusionPipeline
from test_pipelines import tiny_dit

MU, S = 1.5, 0.5
NUM_IMAGES, SHAPE = 1024, (2, 4, 4)  # 32768 independent coordinates


class GaussianVelocity(ModelMixin, ConfigMixin):
    """The exact velocity of the flow from N(mu, s^2) data to N(0, 1) noise."""

    @register_to_config
    def __init__(self, mu: float = MU, s: float = S, in_channels: int = SHAPE[0], sample_size: int = SHAPE[1]):
        super().__init__()
        self.register_buffer("anchor", torch.zeros(()))  # gives the model a device and dtype

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, class_labels=None) -> Transformer2DModelOutput:
        sigma = (timestep.double() / 1000).view(-1, *[1] * (x.dim() - 1))
        mu, s2 = self.config.mu, self.config.s**2
        mean, var = (1 - sigma) * mu, (1 - sigma) ** 2 * s2 + sigma**2
        velocity = (sigma - (1 - sigma) * s2) / var * (x.double() - mean) - mu
        return Transformer2DModelOutput(sample=velocity.to(x.dtype))


def oracle_samples(scheduler, steps: int) -> torch.Tensor:
    pipe = ImageDiffusionPipeline(model=GaussianVelocity(), scheduler=scheduler, prediction_type="flow_prediction")
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe(batch_size=NUM_IMAGES, num_inference_steps=steps, generator=generator, output_type="latent").images.double()


def assert_matches_target(samples: torch.Tensor, bias: float) -> None:
    """Mean and variance within 5 standard errors of the target, plus the sampler's own ``bias``."""
    n = samples.numel()
    mean_se, var_se = S / n**0.5, S**2 * (2 / (n - 1)) ** 0.5
    assert abs(samples.mean().item() - MU) < 5 * mean_se + bias, samples.mean().item()
    assert abs(samples.var().item() - S**2) < 5 * var_se + bias, samples.var().item()


def test_sde_sampler_matches_the_gaussian_target():
    # SiT's default: 250 steps, diffusion sigma, last step 0.04 without noise.
    assert_matches_target(oracle_samples(FlowMatchEulerMaruyamaScheduler(), steps=250), bias=0.01)


def test_sde_sampler_is_stochastic_and_without_diffusion_is_the_euler_ode():
    ode = oracle_samples(FlowMatchEulerMaruyamaScheduler(diffusion_norm=0.0), steps=50)
    # The exact flow maps noise z to MU + S z: Euler's error is O(1/steps), per sample.
    noise = torch.randn((NUM_IMAGES, *SHAPE), generator=torch.Generator().manual_seed(0)).double()
    assert (ode - (MU + S * noise)).abs().max() < 0.1
    sde = oracle_samples(FlowMatchEulerMaruyamaScheduler(), steps=50)
    assert (sde - (MU + S * noise)).abs().mean() > 0.1  # the SDE's noise moved the samples


def test_dopri5_matches_the_gaussian_target_and_the_exact_flow():
    scheduler = FlowMatchDopri5Scheduler()  # SiT's rtol=1e-3, atol=1e-6
    samples = oracle_samples(scheduler, steps=1)  # the step count is ignored
    assert_matches_target(samples, bias=1e-3)
    noise = torch.randn((NUM_IMAGES, *SHAPE), generator=torch.Generator().manual_seed(0)).double()
    error = (samples - (MU + S * noise)).abs()  # the ODE is deterministic: each sample lands near its target
    assert error.median() < 3e-3 and error.max() < 0.1
    # 6 calls per step plus 2 to choose the first; a smooth field needs few steps.
    assert 8 <= scheduler.num_model_evaluations <= 200, scheduler.num_model_evaluations


def test_dopri5_tighter_tolerance_costs_more_calls_and_is_closer():
    noise = torch.randn((NUM_IMAGES, *SHAPE), generator=torch.Generator().manual_seed(0)).double()
    errors, calls = [], []
    for rtol in (1e-2, 1e-5):
        scheduler = FlowMatchDopri5Scheduler(rtol=rtol, atol=rtol * 1e-3)
        errors.append((oracle_samples(scheduler, steps=1) - (MU + S * noise)).abs().max().item())
        calls.append(scheduler.num_model_evaluations)
    assert calls[1] > calls[0] and errors[1] < errors[0]


def test_an_sde_image_depends_only_on_its_own_generator():
    pipe = ImageDiffusionPipeline(model=tiny_dit(), scheduler=FlowMatchEulerMaruyamaScheduler(), prediction_type="flow_prediction")
    pipe.set_progress_bar_config(disable=True)
    gens = lambda *seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    batch = pipe(class_labels=[1, 2, 0], generator=gens(5, 6, 7), num_inference_steps=20, output_type="latent").images
    alone = pipe(class_labels=[2], generator=gens(6), num_inference_steps=20, output_type="latent").images
    torch.testing.assert_close(batch[1:2], alone, atol=1e-5, rtol=0)


def test_dopri5_steps_each_image_by_its_own_error():
    # The oracle treats every coordinate alone, so only a step size shared across the batch could make an
    # image depend on the others (by the solver's error, ~1e-3 here); per-image steps make it exact.
    pipe = ImageDiffusionPipeline(model=GaussianVelocity(), scheduler=FlowMatchDopri5Scheduler(), prediction_type="flow_prediction")
    pipe.set_progress_bar_config(disable=True)
    gens = lambda *seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    batch = pipe(generator=gens(5, 6, 7), batch_size=3, output_type="latent").images
    alone = pipe(generator=gens(6), output_type="latent").images
    torch.testing.assert_close(batch[1:2], alone, atol=1e-6, rtol=0)
    assert pipe.scheduler.next_timestep.shape == (1,)  # one time per image


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="at least 2 steps"):
        FlowMatchEulerMaruyamaScheduler().set_timesteps(1)
    with pytest.raises(ValueError, match="last_step_size"):
        FlowMatchEulerMaruyamaScheduler(last_step_size=0)
    with pytest.raises(ValueError, match="rtol and atol must be positive"):
        FlowMatchDopri5Scheduler(atol=0)


def test_saved_and_loaded_with_the_pipeline(tmp_path):
    pipe = ImageDiffusionPipeline(model=tiny_dit(), scheduler=FlowMatchDopri5Scheduler(rtol=1e-4), prediction_type="flow_prediction")
    pipe.save_pretrained(tmp_path)
    loaded = ImageDiffusionPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded.scheduler, FlowMatchDopri5Scheduler) and loaded.scheduler.config.rtol == 1e-4
