"""``atdiff bench`` at toy sizes: every output is written, the bookkeeping is right, bad input is refused."""

import json
import re
import time

import pytest
import torch

from atdiff.cli import main
from atdiff.eval import bench
from atdiff.eval.bench import BenchConfig, Candidate, Runner

TINY = ["--device", "cpu", "--widths", "64", "--impl-widths", "64", "--tokens", "16", "64", "--batch", "2", "--model-tokens", "16",
        "--model-batch", "2", "--model-depth", "1", "--budget-s", "0.01", "--no-compile"]


def test_tiny_run_writes_markdown_json_and_plot(tmp_path):
    assert main(["bench", *TINY, "--out", str(tmp_path), "--stem", "toy"]) == 0
    result = json.loads((tmp_path / "toy.json").read_text())
    names = {(r["study"], r["name"]) for r in result["rows"]}
    for name in ("atconv", "attention", "proj x3 (paper)", "proj (as run)", "conv", "context (paper order)", "context (pool first)"):
        assert ("mixers", name) in names
    for name in ("depthwise", "shift", "grouped", "unfold"):
        assert ("impls", name) in names
    assert {("models", "attention"), ("models", "atconv")} <= names
    for row in result["rows"]:
        assert row["median_s"] > 0 and len(row["times_s"]) >= 1 and row["peak_mem_bytes"] >= 0, row
        if row["study"] == "impls":
            assert row["max_abs_diff"] < 1e-4, row
    modes = {(r["study"], r["mode"]) for r in result["rows"]}
    assert modes == {("mixers", "forward"), ("mixers", "forward+backward"), ("impls", "forward"),
                     ("impls", "forward+backward"), ("models", "sampling step"), ("models", "training step")}
    report = (tmp_path / "toy.md").read_text()
    for heading in ("Command: `atdiff bench", "Machine:", "## Token mixers, forward", "## Token mixers, forward+backward",
                    "## Per-sample depthwise conv", "## Whole DiT"):
        assert heading in report
    assert (tmp_path / "toy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_slow_candidates_are_skipped_by_predicted_time():
    runner = Runner(BenchConfig(budget_s=0.01, max_call_s=1.0), torch.device("cpu"))
    sleep = lambda: time.sleep(0.002)  # noqa: E731
    key = dict(study="mixers", mode="forward", width=8, tokens=4, batch=1)
    runner.compare(key, [Candidate("attention", sleep, macs=1e3)])  # ~2 ms for 1e3 MACs
    rows = runner.compare(dict(key, tokens=16), [Candidate("attention", sleep, macs=1e9), Candidate("atconv", sleep, macs=1e9)])
    assert "predicted" in rows[0]["skipped"] and "median_s" not in rows[0]
    assert rows[1]["median_s"] > 0  # no history for "atconv": measured
    machine = bench.describe_machine(torch.device("cpu")) | {"load_before": "0", "load_after": "0"}
    report = bench.markdown_report({"command": "x", "config": BenchConfig().__dict__, "rows": runner.rows, "wall_s": 1, "machine": machine})
    assert re.search(r"\| 8 \| 16 \| 1 \| skipped \| [0-9.]+ \|", report)


def test_repeats_fill_the_budget_within_bounds():
    runner = Runner(BenchConfig(budget_s=1.0, max_repeats=15), torch.device("cpu"))
    assert runner.repeats_for(0.01) == 15
    assert runner.repeats_for(0.25) == 4
    assert runner.repeats_for(30.0) == 1


@pytest.mark.parametrize("flags, message", [
    (["--tokens", "50"], "square"),
    (["--widths", "100"], "head_dim"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"], "cuda|device"),
    (["--model-depth", "0"], "model_depth"),
    (["--stem", "../../x"], "--stem '../../x' is not a plain file name"),
    (["--stem", "sub/x"], "--stem 'sub/x' is not a plain file name"),
])
def test_bad_input_is_a_usage_error(tmp_path, capsys, flags, message):
    assert main(["bench", *TINY, *flags, "--out", str(tmp_path)]) == 2
    assert not list(tmp_path.iterdir())  # refused before any work
    assert re.search(message, capsys.readouterr().err)


def test_yaml_config_keys_are_checked(tmp_path, capsys):
    config = tmp_path / "bench.yaml"
    config.write_text("widths: [64]\nbudgte_s: 1\n")
    assert main(["bench", "--config", str(config), "--out", str(tmp_path / "out")]) == 2
    assert "budgte_s" in capsys.readouterr().err
