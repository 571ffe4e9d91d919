"""Reading dataclass configs: a YAML file, ``section.key=value`` overrides, and each section's keys
checked against its dataclass (an unknown key named with the closest valid one, a value against its
field's type).

General: a config is known here only through the dataclasses passed in (``atdiff.config``'s schema,
``eval.bench``'s ``BenchConfig``, a ``sampling`` section alone). A section class whose keys are not
its fields reads itself with a ``from_dict`` classmethod (the ``model`` section, whose keys are its
model class's arguments). Ranges, choices and applicability are ``atdiff.settings``' checks.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from .errors import UsageError, one_line

Schema = TypeVar("Schema")


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


def apply_override(raw: dict, override: str, sections: Sequence[str]) -> None:
    """Set ``a.b=value`` in a nested dict; the value is parsed as YAML (``3``, ``1e-4``, ``true``, ``null``).
    ``sections``: the config's, named when the override is malformed."""
    key, sep, text = override.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) < 2 or not all(parts):
        raise UsageError(f"override {override!r}: write SECTION.KEY=VALUE, e.g. training.max_steps=100 (sections: {list(sections)})")
    node = raw
    for i, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UsageError(f"override {override!r}: {'.'.join(parts[: i + 1])} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as err:
        raise UsageError(f"override {override!r}: the value is not YAML ({one_line(str(err))}); quote it or fix its brackets") from None


def sections_from_dict(schema: type[Schema], raw: Mapping[str, Any]) -> Schema:
    """``schema``, a dataclass whose fields are the sections, from a mapping of section -> keys; a
    missing section takes its defaults."""
    names = [f.name for f in dataclasses.fields(schema)]
    unknown = [name for name in raw if name not in names]
    if unknown:
        raise UsageError(f"unknown section {unknown[0]!r}; a config has the sections {names}")
    hints = typing.get_type_hints(schema)
    sections = {}
    for name in names:
        cls, values = hints[name], raw.get(name) or {}
        own_reader = getattr(cls, "from_dict", None)
        sections[name] = own_reader(values) if own_reader else section_from_dict(cls, values, name)
    return schema(**sections)


def section_from_dict(cls: type[Schema], values: Mapping[str, Any], section: str) -> Schema:
    """The dataclass ``cls`` from ``values``: every key one of its fields, every value of its field's type."""
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


def did_you_mean(key: str, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1)
    return f" (did you mean {close[0]}?)" if close else ""
