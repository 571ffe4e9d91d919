"""Which device atdiff runs on: the ``--device`` check of every command, and Accelerate's CPU fallback."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from accelerate import PartialState

from .errors import UsageError


def check_device(name: str) -> None:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but no CUDA GPU is visible; use --device cpu")
    if device.type == "meta":
        raise UsageError("--device meta holds no values, so nothing can be computed on it; use cpu or cuda")
    try:  # a backend this torch was not built with, or a GPU index that does not exist
        torch.empty(0, device=device)
    except Exception as err:  # torch says so with RuntimeError, NotImplementedError, AssertionError, ...
        raise UsageError(f"--device {name} cannot hold tensors in this torch ({type(err).__name__}); use cpu, cuda or cuda:N") from None


def launched_without_gpu() -> bool:
    """Launched as several processes (torchrun, ``accelerate launch --multi_gpu``) where no GPU is
    visible: ``Accelerator(cpu=True)`` then runs them as one job over gloo. Left alone, Accelerate
    would start N separate single-process jobs."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


@dataclass(frozen=True)
class OneProcess:
    """The state of a process that works alone inside a launch (the main process of a training run
    evaluating it): a launch of one, with nothing to wait for."""

    num_processes: int = 1
    process_index: int = 0
    is_main_process: bool = True

    def wait_for_everyone(self) -> None:
        pass


def process_state(alone: bool = False) -> PartialState | OneProcess:
    """This process's place in the launch (one process, or one of ``accelerate launch``'s), on the
    CPU over gloo where several are launched without a GPU; ``alone``: as if it were the only one."""
    return OneProcess() if alone else PartialState(cpu=launched_without_gpu())


def end_process_group() -> None:
    """Leave the launch's process group, if this process joined one (``process_state`` under
    ``accelerate launch``). Left to the interpreter's exit, gloo's threads can abort the process
    ("terminate called without an active exception") after its work is done."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
