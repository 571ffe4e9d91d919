"""Experiment configs: the schema (one dataclass per section), loading it from YAML with
``section.key=value`` overrides, and the checks across sections.

A config has the sections ``model`` (``atdiff.models.model_config``), ``objective``
(``atdiff.objectives``), ``data`` (``atdiff.data``), ``training`` and ``sampling`` (here). Each key's
type, range, choices, applicability and resume rule are declared on its field (``atdiff.settings``),
``atdiff.config_loader`` reads a file against those dataclasses, and ``check_config`` applies the
rules that tie sections together, each defined with what it is about. Every key is checked before any
work starts: an unknown key or a bad value raises ``UsageError`` naming the key and what it accepts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from accelerate.utils import LoggerType
from diffusers.optimization import SchedulerType

from . import config_loader
from .config_loader import read_yaml, section_from_dict, sections_from_dict
from .data import DataConfig
from .errors import UsageError
from .generation.settings import SamplingConfig
from .models.model_config import ModelConfig, build_model, check_model, new_model
from .objectives import ObjectiveConfig, build_objective, check_objective_fits
from .pipelines import scheduler_by_name
from .pipelines.schedulers import prediction_type_of
from .settings import APPLIED, REFUSED, check_section, setting
from .training_data import check_model_fits

__all__ = [
    "ExperimentConfig", "ModelConfig", "SECTIONS", "SamplingConfig", "TrainingConfig", "apply_override", "build_model",
    "config_from_dict", "flat_config", "load_config", "new_model", "read_yaml", "section_from_dict",
]

# Trackers Accelerate can log to, plus "none".
TRACKERS = tuple(t.value for t in LoggerType if t.value != "all") + ("none",)
LR_SCHEDULES = tuple(s.value for s in SchedulerType if s.value != "piecewise_constant")
BATCH_WHY = "the run's position in the data is counted in micro-batches of batch_size / gradient_accumulation_steps"


@dataclass
class TrainingConfig:
    """How the model is trained. On resume (``--resume``) most keys may change and apply from the
    resumed step on (``atdiff.training.resume``); those that would make the checkpoint's state mean
    something else are refused."""

    # default: outputs/<config file name>
    output_dir: str | None = setting(None, on_resume=APPLIED)
    seed: int = setting(0, on_resume=REFUSED, range="[0, 4294967295]",  # numpy's seed range: Accelerate's set_seed seeds numpy too
                        why="the data order and the checkpoint's random streams come from this seed; another seed is a new run")
    # optimizer steps; on resume at least the checkpoint's step
    max_steps: int = setting(1000, on_resume=APPLIED, range="[1, inf)")
    # images per optimizer step, over all processes and accumulation steps
    batch_size: int = setting(64, on_resume=REFUSED, range="[1, inf)", why=BATCH_WHY)
    gradient_accumulation_steps: int = setting(1, on_resume=REFUSED, range="[1, inf)", why=BATCH_WHY)
    # The LR schedule is a function of the step: on resume the rate of step s is what these keys give at s.
    learning_rate: float = setting(1e-4, on_resume=APPLIED, range="(0, inf)")
    lr_scheduler: str = setting("constant_with_warmup", on_resume=APPLIED, choices=LR_SCHEDULES)  # a diffusers.optimization schedule
    lr_warmup_steps: int = setting(0, on_resume=APPLIED, range="[0, inf)",
                                   applies_if=("lr_scheduler", tuple(s for s in LR_SCHEDULES if s != "constant")))
    weight_decay: float = setting(0.0, on_resume=APPLIED, range="[0, inf)")  # ATConv's difference_control never takes any
    adam_beta1: float = setting(0.9, on_resume=APPLIED, range="[0, 1)")
    adam_beta2: float = setting(0.999, on_resume=APPLIED, range="[0, 1)")
    # 0 would zero every update, a negative norm flips it uphill
    max_grad_norm: float | None = setting(1.0, on_resume=APPLIED, range="(0, inf)", null="no clipping")
    # Steps whose loss or gradients are not finite are never applied; up to this many over the run
    # are skipped (each logged), one more stops the run (0: stop at the first).
    max_skipped_steps: int = setting(0, on_resume=APPLIED, range="[0, inf)")
    mixed_precision: Literal["no", "fp16", "bf16"] = setting("no", on_resume=APPLIED)
    # EMA decay warms up as 1 - (1 + step)^-ema_power up to ema_decay (diffusers' EMAModel): 3/4
    # suits runs under ~100k steps, 2/3 million-step runs.
    ema_decay: float = setting(0.9999, on_resume=APPLIED, range="[0, 1]")
    ema_power: float = setting(0.75, on_resume=APPLIED, range="(0, inf)")
    sample_every: int = setting(0, on_resume=APPLIED, range="[0, inf)")  # steps between EMA sample grids (0: only at the end)
    num_sample_images: int = setting(64, on_resume=APPLIED, range="[1, inf)")
    # FID and KID of the EMA weights every eval_every steps (0: never), eval_num_images samples drawn
    # as the `sampling` section says, against eval_num_real images of the data (a seeded subset;
    # null: all), whose statistics are cached.
    eval_every: int = setting(0, on_resume=APPLIED, range="[0, inf)")
    eval_num_images: int = setting(1000, on_resume=APPLIED, range="[2, inf)")  # FID needs a covariance
    eval_num_real: int | None = setting(None, on_resume=APPLIED, range="[2, inf)", null="the whole split")
    # steps between checkpoints (0: only at the end and on Ctrl-C)
    checkpoint_every: int = setting(0, on_resume=APPLIED, range="[0, inf)")
    # keep the newest K checkpoints (null: all), and the last one from before a loss spike
    checkpoints_total_limit: int | None = setting(2, on_resume=APPLIED, range="[1, inf)", null="keep all")
    log_every: int = setting(10, on_resume=APPLIED, range="[1, inf)")  # steps between tracker logs
    log_with: str = setting("tensorboard", on_resume=APPLIED, choices=TRACKERS)  # an Accelerate tracker, or "none"
    # TF32 matmuls and convolutions on CUDA (DiT's advice: much faster on Ampere and newer, and
    # accurate enough for training); false: full fp32. No effect on the CPU.
    tf32: bool = setting(True, on_resume=APPLIED)
    # torch.compile the model for training (the first steps compile; checkpoints and the pipeline
    # hold the plain model's weights).
    compile: bool = setting(False, on_resume=APPLIED)
    # Recompute each block's activations in the backward pass instead of keeping them (diffusers'
    # enable_gradient_checkpointing): much less memory for some more time; the same gradients.
    gradient_checkpointing: bool = setting(False, on_resume=APPLIED)
    # Time data/forward/backward/optimizer separately. Free on the CPU (always on there); on CUDA it
    # synchronises the device at each phase, which slows training a little.
    profile: bool = setting(False, on_resume=APPLIED)

    def check(self) -> None:
        """What this section's declarations cannot say on their own."""
        if self.batch_size % self.gradient_accumulation_steps:
            raise UsageError(
                f"training.batch_size ({self.batch_size}) must be a multiple of training.gradient_accumulation_steps "
                f"({self.gradient_accumulation_steps})"
            )


def check_sampling_fits_model(sampling: SamplingConfig, model: Mapping[str, Any], objective: ObjectiveConfig) -> None:
    """The ``sampling`` section fits the model (``model``: its resolved arguments) and reads its output
    the way ``objective`` trains it."""
    if sampling.scheduler is not None:
        trained = build_objective(objective).make_scheduler()
        try:
            scheduler_by_name(sampling.scheduler, trained.config, prediction_type_of(trained))
        except ValueError as err:
            raise UsageError(f"sampling.scheduler: {err} (or null: the objective's own)") from None
    guidance = sampling.guidance_scale
    if guidance != 1 and not (model.get("num_classes") and model.get("class_dropout_prob")):
        raise UsageError(
            f"sampling.guidance_scale={guidance} needs a class-conditional model trained with label dropout "
            f"(model.num_classes > 0 and model.class_dropout_prob > 0); use 1.0"
        )
    channels = sampling.guidance_channels
    if channels is not None and channels > model.get("in_channels", channels):
        raise UsageError(
            f"sampling.guidance_channels={channels}: must be at most model.in_channels ({model.get('in_channels')}), or null (all)"
        )


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def to_dict(self) -> dict[str, Any]:
        out = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        out["model"] = self.model.to_dict()
        return out


SECTIONS = tuple(f.name for f in dataclasses.fields(ExperimentConfig))


def flat_config(cfg: ExperimentConfig) -> dict[str, str | int | float | bool]:
    """The config as flat ``section/key`` scalars, as trackers (TensorBoard hparams) want."""
    return {
        f"{section}/{key}": value if isinstance(value, (str, int, float, bool)) else str(value)
        for section, values in cfg.to_dict().items()
        for key, value in values.items()
    }


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> ExperimentConfig:
    """Read a YAML config, apply ``section.key=value`` overrides (values parsed as YAML), validate."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"--config: {str(path)!r} is a folder; pass a YAML file (the configs/ folder holds examples)")
    if not path.is_file():
        raise UsageError(f"--config: no such file {str(path)!r}; the configs/ folder holds examples")
    raw = read_yaml(path, f"a mapping of sections {list(SECTIONS)}")
    for override in overrides:
        apply_override(raw, override)
    cfg = config_from_dict(raw)
    if cfg.training.output_dir is None:
        cfg.training.output_dir = str(Path("outputs") / path.stem)
    return cfg


def apply_override(raw: dict, override: str) -> None:
    """Set ``section.key=value`` in a config's raw mapping; the value is parsed as YAML."""
    config_loader.apply_override(raw, override, SECTIONS)


def config_from_dict(raw: Mapping[str, Any]) -> ExperimentConfig:
    cfg = sections_from_dict(ExperimentConfig, raw)
    check_config(cfg)
    return cfg


def check_config(cfg: ExperimentConfig) -> None:
    """Each section's declared ranges, choices and applicability and its own ``check``, then the rules
    across sections (each with the code it is about), then the model's own argument checks."""
    for section in SECTIONS:
        values = getattr(cfg, section)
        check_section(section, values)
        if hasattr(values, "check"):
            values.check()
    model = cfg.model.resolved()
    check_model_fits(model, cfg.data)  # images now; latents when training opens their store
    check_sampling_fits_model(cfg.sampling, model, cfg.objective)
    check_objective_fits(cfg.objective, cfg.model.type, model)
    check_model(cfg.model)
