"""atdiff import / export: upstream DiT, SiT, ATConv-SiT and diffusers layouts in and out of DiTModel."""

import argparse
import json
import zipfile
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, DiTTransformer2DModel, UNet2DModel

from atdiff import DiTModel, dit_size
from atdiff.cli import main
from atdiff.errors import UsageError
from atdiff.integrity import verify_pipeline
from atdiff.objectives import ObjectiveConfig, build_objective
from atdiff.pipelines import ImageDiffusionPipeline
from atdiff.upstream import ImportOptions, export_pipeline, import_checkpoint
from atdiff.upstream.architecture import FAMILY_CONFIG
from atdiff.upstream.exporting import timm_weights

KEY_TABLE = Path(__file__).with_name("data") / "upstream_keys.json"


def perturb(model: torch.nn.Module) -> torch.nn.Module:
    """adaLN-Zero starts as the identity and ignores t; random weights make every input matter."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def dit(family="dit", token_mixer="attention", **kwargs) -> DiTModel:
    torch.manual_seed(0)
    config = dict(sample_size=8, in_channels=4, num_classes=10, learn_sigma=True, token_mixer=token_mixer,
                  **dit_size("XS/2"), **FAMILY_CONFIG[family])
    return perturb(DiTModel(**{**config, **kwargs})).eval()


def pipeline(model: DiTModel) -> ImageDiffusionPipeline:
    flow = model.config.time_convention == "sit"
    objective = build_objective(ObjectiveConfig(type="flow_matching" if flow else "ddpm"))
    return ImageDiffusionPipeline(model=model, scheduler=objective.make_scheduler())


def inputs(batch=2):
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([3.0, 700.0][:batch]), torch.tensor([1, 10][:batch])


def assert_same_model(a: DiTModel, b: DiTModel) -> None:
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(a.config) == public(b.config)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------------------
# Round trips and the upstream key table
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("to", "token_mixer"), [
    ("dit", "attention"), ("sit", "attention"), ("sit", "atconv"), ("sit", "hybrid"), ("diffusers", "attention"),
])
def test_export_then_import_is_bit_exact(to, token_mixer, tmp_path):
    model = dit(to, token_mixer)
    out = tmp_path / ("model" if to == "diffusers" else "model.pt")
    export_pipeline(pipeline(model), to, out)
    imported = import_checkpoint(out).model
    assert_same_model(model, imported)
    x, t, y = inputs()
    assert torch.equal(model(x, t, y).sample, imported(x, t, y).sample)


def test_published_sizes_export_the_upstream_keys_and_shapes():
    table = json.loads(KEY_TABLE.read_text())
    for name, family, token_mixer in [("DiT-XL/2", "dit", "attention"), ("SiT-XL/2", "sit", "attention"),
                                      ("SiT-ATConv-XL/2", "sit", "atconv"), ("SiT-ATConv-XL/2-Hybrid", "sit", "hybrid")]:
        with torch.device("meta"):  # shapes only: no 675M-parameter allocation
            model = DiTModel(sample_size=32, num_classes=1000, token_mixer=token_mixer, **dit_size("XL/2"), **FAMILY_CONFIG[family])
        exported = [[k, list(v.shape)] for k, v in timm_weights(model).items()]
        assert exported == table[name], name


def test_raw_state_dict_needs_family_and_size_flags(tmp_path):
    """Released DiT/SiT weights are bare state dicts: the family and heads come from flags."""
    model = dit("dit")
    path = tmp_path / "DiT-XS-2.pt"
    torch.save(timm_weights(model), path)
    with pytest.raises(UsageError, match="--family dit or --family sit"):
        import_checkpoint(path, ImportOptions(size="XS/2"))
    with pytest.raises(UsageError, match="pass --size"):
        import_checkpoint(path, ImportOptions(family="dit"))
    with pytest.raises(UsageError, match="--size T/2 means hidden_size=192"):
        import_checkpoint(path, ImportOptions(family="dit", size="T/2"))
    pipe = import_checkpoint(path, ImportOptions(family="dit", size="XS/2"))
    assert_same_model(model, pipe.model)
    # DiT samples with its learned variance
    assert isinstance(pipe.scheduler, DDPMScheduler) and pipe.scheduler.config.variance_type == "learned_range"
    images = pipe(batch_size=2, num_inference_steps=3, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 4, 8, 8) and torch.isfinite(images).all()


def test_authors_train_checkpoint_with_namespace_args(tmp_path):
    """The ATConv authors' train.py: {"model", "ema", "opt", "args": Namespace}, no null label by default."""
    ema = dit("sit", "hybrid", class_dropout_prob=0.0)
    raw = dit("sit", "hybrid", class_dropout_prob=0.0)
    with torch.no_grad():
        raw.final_layer.linear.bias.add_(1.0)
    args = argparse.Namespace(model="SiT-ATConv-XS/2-Hybrid", image_size=64, num_classes=10, class_dropout_rate=0.0,
                              path_type="Linear", prediction="velocity", vae="ema")
    path = tmp_path / "0400000.pt"
    torch.save({"model": timm_weights(raw), "ema": timm_weights(ema), "opt": {"state": {}, "param_groups": []}, "args": args}, path)
    imported = import_checkpoint(path).model
    assert_same_model(ema, imported)
    assert imported.config.class_dropout_prob == 0 and imported.y_embedder.embedding_table.num_embeddings == 10
    assert_same_model(raw, import_checkpoint(path, ImportOptions(weights="model")).model)


# ------------------------------------------------------------------------------------------------
# Imported models compute what the originals compute
# ------------------------------------------------------------------------------------------------


def test_sit_import_samples_what_sit_samples(tmp_path):
    """SiT runs t from noise (0) to data (1) and predicts data - noise: an Euler ODE written that way
    with the same weights, fed t as SiT feeds it, gives the imported pipeline's samples."""
    sit_model = dit("sit")
    path = tmp_path / "sit.pt"
    export_pipeline(pipeline(sit_model), "sit", path)
    pipe = import_checkpoint(path)

    native = DiTModel(**{**dict(sit_model.config), "time_convention": "atdiff"}).eval()  # SiT's network as is
    native.load_state_dict(sit_model.state_dict())
    x, _, y = inputs()
    assert not torch.allclose(native(x, torch.full((2,), 0.1), y).sample, native(x, torch.full((2,), 0.9), y).sample, atol=1e-3)

    steps = 6
    generator = [torch.Generator().manual_seed(i) for i in range(2)]
    images = pipe(class_labels=[1, 7], num_inference_steps=steps, generator=generator, output_type="latent").images

    z = torch.cat([torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)])
    sigmas = pipe.scheduler.sigmas  # the grid the pipeline used, as SiT times t = 1 - sigma
    with torch.no_grad():
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            t = torch.full((2,), 1 - s.item())
            z = z + (s - s_next) * native(z, t, torch.tensor([1, 7])).sample[:, :4]
    torch.testing.assert_close(images, z, rtol=1e-5, atol=1e-5)


def diffusers_dit() -> DiTTransformer2DModel:
    torch.manual_seed(0)
    transformer = perturb(DiTTransformer2DModel(num_attention_heads=3, attention_head_dim=32, in_channels=4, out_channels=8,
                                                num_layers=2, sample_size=8, num_embeds_ada_norm=10)).eval()
    for block in transformer.transformer_blocks[1:]:  # diffusers' blocks hold copies of one embedder
        block.norm1.emb.load_state_dict(transformer.transformer_blocks[0].norm1.emb.state_dict())
    return transformer


def test_diffusers_dit_imports_with_its_own_constants(tmp_path):
    transformer = diffusers_dit()
    transformer.save_pretrained(tmp_path / "dit")
    model = import_checkpoint(tmp_path / "dit").model
    assert model.config.timestep_freq_shift == 1 and model.config.mlp_norm_eps == 1e-5
    x, t, y = inputs()
    expected = transformer(x, timestep=t, class_labels=y).sample
    torch.testing.assert_close(model(x, t, y).sample, expected, rtol=1e-5, atol=1e-5)
    # with DiT's constants the same weights compute something else: the constants are not cosmetic
    dit_constants = DiTModel(**{**dict(model.config), **FAMILY_CONFIG["dit"]}).eval()
    dit_constants.load_state_dict(model.state_dict())
    assert (dit_constants(x, t, y).sample - expected).abs().max() > 1e-3


def test_diffusers_dit_with_differing_embedder_copies_is_refused(tmp_path):
    transformer = diffusers_dit()
    with torch.no_grad():
        transformer.transformer_blocks[1].norm1.emb.timestep_embedder.linear_1.bias.add_(1)
    transformer.save_pretrained(tmp_path / "dit")
    with pytest.raises(UsageError, match="copies of norm1.emb.timestep_embedder.linear_1.bias differ"):
        import_checkpoint(tmp_path / "dit")


def test_diffusers_export_runs_in_diffusers(tmp_path):
    model = dit("diffusers")
    export_pipeline(pipeline(model), "diffusers", tmp_path / "out")
    transformer = DiTTransformer2DModel.from_pretrained(tmp_path / "out").eval()
    x, t, y = inputs()
    torch.testing.assert_close(transformer(x, timestep=t, class_labels=y).sample, model(x, t, y).sample, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("family", "to", "message"), [
    ("dit", "diffusers", "timestep_freq_shift=0.0"),  # diffusers hard-codes downscale_freq_shift=1
    ("dit", "sit", "time_convention=atdiff"),
    ("sit", "dit", "time_convention=sit"),
])
def test_export_refuses_layouts_that_compute_otherwise(family, to, message, tmp_path):
    with pytest.raises(UsageError, match=message):
        export_pipeline(pipeline(dit(family)), to, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written
# ------------------------------------------------------------------------------------------------


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def bad_files(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.pt"
    torch.save(timm_weights(dit()), good)
    files = {"truncated": tmp_path / "truncated.pt", "pickle": tmp_path / "pickle.pt", "unet": tmp_path / "unet.pt",
             "text": tmp_path / "notes.pt", "flipped": tmp_path / "flipped.pt", "nan": tmp_path / "nan.pt"}
    files["truncated"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    # One flipped byte inside a tensor's data: torch.load reads it without complaint, as other weights.
    weights = timm_weights(dit())
    data, table = good.read_bytes(), weights["y_embedder.embedding_table.weight"].numpy().tobytes()
    at = data.index(table) + len(table) // 2
    files["flipped"].write_bytes(data[:at] + bytes([data[at] ^ 0x40]) + data[at + 1:])
    assert set(torch.load(files["flipped"], weights_only=True)) == set(weights)
    weights["final_layer.linear.bias"][1] = float("nan")
    torch.save(weights, files["nan"])
    files["text"].write_text("hi\n")  # garbage the weights-only unpickler fails on with a bare KeyError
    torch.save({"model": {"x": torch.zeros(1)}, "args": Payload()}, files["pickle"])
    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4, layers_per_block=1,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    torch.save(unet.state_dict(), files["unet"])
    return files


@pytest.mark.parametrize(("kind", "messages"), [
    ("truncated", ["is not a readable PyTorch checkpoint (truncated or corrupt?)"]),
    ("text", ["is not a readable PyTorch checkpoint (truncated or corrupt?)"]),
    ("pickle", ["holds an object of print, which atdiff does not unpickle"]),
    ("unet", ["is not a DiT/SiT checkpoint", "expected a DiT/SiT state dict (keys such as x_embedder.proj.weight"]),
    ("flipped", ["(a tensor's data) fails its CRC check: the file is corrupted"]),
    ("nan", ["tensor final_layer.linear.bias holds NaN or infinite values"]),
])
def test_bad_files_are_usage_errors(kind, messages, tmp_path, capsys):
    src = bad_files(tmp_path)[kind]
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["import", str(src), "--out", str(out), "--family", "dit", "--size", "XS/2"]) == 2
    out_text, err = capsys.readouterr()
    assert err.startswith("atdiff import: error: ") and len(err.strip().splitlines()) == 1
    assert all(message in err for message in messages), err
    assert "this must never run" not in out_text + err
    assert not out.exists()


def test_missing_size_is_a_usage_error(tmp_path, capsys):
    src = tmp_path / "dit.pt"
    torch.save(timm_weights(dit()), src)
    assert main(["import", str(src), "--out", str(tmp_path / "out"), "--family", "dit"]) == 2
    assert "pass --size" in capsys.readouterr().err


def test_import_cli_writes_a_pipeline_folder_and_never_overwrites(tmp_path, capsys):
    src = tmp_path / "sit.pt"
    export_pipeline(pipeline(dit("sit", "atconv")), "sit", src)
    out = tmp_path / "imported"
    assert main(["import", str(src), "--out", str(out)]) == 0
    assert "atconv" in capsys.readouterr().out
    loaded = ImageDiffusionPipeline.from_pretrained(out)
    assert loaded.config.prediction_type == "flow_prediction" and loaded.model.config.time_convention == "sit"
    assert verify_pipeline(out)
    assert main(["import", str(src), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    export = tmp_path / "back.pt"
    assert main(["export", str(out), "--to", "sit", "--out", str(export)]) == 0
    with zipfile.ZipFile(export) as archive:  # not the temporary file's name
        assert {name.split("/")[0] for name in archive.namelist()} == {"archive"}
    assert_same_model(loaded.model, import_checkpoint(export).model)


@pytest.mark.parametrize(("command", "conversion"), [
    ("import", "atdiff.upstream.importing.import_checkpoint"),
    ("export", "atdiff.upstream.exporting.export_pipeline"),
])
def test_unwritable_out_is_refused_before_any_conversion(command, conversion, tmp_path, capsys, monkeypatch, owner_permissions):
    src = tmp_path / "dit.pt"
    export_pipeline(pipeline(dit("dit")), "dit", src)
    if command == "export":
        src = tmp_path / "imported"
        assert main(["import", str(tmp_path / "dit.pt"), "--out", str(src)]) == 0
    flags = ["--to", "dit"] if command == "export" else []
    monkeypatch.setattr(conversion, lambda *args: pytest.fail("converted before checking --out"))
    locked, blocker = tmp_path / "locked", tmp_path / "notes.txt"
    locked.mkdir(mode=0o555)
    blocker.write_text("mine")
    for out, problem in [
        (locked / "out", f"--out {locked / 'out'}: {locked} is not writable"),
        (blocker / "out", f"--out {blocker / 'out'}: {blocker} is a file, not a folder"),
        (tmp_path / "missing" / "out", f"--out {tmp_path / 'missing' / 'out'}: folder {tmp_path / 'missing'} does not exist"),
    ]:
        capsys.readouterr()
        assert main([command, str(src), "--out", str(out), *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"atdiff {command}: error: {problem}") and len(err.splitlines()) == 1, err
    assert list(locked.iterdir()) == [] and blocker.read_text() == "mine"


def test_every_ddpm_sampler_runs_on_a_learned_sigma_import(tmp_path):
    """DDPM uses the learned variance; the other samplers get the mean channels only."""
    from atdiff.pipelines.schedulers import DDPM_SCHEDULERS, scheduler_by_name

    path = tmp_path / "dit.pt"
    export_pipeline(pipeline(dit("dit")), "dit", path)
    pipe = import_checkpoint(path)
    for name in DDPM_SCHEDULERS:
        pipe.scheduler = scheduler_by_name(name, pipe.scheduler.config, "epsilon")
        latents = pipe(batch_size=1, num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0)).images
        assert latents.shape == (1, 4, 8, 8) and torch.isfinite(latents).all(), name


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, sample_size=16)


def test_diffusers_pipeline_round_trip_keeps_the_vae(tmp_path):
    from diffusers import DiTPipeline

    model = dit("diffusers")
    pipe = ImageDiffusionPipeline(model=model, scheduler=pipeline(model).scheduler, vae=tiny_vae())
    export_pipeline(pipe, "diffusers", tmp_path / "dit-pipeline")
    assert isinstance(DiTPipeline.from_pretrained(tmp_path / "dit-pipeline"), DiTPipeline)
    imported = import_checkpoint(tmp_path / "dit-pipeline")
    assert_same_model(model, imported.model)
    assert imported.vae is not None and torch.equal(imported.vae.decoder.conv_out.weight, pipe.vae.decoder.conv_out.weight)
    # a DiT/SiT file has no VAE: --vae takes an AutoencoderKL folder or a pipeline folder with vae/
    export_pipeline(pipeline(dit("dit")), "dit", tmp_path / "dit.pt")
    with_vae = import_checkpoint(tmp_path / "dit.pt", ImportOptions(family="dit", vae=str(tmp_path / "dit-pipeline")))
    assert with_vae.vae is not None
    with pytest.raises(UsageError, match="is not an AutoencoderKL folder"):
        import_checkpoint(tmp_path / "dit.pt", ImportOptions(vae=str(tmp_path)))


def test_an_exported_diffusers_pipeline_is_verified_when_imported(tmp_path, capsys):
    model = dit("diffusers")
    export_pipeline(ImageDiffusionPipeline(model=model, scheduler=pipeline(model).scheduler, vae=tiny_vae()), "diffusers", tmp_path / "p")
    weights = tmp_path / "p" / "transformer" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert main(["import", str(tmp_path / "p"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("atdiff import: error: ") and len(err.strip().splitlines()) == 1
    assert "transformer/diffusion_pytorch_model.safetensors does not match its sha256" in err and not (tmp_path / "out").exists()


def test_vae_folder_that_does_not_load_is_one_line(tmp_path, capsys):
    src = tmp_path / "dit.pt"
    export_pipeline(pipeline(dit("dit")), "dit", src)
    vae = tmp_path / "vae"
    tiny_vae().save_pretrained(vae)
    (vae / "diffusion_pytorch_model.safetensors").unlink()  # a config without its weights
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["import", str(src), "--out", str(out), "--vae", str(vae)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"atdiff import: error: --vae: cannot load a diffusers AutoencoderKL from {vae} (") and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_what_the_weights_do_not_say_is_asked_for(tmp_path):
    atconv = timm_weights(dit("sit", "atconv"))  # no pos_embed: the latent size is not in the weights
    torch.save(atconv, tmp_path / "atconv.pt")
    with pytest.raises(UsageError, match="pass --sample-size"):
        import_checkpoint(tmp_path / "atconv.pt", ImportOptions(family="sit"))
    assert import_checkpoint(tmp_path / "atconv.pt", ImportOptions(family="sit", sample_size=8)).model.config.token_mixer == "atconv"

    gvp = {"ema": atconv, "args": argparse.Namespace(model="SiT-XS/2", image_size=64, num_classes=10, path_type="GVP", prediction="velocity")}
    torch.save(gvp, tmp_path / "gvp.pt")
    with pytest.raises(UsageError, match="path_type=GVP"):
        import_checkpoint(tmp_path / "gvp.pt")

    repa = {**atconv, "projectors.0.0.weight": torch.zeros(4, 96)}  # REPA's alignment head is not part of the model
    torch.save(repa, tmp_path / "repa.pt")
    with pytest.raises(UsageError, match=r"unexpected \['projectors.0.0.weight'\]"):
        import_checkpoint(tmp_path / "repa.pt", ImportOptions(family="sit", sample_size=8))
