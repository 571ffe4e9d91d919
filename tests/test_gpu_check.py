"""The GPU check script (eval/gpu/check.sh) in its CPU smoke mode, so that it cannot rot before a GPU runs it."""

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # torch.compile of four tiny DiTs: minutes on two cores
def test_the_gpu_check_runs_in_smoke_mode(tmp_path):
    import sys

    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(REPO / "eval" / "gpu" / "check.sh"), "--smoke", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "bench-gpu.json").read_text())
    bf16, fp32 = result["runs"]["bfloat16"], result["runs"]["float32"]
    assert bf16["config"]["dtype"] == "bfloat16" and fp32["config"]["dtype"] == "float32"
    models = {(r["mode"], r["name"]) for r in bf16["rows"] if r["study"] == "models" and r["median_s"] > 0}
    for mixer in ("attention", "atconv"):
        assert {("training step", mixer), ("training step", f"{mixer} checkpointing"), ("training step", f"{mixer} compile"),
                ("sampling step", mixer), ("sampling step", f"{mixer} compile")} <= models
    assert {r["study"] for r in fp32["rows"]} == {"mixers", "impls"}
    report = (tmp_path / "bench-gpu.md").read_text()
    assert report.startswith("# GPU check (cpu, no GPU)") and "Variants (`checkpointing`" in report
