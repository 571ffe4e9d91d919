"""What training must never do (issue 9): load a checkpoint that fails verification, cross from one
line of a run to another, save non-finite weights, share a folder with another run, write into a
folder that is not a run, or leave a traceback for an unwritable folder (engines it cannot checkpoint: test_fsdp).
Tiny DiT and Fashion-MNIST, as in test_training."""

from __future__ import annotations

import copy
import errno
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
import safetensors.torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from atdiff.cli import main
from atdiff.config import config_from_dict
from atdiff.errors import UsageError
from atdiff.objectives import FlowMatchingObjective
from atdiff.pipelines import ImageDiffusionPipeline
from atdiff.training import TrainingDiverged, checkpoint, list_checkpoints, loop, run_dir, train
from atdiff.integrity import IntegrityError, verify_pipeline
from atdiff.training.checkpoint import ABANDONED, verify
from atdiff.training.loop import Trainer
from atdiff.training.run_dir import LOCK_NAME, run_lock
from atdiff.training.tensor_tree import load_tree
from test_training import TINY, assert_same_run, one_thread, straight, tiny, write_config  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def copy_run(source: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(source, out)
    return out


def one_line_error(capsys) -> str:
    """The one ``atdiff train: error: ...`` line on stderr (after any progress bar), and no traceback."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("atdiff train: error: ") and "Traceback" not in err, err
    return errors[0]


def all_finite(tensors) -> bool:
    return all(torch.isfinite(t).all() for t in tensors)


# ------------------------------------------------------------------------------------------------
# The checkpoint format
# ------------------------------------------------------------------------------------------------


def test_a_checkpoint_holds_no_pickle_and_a_manifest_of_every_file(straight):
    folder = straight[0] / "checkpoint-6"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["config.yaml", "config_history.json", "ema.safetensors", "loss_watch.json", "manifest.json", "model.safetensors",
                     "optimizer.safetensors", "progress.json", "rng-0.safetensors", "scheduler.safetensors"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert sorted(manifest["files"]) == [n for n in names if n != "manifest.json"] and manifest["step"] == 6
    assert json.loads((folder / "progress.json").read_text()) == {"step": 6, "images_seen": 48, "skipped_steps": 0}
    optimizer = load_tree(folder / "optimizer.safetensors")
    assert isinstance(optimizer["param_groups"][0]["betas"], tuple) and all(isinstance(k, int) for k in optimizer["state"])
    verify(folder)


CORRUPTIONS = {
    # A flipped byte deep in the tensor data: the file still loads, with other weights.
    "flipped model bytes": ("model.safetensors", lambda data: data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:]),
    "garbage RNG file": ("rng-0.safetensors", lambda data: os.urandom(len(data))),
    "truncated optimizer": ("optimizer.safetensors", lambda data: data[: len(data) // 2]),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_resume_latest_falls_back_past_a_corrupt_checkpoint(straight, tmp_path, capsys, corruption):
    out = copy_run(straight[0], tmp_path)
    name, corrupt = CORRUPTIONS[corruption]
    target = out / "checkpoint-6" / name
    target.write_bytes(corrupt(target.read_bytes()))
    with pytest.raises(IntegrityError, match=name):
        verify(out / "checkpoint-6")

    config = write_config(tiny(out), tmp_path / "run.yaml")
    assert main(["train", "--config", str(config), "--resume", "latest"]) == 0
    captured = capsys.readouterr()
    assert f"skipping {out / 'checkpoint-6'}: {name}" in captured.err and "resumed from" in captured.out
    assert "checkpoint-3 (step 3)" in captured.out
    # The corrupt checkpoint was moved aside, not deleted, and the run ended as the straight one.
    assert [p.name for p in (out / ABANDONED).glob("atdiff-*/checkpoint-*")] == ["checkpoint-6"]
    assert_same_run(straight[0], out)


@pytest.mark.parametrize("name", ["rng-1.safetensors", "custom_checkpoint_0.pkl", "scaler.safetensors"])
def test_a_file_the_manifest_does_not_list_fails_verification(straight, tmp_path, name):
    """A file added after the manifest was written is unverified: a loader that read it (another
    process's RNG, an fp16 scaler) would take in anything, so the checkpoint is refused."""
    folder = shutil.copytree(straight[0] / "checkpoint-6", tmp_path / "checkpoint-6")
    shutil.copy(folder / "rng-0.safetensors", folder / name)
    with pytest.raises(IntegrityError, match=f"{name} is not listed in manifest.json"):
        verify(folder)


LYING_PROGRESS = {
    "another step": {"step": 3, "images_seen": 48, "skipped_steps": 0},
    "negative images": {"step": 6, "images_seen": -48, "skipped_steps": 0},
    "text for a count": {"step": "6", "images_seen": 48, "skipped_steps": 0},
    "unknown key": {"step": 6, "images_seen": 48, "skipped_steps": 0, "epoch": 1},
    "not an object": [6, 48, 0],
}


@pytest.mark.parametrize("lie", list(LYING_PROGRESS))
def test_a_manifest_that_vouches_for_a_bad_progress_record_fails_verification(straight, tmp_path, lie):
    """The manifest matches its files (rewritten after the edit), but progress.json does not describe
    this checkpoint: resuming it would crash mid-run, start at another step or read data from -48."""
    folder = shutil.copytree(straight[0] / "checkpoint-6", tmp_path / "checkpoint-6")
    (folder / "progress.json").write_text(json.dumps(LYING_PROGRESS[lie]))
    checkpoint.write_checkpoint_manifest(folder, 6)
    with pytest.raises(IntegrityError, match="progress.json"):
        verify(folder)


KILLED_WRITING_THE_MANIFEST = """
import os, signal, sys
from pathlib import Path
from atdiff.config import load_config
from atdiff.files import temp_path
from atdiff import integrity
from atdiff.training import train

calls = []
def write_atomic(path, text):  # the manifest of checkpoint-6: half of it on disk, then SIGKILL
    calls.append(path)
    if len(calls) == 2:
        temp_path(path).write_text(text[: len(text) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    write_atomic.__wrapped__(path, text)

write_atomic.__wrapped__ = integrity.write_atomic
integrity.write_atomic = write_atomic
train(load_config(sys.argv[1]))
"""


def test_kill_9_while_writing_the_manifest_then_resume(straight, tmp_path):
    """A real SIGKILL (no cleanup runs, the OS drops the lock) in the middle of the manifest."""
    out = tmp_path / "run"
    config = write_config(tiny(out), tmp_path / "run.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", KILLED_WRITING_THE_MANIFEST, str(config)], env=env, capture_output=True, text=True)
    assert done.returncode == -9, done.stderr[-2000:]
    assert [step for step, _ in list_checkpoints(out)] == [3]
    assert (out / ".atdiff-tmp-checkpoint-6" / ".atdiff-tmp-manifest.json").is_file()
    train(tiny(out), resume="latest")
    assert_same_run(straight[0], out)


def test_resume_from_a_path_that_fails_verification_is_one_line(straight, tmp_path, capsys):
    out = copy_run(straight[0], tmp_path)
    (out / "checkpoint-3" / "ema.safetensors").write_bytes(b"garbage")
    config = write_config(tiny(out), tmp_path / "run.yaml")
    assert main(["train", "--config", str(config), "--resume", str(out / "checkpoint-3")]) == 2
    assert "ema.safetensors has 7 bytes" in one_line_error(capsys)
    (out / "checkpoint-6" / "manifest.json").unlink()
    assert main(["train", "--config", str(config), "--resume", "latest"]) == 2
    assert "no checkpoint in" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-3", "checkpoint-6"]


def test_a_resume_path_that_is_no_checkpoint_is_refused_before_the_folder_exists(tmp_path, capsys):
    out = tmp_path / "new"
    config = write_config(tiny(out), tmp_path / "run.yaml")
    assert main(["train", "--config", str(config), "--resume", str(tmp_path / "nowhere" / "checkpoint-3")]) == 2
    assert "is not a checkpoint-<step> folder" in one_line_error(capsys)
    assert not out.exists()


def test_a_checkpoint_named_relative_to_the_run_says_its_path(straight, tmp_path, capsys, monkeypatch):
    out = copy_run(straight[0], tmp_path)
    monkeypatch.chdir(tmp_path)
    config = write_config(tiny(out), tmp_path / "run.yaml")
    assert main(["train", "--config", str(config), "--resume", "checkpoint-3"]) == 2
    assert f"pass --resume {out / 'checkpoint-3'}" in one_line_error(capsys)


def test_resuming_an_older_checkpoint_makes_it_the_head(straight, tmp_path, capsys):
    """Resume from step 3 of a run that reached 6 and stop at 4: `latest` is then 4, not the
    abandoned 6 (moved to abandoned/, not deleted)."""
    out = copy_run(straight[0], tmp_path)
    train(tiny(out, max_steps=4), resume=str(out / "checkpoint-3"))
    assert [step for step, _ in list_checkpoints(out)] == [3, 4]
    abandoned = list((out / ABANDONED).glob("atdiff-*/checkpoint-*"))
    assert [p.name for p in abandoned] == ["checkpoint-6"]
    verify(abandoned[0])  # intact, just out of the way: it can still be resumed with --resume PATH
    capsys.readouterr()
    result = train(tiny(out, max_steps=5), resume="latest")
    assert result.step == 5 and "checkpoint-4 (step 4)" in capsys.readouterr().out


def test_an_abandoned_checkpoint_is_checked_against_its_runs_config(straight, tmp_path):
    """An abandoned checkpoint is resumable by path, with the same model, objective and data only, and
    its EMA weights load as a pipeline: both read the run's config.yaml, three folders up."""
    out = copy_run(straight[0], tmp_path)
    train(tiny(out, max_steps=4), resume=str(out / "checkpoint-3"))
    abandoned = next((out / ABANDONED).glob("atdiff-*/checkpoint-6"))
    other = copy.deepcopy(TINY)
    other["objective"]["type"] = "ddpm"
    other["training"]["output_dir"] = str(tmp_path / "fork")
    with pytest.raises(UsageError, match=r"objective.type was 'flow_matching' there and is 'ddpm' now; the checkpoint's weights "
                                         r"were trained for this objective.*Resume with objective.type=flow_matching"):
        train(config_from_dict(other), resume=str(abandoned))
    assert checkpoint.pipeline_at_checkpoint(abandoned).num_classes == 10


def test_a_run_saved_before_a_key_existed_resumes(straight, tmp_path):
    """Keys added to atdiff since a run was saved compare at their defaults: a run of an older atdiff
    (here: before objective.distill_weight) still resumes, and a real change is still refused."""
    out = copy_run(straight[0], tmp_path)
    as_written_before_records(out / "checkpoint-6")
    saved = yaml.safe_load((out / "config.yaml").read_text())
    del saved["objective"]["distill_weight"], saved["objective"]["distill_from"]
    (out / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    other = copy.deepcopy(TINY)
    other["objective"]["num_train_timesteps"] = 500
    other["training"].update(output_dir=str(out), max_steps=7)
    with pytest.raises(UsageError, match=r"objective.num_train_timesteps was 1000 there and is 500 now"):
        train(config_from_dict(other), resume="latest")
    assert train(tiny(out, max_steps=7), resume="latest").step == 7


def as_written_before_records(folder: Path) -> None:
    """Make a checkpoint one of an atdiff that kept no config record in checkpoints (its manifest rewritten)."""
    for name in ("config.yaml", "config_history.json"):
        (folder / name).unlink()
    checkpoint.write_checkpoint_manifest(folder, checkpoint.checkpoint_step(folder))
    verify(folder)


# ------------------------------------------------------------------------------------------------
# Finite means good
# ------------------------------------------------------------------------------------------------


def test_a_diverging_run_keeps_only_finite_checkpoints(tmp_path, capsys):
    """learning_rate=1e9 without clipping: an update makes the weights non-finite while the loss
    that shows it is a step away. No checkpoint of bad weights is written; the last one loads."""
    out = tmp_path / "run"
    cfg = tiny(out, learning_rate=1e9, max_grad_norm=None, lr_warmup_steps=0, lr_scheduler="constant",
               checkpoint_every=1, max_steps=20, sample_every=0)
    with pytest.raises(TrainingDiverged) as diverged:
        train(cfg)
    checkpoints = list_checkpoints(out)
    last = checkpoints[-1][1]
    assert f"the last good checkpoint is {last}" in str(diverged.value)
    for _, folder in checkpoints:
        verify(folder)
        assert all_finite(load_file(folder / "model.safetensors").values())
        assert all_finite(load_tree(folder / "ema.safetensors")["shadow_params"])
    # It loads, as a pipeline and as a whole training state (whose next step diverges again: its
    # weights are finite, but huge).
    checkpoint.pipeline_at_checkpoint(last)
    capsys.readouterr()
    with pytest.raises(TrainingDiverged):
        train(cfg, resume="latest")
    assert f"resumed from {last}" in capsys.readouterr().out


def test_max_skipped_steps_skips_non_finite_steps_then_stops(tmp_path, monkeypatch, capsys):
    # Steps 2 and 4 get a NaN loss (each step is 2 micro-batches): both skipped, the run completes.
    nan_calls, calls, loss = {3, 7}, [], FlowMatchingObjective.loss

    def nan_on(self, model, x0, labels=None, images=None):
        calls.append(1)
        value = loss(self, model, x0, labels, images)
        return value * float("nan") if len(calls) in nan_calls else value

    monkeypatch.setattr(FlowMatchingObjective, "loss", nan_on)
    out = tmp_path / "run"
    result = train(tiny(out, max_skipped_steps=2))
    assert result.step == 6 and not result.interrupted
    err = capsys.readouterr().err
    assert "step 2: loss is nan; update skipped (1 of training.max_skipped_steps=2)" in err
    assert "step 4: loss is nan; update skipped (2 of training.max_skipped_steps=2)" in err
    assert json.loads((out / "checkpoint-6" / "progress.json").read_text())["skipped_steps"] == 2
    assert all_finite(load_file(out / "checkpoint-6" / "model.safetensors").values())

    calls.clear()
    with pytest.raises(TrainingDiverged, match="loss is nan at step 4.*max_skipped_steps \\(now 1\\)"):
        train(tiny(tmp_path / "again", max_skipped_steps=1))


def test_non_finite_gradients_are_not_applied(tmp_path, monkeypatch):
    """A finite loss with a NaN gradient (here: one parameter's gradient poisoned) skips the step."""
    clip, steps = Trainer.train_step, []

    def poisoned(self, batches, stop):
        steps.append(1)
        if len(steps) == 2:
            hook = next(self.state.network.parameters()).register_hook(lambda g: g * float("nan"))
            try:
                return clip(self, batches, stop)
            finally:
                hook.remove()
        return clip(self, batches, stop)

    monkeypatch.setattr(Trainer, "train_step", poisoned)
    with pytest.raises(TrainingDiverged, match="gradient norm is nan at step 2"):
        train(tiny(tmp_path / "run", checkpoint_every=1))
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [1]


# ------------------------------------------------------------------------------------------------
# One run per folder
# ------------------------------------------------------------------------------------------------


def test_a_second_process_is_refused_with_the_holders_pid(tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from atdiff.training.run_dir import run_lock\n"
         f"with run_lock(Path({str(out)!r})):\n    print('locked', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        config = write_config(tiny(out), tmp_path / "run.yaml")
        assert main(["train", "--config", str(config)]) == 2
        assert f"in use by another atdiff train (PID {holder.pid})" in one_line_error(capsys)
    finally:
        holder.kill()  # like a crash: the OS drops the lock
        holder.wait()
    with run_lock(out):
        assert (out / LOCK_NAME).read_text() == f"{os.getpid()}\n"


def children_of(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):  # ended meanwhile
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def test_a_killed_run_with_data_workers_resumes_at_once(tmp_path, capsys):
    """SIGKILL to a run whose DataLoader workers live on (they notice the parent's death only seconds
    later): the lock goes with the main process, so an immediate --resume is not refused."""
    out = tmp_path / "run"
    raw = tiny(out, max_steps=10_000).to_dict()
    raw["data"]["num_workers"] = 2
    config = write_config(config_from_dict(raw), tmp_path / "run.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen([sys.executable, "-m", "atdiff", "train", "--config", str(config)], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not list_checkpoints(out) and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        workers = children_of(run.pid)
        assert list_checkpoints(out) and len(workers) >= 2, run.stderr.read() if run.poll() is not None else "no checkpoint"
    finally:
        run.kill()
        run.wait()
    with run_lock(out):  # at once: the workers are still alive, and no longer hold anything
        assert any(Path(f"/proc/{pid}").exists() for pid in workers)
    step = list_checkpoints(out)[-1][0]
    raw["training"]["max_steps"] = step + 1
    assert main(["train", "--config", str(write_config(config_from_dict(raw), config)), "--resume", "latest"]) == 0
    assert f"resumed from {out / f'checkpoint-{step}'}" in capsys.readouterr().out


def folder_contents(folder: Path) -> list:
    """Every entry under ``folder`` with its bytes (the lock file's PID aside)."""
    return sorted((p.relative_to(folder), p.read_bytes() if p.is_file() else None) for p in folder.rglob("*") if p.name != LOCK_NAME)


def test_a_run_that_fills_the_folder_before_the_lock_is_taken_is_left_alone(straight, tmp_path, capsys, monkeypatch):
    """Two `atdiff train` started on one new folder: the second checks it while it is still empty,
    the first finishes, then the second gets the lock. It must refuse, not train over the first run."""
    out, lock = tmp_path / "run", run_dir.run_lock

    @contextmanager
    def first_run_finishes_meanwhile(folder: Path):
        shutil.copytree(straight[0], folder, dirs_exist_ok=True)
        before.extend(folder_contents(folder))
        with lock(folder):
            yield

    before = []
    monkeypatch.setattr(loop, "run_lock", first_run_finishes_meanwhile)
    assert main(["train", "--config", str(write_config(tiny(out), tmp_path / "run.yaml"))]) == 2
    assert "already holds a run" in one_line_error(capsys)
    assert folder_contents(out) == before


@pytest.mark.parametrize("resume", [None, "latest"])
def test_a_folder_that_is_not_a_run_is_left_alone(tmp_path, capsys, resume):
    out = tmp_path / "mine"
    (out / "model").mkdir(parents=True)
    (out / "model" / "weights.bin").write_bytes(b"precious")
    (out / "config.yaml").write_text("mine: true\n")
    (out / ".notes.tmp").write_text("mine too")
    before = sorted((p.relative_to(out), p.read_bytes() if p.is_file() else None) for p in out.rglob("*"))
    config = write_config(tiny(out), tmp_path / "run.yaml")
    assert main(["train", "--config", str(config), *(["--resume", resume] if resume else [])]) == 2
    assert "holds no atdiff run" in one_line_error(capsys)
    assert sorted((p.relative_to(out), p.read_bytes() if p.is_file() else None) for p in out.rglob("*")) == before


def test_pruning_leaves_a_linked_checkpoint_alone(straight, tmp_path):
    """A checkpoint folder linked into the run (say, to resume from a copy kept elsewhere) is not
    atdiff's to delete: pruning counts and removes only the checkpoints it wrote."""
    out = copy_run(straight[0], tmp_path)
    kept = shutil.move(out / "checkpoint-3", tmp_path / "kept-checkpoint-3")
    (out / "checkpoint-3").symlink_to(kept)
    before = sorted(p.name for p in Path(kept).iterdir())
    result = train(tiny(out, max_steps=9), resume="latest")
    assert result.step == 9 and (out / "model_index.json").is_file()
    assert [step for step, _ in list_checkpoints(out)] == [3, 6, 9] and (out / "checkpoint-3").is_symlink()
    assert sorted(p.name for p in Path(kept).iterdir()) == before


@pytest.mark.parametrize("link", ["symlink", "hard link"])
def test_a_lock_file_linked_to_a_users_file_is_not_written_through(straight, tmp_path, capsys, link):
    """A run folder from elsewhere whose lock file links to one of the user's files: taking the lock
    rewrites the file with the PID, so it is refused instead."""
    out = copy_run(straight[0], tmp_path)
    precious = tmp_path / "precious.txt"
    precious.write_text("the user's own")
    (out / LOCK_NAME).unlink()
    (out / LOCK_NAME).symlink_to(precious) if link == "symlink" else os.link(precious, out / LOCK_NAME)
    config = write_config(tiny(out), tmp_path / "run.yaml")
    assert main(["train", "--config", str(config), "--resume", "latest"]) == 2
    assert f"{out / LOCK_NAME} is " in one_line_error(capsys)
    assert precious.read_text() == "the user's own"


def test_a_sample_grid_name_linked_to_a_users_file_is_replaced_not_written_through(straight, tmp_path):
    out = copy_run(straight[0], tmp_path)
    precious = tmp_path / "precious.txt"
    precious.write_text("the user's own")
    (out / "samples" / "step-0000007.png").symlink_to(precious)
    train(tiny(out, max_steps=7), resume="latest")
    assert precious.read_text() == "the user's own"
    grid = out / "samples" / "step-0000007.png"
    assert not grid.is_symlink() and Image.open(grid).size == (2 * 32, 2 * 32)  # 4 images, 2 x 2


def test_a_temporary_name_linked_to_a_users_folder_removes_only_the_link(straight, tmp_path):
    out = copy_run(straight[0], tmp_path)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "keep.txt").write_text("the user's own")
    (out / ".atdiff-tmp-checkpoint-7").symlink_to(theirs)
    assert train(tiny(out, max_steps=7), resume="latest").step == 7
    assert (theirs / "keep.txt").read_text() == "the user's own" and not (out / ".atdiff-tmp-checkpoint-7").exists()


def test_the_final_pipeline_has_a_manifest_of_its_own_files(straight):
    """The pipeline's manifest lists its components, not the rest of the run folder (checkpoints, logs,
    samples, config.yaml), which keeps changing: resuming a finished run leaves the pipeline verifying."""
    out = straight[0]
    listed = json.loads((out / "manifest.json").read_text())["files"]
    components = [p.relative_to(out).as_posix() for folder in ("model", "scheduler") for p in (out / folder).iterdir()]
    assert sorted(listed) == sorted(["model_index.json", "pipeline.py", *components])
    assert (out / "checkpoint-6").is_dir() and (out / "config.yaml").is_file() and verify_pipeline(out)


def test_the_final_pipeline_is_replaced_whole(straight, tmp_path, monkeypatch):
    """Replacing a finished run's pipeline: whenever the folder has a model_index.json, it and every
    component are the new ones (never the old index with a new model, or a missing component)."""
    out = copy_run(straight[0], tmp_path)
    parts = ("model_index.json", "manifest.json", "model", "scheduler")
    old = {(out / p).stat().st_ino for p in parts}
    seen, replace = [], os.replace

    def watching(src, dst):
        replace(src, dst)
        if Path(dst).parent == out and (out / "model_index.json").exists():  # not the pipeline's own writes while staged
            seen.append(all((out / p).exists() and (out / p).stat().st_ino not in old for p in parts) and verify_pipeline(out))

    pipe = checkpoint.pipeline_at_checkpoint(out / "checkpoint-3")
    monkeypatch.setattr(run_dir.os, "replace", watching)
    run_dir.save_pipeline(out, pipe)
    monkeypatch.undo()
    assert seen and all(seen) and not list(out.glob(".atdiff-tmp-*"))
    assert ImageDiffusionPipeline.from_pretrained(out).num_classes == 10


# ------------------------------------------------------------------------------------------------
# An output folder that cannot take the run
# ------------------------------------------------------------------------------------------------


def test_an_output_dir_that_is_a_file(tmp_path, capsys):
    out = tmp_path / "run"
    out.write_text("a file")
    assert main(["train", "--config", str(write_config(tiny(out), tmp_path / "run.yaml"))]) == 2
    assert f"training.output_dir {out} is a file" in one_line_error(capsys)
    assert out.read_text() == "a file"


def test_a_read_only_output_dir(tmp_path, capsys, monkeypatch):
    """Permissions do not bind root (these tests often run as root), so the denial is simulated
    where atdiff first writes: the lock file."""
    out = tmp_path / "run"
    out.mkdir()
    opener = os.open

    def read_only(path, *args, **kwargs):
        if Path(path).name == LOCK_NAME:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return opener(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    assert main(["train", "--config", str(write_config(tiny(out), tmp_path / "run.yaml"))]) == 2
    assert f"cannot write to training.output_dir {out} ({out / LOCK_NAME}: Permission denied); pass a writable" in one_line_error(capsys)
    assert list(out.iterdir()) == []


def test_disk_full_while_saving_keeps_the_last_checkpoint(straight, tmp_path, monkeypatch, capsys):
    out, saves = tmp_path / "run", []
    save_model = checkpoint.save_model

    def full_at_step_6(model, filename, **kwargs):
        saves.append(filename)
        if len(saves) == 2:  # as safetensors reports it
            raise SafetensorError(f'Error while serializing: I/O error: No space left on device (os error 28) at path "{filename}"')
        return save_model(model, filename, **kwargs)

    monkeypatch.setattr(checkpoint, "save_model", full_at_step_6)
    config = write_config(tiny(out), tmp_path / "run.yaml")
    assert main(["train", "--config", str(config)]) == 2
    line = one_line_error(capsys)
    assert f"cannot write to training.output_dir {out} ({out}/.atdiff-tmp-checkpoint-6/model.safetensors: No space left on device); free some space" in line
    assert [step for step, _ in list_checkpoints(out)] == [3]
    assert not list(out.glob(".atdiff-tmp-*"))  # the half-written checkpoint's space is back at once
    verify(out / "checkpoint-3")

    monkeypatch.undo()  # space freed
    assert main(["train", "--config", str(config), "--resume", "latest"]) == 0
    assert_same_run(straight[0], out)


def test_disk_full_while_writing_the_final_pipeline_says_the_checkpoint_is_fine(straight, tmp_path, monkeypatch, capsys):
    out = copy_run(straight[0], tmp_path)
    for name in ("model_index.json", "manifest.json", "pipeline.py", "model", "scheduler"):  # as if training just ended
        run_dir.remove_temp(out / name)
    save_file = safetensors.torch.save_file

    def full(tensors, filename, **kwargs):
        raise SafetensorError(f'Error while serializing: I/O error: No space left on device (os error 28) at path "{filename}"')

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    config = out / "config.yaml"
    assert main(["train", "--config", str(config), "--output-dir", str(out), "--resume", "latest"]) == 2
    line = one_line_error(capsys)
    assert "No space left on device); free some space, then continue with --resume latest (the checkpoints saved so far are complete)" in line
    assert not list(out.glob(".atdiff-tmp-*")) and not (out / "model_index.json").exists()
    verify(out / "checkpoint-6")

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)  # space freed
    assert main(["train", "--config", str(config), "--output-dir", str(out), "--resume", "latest"]) == 0
    assert verify_pipeline(out)


# ------------------------------------------------------------------------------------------------
# Engines and models
# ------------------------------------------------------------------------------------------------


def tiny_unet(output_dir: Path, **model):
    raw = copy.deepcopy(TINY)
    raw["model"] = {"type": "unet", "sample_size": 32, "in_channels": 1, "out_channels": 1, "block_out_channels": [8, 16],
                    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
                    "layers_per_block": 1, "attention_head_dim": 8, "norm_num_groups": 4, "token_mixer": "atconv", **model}
    raw["training"].update(output_dir=str(output_dir), max_steps=2, checkpoint_every=0, sample_every=0)
    return config_from_dict(raw)


def test_a_class_conditional_diffusers_unet_trains(tmp_path):
    out = tmp_path / "run"
    train(tiny_unet(out, num_class_embeds=10))
    pipe = ImageDiffusionPipeline.from_pretrained(out)
    assert pipe.num_classes == 10
    images = pipe(batch_size=2, class_labels=[3, 4], num_inference_steps=2, output_type="pt").images
    assert images.shape == (2, 1, 32, 32)


def test_unet_conditioning_the_loop_cannot_feed_is_refused_up_front(tmp_path):
    with pytest.raises(UsageError, match="class_embed_type='timestep'"):
        train(tiny_unet(tmp_path / "run", class_embed_type="timestep"))
    with pytest.raises(UsageError, match="model.num_class_embeds=10"):
        train(tiny_unet(tmp_path / "run2", num_class_embeds=7))
