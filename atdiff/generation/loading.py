"""Loading a pipeline folder to sample from: the trust rules, the scheduler, the run's own sampling settings."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from ..config_loader import read_yaml, section_from_dict
from ..devices import check_device
from ..errors import UsageError, one_line
from ..integrity import LOCK_NAME, read_model_index
from ..objectives import ObjectiveConfig
from ..pipelines import ImageDiffusionPipeline, scheduler_by_name
from ..pipelines.trust import check_no_code_from_folder
from ..settings import check_range, rule_of
from .settings import SamplingConfig, check_sampling


def check_pipeline_dir(path: Path) -> None:
    """Refuse, before loading, a folder that is not an atdiff pipeline or asks to run its own code."""
    if not (path / "model_index.json").is_file():
        if (path / LOCK_NAME).is_file():
            raise UsageError(
                f"{path} is an `atdiff train` run without its final pipeline (written when training ends); wait for "
                f"it, or finish it with `atdiff train --config {path / 'config.yaml'} --output-dir {path} --resume latest`"
            )
        raise UsageError(f"{path} is not a pipeline folder (no model_index.json); pass the --output-dir of `atdiff train`")
    class_name = read_model_index(path).get("_class_name")
    class_name = class_name[-1] if isinstance(class_name, list) else class_name
    if class_name != ImageDiffusionPipeline.__name__:
        raise UsageError(f"{path} holds a {class_name}, not an atdiff {ImageDiffusionPipeline.__name__}; pass a folder written by `atdiff train`")
    check_no_code_from_folder(path, ImageDiffusionPipeline)
    check_scheduler_tables(path / "scheduler" / "scheduler_config.json")


def check_scheduler_tables(config: Path) -> None:
    """A scheduler builds tables of ``num_train_timesteps`` entries as it loads: the objective's range
    applies (a hand-edited 10^9 would be gigabytes)."""
    try:
        steps = json.loads(config.read_text()).get("num_train_timesteps", 1)
    except (OSError, ValueError, AttributeError):  # no such file, or not a JSON object: loading says so
        return
    if type(steps) is not int:
        raise UsageError(f"{config}: num_train_timesteps must be an integer, got {steps!r}")
    check_range(f"{config}: num_train_timesteps", steps, rule_of(ObjectiveConfig, "num_train_timesteps"))


def load_pipeline(pipeline_dir: Path, scheduler: str | None, device: str) -> ImageDiffusionPipeline:
    """The pipeline of an ``atdiff train`` folder on ``device``, with scheduler ``scheduler`` (a name
    from ``SCHEDULER_NAMES``; None keeps the folder's own)."""
    check_device(device)
    check_pipeline_dir(pipeline_dir)
    try:
        pipe = ImageDiffusionPipeline.from_pretrained(pipeline_dir)
    except UsageError:  # already one line naming the file (a damaged or refused one)
        raise
    # diffusers' errors for a folder whose files do not describe a loadable pipeline (a class the library
    # lacks, weights that do not fit the config, ...): the folder is the user's input.
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as err:
        raise UsageError(f"{pipeline_dir} does not load as an atdiff pipeline: {one_line(str(err))}") from err
    return use_scheduler(pipe, scheduler).to(device)


def use_scheduler(pipe: ImageDiffusionPipeline, scheduler: str | None) -> ImageDiffusionPipeline:
    """``pipe`` sampling with the scheduler named ``scheduler`` (None: its own), built from its saved config."""
    if scheduler is not None:
        try:
            pipe.scheduler = scheduler_by_name(scheduler, pipe.scheduler.config, pipe.config.prediction_type)
        except ValueError as err:
            raise UsageError(str(err)) from None
    return pipe


def sampling_for(pipeline_dir: Path, given: SamplingConfig | dict | None = None) -> SamplingConfig:
    """How to sample ``pipeline_dir``: ``given`` when complete, else the run's own ``sampling``
    section (its ``config.yaml``, written by ``atdiff train``) with the fields ``given`` sets."""
    sampling = given if isinstance(given, SamplingConfig) else replace(run_sampling_defaults(pipeline_dir), **(given or {}))
    check_sampling(sampling)
    return sampling


def run_sampling_defaults(pipeline_dir: Path) -> SamplingConfig:
    """The ``sampling`` section of the run's ``config.yaml``, else SamplingConfig's defaults."""
    config = pipeline_dir / "config.yaml"
    if not config.is_file():
        return SamplingConfig()
    raw = read_yaml(config, "the config `atdiff train` wrote, a mapping of sections")
    return section_from_dict(SamplingConfig, raw.get("sampling") or {}, f"{config}: sampling")
