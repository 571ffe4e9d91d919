"""The Accelerate training loop.

One process or many (``accelerate launch -m atdiff train ...``: DDP, or FSDP2 with the settings
``sharding.fsdp_plugin`` accepts; DeepSpeed and Megatron-LM are refused). The loop knows nothing
about the network or the objective: ``train`` builds the parts and hands the ``Trainer`` a model, an ``Objective``
(``objective.loss(model, x0, labels, images)``), a stream of batches and three narrow facts about the
model (``ModelInterface``); the loop adds AdamW with warm-up, clipping, accumulation, mixed
precision, EMA, sample grids, trackers and checkpoints; a module the objective trains itself
(``Objective.trained_module``: REPA's projector) joins the optimizer, clipping and checkpoints, never
the EMA or a pipeline. With ``training.eval_every`` it also hands
its EMA pipeline to the evaluator it is given (``atdiff train`` gives ``atdiff.eval.training_eval``'s)
for FID and KID.

Crash safety: checkpoints (``atdiff.training.checkpoint``) are complete or absent, verified before
they are loaded, and saved only when the weights and EMA are finite. Resuming restores model,
optimizer, LR schedule, EMA, every RNG and the data position (``atdiff.data.batch_stream`` is a
function of it), so on the CPU a resumed run ends with exactly the weights of one that never
stopped; settings changed on resume apply from that step on or are refused (``resume``). A step whose loss or gradients are not finite is not applied: the run stops (or, with
``training.max_skipped_steps``, skips it). Ctrl-C (or SIGTERM) saves a checkpoint at the end of the
current step and exits.
"""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import sys
from collections import deque
from collections.abc import Callable, Iterator
from typing import Protocol
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from accelerate import Accelerator
from accelerate.utils import FullyShardedDataParallelPlugin, GradientAccumulationPlugin, ProjectConfiguration, set_seed
from diffusers import AutoencoderKL, DiffusionPipeline
from diffusers.utils import make_image_grid
from PIL import Image
from tqdm.auto import tqdm

from ..config import ExperimentConfig, build_model, flat_config, new_model
from ..data import batch_stream
from ..devices import launched_without_gpu
from ..errors import UsageError
from ..files import atomic_path, write_atomic
from ..limits import check_forward, default_device, model_batch
from ..memory import model_peak_memory, module_tensors, process_peak_memory
from ..objectives import Objective, build_objective
from ..pipelines import ImageDiffusionPipeline, NonFiniteSamples, num_classes_of
from ..training_data import batch_augmentation, check_model_fits, load_training_data
from .checkpoint import Progress, TrainingState, checkpoint_folder, find_checkpoint, load_checkpoint, make_head, save_checkpoint
from .optim import apply_settings, make_ema, make_lr_scheduler, make_optimizer
from .resume import Resume, check_resume, record_files
from .sharding import ema_copy, fsdp_plugin, is_sharded, local_shards, model_class, use_fsdp_on_cpu
from .run_dir import (
    STATS,
    check_output_dir,
    later_run_outputs,
    is_output_dir_error,
    output_dir_error,
    prepare_output_dir,
    read_stats,
    run_lock,
    save_pipeline,
)
from ..generation.drawing import draw
from ..generation.loading import use_scheduler
from .timing import RunClock, StepTimer
from .trackers import check_tracker_installed, log_image


class TrainingDiverged(RuntimeError):
    """The loss, gradients or weights became NaN or infinite; nothing was saved after the last good checkpoint."""


@dataclass
class TrainingResult:
    output_dir: Path
    step: int  # optimizer steps done
    interrupted: bool
    losses: list[float] = field(default_factory=list)  # mean loss of each step this session ran


@dataclass(frozen=True)
class ModelInterface:
    """All the loop knows of the model, besides calling ``objective.loss(model, x0, labels, images)``."""

    num_classes: int  # 0: unconditional, labels are never passed
    # applied on the device to each batch (x0, the pixel images of latent x0 or None), mirroring both alike
    augment: Callable[[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor | None]] | None
    make_pipeline: Callable[[torch.nn.Module], DiffusionPipeline]  # the bare model -> sample grids, final folder


# Run-folder subfolders of outputs made at a step (step-<N>.*), moved aside with an abandoned line.
STEP_OUTPUTS = ("samples", "evals")


# ------------------------------------------------------------------------------------------------
# Set-up
# ------------------------------------------------------------------------------------------------


class Evaluator(Protocol):
    """Scores the EMA pipeline during training (``training.eval_every``); main process only."""

    def __call__(self, step: int, pipeline: ImageDiffusionPipeline) -> dict: ...  # metrics, with "fid", "kid_mean", "num_fake"

    def history(self, up_to: int) -> list[dict]: ...  # the stored metrics of every step up to ``up_to``


EvaluatorFactory = Callable[[ExperimentConfig, str], Evaluator]  # (config, device) -> Evaluator


def train(cfg: ExperimentConfig, resume: str | None = None, evaluator: EvaluatorFactory | None = None) -> TrainingResult:
    """Train (or continue, with ``resume="latest"`` or a checkpoint path) the run ``cfg`` describes;
    ``evaluator`` scores the EMA weights every ``training.eval_every`` steps."""
    if cfg.training.output_dir is None:
        raise UsageError("training.output_dir is not set; pass --output-dir DIR")
    if cfg.training.eval_every and evaluator is None:
        raise UsageError(f"training.eval_every={cfg.training.eval_every} needs an evaluator: use `atdiff train`, or call "
                         f"train(cfg, evaluator=atdiff.eval.training_eval.TrainingEvaluator)")
    output_dir = Path(cfg.training.output_dir)
    check_output_dir(output_dir, resume)
    if resume not in (None, "latest"):
        checkpoint_folder(resume, output_dir)  # a mistyped path is refused before the folder is created
    plugin = fsdp_plugin(cfg)
    check_tracker_installed(cfg.training.log_with)
    check_training_fits(cfg)
    objective = build_objective(cfg.objective)
    objective.load()  # e.g. REPA's encoder: one that does not load stops here, before the run folder is touched
    data = load_training_data(cfg.data, with_images=objective.needs_pixels)  # before any work: a latent config may lack its store
    accelerator = make_accelerator(cfg, output_dir, plugin)
    if cfg.training.compile:
        check_compile(accelerator.device)
    with run_lock(output_dir) if accelerator.is_main_process else nullcontext():
        accelerator.wait_for_everyone()  # the other processes start once the main one holds the folder
        # Again under the lock: another run may have filled the folder since the check above (made
        # first so that a folder that is not a run never gets a lock file).
        check_output_dir(output_dir, resume)
        try:
            return start_training(accelerator, cfg, output_dir, resume, objective, *data, evaluator=evaluator)
        except OSError as err:
            if is_output_dir_error(output_dir, err):
                raise output_dir_error(output_dir, err) from None
            raise
        finally:
            accelerator.end_training()


def check_training_fits(cfg: ExperimentConfig) -> None:
    """The forward passes an ``atdiff train`` run of ``cfg`` makes, each
    against the memory of the device it will train on: a training micro-batch, the sample grid (one
    batch of ``training.num_sample_images``) and, with evals, a sampling batch of ``training.batch_size``."""
    t, model, device = cfg.training, cfg.model.resolved(), default_device()
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    micro = max(t.batch_size // (t.gradient_accumulation_steps * processes), 1)
    check_forward(f"training.batch_size={t.batch_size} ({micro} images per forward pass)", model, micro, device,
                  "lower training.batch_size, or raise training.gradient_accumulation_steps")
    guidance = cfg.sampling.guidance_scale
    check_forward(f"training.num_sample_images={t.num_sample_images} (the sample grid is one batch)", model,
                  model_batch(t.num_sample_images, guidance), device, "lower training.num_sample_images")
    if t.eval_every:
        check_forward(f"training.batch_size={t.batch_size} (the evals sample in batches of it)", model,
                      model_batch(t.batch_size, guidance), device, "lower training.batch_size")


def check_compile(device: torch.device) -> None:
    """torch.compile builds its kernels at the first step; build a tiny one now, so that a backend that
    cannot (no C++ compiler, an unsupported device) is one line before the run folder is touched."""
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(2, device=device))
    except Exception as err:  # Dynamo and Inductor raise many kinds; the first line says why
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"training.compile: torch.compile cannot build kernels on {device} here ({reason}); set training.compile=false") from None


def make_accelerator(cfg: ExperimentConfig, output_dir: Path, plugin: FullyShardedDataParallelPlugin | None = None) -> Accelerator:
    """The accelerator of ``cfg``'s training settings; ``plugin``: FSDP2's (``sharding.fsdp_plugin``)."""
    tcfg = cfg.training
    try:
        accelerator = Accelerator(
            cpu=launched_without_gpu(),
            fsdp_plugin=plugin,
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
    if plugin is not None:
        use_fsdp_on_cpu(accelerator, plugin)
    # Accelerate turns TF32 on only with its dynamo backend: set here, for matmuls and cuDNN alike.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tcfg.tf32
    if tcfg.mixed_precision == "fp16" and accelerator.device.type == "cpu":  # Accelerate would silently use fp32
        raise UsageError("training.mixed_precision=fp16 needs a GPU; on the CPU use bf16 or no")
    per_step = accelerator.num_processes * tcfg.gradient_accumulation_steps
    if tcfg.batch_size % per_step:
        raise UsageError(
            f"training.batch_size ({tcfg.batch_size}) must split evenly over {accelerator.num_processes} processes "
            f"x {tcfg.gradient_accumulation_steps} accumulation steps; use a multiple of {per_step}"
        )
    return accelerator


def start_training(
    accelerator: Accelerator, cfg: ExperimentConfig, output_dir: Path, resume: str | None, objective: Objective, dataset,
    vae: AutoencoderKL | None, evaluator: EvaluatorFactory | None = None,
) -> TrainingResult:
    """Build (or resume) everything the loop trains, under the run folder's lock, and run it with
    ``objective`` on ``dataset`` (images, or latents of ``vae``: ``atdiff.training_data.load_training_data``)."""
    tcfg = cfg.training
    # Every process verifies on its own (reading each file once more) and reaches the same choice,
    # so a refusal stops them all rather than leaving some waiting for a broadcast.
    resume_from = find_checkpoint(output_dir, resume, verbose=accelerator.is_main_process)
    # What this run changes is checked (and refused) before anything is built or written.
    resumed = check_resume(resume_from, cfg) if resume_from is not None else Resume(step=0)

    # Same initial weights everywhere (DDP also broadcasts them), then per-process noise streams.
    set_seed(tcfg.seed)
    model = build_model(cfg.model, report=accelerator.print)
    if tcfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    # e.g. a distillation teacher onto the device, under the same autocast; REPA's projector, under the model's seed
    objective.prepare(accelerator, model)
    set_seed(tcfg.seed, device_specific=True)
    interface = model_interface(model, dataset, objective, cfg, vae)

    optimizer = make_optimizer(model, tcfg, objective.trained_module())
    lr_scheduler = make_lr_scheduler(optimizer, tcfg)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    network = accelerator.unwrap_model(model)
    # The EMA follows the prepared parameters: under FSDP2 these are this process's shards (DTensors),
    # so its shadows are shards too. Its update is elementwise, so shard by shard it is exactly the
    # full update, at 1/N of the memory and with no communication; the shadows are gathered only to
    # be written (checkpoints) or sampled from (grids, evals, the final pipeline).
    ema = make_ema(network, tcfg)
    state = TrainingState(network, ema, optimizer, lr_scheduler, accelerator.scaler, objective.trained_module())
    if tcfg.compile:  # only the training forward runs compiled; state.network stays the plain module it shares weights with
        model = torch.compile(model)

    progress = Progress()
    if resume_from is not None:
        progress = load_checkpoint(accelerator, resume_from, state)
        apply_settings(optimizer, lr_scheduler, ema, tcfg)  # the config's values, not the checkpoint's
        changes = f"; from now on {describe_changes(resumed.changed)}" if resumed.changed else ""
        accelerator.print(f"resumed from {resume_from} (step {progress.step}){changes}")
    ema.to(accelerator.device)

    micro_batch = tcfg.batch_size // tcfg.gradient_accumulation_steps  # images per micro-step, all processes
    start, rest = divmod(progress.images_seen, micro_batch)
    if rest:
        raise UsageError(
            f"{resume_from} has seen {progress.images_seen} images, not a whole number of batches of "
            f"{micro_batch} (training.batch_size / gradient_accumulation_steps); resume with the batch size it was trained with"
        )
    batches = batch_stream(
        dataset,
        micro_batch // accelerator.num_processes,
        seed=tcfg.seed,
        start=start,
        num_workers=cfg.data.num_workers,
        num_replicas=accelerator.num_processes,
        rank=accelerator.process_index,
        pin_memory=accelerator.device.type == "cuda",
    )
    scorer = evaluator(cfg, str(accelerator.device)) if tcfg.eval_every and accelerator.is_main_process else None
    carried_clock = previous_wall_clock(output_dir, progress.step) if resume_from is not None else None
    accelerator.wait_for_everyone()  # every process has read its checkpoint before the folder changes
    if accelerator.is_main_process:
        prepare_output_dir(output_dir, record_files(cfg, resumed.history))
        make_head(output_dir, progress.step, STEP_OUTPUTS, later_run_outputs(output_dir, progress.step))
        # TensorBoard hides what an abandoned line logged after the resumed step.
        purge = {"tensorboard": {"purge_step": progress.step + 1}} if resume_from is not None else {}
        accelerator.init_trackers("atdiff", config=flat_config(cfg), init_kwargs=purge)
    trainer = Trainer(accelerator, model, objective, state, interface, cfg, evaluator=scorer, carried_clock=carried_clock,
                      history=resumed.history, resumed_from=resume_from)
    return trainer.fit(batches, progress)


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    if not getattr(model, "_supports_gradient_checkpointing", False):
        raise UsageError(f"training.gradient_checkpointing: {type(model).__name__} does not support it; set it to false")
    model.enable_gradient_checkpointing()


def head_checkpoint(output_dir: Path, resume_from: Path | None) -> Path | None:
    """The checkpoint resumed from, named as the run's own checkpoints are, if it is one of them."""
    if resume_from is not None and resume_from.resolve().parent == output_dir.resolve():
        return output_dir / resume_from.name
    return None


def describe_changes(changed: dict) -> str:
    return ", ".join(f"{key}={json.dumps(values['to'])} (was {json.dumps(values['from'])})" for key, values in changed.items())


def previous_wall_clock(output_dir: Path, step: int) -> dict | None:
    """The run's wall-clock totals up to ``step``, from ``training_stats.json`` (written with each
    checkpoint) when it belongs to the checkpoint resumed from."""
    stats = read_stats(output_dir)
    return stats.get("wall_clock") if stats.get("steps") == step else None


def model_interface(model: torch.nn.Module, dataset, objective: Objective, cfg: ExperimentConfig, vae: AutoencoderKL | None = None) -> ModelInterface:
    """What the loop needs to know of this model, checked against the data before any step; with a
    ``vae`` the model works on its latents and the pipelines decode with it."""
    embed_type = getattr(model.config, "class_embed_type", None)
    if embed_type is not None:  # a diffusers UNet conditioned on timesteps or vectors, not class labels
        raise UsageError(
            f"model.class_embed_type={embed_type!r} is not trainable by atdiff train (it feeds class labels only); "
            f"leave it unset and set model.num_class_embeds for a class-conditional UNet"
        )
    num_classes = num_classes_of(model)
    found = len(getattr(dataset, "classes", []))
    if num_classes and num_classes != found:
        key = "num_classes" if "num_classes" in model.config else "num_class_embeds"
        raise UsageError(
            f"the model is conditioned on {num_classes} classes but data ({cfg.data.dataset}) has {found}; "
            f"set model.{key}={found} (or 0 for an unconditional model)"
        )
    check_model_fits(cfg.model.resolved(), cfg.data, dataset)

    def make_pipeline(network: torch.nn.Module) -> ImageDiffusionPipeline:
        # Only the main process makes pipelines: the VAE moves to the device there alone.
        return ImageDiffusionPipeline(model=network, scheduler=objective.make_scheduler(), vae=vae and vae.to(network.device))

    return ModelInterface(num_classes=num_classes, augment=batch_augmentation(dataset, cfg.data), make_pipeline=make_pipeline)


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------


class StepOutcome(NamedTuple):
    loss: float  # mean over processes and micro-batches
    lr: float  # the learning rate of this step
    grad_norm: float  # before clipping
    applied: bool  # False: the loss or a gradient was not finite and the update was not made
    stop: bool  # some process was asked to stop (Ctrl-C, SIGTERM)


class Trainer:
    """The loop and its outputs; ``train`` builds (and resumes) what it trains.

    Its inputs are narrow on purpose: ``model`` (as prepared by Accelerate) goes only to
    ``objective.loss``; ``state`` is what checkpoints hold; ``interface`` is all it knows of the
    model. Additions (evaluation during training, other data) should come in the same way.
    """

    def __init__(self, accelerator: Accelerator, model, objective: Objective, state: TrainingState, interface: ModelInterface, cfg: ExperimentConfig,
                 evaluator: Evaluator | None = None, carried_clock: dict | None = None, history: list[dict] | None = None, resumed_from: Path | None = None):
        self.accelerator, self.model, self.objective = accelerator, model, objective
        self.state, self.interface, self.cfg = state, interface, cfg
        self.evaluator = evaluator
        self.clock = RunClock(carried_clock)
        self.model_memory: dict = {}
        self.tcfg = cfg.training
        self.output_dir = Path(self.tcfg.output_dir)
        self.timer = StepTimer(accelerator.device, self.tcfg.profile)
        self.history = history or []  # the config changes made by resumes on this line of the run (atdiff.training.resume)
        self.last_checkpoint: Path | None = resumed_from
        self.spikes = SpikeWatch.resumed(resumed_from, self.output_dir) if resumed_from is not None else SpikeWatch()

    def fit(self, batches: Iterator, progress: Progress) -> TrainingResult:
        acc, tcfg = self.accelerator, self.tcfg
        start_step = progress.step
        result = TrainingResult(self.output_dir, start_step, interrupted=False)
        self.clock.restart()
        # The session's second step is measured for memory: by then the optimizer state exists.
        measured_step = min(start_step + 2, tcfg.max_steps)
        bar = tqdm(total=tcfg.max_steps, initial=start_step, disable=not acc.is_local_main_process, desc="train", unit="step")
        logged_losses: list[float] = []
        with stop_request() as stop, bar:
            for step in range(start_step + 1, tcfg.max_steps + 1):
                outcome = self.measured_train_step(batches, stop) if step == measured_step else self.train_step(batches, stop)
                self.timer.end_step()
                progress.step, progress.images_seen = step, progress.images_seen + tcfg.batch_size
                if outcome.applied:
                    logged_losses.append(outcome.loss)
                    self.spikes.observe(step, outcome.loss)
                else:
                    self.skip_step(progress, outcome)
                result.step = step
                result.losses.append(outcome.loss)
                bar.update()
                bar.set_postfix(loss=f"{outcome.loss:.4f}", img_s=f"{tcfg.batch_size / self.timer.step_times[-1]:.1f}")
                if step % tcfg.log_every == 0 and logged_losses:
                    self.log(step, logged_losses, outcome)
                    logged_losses = []
                if outcome.stop:
                    result.interrupted = True
                    break
                if tcfg.sample_every and step % tcfg.sample_every == 0 and step < tcfg.max_steps:
                    self.save_sample_grid(step)
                if tcfg.eval_every and step % tcfg.eval_every == 0:
                    self.evaluate(step)
                if tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0:
                    self.save_checkpoint(progress)
        if result.step > start_step and self.last_checkpoint != self.output_dir / f"checkpoint-{result.step}":
            self.save_checkpoint(progress)
        if result.interrupted:
            acc.print(f"interrupted: saved {self.last_checkpoint}; continue with --resume latest")
            return result
        self.save_sample_grid(result.step)
        self.save_pipeline()
        if result.step == start_step and acc.is_main_process:  # no step, no checkpoint: the stats learn of this resume's changes here
            self.record_history()
        return result

    def train_step(self, batches: Iterator, stop: StopRequest) -> StepOutcome:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches, made only when the
        loss and gradients are finite on every process."""
        acc, timer, tcfg, state = self.accelerator, self.timer, self.tcfg, self.state
        timer.start_step()
        total = 0.0
        for _ in range(tcfg.gradient_accumulation_steps):
            with timer.phase("data"):
                # (x0, labels), or with latent data for an objective that sees pixels (x0, labels, images)
                x0, labels, *pixels = next(batches)
                x0 = x0.to(acc.device, non_blocking=True)
                images = pixels[0].to(acc.device, non_blocking=True) if pixels else None
                labels = labels.to(acc.device, non_blocking=True) if self.interface.num_classes else None
                if self.interface.augment is not None:
                    x0, images = self.interface.augment(x0, images)
            with acc.accumulate(self.model):  # leaves sync_gradients set after the last micro-batch
                with timer.phase("forward"):
                    loss = self.objective.loss(self.model, x0, labels, images)
                with timer.phase("backward"):
                    acc.backward(loss)
            total = total + loss.detach()
        with timer.phase("optimizer"):
            # Clipping at infinity only measures the norm (and scales by exactly 1). A NaN or inf norm
            # means a gradient that is not finite, or so large that its norm overflows.
            max_norm = math.inf if tcfg.max_grad_norm is None else tcfg.max_grad_norm
            grad_norm = acc.clip_grad_norm_(state.trained_parameters(), max_norm).float()
            # With fp16 the GradScaler skips steps with non-finite gradients (and lowers its scale) itself.
            bad_gradients = (~torch.isfinite(grad_norm)).float() * (state.scaler is None)
            mean_loss = (total / tcfg.gradient_accumulation_steps).float()
            stopping = torch.tensor(float(stop.requested), device=acc.device)
            # One all-reduce per step: the loss, whether any process was interrupted or saw bad gradients.
            loss_sum, stops, bad = acc.reduce(torch.stack([mean_loss, stopping, bad_gradients]), "sum").tolist()
            loss_value = loss_sum / acc.num_processes
            applied = bad == 0 and math.isfinite(loss_value)
            lr = state.optimizer.param_groups[0]["lr"]  # before the schedule moves on to the next step's
            if applied:
                state.optimizer.step()
            state.optimizer.zero_grad(set_to_none=True)
            state.lr_scheduler.step()  # the schedule is a function of the step, skipped or not
            if applied:
                state.ema.step(state.network.parameters())
        return StepOutcome(loss_value, float(lr), grad_norm.item(), applied, stops > 0)

    def measured_train_step(self, batches: Iterator, stop: StopRequest) -> StepOutcome:
        """``train_step`` that records the model's peak memory: weights, optimizer state and EMA,
        plus the peak of what the step allocates (activations, gradients)."""
        state = self.state
        optimizer_state = [v for values in state.optimizer.state.values() for v in values.values() if torch.is_tensor(v)]
        resident = [*module_tensors(state.network), *optimizer_state, *state.ema.shadow_params]
        if state.objective_module is not None:
            resident += module_tensors(state.objective_module)
        resident = local_shards(resident)  # under FSDP2, what this process holds
        outcome = []
        self.model_memory = model_peak_memory(lambda: outcome.append(self.train_step(batches, stop)), self.accelerator.device, resident)
        return outcome[0]

    def skip_step(self, progress: Progress, outcome: StepOutcome) -> None:
        """Count a step whose update was not made; past ``training.max_skipped_steps``, stop."""
        progress.skipped_steps += 1
        limit = self.tcfg.max_skipped_steps
        what = f"loss is {outcome.loss}" if not math.isfinite(outcome.loss) else f"gradient norm is {outcome.grad_norm}"
        if progress.skipped_steps > limit:
            raise TrainingDiverged(
                f"{what} at step {progress.step}; stopped without saving ({self.last_good()}). Lower training.learning_rate, "
                f"set training.max_grad_norm or allow skips with training.max_skipped_steps (now {limit}), then resume with {self.resume_advice()}."
            )
        self.accelerator.print(
            f"step {progress.step}: {what}; update skipped ({progress.skipped_steps} of training.max_skipped_steps={limit})",
            file=sys.stderr, flush=True,
        )
        self.accelerator.log({"train/skipped_steps": progress.skipped_steps}, step=progress.step)

    def last_good(self) -> str:
        """Where a diverged run can be resumed from, for its error message: the last checkpoint, or the
        last one from before a loss spike when the loss spiked since (its weights may be ruined while finite)."""
        if self.last_checkpoint is None:
            return "no checkpoint was written"
        spike, calm = self.spikes.spike, self.spikes.calm_checkpoint
        if spike is None or calm == self.last_checkpoint:
            return f"the last good checkpoint is {self.last_checkpoint}"
        step, loss, median = spike
        before = f"{calm} is the last from before it" if calm else "no checkpoint is from before it"
        return (f"the last checkpoint is {self.last_checkpoint}, but the loss spiked at step {step} ({loss:.4g}, over "
                f"{SpikeWatch.FACTOR:g}x the median {median:.4g} of the steps before): {before}")

    def resume_advice(self) -> str:
        if self.spikes.spike is None:
            return "--resume latest"
        calm = self.spikes.protected()
        return f"--resume {calm}" if calm else "a new run in another --output-dir (no checkpoint is from before the spike)"

    def log(self, step: int, losses: list[float], outcome: StepOutcome) -> None:
        logs = {"train/loss": sum(losses) / len(losses), "train/lr": outcome.lr,
                "train/images_per_s": self.tcfg.batch_size / statistics.median(self.timer.step_times[-len(losses):]),
                "train/grad_norm": outcome.grad_norm}
        self.accelerator.log(logs, step=step)

    # --------------------------------------------------------------------------------------------
    # Outputs
    # --------------------------------------------------------------------------------------------

    def save_checkpoint(self, progress: Progress) -> Path:
        """Save a checkpoint, only of finite weights: a checkpoint is always one to resume from."""
        self.check_finite_weights(progress.step)
        acc = self.accelerator
        with self.clock.spent_on("checkpoints"):
            record = {**record_files(self.cfg, self.history), SpikeWatch.FILE: json.dumps(self.spikes.state()) + "\n"}
            self.last_checkpoint = save_checkpoint(acc, self.output_dir, self.state, progress, self.tcfg.checkpoints_total_limit,
                                                   record, protect=self.spikes.protected())
        self.spikes.saved(self.last_checkpoint)
        if acc.is_main_process:
            self.write_stats(progress)
        acc.wait_for_everyone()
        return self.last_checkpoint

    @contextmanager
    def ema_weights(self):
        """The bare model with its EMA weights, in eval mode, on the main process (None on the others,
        which must call this too: under FSDP2 they hand over their shards), without touching training
        state (the global RNGs are forked: sampling here must not change what training draws next)."""
        acc, network, ema = self.accelerator, self.state.network, self.state.ema
        with torch.random.fork_rng(devices=[acc.device] if acc.device.type == "cuda" else []):
            if is_sharded(network):
                copy = ema_copy(network, ema, lambda: new_model(self.cfg.model), acc.is_main_process)
                yield copy.to(acc.device).eval() if copy is not None else None
                return
            if not acc.is_main_process:
                yield None
                return
            ema.store(network.parameters())
            ema.copy_to(network.parameters())
            network.eval()
            try:
                yield network
            finally:
                ema.restore(network.parameters())
                network.train()

    def check_finite_weights(self, step: int) -> None:
        """Stop a run whose update made weights non-finite before any output is made of them (checkpoints,
        grids, evals). Under DDP every process holds the same weights; under FSDP2 each counts in its
        shards and the counts are summed: all stop alike."""
        bad = nonfinite_count(local_shards([*self.state.trained_parameters(), *self.state.ema.shadow_params]))
        if is_sharded(self.state.network):
            bad = int(self.accelerator.reduce(torch.tensor(bad, device=self.accelerator.device), "sum"))
        if bad:
            raise self.diverged(f"after step {step}, {bad} weights of the model, its EMA or the objective's are not finite")

    def diverged(self, what: str) -> TrainingDiverged:
        return TrainingDiverged(
            f"{what}; stopped without saving ({self.last_good()}). Lower training.learning_rate or set "
            f"training.max_grad_norm, then resume with {self.resume_advice()}."
        )

    @contextmanager
    def sampling_from_ema(self, step: int):
        """The EMA weights to sample from (main process; None elsewhere); finite weights that still sample NaN have blown up: a divergence."""
        try:
            with self.ema_weights() as model:
                yield model
        except NonFiniteSamples:
            raise self.diverged(f"after step {step}, the EMA weights sample NaN or infinite values (finite, but blown up)") from None

    def evaluate(self, step: int) -> None:
        """FID and KID of the EMA weights, to the tracker and (with the next checkpoint) training_stats.json."""
        self.check_finite_weights(step)
        with self.clock.spent_on("evals"), self.sampling_from_ema(step) as model:
            result = self.evaluator(step, self.interface.make_pipeline(model)) if model is not None else None
        if result is not None:
            self.accelerator.log({"eval/fid": result["fid"], "eval/kid": result["kid_mean"]}, step=step)
            tqdm.write(f"step {step}: FID {result['fid']:.2f}, KID {result['kid_mean']:.4f} ({result['num_fake']} EMA samples)")
        self.accelerator.wait_for_everyone()

    def save_sample_grid(self, step: int) -> None:
        """A grid of ``num_sample_images`` EMA samples (fixed seed and labels, so grids compare over time)."""
        self.check_finite_weights(step)
        n, sampling = self.tcfg.num_sample_images, self.cfg.sampling
        with self.clock.spent_on("sample_grids"), self.sampling_from_ema(step) as model:
            if model is not None:
                pipe = use_scheduler(self.interface.make_pipeline(model), sampling.scheduler)
                pipe.set_progress_bar_config(disable=True)
                images = draw(pipe, sampling, range(n))  # images 0..n-1 of `atdiff sample` with these settings
        if self.accelerator.is_main_process:
            rows = max(r for r in range(1, math.isqrt(n) + 1) if n % r == 0)
            path = self.output_dir / "samples" / f"step-{step:07d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            grid = make_image_grid([Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image) for image in images],
                                   rows, n // rows)
            with atomic_path(path) as partial:  # replaces whatever has the name (a link, a grid cut by a kill)
                grid.save(partial, format="PNG")
            log_image(self.accelerator, "samples", grid, step)
        self.accelerator.wait_for_everyone()

    def save_pipeline(self) -> None:
        """Make ``output_dir`` a diffusers pipeline folder with the EMA weights."""
        with self.ema_weights() as model:
            if model is not None:
                save_pipeline(self.output_dir, self.interface.make_pipeline(model))
        self.accelerator.wait_for_everyone()

    def record_history(self) -> None:
        """Bring ``training_stats.json``'s config history up to date without touching its figures."""
        stats_file = self.output_dir / STATS
        try:
            stats = json.loads(stats_file.read_text())
        except (OSError, ValueError):
            return
        if isinstance(stats, dict) and stats.get("config_history") != self.history:
            write_atomic(stats_file, json.dumps({**stats, "config_history": self.history}, indent=2) + "\n")

    def write_stats(self, progress: Progress) -> None:
        network = self.state.network
        stats = {
            "steps": progress.step,
            "images_seen": progress.images_seen,
            "skipped_steps": progress.skipped_steps,
            "batch_size": self.tcfg.batch_size,
            "params": sum(p.numel() for p in network.parameters()),
            "model": {"class": model_class(network).__name__, "token_mixer": network.config.get("token_mixer")},
            "device": str(self.accelerator.device),
            "num_processes": self.accelerator.num_processes,
            "sharding": "fsdp2" if is_sharded(network) else None,  # None: every process holds the whole model (DDP)
            "mixed_precision": self.tcfg.mixed_precision,
            "config_history": self.history,
            **self.timer.summary(self.tcfg.batch_size),
            "wall_clock": self.clock.summary(progress.images_seen),
            **self.model_memory,
            **process_peak_memory(self.accelerator.device),
        }
        if self.evaluator is not None:
            stats["evals"] = self.evaluator.history(up_to=progress.step)
        write_atomic(self.output_dir / STATS, json.dumps(stats, indent=2) + "\n")


class SpikeWatch:
    """Which checkpoint a diverging run should go back to. Weights can blow up while still finite: the
    loss jumps long before it overflows, and the checkpoints saved meanwhile are finite but ruined.
    A spike is a step whose loss exceeds ``FACTOR`` times the median of the steps before it; the last
    checkpoint saved without a spike since is kept from pruning until the loss is back under that
    bound for ``RECOVERY`` steps."""

    FACTOR, WINDOW, MIN_STEPS, RECOVERY = 10.0, 100, 10, 10
    FILE = "loss_watch.json"  # its state, in each checkpoint: a resumed run goes on watching

    def __init__(self, calm_checkpoint: Path | None = None):
        self.recent: deque[float] = deque(maxlen=self.WINDOW)  # losses before any spike: the baseline
        self.spike: tuple[int, float, float] | None = None  # (step, loss, median before it)
        self.calm_steps = 0
        self.calm_checkpoint = calm_checkpoint  # the newest checkpoint saved with no spike since the last

    @classmethod
    def resumed(cls, checkpoint: Path, output_dir: Path) -> SpikeWatch:
        """The watch as ``checkpoint`` (verified) saved it; the checkpoint itself is calm unless a spike was on."""
        watch = cls(head_checkpoint(output_dir, checkpoint))
        try:
            state = json.loads((checkpoint / cls.FILE).read_text())
            recent, spike, calm_steps, calm = state["recent"], state["spike"], state["calm_steps"], state["calm_checkpoint"]
        except (OSError, ValueError, TypeError, KeyError):  # none (an older checkpoint), or not ours
            return watch
        watch.recent.extend(float(loss) for loss in recent)
        if spike is not None:
            watch.spike, watch.calm_steps = (int(spike[0]), float(spike[1]), float(spike[2])), int(calm_steps)
            watch.calm_checkpoint = output_dir / calm if calm and (output_dir / calm).is_dir() else None
        return watch

    def state(self) -> dict:
        calm = self.calm_checkpoint.name if self.calm_checkpoint else None
        return {"recent": list(self.recent), "spike": self.spike, "calm_steps": self.calm_steps, "calm_checkpoint": calm}

    def observe(self, step: int, loss: float) -> None:
        if self.spike is None:
            if len(self.recent) >= self.MIN_STEPS and loss > self.FACTOR * (median := statistics.median(self.recent)):
                self.spike, self.calm_steps = (step, loss, median), 0
            else:
                self.recent.append(loss)
            return
        self.calm_steps = self.calm_steps + 1 if loss <= self.FACTOR * self.spike[2] else 0
        if self.calm_steps >= self.RECOVERY:
            self.spike = None

    def protected(self) -> Path | None:
        """The checkpoint pruning must keep while the loss is spiking (none otherwise: the next one is calm)."""
        return self.calm_checkpoint if self.spike is not None else None

    def saved(self, checkpoint: Path) -> None:
        if self.spike is None:
            self.calm_checkpoint = checkpoint


def nonfinite_count(tensors: list[torch.Tensor]) -> int:
    return int(torch.stack([(~torch.isfinite(t)).sum() for t in tensors]).sum()) if tensors else 0


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

