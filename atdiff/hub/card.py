"""The model card of a finished run: what its folder records, as a Hugging Face ``README.md``.

A run folder of ``atdiff train`` holds all a card says: ``config.yaml`` (objective, data, training,
sampling), ``model/config.json`` (the model as built), ``training_stats.json`` (steps, images seen,
parameters, the FID/KID evals) and the final sample grid. ``RunRecord`` reads and checks them once;
``model_card`` only formats.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml
from huggingface_hub import ModelCard, ModelCardData

from ..config import ExperimentConfig
from ..errors import UsageError, one_line
from ..pipelines.trust import NOT_COMPONENTS, read_model_index
from ..generation.loading import check_pipeline_dir

ATCONV_PAPER = "https://arxiv.org/abs/2510.20092"
TRAINING_RECORD = ("config.yaml", "training_stats.json")
STATS_KEYS = ("steps", "images_seen", "params")  # what the card reads from training_stats.json without a default
MIXERS = {
    "attention": "self-attention (the baseline ATConv replaces)",
    "atconv": "ATConv",
    "hybrid": "hybrid: attention and ATConv alternate over the blocks",
}


@dataclass(frozen=True)
class RunRecord:
    """What a finished ``atdiff train`` folder says about its model."""

    folder: Path
    config: dict  # config.yaml as atdiff train wrote it
    stats: dict  # training_stats.json
    model: dict  # model/config.json: every argument the model was built with
    components: tuple[str, ...]  # the pipeline's component folders (model, scheduler, vae)
    scheduler: str  # the class of the pipeline's own scheduler
    grid: str | None  # the final sample grid, relative to the folder

    @property
    def num_classes(self) -> int:
        return self.model.get("num_classes") or self.model.get("num_class_embeds") or 0

    def files(self) -> list[str]:
        """What a shared copy holds, relative to the folder: the pipeline, the training record, the grid
        (checkpoints, logs and evals' samples stay home)."""
        pipeline = ["model_index.json", "pipeline.py"] + sorted(
            path.relative_to(self.folder).as_posix()
            for name in self.components
            for path in (self.folder / name).rglob("*")
            if path.is_file()
        )
        return pipeline + list(TRAINING_RECORD) + ([self.grid] if self.grid else [])


def read_run(folder: Path) -> RunRecord:
    """The record of the finished run in ``folder``; a folder that is not one is one line naming why."""
    check_pipeline_dir(folder)  # no pipeline yet (training not finished), or not an atdiff one
    missing = [name for name in TRAINING_RECORD if not (folder / name).is_file()]
    if missing:
        raise UsageError(
            f"{folder} has no {' or '.join(missing)}: a model card describes a folder written by `atdiff train` "
            f"(an imported or hand-made pipeline holds no training record)"
        )
    try:
        saved = yaml.safe_load((folder / "config.yaml").read_text())
        stats = json.loads((folder / "training_stats.json").read_text())
        model = json.loads((folder / "model" / "config.json").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError, json.JSONDecodeError) as err:
        raise UsageError(f"{folder}: its training record does not read ({one_line(str(err))}); restore the files atdiff train wrote") from None
    if not all(isinstance(part, dict) for part in (saved, stats, model)) or not all(key in stats for key in STATS_KEYS):
        raise UsageError(
            f"{folder}: config.yaml, training_stats.json (with {', '.join(STATS_KEYS)}) or model/config.json is not as "
            f"atdiff train wrote it; restore the files atdiff train wrote"
        )
    # Keys added to atdiff since the run was saved read as their defaults.
    defaults = ExperimentConfig().to_dict()
    config = {section: {**values, **(saved.get(section) or {})} for section, values in defaults.items()}
    index = read_model_index(folder)
    components = tuple(name for name, entry in index.items() if name not in NOT_COMPONENTS and isinstance(entry, list) and entry[:1] != [None])
    grid = f"samples/step-{stats['steps']:07d}.png"
    return RunRecord(folder, config, stats, model, components, index["scheduler"][1], grid if (folder / grid).is_file() else None)


# ------------------------------------------------------------------------------------------------
# The card
# ------------------------------------------------------------------------------------------------


def model_card(run: RunRecord, repo_id: str | None = None, license: str | None = None) -> ModelCard:
    """The card of ``run``; ``repo_id`` is where it is (or will be) shared, else the snippets load the folder."""
    source = repo_id or str(run.folder)
    metadata = ModelCardData(
        library_name="atdiff",
        license=license,
        tags=["atdiff", "diffusers", "atconv", "diffusion", run.model.get("token_mixer", "attention"), "image-generation"],
        pipeline_tag=None if run.num_classes else "unconditional-image-generation",
    )
    sections = [f"# {source.rstrip('/').split('/')[-1]}", summary(run), facts(run), samples(run), evals(run), usage(run, source, repo_id is not None)]
    return ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n" + "\n\n".join(s for s in sections if s) + "\n")


def summary(run: RunRecord) -> str:
    kind = f"class-conditional ({run.num_classes} classes)" if run.num_classes else "unconditional"
    space = f"the latent space of `{run.config['data']['vae']}`" if run.config["data"].get("vae") else "pixel space"
    mixer = run.model.get("token_mixer", "attention")
    return (
        f"A {kind} diffusion model of {run.config['data']['dataset']} images in {space}, trained with atdiff; its "
        f"token mixer is {MIXERS.get(mixer, mixer)}. [ATConv]({ATCONV_PAPER}) (Attentive Convolution) mixes tokens "
        f"as attention does, adapting to the content, at the cost of a convolution. The weights are the EMA of training."
    )


def facts(run: RunRecord) -> str:
    c, s, m = run.config, run.stats, run.model
    d, t = c["data"], c["training"]
    size = c["model"].get("size")
    mixer = m.get("token_mixer", "attention")
    if mixer != "attention":
        mixer += f" (kernel {m.get('atconv_kernel_size')}, {m.get('atconv_pooling')} pooling, inhibition {'on' if m.get('atconv_inhibition') else 'off'})"
    grid = m.get("sample_size")
    channels = m.get("in_channels")
    images = f"{d['resolution']}x{d['resolution']}, {channels} channel{'s' if channels != 1 else ''}"
    if d.get("vae"):
        images = f"{d['resolution']}x{d['resolution']} images as {channels}x{grid}x{grid} latents of `{d['vae']}`"
    rows = {
        "model": f"`{m.get('_class_name')}`{f' {size}' if size else ''}, {s['params']:,} parameters",
        "token mixer": mixer,
        "objective": objective_line(c["objective"]),
        "data": f"{d['dataset']} ({d['split']} split), {images}" + (", random flips" if d.get("random_flip") else ""),
        "training": (
            f"{s['steps']:,} steps of {t['batch_size']} images ({s['images_seen']:,} images seen), AdamW lr {t['learning_rate']:g} "
            f"({t['lr_scheduler']}, {t['lr_warmup_steps']} warm-up steps), EMA {t['ema_decay']:g}, mixed precision {t['mixed_precision']}, "
            f"{s.get('num_processes', 1)} x {s.get('device', '?')}"
        ),
    }
    if changes := s.get("config_history"):  # resumes that changed settings: the config holds the last values
        rows["training"] += "; changed on resume: " + "; ".join(
            f"at step {entry['step']:,} " + ", ".join(f"{key} {v['from']} -> {v['to']}" for key, v in entry["changed"].items())
            for entry in changes
        )
    if c["model"].get("init_from"):
        rows["training"] += "; started from another model's weights (model.init_from)"
    if c["objective"].get("distill_from"):
        rows["training"] += f"; distilled from a teacher (weight {c['objective']['distill_weight']:g})"
    return "| | |\n| --- | --- |\n" + "\n".join(f"| {key} | {value} |" for key, value in rows.items())


def objective_line(o: dict) -> str:
    if o["type"] == "flow_matching":
        return f"flow matching (linear interpolant, velocity prediction, {o['timestep_sampling']} t)"
    return f"DDPM ({o['prediction_type']} prediction, {o['beta_schedule']} betas, {o['num_train_timesteps']} steps)"


def sampler_line(run: RunRecord, sampling: dict) -> str:
    """A ``sampling`` section in words (its scheduler is a ``--scheduler`` name, or null: the pipeline's own)."""
    channels = f" on the first {sampling['guidance_channels']} channels" if sampling.get("guidance_channels") else ""
    return (
        f"`{sampling['scheduler'] or run.scheduler}`, {sampling['num_inference_steps']} steps, "
        f"guidance {sampling['guidance_scale']:g}{channels}"
    )


def samples(run: RunRecord) -> str:
    if run.grid is None:
        return ""
    n, sampling = run.config["training"]["num_sample_images"], run.config["sampling"]
    labels = f", class labels 0, 1, 2, ... in reading order (image i: i mod {run.num_classes})" if run.num_classes else ""
    return (
        f"## Samples\n\n![{n} samples at step {run.stats['steps']}]({run.grid})\n\n"
        f"{n} samples of these weights: seed {sampling['seed']}{labels}, {sampler_line(run, sampling)}."
    )


def evals(run: RunRecord) -> str:
    history = run.stats.get("evals") or []
    if not history:
        return ""
    last = history[-1]
    rows = "\n".join(
        f"| {e['step']:,} | {e['fid']:.2f} | {1e3 * e['kid_mean']:.2f} ± {1e3 * e['kid_std']:.2f} | {e['num_fake']:,} | {e['num_real']:,} | {sampler_line(run, e['sampling'])} |"
        for e in history
    )
    return (
        f"## Evaluation\n\nFID and KID of the EMA weights during training: samples against real images of "
        f"{last['real'].split(' (')[0]}, features of {last['feature_extractor']}. "
        f"FID depends on the number of images: compare only FIDs computed with the same numbers.\n\n"
        f"| step | FID | KID x 1e3 | samples | real images | sampler |\n| ---: | ---: | ---: | ---: | ---: | --- |\n{rows}"
    )


def usage(run: RunRecord, source: str, on_hub: bool) -> str:
    """How to load and sample it, each way tested as written. From the Hub, both loaders take the downloaded
    folder: diffusers' Hub download accepts only component libraries it knows (diffusers, transformers, ...)."""
    sampling = run.config["sampling"]
    inputs = f"class_labels=[0, 1, 2, 3], guidance_scale={sampling['guidance_scale']:g}" if run.num_classes else "batch_size=4"
    if on_hub:
        download = "from huggingface_hub import snapshot_download\n"
        folder, local = f'snapshot_download("{source}")', source.split("/")[-1]
        command = f"hf download {source} --local-dir {local}\natdiff sample {local} --num-images 64 --out samples.png"
    else:
        download, folder = "", f'"{source}"'
        command = f"atdiff sample {source} --num-images 64 --out samples.png"
    note = ". Both loaders take the downloaded folder: diffusers' Hub download refuses atdiff's model class" if on_hub else ""
    return f"""## Use

With atdiff installed (it provides the model and pipeline classes){", from a download of this repository" if on_hub else ""}:

```python
import torch
{download}
from atdiff.pipelines import ImageDiffusionPipeline

pipe = ImageDiffusionPipeline.from_pretrained({folder})  # runs no code from the folder
images = pipe({inputs}, num_inference_steps={sampling['num_inference_steps']},
              generator=torch.Generator().manual_seed(0)).images
```

diffusers' generic loader works too. It imports the folder's `pipeline.py` (one line: `from
atdiff.pipelines import ImageDiffusionPipeline`), hence `trust_remote_code=True`{note}:

```python
from diffusers import DiffusionPipeline
{download}
pipe = DiffusionPipeline.from_pretrained({folder}, trust_remote_code=True)
```

From the command line (sampled as the run's `sampling` section says, unless flags override it):

```bash
{command}
```"""
