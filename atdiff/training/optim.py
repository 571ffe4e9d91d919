"""The optimizer, LR schedule and EMA a ``training`` section describes, built fresh or written into
state restored from a checkpoint.

A resumed run continues with the settings of its config, not those its checkpoint was saved with:
``apply_settings`` writes them into the restored optimizer groups, schedule and EMA so that the run
goes on exactly as one whose config changed at the resumed step (``atdiff.training.resume``).
"""

from __future__ import annotations

import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from ..config import TrainingConfig

# parameter_groups' order: AdamW group 0 takes training.weight_decay, group 1 none.
DECAYING, EXEMPT = 0, 1


def parameter_groups(model: torch.nn.Module, weight_decay: float, extra: torch.nn.Module | None = None) -> list[dict]:
    """AdamW groups; parameters the model names in ``no_weight_decay()`` (ATConv's
    ``difference_control``, a gate whose pull towards 0 would bias the inhibition) take none.
    ``extra``: a module trained with the model (REPA's projector), decaying like it."""
    exempt = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    named = list(model.named_parameters())
    groups = [None, None]
    own = list(extra.parameters()) if extra is not None else []
    groups[DECAYING] = {"params": [p for n, p in named if n not in exempt] + own, "weight_decay": weight_decay}
    groups[EXEMPT] = {"params": [p for n, p in named if n in exempt], "weight_decay": 0.0}
    return groups


def make_optimizer(model: torch.nn.Module, t: TrainingConfig, extra: torch.nn.Module | None = None) -> torch.optim.AdamW:
    groups = parameter_groups(model, t.weight_decay, extra)
    return torch.optim.AdamW(groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2))


def make_lr_scheduler(optimizer: torch.optim.Optimizer, t: TrainingConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """A diffusers schedule: the rate of step s (counted from 1) is ``learning_rate * lambda(s - 1)``."""
    return get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.lr_warmup_steps, num_training_steps=t.max_steps)


def make_ema(model: torch.nn.Module, t: TrainingConfig) -> EMAModel:
    return EMAModel(model.parameters(), decay=t.ema_decay, use_ema_warmup=True, power=t.ema_power, foreach=True)


def apply_settings(optimizer: torch.optim.Optimizer, lr_scheduler, ema: EMAModel, t: TrainingConfig) -> None:
    """Write ``t`` into restored state: a checkpoint's optimizer groups, schedule and EMA hold the
    values they were saved with (``load_state_dict`` restores them all), the config wins.

    The schedule is re-derived, not shifted: after step s the rate is what ``t`` gives at s,
    ``learning_rate * lambda(s)`` with ``t``'s warm-up and length, as ``LambdaLR`` computes it."""
    for index, group in enumerate(optimizer.param_groups):
        group["betas"] = (t.adam_beta1, t.adam_beta2)
        group["weight_decay"] = t.weight_decay if index == DECAYING else 0.0
        group["initial_lr"] = t.learning_rate
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # the one Accelerate's wrapper holds
    scheduler.base_lrs = [t.learning_rate] * len(optimizer.param_groups)
    # The rates at the restored step, computed as LambdaLR.get_lr does (its lambdas are this
    # config's: its state holds no functions), without stepping it again.
    rates = [base * rate(scheduler.last_epoch) for base, rate in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, rates):
        group["lr"] = lr
    scheduler._last_lr = rates  # what get_last_lr() reports
    ema.decay, ema.power = t.ema_decay, t.ema_power
