"""Measurements of a training session: step times (and their phases) and peak memory."""

from __future__ import annotations

import resource
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


def peak_memory(device: torch.device) -> dict:
    """Peak memory of this process: CUDA max allocated, or on the CPU the peak resident set."""
    if device.type == "cuda":
        return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20, "peak_memory_kind": "cuda_max_allocated"}
    # Linux's VmHWM belongs to this process image alone; ru_maxrss carries over the parent's peak
    # through fork and exec, so a child started by a large process would report the parent's size.
    try:
        with open("/proc/self/status") as status:
            kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"peak_memory_mb": kib / 1024, "peak_memory_kind": "cpu_peak_rss"}
