"""The objectives themselves: their config, the ``Objective`` interface, flow matching, DDPM and distillation.

An objective turns (model, clean images, labels) into a scalar loss and makes the diffusers
scheduler that samples from what it trained. The model is called as
``model(x_t, timestep, class_labels).sample``; learned-sigma models append variance channels,
which these objectives leave untrained (as SiT does): only the first ``C`` output channels enter
the loss, and the schedulers use fixed variances.

Every objective is an ``Objective``: it draws its noisy inputs, timesteps and regression targets in
``training_inputs``; ``DistillationObjective`` reuses them to make a student match a frozen teacher,
and ``atdiff.objectives.repa.RepresentationAlignment`` adds REPA's alignment term to any of them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling

from ..errors import UsageError
from ..settings import REFUSED, SET, setting

ObjectiveName = Literal["flow_matching", "ddpm"]
OBJECTIVES: tuple[str, ...] = get_args(ObjectiveName)
OBJECTIVE_WHY = "the checkpoint's weights were trained for this objective; another one is a new run (e.g. model.init_from a finished run's folder)"
REPA_WHY = "the checkpoint's projector and weights were trained for this alignment; another one is a new run (e.g. model.init_from a finished run's folder)"


@dataclass
class ObjectiveConfig:
    type: ObjectiveName = setting("flow_matching", on_resume=REFUSED, why=OBJECTIVE_WHY)
    # The schedulers hold tables of this length: a million (8 MB each) is far past any published model.
    num_train_timesteps: int = setting(1000, on_resume=REFUSED, why=OBJECTIVE_WHY, range="[1, 1000000]")
    # flow_matching: how sigma is drawn; "uniform" is SiT's, "logit_normal" SD3's
    timestep_sampling: Literal["uniform", "logit_normal"] = setting(
        "uniform", on_resume=REFUSED, why=OBJECTIVE_WHY, applies_if=("type", ("flow_matching",)))
    prediction_type: Literal["epsilon", "v_prediction"] = setting(
        "epsilon", on_resume=REFUSED, why=OBJECTIVE_WHY, applies_if=("type", ("ddpm",)))
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = setting(
        "linear", on_resume=REFUSED, why=OBJECTIVE_WHY, applies_if=("type", ("ddpm",)))
    # Distillation: match this pipeline folder's (frozen) model at the same noisy inputs and times;
    # the loss is (1 - distill_weight) * the objective's own + distill_weight * the teacher-matching one.
    distill_from: str | None = setting(None, on_resume=REFUSED, why=OBJECTIVE_WHY)
    distill_weight: float = setting(1.0, on_resume=REFUSED, why=OBJECTIVE_WHY, range="(0, 1]", applies_if=("distill_from", SET))
    # REPA (atdiff.objectives.repa): align the DiT's hidden states after block repa_encoder_depth, through an MLP
    # projector of width repa_projector_dim, with this frozen DINOv2's patch features (a hub id such as
    # facebook/dinov2-base, or a folder); the loss gains repa_proj_coeff * their negative cosine similarity.
    repa_encoder: str | None = setting(None, on_resume=REFUSED, why=REPA_WHY, null="no REPA")
    repa_encoder_depth: int = setting(8, on_resume=REFUSED, why=REPA_WHY, range="[1, inf)", applies_if=("repa_encoder", SET))
    repa_proj_coeff: float = setting(0.5, on_resume=REFUSED, why=REPA_WHY, range="(0, inf)", applies_if=("repa_encoder", SET))
    repa_projector_dim: int = setting(2048, on_resume=REFUSED, why=REPA_WHY, range="[1, inf)", applies_if=("repa_encoder", SET))


def check_time_convention(cfg: ObjectiveConfig, model: Mapping[str, Any]) -> None:
    """A SiT-convention model (imported from SiT) reads the timestep 1000 * sigma of atdiff's flow
    objective; ``model``: its resolved arguments."""
    from ..models.dit import SIT_TIMESTEPS

    if model.get("time_convention") == "sit" and (cfg.type != "flow_matching" or cfg.num_train_timesteps != SIT_TIMESTEPS):
        raise UsageError(
            f"model.time_convention is sit (a SiT network), which trains with objective.type=flow_matching and "
            f"objective.num_train_timesteps={SIT_TIMESTEPS}; got {cfg.type} with {cfg.num_train_timesteps}"
        )


def mean_prediction(model, x_t: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
    """The model output without any learned-sigma channels."""
    return model(x_t, timestep, class_labels).sample[:, : x_t.shape[1]]


class Objective(ABC):
    """What the training loop asks of an objective: a loss, the scheduler that samples from what it
    trained, and a chance to load, and move onto the training device, what it holds besides the model."""

    # Whether ``loss`` needs the pixel images of latent data (``images``); the data then carries them.
    needs_pixels = False

    @abstractmethod
    def make_scheduler(self):
        """A fresh diffusers scheduler that samples from a model trained with this objective."""

    @abstractmethod
    def training_inputs(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noisy input, timestep, regression target) for clean images ``x0``."""

    def load(self) -> None:
        """Load what the objective holds besides the model, raising ``UsageError`` when it does not load;
        atdiff train calls it before the run folder is touched."""

    def prepare(self, accelerator, network: torch.nn.Module) -> None:
        """Called once by the loop before training, with the bare network and under its seed; only
        objectives holding modules of their own need it."""

    def trained_module(self) -> torch.nn.Module | None:
        """A module the objective trains with the model (REPA's projector): the loop optimises and
        checkpoints it; no pipeline holds it."""
        return None

    def loss(self, model, x0: torch.Tensor, class_labels: torch.Tensor | None = None, images: torch.Tensor | None = None) -> torch.Tensor:
        """``images``: the pixel images of latent ``x0``, given when ``needs_pixels``."""
        x_t, t, target = self.training_inputs(x0)
        return F.mse_loss(mean_prediction(model, x_t, t, class_labels).float(), target.float())


class DDPMObjective(Objective):
    """Denoising diffusion (Ho et al. 2020) predicting the noise (epsilon) or v (Salimans & Ho 2022)."""

    def __init__(
        self,
        prediction_type: Literal["epsilon", "v_prediction"] = "epsilon",
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
    ):
        # The scheduler's noise table defines the forward process; sampling uses a fresh copy.
        self.noise_scheduler = DDPMScheduler(
            num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule, prediction_type=prediction_type
        )
        self.prediction_type = prediction_type

    def make_scheduler(self) -> DDPMScheduler:
        return DDPMScheduler.from_config(self.noise_scheduler.config)

    def training_inputs(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noisy input, timestep, target) for clean images ``x0``."""
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (x0.shape[0],), device=x0.device)
        x_t = self.noise_scheduler.add_noise(x0, noise, t)
        if self.prediction_type == "epsilon":
            return x_t, t, noise
        return x_t, t, self.noise_scheduler.get_velocity(x0, noise, t)


class FlowMatchingObjective(Objective):
    """Flow matching with the linear interpolant and velocity prediction (SiT, Ma et al. 2024).

    In diffusers' convention, so ``FlowMatchEulerDiscreteScheduler`` samples from it unchanged:
    ``x_t = (1 - sigma) * x0 + sigma * noise``, target velocity ``noise - x0``, model timestep
    ``sigma * num_train_timesteps``. SiT writes the same path with time reversed (t = 1 - sigma).
    """

    def __init__(self, num_train_timesteps: int = 1000, timestep_sampling: Literal["uniform", "logit_normal"] = "uniform"):
        self.num_train_timesteps = num_train_timesteps
        self.timestep_sampling = timestep_sampling

    def make_scheduler(self) -> FlowMatchEulerDiscreteScheduler:
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.num_train_timesteps, shift=1.0)

    def training_inputs(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noisy input, timestep, target velocity) for clean images ``x0``."""
        noise = torch.randn_like(x0)
        sigma = compute_density_for_timestep_sampling(
            "logit_normal" if self.timestep_sampling == "logit_normal" else "none",
            x0.shape[0],
            logit_mean=0.0,
            logit_std=1.0,
            device=x0.device,
        )
        s = sigma.view(-1, *[1] * (x0.dim() - 1))
        x_t = (1 - s) * x0 + s * noise
        return x_t, sigma * self.num_train_timesteps, noise - x0


class DistillationObjective(Objective):
    """Train a student to match a frozen teacher (e.g. the attention model an ATConv one was converted
    from) at the noisy inputs and times ``objective`` draws, alone (``weight=1``) or mixed with
    ``objective``'s own regression: ``(1 - weight) * own + weight * distillation``.

    The teacher (a pipeline or model folder) is loaded on first use, or by ``prepare``, which puts it
    on the training device and runs it under the student's autocast. It is never registered with the
    accelerator or the optimizer, so no checkpoint holds it. Its label dropout draws the same random
    numbers as the student's (the RNG is replayed), so both see the same labels dropped.
    """

    def __init__(self, objective: Objective, teacher_path: str, weight: float = 1.0):
        self.objective, self.teacher_path, self.weight = objective, teacher_path, weight
        self.teacher = None
        self.autocast: Callable = nullcontext

    def make_scheduler(self):
        return self.objective.make_scheduler()

    def training_inputs(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.objective.training_inputs(x0)

    def prepare(self, accelerator, network: torch.nn.Module) -> None:
        """Teacher on the accelerator's device, under its mixed-precision autocast."""
        self.load_teacher().to(accelerator.device)
        self.autocast = accelerator.autocast

    def load_teacher(self):
        if self.teacher is None:
            from ..models.conversion import load_pretrained

            self.teacher = load_pretrained(self.teacher_path).eval().requires_grad_(False)
        return self.teacher

    def loss(self, model, x0: torch.Tensor, class_labels: torch.Tensor | None = None, images: torch.Tensor | None = None) -> torch.Tensor:
        teacher = self.load_teacher()
        x_t, t, target = self.training_inputs(x0)
        teacher.train(model.training)  # label dropout on in both, or in neither
        devices = [x0.device] if x0.device.type == "cuda" else []
        with torch.no_grad(), self.autocast(), torch.random.fork_rng(devices=devices):
            teacher_prediction = mean_prediction(teacher, x_t, t, class_labels)
        prediction = mean_prediction(model, x_t, t, class_labels).float()
        distillation = F.mse_loss(prediction, teacher_prediction.float())
        if self.weight == 1:
            return distillation
        return (1 - self.weight) * F.mse_loss(prediction, target.float()) + self.weight * distillation


def check_teacher(path: str, student: Mapping[str, Any], trains: str) -> None:
    """The distillation teacher (``objective.distill_from``) takes the student's inputs, predicts what the
    objective ``trains`` (a prediction type), and drops labels at the same rate (its label dropout
    replays the student's random draws); ``student``: the model's resolved arguments."""
    from ..integrity import read_model_index
    from ..models.conversion import pretrained_config

    teacher = pretrained_config(path)  # a UsageError unless a pipeline or model folder
    for key in ("in_channels", "sample_size", "num_classes", "class_dropout_prob"):
        if key in teacher and teacher[key] != student.get(key):
            raise UsageError(f"objective.distill_from {path}: the teacher's {key} is {teacher[key]}, the student's {student.get(key)}; they must match")
    predicts = read_model_index(Path(path)).get("prediction_type") if Path(path, "model_index.json").is_file() else None
    if predicts is not None and predicts != trains:
        raise UsageError(f"objective.distill_from {path} predicts {predicts}, but this objective trains {trains}; use a teacher trained the same way")
