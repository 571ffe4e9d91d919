"""The Accelerate training loop.

One process or many (``accelerate launch -m atdiff train ...``; DeepSpeed/FSDP through Accelerate's
config). The loop knows nothing about the network or the objective: it gets a model, an objective
(``objective.loss(model, x0, labels)``) and a stream of batches, and adds AdamW with warm-up,
clipping, accumulation, mixed precision, EMA, sample grids, trackers and checkpoints.

Crash safety: checkpoints (``atdiff.training.checkpoint``) are written under a temporary name and
renamed, so a kill during saving leaves the previous checkpoint as the latest. Resuming restores
model, optimizer, LR schedule, EMA and every RNG, and the data order is a function of the step (``atdiff.data.batch_stream``), so on the CPU a resumed run ends with exactly
the weights of one that never stopped. A non-finite loss stops the run, keeping the last good
checkpoint; Ctrl-C (or SIGTERM) saves a checkpoint at the end of the current step and exits.
"""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from diffusers.utils import make_image_grid
from tqdm.auto import tqdm

from ..config import ExperimentConfig, build_model, flat_config
from ..data import batch_stream, load_dataset, random_flip
from ..errors import UsageError
from ..files import write_atomic
from ..objectives import build_objective
from ..pipelines import ImageDiffusionPipeline, num_classes_of
from .checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from .run_dir import check_output_dir, prepare_output_dir, save_pipeline
from .timing import StepTimer, peak_memory


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; nothing was saved after the last good checkpoint."""


@dataclass
class TrainingResult:
    output_dir: Path
    step: int  # optimizer steps done
    interrupted: bool
    losses: list[float] = field(default_factory=list)  # mean loss of each step this session ran


# ------------------------------------------------------------------------------------------------
# Set-up
# ------------------------------------------------------------------------------------------------


def train(cfg: ExperimentConfig, resume: str | None = None) -> TrainingResult:
    """Train (or continue, with ``resume="latest"`` or a checkpoint path) the run ``cfg`` describes."""
    tcfg = cfg.training
    if tcfg.output_dir is None:
        raise UsageError("training.output_dir is not set; pass --output-dir DIR")
    output_dir = Path(tcfg.output_dir)
    resume_from = find_checkpoint(output_dir, resume)
    check_output_dir(output_dir, cfg, resume_from)
    try:
        accelerator = Accelerator(
            # Launched as several processes (torchrun, `accelerate launch --multi_gpu`) where no GPU is
            # visible: train on the CPU over gloo. Left alone, Accelerate would start N separate runs.
            cpu=int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available(),
            mixed_precision=tcfg.mixed_precision,
            # Sync by step count, not at epoch ends: an optimizer step is always a full batch.
            gradient_accumulation_plugin=GradientAccumulationPlugin(
                num_steps=tcfg.gradient_accumulation_steps, sync_with_dataloader=False
            ),
            # Step the LR schedule once per optimizer step, whatever the number of processes (by
            # default Accelerate steps it once per process).
            step_scheduler_with_optimizer=False,
            log_with=None if tcfg.log_with == "none" else tcfg.log_with,
            project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        )
    except ValueError as err:  # a precision this device does not support
        raise UsageError(f"training.mixed_precision={tcfg.mixed_precision}: {err}") from err
    if tcfg.mixed_precision == "fp16" and accelerator.device.type == "cpu":  # Accelerate would silently use fp32
        raise UsageError("training.mixed_precision=fp16 needs a GPU; on the CPU use bf16 or no")
    per_step = accelerator.num_processes * tcfg.gradient_accumulation_steps
    if tcfg.batch_size % per_step:
        raise UsageError(
            f"training.batch_size ({tcfg.batch_size}) must split evenly over {accelerator.num_processes} processes "
            f"x {tcfg.gradient_accumulation_steps} accumulation steps; use a multiple of {per_step}"
        )

    # Same initial weights everywhere (DDP also broadcasts them), then per-process noise streams.
    set_seed(tcfg.seed)
    model = build_model(cfg.model)
    set_seed(tcfg.seed, device_specific=True)
    objective = build_objective(cfg.objective)
    dataset = load_dataset(cfg.data)
    check_classes(model, dataset, cfg)

    ema = EMAModel(model.parameters(), decay=tcfg.ema_decay, use_ema_warmup=True, power=tcfg.ema_power, foreach=True)
    optimizer = torch.optim.AdamW(
        parameter_groups(model, tcfg.weight_decay), lr=tcfg.learning_rate, betas=(tcfg.adam_beta1, tcfg.adam_beta2)
    )
    lr_scheduler = get_scheduler(
        tcfg.lr_scheduler, optimizer, num_warmup_steps=tcfg.lr_warmup_steps, num_training_steps=tcfg.max_steps
    )
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    accelerator.register_for_checkpointing(ema)

    start_step = 0
    if resume_from is not None:
        start_step = load_checkpoint(accelerator, resume_from)
        accelerator.print(f"resumed from {resume_from} (step {start_step})")
    ema.to(accelerator.device)

    batches = batch_stream(
        dataset,
        tcfg.batch_size // per_step,
        seed=tcfg.seed,
        start=start_step * tcfg.gradient_accumulation_steps,
        num_workers=cfg.data.num_workers,
        num_replicas=accelerator.num_processes,
        rank=accelerator.process_index,
        pin_memory=accelerator.device.type == "cuda",
    )
    if accelerator.is_main_process:
        prepare_output_dir(output_dir, cfg)
        accelerator.init_trackers("atdiff", config=flat_config(cfg))
    trainer = Trainer(accelerator, model, objective, optimizer, lr_scheduler, ema, cfg)
    try:
        return trainer.fit(batches, start_step)
    finally:
        accelerator.end_training()


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups; parameters the model names in ``no_weight_decay()`` (ATConv's
    ``difference_control``, a gate whose pull towards 0 would bias the inhibition) take none."""
    exempt = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    named = list(model.named_parameters())
    return [
        {"params": [p for n, p in named if n not in exempt], "weight_decay": weight_decay},
        {"params": [p for n, p in named if n in exempt], "weight_decay": 0.0},
    ]


def check_classes(model: torch.nn.Module, dataset, cfg: ExperimentConfig) -> None:
    num_classes = num_classes_of(model)
    found = len(getattr(dataset, "classes", []))
    if num_classes and num_classes != found:
        raise UsageError(
            f"the model is conditioned on {num_classes} classes but data ({cfg.data.dataset}) has {found}; "
            f"set model.num_classes={found} (or 0 for an unconditional model)"
        )


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------


class Trainer:
    """The loop and its outputs; everything it trains is built (and resumed) by ``train``."""

    def __init__(self, accelerator: Accelerator, model, objective, optimizer, lr_scheduler, ema: EMAModel, cfg: ExperimentConfig):
        self.accelerator, self.model, self.objective = accelerator, model, objective
        self.optimizer, self.lr_scheduler, self.ema, self.cfg = optimizer, lr_scheduler, ema, cfg
        self.tcfg = cfg.training
        self.output_dir = Path(self.tcfg.output_dir)
        self.network = accelerator.unwrap_model(model)  # the bare model: EMA, sampling, saving
        self.conditional = num_classes_of(self.network) > 0
        self.timer = StepTimer(accelerator.device, self.tcfg.profile)
        self.last_checkpoint: Path | None = None

    def fit(self, batches: Iterator, start_step: int) -> TrainingResult:
        acc, tcfg = self.accelerator, self.tcfg
        result = TrainingResult(self.output_dir, start_step, interrupted=False)
        bar = tqdm(total=tcfg.max_steps, initial=start_step, disable=not acc.is_local_main_process, desc="train", unit="step")
        logged_losses: list[float] = []
        with stop_request() as stop, bar:
            for step in range(start_step + 1, tcfg.max_steps + 1):
                loss, grad_norm = self.train_step(batches)
                # One all-reduce per step: the mean loss over processes and whether any was interrupted.
                flags = torch.stack([loss, torch.tensor(float(stop.requested), device=loss.device)])
                loss_sum, stops = acc.reduce(flags, "sum").tolist()
                loss_value = loss_sum / acc.num_processes
                self.timer.end_step()
                if not math.isfinite(loss_value):
                    where = f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint was written"
                    raise TrainingDiverged(
                        f"loss is {loss_value} at step {step}; stopped without saving ({where}). Lower "
                        f"training.learning_rate or set training.max_grad_norm, then resume with --resume latest."
                    )
                result.step = step
                result.losses.append(loss_value)
                logged_losses.append(loss_value)
                bar.update()
                bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{tcfg.batch_size / self.timer.step_times[-1]:.1f}")
                if step % tcfg.log_every == 0:
                    self.log(step, logged_losses, grad_norm)
                    logged_losses = []
                if stops > 0:
                    result.interrupted = True
                    break
                if tcfg.sample_every and step % tcfg.sample_every == 0 and step < tcfg.max_steps:
                    self.save_sample_grid(step)
                if tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0:
                    self.save_checkpoint(step)
        if result.step > start_step and self.last_checkpoint != self.output_dir / f"checkpoint-{result.step}":
            self.save_checkpoint(result.step)
        if result.interrupted:
            acc.print(f"interrupted: saved {self.last_checkpoint}; continue with --resume latest")
            return result
        self.save_sample_grid(result.step)
        self.save_pipeline()
        return result

    def train_step(self, batches: Iterator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches; returns the mean
        loss (a device tensor) and the gradient norm before clipping (None without clipping)."""
        acc, timer, tcfg = self.accelerator, self.timer, self.tcfg
        timer.start_step()
        total, grad_norm = 0.0, None
        for _ in range(tcfg.gradient_accumulation_steps):
            with timer.phase("data"):
                images, labels = next(batches)
                images = images.to(acc.device, non_blocking=True)
                labels = labels.to(acc.device, non_blocking=True) if self.conditional else None
                if self.cfg.data.random_flip:
                    images = random_flip(images)
            with acc.accumulate(self.model):
                with timer.phase("forward"):
                    loss = self.objective.loss(self.model, images, labels)
                with timer.phase("backward"):
                    acc.backward(loss)
                with timer.phase("optimizer"):
                    if acc.sync_gradients and tcfg.max_grad_norm is not None:
                        grad_norm = acc.clip_grad_norm_(self.model.parameters(), tcfg.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
            total = total + loss.detach()
        with timer.phase("optimizer"):
            self.lr_scheduler.step()
            self.ema.step(self.network.parameters())
        return total / tcfg.gradient_accumulation_steps, grad_norm

    def log(self, step: int, losses: list[float], grad_norm: torch.Tensor | None) -> None:
        logs = {"train/loss": sum(losses) / len(losses), "train/lr": self.lr_scheduler.get_last_lr()[0],
                "train/images_per_s": self.tcfg.batch_size / statistics.median(self.timer.step_times[-len(losses):])}
        if grad_norm is not None:
            logs["train/grad_norm"] = float(grad_norm)
        self.accelerator.log(logs, step=step)

    # --------------------------------------------------------------------------------------------
    # Outputs
    # --------------------------------------------------------------------------------------------

    def save_checkpoint(self, step: int) -> Path:
        acc = self.accelerator
        self.last_checkpoint = save_checkpoint(acc, self.output_dir, step, self.tcfg.checkpoints_total_limit)
        if acc.is_main_process:
            self.write_stats(step)
        acc.wait_for_everyone()
        return self.last_checkpoint

    @contextmanager
    def ema_weights(self):
        """Run the bare model with its EMA weights, in eval mode, without touching training state
        (the global RNGs are forked: sampling here must not change what training draws next)."""
        device = self.accelerator.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            self.ema.store(self.network.parameters())
            self.ema.copy_to(self.network.parameters())
            self.network.eval()
            try:
                yield self.network
            finally:
                self.ema.restore(self.network.parameters())
                self.network.train()

    def pipeline(self, model) -> ImageDiffusionPipeline:
        return ImageDiffusionPipeline(model=model, scheduler=self.objective.make_scheduler())

    def save_sample_grid(self, step: int) -> None:
        """A grid of ``num_sample_images`` EMA samples (fixed seed and labels, so grids compare over time)."""
        if self.accelerator.is_main_process:
            n = self.tcfg.num_sample_images
            with self.ema_weights() as model:
                pipe = self.pipeline(model)
                pipe.set_progress_bar_config(disable=True)
                images = pipe(
                    batch_size=n,
                    class_labels=torch.arange(n) % num_classes_of(model) if self.conditional else None,
                    num_inference_steps=self.cfg.sampling.num_inference_steps,
                    guidance_scale=self.cfg.sampling.guidance_scale,
                    generator=torch.Generator().manual_seed(self.tcfg.seed),
                ).images
            rows = max(r for r in range(1, math.isqrt(n) + 1) if n % r == 0)
            path = self.output_dir / "samples" / f"step-{step:07d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            make_image_grid(images, rows, n // rows).save(path)
        self.accelerator.wait_for_everyone()

    def save_pipeline(self) -> None:
        """Make ``output_dir`` a diffusers pipeline folder with the EMA weights."""
        if self.accelerator.is_main_process:
            with self.ema_weights() as model:
                save_pipeline(self.output_dir, self.pipeline(model))
        self.accelerator.wait_for_everyone()

    def write_stats(self, step: int) -> None:
        stats = {
            "steps": step,
            "images_seen": step * self.tcfg.batch_size,
            "batch_size": self.tcfg.batch_size,
            "params": sum(p.numel() for p in self.network.parameters()),
            "model": {"class": type(self.network).__name__, "token_mixer": self.network.config.get("token_mixer")},
            "device": str(self.accelerator.device),
            "num_processes": self.accelerator.num_processes,
            "mixed_precision": self.tcfg.mixed_precision,
            **self.timer.summary(self.tcfg.batch_size),
            **peak_memory(self.accelerator.device),
        }
        write_atomic(self.output_dir / "training_stats.json", json.dumps(stats, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------
# Signals
# ------------------------------------------------------------------------------------------------


class StopRequest:
    requested = False


@contextmanager
def stop_request() -> Iterator[StopRequest]:
    """Turn the first Ctrl-C (or SIGTERM) into a flag the loop reads between steps, since a
    checkpoint taken mid-step would mix two steps; a second Ctrl-C aborts at once."""
    stop = StopRequest()

    def handler(signum, frame):
        if stop.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.requested = True
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step (Ctrl-C again to abort)", flush=True)

    try:
        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: signals stay with whoever owns them
        previous = {}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)

