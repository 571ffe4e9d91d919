"""How images are drawn from a trained model: ``SamplingConfig``, the one sampling-settings type.

Each field declares, once, everything that is done with it: its range and resume rule (``setting``),
its command-line flag (``Flag``: ``atdiff sample``, ``fid`` and ``compare`` add them all with
``add_sampling_arguments``), its part in a samples folder's name, and whether it is a keyword
argument of ``ImageDiffusionPipeline.__call__`` (``call_arguments``). The config's ``sampling``
section, ``atdiff_sample.json`` records and compare's ``sampling.KEY=VALUE`` overrides for its
children are all this dataclass, so a new setting is added here and nowhere else.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from ..pipelines import SCHEDULER_NAMES
from ..settings import APPLIED, SEED_RANGE, check_section, setting


@dataclass(frozen=True)
class Flag:
    """A sampling field's command-line flag, and how a samples folder's name shows its value."""

    name: str  # "--steps"
    type: type
    help: str
    name_prefix: str  # "steps": a folder sampled with 50 steps is named "steps50-..."
    choices: tuple[str, ...] | None = None
    metavar: str | None = None


def sampling_setting(default: Any, flag: Flag, *, call_argument: bool, **rule: Any):
    """A ``SamplingConfig`` field: every sampling key applies on resume (to grids and evals from the
    resumed step on); ``call_argument``: passed to the pipeline call under the field's own name."""
    return setting(default, on_resume=APPLIED, metadata={"flag": flag, "call_argument": call_argument}, **rule)


@dataclass
class SamplingConfig:
    """How images are drawn from a trained model: the config's ``sampling`` section (training's grids
    and evals, the defaults of ``atdiff sample RUN`` / ``atdiff fid ... RUN``) and the sampling flags
    of ``sample``, ``fid`` and ``compare``."""

    scheduler: str | None = sampling_setting(
        None, Flag("--scheduler", str, "sampler (sampling.scheduler); default: {defaults}, else the model's own", "",
                   choices=SCHEDULER_NAMES), call_argument=False)
    # Model calls per image; the scheduler allocates its timesteps at once. 100000 is 100x DDPM's 1000.
    num_inference_steps: int = sampling_setting(
        50, Flag("--steps", int, "sampler steps (sampling.num_inference_steps); default: {defaults}", "steps"),
        call_argument=True, range="[1, 100000]")
    guidance_scale: float = sampling_setting(
        1.0, Flag("--guidance", float, "classifier-free guidance scale, 1: none (sampling.guidance_scale); default: {defaults}",
                  "guidance"), call_argument=True, range="(-inf, inf)")
    guidance_channels: int | None = sampling_setting(
        None, Flag("--guidance-channels", int, "guide only the first N channels (3: DiT/SiT's convention on 4-channel latents, "
                   "as in their papers; sampling.guidance_channels); default: {defaults}, else all", "gch", metavar="N"),
        call_argument=True, range="[1, inf)", null="all channels")
    # image i's noise depends only on (seed, i): not a call argument, it seeds each image's generator
    seed: int = sampling_setting(
        0, Flag("--seed", int, "image i's noise depends only on (seed, i) (sampling.seed); default: {defaults}", "seed"),
        call_argument=False, range=SEED_RANGE)
    # TF32 matmuls and convolutions on CUDA, as DiT's and SiT's sample_ddp.py (several times faster
    # than float32 on Ampere and newer); no effect on the CPU. Part of the record: the images differ.
    tf32: bool = sampling_setting(
        True, Flag("--tf32", bool, "TF32 matmuls on CUDA, as DiT/SiT sample (sampling.tf32; --no-tf32: full float32); "
                   "default: {defaults}, else on", "tf32"), call_argument=False)

    def call_arguments(self) -> dict[str, Any]:
        """The keyword arguments of ``ImageDiffusionPipeline.__call__`` these settings give."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata["call_argument"]}

    def folder_name(self) -> str:
        """A name that differs for any two settings, e.g. ``steps50-guidance1.5-gch3-seed0``; a switch
        is named only when off (``no-tf32``)."""
        def part(name: str, value: Any) -> str | None:
            prefix = flag_of(name).name_prefix
            if isinstance(value, bool):
                return None if value else f"no-{prefix}"
            return None if value is None else prefix + (f"{value:g}" if isinstance(value, float) else str(value))

        return "-".join(p for name, value in dataclasses.asdict(self).items() if (p := part(name, value)) is not None)

    def as_overrides(self) -> list[str]:
        """``sampling.KEY=VALUE`` overrides (``atdiff train``'s syntax) that set every field to this value."""
        return [f"sampling.{key}={json.dumps(value)}" for key, value in dataclasses.asdict(self).items()]


def flag_of(field_name: str) -> Flag:
    return {f.name: f.metadata["flag"] for f in dataclasses.fields(SamplingConfig)}[field_name]


def flag_fields() -> dict[str, str]:
    """argparse destination (``steps``) -> SamplingConfig field (``num_inference_steps``)."""
    return {flag_of(f.name).name[2:].replace("-", "_"): f.name for f in dataclasses.fields(SamplingConfig)}


# How a range error names a field: its value came from the flag or from a config's sampling section.
def flag_names() -> dict[str, str]:
    return {f.name: f"{flag_of(f.name).name} (sampling.{f.name})" for f in dataclasses.fields(SamplingConfig)}


def add_sampling_arguments(parser, defaults: str = "the run's config.yaml `sampling` section") -> None:
    """Every sampling flag on ``parser`` (or an argument group); unset flags leave ``defaults``
    (described in the help) alone, see ``sampling_overrides``."""
    for field in dataclasses.fields(SamplingConfig):
        flag = field.metadata["flag"]
        if flag.type is bool:  # --tf32 / --no-tf32
            parser.add_argument(flag.name, action=argparse.BooleanOptionalAction, help=flag.help.format(defaults=defaults))
        else:
            parser.add_argument(flag.name, type=flag.type, choices=flag.choices, metavar=flag.metavar,
                                help=flag.help.format(defaults=defaults))


def sampling_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The SamplingConfig fields the user set with sampling flags."""
    return {key: getattr(args, dest) for dest, key in flag_fields().items() if getattr(args, dest, None) is not None}


def check_sampling(sampling: SamplingConfig) -> None:
    check_section("sampling", sampling, flag_names())
