"""``atdiff compare``: token mixers side by side, on equal terms, over training seeds, in one
resumable report.

Each entry is a config (trained here once per ``--seeds`` seed), a run folder written by ``atdiff
train`` (one seed), or a run-folder pattern with ``{seed}`` in place of the seed (one finished run per
seed). Every run is trained with the same preset overrides, sampled with the same ``SamplingConfig``
and scored against the same cached reference statistics. Work is split into stages whose results
are stored under ``OUT/<entry>/seed-<s>/`` once complete, so an interrupted comparison resumes where
it stopped:

    train (--jobs at a time) -> samples + FID -> FID over training -> sampling speed -> report

Training runs in child processes (``atdiff train``, with its own checkpoints, Ctrl-C handling and
FID evals), and so does the sampling-speed probe, so its process figures belong to one model alone.
``compare_report`` turns the results into mean +- std and paired intervals (``stats``).
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import json
import multiprocessing
import os
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list

from atdiff.config import ExperimentConfig, TrainingConfig, apply_override, flat_config, load_config
from atdiff.config_loader import section_from_dict
from atdiff.devices import check_device, process_state
from atdiff.errors import UsageError
from atdiff.files import check_writable, read_json_object, temp_path, write_atomic
from atdiff.processes import child_environment
from atdiff.settings import bounds, rule_of
from atdiff.memory import model_peak_memory, module_tensors, process_peak_memory
from atdiff.generation.drawing import draw
from atdiff.generation.folder import SampleRecord, check_sampling_fits, sample_into_folder
from atdiff.generation.loading import load_pipeline, use_scheduler
from atdiff.generation.settings import SamplingConfig, add_sampling_arguments, check_sampling, flag_of, sampling_overrides
from atdiff.training.checkpoint import list_checkpoints, pipeline_at_checkpoint
from atdiff.training.loop import check_training_fits
from atdiff.training.run_dir import read_stats

from .bench import timed
from .compare_report import write_report
from .metrics import ExtractorSettings, MetricChoices, compute_metrics
from .sources import dataset_spec

# ------------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    train_overrides: tuple[str, ...]  # config overrides for every entry trained here
    num_images: int  # samples per model for the final FID
    num_real: int | None  # reference images (None: the whole split)
    step_images: int  # samples per checkpoint for FID over training
    sampling: SamplingConfig  # scheduler None: each run's own
    batch_size: int  # images per sampling call
    speed_batch: int  # images per call when timing sampling
    speed_repeats: int


PRESETS = {
    # CPU, under an hour on 2 cores for a DiT-T/4 pair on Fashion-MNIST (Inception features cost ~0.2 s
    # per image there, so the FID sets are small). Small sets bias FID upwards, equally for every entry.
    "quick": Preset(
        train_overrides=(
            "training.max_steps=800", "training.checkpoint_every=400", "training.checkpoints_total_limit=null",
            "training.sample_every=0", "training.eval_every=400",
        ),
        num_images=1000, num_real=2000, step_images=250, sampling=SamplingConfig(num_inference_steps=20),
        batch_size=100, speed_batch=32, speed_repeats=3,
    ),
    # GPU: the configs' own schedules, every checkpoint kept, 50k samples (FID-50k) against the whole split.
    "full": Preset(
        train_overrides=("training.checkpoints_total_limit=null",),
        num_images=50_000, num_real=None, step_images=10_000, sampling=SamplingConfig(num_inference_steps=50),
        batch_size=256, speed_batch=64, speed_repeats=5,
    ),
}


@dataclass
class CompareSettings:
    """Everything that determines the numbers; a comparison folder holds one set of these."""

    preset: str
    entries: dict[str, str]  # name -> config file or run folder
    overrides: list[str]
    seeds: list[int]  # training seeds; each config entry is trained once per seed
    baseline: str  # the entry every other one is compared with
    num_images: int
    num_real: int | None
    step_images: int
    sampling: SamplingConfig  # shared by every entry and seed
    kid: bool


@dataclass
class Run:
    """One entry trained with one seed, and where its comparison results go (``OUT/<entry>/seed-<s>/``)."""

    seed: int
    run_dir: Path
    results: Path


@dataclass
class Entry:
    name: str
    source: Path  # the config file or run folder given
    cfg: ExperimentConfig
    runs: list[Run]
    trained_here: bool


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("entries", nargs="+", metavar="CONFIG|RUN_DIR", help="configs to train, or finished train runs to reuse (a folder, or a pattern such as runs/student-{seed}: one run per --seeds seed); KEY=VALUE items override config keys of every entry")
    parser.add_argument("--out", required=True, help="comparison folder (resumed when it exists)")
    parser.add_argument("--preset", choices=PRESETS, default="quick", help="quick: CPU, ~1 hour per seed; full: GPU (default: quick)")
    # extend: `--seeds 0 1 --seeds 2` means 0 1 2, not just the last list (argparse's default for nargs)
    parser.add_argument("--seeds", type=int, nargs="+", action="extend", metavar="SEED", help="training seeds: each config is trained once per seed (default: 0)")
    parser.add_argument("--jobs", type=int, default=1, help="trainings run in parallel, each with cores // jobs threads (default: 1)")
    parser.add_argument("--baseline", help="entry the others are compared with (default: the attention one, else the first)")
    parser.add_argument("--num-images", type=int, help="samples per model for the final FID (preset's by default)")
    parser.add_argument("--num-real", type=int, help="reference images from the dataset (preset's by default)")
    parser.add_argument("--step-images", type=int, help="samples per checkpoint for FID over training")
    add_sampling_arguments(parser, defaults="the preset's")
    parser.add_argument("--batch-size", type=int, help="images per sampling call (does not change the images)")
    parser.add_argument("--kid", action="store_true", help="also compute KID")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device for sampling and FID")


def settings_from_args(args: argparse.Namespace) -> tuple[CompareSettings, Preset, list[Entry]]:
    overrides = [e for e in args.entries if "=" in e and not Path(e).exists()]
    sources = [Path(e) for e in args.entries if e not in overrides]
    if len(sources) < 2:
        raise UsageError("compare needs at least two configs or run folders")
    seeds = list(dict.fromkeys(args.seeds or [0]))
    check_counts(args, seeds)
    preset = PRESETS[args.preset]
    preset = replace(preset, **{k: v for k, v in (("num_images", args.num_images), ("num_real", args.num_real),
                                                  ("step_images", args.step_images), ("batch_size", args.batch_size)) if v is not None})
    check_compare_keys(overrides)
    check_device(args.device)
    flags = sampling_overrides(args)
    sampling = replace(preset.sampling, **{**sampling_keys(overrides, flags), **flags})
    check_sampling(sampling)
    out = Path(args.out)
    entries = [resolve_entry(src, out, [*preset.train_overrides, *overrides], seeds) for src in sources]
    for entry in entries:  # what training and the sampling after it will need, known now
        if entry.trained_here:
            check_training_fits(entry.cfg)
        for run in entry.runs:
            check_sampling_fits(entry.cfg.model.resolved(), args.device, run.results / "samples", sampling, preset.num_images, preset.batch_size)
    overrides = [o for o in overrides if not o.strip().startswith("sampling.")]  # they are in `sampling` now
    check_overrides_apply(entries, overrides)
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise UsageError(f"entries must have distinct names (config file or folder names), got {names}")
    check_same_data(entries)
    settings = CompareSettings(
        preset=args.preset, entries={e.name: str(e.source) for e in entries}, overrides=overrides, seeds=seeds,
        baseline=pick_baseline(entries, args.baseline), num_images=preset.num_images, num_real=preset.num_real,
        step_images=preset.step_images, sampling=sampling, kid=args.kid,
    )
    return settings, preset, entries


def check_counts(args: argparse.Namespace, seeds: list[int]) -> None:
    """Numbers that would otherwise fail only after training (a final FID of one image) or inside it."""
    low, high = bounds(rule_of(TrainingConfig, "seed").range)
    for seed in seeds:
        if not low <= seed <= high:
            raise UsageError(f"--seeds: a training seed must be in [{low}, {high}], got {seed}")
    for flag, value in (("--num-images", args.num_images), ("--num-real", args.num_real), ("--step-images", args.step_images)):
        if value is not None and value < 2:
            raise UsageError(f"{flag} must be at least 2 (FID needs a covariance), got {value}")
    for flag, value in (("--jobs", args.jobs), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")


# Keys compare sets for every run from its own flags: an override would be overwritten in the
# children or split what they compute during training from what compare scores.
COMPARE_KEYS = {"training.seed": "--seeds", "training.output_dir": "--out (runs go to OUT/<entry>/seed-<s>/run)",
                "training.eval_num_images": "--step-images", "training.eval_num_real": "--num-real"}


def check_compare_keys(overrides: list[str]) -> None:
    for override in overrides:
        key = override.partition("=")[0].strip()
        if key in COMPARE_KEYS:
            raise UsageError(f"{override}: compare sets {key} for every run; use {COMPARE_KEYS[key]}")


def check_overrides_apply(entries: list[Entry], overrides: list[str]) -> None:
    """Overrides other than ``sampling.*`` change how a config is trained: a finished run cannot take them."""
    finished = [e.name for e in entries if not e.trained_here]
    if overrides and finished:
        raise UsageError(f"{overrides[0]} changes how configs are trained, but {finished[0]} is a finished run it cannot "
                         f"apply to; train that run with it (or compare configs only)")


def sampling_keys(overrides: list[str], flags: dict) -> dict:
    """The ``sampling.*`` overrides as SamplingConfig fields: they apply to the runs' training (grids,
    FID over training) and to compare's scoring alike. A flag for the same field must agree."""
    raw: dict = {}
    for override in overrides:
        apply_override(raw, override)
    given = raw.get("sampling") or {}
    fields = {k: v for k, v in asdict(section_from_dict(SamplingConfig, given, "sampling")).items() if k in given}
    for key, value in fields.items():
        if key in flags and flags[key] != value:
            raise UsageError(f"{flag_of(key).name} {flags[key]} and sampling.{key}={given[key]} both set sampling.{key}; give it once")
    return fields


TRAINING_POLL_S = 5.0  # how often the other processes of a launch look whether the main one has trained the runs
SEED_FIELD = "{seed}"  # in a run-folder entry: one finished run per training seed


def resolve_entry(source: Path, out: Path, overrides: list[str], seeds: list[int]) -> Entry:
    if SEED_FIELD in str(source):
        return seeded_runs_entry(source, out, seeds)
    if source.is_dir():
        if len(seeds) > 1:
            raise UsageError(
                f"{source} is one finished run (one seed); --seeds {' '.join(map(str, seeds))} needs configs to train, "
                f"or a folder pattern with {SEED_FIELD} in place of the seed (e.g. runs/teacher-seed-{SEED_FIELD})"
            )
        cfg = finished_run_config(source)
        seed = cfg.training.seed
        return Entry(source.name, source, cfg, [Run(seed, source, out / source.name / f"seed-{seed}")], trained_here=False)
    if source.suffix not in (".yaml", ".yml") or not source.is_file():
        raise UsageError(f"{source} is neither a YAML config nor a run folder written by `atdiff train`")
    cfg = load_config(source, overrides)  # checked here, before any work
    runs = [Run(seed, out / source.stem / f"seed-{seed}" / "run", out / source.stem / f"seed-{seed}") for seed in seeds]
    return Entry(source.stem, source, cfg, runs, trained_here=True)


def finished_run_config(folder: Path) -> ExperimentConfig:
    if not (folder / "model_index.json").is_file() or not (folder / "config.yaml").is_file():
        raise UsageError(f"{folder} is not a finished `atdiff train` run (needs model_index.json and config.yaml)")
    return load_config(folder / "config.yaml")


def seeded_runs_entry(pattern: Path, out: Path, seeds: list[int]) -> Entry:
    """Runs finished elsewhere, one per seed (``runs/student-seed-{seed}``): how runs that compare cannot
    train itself (each fine-tuned from its own seed's teacher, say) enter a comparison over seeds."""
    name = seeded_entry_name(pattern)
    runs, configs = [], []
    for seed in seeds:
        folder = Path(str(pattern).replace(SEED_FIELD, str(seed)))
        configs.append(finished_run_config(folder))
        if configs[-1].training.seed != seed:  # seed i of every entry must form a pair
            raise UsageError(f"{folder} was trained with training.seed={configs[-1].training.seed}, not {seed} as its name says")
        runs.append(Run(seed, folder, out / name / f"seed-{seed}"))
    return Entry(name, pattern, configs[0], runs, trained_here=False)


def seeded_entry_name(pattern: Path) -> str:
    """The entry's name: the pattern's first part holding the seed, without it (``teacher-seed-{seed}``:
    ``teacher-seed``), or the folder above when nothing else is left (``distilled/seed-{seed}/run``: ``distilled``)."""
    parts = pattern.parts
    first = next(i for i, part in enumerate(parts) if SEED_FIELD in part)
    name = parts[first].replace(SEED_FIELD, "").strip("-_. ")
    if name in ("", "seed") and first > 0:
        name = parts[first - 1]
    if not name or name in (".", ".."):
        raise UsageError(f"{pattern}: name the folder that holds the seeded runs (e.g. runs/teacher/seed-{SEED_FIELD})")
    return name


def pick_baseline(entries: list[Entry], name: str | None) -> str:
    names = [e.name for e in entries]
    if name is not None:
        if name not in names:
            raise UsageError(f"--baseline {name!r} is not an entry; the entries are {names}")
        return name
    mixers = [e.cfg.model.resolved().get("token_mixer") for e in entries]
    return names[mixers.index("attention")] if "attention" in mixers else names[0]


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
        previous = read_json_object(record, "it is compare's record of this folder: restore it, or use another --out").get("settings")
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


def stored(path: Path, compute, shared: bool = True) -> dict:
    """A stage's result: read if a previous run finished it, else computed and stored atomically by
    the main process; ``shared``: computed by every process of a launch (sampling and scoring are
    split over them), else by the calling process alone."""
    state = process_state()
    if shared:
        state.wait_for_everyone()  # every process sees the same files: all compute, or none
    if path.is_file():
        return read_json_object(path, "delete it, and this stage is computed again")
    result = compute()
    if state.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(result, indent=2) + "\n")
    return result


def train_overrides(preset: Preset, settings: CompareSettings) -> list[str]:
    """Config overrides of every run trained here: the preset's, the user's, and the comparison's
    sampling and FID settings, so the FID the runs compute during training is the one compared."""
    sampling = settings.sampling.as_overrides()
    evals = [f"training.eval_num_images={settings.step_images}", f"training.eval_num_real={json.dumps(settings.num_real)}"]
    return [*preset.train_overrides, *sampling, *evals, *settings.overrides]


def train_runs(entries: list[Entry], overrides: list[str], jobs: int) -> None:
    """``atdiff train`` for every run not finished yet, in child processes, ``jobs`` at a time;
    ``--resume latest`` continues an interrupted run."""
    pending = [(e, r) for e in entries if e.trained_here for r in e.runs if not (r.run_dir / "model_index.json").is_file()]
    if not pending:
        return
    env = child_environment(thread_environment(jobs))
    children = ChildProcesses()
    with children.forwarding_sigterm(), ThreadPoolExecutor(max_workers=jobs) as pool:
        failures = list(pool.map(lambda job: train_run(*job, overrides, env, jobs > 1, children), pending))
    failed = [f"{entry.name} seed {run.seed} ({failure})" for (entry, run), failure in zip(pending, failures) if failure]
    if failed:
        raise UsageError(f"training stopped: {'; '.join(failed)}; see train.log in each run's comparison folder, "
                         f"then rerun the same compare command to resume")


def train_run(entry: Entry, run: Run, overrides: list[str], env: dict, parallel: bool, children: ChildProcesses) -> str | None:
    """One ``atdiff train`` child, its output appended to ``train.log`` (and, when it runs alone, shown
    live); None when it succeeded, else its exit code and last error line."""
    command = [sys.executable, "-m", "atdiff", "train", "--config", str(entry.source), "--resume", "latest", *overrides,
               f"training.seed={run.seed}", f"training.output_dir={json.dumps(str(run.run_dir))}"]
    log = run.results / "train.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = log.stat().st_size if log.exists() else 0  # the log keeps earlier attempts: read only this one
    # Parallel runs would interleave their progress bars: those only write their logs.
    print(f"[{entry.name} seed {run.seed}] training, log in {log}" + ("" if parallel else f": {shlex.join(command[2:])}"), flush=True)
    code = children.call(command, log, echo=not parallel, env=env)
    if parallel:
        print(f"[{entry.name} seed {run.seed}] training {'done' if code == 0 else f'stopped (exit code {code})'}", flush=True)
    return f"exit code {code}: {last_error(log, start)}" if code else None


def last_error(log: Path, start: int = 0) -> str:
    """What a failed child said last in ``log`` after byte ``start``: its ``atdiff ...: error:`` line, else
    its last line (a traceback's exception). Progress bars redraw with carriage returns: those end lines too."""
    with open(log, "rb") as file:
        file.seek(max(file.seek(0, os.SEEK_END) - 65536, start))
        lines = [line.strip() for line in file.read().decode(errors="replace").replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("atdiff ") and ": error: " in line]
    return (errors or lines or ["no output"])[-1]


def follow(log: Path, start: int, process: subprocess.Popen) -> None:
    """Copy what ``process`` appends to ``log`` after byte ``start`` to stdout until it ends (``tail -f``)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a chunk may end inside a character
    with open(log, "rb") as reader:
        reader.seek(start)
        while True:
            ended = process.poll() is not None  # before reading: what it wrote last is read after it ended
            if chunk := reader.read(65536):
                sys.stdout.write(decoder.decode(chunk))
                sys.stdout.flush()
            elif ended:
                return
            else:
                time.sleep(0.2)


class ChildProcesses:
    """The trainings compare runs as child processes. A Ctrl-C reaches them already (the terminal signals
    the whole foreground process group), but a SIGTERM (``timeout``, a batch scheduler, ``kill``) reaches
    compare alone, and by default Python dies at once and leaves them training on as orphans: it is
    passed on (``forwarding_sigterm``). A SIGKILL cannot be caught: children started with
    ``atdiff.processes.child_environment`` get SIGTERM from the kernel when compare dies."""

    def __init__(self):
        self.live: set[subprocess.Popen] = set()
        self.lock = threading.Lock()

    def call(self, command: list[str], log: Path | None = None, echo: bool = True, **kwargs) -> int:
        """Run ``command`` to its end; with a ``log``, its output (stdout and stderr) is appended to it
        and, with ``echo``, copied to this process's stdout as it comes. The child writes the file itself,
        not a pipe to compare: killed with compare, it can still say so and save its checkpoint."""
        start = log.stat().st_size if log is not None and log.exists() else 0
        with open(log, "ab") if log is not None else contextlib.nullcontext() as file:
            output = {"stdout": file, "stderr": subprocess.STDOUT} if file is not None else {}
            with self.lock:
                process = subprocess.Popen(command, **output, **kwargs)
                self.live.add(process)
        try:
            if log is not None and echo:
                follow(log, start, process)
            return process.wait()
        finally:
            with self.lock:
                self.live.discard(process)

    def terminate(self) -> None:
        """SIGTERM every live child (``atdiff train`` saves a checkpoint after its step) and wait for them."""
        with self.lock:
            processes = list(self.live)
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait()

    @contextlib.contextmanager
    def forwarding_sigterm(self):
        def on_sigterm(signum, frame):
            self.terminate()
            raise SystemExit(128 + signum)

        try:
            previous = signal.signal(signal.SIGTERM, on_sigterm)
        except ValueError:  # not the main thread: whoever owns the signals handles them
            yield
            return
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)


def thread_environment(jobs: int) -> dict | None:
    """The environment of ``jobs`` parallel trainings: the cores split between them (OpenMP threads
    beyond a process's share only contend); None (inherit) for one job."""
    if jobs == 1:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = str(max(cores // jobs, 1))
    return {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


def fid_of(pipeline, folder: Path, record: SampleRecord, settings: CompareSettings, data, num_images: int, batch_size: int, device: str) -> dict:
    sample_into_folder(pipeline, folder, record, num_images, batch_size, device)
    return compute_metrics(dataset_spec(data, settings.num_real), str(folder), num_fake=num_images,
                           metrics=MetricChoices(kid=settings.kid), extractor=ExtractorSettings(device=device))


def final_fid(entry: Entry, run: Run, settings: CompareSettings, batch_size: int, device: str) -> dict:
    record = SampleRecord(str(run.run_dir.resolve()), settings.sampling)
    return stored(run.results / "fid.json", lambda: fid_of(
        run.run_dir, run.results / "samples", record, settings, entry.cfg.data, settings.num_images, batch_size, device))


def fid_by_step(entry: Entry, run: Run, settings: CompareSettings, batch_size: int, device: str) -> list[dict]:
    """FID of the EMA weights at every checkpoint: the run's own evals when it made them with these
    settings, else each checkpoint sampled here. Results stay under ``OUT/<entry>/seed-<s>/``."""
    evals = evals_from_training(run.run_dir, settings)
    if evals:
        return evals
    points = []
    for step, checkpoint in list_checkpoints(run.run_dir):
        def compute(step=step, checkpoint=checkpoint):
            pipe = use_scheduler(pipeline_at_checkpoint(checkpoint), settings.sampling.scheduler)
            record = SampleRecord(str(checkpoint.resolve()), settings.sampling)
            folder = run.results / f"samples-step-{step}"
            return {"step": step, **fid_of(pipe, folder, record, settings, entry.cfg.data, settings.step_images, batch_size, device)}

        points.append(stored(run.results / f"fid-step-{step}.json", compute))
    return points


def evals_from_training(run_dir: Path, settings: CompareSettings) -> list[dict] | None:
    """The FIDs the run computed during training (``training_stats.json``), if made with the
    comparison's sample count, reference set and sampling settings (and KID when it wants KID)."""
    evals = read_stats(run_dir).get("evals")
    wanted = {"num_fake": settings.step_images, "num_real_asked": settings.num_real, "sampling": asdict(settings.sampling)}
    if not evals or any({k: e.get(k) for k in wanted} != wanted or (settings.kid and "kid_mean" not in e) for e in evals):
        return None
    return evals


def sampling_speed(run_dir: str, sampling: dict, batch: int, repeats: int, device: str) -> dict:
    """Median images/s over ``repeats`` timed batches after a warm-up, whose peak memory is the
    model's (weights + what sampling allocates); runs in a fresh process."""
    torch.manual_seed(0)
    sampling = SamplingConfig(**sampling)
    pipe = load_pipeline(Path(run_dir), sampling.scheduler, device)
    pipe.set_progress_bar_config(disable=True)

    def call():  # what the FID scored: images 0..batch-1 of these settings
        draw(pipe, sampling, range(batch))

    modules = [c for c in pipe.components.values() if isinstance(c, torch.nn.Module)]
    memory = model_peak_memory(call, torch.device(device), module_tensors(*modules))  # also the warm-up
    rates = [batch / timed(call, torch.device(device)) for _ in range(repeats)]
    return {"images_per_s": statistics.median(rates), "images_per_s_std": statistics.stdev(rates) if repeats > 1 else None,
            "batch": batch, "steps": sampling.num_inference_steps, "repeats": repeats, **memory,
            **process_peak_memory(torch.device(device))}


def measure_in_child(fn, *args) -> dict:
    # "spawn": a fresh interpreter, so the process figures are this model's process alone.
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


# ------------------------------------------------------------------------------------------------
# Command
# ------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    settings, preset, entries = settings_from_args(args)
    out = Path(args.out)
    state = process_state()
    with trained_by_main_process(out, state):
        if state.is_main_process:
            claim_comparison(out, settings)
            train_runs(entries, train_overrides(preset, settings), args.jobs)
    results = {entry.name: evaluate_entry(entry, settings, preset, args.device) for entry in entries}
    if state.is_main_process:
        command = json.loads((out / "compare.json").read_text())["command"]
        write_report(out, settings, command, results, mixer_differences(entries), jobs=args.jobs)
        print(f"report: {out / 'report.md'}")
    state.wait_for_everyone()
    return 0


@contextlib.contextmanager
def trained_by_main_process(out: Path, state):
    """Under ``accelerate launch`` the main process trains the runs (as child processes) while the
    others wait; then all of them sample and score. They wait on a file, not a collective, since
    training outlasts a process group's timeout; a failure of the main process ends the launch."""
    if state.num_processes == 1:
        yield
        return
    token = broadcast_object_list([uuid.uuid4().hex if state.is_main_process else None])[0]
    done = temp_path(out / f"trained-{token}")  # out exists once the main process has claimed it
    if state.is_main_process:
        yield
        done.touch()
    else:
        yield
        while not done.exists():
            time.sleep(TRAINING_POLL_S)
    state.wait_for_everyone()
    if state.is_main_process:
        done.unlink()


def evaluate_entry(entry: Entry, settings: CompareSettings, preset: Preset, device: str) -> dict:
    runs = {}
    for run in entry.runs:
        fid = final_fid(entry, run, settings, preset.batch_size, device)
        steps = fid_by_step(entry, run, settings, preset.batch_size, device)
        training = read_stats(run.run_dir)
        runs[str(run.seed)] = {"run_dir": str(run.run_dir), "fid": fid, "fid_by_step": steps, "training": training}
        if process_state().is_main_process:
            print(f"[{entry.name} seed {run.seed}] FID {fid['fid']:.2f}", flush=True)
    # Sampling cost depends on the architecture, not on the trained weights: measured once per entry.
    first = entry.runs[0]
    if not process_state().is_main_process:  # one process times one device; the report is the main one's
        return {}
    speed = stored(first.results.parent / "sampling_speed.json", lambda: measure_in_child(
        sampling_speed, str(first.run_dir), asdict(settings.sampling), preset.speed_batch, preset.speed_repeats, device),
        shared=False)
    print(f"[{entry.name}] sampling {speed['images_per_s']:.2f} img/s, model {speed['model_memory_mb']:.0f} MB", flush=True)
    training = runs[str(first.seed)]["training"]
    return {"source": str(entry.source), "token_mixer": entry.cfg.model.resolved().get("token_mixer"),
            "params": training.get("params") or param_count(first.run_dir), "sampling": speed, "runs": runs}


def param_count(run_dir: Path) -> int:
    return sum(p.numel() for p in load_pipeline(run_dir, None, "cpu").model.parameters())
