"""The `atdiff` entry point: dispatch, `info`, and errors printed without a traceback."""

import subprocess
import sys

import pytest

from atdiff.cli import main, parse_args


def test_info_lists_every_mixer(capsys):
    assert main(["info", "--batch-size", "1", "--repeats", "1", "model.size=XS/4"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    assert set(rows) == {"attention", "atconv", "hybrid"}
    params = {name: int(row[1].replace(",", "")) for name, row in rows.items()}
    assert params["atconv"] < params["hybrid"] < params["attention"]


def test_usage_error_is_one_line_without_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "atdiff", "info", "--config", "configs/no-such.yaml"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("atdiff info: error: --config: no such file")
    assert "Traceback" not in proc.stderr


def test_unknown_command_lists_commands():
    proc = subprocess.run([sys.executable, "-m", "atdiff", "trian"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "invalid choice: 'trian'" in proc.stderr and "train" in proc.stderr


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["train", "--config", "c.yaml", "training.seed=1", "--max-steps", "3", "model.depth=2"], ("max_steps", 3)),
        (["info", "training.seed=1", "--batch-size", "1", "model.depth=2"], ("batch_size", 1)),
        (["compare", "a.yaml", "training.seed=1", "--out", "o", "b.yaml", "model.depth=2"], ("out", "o")),
    ],
)
def test_overrides_and_flags_in_any_order(argv, flag):
    args = parse_args(argv)
    positional = args.entries if args.command == "compare" else args.overrides
    assert [p for p in positional if "=" in p] == ["training.seed=1", "model.depth=2"]
    assert getattr(args, flag[0]) == flag[1]


def test_override_after_a_flag_takes_effect(capsys):
    argv = ["info", "model.size=XS/4", "--batch-size", "1", "model.token_mixer=hybrid", "--repeats", "1", "model.num_heads=0"]
    assert main(argv) == 2
    assert "model: num_heads must be at least 1, got 0" in capsys.readouterr().err



def test_info_checks_the_device_and_config_path(capsys):
    assert main(["info", "--device", "gpu0"]) == 2
    assert "--device 'gpu0' is not a torch device" in capsys.readouterr().err
    assert main(["info", "--config", "configs"]) == 2
    assert "--config: 'configs' is a folder; pass a YAML file" in capsys.readouterr().err
