"""FID and KID during training (``training.eval_every``): what the training loop calls, kept out of it.

``TrainingEvaluator(cfg)(step, pipeline)`` samples ``training.eval_num_images`` images from the
pipeline (the EMA weights, handed over by the loop) as the config's ``sampling`` section says, and
scores them with ``compute_metrics`` against ``training.eval_num_real`` images of the config's
dataset, whose Inception statistics are cached after the first eval. Each result is stored as
``output_dir/evals/step-<N>.json`` (the samples themselves are deleted once scored), so a resumed
run keeps its earlier evals, and ``training_stats.json`` lists them all.

The loop runs it inside its ``ema_weights()`` block, which forks the RNGs: sampling draws from
per-image generators anyway, so the training stream is left exactly as it was.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
from dataclasses import asdict
from pathlib import Path

from atdiff.config import ExperimentConfig
from atdiff.files import read_json_object, remove_temp, temp_path, write_atomic
from atdiff.pipelines import ImageDiffusionPipeline
from atdiff.generation.folder import SampleRecord, sample_into_folder
from atdiff.generation.loading import use_scheduler

from .metrics import ExtractorSettings, MetricChoices, compute_metrics
from .sources import dataset_spec
from .inception import resolve_inception_weights

EVAL_FILE = re.compile(r"step-(\d+)\.json")
EVAL_FIX = "delete it, and the eval of that step is computed again"


class TrainingEvaluator:
    def __init__(self, cfg: ExperimentConfig, device: str):
        resolve_inception_weights()  # no usable Inception weights: say so now, not at the first eval
        self.cfg, self.device = cfg, device
        self.folder = Path(cfg.training.output_dir) / "evals"

    def __call__(self, step: int, pipeline: ImageDiffusionPipeline) -> dict:
        """FID/KID of ``pipeline`` at ``step`` (read back if this step was already scored)."""
        result_file = self.folder / f"step-{step}.json"
        if result_file.is_file():
            return read_json_object(result_file, EVAL_FIX)
        t, sampling = self.cfg.training, self.cfg.sampling
        samples = temp_path(self.folder / f"step-{step}.samples")  # resumable; removed once scored
        record = SampleRecord(f"{t.output_dir} (EMA weights at step {step})", sampling)
        with contextlib.redirect_stdout(sys.stderr):  # keep the training bar's stdout clean
            # the training loop evaluates on its main process alone
            sample_into_folder(use_scheduler(pipeline, sampling.scheduler), samples, record, t.eval_num_images,
                               t.batch_size, self.device, progress=False, alone=True)
            metrics = compute_metrics(dataset_spec(self.cfg.data, t.eval_num_real), str(samples), num_fake=t.eval_num_images,
                                      metrics=MetricChoices(kid=True),
                                      extractor=ExtractorSettings(device=self.device, all_processes=False))
        remove_temp(samples)
        result = {"step": step, **metrics, "num_real_asked": t.eval_num_real, "sampling": asdict(sampling)}
        write_atomic(result_file, json.dumps(result, indent=2) + "\n")
        return result

    def history(self, up_to: int) -> list[dict]:
        """Every stored eval up to step ``up_to`` (a run resumed from an older checkpoint may hold later ones)."""
        if not self.folder.is_dir():
            return []
        found = sorted((int(m.group(1)), p) for p in self.folder.iterdir() if (m := EVAL_FILE.fullmatch(p.name)))
        return [read_json_object(p, EVAL_FIX) for step, p in found if step <= up_to]
