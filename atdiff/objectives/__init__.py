"""Training objectives, kept apart from the network and the loop (``base``: the config, the
``Objective`` interface, flow matching, DDPM, distillation; ``repa``: REPA's alignment term).
``build_objective`` composes them from an ``objective`` config section; ``check_objective_fits``
checks, when a config loads, that they can train its model."""

from collections.abc import Mapping
from typing import Any

from ..pipelines.schedulers import prediction_type_of
from .base import (
    OBJECTIVES,
    DDPMObjective,
    DistillationObjective,
    FlowMatchingObjective,
    Objective,
    ObjectiveConfig,
    ObjectiveName,
    check_teacher,
    check_time_convention,
    mean_prediction,
)
from .repa import RepresentationAlignment, check_repa_fits

__all__ = [
    "OBJECTIVES", "DDPMObjective", "DistillationObjective", "FlowMatchingObjective", "Objective", "ObjectiveConfig",
    "ObjectiveName", "RepresentationAlignment", "build_objective", "check_objective_fits", "mean_prediction",
]


def build_objective(cfg: ObjectiveConfig) -> Objective:
    if cfg.type == "ddpm":
        objective = DDPMObjective(cfg.prediction_type, cfg.num_train_timesteps, cfg.beta_schedule)
    elif cfg.type == "flow_matching":
        objective = FlowMatchingObjective(cfg.num_train_timesteps, cfg.timestep_sampling)
    else:
        raise ValueError(f"objective.type must be one of {list(OBJECTIVES)}, got {cfg.type!r}")
    if cfg.distill_from:
        objective = DistillationObjective(objective, cfg.distill_from, cfg.distill_weight)
    if cfg.repa_encoder:
        objective = RepresentationAlignment(objective, cfg.repa_encoder, cfg.repa_encoder_depth, cfg.repa_proj_coeff, cfg.repa_projector_dim)
    return objective


def check_objective_fits(cfg: ObjectiveConfig, model_type: str, model: Mapping[str, Any]) -> None:
    """The objective ``cfg`` can train a ``model_type`` model of these (resolved) arguments: its time
    convention, the distillation teacher's inputs and predictions, REPA's block."""
    check_time_convention(cfg, model)
    if cfg.distill_from:
        check_teacher(cfg.distill_from, model, trains=prediction_type_of(build_objective(cfg).make_scheduler()))
    if cfg.repa_encoder:
        check_repa_fits(cfg.repa_encoder_depth, model_type, model)
