"""Experiment configs: dataclasses read from YAML, ``section.key=value`` overrides, validation, ``build_model``.

A config has the sections ``model``, ``objective``, ``data``, ``training`` and optionally
``sampling``. Every key is checked before any work starts: an unknown key or a bad value raises
``UsageError`` naming the key and what it accepts.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import torch
import yaml
from accelerate.utils import LoggerType
from diffusers.models.modeling_utils import ModelMixin
from diffusers.optimization import SchedulerType

from .data import DataConfig
from .errors import UsageError, one_line
from .integrity import read_model_index
from .objectives import ObjectiveConfig, build_objective
from .pipelines import scheduler_by_name
from .pipelines.schedulers import prediction_type_of
from .settings import APPLIED, REFUSED, SEED_RANGE, check_section, setting
from .training_data import check_model_fits

MODEL_TYPES = ("dit", "unet")
# Trackers Accelerate can log to, plus "none".
TRACKERS = tuple(t.value for t in LoggerType if t.value != "all") + ("none",)
LR_SCHEDULES = tuple(s.value for s in SchedulerType if s.value != "piecewise_constant")
MODEL_WHY = "the checkpoint holds this model's weights"
BATCH_WHY = "the run's position in the data is counted in micro-batches of batch_size / gradient_accumulation_steps"


@dataclass
class ModelConfig:
    """``type`` picks the class (``dit``: ``atdiff.DiTModel``, ``unet``: ``atdiff.MixerUNet2DModel``);
    every other key is a keyword argument of that class. ``size: "T/4"`` expands via ``atdiff.dit_size``
    (keys given explicitly win). ``init_from: PATH`` (a pipeline or model folder) starts from that
    model: its config is the base the other keys override (e.g. ``token_mixer: atconv``), and every
    weight that still fits is copied (see ``atdiff.models.conversion``)."""

    type: Literal["dit", "unet"] = setting("dit", on_resume=REFUSED, why=MODEL_WHY)
    size: str | None = setting(None, on_resume=REFUSED, why=MODEL_WHY)
    init_from: str | None = setting(None, on_resume=REFUSED, why="the run's weights started from this model")
    kwargs: dict[str, Any] = setting(default_factory=dict, on_resume=REFUSED, why=MODEL_WHY)  # every other model.* key

    @property
    def model_class(self) -> type[ModelMixin]:
        from .models import DiTModel, MixerUNet2DModel

        return {"dit": DiTModel, "unet": MixerUNet2DModel}[self.type]

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``model_class``: ``init_from``'s config, the size's widths, then the explicit keys."""
        from .models import dit_size
        from .models.conversion import pretrained_config

        parameters = init_parameters(self.model_class)
        pretrained = {k: v for k, v in pretrained_config(self.init_from).items() if k in parameters} if self.init_from else {}
        return {**pretrained, **(dit_size(self.size) if self.size else {}), **self.kwargs}

    def resolved(self) -> dict[str, Any]:
        """Every argument the model will be built with, defaults included."""
        defaults = {
            name: p.default
            for name, p in init_parameters(self.model_class).items()
            if p.default is not inspect.Parameter.empty
        }
        return {**defaults, **self.model_kwargs()}

    def to_dict(self) -> dict[str, Any]:
        optional = {"size": self.size, "init_from": self.init_from}
        return {"type": self.type, **{k: v for k, v in optional.items() if v}, **self.kwargs}


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
    lr_scheduler: str = setting("constant_with_warmup", on_resume=APPLIED)  # a diffusers.optimization schedule
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
    log_with: str = setting("tensorboard", on_resume=APPLIED)  # an Accelerate tracker, or "none"
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


@dataclass
class SamplingConfig:
    """How images are drawn from a trained model: the one sampling-settings type of atdiff.

    The config's ``sampling`` section (training's sample grids and evals, and the defaults of
    ``atdiff sample RUN`` / ``atdiff fid ... RUN``) and the sampling flags of ``sample``, ``fid`` and
    ``compare`` (``atdiff.sampling.add_sampling_arguments``) all fill this. Field names are those of ``ImageDiffusionPipeline.__call__``.
    On resume every key applies to the grids and evals from the resumed step on.
    """

    # a name from atdiff.pipelines.SCHEDULER_NAMES; None: the model's own
    scheduler: str | None = setting(None, on_resume=APPLIED)
    # Model calls per image; the scheduler allocates its timesteps at once. 100000 is 100x DDPM's 1000.
    num_inference_steps: int = setting(50, on_resume=APPLIED, range="[1, 100000]")
    guidance_scale: float = setting(1.0, on_resume=APPLIED, range="(-inf, inf)")
    # guide only the first N channels (DiT/SiT's 3); null: all
    guidance_channels: int | None = setting(None, on_resume=APPLIED, range="[1, inf)", null="all channels")
    # image i's noise depends only on (seed, i)
    seed: int = setting(0, on_resume=APPLIED, range=SEED_RANGE)


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


def read_yaml(path: Path, expected: str) -> dict:
    """A YAML file that must hold a mapping (``expected`` says of what), as a dict (empty for an empty
    file); anything else is a UsageError naming the file. ``safe_load`` builds no Python objects: a
    ``!!python/...`` tag is refused as a ``ConstructorError``, one of the YAMLErrors caught here."""
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UsageError(f"{path} is not valid YAML: {one_line(str(err))}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not a UTF-8 text file; expected YAML: {expected}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: expected {expected}, got a {type(raw).__name__}")
    return raw


def apply_override(raw: dict, override: str) -> None:
    """Set ``a.b=value`` in a nested dict; the value is parsed as YAML (``3``, ``1e-4``, ``true``, ``null``)."""
    key, sep, text = override.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) < 2 or not all(parts):
        raise UsageError(f"override {override!r}: write SECTION.KEY=VALUE, e.g. training.max_steps=100 (sections: {list(SECTIONS)})")
    node = raw
    for i, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UsageError(f"override {override!r}: {'.'.join(parts[: i + 1])} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as err:
        raise UsageError(f"override {override!r}: the value is not YAML ({one_line(str(err))}); quote it or fix its brackets") from None


def config_from_dict(raw: Mapping[str, Any]) -> ExperimentConfig:
    unknown = [name for name in raw if name not in SECTIONS]
    if unknown:
        raise UsageError(f"unknown section {unknown[0]!r}; a config has the sections {list(SECTIONS)}")
    model = model_config_from_dict(raw.get("model") or {})
    cfg = ExperimentConfig(
        model=model,
        objective=section_from_dict(ObjectiveConfig, raw.get("objective") or {}, "objective"),
        data=section_from_dict(DataConfig, raw.get("data") or {}, "data"),
        training=section_from_dict(TrainingConfig, raw.get("training") or {}, "training"),
        sampling=section_from_dict(SamplingConfig, raw.get("sampling") or {}, "sampling"),
    )
    check_values(cfg)
    return cfg


def section_from_dict(cls: type, values: Mapping[str, Any], section: str):
    if not isinstance(values, Mapping):
        raise UsageError(f"{section}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    checked = {}
    for key, value in values.items():
        if key not in names:
            raise UsageError(f"unknown key {section}.{key}{did_you_mean(key, names)}; {section} takes {names}")
        checked[key] = checked_value(f"{section}.{key}", value, hints[key])
    return cls(**checked)


def checked_value(key: str, value: Any, annotation: Any) -> Any:
    """``value`` if it fits ``annotation`` (ints widen to float), else a UsageError naming ``key``.
    Annotations other than None/bool/int/float/str/Literal and unions of them are not checked."""
    options = get_args(annotation) if get_origin(annotation) in (typing.Union, types.UnionType) else (annotation,)
    choices = []
    for option in options:
        if option is type(None) and value is None:
            return value
        if get_origin(option) is Literal:
            choices += get_args(option)
            if value in get_args(option):
                return value
        elif option is bool and isinstance(value, bool):
            return value
        elif option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        elif option is float and not isinstance(value, bool):
            if isinstance(value, (int, float)):
                return float(value)
            if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
                try:
                    return float(value)
                except ValueError:
                    pass
        elif option is str and isinstance(value, str):
            return value
        elif option not in (type(None), bool, int, float, str):
            return value
    if choices and all(o is type(None) or get_origin(o) is Literal for o in options):
        allowed = list(choices) + ([None] if type(None) in options else [])
        raise UsageError(f"{key}: {value!r} is not one of {allowed}")
    expected = " or ".join("null" if o is type(None) else getattr(o, "__name__", str(o)) for o in options)
    raise UsageError(f"{key}: expected {expected}, got {value!r}")


def model_config_from_dict(values: Mapping[str, Any]) -> ModelConfig:
    if not isinstance(values, Mapping):
        raise UsageError(f"model: expected a mapping of keys, got {values!r}")
    values = dict(values)
    model_type = values.pop("type", "dit")
    if model_type not in MODEL_TYPES:
        raise UsageError(f"model.type: {model_type!r} is not one of {list(MODEL_TYPES)}")
    size = checked_value("model.size", values.pop("size", None), typing.get_type_hints(ModelConfig)["size"])
    init_from = values.pop("init_from", None)
    cfg = ModelConfig(type=model_type, size=size, init_from=init_from, kwargs=values)
    if init_from is not None:
        check_init_from(cfg)
    if size is not None:
        if model_type != "dit":
            raise UsageError(f"model.size applies to model.type dit only; give the {model_type} widths as its own keys")
        try:
            cfg.model_kwargs()
        except ValueError as err:
            raise UsageError(f"model.size: {err}") from err
    parameters = init_parameters(cfg.model_class)
    hints = init_type_hints(cfg.model_class)
    for key, value in values.items():
        if key not in parameters:
            raise UsageError(
                f"unknown key model.{key}{did_you_mean(key, parameters)} for {cfg.model_class.__name__}; "
                f"it takes {sorted(parameters)}"
            )
        if key in hints:
            values[key] = checked_value(f"model.{key}", value, hints[key])
    if "token_mixer" in values:
        from .nn.mixer import TOKEN_MIXERS

        if values["token_mixer"] not in TOKEN_MIXERS:
            raise UsageError(f"model.token_mixer: {values['token_mixer']!r} is not one of {list(TOKEN_MIXERS)}")
    return cfg


def check_init_from(cfg: ModelConfig) -> None:
    from .models.conversion import pretrained_class_name

    if not isinstance(cfg.init_from, str):
        raise UsageError(f"model.init_from: expected a folder path, got {cfg.init_from!r}")
    if cfg.size is not None:  # allowed when it agrees: a from-scratch config can be reused for a conversion
        from .models import dit_size
        from .models.conversion import pretrained_config

        pretrained = pretrained_config(cfg.init_from)
        differing = {k: (v, pretrained.get(k)) for k, v in dit_size(cfg.size).items() if pretrained.get(k) != v}
        if differing:
            raise UsageError(
                f"model.size {cfg.size} disagrees with model.init_from's model on "
                f"{', '.join(f'{k} ({a} vs {b})' for k, (a, b) in differing.items())}; drop model.size"
            )
    fitting = {"dit": ("DiTModel",), "unet": ("MixerUNet2DModel", "UNet2DModel")}[cfg.type]
    found = pretrained_class_name(cfg.init_from)
    if found not in fitting:
        raise UsageError(f"model.init_from {cfg.init_from} holds a {found}, which model.type {cfg.type} cannot start from; set model.type accordingly")


def did_you_mean(key: str, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def init_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """The named keyword arguments of a model class (its config keys)."""
    params = inspect.signature(cls.__init__).parameters
    return {
        name: p
        for name, p in params.items()
        if name != "self" and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    }


def init_type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls.__init__)
    except Exception:  # annotations that do not resolve at runtime: leave value checks to the class
        return {}


def check_values(cfg: ExperimentConfig) -> None:
    """Each key's declared range and applicability, and checks across sections that types alone do not express."""
    for section in SECTIONS:
        if section != "model":  # model keys are the model class's arguments: it checks them (check_model)
            check_section(section, getattr(cfg, section))
    t, d = cfg.training, cfg.data
    if t.batch_size % t.gradient_accumulation_steps:
        raise UsageError(
            f"training.batch_size ({t.batch_size}) must be a multiple of training.gradient_accumulation_steps "
            f"({t.gradient_accumulation_steps})"
        )
    if t.lr_scheduler not in LR_SCHEDULES:
        raise UsageError(f"training.lr_scheduler: {t.lr_scheduler!r} is not one of {list(LR_SCHEDULES)}")
    if t.log_with not in TRACKERS:
        raise UsageError(f"training.log_with: {t.log_with!r} is not one of {list(TRACKERS)}")
    if d.channels not in (None, 1, 3):
        raise UsageError(f"data.channels must be 1, 3 or null (the dataset's own), got {d.channels}")
    if d.dataset == "imagefolder" and not d.root:
        raise UsageError("data.root: imagefolder needs the folder that holds one subfolder of images per class")

    if d.vae_subfolder and not d.vae:
        raise UsageError("data.vae_subfolder is set but data.vae is not; name the VAE (folder or hub id) in data.vae")
    if d.latent_dir and not d.vae:
        raise UsageError("data.latent_dir is set but data.vae is not; latent stores hold VAE latents, so name the VAE in data.vae")

    model = cfg.model.resolved()
    check_model_fits(model, d)  # images now; latents when training opens their store
    check_scheduler(cfg)
    guidance = cfg.sampling.guidance_scale
    if guidance != 1 and not (model.get("num_classes") and model.get("class_dropout_prob")):
        raise UsageError(
            f"sampling.guidance_scale={guidance} needs a class-conditional model trained with label dropout "
            f"(model.num_classes > 0 and model.class_dropout_prob > 0); use 1.0"
        )
    channels = cfg.sampling.guidance_channels
    if channels is not None and channels > model.get("in_channels", channels):
        raise UsageError(
            f"sampling.guidance_channels={channels}: must be at most model.in_channels ({model.get('in_channels')}), or null (all)"
        )
    check_time_convention(cfg, model)
    if cfg.objective.distill_from:
        check_teacher(cfg, model)
    if cfg.objective.repa_encoder:
        check_repa(cfg, model)
    check_model(cfg.model)


def check_scheduler(cfg: ExperimentConfig) -> None:
    """``sampling.scheduler`` must read the model's output the way ``objective`` trains it."""
    if cfg.sampling.scheduler is None:
        return
    trained = build_objective(cfg.objective).make_scheduler()
    try:
        scheduler_by_name(cfg.sampling.scheduler, trained.config, prediction_type_of(trained))
    except ValueError as err:
        raise UsageError(f"sampling.scheduler: {err} (or null: the objective's own)") from None


def check_time_convention(cfg: ExperimentConfig, model: dict[str, Any]) -> None:
    """A SiT-convention model (imported from SiT) reads the timestep 1000 * sigma of atdiff's flow objective."""
    from .models.dit import SIT_TIMESTEPS

    o = cfg.objective
    if model.get("time_convention") == "sit" and (o.type != "flow_matching" or o.num_train_timesteps != SIT_TIMESTEPS):
        raise UsageError(
            f"model.time_convention is sit (a SiT network), which trains with objective.type=flow_matching and "
            f"objective.num_train_timesteps={SIT_TIMESTEPS}; got {o.type} with {o.num_train_timesteps}"
        )


def check_teacher(cfg: ExperimentConfig, student: dict[str, Any]) -> None:
    """The distillation teacher takes the student's inputs, predicts what the objective trains, and drops
    labels at the same rate (its label dropout replays the student's random draws)."""
    from .models.conversion import pretrained_config

    path = cfg.objective.distill_from
    teacher = pretrained_config(path)  # a UsageError unless a pipeline or model folder
    for key in ("in_channels", "sample_size", "num_classes", "class_dropout_prob"):
        if key in teacher and teacher[key] != student.get(key):
            raise UsageError(f"objective.distill_from {path}: the teacher's {key} is {teacher[key]}, the student's {student.get(key)}; they must match")
    predicts = read_model_index(Path(path)).get("prediction_type") if Path(path, "model_index.json").is_file() else None
    trains = prediction_type_of(build_objective(cfg.objective).make_scheduler())
    if predicts is not None and predicts != trains:
        raise UsageError(f"objective.distill_from {path} predicts {predicts}, but this objective trains {trains}; use a teacher trained the same way")


def check_repa(cfg: ExperimentConfig, model: dict[str, Any]) -> None:
    """REPA aligns the hidden states after one of a DiT's blocks (the encoder itself loads when training starts)."""
    if cfg.model.type != "dit":
        raise UsageError(f"objective.repa_encoder: REPA is not supported on model.type {cfg.model.type} (it aligns a DiT's "
                         f"token states with the encoder's patches); use model.type dit or drop objective.repa_encoder")
    depth = cfg.objective.repa_encoder_depth
    if depth > model["depth"]:
        raise UsageError(f"objective.repa_encoder_depth={depth} is beyond the model's {model['depth']} blocks; "
                         f"use 1 to {model['depth']} (REPA: 8 of SiT-XL's 28)")


def build_model(model_cfg: ModelConfig, report: Callable[[str], None] | None = None) -> ModelMixin:
    """The model a ``model`` section describes: freshly initialised, then given the weights of
    ``model.init_from`` that fit it (its replaced attention layers starting its ATConv layers);
    ``report`` gets a line saying what was copied."""
    model = new_model(model_cfg)
    if model_cfg.init_from:
        from .models.conversion import initialize_from_, load_pretrained

        transfer = initialize_from_(model, load_pretrained(model_cfg.init_from))
        if report is not None:
            report(f"model.init_from {model_cfg.init_from}: {transfer.summary()}")
    return model


def new_model(model_cfg: ModelConfig) -> ModelMixin:
    try:
        return model_cfg.model_class(**model_cfg.model_kwargs())
    # Bad widths that the class does not check itself fail in torch (negative sizes) or in arithmetic.
    except (ValueError, TypeError, RuntimeError, ArithmeticError) as err:
        raise UsageError(f"model: {err}") from err


def check_model(model_cfg: ModelConfig) -> None:
    """Build the model on the meta device (no memory, milliseconds) so that arguments it rejects fail at
    load, before a run folder or an output exists."""
    with torch.device("meta"):
        new_model(model_cfg)
