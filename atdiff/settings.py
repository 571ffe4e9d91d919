"""Config keys declared where they are defined: each dataclass field of a config section says its
range, what null means, when it applies, and what a resume may do with it.

``setting(default, on_resume=APPLIED, range="[1, inf)")`` is a ``dataclasses.field`` carrying a
``Rule`` in its metadata (a ``Literal`` type says a key's choices where they are fixed strings;
``choices`` where they are computed, e.g. from what a library offers), so the checks (``check_section``), the resume rules
(``atdiff.training.resume``) and the tests read one declaration per key. A key without a rule is an
error (``rule_of``), which a test enforces over every section.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any

from .errors import UsageError

# What a resume (``atdiff train --resume``) does with a key whose value differs from the checkpoint's:
APPLIED = "applied"  # takes effect from the resumed step on, as if the config had changed at that step
REFUSED = "refused"  # refused with one line: the checkpoint cannot be continued under another value

SET = "set"  # in ``applies_if``: the other key is not null
SEED_RANGE = "[0, 18446744073709551615]"  # what torch.Generator.manual_seed takes: below 2**64


@dataclass(frozen=True)
class Rule:
    on_resume: str  # APPLIED or REFUSED
    why: str = ""  # REFUSED: what another value would break
    range: str | None = None  # numeric keys: an interval such as "[1, inf)"; inf bounds are open
    choices: tuple | None = None  # the values the key takes, where its type cannot say (computed lists, ints)
    null: str | None = None  # what null means, for keys that may be null
    # (other key of the same section, the values under which this key does anything): a key set to
    # other than its default where it does nothing is refused, not ignored.
    applies_if: tuple[str, Any] | None = None


def setting(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, on_resume: str,
            why: str = "", range: str | None = None, choices: tuple | None = None, null: str | None = None,
            applies_if: tuple[str, Any] | None = None, metadata: Mapping[str, Any] | None = None):
    """A dataclass field with its ``Rule`` (and ``metadata`` a section keeps for its own uses)."""
    if on_resume not in (APPLIED, REFUSED) or (on_resume == REFUSED) != bool(why):
        raise ValueError(f"on_resume must be {APPLIED!r}, or {REFUSED!r} with the reason why")
    rule = Rule(on_resume, why, range, tuple(choices) if choices is not None else None, null, applies_if)
    return dataclasses.field(default=default, default_factory=default_factory, metadata={**(metadata or {}), "rule": rule})


def rule_of(cls: type, name: str) -> Rule:
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    if "rule" not in field.metadata:
        raise TypeError(f"{cls.__name__}.{name} declares no rule; define it with atdiff.settings.setting(...)")
    return field.metadata["rule"]


def default_of(cls: type, name: str) -> Any:
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


# ------------------------------------------------------------------------------------------------
# Checks
# ------------------------------------------------------------------------------------------------


def check_section(section: str, values: Any, names: Mapping[str, str] | None = None) -> None:
    """Every declared range, choice and applicability of one section's dataclass instance. ``names``
    (field -> how to name it) names a field set by a flag too, e.g. ``--steps (sampling.num_inference_steps)``."""
    for field in dataclasses.fields(values):
        rule, value = rule_of(type(values), field.name), getattr(values, field.name)
        key = (names or {}).get(field.name, f"{section}.{field.name}")
        if rule.range is not None and not (value is None and rule.null):
            check_range(key, value, rule)
        if rule.choices is not None and not (value is None and rule.null):
            check_choice(key, value, rule)
        if rule.applies_if is not None:
            check_applies(section, values, field.name, rule.applies_if)


def check_range(key: str, value: Any, rule: Rule) -> None:
    if not in_interval(value, rule.range):
        null = f" (or null: {rule.null})" if rule.null else ""
        raise UsageError(f"{key} must be {described(rule.range)}{null}, got {value}")


def check_choice(key: str, value: Any, rule: Rule) -> None:
    if value not in rule.choices:
        null = f" (or null: {rule.null})" if rule.null else ""
        raise UsageError(f"{key}: {value!r} is not one of {list(rule.choices)}{null}")


def applies(values: Mapping[str, Any], applies_if: tuple[str, Any] | None) -> bool:
    """Whether a key with this ``applies_if`` does anything, given its section's ``values``."""
    if applies_if is None:
        return True
    other, when = applies_if
    return values.get(other) is not None if when == SET else values.get(other) in when


def check_applies(section: str, values: Any, name: str, applies_if: tuple[str, Any]) -> None:
    value = getattr(values, name)
    if applies(dataclasses.asdict(values), applies_if) or value == default_of(type(values), name):
        return
    other, when = applies_if
    under = f"{section}.{other} set" if when == SET else f"{section}.{other} {' or '.join(map(str, when))}"
    now = getattr(values, other)
    raise UsageError(f"{section}.{name}={value} does nothing with {section}.{other}={'null' if now is None else now} "
                     f"(it applies only with {under}); drop it")


def bounds(interval: str) -> tuple[float, float]:
    """The interval's bounds, ints kept exact (a seed bound of 2**64 - 1 does not survive a float)."""
    def number(text: str) -> float:
        return int(text) if text.lstrip("-").isdigit() else float(text)

    low, high = interval[1:-1].split(", ")
    return number(low), number(high)


def in_interval(value: float, interval: str) -> bool:
    if isinstance(value, float) and math.isnan(value):
        return False
    low, high = bounds(interval)
    above = value >= low if interval[0] == "[" else value > low
    below = value <= high if interval[-1] == "]" else value < high
    return above and below


def described(interval: str) -> str:
    low, high = interval[1:-1].split(", ")
    if high != "inf":
        return f"in {interval}"
    if low == "-inf":
        return "a finite number"
    return f"at least {low}" if interval[0] == "[" else f"greater than {low}"

