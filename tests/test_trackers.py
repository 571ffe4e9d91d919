"""The tracker of a run (training.log_with): sample grids reach TensorBoard and wandb at the steps they
are made, and a tracker whose package is missing is refused before anything is written."""

from __future__ import annotations

import importlib.util
import io

import accelerate.tracking
import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from assets import needs_fashion_mnist
from atdiff.cli import main
from atdiff.training import train
from test_training import one_thread, tiny, write_config  # noqa: F401 (one_thread: an autouse fixture)

pytestmark = needs_fashion_mnist


def assert_grids_logged(out, logged: dict[int, Image.Image]) -> None:
    """``logged`` (step -> image the tracker holds) are exactly the run's sample grids."""
    grids = sorted(int(p.stem.removeprefix("step-")) for p in (out / "samples").glob("step-*.png"))
    assert sorted(logged) == grids == [2, 4]
    for step, image in logged.items():
        saved = Image.open(out / "samples" / f"step-{step:07d}.png").convert("RGB")
        assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(saved)), f"step {step}"


def test_sample_grids_reach_tensorboard(tmp_path):
    out = tmp_path / "run"
    train(tiny(out, log_with="tensorboard", max_steps=4, checkpoint_every=0))  # grids at steps 2 and 4 (the end)
    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*"))), size_guidance={"images": 0}).Reload()
    assert_grids_logged(out, {e.step: Image.open(io.BytesIO(e.encoded_image_string)) for e in events.Images("samples")})
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4]


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed: pip install 'atdiff[wandb]' (the test extra has it)")
def test_sample_grids_reach_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # no account, no network: the run is written to WANDB_DIR
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    train(tiny(out, log_with="wandb", max_steps=4, checkpoint_every=0))
    [run] = (tmp_path / "wandb").glob("offline-run-*")
    # wandb keeps each logged image as files/media/images/<key>_<step>_<hash>.png
    images = (run / "files" / "media" / "images").glob("samples_*.png")
    assert_grids_logged(out, {int(p.name.split("_")[1]): Image.open(p) for p in images})


def test_a_tracker_that_is_not_installed_stops_before_the_run(tmp_path, monkeypatch, capsys):
    """Accelerate would drop it with a warning and train to the end with no logs."""
    installed = [t for t in accelerate.tracking.get_available_trackers() if t.value != "wandb"]
    monkeypatch.setattr(accelerate.tracking, "_available_trackers", installed)
    out = tmp_path / "run"
    config = write_config(tiny(out, log_with="wandb"), tmp_path / "run.yaml")
    assert main(["train", "--config", str(config)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "training.log_with=wandb" in error and "pip install 'atdiff[wandb]'" in error
    assert not out.exists()
