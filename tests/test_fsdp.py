"""FSDP2 through ``accelerate launch``: two CPU processes over gloo, set up by an ``accelerate config``
file, train as DDP does, write DDP's files, and resume exactly; settings atdiff cannot checkpoint are
refused before any work."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from assets import needs_fashion_mnist
from atdiff.cli import main
from atdiff.training import list_checkpoints
from atdiff.training.checkpoint import ABANDONED
from atdiff.training.tensor_tree import load_tree
from test_run_safety import one_line_error
from test_training import one_thread, tiny, write_config  # noqa: F401

pytestmark = needs_fashion_mnist

# What `accelerate config` writes for FSDP2, each DiT block its own unit (DiTModel._no_split_modules).
FSDP_CONFIG = {
    "compute_environment": "LOCAL_MACHINE", "distributed_type": "FSDP", "num_machines": 1, "num_processes": 2,
    "machine_rank": 0, "mixed_precision": "no", "use_cpu": False,
    "fsdp_config": {"fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "fsdp_reshard_after_forward": True,
                    "fsdp_state_dict_type": "FULL_STATE_DICT"},
}
WEIGHTS = Path("model") / "diffusion_pytorch_model.safetensors"
STATE_FILES = ("model.safetensors", "ema.safetensors", "optimizer.safetensors", "scheduler.safetensors")


def launch(tmp_path: Path, config: Path, *engine: str, resume: Path | None = None) -> None:
    """``accelerate launch`` two processes; with no GPU visible atdiff puts them on the CPU over gloo."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    command = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", *engine, "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "atdiff", "train", "--config", str(config), *(["--resume", str(resume)] if resume else [])]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_fsdp2_trains_as_ddp_does_and_resumes_exactly(tmp_path):
    fsdp_config = tmp_path / "fsdp.yaml"
    fsdp_config.write_text(yaml.safe_dump(FSDP_CONFIG))
    fsdp_run = ("--config_file", str(fsdp_config))
    # Grids and checkpoints in the middle: the EMA is gathered to sample and saved mid-run.
    settings = dict(max_steps=4, checkpoint_every=2, sample_every=2)
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    launch(tmp_path, write_config(tiny(ddp, **settings), tmp_path / "ddp.yaml"), "--multi_gpu")
    launch(tmp_path, write_config(tiny(fsdp, **settings), tmp_path / "fsdp-run.yaml"), *fsdp_run)

    stats = yaml.safe_load((fsdp / "training_stats.json").read_text())
    assert stats["sharding"] == "fsdp2" and stats["num_processes"] == 2 and stats["model"]["class"] == "DiTModel"
    # The same pipeline folder and checkpoints as DDP's, with weights equal to float tolerance.
    assert files(fsdp) == files(ddp)
    assert_close_weights(fsdp / WEIGHTS, ddp / WEIGHTS)
    # The optimizer state is stored in DDP's layout (parameters by index), gathered whole.
    ddp_optimizer, fsdp_optimizer = load_tree(ddp / "checkpoint-4/optimizer.safetensors"), load_tree(fsdp / "checkpoint-4/optimizer.safetensors")
    assert fsdp_optimizer["param_groups"] == ddp_optimizer["param_groups"]
    for index, values in ddp_optimizer["state"].items():
        for name, value in values.items():
            torch.testing.assert_close(fsdp_optimizer["state"][index][name], value, rtol=1e-4, atol=1e-5)

    # Stopped at checkpoint-2 and resumed: the later line moves aside, and the new one ends bit-identical to it.
    uninterrupted = {name: (fsdp / "checkpoint-4" / name).read_bytes() for name in STATE_FILES}
    final = (fsdp / WEIGHTS).read_bytes()
    launch(tmp_path, tmp_path / "fsdp-run.yaml", *fsdp_run, resume=fsdp / "checkpoint-2")
    assert (fsdp / ABANDONED).is_dir() and [s for s, _ in list_checkpoints(fsdp)] == [2, 4]
    assert {name: (fsdp / "checkpoint-4" / name).read_bytes() for name in STATE_FILES} == uninterrupted
    assert (fsdp / WEIGHTS).read_bytes() == final

    # One format: DDP's checkpoint resumes under FSDP and ends where DDP did.
    shutil.copytree(ddp, crossed := tmp_path / "crossed")
    launch(tmp_path, write_config(tiny(crossed, **settings), tmp_path / "crossed.yaml"), *fsdp_run, resume=crossed / "checkpoint-2")
    assert yaml.safe_load((crossed / "training_stats.json").read_text())["sharding"] == "fsdp2"
    assert_close_weights(crossed / WEIGHTS, ddp / WEIGHTS)


def assert_close_weights(a: Path, b: Path) -> None:
    """Equal to float tolerance: FSDP reduce-scatters the gradients where DDP all-reduces them."""
    weights_a, weights_b = load_file(a), load_file(b)
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        torch.testing.assert_close(weights_a[key], weights_b[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("environment, message", [
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, "DeepSpeed is not supported by atdiff train (ACCELERATE_USE_DEEPSPEED is set"),
    ({"ACCELERATE_USE_MEGATRON_LM": "true"}, "Megatron-LM is not supported by atdiff train"),
    ({"ACCELERATE_USE_FSDP": "true"}, "FSDP version 1 is not supported by atdiff train"),  # Accelerate's default
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_OFFLOAD_PARAMS": "true"}, "fsdp_offload_params (FSDP_OFFLOAD_PARAMS) is not supported"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_ACTIVATION_CHECKPOINTING": "true"}, "training.gradient_checkpointing: true"),
])
def test_engines_and_fsdp_settings_atdiff_cannot_checkpoint_are_refused_up_front(tmp_path, monkeypatch, capsys, environment, message):
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)  # what `accelerate launch` sets from `accelerate config`
    out = tmp_path / "run"
    assert main(["train", "--config", str(write_config(tiny(out), tmp_path / "run.yaml"))]) == 2
    assert message in one_line_error(capsys)
    assert not out.exists()


def test_repa_under_fsdp_is_refused_up_front(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    out = tmp_path / "run"
    raw = tiny(out).to_dict()
    # Refused before the encoder is loaded: the folder need not exist.
    raw["objective"].update(repa_encoder=str(tmp_path / "encoder"), repa_encoder_depth=1, repa_projector_dim=8)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(config)]) == 2
    assert "objective.repa_encoder with FSDP" in one_line_error(capsys)
    assert not out.exists()
