"""The training loop on a tiny DiT and real Fashion-MNIST: learning, exact resume, crash safety,
the pipeline folder it leaves, and a 2-process gloo run."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import DiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

from assets import needs_fashion_mnist, needs_inception_weights
from atdiff import integrity
from atdiff.cli import main
from atdiff.config import config_from_dict
from atdiff.errors import UsageError
from atdiff.objectives import FlowMatchingObjective
from atdiff.files import temp_path
from atdiff.eval.training_eval import TrainingEvaluator
from atdiff.training import TrainingDiverged, checkpoint, list_checkpoints, train

pytestmark = needs_fashion_mnist

# Everything that carries state across a resume is switched on: random flips, accumulation, a
# decaying LR with warm-up, EMA, label dropout and sample grids in the middle of the run.
TINY = {
    "model": {"type": "dit", "sample_size": 32, "patch_size": 8, "hidden_size": 32, "depth": 2, "num_heads": 2,
              "in_channels": 1, "num_classes": 10, "learn_sigma": False, "token_mixer": "atconv"},
    "objective": {"type": "flow_matching"},
    "data": {"dataset": "fashion-mnist", "split": "test", "resolution": 32, "random_flip": True},
    "training": {"max_steps": 6, "batch_size": 8, "gradient_accumulation_steps": 2, "learning_rate": 2e-3,
                 "lr_scheduler": "cosine", "lr_warmup_steps": 2, "ema_decay": 0.9, "checkpoint_every": 3,
                 "sample_every": 2, "num_sample_images": 4, "log_every": 2, "log_with": "none"},
    "sampling": {"num_inference_steps": 2},
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine spinning OpenMP workers slow
    them down tenfold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(output_dir: Path, **training):
    raw = copy.deepcopy(TINY)
    raw["training"].update(output_dir=str(output_dir), **training)
    return config_from_dict(raw)


def write_config(cfg, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a), load_file(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def assert_same_run(a: Path, b: Path, step: int = 6) -> None:
    assert_same_weights(a / f"checkpoint-{step}" / "model.safetensors", b / f"checkpoint-{step}" / "model.safetensors")
    assert_same_weights(a / "model" / "diffusion_pytorch_model.safetensors", b / "model" / "diffusion_pytorch_model.safetensors")  # EMA


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """One uninterrupted run, with TensorBoard logging on."""
    out = tmp_path_factory.mktemp("straight") / "run"
    result = train(tiny(out, log_with="tensorboard"))
    return out, result


def loss_counter(monkeypatch, action, at_call: int):
    """Wrap the objective's loss; ``action(loss)`` runs on call number ``at_call`` (2 calls a step)."""
    original, calls = FlowMatchingObjective.loss, []

    def loss(self, model, x0, labels=None, images=None):
        calls.append(1)
        value = original(self, model, x0, labels, images)
        return action(value) if len(calls) == at_call else value

    monkeypatch.setattr(FlowMatchingObjective, "loss", loss)


# ------------------------------------------------------------------------------------------------
# Learning and outputs
# ------------------------------------------------------------------------------------------------


def test_loss_goes_down(tmp_path):
    cfg = tiny(tmp_path / "run", max_steps=60, batch_size=16, gradient_accumulation_steps=1, lr_scheduler="constant", lr_warmup_steps=0,
               checkpoint_every=0, sample_every=0)
    result = train(cfg)
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-10:]) / 10
    assert len(result.losses) == 60 and last < 0.8 * first, (first, last)


def test_output_is_a_diffusers_pipeline_folder(straight):
    out, result = straight
    assert result.step == 6 and not result.interrupted
    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    images = pipe(batch_size=2, class_labels=[0, 1], num_inference_steps=2, output_type="pt").images
    assert images.shape == (2, 1, 32, 32)
    assert json.loads((out / "model_index.json").read_text())["_class_name"][1] == "ImageDiffusionPipeline"
    assert [step for step, _ in list_checkpoints(out)] == [3, 6]  # checkpoints_total_limit 2
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["token_mixer"] == "atconv"
    assert list((out / "logs").rglob("events.out.tfevents.*")), "TensorBoard wrote nothing"


def test_sample_grids(straight):
    out, _ = straight
    grids = sorted(p.name for p in (out / "samples").iterdir())
    assert grids == ["step-0000002.png", "step-0000004.png", "step-0000006.png"]
    assert Image.open(out / "samples" / grids[-1]).size == (64, 64)  # 4 images as 2 x 2


def test_training_stats(straight):
    out, _ = straight
    stats = json.loads((out / "training_stats.json").read_text())
    assert stats["steps"] == 6 and stats["images_seen"] == 48 and stats["num_processes"] == 1
    assert stats["params"] == sum(p.numel() for p in DiffusionPipeline.from_pretrained(out, trust_remote_code=True).model.parameters())
    assert stats["images_per_s"] > 0 and "evals" not in stats
    # the model's own memory (weights, AdamW and EMA state, a step's activations) is a few MB of this tiny
    # DiT; the process's peak RSS holds the interpreter, torch and the dataset as well
    resident = 4 * 4 * stats["params"]  # float32 weights, AdamW's two moments, the EMA copy
    assert resident <= stats["model_resident_mb"] * 2**20 <= 1.01 * resident + 1024
    assert stats["model_resident_mb"] < stats["model_memory_mb"] < 50 < stats["process_peak_mb"]
    wall = stats["wall_clock"]  # over the whole run: sample grids (steps 2, 4) and checkpoints (3) included
    assert wall["seconds"] > wall["sample_grids_s"] > 0 and wall["checkpoints_s"] > 0 and wall["evals_s"] == 0
    assert wall["images_per_s"] == pytest.approx(stats["images_seen"] / wall["seconds"])
    split = stats["time_split_s"]
    assert set(split) == {"data", "forward", "backward", "optimizer", "other"} and split["forward"] > 0
    assert sum(split.values()) == pytest.approx(stats["step_time_s"], rel=0.5)


@needs_inception_weights  # and Fashion-MNIST, like the whole module
def test_eval_during_training_leaves_training_bit_identical(straight, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("ATDIFF_CACHE", str(tmp_path / "cache"))  # reference statistics: not the user's cache
    out = tmp_path / "run"
    train(tiny(out, log_with="tensorboard", eval_every=3, eval_num_images=4, eval_num_real=8), evaluator=TrainingEvaluator)
    assert_same_run(straight[0], out)
    evals = json.loads((out / "training_stats.json").read_text())["evals"]
    assert [e["step"] for e in evals] == [3, 6]
    assert all(e["fid"] > 0 and "kid_mean" in e and e["num_fake"] == 4 and e["num_real"] == 8 for e in evals)
    assert evals[0]["sampling"]["num_inference_steps"] == 2  # the config's sampling section
    assert sorted(p.name for p in (out / "evals").iterdir()) == ["step-3.json", "step-6.json"]  # samples deleted
    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")))).Reload()
    assert [e.step for e in events.Scalars("eval/fid")] == [3, 6]
    assert [e.value for e in events.Scalars("eval/fid")] == pytest.approx([e["fid"] for e in evals])


def test_refuses_to_overwrite_a_run(straight):
    out, _ = straight
    with pytest.raises(UsageError, match="--resume latest"):
        train(tiny(out))


# ------------------------------------------------------------------------------------------------
# Resume and crash safety
# ------------------------------------------------------------------------------------------------


def test_ctrl_c_then_resume_latest_equals_the_straight_run(straight, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    config = write_config(tiny(out), tmp_path / "run.yaml")
    # Ctrl-C in the middle of step 3 (its second micro-batch): the step finishes, is saved, the run stops.
    loss_counter(monkeypatch, lambda loss: os.kill(os.getpid(), signal.SIGINT) or loss, at_call=6)
    assert main(["train", "--config", str(config)]) == 130
    assert [step for step, _ in list_checkpoints(out)] == [3] and not (out / "model_index.json").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored

    monkeypatch.undo()
    assert main(["train", "--config", str(config), "--resume", "latest"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert_same_run(straight[0], out)
    assert (out / "samples" / "step-0000004.png").read_bytes() == (straight[0] / "samples" / "step-0000004.png").read_bytes()


def test_resume_from_a_checkpoint_path(straight, tmp_path):
    result = train(tiny(tmp_path / "run"), resume=str(straight[0] / "checkpoint-3"))
    assert result.step == 6
    assert_same_run(straight[0], tmp_path / "run")


class Killed(BaseException):
    """Stands in for SIGKILL: nothing after it runs (not even `except Exception`)."""


def half_written(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


@pytest.mark.parametrize("killed_in", ["weights", "manifest"])
def test_a_killed_save_leaves_the_previous_checkpoint(straight, tmp_path, monkeypatch, killed_in):
    """A kill while writing the weights, or while writing the manifest (the last file), of
    checkpoint-6 leaves checkpoint-3 as the latest; resuming from it ends as the straight run."""
    out, calls = tmp_path / "run", []
    module, name = {"weights": (checkpoint, "save_model"), "manifest": (integrity, "write_atomic")}[killed_in]
    original = getattr(module, name)

    def dies_at_step_6(target, payload, **kwargs):
        calls.append(1)
        if len(calls) < 2:
            return original(target, payload, **kwargs)
        if killed_in == "weights":  # save_model(network, filename): half the file is on disk
            original(target, payload, **kwargs)
            half_written(Path(payload))
        else:  # write_atomic(path, text): half the text in the temporary file, not yet renamed
            temp_path(target).write_text(payload[: len(payload) // 2])
        raise Killed

    monkeypatch.setattr(module, name, dies_at_step_6)
    with pytest.raises(Killed):
        train(tiny(out))
    assert [step for step, _ in list_checkpoints(out)] == [3]
    assert (out / ".atdiff-tmp-checkpoint-6").is_dir()

    monkeypatch.undo()
    train(tiny(out), resume="latest")
    assert not (out / ".atdiff-tmp-checkpoint-6").exists()
    assert_same_run(straight[0], out)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    config = write_config(tiny(out, checkpoint_every=2), tmp_path / "run.yaml")
    loss_counter(monkeypatch, lambda loss: loss * float("nan"), at_call=5)  # step 3
    assert main(["train", "--config", str(config)]) == 1
    message = capsys.readouterr().out
    assert "at step 3" in message and "checkpoint-2" in message
    assert [step for step, _ in list_checkpoints(out)] == [2] and not (out / "model_index.json").exists()
    monkeypatch.undo()
    loss_counter(monkeypatch, lambda loss: loss * float("inf"), at_call=5)
    with pytest.raises(TrainingDiverged, match="step 3"):
        train(tiny(tmp_path / "again", checkpoint_every=2))


def test_resume_refuses_another_model(straight, tmp_path):
    raw = copy.deepcopy(TINY)
    raw["model"]["token_mixer"] = "attention"
    raw["training"]["output_dir"] = str(tmp_path / "run")
    with pytest.raises(UsageError, match="model.token_mixer"):
        train(config_from_dict(raw), resume=str(straight[0] / "checkpoint-3"))


def test_fp16_needs_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("fp16 is valid here: this machine has a GPU")
    with pytest.raises(UsageError, match="training.mixed_precision=fp16"):
        train(tiny(tmp_path / "run", mixed_precision="fp16"))
    assert not (tmp_path / "run").exists()


def test_resume_errors(tmp_path):
    with pytest.raises(UsageError, match="checkpoint-<step>"):
        train(tiny(tmp_path / "run"), resume=str(tmp_path))


# ------------------------------------------------------------------------------------------------
# Several processes
# ------------------------------------------------------------------------------------------------


def test_two_processes_over_gloo(tmp_path):
    out = tmp_path / "run"
    config = write_config(tiny(out, max_steps=4, checkpoint_every=2, sample_every=0), tmp_path / "run.yaml")
    # On a machine without a visible GPU, `--multi_gpu` starts processes that atdiff puts on the CPU
    # with gloo (`--cpu` alone starts one process unless MPI is installed).
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    # `python -m` rather than the `accelerate` script: a venv that inherits its packages has no script.
    command = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "atdiff", "train", "--config", str(config)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    stats = json.loads((out / "training_stats.json").read_text())
    assert stats["num_processes"] == 2 and stats["images_seen"] == 32
    assert sorted(p.name for p in (out / "checkpoint-4").glob("rng-*")) == ["rng-0.safetensors", "rng-1.safetensors"]
    assert (out / "model_index.json").is_file() and [s for s, _ in list_checkpoints(out)] == [2, 4]
