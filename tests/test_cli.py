"""The `atdiff` entry point: dispatch, `info`, and errors printed without a traceback."""

import subprocess
import sys

from atdiff.cli import main


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
