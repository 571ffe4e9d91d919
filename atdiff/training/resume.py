"""What a resume may change, and the record of what was in effect.

A checkpoint carries the config it was trained with (``config.yaml``) and the history of the
changes made on its line (``config_history.json``). Resuming compares the new config with it, key
by key, under each key's declared rule (``atdiff.settings``): an *applied* key takes effect from the
resumed step on (``atdiff.training.optim.apply_settings``) and is added to the history; a *refused*
key stops the resume with one line naming the key, both values and why, before anything is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..config import ExperimentConfig, SECTIONS, config_from_dict
from ..errors import UsageError
from ..models.model_config import ModelConfig
from ..settings import REFUSED, Rule, applies, rule_of
from .checkpoint import checkpoint_step, run_folder_of

CONFIG = "config.yaml"  # in a run folder: the config in effect now; in a checkpoint: the one it was trained with
HISTORY = "config_history.json"  # the changes made by resumes on this line of the run: [{"step", "changed"}]


@dataclass
class Resume:
    """A checked resume: the checkpoint's step, the keys it changes (``{"section.key": {"from", "to"}}``)
    and the line's history including them."""

    step: int
    changed: dict[str, dict] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)


def check_resume(checkpoint: Path, cfg: ExperimentConfig) -> Resume:
    """Refuse a resume of ``checkpoint`` that changes a refused key or asks for fewer steps than it
    has done; return what the run's record says from now on."""
    step = checkpoint_step(checkpoint)
    if cfg.training.max_steps < step:
        raise UsageError(
            f"training.max_steps={cfg.training.max_steps} is below the {step} steps {checkpoint} has done; "
            f"pass --max-steps {step} or more (or resume an earlier checkpoint)"
        )
    saved_file = checkpoint / CONFIG if (checkpoint / CONFIG).is_file() else run_folder_of(checkpoint) / CONFIG
    history = read_history(checkpoint)
    if not saved_file.is_file():  # a run folder whose config.yaml was removed: nothing to compare with
        return Resume(step, history=history)
    saved = read_saved_config(saved_file, checkpoint)
    changed = {key: values for key, values in config_changes(saved, cfg.to_dict()).items() if matters(key, saved, cfg.to_dict())}
    for key, (old, new) in changed.items():
        rule = rule_for(key)
        if rule.on_resume == REFUSED:
            raise UsageError(
                f"--resume {checkpoint}: {key} was {old!r} there and is {new!r} now; {rule.why}. "
                f"Resume with {key}={old if isinstance(old, str) else json.dumps(old)}, or start a new run in another --output-dir"
            )
    changed.pop("training.output_dir", None)  # the run folder itself: a copied run resumes where it now is
    recorded = {key: {"from": old, "to": new} for key, (old, new) in changed.items()}
    return Resume(step, recorded, [*history, {"step": step, "changed": recorded}] if recorded else history)


def rule_for(key: str) -> Rule | None:
    """The declared rule of ``section.key``; None for a key no section has (any longer)."""
    section, name = key.split(".", 1)
    if section not in SECTIONS:
        return None
    cls = type(getattr(ExperimentConfig(), section))
    names = {f.name for f in fields(cls)}
    if cls is ModelConfig and name not in names:
        name = "kwargs"  # the model class's own arguments
    return rule_of(cls, name) if name in names or cls is ModelConfig else None


def matters(key: str, saved: dict, current: dict) -> bool:
    """Whether a change of ``key`` can change anything: not when atdiff no longer has the key (the saved
    config read as written), nor when it did nothing then and does nothing now (an older atdiff
    accepted keys its objective ignores)."""
    rule = rule_for(key)
    if rule is None:
        return False
    section = key.split(".")[0]
    return applies(saved.get(section, {}), rule.applies_if) or applies(current[section], rule.applies_if)


def config_changes(saved: dict, current: dict) -> dict[str, tuple[Any, Any]]:
    """``{"section.key": (saved value, current value)}`` for every key whose value differs."""
    return {
        f"{section}.{key}": (saved.get(section, {}).get(key), current[section].get(key))
        for section in SECTIONS
        for key in sorted(set(saved.get(section, {})) | set(current[section]))
        if not same_value(saved.get(section, {}).get(key), current[section].get(key))
    }


def same_value(old: Any, new: Any) -> bool:
    """Equal, or two spellings of one existing path (``./data`` and its absolute path)."""
    if old == new:
        return True
    return isinstance(old, str) and isinstance(new, str) and Path(old).exists() and Path(old).resolve() == Path(new).resolve()


def read_saved_config(saved_config: Path, checkpoint: Path) -> dict:
    """A saved ``config.yaml`` as a dict, read through today's dataclasses where it still fits them, so
    that keys added to atdiff since the run was saved compare at their defaults."""
    try:
        saved = yaml.safe_load(saved_config.read_text())
    except (yaml.YAMLError, UnicodeDecodeError):
        saved = None
    if not isinstance(saved, dict):
        raise UsageError(f"{saved_config} is not the config atdiff train wrote for this run; restore it to resume {checkpoint}")
    try:
        return config_from_dict(saved).to_dict()
    except UsageError:  # a key renamed or removed since: compare the values as written
        return saved


def read_history(checkpoint: Path) -> list[dict]:
    """The checkpoint's ``config_history.json`` (verified with the checkpoint); none before atdiff wrote one."""
    path = checkpoint / HISTORY
    history = json.loads(path.read_text()) if path.is_file() else []
    if not (isinstance(history, list) and all(isinstance(e, dict) and isinstance(e.get("step"), int) for e in history)):
        raise UsageError(f"{path} is not a config history atdiff wrote; resume another checkpoint")
    return history


def record_files(cfg: ExperimentConfig, history: list[dict]) -> dict[str, str]:
    """The record a run folder and each of its checkpoints keep: the config in effect and the line's history."""
    return {CONFIG: yaml.safe_dump(cfg.to_dict(), sort_keys=False), HISTORY: json.dumps(history, indent=2) + "\n"}
