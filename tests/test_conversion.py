"""Attention -> ATConv conversion: model.init_from (weights that fit, ATConv from the attention it
replaces) and distillation from a frozen teacher."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DModel
from safetensors.torch import load_file

from assets import needs_fashion_mnist
from atdiff import DiTModel, MixerUNet2DModel
from atdiff.config import build_model, config_from_dict
from atdiff.errors import UsageError
from atdiff.models.swap import ATConvAttention
from atdiff.nn import ATConv, SelfAttention
from atdiff.objectives import DistillationObjective, FlowMatchingObjective, ObjectiveConfig, build_objective
from atdiff.pipelines import ImageDiffusionPipeline

DIT = dict(sample_size=16, patch_size=4, in_channels=1, hidden_size=32, depth=4, num_heads=2, num_classes=10, learn_sigma=False)


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """An attention DiT saved as a pipeline folder, as `atdiff train` leaves it."""
    torch.manual_seed(0)
    model = perturbed(DiTModel(**DIT, token_mixer="attention")).eval()
    folder = tmp_path_factory.mktemp("teacher")
    ImageDiffusionPipeline(model=model, scheduler=FlowMatchingObjective().make_scheduler()).save_pretrained(folder)
    return folder


def config(init_from: Path | None, token_mixer: str, distill: dict | None = None, **training):
    model = {"type": "dit", "token_mixer": token_mixer, **({"init_from": str(init_from)} if init_from else DIT)}
    return config_from_dict({
        "model": model,
        "objective": {"type": "flow_matching", **(distill or {})},
        "data": {"dataset": "fashion-mnist", "split": "test", "resolution": 16},
        "training": {"max_steps": 2, "batch_size": 4, "log_with": "none", "num_sample_images": 2, **training},
        "sampling": {"num_inference_steps": 2},
    })


# ------------------------------------------------------------------------------------------------
# init_from
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("token_mixer", ["atconv", "hybrid"])
def test_init_from_copies_what_fits_and_starts_atconv_from_the_attention(teacher_dir, token_mixer):
    teacher = DiTModel.from_pretrained(teacher_dir / "model")
    cfg = config(teacher_dir, token_mixer)
    assert cfg.model.resolved()["hidden_size"] == 32  # the widths come from init_from
    student = build_model(cfg.model)
    assert student.config.token_mixer == token_mixer

    source = teacher.state_dict()
    for name, tensor in student.state_dict().items():
        if ".mixer." not in name:
            assert torch.equal(tensor, source[name]), name
    for n, (s, t) in enumerate(zip(student.blocks, teacher.blocks)):
        if isinstance(s.mixer, SelfAttention):  # hybrid's attention blocks: copied as they are
            assert torch.equal(s.mixer.qkv.weight, t.mixer.qkv.weight)
            continue
        assert isinstance(s.mixer, ATConv)
        v_rows = slice(2 * 32, 3 * 32)  # fused qkv rows: q, k, v
        assert torch.equal(s.mixer.x_proj.weight, t.mixer.qkv.weight[v_rows])
        assert torch.equal(s.mixer.x_proj.bias, t.mixer.qkv.bias[v_rows])
        assert torch.equal(s.mixer.proj.weight, t.mixer.proj.weight) and torch.equal(s.mixer.proj.bias, t.mixer.proj.bias)
        assert torch.count_nonzero(s.mixer.difference_control) == 0


def saved_unet(folder: Path) -> UNet2DModel:
    torch.manual_seed(0)
    unet = perturbed(UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32), norm_num_groups=8,
                                 layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D")))
    unet.save_pretrained(folder)
    return unet


def test_init_from_a_damaged_pipeline_is_refused_naming_the_file(teacher_dir, tmp_path):
    copy = Path(shutil.copytree(teacher_dir, tmp_path / "teacher"))
    weights = copy / "model" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    with pytest.raises(UsageError, match="model/diffusion_pytorch_model.safetensors does not match its sha256"):
        build_model(config(copy, "atconv").model)


def unet_config(init_from: Path, **objective):
    return config_from_dict({"model": {"type": "unet", "init_from": str(init_from), "token_mixer": "atconv"},
                             "objective": {"type": "ddpm", **objective},
                             "data": {"dataset": "fashion-mnist", "resolution": 16}, "training": {"log_with": "none"}})


def test_init_from_a_diffusers_unet_starts_its_atconv_from_to_v_and_to_out(tmp_path):
    unet = saved_unet(tmp_path / "unet")
    cfg = unet_config(tmp_path / "unet")
    student = build_model(cfg.model)
    assert isinstance(student, MixerUNet2DModel)
    source = dict(unet.named_modules())
    layers = [(name, m) for name, m in student.named_modules() if isinstance(m, ATConvAttention)]
    assert layers
    for name, layer in layers:
        assert torch.equal(layer.atconv.x_proj.weight, source[name].to_v.weight)
        assert torch.equal(layer.atconv.proj.weight, source[name].to_out[0].weight)
        assert torch.equal(layer.group_norm.weight, source[name].group_norm.weight)  # its norm is kept
    # stock diffusers UNets have attention only, so "attention" leaves it as it was
    same = build_model(config_from_dict({**cfg.to_dict(), "model": {"type": "unet", "init_from": str(tmp_path / "unet")}}).model)
    assert not any(isinstance(m, ATConvAttention) for m in same.modules())


def test_init_from_errors(teacher_dir, tmp_path):
    with pytest.raises(UsageError, match="is not a pipeline folder"):
        config(tmp_path, "atconv")
    with pytest.raises(UsageError, match=r"model.size XS/2 disagrees with model.init_from's model on hidden_size \(96 vs 32\)"):
        config_from_dict({"model": {"init_from": str(teacher_dir), "size": "XS/2"}, "data": {"dataset": "fashion-mnist"}})
    with pytest.raises(UsageError, match="model.type unet cannot start from"):
        config_from_dict({"model": {"type": "unet", "init_from": str(teacher_dir)}, "data": {"dataset": "fashion-mnist"}})


def test_sit_time_convention_needs_the_flow_objective(teacher_dir):
    raw = config(teacher_dir, "atconv").to_dict()
    raw["model"]["time_convention"] = "sit"
    raw["objective"]["type"] = "ddpm"
    with pytest.raises(UsageError, match="objective.type=flow_matching"):
        config_from_dict(raw)


# ------------------------------------------------------------------------------------------------
# Distillation
# ------------------------------------------------------------------------------------------------


def test_distillation_loss_is_zero_for_the_teacher_itself(teacher_dir):
    """Same weights, same noisy inputs and times, and the same labels dropped (label dropout on)."""
    objective = build_objective(ObjectiveConfig(distill_from=str(teacher_dir)))
    assert isinstance(objective, DistillationObjective)
    student = DiTModel.from_pretrained(teacher_dir / "model").train()
    assert student.config.class_dropout_prob > 0
    x0, labels = torch.randn(16, 1, 16, 16), torch.arange(16) % 10
    assert objective.loss(student, x0, labels).item() == 0.0
    # a converted student is not the teacher
    converted = build_model(config(teacher_dir, "atconv").model).train()
    assert objective.loss(converted, x0, labels).item() > 0


def test_a_converted_unet_distills_from_its_attention_original(tmp_path):
    saved_unet(tmp_path / "unet")
    cfg = unet_config(tmp_path / "unet", distill_from=str(tmp_path / "unet"))
    objective = build_objective(cfg.objective)
    x0 = torch.randn(2, 1, 16, 16)
    assert objective.loss(UNet2DModel.from_pretrained(tmp_path / "unet"), x0).item() == 0.0
    student = build_model(cfg.model)
    loss = objective.loss(student, x0)
    loss.backward()
    assert loss.item() > 0 and all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert all(p.grad is None for p in objective.teacher.parameters())


def test_mixed_distillation_weighs_both_losses(teacher_dir):
    own = FlowMatchingObjective()
    mixed = build_objective(ObjectiveConfig(distill_from=str(teacher_dir), distill_weight=0.25))
    student = DiTModel.from_pretrained(teacher_dir / "model").eval()
    x0, labels = torch.randn(4, 1, 16, 16), torch.arange(4)
    torch.manual_seed(3)
    expected = 0.75 * own.loss(student, x0, labels)  # the teacher term is zero: student == teacher
    torch.manual_seed(3)
    torch.testing.assert_close(mixed.loss(student, x0, labels), expected)


def test_distillation_config_errors(teacher_dir, tmp_path):
    with pytest.raises(UsageError, match="is not a pipeline folder"):
        config(None, "atconv", {"distill_from": str(tmp_path)})
    with pytest.raises(UsageError, match=r"objective.distill_weight must be in \(0, 1\]"):
        config(None, "atconv", {"distill_from": str(teacher_dir), "distill_weight": 0})
    with pytest.raises(UsageError, match=r"objective.distill_weight=0.5 does nothing with objective.distill_from=null \(it applies only with objective.distill_from set\)"):
        config(None, "atconv", {"distill_weight": 0.5})
    raw = config(None, "atconv").to_dict()
    raw["objective"] = {"type": "ddpm", "distill_from": str(teacher_dir)}
    with pytest.raises(UsageError, match="predicts flow_prediction, but this objective trains epsilon"):
        config_from_dict(raw)
    raw = config(None, "atconv").to_dict()
    raw["model"]["class_dropout_prob"] = 0.0
    raw["objective"]["distill_from"] = str(teacher_dir)
    with pytest.raises(UsageError, match="teacher's class_dropout_prob is 0.1"):
        config_from_dict(raw)


@needs_fashion_mnist
def test_converted_model_trains_with_distillation_and_the_teacher_stays_out_of_checkpoints(teacher_dir, tmp_path):
    from atdiff.training import train

    torch.set_num_threads(1)
    cfg = config(teacher_dir, "atconv", {"distill_from": str(teacher_dir), "distill_weight": 0.5},
                 output_dir=str(tmp_path / "run"), checkpoint_every=1)
    result = train(cfg)
    assert result.step == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    student_keys = set(build_model(cfg.model).state_dict())
    for checkpoint in (tmp_path / "run").glob("checkpoint-*"):
        assert not list(checkpoint.glob("model_1*"))  # one model registered: the student
        assert set(load_file(checkpoint / "model.safetensors")) == student_keys
    saved = ImageDiffusionPipeline.from_pretrained(tmp_path / "run")
    assert saved.model.config.token_mixer == "atconv"
    resumed = copy.deepcopy(cfg)
    resumed.training.max_steps = 3
    assert train(resumed, resume="latest").step == 3


def test_an_imported_sit_converts_to_atconv_and_keeps_its_time_convention(tmp_path):
    """The main use: `atdiff import` a SiT, then init_from it with ATConv (here a tiny one, on 1-channel data)."""
    from atdiff.upstream import export_pipeline, import_checkpoint
    from atdiff.upstream.architecture import FAMILY_CONFIG

    torch.manual_seed(0)
    sit = perturbed(DiTModel(**{**DIT, "learn_sigma": True}, token_mixer="attention", **FAMILY_CONFIG["sit"])).eval()
    export_pipeline(ImageDiffusionPipeline(model=sit, scheduler=FlowMatchingObjective().make_scheduler()), "sit", tmp_path / "sit.pt")
    import_checkpoint(tmp_path / "sit.pt").save_pretrained(tmp_path / "imported")
    cfg = config(tmp_path / "imported", "hybrid", {"distill_from": str(tmp_path / "imported")})
    student = build_model(cfg.model).train()
    assert student.config.time_convention == "sit" and student.config.learn_sigma
    loss = build_objective(cfg.objective).loss(student, torch.randn(4, 1, 16, 16), torch.arange(4))
    assert torch.isfinite(loss) and loss.item() > 0
