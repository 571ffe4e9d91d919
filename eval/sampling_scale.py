"""Distributed sampling on the CPU: ``atdiff sample`` on 1 process vs ``accelerate launch`` on N, and
the memory of writing and reading a large ADM npz.

    python -m atdiff.eval.sampling_scale --out eval/results/sampling-scale-cpu

1. The main job's model (configs/fashion-mnist-dit-t4-atconv.yaml, trained 1 step: speed does not
   depend on the weights) samples ``--num-images`` images with its own sampling settings (25 steps,
   guidance 3) on 1 process and on ``--processes`` processes of one thread each, alternately, ``--repeats``
   times; each run writes a fresh folder. Reported: the median sampling time the command prints
   (loading and start-up excluded) and the whole command's wall clock, their 1/N ratios, and whether
   the PNGs are byte-identical.
2. A tiny DiT at 256x256x3 samples ``--npz-images`` images (1 step) into an npz; the peak RSS of that
   process (it samples and assembles) is set beside the npz's size, and a second process reads every
   image back through ``NpzImages`` (as ``atdiff fid`` does), reporting its peak anonymous memory.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAIN_CONFIG = REPO / "configs" / "fashion-mnist-dit-t4-atconv.yaml"


def run(command: list[str], threads: int = 1) -> tuple[str, float]:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return done.stdout, time.perf_counter() - start


def atdiff(*args: str) -> list[str]:
    return [sys.executable, "-m", "atdiff", *args]


def launched(processes: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "atdiff", *args]


def sampling_seconds(stdout: str) -> float:
    return float(re.search(r"sampled \d+ images in ([\d.]+) s", stdout).group(1))


def png_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def speedup(work: Path, num_images: int, processes: int, repeats: int) -> dict:
    run_dir = work / "main"
    run(atdiff("train", "--config", str(MAIN_CONFIG), "--output-dir", str(run_dir), "--max-steps", "1", "--batch-size", "8",
               "training.log_with=none", "training.num_sample_images=4", "training.sample_every=0", "training.checkpoint_every=0"), threads=2)
    timings: dict[int, dict[str, list[float]]] = {1: {"sampling_s": [], "command_s": []}, processes: {"sampling_s": [], "command_s": []}}
    identical = True
    for repeat in range(repeats):
        folders = {}
        for n in (1, processes):
            out = work / f"samples-{n}-{repeat}"
            args = ("sample", str(run_dir), "--num-images", str(num_images), "--out", str(out), "--device", "cpu")
            stdout, wall = run(atdiff(*args) if n == 1 else launched(n, *args))
            timings[n]["sampling_s"].append(sampling_seconds(stdout))
            timings[n]["command_s"].append(wall)
            folders[n] = png_bytes(out)
        identical &= folders[1] == folders[processes] and len(folders[1]) == num_images
    medians = {n: {k: statistics.median(v) for k, v in t.items()} for n, t in timings.items()}
    return {
        "model": "main job (configs/fashion-mnist-dit-t4-atconv.yaml, DiT-T/4 ATConv, 32x32x1), its sampling section (25 steps, guidance 3)",
        "num_images": num_images, "processes": processes, "threads_per_process": 1, "repeats": repeats,
        "timings": timings, "medians": medians,
        "speedup_sampling": medians[1]["sampling_s"] / medians[processes]["sampling_s"],
        "speedup_command": medians[1]["command_s"] / medians[processes]["command_s"],
        "images_per_s": {n: num_images / m["sampling_s"] for n, m in medians.items()},
        "pngs_identical": identical,
    }


def npz_memory(work: Path, num_images: int) -> dict:
    """Peak RSS of the process that samples and assembles a large npz, and of one that reads it back."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    from atdiff import DiTModel
    from atdiff.pipelines import ImageDiffusionPipeline

    pipeline_dir = work / "tiny256"
    torch.manual_seed(0)
    model = DiTModel(sample_size=256, patch_size=32, in_channels=3, hidden_size=32, depth=1, num_heads=2, num_classes=0,
                     learn_sigma=False)
    ImageDiffusionPipeline(model=model, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0)).save_pretrained(pipeline_dir)
    out = work / "tiny256.npz"
    writer = ("import resource, runpy, sys; sys.argv = ['atdiff', *sys.argv[1:]]\n"
              "try: runpy.run_module('atdiff', run_name='__main__')\n"
              "finally: print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    stdout, wall = run([sys.executable, "-c", writer, "sample", str(pipeline_dir), "--num-images", str(num_images), "--out", str(out),
                        "--steps", "1", "--batch-size", "64", "--device", "cpu"], threads=2)
    writer_peak = int(re.search(r"PEAK_RSS_KB (\d+)", stdout).group(1)) * 1024
    reader = ("import sys, resource, numpy as np\n"
              "from atdiff.eval.npz_images import NpzImages\n"
              "images = NpzImages(sys.argv[1], 'arr_0'); total = 0\n"
              "for i in range(len(images)): total += int(images[i].float().mean() > 0)\n"
              "status = dict(line.split(':', 1) for line in open('/proc/self/status'))\n"
              "print('READ', total, 'PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
              "'RSS_ANON_KB', status['RssAnon'].split()[0])")
    stdout, _ = run([sys.executable, "-c", reader, str(out)])
    match = re.search(r"READ (\d+) PEAK_RSS_KB (\d+) RSS_ANON_KB (\d+)", stdout)
    size = out.stat().st_size
    return {
        "model": "tiny DiT, 256x256x3 images, 1 flow step (the images are noise-like: a worst case for PNG size)",
        "num_images": num_images, "npz_bytes": size, "image_bytes_total": num_images * 256 * 256 * 3,
        "writer_peak_rss_bytes": writer_peak, "writer_command_s": wall,
        "reader_images_read": int(match.group(1)), "reader_peak_rss_bytes": int(match.group(2)) * 1024,
        "reader_rss_anon_end_bytes": int(match.group(3)) * 1024,
        "note": "RSS: the whole process (Python, torch, the model, buffers). The reader memory-maps the npz: its peak RSS "
                "counts the file's pages it touched (reclaimable page cache), its anonymous memory is what it holds itself.",
    }


def write_report(out: Path, result: dict, command: str) -> None:
    s, m = result["speedup"], result["npz"]
    gb = 1e9
    lines = [
        "# Distributed sampling on the CPU", "",
        f"Made by `{command}` on the 2-core CPU machine ({time.strftime('%Y-%m-%d')}).", "",
        f"## 1 vs {s['processes']} processes, {s['num_images']} images", "",
        f"{s['model']}; one thread per process, {s['repeats']} alternating repeats, medians.", "",
        "| processes | sampling s (median) | images/s | whole command s (median) |", "| --- | --- | --- | --- |",
        *(f"| {n} | {s['medians'][n]['sampling_s']:.2f} | {s['images_per_s'][n]:.1f} | {s['medians'][n]['command_s']:.2f} |"
          for n in s["medians"]), "",
        f"Speed-up: **{s['speedup_sampling']:.2f}x** in sampling (what the command's own timer reports, loading excluded), "
        f"{s['speedup_command']:.2f}x for the whole command (start-up and loading included). "
        f"PNGs byte-identical to the one-process run: **{s['pngs_identical']}**.", "",
        f"## A {m['num_images']}-image npz", "",
        f"{m['model']}. The npz holds {m['npz_bytes'] / gb:.2f} GB ({m['image_bytes_total'] / gb:.2f} GB of pixels).", "",
        f"- the process that sampled the images and assembled the npz: peak RSS {m['writer_peak_rss_bytes'] / gb:.2f} GB",
        f"- a process reading all {m['reader_images_read']} images back with `NpzImages` (as `atdiff fid` does): peak RSS "
        f"{m['reader_peak_rss_bytes'] / gb:.2f} GB, anonymous memory at the end {m['reader_rss_anon_end_bytes'] / gb:.2f} GB", "",
        m["note"], "",
    ]
    (out / "README.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--npz-images", type=int, default=10_000)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        result = {"speedup": speedup(Path(work), args.num_images, args.processes, args.repeats),
                  "npz": npz_memory(Path(work), args.npz_images)}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    command = "python -m atdiff.eval.sampling_scale " + " ".join(sys.argv[1:])
    write_report(out, result, command)
    print((out / "README.md").read_text())


if __name__ == "__main__":
    main()
