"""The ``model`` section of a config: which model class, with which arguments, and building it.

Its keys are the arguments of the class ``type`` picks (what diffusers records in ``config.json``),
so it reads itself (``ModelConfig.from_dict``) instead of being a fixed set of fields, and the class
checks their values: ``check_model`` builds it on the meta device when the config loads.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from diffusers.models.modeling_utils import ModelMixin

from ..config_loader import checked_value, did_you_mean
from ..errors import UsageError
from ..nn.mixer import TOKEN_MIXERS
from ..settings import REFUSED, setting
from .conversion import initialize_from_, load_pretrained, pretrained_class_name, pretrained_config
from .dit import DiTModel, dit_size
from .swap import MixerUNet2DModel

MODEL_CLASSES: dict[str, type[ModelMixin]] = {"dit": DiTModel, "unet": MixerUNet2DModel}
MODEL_TYPES = tuple(MODEL_CLASSES)
# The classes whose weights each type can start from (model.init_from).
STARTS_FROM = {"dit": ("DiTModel",), "unet": ("MixerUNet2DModel", "UNet2DModel")}
MODEL_WHY = "the checkpoint holds this model's weights"


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
        return MODEL_CLASSES[self.type]

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``model_class``: ``init_from``'s config, the size's widths, then the explicit keys."""
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

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ModelConfig":
        """The section from a config's ``model`` mapping, each key checked against the model class's arguments."""
        if not isinstance(values, Mapping):
            raise UsageError(f"model: expected a mapping of keys, got {values!r}")
        values = dict(values)
        model_type = values.pop("type", "dit")
        if model_type not in MODEL_TYPES:
            raise UsageError(f"model.type: {model_type!r} is not one of {list(MODEL_TYPES)}")
        size = checked_value("model.size", values.pop("size", None), typing.get_type_hints(cls)["size"])
        init_from = values.pop("init_from", None)
        cfg = cls(type=model_type, size=size, init_from=init_from, kwargs=values)
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
        if "token_mixer" in values and values["token_mixer"] not in TOKEN_MIXERS:
            raise UsageError(f"model.token_mixer: {values['token_mixer']!r} is not one of {list(TOKEN_MIXERS)}")
        return cfg


def check_init_from(cfg: ModelConfig) -> None:
    if not isinstance(cfg.init_from, str):
        raise UsageError(f"model.init_from: expected a folder path, got {cfg.init_from!r}")
    if cfg.size is not None:  # allowed when it agrees: a from-scratch config can be reused for a conversion
        pretrained = pretrained_config(cfg.init_from)
        differing = {k: (v, pretrained.get(k)) for k, v in dit_size(cfg.size).items() if pretrained.get(k) != v}
        if differing:
            raise UsageError(
                f"model.size {cfg.size} disagrees with model.init_from's model on "
                f"{', '.join(f'{k} ({a} vs {b})' for k, (a, b) in differing.items())}; drop model.size"
            )
    found = pretrained_class_name(cfg.init_from)
    if found not in STARTS_FROM[cfg.type]:
        raise UsageError(f"model.init_from {cfg.init_from} holds a {found}, which model.type {cfg.type} cannot start from; set model.type accordingly")


def init_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """The named keyword arguments of a model class: its config keys, as diffusers' ConfigMixin reads them."""
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


def build_model(model_cfg: ModelConfig, report: Callable[[str], None] | None = None) -> ModelMixin:
    """The model a ``model`` section describes: freshly initialised, then given the weights of
    ``model.init_from`` that fit it (its replaced attention layers starting its ATConv layers);
    ``report`` gets a line saying what was copied."""
    model = new_model(model_cfg)
    if model_cfg.init_from:
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
