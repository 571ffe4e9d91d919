"""``atdiff compare``: token mixers side by side, on equal terms, in one resumable report.

Each entry is a config (trained here) or a run folder written by ``atdiff train``. Every entry is
trained with the same preset overrides, sampled with the same seeds, scheduler and steps, and scored
against the same cached reference statistics. Work is split into stages whose results are stored
under ``OUT/<name>/`` once complete, so an interrupted comparison resumes where it stopped:

    train -> samples + FID -> FID at every checkpoint -> sampling speed -> report

Training runs in a child process (``atdiff train``, with its own checkpoints and Ctrl-C handling),
and so does the sampling-speed probe, so each peak-memory figure belongs to one model alone.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from atdiff.config import ExperimentConfig, flat_config, load_config
from atdiff.errors import UsageError
from atdiff.files import write_atomic
from atdiff.pipelines import SCHEDULER_NAMES
from atdiff.sampling import SamplingSettings, check_writable, sample_into_folder
from atdiff.training.checkpoint import list_checkpoints, pipeline_at_checkpoint
from atdiff.training.timing import peak_memory

from .fid import compute_metrics, dataset_spec

# ------------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    train_overrides: tuple[str, ...]  # config overrides for every entry trained here
    num_images: int  # samples per model for the final FID
    num_real: int | None  # reference images (None: the whole split)
    step_images: int  # samples per checkpoint for FID over training
    steps: int  # sampler steps
    batch_size: int  # images per sampling call
    speed_batch: int  # images per call when timing sampling
    speed_repeats: int


PRESETS = {
    # CPU, under an hour on 2 cores for a DiT-T/4 pair on Fashion-MNIST (Inception features cost ~0.2 s
    # per image there, so the FID sets are small). Small sets bias FID upwards, equally for every entry.
    "quick": Preset(
        train_overrides=(
            "training.max_steps=800", "training.checkpoint_every=400", "training.checkpoints_total_limit=null",
            "training.sample_every=0",
        ),
        num_images=1000, num_real=2000, step_images=250, steps=20, batch_size=100, speed_batch=32, speed_repeats=3,
    ),
    # GPU: the configs' own schedules, every checkpoint kept, 50k samples (FID-50k) against the whole split.
    "full": Preset(
        train_overrides=("training.checkpoints_total_limit=null",),
        num_images=50_000, num_real=None, step_images=10_000, steps=50, batch_size=256, speed_batch=64, speed_repeats=5,
    ),
}


@dataclass
class CompareSettings:
    """Everything that determines the numbers; a comparison folder holds one set of these."""

    preset: str
    entries: dict[str, str]  # name -> config file or run folder
    overrides: list[str]
    num_images: int
    num_real: int | None
    step_images: int
    steps: int
    scheduler: str | None
    guidance: float
    seed: int
    kid: bool


@dataclass
class Entry:
    name: str
    source: Path  # the config file or run folder given
    run_dir: Path
    cfg: ExperimentConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("entries", nargs="+", metavar="CONFIG|RUN_DIR", help="configs to train (or train runs to reuse); KEY=VALUE items override config keys of every entry")
    parser.add_argument("--out", required=True, help="comparison folder (resumed when it exists)")
    parser.add_argument("--preset", choices=PRESETS, default="quick", help="quick: CPU, ~1 hour; full: GPU (default: quick)")
    parser.add_argument("--num-images", type=int, help="samples per model for the final FID (preset's by default)")
    parser.add_argument("--num-real", type=int, help="reference images from the dataset (preset's by default)")
    parser.add_argument("--step-images", type=int, help="samples per checkpoint for FID over training")
    parser.add_argument("--steps", type=int, help="sampler steps")
    parser.add_argument("--scheduler", choices=SCHEDULER_NAMES, help="sampler (default: each run's own)")
    parser.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (image i's noise depends on (seed, i) only)")
    parser.add_argument("--batch-size", type=int, help="images per sampling call (does not change the images)")
    parser.add_argument("--kid", action="store_true", help="also compute KID")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device for sampling and FID")


def settings_from_args(args: argparse.Namespace) -> tuple[CompareSettings, Preset, list[Entry]]:
    overrides = [e for e in args.entries if "=" in e and not Path(e).exists()]
    sources = [Path(e) for e in args.entries if e not in overrides]
    if len(sources) < 2:
        raise UsageError("compare needs at least two configs or run folders")
    preset = PRESETS[args.preset]
    preset = replace(preset, **{k: v for k, v in (("num_images", args.num_images), ("num_real", args.num_real),
                                                  ("step_images", args.step_images), ("steps", args.steps),
                                                  ("batch_size", args.batch_size)) if v is not None})
    out = Path(args.out)
    entries = [resolve_entry(src, out, [*preset.train_overrides, *overrides]) for src in sources]
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise UsageError(f"entries must have distinct names (config file or folder names), got {names}")
    check_same_data(entries)
    settings = CompareSettings(
        preset=args.preset, entries={e.name: str(e.source) for e in entries}, overrides=overrides,
        num_images=preset.num_images, num_real=preset.num_real, step_images=preset.step_images, steps=preset.steps,
        scheduler=args.scheduler, guidance=args.guidance, seed=args.seed, kid=args.kid,
    )
    return settings, preset, entries


def resolve_entry(source: Path, out: Path, overrides: list[str]) -> Entry:
    if source.is_dir():
        config = source / "config.yaml"
        if not (source / "model_index.json").is_file() or not config.is_file():
            raise UsageError(f"{source} is not a finished `atdiff train` run (needs model_index.json and config.yaml)")
        return Entry(source.name, source, source, load_config(config))
    if source.suffix not in (".yaml", ".yml") or not source.is_file():
        raise UsageError(f"{source} is neither a YAML config nor a run folder written by `atdiff train`")
    run_dir = out / source.stem / "run"
    cfg = load_config(source, [*overrides, f"training.output_dir={json.dumps(str(run_dir))}"])
    return Entry(source.stem, source, run_dir, cfg)


def check_same_data(entries: list[Entry]) -> None:
    """FIDs only compare against the same reference: every entry must use the same data."""
    first = asdict(entries[0].cfg.data)
    for entry in entries[1:]:
        diff = {k for k, v in asdict(entry.cfg.data).items() if first[k] != v and k not in ("random_flip", "num_workers")}
        if diff:
            raise UsageError(f"{entries[0].name} and {entry.name} use different data ({', '.join(sorted(diff))}); FIDs would not compare")


def mixer_differences(entries: list[Entry]) -> list[str]:
    """Config keys (besides output_dir) in which the entries differ; ideally only model.token_mixer."""
    flat = [flat_config(e.cfg) for e in entries]
    keys = sorted(set().union(*flat) - {"training/output_dir"})
    return [k.replace("/", ".") for k in keys if len({json.dumps(f.get(k)) for f in flat}) > 1]


def claim_comparison(out: Path, settings: CompareSettings) -> None:
    """Resume only with the same settings, so one report never mixes numbers of two set-ups."""
    record = out / "compare.json"
    if record.is_file():
        previous = json.loads(record.read_text())["settings"]
        if previous != json.loads(json.dumps(asdict(settings))):
            changed = [k for k, v in asdict(settings).items() if previous.get(k) != v]
            raise UsageError(f"{out} holds a comparison with other settings ({', '.join(changed)}); use another --out")
    elif out.is_dir() and any(out.iterdir()):  # its reports would overwrite files of the same names
        raise UsageError(f"{out} is not empty and holds no comparison; use a new or empty --out")
    check_writable(out)
    out.mkdir(parents=True, exist_ok=True)
    command = "atdiff compare " + shlex.join(sys.argv[2:] if sys.argv[1:2] == ["compare"] else sys.argv[1:])
    write_atomic(record, json.dumps({"settings": asdict(settings), "command": command}, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------
# Stages
# ------------------------------------------------------------------------------------------------


def stored(path: Path, compute) -> dict:
    """A stage's result: read if a previous run finished it, else computed and stored atomically."""
    if path.is_file():
        return json.loads(path.read_text())
    result = compute()
    write_atomic(path, json.dumps(result, indent=2) + "\n")
    return result


def train_entry(entry: Entry, config_overrides: list[str]) -> None:
    """``atdiff train`` in a child process; ``--resume latest`` continues an interrupted run."""
    if (entry.run_dir / "model_index.json").is_file():
        return
    command = [sys.executable, "-m", "atdiff", "train", "--config", str(entry.source), "--resume", "latest",
               *config_overrides, f"training.output_dir={json.dumps(str(entry.run_dir))}"]
    print(f"[{entry.name}] training: {shlex.join(command[2:])}", flush=True)
    code = subprocess.call(command)
    if code != 0:
        raise UsageError(f"training {entry.name} stopped (exit code {code}); rerun the same compare command to resume it")


def fid_of(pipeline_or_dir, folder: Path, entry: Entry, settings: CompareSettings, num_images: int, batch_size: int, device: str) -> dict:
    sampling = SamplingSettings(
        pipeline=str(entry.run_dir.resolve()), scheduler=settings.scheduler, steps=settings.steps,
        guidance=settings.guidance, seed=settings.seed, class_labels=None,
    )
    sample_into_folder(pipeline_or_dir, folder, sampling, num_images, batch_size, device)
    real = dataset_spec(entry.cfg.data, settings.num_real)
    return compute_metrics(real, str(folder), kid=settings.kid, num_fake=num_images, device=device)


def fid_by_step(entry: Entry, settings: CompareSettings, batch_size: int, device: str) -> list[dict]:
    points = []
    for step, checkpoint in list_checkpoints(entry.run_dir):
        def compute(step=step, checkpoint=checkpoint):
            pipe = pipeline_at_checkpoint(checkpoint)
            metrics = fid_of(pipe, entry.run_dir.parent / f"samples-step-{step}", entry, settings, settings.step_images, batch_size, device)
            return {"step": step, **metrics}

        points.append(stored(entry.run_dir.parent / f"fid-step-{step}.json", compute))
    return points


def sampling_speed(run_dir: str, scheduler: str | None, steps: int, batch: int, repeats: int, device: str) -> dict:
    """Median images/s over ``repeats`` timed batches after a warm-up; runs in a fresh process."""
    from atdiff.sampling import load_pipeline

    torch.manual_seed(0)
    pipe = load_pipeline(Path(run_dir), scheduler, device)
    pipe.set_progress_bar_config(disable=True)
    labels = list(range(batch)) if pipe.num_classes else None
    labels = [label % pipe.num_classes for label in labels] if labels else None

    def call():
        pipe(batch_size=batch, class_labels=labels, num_inference_steps=steps, output_type="pt")
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    call()  # warm-up: allocator, kernels, caches
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return {"images_per_s": batch / statistics.median(times), "batch": batch, "steps": steps, "repeats": repeats,
            **peak_memory(torch.device(device))}


def measure_in_child(fn, *args) -> dict:
    # "spawn": a fresh interpreter, so the peak-memory figure is this model's alone.
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def write_report(out: Path, settings: CompareSettings, command: str, results: dict[str, dict], differences: list[str]) -> None:
    report = {"command": command, "settings": asdict(settings), "config_differences": differences, "entries": results}
    write_atomic(out / "report.json", json.dumps(report, indent=2) + "\n")
    plot_fid_by_step(out / "fid_vs_step.png", results)
    plot_throughput(out / "throughput.png", results)

    kid = settings.kid
    lines = [
        "# Token-mixer comparison", "",
        f"Command: `{command}`", "",
        f"Preset `{settings.preset}`: {settings.num_images} samples per model against {settings.num_real or 'all'} "
        f"reference images, {settings.steps} sampler steps ({settings.scheduler or 'each run’s own scheduler'}), "
        f"guidance {settings.guidance}, seed {settings.seed}. The configs differ in: "
        f"{', '.join(differences) or 'nothing'}.", "",
        "| model | token mixer | params | FID" + (" | KID x1e3" if kid else "") +
        " | train img/s | train peak MB | sample img/s | sample peak MB |",
        "|---|---|---:|---:" + ("|---:" if kid else "") + "|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        t, s, f = r["training"], r["sampling"], r["fid"]
        kid_cell = f" | {1e3 * f['kid_mean']:.2f} ± {1e3 * f['kid_std']:.2f}" if kid else ""
        lines.append(
            f"| {name} | {r['token_mixer']} | {r['params']:,} | {f['fid']:.2f}{kid_cell} | "
            f"{t.get('images_per_s', float('nan')):.1f} | {t.get('peak_memory_mb', float('nan')):.0f} | "
            f"{s['images_per_s']:.2f} | {s['peak_memory_mb']:.0f} |"
        )
    lines += ["", "FID over training (EMA weights at each checkpoint, "
              f"{settings.step_images} samples each):", "",
              "| model | " + " | ".join(f"step {p['step']}" for p in next(iter(results.values()))["fid_by_step"]) + " |",
              "|---|" + "---:|" * len(next(iter(results.values()))["fid_by_step"])]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{p['fid']:.2f}" for p in r["fid_by_step"]) + " |")
    first = next(iter(results.values()))
    lines += [
        "",
        f"Training speed is the median over training steps (`training_stats.json`, {first['training'].get('device', '?')}); "
        f"sampling speed the median of {first['sampling']['repeats']} batches of {first['sampling']['batch']} images after a "
        f"warm-up, each model in its own process. Peak memory: {first['sampling']['peak_memory_kind']}. FID with "
        f"torch-fidelity and {first['fid'].get('feature_extractor', 'Inception-v3')}.",
        "", "![FID over training](fid_vs_step.png) ![throughput](throughput.png)", "",
    ]
    write_atomic(out / "report.md", "\n".join(lines))


def plot_fid_by_step(path: Path, results: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, r in results.items():
        points = r["fid_by_step"]
        ax.plot([p["step"] for p in points], [p["fid"] for p in points], marker="o", label=name)
    ax.set(xlabel="training step", ylabel="FID", title="FID over training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_throughput(path: Path, results: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.5))
    for ax, key, title in ((axes[0], "training", "training images/s"), (axes[1], "sampling", "sampling images/s")):
        ax.bar(names, [results[n][key].get("images_per_s", 0.0) for n in names], color=["C0", "C1", "C2", "C3"][: len(names)])
        ax.set_title(title)
        ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Command
# ------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    settings, preset, entries = settings_from_args(args)
    out = Path(args.out)
    claim_comparison(out, settings)
    command = json.loads((out / "compare.json").read_text())["command"]
    config_overrides = [*preset.train_overrides, *settings.overrides]

    results = {}
    for entry in entries:
        train_entry(entry, config_overrides)
        folder = out / entry.name
        fid = stored(folder / "fid.json", lambda: fid_of(
            entry.run_dir, folder / "samples", entry, settings, settings.num_images, preset.batch_size, args.device))
        steps = fid_by_step(entry, settings, preset.batch_size, args.device)
        speed = stored(folder / "sampling_speed.json", lambda: measure_in_child(
            sampling_speed, str(entry.run_dir), settings.scheduler, settings.steps, preset.speed_batch, preset.speed_repeats, args.device))
        stats_file = entry.run_dir / "training_stats.json"
        training = json.loads(stats_file.read_text()) if stats_file.is_file() else {}
        results[entry.name] = {
            "source": str(entry.source), "run_dir": str(entry.run_dir), "token_mixer": entry.cfg.model.resolved().get("token_mixer"),
            "params": training.get("params") or param_count(entry.run_dir), "fid": fid, "fid_by_step": steps,
            "sampling": speed, "training": training,
        }
        print(f"[{entry.name}] FID {fid['fid']:.2f}, sampling {speed['images_per_s']:.2f} img/s", flush=True)
    write_report(out, settings, command, results, mixer_differences(entries))
    print(f"report: {out / 'report.md'}")
    return 0


def param_count(run_dir: Path) -> int:
    from atdiff.sampling import load_pipeline

    return sum(p.numel() for p in load_pipeline(run_dir, None, "cpu").model.parameters())
