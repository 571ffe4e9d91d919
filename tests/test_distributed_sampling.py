"""`atdiff sample` under `accelerate launch`: the files of one process, whatever the number of processes;
resumable npz outputs streamed from their PNGs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from diffusers import DDPMScheduler
from PIL import Image

from assets import needs_inception_weights
from atdiff.cli import main
from atdiff.eval.npz_images import NpzImages
from atdiff.generation.folder import SETTINGS_FILE
from atdiff.pipelines import ImageDiffusionPipeline
from test_pipelines import tiny_dit


@pytest.fixture(scope="module")
def ddpm_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddpm")
    ImageDiffusionPipeline(model=tiny_dit(), scheduler=DDPMScheduler()).save_pretrained(folder)
    return folder


def sample(pipeline_dir, out, *flags: str) -> int:
    return main(["sample", str(pipeline_dir), "--out", str(out), "--steps", "3", "--scheduler", "ddpm", "--device", "cpu", *flags])


def launched_sample(pipeline_dir, out, processes: int, *flags: str) -> subprocess.CompletedProcess:
    # Without a visible GPU, `--multi_gpu` starts processes that atdiff runs on the CPU over gloo.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "atdiff", "sample", str(pipeline_dir), "--out", str(out), "--steps", "3", "--scheduler", "ddpm", *flags]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def pngs(folder) -> dict[str, bytes]:
    return {p.name: np.asarray(Image.open(p)).tobytes() for p in sorted(folder.glob("*.png"))}


def test_two_processes_write_what_one_writes(ddpm_dir, tmp_path):
    # 7 images: uneven shards (4 and 3), and other batches than the one-process run's.
    assert sample(ddpm_dir, tmp_path / "one", "--num-images", "7", "--batch-size", "2") == 0
    done = launched_sample(ddpm_dir, tmp_path / "two", 2, "--num-images", "7", "--batch-size", "3")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("sampled 7 images") == 1 and "on 2 processes" in done.stdout  # the main process reports
    one, two = pngs(tmp_path / "one"), pngs(tmp_path / "two")
    assert len(one) == 7 and one == two
    assert json.loads((tmp_path / "one" / SETTINGS_FILE).read_text()) == json.loads((tmp_path / "two" / SETTINGS_FILE).read_text())

    done = launched_sample(ddpm_dir, tmp_path / "two.npz", 2, "--num-images", "7")
    assert done.returncode == 0, done.stderr[-3000:]
    assert sample(ddpm_dir, tmp_path / "one.npz", "--num-images", "7") == 0
    with np.load(tmp_path / "one.npz") as a, np.load(tmp_path / "two.npz") as b:
        assert a["arr_0"].tobytes() == b["arr_0"].tobytes() and a["arr_1"].tolist() == b["arr_1"].tolist()
    assert not (tmp_path / "two.npz.partial").exists()


def test_npz_is_streamed_in_the_adm_layout(ddpm_dir, tmp_path):
    out = tmp_path / "s.npz"
    assert sample(ddpm_dir, out, "--num-images", "5", "--class-labels", "2", "1") == 0
    with np.load(out, allow_pickle=False) as data:
        assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (5, 8, 8, 1)
        assert data["arr_1"].tolist() == [2, 1, 2, 1, 2]
        assert json.loads(str(data["atdiff_sample"]))["num_images"] == 5
    images = NpzImages(out, "arr_0")
    assert images._array is not None  # stored uncompressed: memory-mapped, never read whole
    with np.load(out) as data:
        assert images[4].permute(1, 2, 0).numpy().tobytes() == data["arr_0"][4].tobytes()


def test_a_killed_npz_run_resumes_from_its_images(ddpm_dir, tmp_path, capsys):
    full = tmp_path / "full.npz"
    assert sample(ddpm_dir, full, "--num-images", "4") == 0
    out = tmp_path / "s.npz"
    partial = tmp_path / "s.npz.partial"
    assert sample(ddpm_dir, partial.with_name("folder"), "--num-images", "4") == 0  # a stand-in to copy from
    # What a run killed after two images leaves: its record and images 0 and 2.
    partial.mkdir()
    record = json.loads((partial.with_name("folder") / SETTINGS_FILE).read_text())
    (partial / SETTINGS_FILE).write_text(json.dumps({**record, "num_images": 4}))
    for name in ("000000.png", "000002.png"):
        (partial / name).write_bytes((partial.with_name("folder") / name).read_bytes())
    capsys.readouterr()
    assert sample(ddpm_dir, out, "--num-images", "4") == 0
    assert "sampled 2 images" in capsys.readouterr().out
    with np.load(full) as a, np.load(out) as b:
        assert a["arr_0"].tobytes() == b["arr_0"].tobytes()


def test_resuming_with_another_count_is_refused_naming_it(ddpm_dir, tmp_path, capsys):
    partial = tmp_path / "s.npz.partial"
    assert sample(ddpm_dir, partial, "--num-images", "2") == 0  # a folder run, then a different one-file run
    record = json.loads((partial / SETTINGS_FILE).read_text())
    (partial / SETTINGS_FILE).write_text(json.dumps({**record, "num_images": 2}))
    capsys.readouterr()
    assert sample(ddpm_dir, tmp_path / "s.npz", "--num-images", "3") == 2
    err = capsys.readouterr().err
    assert "holds images sampled with other settings (num_images: 2 -> 3)" in err and "Traceback" not in err
    assert not (tmp_path / "s.npz").exists() and sorted(p.name for p in partial.glob("*.png")) == ["000000.png", "000001.png"]


@needs_inception_weights
def test_fid_of_a_pipeline_under_two_processes_is_the_one_process_fid(ddpm_dir, tmp_path, capsys):
    real = tmp_path / "real"
    real.mkdir()
    rng = np.random.default_rng(0)
    for i in range(9):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(real / f"{i:06d}.png")
    pipelines = {n: shutil.copytree(ddpm_dir, tmp_path / f"pipe-{n}") for n in (1, 2)}  # each samples its own fid_samples/
    args = lambda pipe: ["fid", str(real), str(pipe), "--num-fake", "7", "--sfid", "--no-cache", "--steps", "3",  # noqa: E731
                         "--scheduler", "ddpm", "--sample-batch-size", "3"]
    assert main(args(pipelines[1])) == 0
    alone = json.loads(capsys.readouterr().out)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "atdiff", *args(pipelines[2])]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("{")]
    together = json.loads(line)
    for key in ("fid", "sfid"):
        assert together[key] == pytest.approx(alone[key], rel=1e-4, abs=1e-7), key
    (one,), (two,) = (list((p / "fid_samples").iterdir()) for p in pipelines.values())
    assert one.name == two.name and pngs(one) == pngs(two) and len(pngs(one)) == 7


def test_tf32_is_a_recorded_setting_in_effect_while_drawing(ddpm_dir, tmp_path, capsys, monkeypatch):
    import torch

    from atdiff.generation import drawing

    seen = []
    call = ImageDiffusionPipeline.__call__

    def spy(self, *args, **kwargs):
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        return call(self, *args, **kwargs)

    monkeypatch.setattr(ImageDiffusionPipeline, "__call__", spy)
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    assert sample(ddpm_dir, tmp_path / "a", "--num-images", "2", "--no-tf32") == 0
    assert sample(ddpm_dir, tmp_path / "b", "--num-images", "2") == 0
    assert seen == [(False, False), (True, True)]
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before  # restored after
    assert json.loads((tmp_path / "a" / SETTINGS_FILE).read_text())["tf32"] is False
    capsys.readouterr()
    assert sample(ddpm_dir, tmp_path / "a", "--num-images", "3") == 2  # tf32 on now: not the folder's images
    assert "(tf32: False -> True)" in capsys.readouterr().err
    assert drawing.SamplingConfig(tf32=False).folder_name().endswith("-no-tf32")


def test_a_launch_refuses_a_foreign_image_in_its_partial_folder_naming_it(ddpm_dir, tmp_path):
    # A killed npz run's folder, complete, with image 1 replaced by a 16-bit PNG: only the main process
    # reads the images (to assemble the npz); the launch must end, naming the file, keeping the folder.
    partial = tmp_path / "s.npz.partial"
    assert sample(ddpm_dir, partial, "--num-images", "2") == 0
    record = json.loads((partial / SETTINGS_FILE).read_text())
    (partial / SETTINGS_FILE).write_text(json.dumps({**record, "num_images": 2}))
    Image.fromarray(np.full((8, 8), 1000, np.uint16)).save(partial / "000001.png")
    done = launched_sample(ddpm_dir, tmp_path / "s.npz", 2, "--num-images", "2")
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("atdiff sample: error:")]
    assert errors == [f"atdiff sample: error: {partial / '000001.png'} is a PNG image in mode I;16, not an 8-bit gray or RGB PNG "
                      "as `atdiff sample` writes; delete it and rerun to sample it again"], done.stderr[-3000:]
    assert not (tmp_path / "s.npz").exists() and sorted(p.name for p in partial.glob("*.png")) == ["000000.png", "000001.png"]


def test_a_linked_partial_folder_is_unlinked_never_emptied(ddpm_dir, tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "s.npz.partial").symlink_to(target, target_is_directory=True)
    assert sample(ddpm_dir, tmp_path / "s.npz", "--num-images", "2") == 0
    assert (tmp_path / "s.npz").is_file() and not (tmp_path / "s.npz.partial").exists()
    assert sorted(p.name for p in target.iterdir()) == ["000000.png", "000001.png", SETTINGS_FILE]  # what the link led to stays
