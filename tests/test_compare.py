"""`atdiff compare` on tiny configs: a complete report over two seeds, resumed without redoing
finished stages; finished run folders as entries."""

import argparse
import json
import shutil
from pathlib import Path

import pytest

from assets import needs_fid_assets
from atdiff.cli import main
from atdiff.eval import compare as compare_module

pytestmark = needs_fid_assets

CONFIGS = Path(__file__).parents[1] / "configs"
TINY = [
    "model.size=XS/4", "model.sample_size=16", "data.resolution=16", "training.batch_size=8",
    "training.max_steps=4", "training.checkpoint_every=2", "training.eval_every=2", "training.log_with=none",
    "training.num_sample_images=2",
]
SEEDS = ["--seeds", "0", "1"]
SMALL = ["--num-images", "8", "--num-real", "16", "--step-images", "6", "--steps", "2", "--batch-size", "8"]


def compare(out, *extra):
    pair = [str(CONFIGS / f"fashion-mnist-dit-t4-{mixer}.yaml") for mixer in ("attention", "atconv")]
    return main(["compare", *pair, *TINY, "--out", str(out), *SMALL, "--device", "cpu", *extra])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:  # module-wide: a fresh cache, not the user's
        mp.setenv("ATDIFF_CACHE", str(tmp_path_factory.mktemp("cache")))
        out = tmp_path_factory.mktemp("compare")
        assert compare(out, *SEEDS, "--jobs", "2") == 0
        yield out


def test_report_is_complete(finished):
    report = json.loads((finished / "report.json").read_text())
    assert report["config_differences"] == ["model.token_mixer"]
    assert set(report["entries"]) == {"fashion-mnist-dit-t4-attention", "fashion-mnist-dit-t4-atconv"}
    for entry in report["entries"].values():
        assert list(entry["runs"]) == ["0", "1"]
        for run in entry["runs"].values():
            assert run["fid"]["fid"] > 0 and run["fid"]["num_fake"] == 8 and run["fid"]["num_real"] == 16
            assert [p["step"] for p in run["fid_by_step"]] == [2, 4]
            # FID over training comes from the runs' own evals (same sample count, reference and sampler)
            assert run["fid_by_step"] == json.loads((Path(run["run_dir"]) / "training_stats.json").read_text())["evals"]
            assert run["training"]["images_per_s"] > 0 and entry["params"] > 0
        assert 0 < entry["sampling"]["model_memory_mb"] < entry["sampling"]["process_peak_mb"]
        assert entry["sampling"]["images_per_s"] > 0
        # two training seeds, two models: different numbers, summarised with a spread
        assert entry["runs"]["0"]["fid"]["fid"] != entry["runs"]["1"]["fid"]["fid"]
        assert entry["summary"]["fid"]["n"] == 2 and entry["summary"]["fid"]["std"] > 0
    attention, atconv = (report["entries"][f"fashion-mnist-dit-t4-{m}"] for m in ("attention", "atconv"))
    assert atconv["params"] < attention["params"]
    comparison = report["comparisons"]["fashion-mnist-dit-t4-atconv - fashion-mnist-dit-t4-attention"]
    for metric in ("fid", "fid_over_training"):
        fids = [[entry["runs"][seed]["fid"]["fid"] for seed in ("0", "1")] for entry in (atconv, attention)]
        if metric == "fid":  # paired by seed
            assert comparison[metric]["differences"] == pytest.approx([fids[0][0] - fids[1][0], fids[0][1] - fids[1][1]])
        low, high = comparison[metric]["interval_95"]
        assert low == pytest.approx(min(comparison[metric]["differences"]))  # two seeds: the bootstrap's extremes
        assert high == pytest.approx(max(comparison[metric]["differences"]))
        assert comparison[metric]["verdict"] in ("better", "worse", "not distinguishable")
    markdown = (finished / "report.md").read_text()
    assert "atdiff compare" in markdown and "| fashion-mnist-dit-t4-atconv | atconv |" in markdown
    assert "FID: fashion-mnist-dit-t4-atconv is " in markdown and "| fashion-mnist-dit-t4-atconv | 1 |" in markdown
    # parallel trainings log to files instead of interleaving progress bars
    assert "train:" in (finished / "fashion-mnist-dit-t4-atconv" / "seed-1" / "train.log").read_text()
    assert (finished / "fid_vs_step.png").stat().st_size > 0 and (finished / "throughput.png").stat().st_size > 0


def test_resume_redoes_only_missing_stages(finished):
    out = finished  # as if interrupted before one stage of one entry and before the report
    kept = out / "fashion-mnist-dit-t4-attention" / "seed-0" / "fid.json"
    dropped = out / "fashion-mnist-dit-t4-atconv" / "seed-1" / "fid.json"
    kept_text, dropped_text = kept.read_text(), dropped.read_text()
    kept_mtime = kept.stat().st_mtime_ns
    dropped.unlink()
    (out / "report.md").unlink()
    assert compare(out, *SEEDS) == 0
    assert kept.stat().st_mtime_ns == kept_mtime and kept.read_text() == kept_text
    # recomputed from the same stored samples: the same number
    assert json.loads(dropped.read_text())["fid"] == pytest.approx(json.loads(dropped_text)["fid"], rel=1e-6)
    assert (out / "report.md").is_file()


def test_sibling_run_folders_are_scored_apart(tmp_path, monkeypatch):
    """FID over training of run-folder entries used to be cached next to the runs by file name, so the
    second of two sibling runs reported the first's. Each is now scored into OUT/<entry>/seed-<s>/.
    (Scoring stubbed: this checks where results go; the test below does it end to end.)"""
    runs, out = tmp_path / "runs", tmp_path / "out"
    for name in ("a", "b"):
        (runs / name / "checkpoint-2").mkdir(parents=True)
        (runs / name / "model_index.json").write_text("{}")
        shutil.copy(CONFIGS / "fashion-mnist-dit-t4-atconv.yaml", runs / name / "config.yaml")
    before = sorted(runs.rglob("*"))
    monkeypatch.setattr(compare_module, "pipeline_at_checkpoint", lambda checkpoint: checkpoint)
    monkeypatch.setattr(compare_module, "use_scheduler", lambda pipe, scheduler: pipe)
    monkeypatch.setattr(compare_module, "fid_of", lambda pipe, folder, *rest: {"fid": 1.0, "checkpoint": str(pipe), "samples": str(folder)})
    parser = argparse.ArgumentParser()
    compare_module.add_arguments(parser)
    settings, _, entries = compare_module.settings_from_args(parser.parse_args([str(runs / "a"), str(runs / "b"), "--out", str(out)]))
    for entry in entries:
        (point,) = compare_module.fid_by_step(entry, entry.runs[0], settings, 8, "cpu")
        assert point["checkpoint"] == str(runs / entry.name / "checkpoint-2")
        assert point["samples"] == str(out / entry.name / "seed-0" / "samples-step-2")
        assert json.loads((out / entry.name / "seed-0" / "fid-step-2.json").read_text()) == point
    assert sorted(runs.rglob("*")) == before


def parse_compare(*argv):
    parser = argparse.ArgumentParser()
    compare_module.add_arguments(parser)
    return compare_module.settings_from_args(parser.parse_args([str(a) for a in argv]))


def test_seed_patterns_enter_finished_runs_over_seeds(finished, tmp_path, capsys):
    """Runs compare cannot train (each fine-tuned from its own seed's teacher) enter as a {seed} pattern."""
    out = tmp_path / "out"
    teachers = finished / "fashion-mnist-dit-t4-attention" / "seed-{seed}" / "run"
    students = tmp_path / "students"
    for seed in (0, 1):
        shutil.copytree(finished / "fashion-mnist-dit-t4-atconv" / f"seed-{seed}" / "run", students / f"atconv-{seed}")
    settings, _, entries = parse_compare(teachers, students / "atconv-{seed}", *SEEDS, "--out", out)
    assert [e.name for e in entries] == ["fashion-mnist-dit-t4-attention", "atconv"]
    assert settings.baseline == "fashion-mnist-dit-t4-attention" and settings.seeds == [0, 1]
    for entry in entries:
        assert not entry.trained_here and [r.seed for r in entry.runs] == [0, 1]
        assert [r.results for r in entry.runs] == [out / entry.name / f"seed-{s}" for s in (0, 1)]
    assert entries[1].runs[1].run_dir == students / "atconv-1"
    # a folder whose run used another seed than its name says would pair the wrong runs
    (students / "atconv-1").rename(students / "atconv-2")
    shutil.copytree(students / "atconv-0", students / "atconv-1")
    assert main(["compare", str(teachers), str(students / "atconv-{seed}"), *SEEDS, "--out", str(out)]) == 2
    assert "atconv-1 was trained with training.seed=0, not 1" in capsys.readouterr().err
    # a missing seed is named before any work; so is a plain run folder given several seeds
    assert main(["compare", str(teachers), str(students / "atconv-{seed}"), "--seeds", "0", "1", "2", "--out", str(out)]) == 2
    assert "seed-2/run is not a finished `atdiff train` run" in capsys.readouterr().err
    assert main(["compare", str(teachers), str(students / "atconv-0"), *SEEDS, "--out", str(out)]) == 2
    assert "or a folder pattern with {seed}" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("pattern, name", [
    ("runs/teacher-seed-{seed}", "teacher-seed"), ("runs/distilled/seed-{seed}/run", "distilled"),
    ("runs/{seed}/hybrid", "runs"), ("out/{seed}_atconv", "atconv"),
])
def test_seed_pattern_entry_names(pattern, name):
    assert compare_module.seeded_entry_name(Path(pattern)) == name


@pytest.mark.slow  # ~20-40 s on 2 busy cores: two more compares' worth of sampling, FID and speed probes
def test_run_folder_entries_keep_their_results_under_out(finished, tmp_path):
    """Two finished sibling runs: each entry's FID over training is its own, stored under --out."""
    runs = tmp_path / "runs"
    for mixer in ("attention", "atconv"):
        shutil.copytree(finished / f"fashion-mnist-dit-t4-{mixer}" / "seed-0" / "run", runs / mixer)
        stats_file = runs / mixer / "training_stats.json"  # as if trained without evals: checkpoints are sampled
        stats_file.write_text(json.dumps({k: v for k, v in json.loads(stats_file.read_text()).items() if k != "evals"}))
    before = sorted(p.relative_to(runs) for p in runs.rglob("*"))
    out = tmp_path / "out"
    assert main(["compare", str(runs / "attention"), str(runs / "atconv"), "--out", str(out), *SMALL, "--device", "cpu"]) == 0
    assert sorted(p.relative_to(runs) for p in runs.rglob("*")) == before  # nothing written next to the runs
    report = json.loads((out / "report.json").read_text())
    for mixer in ("attention", "atconv"):
        assert (out / mixer / "seed-0" / "fid-step-2.json").is_file()
        # checkpoints sampled here with the same settings give the FIDs the run's own evals gave
        # (the same EMA weights and noise; batch sizes differ, so up to rounding)
        original = json.loads((finished / "report.json").read_text())["entries"][f"fashion-mnist-dit-t4-{mixer}"]
        ours = report["entries"][mixer]["runs"]["0"]["fid_by_step"]
        assert [p["fid"] for p in ours] == pytest.approx([p["fid"] for p in original["runs"]["0"]["fid_by_step"]], rel=1e-3)
    by_step = [[p["fid"] for p in report["entries"][m]["runs"]["0"]["fid_by_step"]] for m in ("attention", "atconv")]
    assert by_step[0] != by_step[1]


def test_other_settings_are_refused(finished, capsys):
    assert compare(finished, *SEEDS, "--seed", "1") == 2
    assert "holds a comparison with other settings (sampling)" in capsys.readouterr().err


def test_needs_two_entries_with_the_same_data(tmp_path, capsys):
    one = str(CONFIGS / "fashion-mnist-dit-t4-atconv.yaml")
    assert main(["compare", one, "--out", str(tmp_path / "a")]) == 2
    assert "at least two" in capsys.readouterr().err
    cifar = str(CONFIGS / "cifar10-dit-s2-atconv.yaml")
    assert main(["compare", one, cifar, "--out", str(tmp_path / "b")]) == 2
    assert "different data" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()  # refused before any work
    attention = str(CONFIGS / "fashion-mnist-dit-t4-attention.yaml")
    assert main(["compare", one, attention, "--jobs", "0", "--out", str(tmp_path / "d")]) == 2
    assert "--jobs must be at least 1" in capsys.readouterr().err
    assert main(["compare", one, attention, "--baseline", "resnet", "--out", str(tmp_path / "d")]) == 2
    assert "--baseline 'resnet' is not an entry; the entries are ['fashion-mnist-dit-t4-atconv', 'fashion-mnist-dit-t4-attention']" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("model_index.json", "config.yaml"):
        shutil.copy(CONFIGS / "fashion-mnist-dit-t4-atconv.yaml" if name == "config.yaml" else __file__, run_dir / name)
    assert main(["compare", str(run_dir), one, "--seeds", "0", "1", "--out", str(tmp_path / "c")]) == 2
    assert "is one finished run (one seed); --seeds 0 1 needs configs to train" in capsys.readouterr().err


@pytest.mark.parametrize(("flags", "message"), [
    (["--seeds", "-1"], "--seeds: a training seed must be in [0, 4294967295], got -1"),
    (["--num-images", "1"], "--num-images must be at least 2 (FID needs a covariance), got 1"),
    (["--num-real", "0"], "--num-real must be at least 2 (FID needs a covariance), got 0"),
    (["--step-images", "1"], "--step-images must be at least 2 (FID needs a covariance), got 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
])
def test_flags_that_would_fail_after_training_are_refused_before_it(flags, message, tmp_path, capsys):
    """Not hours later (a final FID of 1 image), nor as a training failure that says to rerun."""
    pair = [str(CONFIGS / f"fashion-mnist-dit-t4-{mixer}.yaml") for mixer in ("attention", "atconv")]
    assert main(["compare", *pair, *flags, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == f"atdiff compare: error: {message}\n"
    assert not (tmp_path / "out").exists()


def test_seeds_given_twice_add_up(tmp_path):
    from atdiff.cli import parse_args

    pair = [str(CONFIGS / f"fashion-mnist-dit-t4-{mixer}.yaml") for mixer in ("attention", "atconv")]
    args = parse_args(["compare", *pair, "--seeds", "0", "1", "--seeds", "2", "1", "--out", str(tmp_path)])
    assert compare_module.settings_from_args(args)[0].seeds == [0, 1, 2]
    args = parse_args(["compare", *pair, "--out", str(tmp_path)])
    assert compare_module.settings_from_args(args)[0].seeds == [0]


def test_out_that_is_a_file_or_a_foreign_folder_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "report.md").write_text("mine")
    assert compare(tmp_path / "notes.txt") == 2
    assert f"{tmp_path / 'notes.txt'} is a file, not a folder" in capsys.readouterr().err
    assert compare(tmp_path / "mine") == 2
    assert "is not empty and holds no comparison" in capsys.readouterr().err
    assert (tmp_path / "mine" / "report.md").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["mine", "notes.txt"]


def test_sampling_overrides_reach_scoring_and_training(tmp_path):
    """A ``sampling.*`` KEY=VALUE is the comparison's sampling setting: the runs' training (grids, FID
    over training) and compare's own scoring use it alike."""
    from atdiff.cli import parse_args

    pair = [str(CONFIGS / f"fashion-mnist-dit-t4-{mixer}.yaml") for mixer in ("attention", "atconv")]
    args = parse_args(["compare", *pair, "sampling.num_inference_steps=7", "sampling.seed=3", "--out", str(tmp_path)])
    settings, preset, _ = compare_module.settings_from_args(args)
    assert (settings.sampling.num_inference_steps, settings.sampling.seed) == (7, 3)
    children = compare_module.train_overrides(preset, settings)
    assert "sampling.num_inference_steps=7" in children and "sampling.seed=3" in children
    assert not any(o.startswith("sampling.") for o in settings.overrides)
    # A flag and a KEY=VALUE that agree are one setting.
    args = parse_args(["compare", *pair, "sampling.seed=3", "--seed", "3", "--out", str(tmp_path)])
    assert compare_module.settings_from_args(args)[0].sampling.seed == 3


def test_training_overrides_are_refused_for_finished_runs(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "model_index.json").write_text("{}")
    shutil.copy(CONFIGS / "fashion-mnist-dit-t4-atconv.yaml", run_dir / "config.yaml")
    one = str(CONFIGS / "fashion-mnist-dit-t4-attention.yaml")
    assert main(["compare", str(run_dir), one, "training.max_steps=5", "--out", str(tmp_path / "out")]) == 2
    assert "training.max_steps=5 changes how configs are trained, but run is a finished run it cannot apply to" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("extra", "message"), [
    (["training.seed=7", "--seeds", "0"], "training.seed=7: compare sets training.seed for every run; use --seeds"),
    (["training.eval_num_images=50"], "training.eval_num_images=50: compare sets training.eval_num_images for every run; use --step-images"),
    (["training.output_dir=x"], "training.output_dir=x: compare sets training.output_dir for every run; use --out"),
    (["sampling.seed=3", "--seed", "4"], "--seed 4 and sampling.seed=3 both set sampling.seed; give it once"),
])
def test_overrides_compare_would_overwrite_are_refused(extra, message, tmp_path, capsys):
    pair = [str(CONFIGS / f"fashion-mnist-dit-t4-{mixer}.yaml") for mixer in ("attention", "atconv")]
    assert main(["compare", *pair, *extra, "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith(f"atdiff compare: error: {message}")
    assert not (tmp_path / "out").exists()


def test_under_two_processes_the_scores_are_one_process_scores(finished, tmp_path):
    """`accelerate launch -m atdiff compare`: every process samples and scores its share, the main one reports."""
    import os
    import subprocess
    import sys

    runs = tmp_path / "runs"
    for mixer in ("attention", "atconv"):
        shutil.copytree(finished / f"fashion-mnist-dit-t4-{mixer}" / "seed-0" / "run", runs / mixer)
    out = tmp_path / "out"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "atdiff",
               "compare", str(runs / "attention"), str(runs / "atconv"), "--out", str(out), *SMALL, "--device", "cpu"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("report: ") == 1  # the main process reports, once
    report = json.loads((out / "report.json").read_text())
    original = json.loads((finished / "report.json").read_text())["entries"]
    for mixer in ("attention", "atconv"):
        ours, theirs = report["entries"][mixer]["runs"]["0"], original[f"fashion-mnist-dit-t4-{mixer}"]["runs"]["0"]
        # the same images (image i depends only on the seed, i and its label), features gathered in order
        assert ours["fid"]["fid"] == pytest.approx(theirs["fid"]["fid"], rel=1e-4)
        assert [p["fid"] for p in ours["fid_by_step"]] == pytest.approx([p["fid"] for p in theirs["fid_by_step"]], rel=1e-3)
        assert report["entries"][mixer]["sampling"]["images_per_s"] > 0
    assert not list(out.glob(".atdiff-tmp-*"))  # the launch's own marker is gone
