"""The report of ``atdiff compare``: per-seed numbers, mean +- std over seeds, the paired bootstrap
interval of each entry's difference to the baseline with its verdict, and plots with error bars.

``results`` maps each entry to ``{"token_mixer", "params", "sampling" (speed and memory), "runs":
{seed: run}}``, a run holding ``fid`` (final FID/KID), ``fid_by_step`` and ``training``
(``training_stats.json``).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict
from pathlib import Path

from atdiff.files import write_atomic

from .stats import paired_bootstrap_interval, paired_t_interval, summarize, verdict

# Quality metrics (lower is better), their labels and how to read them from a run.
QUALITY = {
    "fid": ("FID", lambda run: run["fid"]["fid"]),
    "kid": ("KID x1e3", lambda run: 1e3 * run["fid"]["kid_mean"] if "kid_mean" in run["fid"] else None),
    # The mean over checkpoints: how fast a model improves, not only where it ends.
    "fid_over_training": ("FID over training (mean over checkpoints)",
                          lambda run: statistics.fmean(p["fid"] for p in run["fid_by_step"]) if run["fid_by_step"] else None),
}
COST = {
    "train_median_img_s": ("train img/s, median step", lambda run: run["training"].get("images_per_s")),
    "train_wall_img_s": ("train img/s, wall clock", lambda run: wall_clock(run).get("images_per_s")),
    "train_wall_s": ("train s, wall clock", lambda run: wall_clock(run).get("seconds")),
    "train_side_s": ("of which grids + evals + checkpoints s",
                     lambda run: sum(wall_clock(run)[f"{k}_s"] for k in ("sample_grids", "evals", "checkpoints")) if wall_clock(run) else None),
    "train_model_mb": ("train model MB", lambda run: run["training"].get("model_memory_mb")),
    "train_process_mb": ("train process peak MB", lambda run: run["training"].get("process_peak_mb", run["training"].get("peak_memory_mb"))),
}
# Sampling cost: measured once per entry (it depends on the architecture, not on the trained weights).
SAMPLING = {
    "images_per_s": "sample img/s (median batch)",
    "model_memory_mb": "sample model MB",
    "process_peak_mb": "sample process peak MB",
}


# ------------------------------------------------------------------------------------------------
# Numbers
# ------------------------------------------------------------------------------------------------


def wall_clock(run: dict) -> dict:
    return run["training"].get("wall_clock") or {}


def per_seed(entry: dict, metrics: dict) -> dict[str, list[float]]:
    """metric -> its value for each seed (in seed order), for the metrics every seed has."""
    values = {name: [read(run) for run in entry["runs"].values()] for name, (_, read) in metrics.items()}
    return {name: v for name, v in values.items() if v and all(x is not None for x in v)}


def summaries(entry: dict) -> dict[str, dict]:
    return {name: asdict(summarize(v)) for name, v in per_seed(entry, {**QUALITY, **COST}).items()}


def comparisons(results: dict[str, dict], baseline: str) -> dict[str, dict[str, dict]]:
    """For each entry but the baseline: per quality metric, the per-seed differences (entry - baseline,
    paired by seed order), their mean, the 95% paired bootstrap and Student-t intervals and the verdict."""
    base = per_seed(results[baseline], QUALITY)
    out = {}
    for name, entry in results.items():
        if name == baseline:
            continue
        mine, out[name] = per_seed(entry, QUALITY), {}
        for metric in base.keys() & mine.keys():
            n = min(len(base[metric]), len(mine[metric]))
            pair = mine[metric][:n], base[metric][:n]
            bootstrap, t = paired_bootstrap_interval(*pair), paired_t_interval(*pair)
            out[name][metric] = {
                "differences": [a - b for a, b in zip(*pair)],
                "mean": statistics.fmean(pair[0]) - statistics.fmean(pair[1]),
                "interval_95": list(bootstrap) if bootstrap else None,
                "t_interval_95": list(t) if t else None,
                "verdict": verdict(bootstrap, t, lower_is_better=True),
            }
    return out


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------


def write_report(out: Path, settings, command: str, results: dict[str, dict], differences: list[str], jobs: int = 1) -> None:
    for entry in results.values():
        entry["summary"] = summaries(entry)
    versus = comparisons(results, settings.baseline)
    report = {"command": command, "settings": asdict(settings), "jobs": jobs, "config_differences": differences,
              "entries": results, "comparisons": {f"{name} - {settings.baseline}": c for name, c in versus.items()}}
    write_atomic(out / "report.json", json.dumps(report, indent=2) + "\n")
    plot_fid_by_step(out / "fid_vs_step.png", results)
    plot_throughput(out / "throughput.png", results)
    write_atomic(out / "report.md", "\n".join(markdown(settings, command, results, versus, differences, jobs)) + "\n")


def markdown(settings, command: str, results: dict, versus: dict, differences: list[str], jobs: int) -> list[str]:
    s, quality = settings.sampling, [m for m in QUALITY if any(m in e["summary"] for e in results.values())]
    seeds = ", ".join(map(str, settings.seeds))
    lines = [
        "# Token-mixer comparison", "", f"Command: `{command}`", "",
        f"Preset `{settings.preset}`, training seeds {seeds} ({jobs} training job(s) at a time); every model sampled with "
        f"the same noise (sampling seed {s.seed}): {settings.num_images} samples per model against "
        f"{settings.num_real or 'all'} reference images, {s.num_inference_steps} sampler steps "
        f"({s.scheduler or 'each run’s own scheduler'}), guidance {s.guidance_scale}. The configs differ in: "
        f"{', '.join(differences) or 'nothing'}.", "",
        "## Quality (mean ± std over seeds; lower is better)", "",
        "| model | token mixer | params | seeds | " + " | ".join(QUALITY[m][0] for m in quality) + " |",
        "|---|---|---:|---:|" + "---:|" * len(quality),
    ]
    for name, entry in results.items():
        cells = [mean_std(entry["summary"].get(m)) for m in quality]
        lines.append(f"| {name} | {entry['token_mixer']} | {entry['params']:,} | {len(entry['runs'])} | " + " | ".join(cells) + " |")

    lines += ["", f"## Differences to {settings.baseline} (paired by seed, 95% bootstrap interval)", "",
              "| model | metric | per-seed differences | mean | 95% bootstrap interval | 95% t interval | verdict |",
              "|---|---|---|---:|---|---|---|"]
    verdicts = []
    for name, metrics in versus.items():
        for metric in quality:
            if metric not in metrics:
                continue
            c = metrics[metric]
            intervals = [f"[{i[0]:+.2f}, {i[1]:+.2f}]" if i else "needs ≥ 2 seeds" for i in (c["interval_95"], c["t_interval_95"])]
            diffs = ", ".join(f"{d:+.2f}" for d in c["differences"])
            lines.append(f"| {name} | {QUALITY[metric][0]} | {diffs} | {c['mean']:+.2f} | {' | '.join(intervals)} | {c['verdict']} |")
            verdicts.append(f"- {QUALITY[metric][0]}: {name} is {verdict_text(c['verdict'], settings.baseline)}")
    lines += ["", "A verdict needs both intervals to exclude 0: with few seeds the bootstrap interval alone is too "
              "narrow (with 2 or 3 seeds it is the range of the differences).", "", "Verdicts:", "", *verdicts]

    steps = sorted({p["step"] for e in results.values() for run in e["runs"].values() for p in run["fid_by_step"]})
    lines += ["", "## Per seed", "",
              "| model | seed | FID | " + ("KID x1e3 | " if settings.kid else "") + " | ".join(f"FID step {k}" for k in steps) + " |",
              "|---|---:|---:|" + ("---:|" if settings.kid else "") + "---:|" * len(steps)]
    for name, entry in results.items():
        for seed, run in entry["runs"].items():
            by_step = {p["step"]: f"{p['fid']:.2f}" for p in run["fid_by_step"]}
            kid = f"{1e3 * run['fid']['kid_mean']:.2f} | " if settings.kid and "kid_mean" in run["fid"] else ""
            lines.append(f"| {name} | {seed} | {run['fid']['fid']:.2f} | {kid}" + " | ".join(by_step.get(k, "–") for k in steps) + " |")

    cost = [m for m in COST if any(m in e["summary"] for e in results.values())]
    lines += ["", "## Speed and memory (training: mean ± std over seeds)", "",
              "| model | " + " | ".join([*(COST[m][0] for m in cost), *SAMPLING.values()]) + " |",
              "|---|" + "---:|" * (len(cost) + len(SAMPLING))]
    for name, entry in results.items():
        sampling = [f"{entry['sampling'][key]:.1f}" if entry["sampling"].get(key) is not None else "–" for key in SAMPLING]
        lines.append(f"| {name} | " + " | ".join([*(mean_std(entry["summary"].get(m), 1) for m in cost), *sampling]) + " |")
    first = next(iter(next(iter(results.values()))["runs"].values()))
    first_sampling = next(iter(results.values()))["sampling"]
    lines += [
        "",
        "Training: the median step rate (first steps left out) and the wall-clock rate over the whole run, sample grids, "
        f"evals and checkpoints included (`training_stats.json`, {first['training'].get('device', '?')}). Sampling: the median of "
        f"{first_sampling['repeats']} batches of {first_sampling['batch']} images after a warm-up, each model in its own "
        "process (once per model: it does not depend on the seed). Model MB: the model's own tensors (weights, optimizer and EMA state, and the peak of what a step or a "
        "sampling call allocates; CUDA allocator statistics or, on the CPU, the profiler's memory events); process peak MB: "
        f"the whole process (on the CPU its peak RSS, interpreter and libraries included). FID with torch-fidelity and "
        f"{first['fid'].get('feature_extractor', 'Inception-v3')}.",
        "", "![FID over training](fid_vs_step.png) ![throughput](throughput.png)",
    ]
    return lines


def verdict_text(word: str, baseline: str) -> str:
    if word == "not distinguishable":
        return f"not distinguishable from {baseline} at this budget"
    return f"{word} than {baseline} (both intervals exclude 0)"


def mean_std(summary: dict | None, digits: int = 2) -> str:
    if summary is None:
        return "–"
    if summary["std"] is None:
        return f"{summary['mean']:.{digits}f}"
    return f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f}"


# ------------------------------------------------------------------------------------------------
# Plots (error bars: std over seeds)
# ------------------------------------------------------------------------------------------------


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_fid_by_step(path: Path, results: dict[str, dict]) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, entry in results.items():
        by_step: dict[int, list[float]] = {}
        for run in entry["runs"].values():
            for point in run["fid_by_step"]:
                by_step.setdefault(point["step"], []).append(point["fid"])
        steps = sorted(by_step)
        stats = [summarize(by_step[k]) for k in steps]
        ax.errorbar(steps, [s.mean for s in stats], yerr=[s.std or 0.0 for s in stats], marker="o", capsize=3, label=name)
    ax.set(xlabel="training step", ylabel="FID", title="FID over training (mean ± std over seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_throughput(path: Path, results: dict[str, dict]) -> None:
    plt = pyplot()
    names = list(results)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.5))
    training = [results[n]["summary"].get("train_median_img_s") or {"mean": 0.0, "std": None} for n in names]
    bars = (
        (axes[0], "training images/s (median step; ± std over seeds)", [s["mean"] for s in training], [s["std"] or 0.0 for s in training]),
        (axes[1], "sampling images/s (± std over batches)", [results[n]["sampling"]["images_per_s"] for n in names],
         [results[n]["sampling"].get("images_per_s_std") or 0.0 for n in names]),
    )
    for ax, title, heights, errors in bars:
        ax.bar(names, heights, yerr=errors, capsize=4, color=[f"C{i}" for i in range(len(names))])
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
