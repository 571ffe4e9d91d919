"""The Accelerate training loop.

One process or many (``accelerate launch -m atdiff train ...``, DDP; DeepSpeed and FSDP are
refused, see ``refuse_sharded_training``). The loop knows nothing about the network or the
objective: ``train`` builds the parts and hands the ``Trainer`` a model, an ``Objective``
(``objective.loss(model, x0, labels)``), a stream of batches and three narrow facts about the
model (``ModelInterface``); the loop adds AdamW with warm-up, clipping, accumulation, mixed
precision, EMA, sample grids, trackers and checkpoints. With ``training.eval_every`` it also hands
its EMA pipeline to an evaluator (``atdiff.eval.training_eval``) for FID and KID.

Crash safety: checkpoints (``atdiff.training.checkpoint``) are complete or absent, verified before
they are loaded, and saved only when the weights and EMA are finite. Resuming restores model,
optimizer, LR schedule, EMA, every RNG and the data position (``atdiff.data.batch_stream`` is a
function of it), so on the CPU a resumed run ends with exactly the weights of one that never
stopped. A step whose loss or gradients are not finite is not applied: the run stops (or, with
``training.max_skipped_steps``, skips it). Ctrl-C (or SIGTERM) saves a checkpoint at the end of the
current step and exits.
"""

from __future__ import annotations

import json
import math
import signal
import statistics
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration, parse_flag_from_env, set_seed
from diffusers import AutoencoderKL, DiffusionPipeline
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from diffusers.utils import make_image_grid
from tqdm.auto import tqdm

from ..config import ExperimentConfig, build_model, flat_config
from ..data import batch_augmentation, batch_stream, load_training_data
from ..devices import launched_without_gpu
from ..errors import UsageError
from ..files import atomic_path, write_atomic
from ..latents import check_model_fits
from ..memory import model_peak_memory, module_tensors, process_peak_memory
from ..objectives import Objective, build_objective
from ..pipelines import ImageDiffusionPipeline, num_classes_of
from .checkpoint import Progress, TrainingState, checkpoint_folder, find_checkpoint, load_checkpoint, make_head, save_checkpoint
from .run_dir import (
    check_output_dir,
    check_same_setup,
    is_output_dir_error,
    output_dir_error,
    prepare_output_dir,
    run_lock,
    save_pipeline,
)
from ..sampling import use_scheduler
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
    """All the loop knows of the model, besides calling ``objective.loss(model, x0, labels)``."""

    num_classes: int  # 0: unconditional, labels are never passed
    augment: Callable[[torch.Tensor], torch.Tensor] | None  # applied to each batch of images on the device
    make_pipeline: Callable[[torch.nn.Module], DiffusionPipeline]  # the bare model -> sample grids, final folder


# Accelerate's switches (set by `accelerate launch` from `accelerate config`) for engines that shard
# the model and optimizer over processes.
SHARDED_ENGINES = {"ACCELERATE_USE_DEEPSPEED": "DeepSpeed", "ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM"}


# ------------------------------------------------------------------------------------------------
# Set-up
# ------------------------------------------------------------------------------------------------


def train(cfg: ExperimentConfig, resume: str | None = None) -> TrainingResult:
    """Train (or continue, with ``resume="latest"`` or a checkpoint path) the run ``cfg`` describes."""
    if cfg.training.output_dir is None:
        raise UsageError("training.output_dir is not set; pass --output-dir DIR")
    output_dir = Path(cfg.training.output_dir)
    check_output_dir(output_dir, resume)
    if resume not in (None, "latest"):
        checkpoint_folder(resume, output_dir)  # a mistyped path is refused before the folder is created
    refuse_sharded_training()
    check_tracker_installed(cfg.training.log_with)
    data = load_training_data(cfg.data)  # before any work: a latent config may lack its store
    accelerator = make_accelerator(cfg, output_dir)
    with run_lock(output_dir) if accelerator.is_main_process else nullcontext():
        accelerator.wait_for_everyone()  # the other processes start once the main one holds the folder
        # Again under the lock: another run may have filled the folder since the check above (made
        # first so that a folder that is not a run never gets a lock file).
        check_output_dir(output_dir, resume)
        try:
            return start_training(accelerator, cfg, output_dir, resume, *data)
        except OSError as err:
            if is_output_dir_error(output_dir, err):
                raise output_dir_error(output_dir, err) from None
            raise
        finally:
            accelerator.end_training()


def refuse_sharded_training() -> None:
    """DeepSpeed, FSDP and Megatron-LM shard the model and optimizer over processes, while atdiff's
    checkpoints, EMA and finite checks work on whole tensors: refused until that is built and tested."""
    for variable, engine in SHARDED_ENGINES.items():
        if parse_flag_from_env(variable):
            raise UsageError(
                f"{engine} is not supported by atdiff train ({variable} is set, e.g. by `accelerate config`); "
                f"use multi-GPU DDP: `accelerate launch --multi_gpu -m atdiff train ...`"
            )


def make_accelerator(cfg: ExperimentConfig, output_dir: Path) -> Accelerator:
    tcfg = cfg.training
    try:
        accelerator = Accelerator(
            cpu=launched_without_gpu(),
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
    return accelerator


def start_training(
    accelerator: Accelerator, cfg: ExperimentConfig, output_dir: Path, resume: str | None, dataset, vae: AutoencoderKL | None
) -> TrainingResult:
    """Build (or resume) everything the loop trains, under the run folder's lock, and run it on
    ``dataset`` (images, or latents of ``vae``: ``atdiff.data.load_training_data``)."""
    tcfg = cfg.training
    # Every process verifies on its own (reading each file once more) and reaches the same choice,
    # so a refusal stops them all rather than leaving some waiting for a broadcast.
    resume_from = find_checkpoint(output_dir, resume, verbose=accelerator.is_main_process)
    if resume_from is not None:
        check_same_setup(resume_from, cfg)

    # Same initial weights everywhere (DDP also broadcasts them), then per-process noise streams.
    set_seed(tcfg.seed)
    model = build_model(cfg.model, report=accelerator.print)
    set_seed(tcfg.seed, device_specific=True)
    objective = build_objective(cfg.objective)
    objective.prepare(accelerator)  # e.g. a distillation teacher: onto the device, under the same autocast
    interface = model_interface(model, dataset, objective, cfg, vae)

    ema = EMAModel(model.parameters(), decay=tcfg.ema_decay, use_ema_warmup=True, power=tcfg.ema_power, foreach=True)
    optimizer = torch.optim.AdamW(
        parameter_groups(model, tcfg.weight_decay), lr=tcfg.learning_rate, betas=(tcfg.adam_beta1, tcfg.adam_beta2)
    )
    lr_scheduler = get_scheduler(
        tcfg.lr_scheduler, optimizer, num_warmup_steps=tcfg.lr_warmup_steps, num_training_steps=tcfg.max_steps
    )
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    state = TrainingState(accelerator.unwrap_model(model), ema, optimizer, lr_scheduler, accelerator.scaler)

    progress = Progress()
    if resume_from is not None:
        progress = load_checkpoint(accelerator, resume_from, state)
        accelerator.print(f"resumed from {resume_from} (step {progress.step})")
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
    evaluator = None
    if tcfg.eval_every and accelerator.is_main_process:
        from ..eval.training_eval import TrainingEvaluator  # torch-fidelity: imported only when evaluating

        evaluator = TrainingEvaluator(cfg, str(accelerator.device))
    carried_clock = previous_wall_clock(output_dir, progress.step) if resume_from is not None else None
    accelerator.wait_for_everyone()  # every process has read its checkpoint before the folder changes
    if accelerator.is_main_process:
        prepare_output_dir(output_dir, cfg)
        make_head(output_dir, progress.step)
        accelerator.init_trackers("atdiff", config=flat_config(cfg))
    trainer = Trainer(accelerator, model, objective, state, interface, cfg, evaluator=evaluator, carried_clock=carried_clock)
    return trainer.fit(batches, progress)


def previous_wall_clock(output_dir: Path, step: int) -> dict | None:
    """The run's wall-clock totals up to ``step``, from ``training_stats.json`` (written with each
    checkpoint) when it belongs to the checkpoint resumed from."""
    stats_file = output_dir / "training_stats.json"
    stats = json.loads(stats_file.read_text()) if stats_file.is_file() else {}
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
    if vae is not None:
        check_model_fits(cfg.model.resolved(), dataset)

    def make_pipeline(network: torch.nn.Module) -> ImageDiffusionPipeline:
        # Only the main process makes pipelines: the VAE moves to the device there alone.
        return ImageDiffusionPipeline(model=network, scheduler=objective.make_scheduler(), vae=vae and vae.to(network.device))

    return ModelInterface(num_classes=num_classes, augment=batch_augmentation(dataset, cfg.data), make_pipeline=make_pipeline)


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups; parameters the model names in ``no_weight_decay()`` (ATConv's
    ``difference_control``, a gate whose pull towards 0 would bias the inhibition) take none."""
    exempt = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    named = list(model.named_parameters())
    return [
        {"params": [p for n, p in named if n not in exempt], "weight_decay": weight_decay},
        {"params": [p for n, p in named if n in exempt], "weight_decay": 0.0},
    ]


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------


class StepOutcome(NamedTuple):
    loss: float  # mean over processes and micro-batches
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
                 evaluator=None, carried_clock: dict | None = None):
        self.accelerator, self.model, self.objective = accelerator, model, objective
        self.state, self.interface, self.cfg = state, interface, cfg
        # evaluator(step, pipeline) -> metrics and evaluator.history(up_to) -> stored metrics; main process only
        self.evaluator = evaluator
        self.clock = RunClock(carried_clock)
        self.model_memory: dict = {}
        self.tcfg = cfg.training
        self.output_dir = Path(self.tcfg.output_dir)
        self.timer = StepTimer(accelerator.device, self.tcfg.profile)
        self.last_checkpoint: Path | None = None

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
                else:
                    self.skip_step(progress, outcome)
                result.step = step
                result.losses.append(outcome.loss)
                bar.update()
                bar.set_postfix(loss=f"{outcome.loss:.4f}", img_s=f"{tcfg.batch_size / self.timer.step_times[-1]:.1f}")
                if step % tcfg.log_every == 0 and logged_losses:
                    self.log(step, logged_losses, outcome.grad_norm)
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
        return result

    def train_step(self, batches: Iterator, stop: StopRequest) -> StepOutcome:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches, made only when the
        loss and gradients are finite on every process."""
        acc, timer, tcfg, state = self.accelerator, self.timer, self.tcfg, self.state
        timer.start_step()
        total = 0.0
        for _ in range(tcfg.gradient_accumulation_steps):
            with timer.phase("data"):
                images, labels = next(batches)
                images = images.to(acc.device, non_blocking=True)
                labels = labels.to(acc.device, non_blocking=True) if self.interface.num_classes else None
                if self.interface.augment is not None:
                    images = self.interface.augment(images)
            with acc.accumulate(self.model):  # leaves sync_gradients set after the last micro-batch
                with timer.phase("forward"):
                    loss = self.objective.loss(self.model, images, labels)
                with timer.phase("backward"):
                    acc.backward(loss)
            total = total + loss.detach()
        with timer.phase("optimizer"):
            # Clipping at infinity only measures the norm (and scales by exactly 1). A NaN or inf norm
            # means a gradient that is not finite, or so large that its norm overflows.
            max_norm = math.inf if tcfg.max_grad_norm is None else tcfg.max_grad_norm
            grad_norm = acc.clip_grad_norm_(self.model.parameters(), max_norm).float()
            # With fp16 the GradScaler skips steps with non-finite gradients (and lowers its scale) itself.
            bad_gradients = (~torch.isfinite(grad_norm)).float() * (state.scaler is None)
            mean_loss = (total / tcfg.gradient_accumulation_steps).float()
            stopping = torch.tensor(float(stop.requested), device=acc.device)
            # One all-reduce per step: the loss, whether any process was interrupted or saw bad gradients.
            loss_sum, stops, bad = acc.reduce(torch.stack([mean_loss, stopping, bad_gradients]), "sum").tolist()
            loss_value = loss_sum / acc.num_processes
            applied = bad == 0 and math.isfinite(loss_value)
            if applied:
                state.optimizer.step()
            state.optimizer.zero_grad(set_to_none=True)
            state.lr_scheduler.step()  # the schedule is a function of the step, skipped or not
            if applied:
                state.ema.step(state.network.parameters())
        return StepOutcome(loss_value, grad_norm.item(), applied, stops > 0)

    def measured_train_step(self, batches: Iterator, stop: StopRequest) -> StepOutcome:
        """``train_step`` that records the model's peak memory: weights, optimizer state and EMA,
        plus the peak of what the step allocates (activations, gradients)."""
        state = self.state
        optimizer_state = [v for values in state.optimizer.state.values() for v in values.values() if torch.is_tensor(v)]
        resident = [*module_tensors(state.network), *optimizer_state, *state.ema.shadow_params]
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
                f"set training.max_grad_norm or allow skips with training.max_skipped_steps (now {limit}), then resume with --resume latest."
            )
        self.accelerator.print(
            f"step {progress.step}: {what}; update skipped ({progress.skipped_steps} of training.max_skipped_steps={limit})",
            file=sys.stderr, flush=True,
        )
        self.accelerator.log({"train/skipped_steps": progress.skipped_steps}, step=progress.step)

    def last_good(self) -> str:
        """Where a diverged run can be resumed from, for its error message."""
        return f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint was written"

    def log(self, step: int, losses: list[float], grad_norm: float) -> None:
        logs = {"train/loss": sum(losses) / len(losses), "train/lr": self.state.lr_scheduler.get_last_lr()[0],
                "train/images_per_s": self.tcfg.batch_size / statistics.median(self.timer.step_times[-len(losses):]),
                "train/grad_norm": grad_norm}
        self.accelerator.log(logs, step=step)

    # --------------------------------------------------------------------------------------------
    # Outputs
    # --------------------------------------------------------------------------------------------

    def save_checkpoint(self, progress: Progress) -> Path:
        """Save a checkpoint, only of finite weights: a checkpoint is always one to resume from."""
        bad = nonfinite_count([*self.state.network.parameters(), *self.state.ema.shadow_params])
        if bad:
            raise TrainingDiverged(
                f"after step {progress.step}, {bad} weights of the model or its EMA are not finite; stopped without "
                f"saving ({self.last_good()}). Lower training.learning_rate or set training.max_grad_norm, then resume with --resume latest."
            )
        acc = self.accelerator
        with self.clock.spent_on("checkpoints"):
            self.last_checkpoint = save_checkpoint(acc, self.output_dir, self.state, progress, self.tcfg.checkpoints_total_limit)
        if acc.is_main_process:
            self.write_stats(progress)
        acc.wait_for_everyone()
        return self.last_checkpoint

    @contextmanager
    def ema_weights(self):
        """Run the bare model with its EMA weights, in eval mode, without touching training state
        (the global RNGs are forked: sampling here must not change what training draws next)."""
        device, network, ema = self.accelerator.device, self.state.network, self.state.ema
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            ema.store(network.parameters())
            ema.copy_to(network.parameters())
            network.eval()
            try:
                yield network
            finally:
                ema.restore(network.parameters())
                network.train()

    def evaluate(self, step: int) -> None:
        """FID and KID of the EMA weights, to the tracker and (with the next checkpoint) training_stats.json."""
        if self.accelerator.is_main_process:
            with self.clock.spent_on("evals"), self.ema_weights() as model:
                result = self.evaluator(step, self.interface.make_pipeline(model))
            self.accelerator.log({"eval/fid": result["fid"], "eval/kid": result["kid_mean"]}, step=step)
            tqdm.write(f"step {step}: FID {result['fid']:.2f}, KID {result['kid_mean']:.4f} ({result['num_fake']} EMA samples)")
        self.accelerator.wait_for_everyone()

    def save_sample_grid(self, step: int) -> None:
        """A grid of ``num_sample_images`` EMA samples (fixed seed and labels, so grids compare over time)."""
        if self.accelerator.is_main_process:
            n, num_classes, sampling = self.tcfg.num_sample_images, self.interface.num_classes, self.cfg.sampling
            with self.clock.spent_on("sample_grids"), self.ema_weights() as model:
                pipe = use_scheduler(self.interface.make_pipeline(model), sampling.scheduler)
                pipe.set_progress_bar_config(disable=True)
                images = pipe(
                    batch_size=n,
                    class_labels=torch.arange(n) % num_classes if num_classes else None,
                    num_inference_steps=sampling.num_inference_steps,
                    guidance_scale=sampling.guidance_scale,
                    guidance_channels=sampling.guidance_channels,
                    generator=torch.Generator().manual_seed(sampling.seed),
                ).images
            rows = max(r for r in range(1, math.isqrt(n) + 1) if n % r == 0)
            path = self.output_dir / "samples" / f"step-{step:07d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            grid = make_image_grid(images, rows, n // rows)
            with atomic_path(path) as partial:  # replaces whatever has the name (a link, a grid cut by a kill)
                grid.save(partial, format="PNG")
            log_image(self.accelerator, "samples", grid, step)
        self.accelerator.wait_for_everyone()

    def save_pipeline(self) -> None:
        """Make ``output_dir`` a diffusers pipeline folder with the EMA weights."""
        if self.accelerator.is_main_process:
            with self.ema_weights() as model:
                save_pipeline(self.output_dir, self.interface.make_pipeline(model))
        self.accelerator.wait_for_everyone()

    def write_stats(self, progress: Progress) -> None:
        network = self.state.network
        stats = {
            "steps": progress.step,
            "images_seen": progress.images_seen,
            "skipped_steps": progress.skipped_steps,
            "batch_size": self.tcfg.batch_size,
            "params": sum(p.numel() for p in network.parameters()),
            "model": {"class": type(network).__name__, "token_mixer": network.config.get("token_mixer")},
            "device": str(self.accelerator.device),
            "num_processes": self.accelerator.num_processes,
            "mixed_precision": self.tcfg.mixed_precision,
            **self.timer.summary(self.tcfg.batch_size),
            "wall_clock": self.clock.summary(progress.images_seen),
            **self.model_memory,
            **process_peak_memory(self.accelerator.device),
        }
        if self.evaluator is not None:
            stats["evals"] = self.evaluator.history(up_to=progress.step)
        write_atomic(self.output_dir / "training_stats.json", json.dumps(stats, indent=2) + "\n")


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

