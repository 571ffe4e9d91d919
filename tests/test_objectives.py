"""Objectives: their conventions match the diffusers schedulers that sample from them.

For a single data point x0 the ideal denoiser is known in closed form, so an oracle model gives
zero loss, and the objective's own scheduler, driven by that oracle, must land exactly on x0.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from atdiff.objectives import DDPMObjective, FlowMatchingObjective, ObjectiveConfig, build_objective

X0 = torch.linspace(-0.9, 0.9, 2 * 1 * 4 * 4).view(2, 1, 4, 4)


class Oracle(torch.nn.Module):
    """The exact prediction for data that is always ``x0``; optional junk learned-sigma channels."""

    def __init__(self, predict, x0: torch.Tensor, sigma_channels: bool = False):
        super().__init__()
        self.predict, self.x0, self.sigma_channels = predict, x0, sigma_channels

    def forward(self, x_t, timestep, class_labels=None):
        timestep = torch.as_tensor(timestep).expand(x_t.shape[0])
        out = self.predict(x_t, self.x0[: x_t.shape[0]], timestep)
        if self.sigma_channels:
            out = torch.cat([out, torch.full_like(out, 123.0)], dim=1)
        return Transformer2DModelOutput(sample=out)


def ddpm_oracle(scheduler: DDPMScheduler, prediction_type: str):
    def predict(x_t, x0, t):
        a = scheduler.alphas_cumprod[t.long()].view(-1, 1, 1, 1).to(x_t.dtype)
        noise = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        return noise if prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0

    return predict


def flow_oracle(x_t, x0, timestep):
    sigma = (timestep / 1000).view(-1, 1, 1, 1).to(x_t.dtype)
    return (x_t - x0) / sigma  # = noise - x0 on the path x_t = (1 - sigma) x0 + sigma noise


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("sigma_channels", [False, True])
def test_ddpm_oracle_has_zero_loss(prediction_type, sigma_channels):
    objective = DDPMObjective(prediction_type)
    oracle = Oracle(ddpm_oracle(objective.noise_scheduler, prediction_type), X0, sigma_channels)
    torch.manual_seed(0)
    assert objective.loss(oracle, X0, None).item() < 1e-8


@pytest.mark.parametrize("sigma_channels", [False, True])
def test_flow_matching_oracle_has_zero_loss(sigma_channels):
    torch.manual_seed(0)
    assert FlowMatchingObjective().loss(Oracle(flow_oracle, X0, sigma_channels), X0, None).item() < 1e-8


def test_a_wrong_model_has_positive_loss():
    torch.manual_seed(0)
    zero = Oracle(lambda x_t, x0, t: torch.zeros_like(x_t), X0)
    assert FlowMatchingObjective().loss(zero, X0, None).item() > 0.1
    assert DDPMObjective().loss(zero, X0, None).item() > 0.1


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddpm_scheduler_driven_by_oracle_reaches_x0(prediction_type):
    objective = DDPMObjective(prediction_type)
    scheduler = objective.make_scheduler()
    assert isinstance(scheduler, DDPMScheduler) and scheduler.config.prediction_type == prediction_type
    oracle = Oracle(ddpm_oracle(scheduler, prediction_type), X0)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(X0.shape, generator=generator)
    scheduler.set_timesteps(20)
    for t in scheduler.timesteps:
        x = scheduler.step(oracle(x, t).sample, t, x, generator=generator).prev_sample
    torch.testing.assert_close(x, X0, atol=1e-4, rtol=0)


def test_flow_scheduler_driven_by_oracle_reaches_x0():
    scheduler = FlowMatchingObjective().make_scheduler()
    assert isinstance(scheduler, FlowMatchEulerDiscreteScheduler) and scheduler.config.shift == 1.0
    oracle = Oracle(flow_oracle, X0)
    x = torch.randn(X0.shape, generator=torch.Generator().manual_seed(0))
    scheduler.set_timesteps(10)
    for t in scheduler.timesteps:
        x = scheduler.step(oracle(x, t).sample, t, x).prev_sample
    torch.testing.assert_close(x, X0, atol=1e-4, rtol=0)


def test_objectives_pass_labels_and_timesteps_in_model_units():
    seen = {}

    def spy(x_t, timestep, class_labels=None):
        seen.update(t=timestep, labels=class_labels)
        return Transformer2DModelOutput(sample=torch.zeros_like(x_t))

    labels = torch.tensor([3, 7])
    FlowMatchingObjective().loss(spy, X0, labels)
    assert seen["labels"] is labels and seen["t"].shape == (2,) and 0 <= seen["t"].min() and seen["t"].max() <= 1000
    DDPMObjective().loss(spy, X0, labels)
    assert seen["t"].dtype == torch.int64 and seen["t"].max() < 1000


def test_build_objective():
    assert isinstance(build_objective(ObjectiveConfig()), FlowMatchingObjective)
    ddpm = build_objective(ObjectiveConfig(type="ddpm", prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2"))
    assert isinstance(ddpm, DDPMObjective)
    assert ddpm.make_scheduler().config.beta_schedule == "squaredcos_cap_v2"
    logit = build_objective(ObjectiveConfig(timestep_sampling="logit_normal"))
    torch.manual_seed(0)
    assert logit.loss(Oracle(flow_oracle, X0), X0, None).item() < 1e-8
