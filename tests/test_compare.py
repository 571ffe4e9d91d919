"""`atdiff compare` on tiny configs: a complete report, resumed without redoing finished stages."""

import json
from pathlib import Path

import pytest

from assets import needs_fid_assets
from atdiff.cli import main

pytestmark = needs_fid_assets

CONFIGS = Path(__file__).parents[1] / "configs"
TINY = [
    "model.size=XS/4", "model.sample_size=16", "data.resolution=16", "training.batch_size=8",
    "training.max_steps=4", "training.checkpoint_every=2", "training.log_with=none", "training.num_sample_images=2",
]
SMALL = ["--num-images", "8", "--num-real", "16", "--step-images", "6", "--steps", "2", "--batch-size", "8"]


def compare(out, *extra):
    pair = [str(CONFIGS / f"fashion-mnist-dit-t4-{mixer}.yaml") for mixer in ("attention", "atconv")]
    return main(["compare", *pair, *TINY, "--out", str(out), *SMALL, "--device", "cpu", *extra])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:  # module-wide: a fresh cache, not the user's
        mp.setenv("ATDIFF_CACHE", str(tmp_path_factory.mktemp("cache")))
        out = tmp_path_factory.mktemp("compare")
        assert compare(out) == 0
        yield out


def test_report_is_complete(finished):
    report = json.loads((finished / "report.json").read_text())
    assert report["config_differences"] == ["model.token_mixer"]
    assert set(report["entries"]) == {"fashion-mnist-dit-t4-attention", "fashion-mnist-dit-t4-atconv"}
    for entry in report["entries"].values():
        assert entry["fid"]["fid"] > 0 and entry["fid"]["num_fake"] == 8 and entry["fid"]["num_real"] == 16
        assert [p["step"] for p in entry["fid_by_step"]] == [2, 4]
        assert entry["sampling"]["images_per_s"] > 0 and entry["sampling"]["peak_memory_mb"] > 0
        assert entry["training"]["images_per_s"] > 0 and entry["params"] > 0
    attention, atconv = (report["entries"][f"fashion-mnist-dit-t4-{m}"] for m in ("attention", "atconv"))
    assert atconv["params"] < attention["params"]
    markdown = (finished / "report.md").read_text()
    assert "atdiff compare" in markdown and "| fashion-mnist-dit-t4-atconv | atconv |" in markdown
    assert (finished / "fid_vs_step.png").stat().st_size > 0 and (finished / "throughput.png").stat().st_size > 0


def test_resume_redoes_only_missing_stages(finished):
    out = finished  # as if interrupted before one stage of one entry and before the report
    kept = out / "fashion-mnist-dit-t4-attention" / "fid.json"
    dropped = out / "fashion-mnist-dit-t4-atconv" / "fid-step-2.json"
    kept_text, dropped_text = kept.read_text(), dropped.read_text()
    kept_mtime = kept.stat().st_mtime_ns
    dropped.unlink()
    (out / "report.md").unlink()
    assert compare(out) == 0
    assert kept.stat().st_mtime_ns == kept_mtime and kept.read_text() == kept_text
    # recomputed from the same stored samples: the same number
    assert json.loads(dropped.read_text())["fid"] == pytest.approx(json.loads(dropped_text)["fid"], rel=1e-6)
    assert (out / "report.md").is_file()


def test_other_settings_are_refused(finished, capsys):
    assert compare(finished, "--seed", "1") == 2
    assert "holds a comparison with other settings (seed)" in capsys.readouterr().err


def test_needs_two_entries_with_the_same_data(tmp_path, capsys):
    one = str(CONFIGS / "fashion-mnist-dit-t4-atconv.yaml")
    assert main(["compare", one, "--out", str(tmp_path / "a")]) == 2
    assert "at least two" in capsys.readouterr().err
    cifar = str(CONFIGS / "cifar10-dit-s2-atconv.yaml")
    assert main(["compare", one, cifar, "--out", str(tmp_path / "b")]) == 2
    assert "different data" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()  # refused before any work


def test_out_that_is_a_file_or_a_foreign_folder_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "report.md").write_text("mine")
    assert compare(tmp_path / "notes.txt") == 2
    assert f"{tmp_path / 'notes.txt'} is a file, not a folder" in capsys.readouterr().err
    assert compare(tmp_path / "mine") == 2
    assert "is not empty and holds no comparison" in capsys.readouterr().err
    assert (tmp_path / "mine" / "report.md").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["mine", "notes.txt"]
