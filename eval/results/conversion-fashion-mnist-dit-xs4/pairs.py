"""Paired differences between entries of report.json other than against its baseline (the teacher):
ATConv from scratch vs each converted student, at the same training cost. Same statistics as the
report (atdiff.eval.stats). Run: python eval/results/conversion-fashion-mnist-dit-xs4/pairs.py"""

import json
from pathlib import Path

from atdiff.eval.stats import paired_bootstrap_interval, paired_t_interval, verdict

entries = json.loads((Path(__file__).parent / "report.json").read_text())["entries"]


def per_seed(name: str, metric: str) -> list[float]:
    runs = entries[name]["runs"]
    scale = 1e3 if metric == "kid_mean" else 1
    return [runs[seed]["fid"][metric] * scale for seed in sorted(runs, key=int)]


for student in ("atconv-distilled", "hybrid-distilled"):
    for metric in ("fid", "kid_mean"):
        a, b = per_seed("atconv-scratch-matched", metric), per_seed(student, metric)
        boot, t = paired_bootstrap_interval(a, b), paired_t_interval(a, b)
        diffs = ", ".join(f"{x - y:+.2f}" for x, y in zip(a, b))
        print(f"atconv-scratch-matched - {student}, {metric}: {diffs}; bootstrap [{boot[0]:+.2f}, {boot[1]:+.2f}], "
              f"t [{t[0]:+.2f}, {t[1]:+.2f}]: {verdict(boot, t)}")
