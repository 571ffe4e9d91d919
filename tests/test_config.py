"""Experiment configs: YAML loading, dotted overrides, errors that name the key, the shipped configs."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from atdiff import DiTModel, MixerUNet2DModel
from atdiff.cli import main
from atdiff.config import SECTIONS, ExperimentConfig, build_model, config_from_dict, load_config
from atdiff.settings import APPLIED, REFUSED, rule_of
from atdiff.errors import UsageError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MINIMAL = {
    "model": {"type": "dit", "size": "XS/4", "sample_size": 32, "in_channels": 1, "num_classes": 10, "learn_sigma": False},
    "data": {"dataset": "fashion-mnist"},
}


def write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def error(raw: dict) -> str:
    with pytest.raises(UsageError) as info:
        config_from_dict(raw)
    return str(info.value)


def test_loads_with_defaults_and_output_dir_from_file_name(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.training.output_dir == str(Path("outputs") / "run")
    assert cfg.objective.type == "flow_matching" and cfg.data.resolution == 32
    assert cfg.model.model_kwargs() == {"hidden_size": 96, "depth": 4, "num_heads": 3, "patch_size": 4, **{k: v for k, v in MINIMAL["model"].items() if k not in ("type", "size")}}


def test_dotted_overrides_parse_values_as_yaml(tmp_path):
    cfg = load_config(
        write(tmp_path, MINIMAL),
        ["training.max_steps=7", "training.learning_rate=3e-4", "training.max_grad_norm=null",
         "model.token_mixer=hybrid", "model.depth=2", "data.random_flip=true"],
    )
    assert cfg.training.max_steps == 7 and cfg.training.learning_rate == 3e-4 and cfg.training.max_grad_norm is None
    assert cfg.model.kwargs["token_mixer"] == "hybrid" and cfg.model.model_kwargs()["depth"] == 2  # explicit beats size
    assert cfg.data.random_flip is True


def test_round_trip_through_to_dict():
    cfg = config_from_dict(MINIMAL)
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "raw, needles",
    [
        ({**MINIMAL, "training": {"max_stepz": 3}}, ["training.max_stepz", "max_steps"]),
        ({**MINIMAL, "trainer": {}}, ["'trainer'", "training"]),
        ({**MINIMAL, "training": {"mixed_precision": "fp8"}}, ["training.mixed_precision", "'bf16'"]),
        ({**MINIMAL, "training": {"max_steps": "many"}}, ["training.max_steps", "int"]),
        ({**MINIMAL, "training": {"max_steps": 0}}, ["training.max_steps", "at least 1"]),
        ({**MINIMAL, "training": {"lr_scheduler": "cosine_annealing"}}, ["training.lr_scheduler", "cosine"]),
        ({**MINIMAL, "training": {"log_with": "tensorbored"}}, ["training.log_with", "tensorboard"]),
        ({**MINIMAL, "training": {"batch_size": 10, "gradient_accumulation_steps": 4}}, ["training.batch_size", "gradient_accumulation_steps"]),
        ({**MINIMAL, "objective": {"type": "edm"}}, ["objective.type", "flow_matching", "ddpm"]),
        ({**MINIMAL, "objective": {"prediction_type": "x0"}}, ["objective.prediction_type", "v_prediction"]),
        ({**MINIMAL, "data": {"dataset": "imagenet"}}, ["data.dataset", "cifar10", "imagefolder"]),
        ({**MINIMAL, "data": {"dataset": "imagefolder"}}, ["data.root"]),
        ({**MINIMAL, "data": {"channels": 2}}, ["data.channels"]),
        ({**MINIMAL, "model": {**MINIMAL["model"], "type": "vit"}}, ["model.type", "unet"]),
        ({**MINIMAL, "model": {**MINIMAL["model"], "hiden_size": 8}}, ["model.hiden_size", "hidden_size"]),
        ({**MINIMAL, "model": {**MINIMAL["model"], "token_mixer": "mamba"}}, ["model.token_mixer", "atconv"]),
        ({**MINIMAL, "model": {**MINIMAL["model"], "size": "Q/4"}}, ["model.size", "T"]),
        ({**MINIMAL, "model": {**MINIMAL["model"], "in_channels": 3}}, ["model.in_channels", "1"]),
        ({**MINIMAL, "model": {**MINIMAL["model"], "sample_size": 28}}, ["model.sample_size", "data.resolution"]),
        ({**MINIMAL, "model": {**MINIMAL["model"], "class_dropout_prob": 0}, "sampling": {"guidance_scale": 4}}, ["sampling.guidance_scale", "class_dropout_prob"]),
        ({**MINIMAL, "sampling": {"guidance_channels": 4}}, ["sampling.guidance_channels=4", "at most model.in_channels (1)"]),
        ({**MINIMAL, "objective": {"type": "flow_matching"}, "sampling": {"scheduler": "ddim"}}, ["sampling.scheduler", "'euler'"]),
    ],
)
def test_bad_config_names_the_key(raw, needles):
    message = error(raw)
    for needle in needles:
        assert needle in message, message


@pytest.mark.parametrize("override", ["max_steps=3", "training.max_steps", "training..x=1", "training.max_steps.x=1"])
def test_malformed_overrides(tmp_path, override):
    with pytest.raises(UsageError, match=r"max_steps|SECTION\.KEY"):
        load_config(write(tmp_path, MINIMAL), [override])


@pytest.mark.parametrize(
    "source, needle",
    [
        (["training.max_steps=[1"], "override 'training.max_steps=[1': the value is not YAML"),
        ("model: [1\n", "is not valid YAML"),
        (b"\xff\xfe\x00binary", "is not a UTF-8 text file"),
    ],
)
def test_unparsable_config_or_override_is_one_line(tmp_path, capsys, source, needle):
    config = tmp_path / "run.yaml"
    overrides = source if isinstance(source, list) else []
    if isinstance(source, bytes):
        config.write_bytes(source)
    else:
        config.write_text(yaml.safe_dump(MINIMAL) if overrides else source)
    assert main(["train", "--config", str(config), "--output-dir", str(tmp_path / "out"), *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("atdiff train: error: ") and needle in err and len(err.splitlines()) == 1, err


def test_cli_reports_bad_keys_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["train", "--config", str(write(tmp_path, MINIMAL)), "--output-dir", str(out), "training.warmup=3"])
    assert code == 2
    assert "training.warmup" in capsys.readouterr().err
    assert not out.exists()


def test_build_model_dit_and_unet():
    dit = build_model(config_from_dict(MINIMAL).model)
    assert isinstance(dit, DiTModel) and dit.config.hidden_size == 96 and dit.config.in_channels == 1
    unet_cfg = config_from_dict({
        "model": {"type": "unet", "sample_size": 16, "in_channels": 1, "out_channels": 1, "block_out_channels": [16, 32],
                  "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
                  "layers_per_block": 1, "norm_num_groups": 8, "attention_head_dim": 8, "token_mixer": "atconv"},
        "data": {"dataset": "fashion-mnist", "resolution": 16},
    })
    unet = build_model(unet_cfg.model)
    assert isinstance(unet, MixerUNet2DModel) and unet.config.token_mixer == "atconv"


@pytest.mark.parametrize(
    "key, value, needle",
    [
        ("hidden_size", 100, "not divisible by num_heads"),  # with num_heads 3 and attention
        ("hidden_size", -1, "hidden_size must be at least 1"),
        ("num_heads", 0, "num_heads must be at least 1"),
        ("patch_size", 0, "patch_size must be at least 1"),
        ("depth", 0, "depth must be at least 1"),
        ("mlp_ratio", -1, "mlp_ratio must be positive"),
        ("class_dropout_prob", 2, "class_dropout_prob must be in [0, 1]"),
        ("num_classes", -1, "num_classes must be 0"),
    ],
)
def test_model_constructor_errors_are_found_at_load(key, value, needle):
    raw = {**MINIMAL, "model": {**MINIMAL["model"], "token_mixer": "attention", key: value}}
    assert error(raw).startswith("model: ") and needle in error(raw)


def test_unet_constructor_errors_are_found_at_load():
    assert "model: " in error({"model": {"type": "unet", "in_channels": 1, "block_out_channels": [-4, 8]}})


# ------------------------------------------------------------------------------------------------
# Ranges of the numeric keys
# ------------------------------------------------------------------------------------------------


def section_classes() -> dict[str, type]:
    return {section: type(getattr(ExperimentConfig(), section)) for section in SECTIONS}


def ranges() -> dict[str, str]:
    """Every declared range, as ``{"section.key": interval}``."""
    return {f"{section}.{f.name}": rule_of(cls, f.name).range for section, cls in section_classes().items()
            for f in dataclasses.fields(cls) if rule_of(cls, f.name).range}


def test_every_key_declares_what_a_resume_does_with_it():
    """A key added without a rule fails here (and at its first use: atdiff.settings.rule_of)."""
    for section, cls in section_classes().items():
        for f in dataclasses.fields(cls):
            rule = rule_of(cls, f.name)
            assert rule.on_resume in (APPLIED, REFUSED), f"{section}.{f.name}"
            assert bool(rule.why) == (rule.on_resume == REFUSED), f"{section}.{f.name}: a refusal says why"


def numeric_keys() -> list[str]:
    keys = []
    for section in SECTIONS:
        cls = type(getattr(ExperimentConfig(), section))
        if dataclasses.is_dataclass(cls):
            hints = typing.get_type_hints(cls)
            keys += [f"{section}.{f.name}" for f in dataclasses.fields(cls) if {int, float} & set(typing.get_args(hints[f.name]) or [hints[f.name]])]
    return keys


def test_every_numeric_key_has_a_range():
    assert set(numeric_keys()) - set(ranges()) == {"data.channels"}  # a choice of 1, 3 or null, tested above


BAD_VALUES = [
    ("training.learning_rate", -1), ("training.learning_rate", 0), ("training.learning_rate", float("inf")),
    ("training.weight_decay", -1), ("training.adam_beta1", 2), ("training.adam_beta1", 1), ("training.adam_beta2", -0.1),
    ("training.max_grad_norm", -1), ("training.max_grad_norm", 0), ("training.max_skipped_steps", -1),
    ("training.ema_decay", 1.5), ("training.ema_power", 0),
    ("training.seed", -1), ("training.max_steps", 0), ("training.batch_size", 0), ("training.gradient_accumulation_steps", 0),
    ("training.lr_warmup_steps", -1), ("training.sample_every", -1), ("training.checkpoint_every", -5),
    ("training.num_sample_images", 0), ("training.checkpoints_total_limit", 0), ("training.log_every", 0),
    ("objective.num_train_timesteps", 0), ("objective.distill_weight", 0), ("objective.distill_weight", 1.5),
    ("objective.repa_encoder_depth", 0), ("objective.repa_proj_coeff", 0), ("objective.repa_projector_dim", 0),
    ("data.resolution", -32), ("data.num_workers", -1),
    ("sampling.num_inference_steps", 0), ("sampling.guidance_scale", float("nan")), ("sampling.guidance_channels", 0),
    ("sampling.seed", -1), ("sampling.seed", 2**64), ("training.eval_every", -1), ("training.eval_num_images", 1), ("training.eval_num_real", 1),
]


@pytest.mark.parametrize("key, value", BAD_VALUES, ids=lambda v: str(v))
def test_out_of_range_value_names_the_key_and_range(key, value):
    section, name = key.split(".")
    message = error({**MINIMAL, section: {name: value}})
    assert message.startswith(f"{key} must be ") and message.endswith((f"got {value}", f"got {float(value)}"))


def test_every_range_is_tested():
    assert {key for key, _ in BAD_VALUES} == set(ranges())


def test_null_means_off_where_documented():
    cfg = config_from_dict({**MINIMAL, "training": {"max_grad_norm": None, "checkpoints_total_limit": None}})
    assert cfg.training.max_grad_norm is None
    assert "(or null: no clipping)" in error({**MINIMAL, "training": {"max_grad_norm": -1}})


@pytest.mark.parametrize("override", ["training.learning_rate=-1", "training.adam_beta1=2", "training.max_grad_norm=-1"])
def test_cli_bad_value_is_one_line_exit_2_before_any_work(tmp_path, capsys, override):
    out = tmp_path / "out"
    assert main(["train", "--config", str(write(tmp_path, MINIMAL)), "--output-dir", str(out), override]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"atdiff train: error: {override.split('=')[0]} must be") and len(err.splitlines()) == 1
    assert not out.exists()


# ------------------------------------------------------------------------------------------------
# The shipped configs
# ------------------------------------------------------------------------------------------------

SHIPPED = sorted(CONFIGS.glob("*.yaml"))


def test_configs_exist():
    names = {p.stem for p in SHIPPED}
    for pair in ("fashion-mnist-dit-t4", "fashion-mnist-dit-t2", "fashion-mnist-unet", "cifar10-dit-s2"):
        assert {f"{pair}-attention", f"{pair}-atconv"} <= names
    assert "fashion-mnist-dit-t4-hybrid" in names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_config_loads_and_comments_its_purpose(path):
    cfg = load_config(path)
    assert cfg.training.output_dir == str(Path("outputs") / path.stem)
    assert path.read_text().startswith("#"), "every config opens with a comment saying what it is for and how long it runs"


def without_mixer(path: Path) -> tuple[str, dict]:
    """(token_mixer, everything else but the output folder) of a shipped config."""
    raw = load_config(path).to_dict()
    raw["training"].pop("output_dir")
    return raw["model"].pop("token_mixer"), raw


@pytest.mark.parametrize("path", [p for p in SHIPPED if p.stem.endswith(("-atconv", "-atconv-repa"))], ids=lambda p: p.stem)
def test_pairs_differ_only_in_the_token_mixer(path):
    mixer, rest = without_mixer(path)
    assert mixer == "atconv"
    twins = [path.with_name(path.name.replace("-atconv", f"-{kind}")) for kind in ("attention", "hybrid")]
    for twin in filter(Path.exists, twins):
        twin_mixer, twin_rest = without_mixer(twin)
        assert twin.stem.removesuffix("-repa").endswith(twin_mixer) and twin_rest == rest


@pytest.mark.parametrize("path", [p for p in SHIPPED if p.stem.startswith("fashion-mnist")], ids=lambda p: p.stem)
def test_fashion_mnist_models_build(path):
    model = build_model(load_config(path).model)
    assert model.config.in_channels == 1


IMAGENET = sorted(p for p in CONFIGS.glob("imagenet*-sit-*.yaml") if not p.stem.endswith("-repa"))
REPA = sorted(CONFIGS.glob("*-repa.yaml"))


def test_imagenet_configs_cover_every_size_and_mixer():
    mixers = ("attention", "atconv", "hybrid")
    assert {p.stem for p in IMAGENET} == {
        *(f"imagenet256-sit-{size}-{mixer}" for size in ("s2", "b2", "xl2") for mixer in mixers),
        *(f"imagenet512-sit-{size}-{mixer}" for size in ("b2", "xl2") for mixer in mixers),
    }


@pytest.mark.parametrize("path", IMAGENET, ids=lambda p: p.stem)
def test_imagenet_configs_follow_sits_recipe(path):
    cfg = load_config(path)
    t, d, o = cfg.training, cfg.data, cfg.objective
    assert (o.type, o.timestep_sampling) == ("flow_matching", "uniform")
    assert (t.learning_rate, t.weight_decay, t.lr_scheduler, t.lr_warmup_steps) == (1e-4, 0.0, "constant", 0)
    assert (t.batch_size, t.max_steps, t.ema_decay, t.mixed_precision) == (256, 400_000, 0.9999, "bf16")
    resolution = int(path.stem[len("imagenet"):].split("-")[0])
    assert (d.dataset, d.split, d.resolution, d.resize_mode, d.random_flip) == ("imagefolder", "train", resolution, "adm_center_crop", True)
    assert d.vae == "stabilityai/sd-vae-ft-ema"
    model = cfg.model.resolved()
    assert (model["sample_size"], model["in_channels"], model["num_classes"]) == (resolution // 8, 4, 1000)
    assert cfg.model.size == path.stem.split("-")[2].upper().replace("2", "/2")


def test_repa_configs_are_the_atconv_authors_run_for_each_mixer():
    assert {p.stem for p in REPA} == {f"imagenet256-sit-xl2-{mixer}-repa" for mixer in ("attention", "atconv", "hybrid")}


@pytest.mark.parametrize("path", REPA, ids=lambda p: p.stem)
def test_repa_configs_follow_the_authors_run(path):
    """price112/Attentive-Convolution generation/REPA/run_sit_atconv_xl.txt with sihyun-yu/REPA train.py's defaults."""
    cfg = load_config(path)
    t, d, o = cfg.training, cfg.data, cfg.objective
    assert (o.type, o.timestep_sampling) == ("flow_matching", "uniform")  # linear path, v prediction, uniform weighting
    assert (o.repa_encoder, o.repa_encoder_depth, o.repa_proj_coeff, o.repa_projector_dim) == ("facebook/dinov2-base", 8, 0.5, 2048)
    assert (t.learning_rate, t.weight_decay, t.lr_scheduler, t.lr_warmup_steps, t.max_grad_norm) == (1e-4, 0.0, "constant", 0, 1.0)
    assert (t.batch_size, t.max_steps, t.ema_decay, t.mixed_precision, t.seed) == (256, 2_000_000, 0.9999, "bf16", 0)
    assert (d.dataset, d.resolution, d.resize_mode, d.random_flip, d.vae) == ("imagefolder", 256, "adm_center_crop", False, "stabilityai/sd-vae-ft-mse")
    model = cfg.model.resolved()
    assert (cfg.model.size, model["sample_size"], model["in_channels"], model["num_classes"], model["class_dropout_prob"]) == ("XL/2", 32, 4, 1000, 0.1)
