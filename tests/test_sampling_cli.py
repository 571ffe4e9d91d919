"""`atdiff sample`: PNG folder, grid and npz outputs, resumable filling, and its error messages."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from safetensors.torch import load_file, save_file

from atdiff import DiTModel
from atdiff.cli import main
from atdiff.files import temp_path
from atdiff.integrity import write_pipeline_manifest
from atdiff.pipelines import ImageDiffusionPipeline
from test_pipelines import tampered_copy, tiny_dit

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ddpm_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddpm")
    ImageDiffusionPipeline(model=tiny_dit(), scheduler=DDPMScheduler()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def flow_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flow")
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    ImageDiffusionPipeline(model=tiny_dit(num_classes=0), scheduler=scheduler).save_pretrained(folder)
    return folder


def sample(pipeline_dir, out, *flags: str) -> int:
    return main(["sample", str(pipeline_dir), "--out", str(out), "--steps", "3", "--device", "cpu", *flags])


def read_pngs(folder, count: int) -> np.ndarray:
    return np.stack([np.asarray(Image.open(folder / f"{i:06d}.png")) for i in range(count)])


def error_of(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# ------------------------------------------------------------------------------------------------
# Outputs
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    """What `atdiff train` writes for a two-step run of a tiny class-conditional flow-matching DiT."""
    folder = tmp_path_factory.mktemp("trained")
    tiny = ["model.size=null", "model.hidden_size=32", "model.depth=2", "model.num_heads=2", "model.patch_size=4"]
    quick = ["training.num_sample_images=4", "training.log_with=none", "sampling.num_inference_steps=2"]
    config = REPO / "configs" / "fashion-mnist-dit-t4-atconv.yaml"
    argv = ["train", "--config", str(config), "--output-dir", str(folder), "--max-steps", "2", "--batch-size", "4"]
    assert main([*argv, *tiny, *quick]) == 0
    return folder


def test_freshly_trained_folder_loads_and_samples(trained_dir, tmp_path):
    pipe = DiffusionPipeline.from_pretrained(trained_dir, trust_remote_code=True)
    assert type(pipe) is ImageDiffusionPipeline and isinstance(pipe.model, DiTModel)
    assert pipe.config.prediction_type == "flow_prediction" and pipe.num_classes == 10
    assert sample(trained_dir, tmp_path / "s.npz", "--num-images", "3", "--scheduler", "heun", "--guidance", "2") == 0
    with np.load(tmp_path / "s.npz") as data:
        assert data["arr_0"].shape == (3, 32, 32, 1) and data["arr_1"].tolist() == [0, 1, 2]


def test_run_folder_samples_with_its_own_sampling_section_unless_flags_override(trained_dir, tmp_path):
    def record(out, *flags):
        assert main(["sample", str(trained_dir), "--out", str(out), "--num-images", "1", "--device", "cpu", *flags]) == 0
        return json.loads((out / "atdiff_sample.json").read_text())

    # the run's config.yaml: sampling.num_inference_steps=2 (override at training), guidance_scale 3.0 (config file)
    own = record(tmp_path / "own")
    assert (own["num_inference_steps"], own["guidance_scale"], own["scheduler"], own["seed"]) == (2, 3.0, None, 0)
    flagged = record(tmp_path / "flagged", "--steps", "1", "--guidance", "1", "--scheduler", "heun")
    assert (flagged["num_inference_steps"], flagged["guidance_scale"], flagged["scheduler"]) == (1, 1.0, "heun")


@pytest.mark.parametrize("scheduler", ["sde", "ode-dopri5"])
def test_sit_samplers_from_the_command_line(trained_dir, tmp_path, scheduler):
    out = tmp_path / "s.npz"
    assert sample(trained_dir, out, "--num-images", "2", "--scheduler", scheduler, "--guidance", "2", "--guidance-channels", "1") == 0
    with np.load(out) as data:
        assert data["arr_0"].shape == (2, 32, 32, 1)


def test_guidance_channels_beyond_the_models(trained_dir, tmp_path, capsys):
    assert sample(trained_dir, tmp_path / "x", "--num-images", "1", "--guidance", "2", "--guidance-channels", "2") == 2
    assert "guidance_channels=2: must be between 1 and the model's 1 channels" in error_of(capsys)


def test_png_folder_is_filled_resumably(ddpm_dir, tmp_path, capsys):
    out = tmp_path / "pngs"
    assert sample(ddpm_dir, out, "--num-images", "5", "--batch-size", "2", "--scheduler", "ddpm") == 0
    assert "sampled 5 images" in capsys.readouterr().out
    one_shot = read_pngs(out, 5)
    assert one_shot.shape == (5, 8, 8) and one_shot.std() > 0

    # An interrupted run: two images missing, one half-written temporary file.
    (out / "000001.png").unlink()
    (out / "000003.png").unlink()
    temp_path(out / "000003.png").write_bytes(b"\x89PNG trunc")
    capsys.readouterr()
    assert sample(ddpm_dir, out, "--num-images", "5", "--batch-size", "4", "--scheduler", "ddpm") == 0
    assert "sampled 2 images" in capsys.readouterr().out
    # Same images whatever the batching (up to float rounding between batch sizes).
    assert np.abs(read_pngs(out, 5).astype(int) - one_shot).max() <= 1

    assert sample(ddpm_dir, out, "--num-images", "5", "--scheduler", "ddpm") == 0
    assert "nothing to sample" in capsys.readouterr().out
    assert sample(ddpm_dir, out, "--num-images", "7", "--scheduler", "ddpm") == 0  # more images: adds 2
    assert "sampled 2 images" in capsys.readouterr().out


def test_sampling_prints_images_per_second(ddpm_dir, tmp_path, capsys):
    assert sample(ddpm_dir, tmp_path / "pngs", "--num-images", "2") == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("sampled 2 images in")


def test_grid_png(ddpm_dir, tmp_path):
    out = tmp_path / "grid.png"
    assert sample(ddpm_dir, out, "--num-images", "5", "--guidance", "2") == 0
    grid = Image.open(out)
    # 5 images of 8x8 in 3 columns x 2 rows with 2-pixel padding.
    assert grid.size == (3 * 10 + 2, 2 * 10 + 2)
    assert not (tmp_path / "grid.png.partial").exists()


def test_jpeg_grid(ddpm_dir, tmp_path):
    out = tmp_path / "grid.jpg"
    assert sample(ddpm_dir, out, "--num-images", "4") == 0
    with Image.open(out) as grid:
        assert grid.format == "JPEG" and grid.size == (2 * 10 + 2, 2 * 10 + 2)
    assert not (tmp_path / "grid.jpg.partial").exists()


@pytest.mark.parametrize("name", ["grid.png", "grid.jpg", "samples.npz"])
def test_grid_or_npz_of_other_settings_is_refused(ddpm_dir, tmp_path, capsys, name):
    out = tmp_path / name
    assert sample(ddpm_dir, out, "--num-images", "2", "--seed", "1") == 0
    written = out.read_bytes()
    assert sample(ddpm_dir, out, "--num-images", "2", "--seed", "1") == 0
    assert "already holds these 2 images; nothing to sample" in capsys.readouterr().out
    assert sample(ddpm_dir, out, "--num-images", "2", "--seed", "2") == 2
    assert "holds images sampled with other settings (seed: 1 -> 2)" in error_of(capsys)
    assert sample(ddpm_dir, out, "--num-images", "3", "--seed", "1") == 2
    assert "(num_images: 2 -> 3)" in error_of(capsys)
    assert out.read_bytes() == written


@pytest.mark.parametrize("name", ["photo.png", "photo.jpg", "data.npz"])
def test_file_not_written_by_atdiff_sample_is_refused(ddpm_dir, tmp_path, capsys, name):
    out = tmp_path / name
    if name.endswith(".npz"):
        np.savez(out, arr_0=np.zeros((1, 8, 8, 1), np.uint8))
    else:
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(out)
    written = out.read_bytes()
    assert sample(ddpm_dir, out, "--num-images", "1") == 2
    assert "exists and was not written by `atdiff sample`; use a new --out" in error_of(capsys)
    assert out.read_bytes() == written


def test_npz_matches_png_folder_with_labels(ddpm_dir, tmp_path):
    flags = ("--num-images", "4", "--class-labels", "2", "0", "--seed", "7")
    assert sample(ddpm_dir, tmp_path / "a.npz", *flags) == 0
    assert sample(ddpm_dir, tmp_path / "pngs", *flags) == 0
    with np.load(tmp_path / "a.npz") as data:
        images, labels = data["arr_0"], data["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (4, 8, 8, 1)
    assert labels.tolist() == [2, 0, 2, 0]
    np.testing.assert_array_equal(images[..., 0], read_pngs(tmp_path / "pngs", 4))


def test_unconditional_flow_model_npz_has_no_labels(flow_dir, tmp_path):
    for scheduler in ("euler", "heun", "dpm++"):
        out = tmp_path / f"{scheduler}.npz"
        assert sample(flow_dir, out, "--num-images", "2", "--scheduler", scheduler) == 0
        with np.load(out) as data:
            assert sorted(data) == ["arr_0", "atdiff_sample"] and data["arr_0"].shape == (2, 8, 8, 1)


# ------------------------------------------------------------------------------------------------
# Errors: a message naming the fix, exit status 2, no traceback, nothing written
# ------------------------------------------------------------------------------------------------


def test_unknown_scheduler(ddpm_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sample(ddpm_dir, tmp_path / "x", "--num-images", "1", "--scheduler", "lms")
    assert exit_info.value.code == 2
    assert "invalid choice: 'lms'" in error_of(capsys)


def test_unfitting_scheduler(flow_dir, tmp_path, capsys):
    assert sample(flow_dir, tmp_path / "x", "--num-images", "1", "--scheduler", "ddim") == 2
    assert "scheduler 'ddim' does not fit a flow-matching model; use one of ['euler', 'heun', 'dpm++', 'sde', 'ode-dopri5']" in error_of(capsys)
    assert not (tmp_path / "x").exists()


def test_class_label_out_of_range(ddpm_dir, tmp_path, capsys):
    assert sample(ddpm_dir, tmp_path / "x", "--num-images", "1", "--class-labels", "1", "3") == 2
    assert "class label 3 is out of range: this model has classes 0..2" in error_of(capsys)


def test_guidance_or_labels_on_unconditional_model(flow_dir, tmp_path, capsys):
    assert sample(flow_dir, tmp_path / "x", "--num-images", "1", "--guidance", "3") == 2
    assert "needs a class-conditional model" in error_of(capsys)
    assert sample(flow_dir, tmp_path / "x", "--num-images", "1", "--class-labels", "0") == 2
    assert "unconditional: pass no class_labels" in error_of(capsys)


def test_a_run_still_training_says_when_its_pipeline_comes(trained_dir, tmp_path, capsys):
    """A run folder has its pipeline only once training ends (or was stopped while replacing it)."""
    run = shutil.copytree(trained_dir, tmp_path / "run")
    (run / "model_index.json").unlink()
    assert sample(run, tmp_path / "x", "--num-images", "1") == 2
    err = error_of(capsys)
    assert f"{run} is an `atdiff train` run without its final pipeline" in err and len(err.splitlines()) == 1
    assert f"atdiff train --config {run / 'config.yaml'} --output-dir {run} --resume latest" in err


@pytest.mark.parametrize("record", ["not json", "[1]"])
def test_a_folder_with_a_settings_file_we_did_not_write_is_refused(ddpm_dir, tmp_path, capsys, record):
    out = tmp_path / "pngs"
    out.mkdir()
    (out / "atdiff_sample.json").write_text(record)
    assert sample(ddpm_dir, out, "--num-images", "1") == 2
    assert "is not empty and was not written by `atdiff sample`" in error_of(capsys).splitlines()[-1]
    assert sorted(p.name for p in out.iterdir()) == ["atdiff_sample.json"]


def test_a_grid_or_npz_whose_record_is_not_ours_is_refused(ddpm_dir, tmp_path, capsys):
    """Our key, but not a settings record (a list, a number): another program's file, left alone."""
    info = PngInfo()
    info.add_text("atdiff_sample", "[1]")
    Image.new("L", (4, 4)).save(tmp_path / "grid.png", pnginfo=info)
    np.savez(tmp_path / "images.npz", arr_0=np.zeros((1, 2, 2, 1), np.uint8), atdiff_sample=np.array("5"))
    for out in (tmp_path / "grid.png", tmp_path / "images.npz"):
        before = out.read_bytes()
        assert sample(ddpm_dir, out, "--num-images", "1") == 2
        assert f"{out} exists and was not written by `atdiff sample`" in error_of(capsys)
        assert out.read_bytes() == before


def test_not_a_pipeline_folder(tmp_path, capsys):
    assert sample(tmp_path, tmp_path / "x", "--num-images", "1") == 2
    assert "is not a pipeline folder (no model_index.json)" in error_of(capsys)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    assert sample(tmp_path, tmp_path / "x", "--num-images", "1") == 2
    assert "holds a DDPMPipeline, not an atdiff ImageDiffusionPipeline" in error_of(capsys)


def test_tampered_pipeline_folder_runs_no_code(ddpm_dir, tmp_path, capsys):
    copy, markers = tampered_copy(ddpm_dir, tmp_path)
    assert sample(copy, tmp_path / "x", "--num-images", "1") == 2
    err = error_of(capsys)
    assert "component 'model' comes from 'evil'; atdiff loads components only from atdiff and diffusers" in err
    assert len(err.strip().splitlines()) == 1
    assert not any(marker.exists() for marker in markers) and not (tmp_path / "x").exists()
    # `atdiff fid PIPE` (and compare) load pipelines the same way, before sampling anything.
    assert main(["fid", str(copy), str(copy), "--num-real", "1", "--num-fake", "1", "--device", "cpu"]) == 2
    assert "component 'model' comes from 'evil'" in error_of(capsys)
    assert not any(marker.exists() for marker in markers) and sorted(p.name for p in copy.iterdir()) == [
        "model", "model_index.json", "pipeline.py", "scheduler"]


@pytest.mark.parametrize(
    "entry, needle",
    [
        ("DiTModel", "component 'model' is 'DiTModel', not a [library, class] pair"),
        (["atdiff"], "not a [library, class] pair"),
        (["atdiff", "NoSuchModel"], "does not load as an atdiff pipeline: `atdiff` has no class `NoSuchModel`"),
        (["atdiff.cli", "main"], "does not load as an atdiff pipeline"),
        (["diffusers", "UNet2DModel"], "parameters of UNet2DModel are not in its weights file"),
    ],
)
def test_model_index_that_does_not_load_is_one_line(ddpm_dir, tmp_path, capsys, entry, needle):
    copy = tmp_path / "copy"
    shutil.copytree(ddpm_dir, copy)
    index = json.loads((copy / "model_index.json").read_text())
    (copy / "model_index.json").write_text(json.dumps({**index, "model": entry}))
    (copy / "manifest.json").unlink()  # saved elsewhere: in a folder atdiff wrote, the manifest names the edit
    assert sample(copy, tmp_path / "x", "--num-images", "1") == 2
    last_line = error_of(capsys).splitlines()[-1]
    assert last_line.startswith("atdiff sample: error: ") and needle in last_line
    assert not (tmp_path / "x").exists()


WEIGHTS = "model/diffusion_pytorch_model.safetensors"


def flip_a_byte(folder: Path) -> None:
    data = bytearray((folder / WEIGHTS).read_bytes())
    data[-10] ^= 0xFF  # deep in the last tensor's data: the file still loads, with other weights
    (folder / WEIGHTS).write_bytes(bytes(data))


def rewrite_weights(change):
    """Change the weights, then write the manifest again: the weight checks hold whatever a manifest vouches for."""
    def corrupt(folder: Path) -> None:
        weights = load_file(folder / WEIGHTS)
        (folder / WEIGHTS).unlink()
        change(folder, weights)
        write_pipeline_manifest(folder)
    return corrupt


def with_nan(folder, weights):
    weights["final_layer.linear.bias"][0] = float("nan")
    save_file(weights, folder / WEIGHTS)


CORRUPT_PIPELINES = {
    "flipped byte": (flip_a_byte, f"{WEIGHTS} does not match its sha256 in manifest.json"),
    "truncated": (lambda f: (f / WEIGHTS).write_bytes((f / WEIGHTS).read_bytes()[:-100]), f"{WEIGHTS} has "),
    "added file": (lambda f: shutil.copy(f / WEIGHTS, f / "model" / "diffusion_pytorch_model.fp16.safetensors"),
                   "model/diffusion_pytorch_model.fp16.safetensors is not listed in manifest.json"),
    "cast to int8": (rewrite_weights(lambda f, w: save_file({k: v.to(torch.int8) for k, v in w.items()}, f / WEIGHTS)),
                     "is torch.int8, not floating point"),
    "NaN weights": (rewrite_weights(with_nan), "tensor final_layer.linear.bias holds NaN or infinite values"),
    "pickled weights": (rewrite_weights(lambda f, w: torch.save(w, f / "model" / "diffusion_pytorch_model.bin")),
                        "diffusion_pytorch_model.bin is a pickle, which atdiff refuses to load"),
}


@pytest.mark.parametrize("corruption", list(CORRUPT_PIPELINES))
def test_a_damaged_pipeline_folder_is_refused_naming_the_file(ddpm_dir, tmp_path, capsys, corruption):
    copy = Path(shutil.copytree(ddpm_dir, tmp_path / "copy"))
    corrupt, needle = CORRUPT_PIPELINES[corruption]
    corrupt(copy)
    assert sample(copy, tmp_path / "x", "--num-images", "1") == 2
    err = error_of(capsys).strip().splitlines()
    assert len(err) == 1 and err[0].startswith("atdiff sample: error: ") and needle in err[0], err
    assert not (tmp_path / "x").exists()


def test_a_folder_without_a_manifest_loads_with_one_note(ddpm_dir, tmp_path, capsys):
    """Saved by plain diffusers (or an atdiff before manifests): loaded, and the user is told it was not verified."""
    copy = Path(shutil.copytree(ddpm_dir, tmp_path / "copy"))
    (copy / "manifest.json").unlink()
    assert sample(copy, tmp_path / "x", "--num-images", "1") == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "manifest" in line]
    assert notes == [f"note: {copy} has no manifest.json (not written by atdiff, or by an older one): its files are not verified"]


def test_existing_outputs_are_never_overwritten(ddpm_dir, tmp_path, capsys):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "000000.png").write_bytes(b"mine")
    assert sample(ddpm_dir, foreign, "--num-images", "1") == 2
    assert "not written by `atdiff sample`" in error_of(capsys)
    assert (foreign / "000000.png").read_bytes() == b"mine"

    out = tmp_path / "pngs"
    assert sample(ddpm_dir, out, "--num-images", "1", "--seed", "1") == 0
    assert sample(ddpm_dir, out, "--num-images", "2", "--seed", "2") == 2
    assert "other settings (seed: 1 -> 2)" in error_of(capsys)
    assert not (out / "000001.png").exists()


def test_unsupported_image_suffix_is_refused(ddpm_dir, tmp_path, capsys):
    assert sample(ddpm_dir, tmp_path / "grid.webp", "--num-images", "1") == 2
    assert "a grid is written as .png or .jpg" in error_of(capsys)


def test_output_under_a_file_names_the_file(ddpm_dir, tmp_path, capsys):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    for out in (blocker / "pngs", blocker / "grid.png"):
        assert sample(ddpm_dir, out, "--num-images", "1") == 2
        err = error_of(capsys)
        assert f"{blocker} is a file, not a folder" in err and len(err.splitlines()) == 1
    assert blocker.read_text() == "mine"


def test_read_only_output_folder_is_named(ddpm_dir, tmp_path, capsys, owner_permissions):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    assert sample(ddpm_dir, locked / "pngs", "--num-images", "1") == 2
    err = error_of(capsys)
    assert f"--out {locked / 'pngs'}: {locked} is not writable" in err and len(err.splitlines()) == 1
    assert list(locked.iterdir()) == []


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_write_failure_while_sampling_is_one_line_naming_the_file(ddpm_dir, tmp_path, capsys, monkeypatch, code):
    """Disk full or a folder turned read-only mid-run (simulated: root ignores permissions and this sandbox's
    /dev/full accepts writes): one line naming the file, exit 2, the images written so far kept."""
    out = tmp_path / "pngs"
    assert sample(ddpm_dir, out, "--num-images", "1") == 0

    def failing_save(image, path, *args, **kwargs):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(Image.Image, "save", failing_save)
    assert sample(ddpm_dir, out, "--num-images", "2") == 2
    last_line = error_of(capsys).splitlines()[-1]  # after the pipeline-loading bar
    assert last_line.startswith(f"atdiff sample: error: cannot write {temp_path(out / '000001.png')}: {os.strerror(code)}; free space")
    assert (out / "000000.png").is_file()


def test_more_steps_than_the_scheduler_takes(ddpm_dir, tmp_path, capsys):
    assert sample(ddpm_dir, tmp_path / "x", "--num-images", "1", "--scheduler", "ddpm", "--steps", "2000") == 2
    assert "2000 cannot be larger than" in error_of(capsys).splitlines()[-1]
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("device", ["meta", "xla", "xpu"])
def test_a_device_that_cannot_compute_is_one_line(ddpm_dir, tmp_path, capsys, device):
    """torch names these devices, but this build cannot sample on them (meta holds no values)."""
    assert sample(ddpm_dir, tmp_path / "x", "--num-images", "1", "--device", device) == 2
    err = error_of(capsys)
    assert err.startswith(f"atdiff sample: error: --device {device}") and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("guidance", ["nan", "inf"])
def test_a_guidance_that_is_not_finite_is_refused(trained_dir, tmp_path, capsys, guidance):
    """NaN or infinite guidance would write black images and exit 0; refused with the other settings, before loading."""
    assert sample(trained_dir, tmp_path / "x", "--num-images", "1", "--guidance", guidance) == 2
    assert error_of(capsys) == f"atdiff sample: error: --guidance (sampling.guidance_scale) must be a finite number, got {float(guidance)}\n"
    assert not list((tmp_path / "x").glob("*.png"))


def test_a_guidance_too_large_for_the_model_is_refused(trained_dir, tmp_path, capsys):
    """1e300 is finite as a Python float but inf in float32: it would write black images and exit 0."""
    assert sample(trained_dir, tmp_path / "x", "--num-images", "1", "--guidance", "1e300") == 2
    last_line = error_of(capsys).splitlines()[-1]
    assert last_line.startswith("atdiff sample: error: guidance_scale=1e+300 is beyond what torch.float32 holds")
    assert not (tmp_path / "x").exists()


def test_non_finite_images_are_never_written(trained_dir, tmp_path, capsys, monkeypatch):
    """A guidance the model's dtype holds can still overflow inside the model: the samples are checked
    before they are decoded into flat black or white PNGs."""
    overflowing = lambda self, x, *args, **kwargs: torch.full_like(x, float("inf"))  # noqa: E731
    monkeypatch.setattr(ImageDiffusionPipeline, "predict", overflowing)
    assert sample(trained_dir, tmp_path / "y", "--num-images", "2", "--guidance", "1e30") == 2
    last_line = error_of(capsys).splitlines()[-1]
    assert last_line == ("atdiff sample: error: images 0..1, none of them written: sampling gave NaN or infinite values "
                         "(guidance_scale=1e+30): lower the guidance, or check the model")
    assert not list((tmp_path / "y").glob("*.png"))


def test_bad_counts_and_device(ddpm_dir, tmp_path, capsys):
    assert sample(ddpm_dir, tmp_path / "x", "--num-images", "0") == 2
    assert "--num-images must be at least 1" in error_of(capsys)
    assert sample(ddpm_dir, tmp_path / "x", "--num-images", "1", "--device", "gpu0") == 2
    assert "--device 'gpu0' is not a torch device" in error_of(capsys)
