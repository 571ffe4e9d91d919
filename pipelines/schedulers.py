"""Sampler names for ``atdiff sample`` and which diffusers schedulers fit which trained model.

A scheduler fits a model when it reads the model's output the way the model was trained to produce
it: ``epsilon`` or ``v_prediction`` for DDPM-trained models, ``flow_prediction`` (the velocity
``noise - x0`` of x_t = (1 - sigma) x0 + sigma noise) for flow-matching ones. Every scheduler is
built with ``from_config`` from the folder's saved scheduler, so the training noise schedule
(betas, shift, number of train timesteps) carries over unchanged.
"""

from __future__ import annotations

from typing import Any

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    HeunDiscreteScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .flow_samplers import FlowMatchDopri5Scheduler, FlowMatchEulerMaruyamaScheduler

FLOW_PREDICTION = "flow_prediction"
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", FLOW_PREDICTION)  # what a model may be trained to predict


def _flow_dpm_solver(config: dict[str, Any]) -> SchedulerMixin:
    # DPM-Solver++ on flow sigmas: the same ODE the FlowMatch schedulers integrate, solved to 2nd order.
    return DPMSolverMultistepScheduler.from_config(
        config, use_flow_sigmas=True, prediction_type=FLOW_PREDICTION, flow_shift=config.get("shift", 1.0)
    )


def _sit_sampler(scheduler_class: type[SchedulerMixin]):
    # SiT's samplers take their own defaults (SiT's); only the training time scale carries over.
    return lambda config: scheduler_class(num_train_timesteps=config.get("num_train_timesteps", 1000))


# name -> factory from the saved scheduler config, for DDPM-trained and for flow-matching models.
DDPM_SCHEDULERS = {
    "ddpm": DDPMScheduler.from_config,
    "ddim": DDIMScheduler.from_config,
    # variance_type=None: DPM-Solver's learned-variance path keeps 3 channels (pixel models); the
    # pipeline hands it the mean channels only.
    "dpm++": lambda config: DPMSolverMultistepScheduler.from_config(config, variance_type=None),
    "euler": EulerDiscreteScheduler.from_config,
    "heun": HeunDiscreteScheduler.from_config,
}
FLOW_SCHEDULERS = {
    "euler": FlowMatchEulerDiscreteScheduler.from_config,
    "heun": FlowMatchHeunDiscreteScheduler.from_config,
    "dpm++": _flow_dpm_solver,
    "sde": _sit_sampler(FlowMatchEulerMaruyamaScheduler),  # SiT's SDE sampler (use 250 steps)
    "ode-dopri5": _sit_sampler(FlowMatchDopri5Scheduler),  # SiT's adaptive ODE sampler (steps unused)
}
SCHEDULER_NAMES = tuple(dict.fromkeys([*DDPM_SCHEDULERS, *FLOW_SCHEDULERS]))


def prediction_type_of(scheduler: SchedulerMixin) -> str:
    """How ``scheduler`` reads a model's output: ``epsilon``, ``v_prediction``, ``sample`` or ``flow_prediction``."""
    if type(scheduler).__name__.startswith("FlowMatch"):
        return FLOW_PREDICTION
    return scheduler.config.get("prediction_type") or "epsilon"


def fitting_scheduler_names(prediction_type: str) -> list[str]:
    return list(FLOW_SCHEDULERS if prediction_type == FLOW_PREDICTION else DDPM_SCHEDULERS)


def check_scheduler_fits(scheduler: SchedulerMixin, prediction_type: str) -> None:
    """Raise ValueError when ``scheduler`` would misread a model trained to predict ``prediction_type``."""
    reads = prediction_type_of(scheduler)
    if reads != prediction_type:
        raise ValueError(
            f"{type(scheduler).__name__} reads the model output as {reads!r}, but this model predicts "
            f"{prediction_type!r}; use one of the schedulers {fitting_scheduler_names(prediction_type)} "
            "(atdiff.pipelines.scheduler_by_name) or build yours with from_config(pipe.scheduler.config)"
        )


def scheduler_by_name(name: str, saved_config: dict[str, Any], prediction_type: str) -> SchedulerMixin:
    """The scheduler called ``name`` for a model trained with ``prediction_type`` and saved ``saved_config``."""
    factories = FLOW_SCHEDULERS if prediction_type == FLOW_PREDICTION else DDPM_SCHEDULERS
    if name not in factories:
        kind = "flow-matching" if prediction_type == FLOW_PREDICTION else "DDPM-trained"
        known = f"unknown scheduler {name!r}" if name not in SCHEDULER_NAMES else f"scheduler {name!r} does not fit a {kind} model"
        raise ValueError(f"{known}; use one of {list(factories)}")
    return factories[name](saved_config)
