"""Training objectives, kept apart from the network and the loop (``base``: the config, the
``Objective`` interface, flow matching, DDPM, distillation; ``repa``: REPA's alignment term).
``build_objective`` composes them from an ``objective`` config section."""

from .base import (
    OBJECTIVES,
    DDPMObjective,
    DistillationObjective,
    FlowMatchingObjective,
    Objective,
    ObjectiveConfig,
    ObjectiveName,
    mean_prediction,
)
from .repa import RepresentationAlignment

__all__ = [
    "OBJECTIVES", "DDPMObjective", "DistillationObjective", "FlowMatchingObjective", "Objective", "ObjectiveConfig",
    "ObjectiveName", "RepresentationAlignment", "build_objective", "mean_prediction",
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
