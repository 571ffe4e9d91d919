"""REPA (atdiff.objectives.repa) with a tiny randomly initialised DINOv2 (a transformers config, nothing
downloaded): the loss against a hand computation, training and exact resume with the projector in
the checkpoint and not in the pipeline, and the bad inputs refused before anything is written."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from transformers import Dinov2Config, Dinov2Model

from assets import needs_fashion_mnist
from atdiff import DiTModel
from atdiff.cli import main
from atdiff.config import config_from_dict
from atdiff.errors import UsageError
from atdiff.objectives import FlowMatchingObjective, ObjectiveConfig, build_objective
from atdiff.objectives.repa import RepresentationAlignment, alignment_loss, encoder_input
from atdiff.training import train
from test_training import TINY, assert_same_run, assert_same_weights, one_thread  # noqa: F401 (one_thread: an autouse fixture)


def tiny_encoder(folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=4, image_size=32)
    Dinov2Model(config).save_pretrained(folder)  # safetensors
    return folder


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> Path:
    return tiny_encoder(tmp_path_factory.mktemp("dinov2"))


class Accelerator:
    """What ``prepare`` uses of Accelerate's, on the CPU."""

    device = torch.device("cpu")

    @staticmethod
    def prepare_model(module):
        return module

    @staticmethod
    def autocast():
        return torch.autocast("cpu", enabled=False)


# ------------------------------------------------------------------------------------------------
# The loss
# ------------------------------------------------------------------------------------------------


def test_alignment_loss_is_the_mean_negative_cosine_over_patches_and_images():
    projected = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[3.0, 4.0], [1.0, 1.0]]])
    features = torch.tensor([[[2.0, 0.0], [1.0, 0.0]], [[-3.0, -4.0], [1.0, 0.0]]])
    cosines = [[1.0, 0.0], [-1.0, 2 ** -0.5]]  # by hand
    expected = -sum(sum(row) / 2 for row in cosines) / 2
    assert alignment_loss(projected, features).item() == pytest.approx(expected)


def test_encoder_input_matches_the_model_grid_as_repa_does():
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    pixels = encoder_input(images, (16, 16), 14)  # SiT-XL/2 at 256 px and DINOv2's 14-px patches: 224 px
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(pixels, F.interpolate(((images + 1) / 2 - mean) / std, size=(224, 224), mode="bicubic"))
    assert encoder_input(images[:, :1], (2, 3), 4).shape == (2, 3, 8, 12)  # grey to RGB; any grid, square or not


def test_repa_loss_against_a_hand_computation(encoder_dir):
    torch.manual_seed(0)
    network = DiTModel(sample_size=16, patch_size=4, in_channels=3, hidden_size=32, depth=3, num_heads=2, num_classes=0, learn_sigma=False)
    with torch.no_grad():  # DiT's zero-initialised gates make every block the identity: no depth would show
        for p in network.parameters():
            p.normal_(0, 0.2)
    objective = build_objective(ObjectiveConfig(repa_encoder=str(encoder_dir), repa_encoder_depth=2, repa_proj_coeff=0.5, repa_projector_dim=16))
    assert isinstance(objective, RepresentationAlignment) and objective.needs_pixels
    objective.prepare(Accelerator(), network)
    x0 = torch.rand(2, 3, 16, 16) * 2 - 1

    torch.manual_seed(1)
    loss = objective.loss(network, x0)

    # By hand: the same noise, the hidden state of block 2 taken by running the blocks ourselves.
    torch.manual_seed(1)
    x_t, t, target = FlowMatchingObjective().training_inputs(x0)
    h = network.x_embedder(x_t)
    c = network.t_embedder(network.t_proj(t))
    for block in network.blocks[:2]:
        h = block(h, c, network.grid)
    denoising = F.mse_loss(network(x_t, t).sample, target)
    encoder = Dinov2Model.from_pretrained(encoder_dir).eval()
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    pixels = F.interpolate(((x0 + 1) / 2 - mean) / std, size=(16, 16), mode="bicubic")  # 4 x 4 tokens of 4 px
    with torch.no_grad():
        features = encoder(pixel_values=pixels).last_hidden_state[:, 1:]  # patch tokens, normed
    projected = objective.trained_module()(h)
    cosine = (projected * features).sum(-1) / (projected.norm(dim=-1) * features.norm(dim=-1))
    expected = denoising - 0.5 * cosine.mean(dim=1).mean()
    torch.testing.assert_close(loss, expected)

    loss.backward()  # the alignment trains the projector and the blocks up to depth, the encoder stays frozen
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in objective.trained_module().parameters())
    assert all(p.grad is None for p in objective.encoder.parameters())
    assert objective.hidden is None  # nothing held between steps


def repa_gradients(encoder_dir: Path, checkpointing: bool = False, **objective) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    network = DiTModel(sample_size=16, patch_size=4, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=0, learn_sigma=False)
    if checkpointing:
        network.enable_gradient_checkpointing()
    repa = build_objective(ObjectiveConfig(repa_encoder=str(encoder_dir), repa_encoder_depth=1, repa_projector_dim=8, **objective))
    repa.prepare(Accelerator(), network)
    torch.manual_seed(1)
    repa.loss(network, torch.rand(2, 3, 16, 16) * 2 - 1).backward()
    named = [*network.named_parameters(), *(("projector." + n, p) for n, p in repa.trained_module().named_parameters())]
    return {name: p.grad for name, p in named}


def test_gradient_checkpointing_gives_repa_the_same_gradients(encoder_dir):
    plain, recomputed = repa_gradients(encoder_dir), repa_gradients(encoder_dir, checkpointing=True)
    assert plain["projector.0.weight"].abs().sum() > 0
    for name, grad in plain.items():
        torch.testing.assert_close(recomputed[name], grad, msg=name)


def test_repa_wraps_ddpm_too(encoder_dir):
    grads = repa_gradients(encoder_dir, type="ddpm")
    assert grads["projector.0.weight"].abs().sum() > 0 and grads["x_embedder.proj.weight"].abs().sum() > 0


def test_sampling_does_not_feed_the_hook(encoder_dir):
    network = DiTModel(sample_size=16, patch_size=4, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=0, learn_sigma=False)
    objective = build_objective(ObjectiveConfig(repa_encoder=str(encoder_dir), repa_encoder_depth=1, repa_projector_dim=8))
    objective.prepare(Accelerator(), network)
    with torch.no_grad():
        network(torch.randn(1, 3, 16, 16), 500)
    assert objective.hidden is None


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


def tiny_repa(output_dir: Path, encoder: Path, **objective) -> dict:
    raw = copy.deepcopy(TINY)
    raw["objective"].update({"repa_encoder": str(encoder), "repa_encoder_depth": 1, "repa_projector_dim": 16, **objective})
    raw["training"]["output_dir"] = str(output_dir)
    return raw


@pytest.fixture(scope="module")
def straight_repa(tmp_path_factory, encoder_dir):
    out = tmp_path_factory.mktemp("repa") / "run"
    return out, train(config_from_dict(tiny_repa(out, encoder_dir)))


@needs_fashion_mnist
def test_repa_trains_and_resumes_exactly_with_the_projector_in_the_checkpoint(straight_repa, tmp_path, encoder_dir):
    out, result = straight_repa
    assert result.step == 6 and all(torch.isfinite(torch.tensor(result.losses)))
    manifest = json.loads((out / "checkpoint-6" / "manifest.json").read_text())
    assert "objective.safetensors" in manifest["files"]
    projector = load_file(out / "checkpoint-6" / "objective.safetensors")
    assert {tuple(v.shape) for v in projector.values()} >= {(16, 32), (32, 16)}  # DiT width 32 -> 16 -> 16 -> DINOv2 width 32
    assert not all(torch.equal(projector[k], load_file(out / "checkpoint-3" / "objective.safetensors")[k]) for k in projector)

    resumed = tmp_path / "run"
    train(config_from_dict(tiny_repa(resumed, encoder_dir)), resume=str(out / "checkpoint-3"))
    assert_same_run(out, resumed)
    assert_same_weights(out / "checkpoint-6" / "objective.safetensors", resumed / "checkpoint-6" / "objective.safetensors")


@needs_fashion_mnist
def test_the_pipeline_folder_holds_no_projector(straight_repa):
    out, _ = straight_repa
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*.safetensors") if "checkpoint-" not in str(p))
    assert files == ["model/diffusion_pytorch_model.safetensors"]
    weights = load_file(out / files[0])
    assert set(weights) == set(DiTModel.from_pretrained(out / "model").state_dict())
    assert all(shape[-1] != 16 for shape in (tuple(w.shape) for w in weights.values()))  # no projector_dim-wide tensor


@needs_fashion_mnist
def test_repa_in_bf16_as_the_authors_run_resumes_exactly(tmp_path, encoder_dir):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # Accelerate keeps one precision per process
    try:
        bf16 = tiny_repa(tmp_path / "run", encoder_dir)
        bf16["training"]["mixed_precision"] = "bf16"
        result = train(config_from_dict(bf16))
        assert all(torch.isfinite(torch.tensor(result.losses)))
        bf16["training"]["output_dir"] = str(tmp_path / "resumed")
        train(config_from_dict(bf16), resume=str(tmp_path / "run" / "checkpoint-3"))
        assert_same_run(tmp_path / "run", tmp_path / "resumed")
        assert_same_weights(tmp_path / "run" / "checkpoint-6" / "objective.safetensors", tmp_path / "resumed" / "checkpoint-6" / "objective.safetensors")
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


@needs_fashion_mnist
@pytest.mark.slow  # compiling the tiny DiT's forward and backward: about a minute on two cores
def test_repa_under_torch_compile_reads_the_hidden_state(straight_repa, tmp_path, encoder_dir):
    raw = tiny_repa(tmp_path / "run", encoder_dir)
    raw["training"]["compile"] = True
    result = train(config_from_dict(raw))  # a hook the compiled graph skipped would stop the first step
    # The same training, not the same numbers: compiled kernels round differently and draw the label
    # dropout inside the graph from another random stream.
    assert result.losses == pytest.approx(straight_repa[1].losses, rel=0.1)
    first, last = (load_file(tmp_path / "run" / f"checkpoint-{s}" / "objective.safetensors") for s in (3, 6))
    assert not all(torch.equal(first[k], last[k]) for k in first)


@needs_fashion_mnist
def test_a_resume_that_changes_repa_is_refused(straight_repa, tmp_path, encoder_dir):
    with pytest.raises(UsageError, match="objective.repa_proj_coeff"):
        train(config_from_dict(tiny_repa(tmp_path / "run", encoder_dir, repa_proj_coeff=1.0)), resume=str(straight_repa[0] / "checkpoint-3"))


# ------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, before anything is written
# ------------------------------------------------------------------------------------------------


def refused(tmp_path: Path, capsys, raw: dict, *overrides: str) -> str:
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    capsys.readouterr()  # what making the test's files printed
    assert main(["train", "--config", str(config), *overrides]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert not Path(raw["training"]["output_dir"]).exists()
    return err


def test_an_encoder_that_does_not_load_is_one_line(tmp_path, capsys):
    empty = tmp_path / "no-encoder"
    empty.mkdir()
    err = refused(tmp_path, capsys, tiny_repa(tmp_path / "run", empty))
    assert err.startswith(f"atdiff train: error: objective.repa_encoder: cannot load a DINOv2 encoder from {empty}")


def test_an_encoder_without_safetensors_is_refused(tmp_path, capsys, encoder_dir):
    pickled = tmp_path / "pickled"  # a config and a pickle of the weights: never unpickled
    pickled.mkdir()
    (pickled / "config.json").write_text((encoder_dir / "config.json").read_text())
    torch.save(load_file(encoder_dir / "model.safetensors"), pickled / "pytorch_model.bin")
    err = refused(tmp_path, capsys, tiny_repa(tmp_path / "run", pickled))
    assert err.startswith(f"atdiff train: error: objective.repa_encoder: cannot load a DINOv2 encoder from {pickled}")


def test_a_missing_or_damaged_encoder_is_one_usage_error(tmp_path, encoder_dir):
    from atdiff.objectives.repa import load_encoder

    with pytest.raises(UsageError, match=f"objective.repa_encoder: no such folder {tmp_path / 'nothing'}; pass a folder"):
        load_encoder(tmp_path / "nothing")
    damaged = tmp_path / "damaged"
    shutil.copytree(encoder_dir, damaged)
    weights = (damaged / "model.safetensors").read_bytes()
    (damaged / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(UsageError, match="cannot load a DINOv2 encoder from .*damaged"):
        load_encoder(damaged)


def test_an_encoder_of_another_kind_is_refused(tmp_path, capsys):
    from transformers import ViTConfig, ViTModel

    other = tmp_path / "vit"
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, patch_size=4, image_size=32)).save_pretrained(other)
    err = refused(tmp_path, capsys, tiny_repa(tmp_path / "run", other))
    assert "is a vit model; REPA here takes DINOv2 encoders" in err


def test_a_depth_beyond_the_model_is_one_line(tmp_path, capsys, encoder_dir):
    err = refused(tmp_path, capsys, tiny_repa(tmp_path / "run", encoder_dir, repa_encoder_depth=3))
    assert err.startswith("atdiff train: error: objective.repa_encoder_depth=3 is beyond the model's 2 blocks; use 1 to 2")


def test_repa_on_a_unet_is_not_supported(tmp_path, capsys, encoder_dir):
    raw = tiny_repa(tmp_path / "run", encoder_dir)
    raw["model"] = {"type": "unet", "sample_size": 32, "in_channels": 1, "out_channels": 1, "block_out_channels": [8, 16],
                    "down_block_types": ["DownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "UpBlock2D"], "norm_num_groups": 8}
    err = refused(tmp_path, capsys, raw)
    assert err.startswith("atdiff train: error: objective.repa_encoder: REPA is not supported on model.type unet")


def test_repa_keys_without_an_encoder_are_refused():
    with pytest.raises(UsageError, match="objective.repa_proj_coeff=1.0 does nothing with objective.repa_encoder=null"):
        config_from_dict({"objective": {"repa_proj_coeff": 1.0}, "model": {"size": "XS/4", "in_channels": 1}})


# Each process saves its own projector after training: DDP must have kept them equal.
TWO_PROCESS_SCRIPT = """
import sys
from accelerate.state import PartialState
from safetensors.torch import save_model
from atdiff.config import load_config
from atdiff.objectives.repa import RepresentationAlignment
from atdiff.training import train

objectives, prepare = [], RepresentationAlignment.prepare
RepresentationAlignment.prepare = lambda self, *args: objectives.append(self) or prepare(self, *args)
train(load_config(sys.argv[1]))
save_model(objectives[0].trained_module(), sys.argv[2] + f"/projector-{PartialState().process_index}.safetensors")
"""


@needs_fashion_mnist
def test_two_processes_keep_one_projector(tmp_path, encoder_dir):
    import os
    import subprocess
    import sys

    raw = tiny_repa(tmp_path / "run", encoder_dir)
    raw["training"].update(max_steps=2, checkpoint_every=0, sample_every=0)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "script.py").write_text(TWO_PROCESS_SCRIPT)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", str(tmp_path / "script.py"), str(tmp_path / "run.yaml"), str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    first, second = load_file(tmp_path / "projector-0.safetensors"), load_file(tmp_path / "projector-1.safetensors")
    assert all(torch.equal(first[k], second[k]) for k in first)  # each process saw other images: gradients were averaged
    assert all(torch.equal(first[k], v) for k, v in load_file(tmp_path / "run" / "checkpoint-2" / "objective.safetensors").items())
