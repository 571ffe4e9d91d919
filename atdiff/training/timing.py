"""Measurements of a training session: step times (and their phases) and the run's wall clock."""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager

import torch

WARMUP_STEPS = 5  # first steps of a session left out of throughput (allocator, worker start-up)


class StepTimer:
    """Wall time of every step and, where it is cheap or asked for, of its phases.

    On the CPU the phases cost nothing to time (every op is synchronous); on CUDA they are only
    meaningful with a device synchronisation at each boundary, so they are timed with ``profile`` only.
    """

    PHASES = ("data", "forward", "backward", "optimizer")

    def __init__(self, device: torch.device, profile: bool):
        self.split = profile or device.type == "cpu"
        self.sync = (lambda: torch.cuda.synchronize(device)) if profile and device.type == "cuda" else (lambda: None)
        self.step_times: list[float] = []
        self.phase_times: list[dict[str, float]] = []

    def start_step(self) -> None:
        self.sync()
        self.current = dict.fromkeys(self.PHASES, 0.0)
        self.started = time.perf_counter()

    @contextmanager
    def phase(self, name: str):
        if not self.split:
            yield
            return
        start = time.perf_counter()
        yield
        self.sync()
        self.current[name] += time.perf_counter() - start

    def end_step(self) -> None:
        self.sync()
        self.step_times.append(time.perf_counter() - self.started)
        self.phase_times.append(self.current)

    def summary(self, batch_size: int) -> dict:
        """Median images/s and the mean time split, leaving out the first steps of the session."""
        skip = min(WARMUP_STEPS, max(len(self.step_times) - 1, 0))
        times = self.step_times[skip:]
        if not times:
            return {"images_per_s": None, "step_time_s": None, "time_split_s": None}
        step_time = statistics.median(times)
        split = None
        if self.split:
            split = {name: statistics.fmean(p[name] for p in self.phase_times[skip:]) for name in self.PHASES}
            split["other"] = max(statistics.fmean(times) - sum(split.values()), 0.0)
        return {"images_per_s": batch_size / step_time, "step_time_s": step_time, "time_split_s": split,
                "timed_steps": len(times)}


class RunClock:
    """Wall-clock time of the whole run and the part of it spent on side work (sample grids, evals,
    checkpoints): the rate users wait for, next to the median step rate. A resumed session carries
    on from the totals of the checkpoint it resumed from."""

    SIDE_WORK = ("sample_grids", "evals", "checkpoints")

    def __init__(self, carried: dict | None = None):
        carried = carried or {}
        self.carried_s = carried.get("seconds", 0.0)
        self.side = {name: carried.get(f"{name}_s", 0.0) for name in self.SIDE_WORK}
        self.restart()

    def restart(self) -> None:
        """Start this session's part (when the loop starts, not while the model is being built)."""
        self.started = time.perf_counter()

    @contextmanager
    def spent_on(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.side[name] += time.perf_counter() - start

    def summary(self, images_seen: int) -> dict:
        seconds = self.carried_s + time.perf_counter() - self.started
        return {"seconds": seconds, "images_per_s": images_seen / seconds if seconds > 0 else None,
                **{f"{name}_s": value for name, value in self.side.items()}}
