"""Checkpoints of a run, ``output_dir/checkpoint-<step>/``, in a format atdiff owns.

A checkpoint folder holds::

    model.safetensors        the bare model's weights
    objective.safetensors    the weights the objective trains besides the model (REPA's projector), if any
    ema.safetensors          EMAModel.state_dict()            tensor trees (``tensor_tree``): tensors
    optimizer.safetensors    optimizer.state_dict()           in safetensors, structure as JSON in
    scheduler.safetensors    LR scheduler state_dict()        the file's metadata
    scaler.safetensors       fp16 GradScaler state (only when there is one)
    rng-<rank>.safetensors   python, numpy, torch and CUDA RNG states of each process
    progress.json            step, images drawn (the data position), skipped steps
    config.yaml, config_history.json
                             the record of the settings it was trained with (``atdiff.training.resume``)
    loss_watch.json          the loop's loss-spike watch (``loop.SpikeWatch``)
    manifest.json            written last: each file above with its size and sha256

Under FSDP2 the same files hold the full tensors gathered from the shards (``sharding``).

Nothing in it is unpickled (Accelerate's ``save_state`` pickles RNG and custom states and loads
them with ``weights_only=False``). It is written as ``.atdiff-tmp-checkpoint-<step>`` and renamed
once its manifest is in, so a kill leaves either no checkpoint or a complete one; a folder whose
files do not match its manifest (bit rot, a truncated copy, tampering) fails ``verify`` and is
never loaded.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from ..config import load_config
from ..latents import load_vae
from ..errors import UsageError
from ..files import remove_temp, temp_path
from ..integrity import MANIFEST, IntegrityError, check_files, check_nothing_unlisted, read_manifest, write_manifest
from ..models.model_config import new_model
from ..objectives import build_objective
from ..pipelines import ImageDiffusionPipeline
from .sharding import (
    gather_ema_state,
    gather_model_state,
    gather_optimizer_state,
    is_sharded,
    load_model_state,
    load_optimizer_state,
    shard_ema,
)
from .tensor_tree import load_tree, os_errors, save_tree

CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
FORMAT, VERSION = "atdiff-checkpoint", 1
PROGRESS = "progress.json"
OBJECTIVE_FILE = "objective.safetensors"
REQUIRED = ("model.safetensors", "ema.safetensors", "optimizer.safetensors", "scheduler.safetensors", PROGRESS, "rng-0.safetensors")
ABANDONED = "abandoned"  # where checkpoints of an abandoned line of a run are moved


@dataclass
class TrainingState:
    """The live objects a checkpoint saves and restores in place."""

    network: torch.nn.Module  # the bare model (not the DDP wrapper; under FSDP2 the sharded module itself)
    ema: EMAModel  # over network's parameters: under FSDP2 its shadows are shards too
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None = None  # fp16 only
    objective_module: torch.nn.Module | None = None  # trained with the network, in no pipeline (Objective.trained_module)

    def trained_parameters(self) -> list[torch.nn.Parameter]:
        """What the optimizer updates: the network's parameters and the objective's own."""
        extra = self.objective_module.parameters() if self.objective_module is not None else ()
        return [*self.network.parameters(), *extra]


@dataclass
class Progress:
    """Where the run is. The data position is the number of images drawn, over all processes
    (``atdiff.data.batch_stream`` starts at any batch of the shuffled order)."""

    step: int = 0
    images_seen: int = 0
    skipped_steps: int = 0  # non-finite steps skipped so far (training.max_skipped_steps)


# ------------------------------------------------------------------------------------------------
# Finding
# ------------------------------------------------------------------------------------------------


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Checkpoint folders (partial ones have a temporary name), oldest first; not yet verified."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := CHECKPOINT_NAME.fullmatch(p.name))]
    return sorted(found)


def checkpoint_step(path: Path) -> int:
    return int(CHECKPOINT_NAME.fullmatch(path.name).group(1))


def find_checkpoint(output_dir: Path, resume: str | None, verbose: bool = True) -> Path | None:
    """The verified checkpoint ``--resume`` names: for ``latest`` the newest in ``output_dir`` that
    verifies (None when there is none yet, so one command both starts and continues a run), else
    the checkpoint folder given, which must verify. ``verbose``: say what was skipped (main process)."""
    if resume is None:
        return None
    if resume == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            if verbose:
                print(f"--resume latest: {output_dir} has no checkpoint yet; starting from scratch", flush=True)
            return None
        for _, path in reversed(checkpoints):
            try:
                verify(path)
                return path
            except IntegrityError as err:
                if verbose:
                    print(f"--resume latest: skipping {path}: {err}", file=sys.stderr, flush=True)
        raise UsageError(
            f"--resume latest: no checkpoint in {output_dir} passes verification (see above); "
            f"resume from a copy with --resume PATH, or start a new run in another --output-dir"
        )
    path = checkpoint_folder(resume, output_dir)
    try:
        verify(path)
    except IntegrityError as err:
        raise UsageError(f"--resume {resume}: {err}; pass another checkpoint, or 'latest'") from None
    return path


def checkpoint_folder(resume: str, output_dir: Path) -> Path:
    """The folder ``--resume PATH`` names (not yet verified); refused unless it is a ``checkpoint-<step>`` folder."""
    path = Path(resume)
    if path.is_dir() and CHECKPOINT_NAME.fullmatch(path.name):
        return path
    in_run = output_dir / resume
    fix = f"pass --resume {in_run}" if not path.is_absolute() and CHECKPOINT_NAME.fullmatch(in_run.name) and in_run.is_dir() else "pass one"
    raise UsageError(f"--resume: {resume!r} is not a checkpoint-<step> folder; {fix}, or 'latest'")


def verify(path: Path) -> None:
    """Raise IntegrityError unless every file ``manifest.json`` lists is there with its size and sha256,
    and it lists every file there."""
    manifest = read_manifest(path, FORMAT, VERSION)
    if manifest is None:
        raise IntegrityError(f"no {MANIFEST} (incomplete, or written by an older atdiff)")
    if manifest.get("step") != checkpoint_step(path):
        raise IntegrityError(f"{MANIFEST} is for step {manifest.get('step')!r}, not {checkpoint_step(path)}")
    files = manifest["files"]
    if missing := [name for name in REQUIRED if name not in files]:
        raise IntegrityError(f"{MANIFEST} lists no {missing[0]}")
    check_files(path, files)
    check_nothing_unlisted(path, files, [""])  # the optional files (another process's RNG, the fp16 scaler)
    read_progress(path)


def read_progress(checkpoint: Path) -> Progress:
    """``progress.json``: non-negative counts, at the checkpoint's own step (its manifest vouches only for its bytes)."""
    try:
        recorded = json.loads((checkpoint / PROGRESS).read_text())
        progress = Progress(**recorded)
    except (OSError, ValueError, TypeError) as err:
        raise IntegrityError(f"{PROGRESS} is not a progress record ({err})") from None
    counts = asdict(progress).values()
    # int64 bounds them: the data position seeds the sampler's generator and counts in tensors.
    if progress.step != checkpoint_step(checkpoint) or not all(type(n) is int and 0 <= n < 2**63 for n in counts):
        raise IntegrityError(f"{PROGRESS} holds {recorded}, not counts in [0, 2**63) at step {checkpoint_step(checkpoint)}")
    return progress


# ------------------------------------------------------------------------------------------------
# Saving
# ------------------------------------------------------------------------------------------------


def save_checkpoint(accelerator: Accelerator, output_dir: Path, state: TrainingState, progress: Progress, keep: int | None,
                    record: dict[str, str], protect: Path | None = None) -> Path:
    """Write ``checkpoint-<step>`` (every process its RNG states, the main process the rest and the
    ``record`` files, name -> text), then keep the newest ``keep`` (all with None) and ``protect``.
    Pruning happens after the rename, so a kill at any point leaves at least one complete checkpoint."""
    acc = accelerator
    final = output_dir / f"checkpoint-{progress.step}"
    partial = temp_path(final)
    if acc.is_main_process:
        remove_temp(partial)
        partial.mkdir()
    acc.wait_for_everyone()
    try:
        write_checkpoint(acc, partial, state, progress, record)
    except OSError:  # a full disk gets the half-written checkpoint's space back now (a kill leaves it to the next start)
        if acc.is_main_process:
            remove_temp(partial)
        raise
    if acc.is_main_process:
        if final.exists():  # left by another line of this run; never silently replaced
            move_aside(final)
        os.replace(partial, final)
        # A linked checkpoint folder is someone else's: atdiff counts and deletes only those it wrote.
        written = [path for _, path in list_checkpoints(output_dir) if not path.is_symlink()]
        for old in written[:-keep] if keep else []:
            if old != protect:
                shutil.rmtree(old)
    acc.wait_for_everyone()
    return final


def write_checkpoint(acc: Accelerator, partial: Path, state: TrainingState, progress: Progress, record: dict[str, str]) -> None:
    """Fill the temporary checkpoint folder ``partial``, its manifest last. A sharded (FSDP2) model's
    state is gathered whole by every process taking part, and written by the main process as DDP's is."""
    sharded = is_sharded(state.network)
    model = gather_model_state(state.network) if sharded else None
    optimizer = gather_optimizer_state(state.network, state.optimizer) if sharded else None
    ema = gather_ema_state(state.ema)
    if acc.is_main_process:
        with os_errors(partial / "model.safetensors"):
            if sharded:
                save_file(model, str(partial / "model.safetensors"), metadata={"format": "pt"})  # what save_model writes
            else:
                save_model(state.network, str(partial / "model.safetensors"))
            if state.objective_module is not None:
                save_model(state.objective_module, str(partial / OBJECTIVE_FILE))
        save_tree(partial / "ema.safetensors", ema)
        save_tree(partial / "optimizer.safetensors", optimizer if sharded else state.optimizer.state_dict())
        save_tree(partial / "scheduler.safetensors", state.lr_scheduler.state_dict())
        if state.scaler is not None:
            save_tree(partial / "scaler.safetensors", state.scaler.state_dict())
        (partial / PROGRESS).write_text(json.dumps(asdict(progress), indent=2) + "\n")
        for name, text in record.items():
            (partial / name).write_text(text)
    save_tree(partial / f"rng-{acc.process_index}.safetensors", rng_states())
    acc.wait_for_everyone()
    if acc.is_main_process:
        write_checkpoint_manifest(partial, progress.step)


def write_checkpoint_manifest(folder: Path, step: int) -> None:
    write_manifest(folder, [p.name for p in folder.iterdir() if p.name != MANIFEST], format=FORMAT, version=VERSION, step=step)


def rng_states() -> dict:
    """This process's global RNGs (those the loop draws from: noise, timesteps, flips, dropout)."""
    kind, key, pos, has_gauss, cached = np.random.get_state()
    states = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, key, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------


def load_checkpoint(accelerator: Accelerator, checkpoint: Path, state: TrainingState) -> Progress:
    """Restore ``state`` and this process's RNGs from a verified checkpoint. (Accelerate's own
    micro-step counter needs no restoring: checkpoints fall on optimizer steps, where it is 0 modulo
    the accumulation steps, the only thing it is used for.)"""
    # A checkpoint verifies when its files are the ones its manifest lists, which anyone can rewrite:
    # what they hold is read as untrusted input (a pickle named .safetensors is a SafetensorError).
    sharded = is_sharded(state.network)  # FSDP2: every process reads the full tensors and keeps its shard
    try:
        if sharded:
            load_model_state(state.network, load_file(str(checkpoint / "model.safetensors")))
        else:
            load_model(state.network, str(checkpoint / "model.safetensors"))
        if state.objective_module is not None:  # the objective keys are refused on resume: a checkpoint of this run has it
            load_model(state.objective_module, str(checkpoint / OBJECTIVE_FILE))
        state.ema.load_state_dict(load_tree(checkpoint / "ema.safetensors"))
        if sharded:
            shard_ema(state.ema, state.network.parameters())
            load_optimizer_state(state.network, state.optimizer, load_tree(checkpoint / "optimizer.safetensors"))
        else:
            state.optimizer.load_state_dict(load_tree(checkpoint / "optimizer.safetensors"))
        state.lr_scheduler.load_state_dict(load_tree(checkpoint / "scheduler.safetensors"))
        if state.scaler is not None and (checkpoint / "scaler.safetensors").is_file():
            state.scaler.load_state_dict(load_tree(checkpoint / "scaler.safetensors"))
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError, FileNotFoundError, SafetensorError) as err:  # verified, so a model or optimizer that differs
        raise UsageError(f"--resume {checkpoint}: does not fit this model and optimizer ({first_line(err)})") from None
    progress = read_progress(checkpoint)
    rng_file = checkpoint / f"rng-{accelerator.process_index}.safetensors"
    if rng_file.is_file():
        try:
            set_rng_states(load_tree(rng_file))
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError, SafetensorError) as err:
            raise UsageError(f"--resume {checkpoint}: {rng_file.name} does not hold the RNG states atdiff saves ({first_line(err)})") from None
    else:  # resumed on more processes than saved it: the new ones keep their fresh seeds
        print(f"{checkpoint} has no RNG state for process {accelerator.process_index}; it keeps its seed", file=sys.stderr)
    return progress


def first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


# ------------------------------------------------------------------------------------------------
# Lineage
# ------------------------------------------------------------------------------------------------


STEP_FILE = re.compile(r"step-(\d+)\.\w+")  # an output made at a step: samples/step-0000040.png, evals/step-40.json


def make_head(output_dir: Path, step: int, step_folders: tuple[str, ...] = (), later_outputs: list[Path] = ()) -> None:
    """Resuming from ``step``: move the run's later checkpoints, the later outputs in
    ``step_folders`` (``step-<N>.*`` files: sample grids, evals) and ``later_outputs`` (made after
    ``step``: a final pipeline, the stats) aside together, so that ``--resume latest`` never picks a
    checkpoint of the abandoned line and no output of it is reused or taken for one of the new line."""
    later = [path for later_step, path in list_checkpoints(output_dir) if later_step > step] + list(later_outputs)
    for folder in step_folders:
        if (output_dir / folder).is_dir() and not (output_dir / folder).is_symlink():
            later += [p for p in sorted((output_dir / folder).iterdir())
                      if (m := STEP_FILE.fullmatch(p.name)) and int(m.group(1)) > step and not p.is_symlink()]
    if not later:
        return
    target = abandoned_folder(output_dir)
    for path in later:
        moved = target / path.relative_to(output_dir)
        moved.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, moved)
    print(f"resuming from step {step}: moved the later {', '.join(str(p.relative_to(output_dir)) for p in later)} to {target}",
          file=sys.stderr, flush=True)


def run_folder_of(checkpoint: Path) -> Path:
    """The run folder (with its ``config.yaml``) a checkpoint belongs to, also once moved aside."""
    moved = checkpoint.parent.parent.name == ABANDONED
    return checkpoint.parent.parent.parent if moved else checkpoint.parent


def move_aside(path: Path) -> Path:
    """Move a checkpoint to ``output_dir/abandoned/atdiff-<UTC time>/``, keeping its name, so that it
    can still be resumed with ``--resume PATH``."""
    target = abandoned_folder(path.parent) / path.name
    os.replace(path, target)
    return target


def abandoned_folder(output_dir: Path) -> Path:
    """A new ``output_dir/abandoned/atdiff-<UTC time>[-n]/`` folder."""
    stamp, n = time.strftime("%Y%m%dT%H%M%S", time.gmtime()), 0
    while (target := output_dir / ABANDONED / f"atdiff-{stamp}{f'-{n}' if n else ''}").exists():
        n += 1
    target.mkdir(parents=True)
    return target


# ------------------------------------------------------------------------------------------------
# Reading one part
# ------------------------------------------------------------------------------------------------


def pipeline_at_checkpoint(checkpoint: Path) -> ImageDiffusionPipeline:
    """The pipeline of a run's EMA weights as they were at ``checkpoint`` (for FID over training),
    rebuilt from the run's ``config.yaml``."""
    try:
        verify(checkpoint)
    except IntegrityError as err:
        raise UsageError(f"{checkpoint}: {err}") from None
    own = checkpoint / "config.yaml"  # the config it was trained with (atdiff.training.resume); older ones: the run's
    cfg = load_config(own if own.is_file() else run_folder_of(checkpoint) / "config.yaml")
    model = new_model(cfg.model)  # every parameter comes from the EMA: no model.init_from weights to copy
    ema = EMAModel(model.parameters())
    ema.load_state_dict(load_tree(checkpoint / "ema.safetensors"))
    ema.copy_to(model.parameters())
    vae = load_vae(cfg.data.vae, cfg.data.vae_subfolder) if cfg.data.vae else None
    return ImageDiffusionPipeline(model=model.eval(), scheduler=build_objective(cfg.objective).make_scheduler(), vae=vae)
