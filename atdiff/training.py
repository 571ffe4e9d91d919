"""``atdiff train``: the Accelerate training loop.

One process or many (``accelerate launch -m atdiff train ...``; DeepSpeed/FSDP through Accelerate's
config). The loop knows nothing about the network or the objective: it gets a model, an objective
(``objective.loss(model, x0, labels)``) and a stream of batches, and adds AdamW with warm-up,
clipping, accumulation, mixed precision, EMA, sample grids, trackers and checkpoints.

Crash safety: ``output_dir/checkpoint-<step>/`` is an ``accelerator.save_state`` folder written
under a temporary name and renamed, so a kill during saving leaves the previous checkpoint as the
latest. Resuming restores model, optimizer, LR schedule, EMA and every RNG, and the data order is a
function of the step (``atdiff.data.batch_stream``), so on the CPU a resumed run ends with exactly
the weights of one that never stopped. A non-finite loss stops the run, keeping the last good
checkpoint; Ctrl-C (or SIGTERM) saves a checkpoint at the end of the current step and exits.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import shutil
import signal
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from diffusers.utils import make_image_grid
from tqdm.auto import tqdm

from .config import ExperimentConfig, build_model, load_config
from .data import batch_stream, load_dataset, random_flip
from .errors import UsageError
from .objectives import build_objective
from .pipelines import ImageDiffusionPipeline, num_classes_of

CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
WARMUP_STEPS = 5  # first steps of a session left out of throughput (allocator, worker start-up)
EXIT_INTERRUPTED = 130  # the shell's code for a Ctrl-C'd command


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; nothing was saved after the last good checkpoint."""


@dataclass
class TrainingResult:
    output_dir: Path
    step: int  # optimizer steps done
    interrupted: bool
    losses: list[float] = field(default_factory=list)  # mean loss of each step this session ran


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML experiment config (see configs/)")
    parser.add_argument("--output-dir", help="run folder (training.output_dir; default outputs/<config name>)")
    parser.add_argument("--max-steps", type=int, help="optimizer steps (training.max_steps)")
    parser.add_argument("--batch-size", type=int, help="images per optimizer step over all processes (training.batch_size)")
    parser.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (training.checkpoint_every)")
    parser.add_argument("--seed", type=int, help="training.seed")
    parser.add_argument("--resume", metavar="latest|PATH", help="continue from the newest checkpoint of the output dir, or from a checkpoint folder")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override any config key, e.g. training.learning_rate=3e-4 model.token_mixer=attention")


FLAG_KEYS = {
    "output_dir": "training.output_dir",
    "max_steps": "training.max_steps",
    "batch_size": "training.batch_size",
    "checkpoint_every": "training.checkpoint_every",
    "seed": "training.seed",
}


def run(args: argparse.Namespace) -> int:
    flags = [f"{key}={json.dumps(getattr(args, name))}" for name, key in FLAG_KEYS.items() if getattr(args, name) is not None]
    cfg = load_config(args.config, [*args.overrides, *flags])
    try:
        result = train(cfg, resume=args.resume)
    except TrainingDiverged as err:
        print(f"atdiff train: error: {err}", flush=True)
        return 1
    return EXIT_INTERRUPTED if result.interrupted else 0


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
        accelerator.load_state(str(resume_from))
        start_step = checkpoint_step(resume_from)
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
        output_dir.mkdir(parents=True, exist_ok=True)
        for stale in output_dir.glob(".*.tmp"):  # left by a run killed while saving
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        write_atomic(output_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
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


def flat_config(cfg: ExperimentConfig) -> dict[str, str | int | float | bool]:
    """The config as flat ``section/key`` scalars, as trackers (TensorBoard hparams) want."""
    return {
        f"{section}/{key}": value if isinstance(value, (str, int, float, bool)) else str(value)
        for section, values in cfg.to_dict().items()
        for key, value in values.items()
    }


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
        """``accelerator.save_state`` into ``.checkpoint-<step>.tmp``, renamed once complete; then
        keep the newest ``checkpoints_total_limit``. Pruning happens after the rename, so a kill at
        any point leaves at least one complete checkpoint."""
        acc = self.accelerator
        final = self.output_dir / f"checkpoint-{step}"
        partial = self.output_dir / f".checkpoint-{step}.tmp"
        if acc.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(partial))  # every process writes its own RNG state
        acc.wait_for_everyone()
        if acc.is_main_process:
            if final.exists():  # from an earlier attempt at this run (resumed from an older checkpoint)
                shutil.rmtree(final)
            os.replace(partial, final)
            limit = self.tcfg.checkpoints_total_limit
            for _, old in list_checkpoints(self.output_dir)[:-limit] if limit else []:
                shutil.rmtree(old)
            self.write_stats(step)
        acc.wait_for_everyone()
        self.last_checkpoint = final
        return final

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
        """Make ``output_dir`` a diffusers pipeline folder with the EMA weights. Written aside and moved
        in with ``model_index.json`` last, so a folder that has it holds a complete pipeline."""
        if self.accelerator.is_main_process:
            staging = self.output_dir / ".pipeline.tmp"
            shutil.rmtree(staging, ignore_errors=True)
            with self.ema_weights() as model:
                self.pipeline(model).save_pretrained(staging)
            for entry in sorted(staging.iterdir(), key=lambda p: p.name == "model_index.json"):
                target = self.output_dir / entry.name
                if target.is_dir():
                    shutil.rmtree(target)
                os.replace(entry, target)
            staging.rmdir()
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
# Checkpoint folders
# ------------------------------------------------------------------------------------------------


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (partial ones have a temporary name), oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := CHECKPOINT_NAME.fullmatch(p.name))]
    return sorted(found)


def pipeline_at_checkpoint(checkpoint: Path) -> ImageDiffusionPipeline:
    """The pipeline of a run's EMA weights as they were at ``checkpoint`` (for FID over training).

    Rebuilds the model from the run's ``config.yaml`` and copies in the EMA parameters that
    ``save_state`` stored (the EMA is the first object registered for checkpointing).
    """
    cfg = load_config(checkpoint.parent / "config.yaml")
    model = build_model(cfg.model)
    ema = EMAModel(model.parameters())
    ema.load_state_dict(torch.load(checkpoint / "custom_checkpoint_0.pkl", weights_only=True))
    ema.copy_to(model.parameters())
    return ImageDiffusionPipeline(model=model.eval(), scheduler=build_objective(cfg.objective).make_scheduler())


def checkpoint_step(path: Path) -> int:
    return int(CHECKPOINT_NAME.fullmatch(path.name).group(1))


def find_checkpoint(output_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint ``--resume`` names: the newest in ``output_dir`` for ``latest`` (None when
    there is none yet, so one command both starts and continues a run), or a checkpoint folder."""
    if resume is None:
        return None
    if resume == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            print(f"--resume latest: {output_dir} has no checkpoint yet; starting from scratch", flush=True)
        return checkpoints[-1][1] if checkpoints else None
    path = Path(resume)
    if not (path.is_dir() and CHECKPOINT_NAME.fullmatch(path.name) and any(path.glob("model*.safetensors"))):
        raise UsageError(f"--resume: {resume!r} is not a checkpoint-<step> folder; pass one, or 'latest'")
    return path


def check_output_dir(output_dir: Path, cfg: ExperimentConfig, resume_from: Path | None) -> None:
    """Refuse to train over a finished or checkpointed run unless resuming, and refuse to resume
    with a model, objective or data that differ from the checkpoint's."""
    if resume_from is None:
        taken = [p.name for p in (output_dir / "model_index.json", *(p for _, p in list_checkpoints(output_dir))) if p.exists()]
        if taken:
            raise UsageError(
                f"{output_dir} already holds a run ({', '.join(taken[:3])}); continue it with --resume latest "
                f"or pass another --output-dir"
            )
        return
    saved_config = resume_from.parent / "config.yaml"
    if saved_config.is_file():
        saved, current = yaml.safe_load(saved_config.read_text()), cfg.to_dict()
        changed = [
            f"{section}.{key}"
            for section in ("model", "objective", "data")
            for key in sorted(set(saved.get(section, {})) | set(current[section]))
            if saved.get(section, {}).get(key) != current[section].get(key)
        ]
        if changed:
            raise UsageError(f"{resume_from} was trained with other values of {changed} (see {saved_config}); use the same config to resume")


# ------------------------------------------------------------------------------------------------
# Measurements, signals, files
# ------------------------------------------------------------------------------------------------


class StepTimer:
    """Wall time of every step and, where it is cheap or asked for, of its phases.

    On the CPU the phases cost nothing to time (every op is synchronous); on CUDA they are only
    meaningful with a device synchronisation at each boundary, so they are timed with ``profile`` only.
    """

    PHASES = ("data", "forward", "backward", "optimizer")

    def __init__(self, device: torch.device, profile: bool):
        self.split = profile or device.type == "cpu"
        self.sync = (lambda: torch.cuda.synchronize(device)) if profile and device.type == "cuda" else (lambda: None)
        self.step_times: list[float] = []
        self.phase_times: list[dict[str, float]] = []

    def start_step(self) -> None:
        self.sync()
        self.current = dict.fromkeys(self.PHASES, 0.0)
        self.started = time.perf_counter()

    @contextmanager
    def phase(self, name: str):
        if not self.split:
            yield
            return
        start = time.perf_counter()
        yield
        self.sync()
        self.current[name] += time.perf_counter() - start

    def end_step(self) -> None:
        self.sync()
        self.step_times.append(time.perf_counter() - self.started)
        self.phase_times.append(self.current)

    def summary(self, batch_size: int) -> dict:
        """Median images/s and the mean time split, leaving out the first steps of the session."""
        skip = min(WARMUP_STEPS, max(len(self.step_times) - 1, 0))
        times = self.step_times[skip:]
        if not times:
            return {"images_per_s": None, "step_time_s": None, "time_split_s": None}
        step_time = statistics.median(times)
        split = None
        if self.split:
            split = {name: statistics.fmean(p[name] for p in self.phase_times[skip:]) for name in self.PHASES}
            split["other"] = max(statistics.fmean(times) - sum(split.values()), 0.0)
        return {"images_per_s": batch_size / step_time, "step_time_s": step_time, "time_split_s": split,
                "timed_steps": len(times)}


def peak_memory(device: torch.device) -> dict:
    """Peak memory of this process: CUDA max allocated, or on the CPU the peak resident set."""
    if device.type == "cuda":
        return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20, "peak_memory_kind": "cuda_max_allocated"}
    # Linux's VmHWM belongs to this process image alone; ru_maxrss carries over the parent's peak
    # through fork and exec, so a child started by a large process would report the parent's size.
    try:
        with open("/proc/self/status") as status:
            kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"peak_memory_mb": kib / 1024, "peak_memory_kind": "cpu_peak_rss"}


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


def write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.tmp")
    partial.write_text(text)
    os.replace(partial, path)
