"""Bad input to every subcommand: one line, exit status 2, no traceback, nothing written.

Each row of ``CASES`` is one adversarial input (a flag, a config key, a file atdiff reads that was
edited by hand). The command runs in-process on copies of tiny fixtures inside the test's own
folder, which is snapshotted before and after: a refusal must leave every file as it was. Inputs
that scale memory or time (``--steps 1000000000``) must be refused from an estimate, never reach
the allocator; the test runs under a 12 GiB address-space limit so that a regression fails fast
instead of exhausting the machine.
"""

from __future__ import annotations

import copy
import io
import json
import os
import resource
import shlex
import shutil
import signal
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image
from safetensors.torch import load

from assets import needs_fashion_mnist
from atdiff.cli import main
from atdiff.eval.fid_statistics import FEATURE_DIM
from atdiff.generation.folder import SETTINGS_FILE
from atdiff.integrity import write_pipeline_manifest
from atdiff.pipelines import ImageDiffusionPipeline
from atdiff.training.checkpoint import list_checkpoints, write_checkpoint_manifest
from atdiff.training.run_dir import LOCK_NAME
from test_pipelines import tiny_dit
from test_training import TINY

pytestmark = needs_fashion_mnist

REPO = Path(__file__).resolve().parents[1]
BIG = "1000000000"  # a count that scales time or memory far past any machine's


@dataclass
class Workspace:
    """The paths a case's command line names (``{config}``, ``{pipe}``, ``{run}``, ``{out}``), all under ``root``."""

    root: Path

    def __post_init__(self):
        self.config, self.pipe, self.run, self.out = (self.root / name for name in ("tiny.yaml", "pipe", "run", "out"))

    def checkpoint(self) -> Path:
        return list_checkpoints(self.run)[-1][1]


# ------------------------------------------------------------------------------------------------
# Tampering with the fixtures (a case's set-up, before the snapshot)
# ------------------------------------------------------------------------------------------------


def edit_pipe_json(name: str, **values) -> Callable[[Workspace], None]:
    """Set ``values`` in ``{pipe}/name`` and re-sign the manifest: the file verifies, its content is bad."""
    def setup(w: Workspace) -> None:
        path = w.pipe / name
        path.write_text(json.dumps({**json.loads(path.read_text()), **values}))
        write_pipeline_manifest(w.pipe)
    return setup


def write_file(relative: str, text: str, *more: str) -> Callable[[Workspace], None]:
    """Write ``text`` to ``relative`` (and the next pairs of ``more``), making folders as needed."""
    def setup(w: Workspace) -> None:
        for name, content in zip((relative, *more[::2]), (text, *more[1::2])):
            (w.root / name).parent.mkdir(parents=True, exist_ok=True)
            (w.root / name).write_text(content)
    return setup


def edit_checkpoint(edit: Callable[[Path], None]) -> Callable[[Workspace], None]:
    """Change the run's checkpoint with ``edit`` and re-sign its manifest, as a forger would."""
    def setup(w: Workspace) -> None:
        checkpoint = w.checkpoint()
        edit(checkpoint)
        write_checkpoint_manifest(checkpoint, int(checkpoint.name.split("-")[1]))
    return setup


def progress_images_seen(checkpoint: Path) -> None:
    path = checkpoint / "progress.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "images_seen": 10**31}))


def pickled_weights(checkpoint: Path) -> None:
    weights = load((checkpoint / "model.safetensors").read_bytes())  # not mmapped: the file is overwritten
    torch.save(weights, checkpoint / "model.safetensors")


def bad_rng_structure(checkpoint: Path) -> None:
    from atdiff.training.tensor_tree import save_tree

    save_tree(checkpoint / "rng-0.safetensors", {"python": [1, 2], "numpy": "x", "torch": torch.zeros(3)})


def link_in_run(name: str) -> Callable[[Workspace], None]:
    """``{run}/name`` a link to a folder outside the run (which must stay untouched)."""
    def setup(w: Workspace) -> None:
        target = w.root / f"elsewhere-{name}"
        target.mkdir()
        shutil.rmtree(w.run / name, ignore_errors=True)
        (w.run / name).symlink_to(target, target_is_directory=True)
    return setup


def killed_run(image: Callable[[Path], None], suffix: str = ".npz") -> Callable[[Workspace], None]:
    """What a killed ``sample --out {root}/out.npz --num-images 2`` (or ``out.png``, by ``suffix``) leaves,
    its record and both images, with image 1 then replaced by ``image(path)``: only the file is left to assemble."""
    def setup(w: Workspace) -> None:
        partial = w.root / f"out{suffix}.partial"
        assert main(["sample", str(w.pipe), "--out", str(partial), "--num-images", "2", "--device", "cpu"]) == 0
        record = json.loads((partial / SETTINGS_FILE).read_text())
        (partial / SETTINGS_FILE).write_text(json.dumps({**record, "num_images": 2}))
        image(partial / "000001.png")
    return setup


def png_of(mode: str, size: int = 8, format: str = "PNG") -> Callable[[Path], None]:
    return lambda path: Image.new(mode, (size, size)).save(path, format=format)


def truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:70])


def statistics_files(**fake) -> Callable[[Workspace], None]:
    """{root}/real.npz, valid FID statistics, and {root}/fake.npz: the same with ``fake``'s members
    (an ndarray; None: left out; a (shape, dtype) pair: an .npy header claiming it, without the data)."""
    def setup(w: Workspace) -> None:
        members = {"mu": np.zeros(FEATURE_DIM, np.float32), "sigma": np.eye(FEATURE_DIM, dtype=np.float32)}
        np.savez(w.root / "real.npz", **members)
        with zipfile.ZipFile(w.root / "fake.npz", "w") as archive:
            for name, value in {**members, **fake}.items():
                if value is None:
                    continue
                buffer = io.BytesIO()
                if isinstance(value, tuple):
                    np.lib.format.write_array_header_1_0(buffer, {"descr": value[1], "fortran_order": False, "shape": value[0]})
                else:
                    np.lib.format.write_array(buffer, value, allow_pickle=False)
                archive.writestr(f"{name}.npy", buffer.getvalue())
    return setup


def bench_config(text: str) -> Callable[[Workspace], None]:
    return write_file("bench.yaml", text)


# ------------------------------------------------------------------------------------------------
# The table: (command line, set-up); {config} {pipe} {run} {out} {root} name workspace paths
# ------------------------------------------------------------------------------------------------

TRAIN = "train --config {config} --output-dir {out}"
MAIN_TRAIN = "train --config {repo}/configs/fashion-mnist-dit-t4-atconv.yaml --output-dir {out}"
RESUME = "train --config {run}/config.yaml --output-dir {run} --resume latest"
SAMPLE = "sample {pipe} --out {out} --num-images 2 --device cpu"
FID = "fid {pipe} {pipe} --num-real 2 --num-fake 2 --device cpu"
FID_STATS = "fid {root}/real.npz {root}/fake.npz --device cpu"
SAMPLE_NPZ = "sample {pipe} --out {root}/out.npz --num-images 2 --device cpu"
COMPARE = "compare {config} {root}/tiny2.yaml --out {out} --device cpu"
PYTHON_TAG = "!!python/object/apply:os.system ['echo pwned']"

CASES: dict[str, list[tuple[str, Callable[[Workspace], None] | None]]] = {
    "train": [
        (f"{TRAIN} objective.num_train_timesteps={BIG}", None),
        (f"{TRAIN} sampling.num_inference_steps={BIG}", None),
        (f"{TRAIN} training.num_sample_images=100000000", None),
        (f"{MAIN_TRAIN} data.resolution=4096 model.sample_size=4096", None),
        (f"{TRAIN} training.batch_size=100000000", None),
        (f"{TRAIN} model.size=4", None),
        (f"{TRAIN} sampling.seed=18446744073709551616", None),
        (f"{TRAIN} training.seed=-1", None),
        (f"{TRAIN} training.learning_rate=nan", None),
        (f"{TRAIN} --max-steps 0", None),
        (f"{TRAIN} --resume checkpoint-9", None),
        (f"{TRAIN} model.init_from={{root}}/broken", write_file("broken/config.json", "{not json")),
        (f"{TRAIN} objective.distill_from={{pipe}}", write_file("pipe/model_index.json", "[]")),
        (RESUME, write_file("run/training_stats.json", "{garbled")),
        (RESUME, write_file("run/training_stats.json", "[1, 2]")),
        (RESUME, edit_checkpoint(progress_images_seen)),
        (RESUME, edit_checkpoint(pickled_weights)),
        (RESUME, edit_checkpoint(bad_rng_structure)),
        (RESUME, link_in_run("logs")),
        (RESUME, link_in_run("samples")),
        (RESUME, link_in_run("evals")),
        (RESUME, link_in_run("abandoned")),
    ],
    "sample": [
        (f"{SAMPLE} --steps {BIG}", None),
        ("sample {pipe} --out {out} --num-images 100000000000 --device cpu", None),
        (f"{SAMPLE} --num-images 100000000 --batch-size 100000000", None),
        ("sample {pipe} --out {out}.png --num-images 10000000000 --device cpu", None),
        (f"{SAMPLE} --seed 18446744073709551616", None),
        (f"{SAMPLE} --seed -1", None),
        (f"{SAMPLE} --device bogus", None),
        (f"{SAMPLE} --guidance nan", None),
        (f"{SAMPLE} --class-labels 99", None),
        (f"{SAMPLE} --guidance-channels 0", None),
        (SAMPLE, write_file("pipe/config.yaml", f"sampling: {PYTHON_TAG}\n")),
        (SAMPLE, write_file("pipe/config.yaml", "- 1\n- 2\n")),
        (SAMPLE, write_file("pipe/config.yaml", "sampling: [1, 2]\n")),
        (SAMPLE, write_file("pipe/config.yaml", "sampling: {num_inference_steps: 1000000000}\n")),
        (SAMPLE, write_file("pipe/config.yaml", "{unclosed: [\n")),
        (SAMPLE, edit_pipe_json("model_index.json", prediction_type="evil")),
        (SAMPLE, edit_pipe_json("model_index.json", prediction_type=["x"])),
        (SAMPLE, edit_pipe_json("scheduler/scheduler_config.json", num_train_timesteps=int(BIG))),
        (SAMPLE, edit_pipe_json("model/config.json", sample_size=65536)),
        ("sample {pipe} --out {out}/x.gif --num-images 2 --device cpu", None),
        (SAMPLE_NPZ, killed_run(png_of("I;16"))),
        (SAMPLE_NPZ, killed_run(png_of("P"))),
        (SAMPLE_NPZ, killed_run(png_of("L", format="JPEG"))),
        (SAMPLE_NPZ, killed_run(truncated)),
        (SAMPLE_NPZ, killed_run(png_of("L", size=16))),
        (SAMPLE_NPZ.replace(".npz", ".png"), killed_run(png_of("RGB"), ".png")),
    ],
    "fid": [
        (f"{FID} --steps {BIG}", None),
        ("fid {pipe} {pipe} --num-real 2 --num-fake 100000000000 --device cpu", None),
        (f"{FID} --num-fake 100000000 --sample-batch-size 100000000", None),
        (f"{FID} --seed 18446744073709551616", None),
        (f"{FID} --device bogus", None),
        (f"{FID} --batch-size 0", None),
        ("fid {root}/missing {pipe} --num-fake 2 --device cpu", None),
        ("fid {pipe} --save-stats {root}/stats.txt --num-real 2", None),
        (FID, write_file("pipe/config.yaml", f"sampling: {PYTHON_TAG}\n")),
        (f"{FID} --sample-batch-size 0", None),
        (FID_STATS, statistics_files(mu_s=np.zeros(7))),
        (FID_STATS, statistics_files(num_images=np.arange(3))),
        (FID_STATS, statistics_files(mu=np.zeros(FEATURE_DIM, np.complex64))),
        (FID_STATS, statistics_files(sigma=((10**6, 10**6), "<f8"))),
        (FID_STATS, statistics_files(sigma=None)),
        ("fid {root}/real.npz npz:{root}/empty.npz --device cpu",
         lambda w: (statistics_files()(w), np.savez(w.root / "empty.npz", arr_0=np.zeros((4, 0, 0, 3), np.uint8)))),
        ("fid {pipe} {root}/samples --num-real 2 --num-fake 100000000000 --device cpu",
         lambda w: main(["sample", str(w.pipe), "--out", str(w.root / "samples"), "--num-images", "2", "--device", "cpu"])),
    ],
    "compare": [
        (f"{COMPARE} --device bogus", None),
        (f"{COMPARE} --seed 18446744073709551616", None),
        (f"{COMPARE} --seeds -1", None),
        (f"{COMPARE} --steps {BIG}", None),
        (f"{COMPARE} --num-images 100000000000", None),
        (f"{COMPARE} --num-images 100000000 --batch-size 100000000", None),
        (f"{COMPARE} --jobs 0", None),
        (f"{COMPARE} objective.num_train_timesteps={BIG}", None),
        (f"{COMPARE} training.num_sample_images=100000000", None),
        (f"{COMPARE} --baseline nobody", None),
        (COMPARE, write_file("out/compare.json", "{garbled")),
        (COMPARE, write_file("out/compare.json", "[]")),
    ],
    "bench": [
        ("bench --out {out} --budget-s nan", None),
        ("bench --out {out} --max-call-s inf", None),
        ("bench --out {out} --config {root}/bench.yaml", bench_config(f"seed: {PYTHON_TAG}\n")),
        ("bench --out {out} --config {root}/bench.yaml", bench_config("- 1\n")),
        ("bench --out {out} --config {root}/bench.yaml", bench_config("budget_s: .nan\n")),
        ("bench --out {out} --config {root}/bench.yaml", bench_config("{unclosed: [\n")),
        ("bench --out {out} --batch 100000000 --studies mixers --config {root}/bench.yaml", bench_config("max_batch_tokens: 100000000000000\n")),
        ("bench --out {out} --tokens 1099511627776 --studies mixers", None),
        ("bench --out {out} --model-batch 100000000 --studies models --config {root}/bench.yaml",
         bench_config("model_max_batch_tokens: 100000000000000\n")),
        ("bench --out {out} --device bogus", None),
        ("bench --out {out} --stem ../escape", None),
        ("bench --out {out} --config {root}/bench.yaml", bench_config("seed: 18446744073709551616\n")),
    ],
    "info": [
        ("info --config {config} --batch-size 100000000 --device cpu", None),
        ("info --config {repo}/configs/fashion-mnist-dit-t4-atconv.yaml --device cpu data.resolution=4096 model.sample_size=4096", None),
        ("info --config {config} --device cpu model.size=4", None),
        ("info --config {config} --device bogus", None),
        (f"info --config {{config}} --device cpu --repeats {BIG}", None),
        ("info --config {root}/bench.yaml --device cpu", bench_config(f"model: {PYTHON_TAG}\n")),
    ],
    "import": [
        ("import {root}/missing.pt --out {out}", None),
        ("import {root}/garbage.pt --out {out}", write_file("garbage.pt", "not a zip")),
        ("import {pipe} --out {pipe}", None),
        ("import {root}/broken --out {out}", write_file("broken/model_index.json", "{}", "broken/transformer/config.json", "[")),
        ("import {pipe} --out {out} --size 4", None),
        ("import {pipe} --out {out} --sample-size 65536", None),
    ],
    "export": [
        ("export {pipe} --to dit --out {pipe}/model", None),
        ("export {root}/missing --to dit --out {out}.pt", None),
        ("export {pipe} --to dit --out {out}.pt", edit_pipe_json("model_index.json", prediction_type="evil")),
    ],
    "encode": [
        ("encode --config {config}", None),
        ("encode --config {config} --batch-size 0", None),
        ("encode --config {root}/bench.yaml", bench_config(f"data: {PYTHON_TAG}\n")),
    ],
    "card": [
        ("card {pipe}", None),
        ("card {run} --out {pipe}", None),
        ("card {run}", write_file("run/training_stats.json", "{garbled")),
        ("card {run}", write_file("run/config.yaml", f"model: {PYTHON_TAG}\n")),
    ],
    "push": [
        ("push {run} not/a/valid/id", None),
        ("push {pipe} user/model", None),
        ("push {run} user/model", write_file("run/training_stats.json", "[]")),
    ],
}

TABLE = [pytest.param(command, line, setup, id=f"{command}-{i}") for command, rows in CASES.items() for i, (line, setup) in enumerate(rows)]


# ------------------------------------------------------------------------------------------------
# Fixtures and the test
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A tiny pipeline folder and a one-step `atdiff train` run, copied into each case's workspace."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("sources")
    pipe = root / "pipe"
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    ImageDiffusionPipeline(model=tiny_dit(), scheduler=scheduler).save_pretrained(pipe)
    raw = tiny_config(root / "run", max_steps=1, checkpoint_every=1, sample_every=0)
    (root / "run.yaml").write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(root / "run.yaml")]) == 0
    yield pipe, root / "run"
    torch.set_num_threads(threads)


def tiny_config(output_dir: Path, **training) -> dict:
    raw = copy.deepcopy(TINY)
    raw["training"].update(output_dir=str(output_dir), **training)
    return raw


@pytest.fixture
def workspace(sources, tmp_path, monkeypatch) -> Workspace:
    monkeypatch.chdir(tmp_path)  # defaults (bench's ./bench, outputs/) land inside the snapshot
    monkeypatch.setenv("ATDIFF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    w = Workspace(tmp_path)
    shutil.copytree(sources[0], w.pipe)
    shutil.copytree(sources[1], w.run, symlinks=True)
    for name in ("tiny.yaml", "tiny2.yaml"):
        raw = tiny_config(tmp_path / "unused", max_steps=1)
        if name == "tiny2.yaml":
            raw["model"]["token_mixer"] = "attention"
        (tmp_path / name).write_text(yaml.safe_dump(raw))
    return w


def not_an_output(relative: Path) -> bool:
    """Written by any run of its command, bad input or not: the run lock records the PID of whoever
    takes it (checkpoints are verified under it), and `fid` converts the Inception weights once into atdiff's cache."""
    return relative.name == LOCK_NAME or relative.parts[:2] in (("cache",), ("cache", "inception"))


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (links not followed) with its kind, size and modification time."""
    entries = {}
    for path in sorted(root.rglob("*")):
        if not_an_output(path.relative_to(root)):
            continue
        info = path.lstat()
        entries[str(path.relative_to(root))] = (info.st_mode, info.st_size if not path.is_dir() else 0, info.st_mtime_ns)
    return entries


class Hang(Exception):
    pass


@pytest.fixture(autouse=True)
def bounded():
    """A regression that reaches the allocator fails with MemoryError here rather than taking the machine,
    and one that starts the work it should have refused fails after a minute rather than hanging."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = 12 * 2**30
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))

    def hang(signum, frame):
        raise Hang("still running after 60 s")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.mark.parametrize("command, line, setup", TABLE)
def test_bad_input_is_one_line(command, line, setup, workspace, capsys):
    if setup is not None:
        setup(workspace)
    argv = shlex.split(line.format(config=workspace.config, pipe=workspace.pipe, run=workspace.run, out=workspace.out, root=workspace.root, repo=REPO))
    assert argv[0] == command
    before = snapshot(workspace.root)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse refuses a flag's type with exit status 2 itself
        code = exit.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert code == 2, err
    errors = [text for text in err.splitlines() if text.startswith(f"atdiff {command}: error:")]
    assert len(errors) == 1, err
    assert snapshot(workspace.root) == before, f"{line} changed files"
