"""Memory figures, each labelled with what it measures.

- ``model_peak_memory``: the model's own tensors. The bytes of what stays live throughout (weights,
  optimizer state, EMA) plus the peak of what one piece of work (a sampling call, a training step)
  allocates on top. On CUDA the peak comes from the caching allocator's statistics; on the CPU,
  which keeps none, from the profiler's memory events (every allocation and free of the CPU
  allocator, in order). Neither counts the interpreter, imported libraries or the dataset.
- ``process_peak_memory``: the whole process, as the operating system sees it (CUDA: the
  allocator's peak since start; CPU: peak resident set, interpreter and libraries included).
"""

from __future__ import annotations

import contextlib
import os
import resource
from collections.abc import Callable, Iterable, Iterator

import torch
from torch.profiler import ProfilerActivity, profile

MB = 2**20
KINETO_LOG_LEVEL = "KINETO_LOG_LEVEL"
KINETO_SILENT = "6"  # kineto's levels: VERBOSE 0, INFO 1, WARNING 2, STAGE 3, ERROR 4, USDT 5; 6 logs none


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the storages behind ``tensors``, each storage counted once (views share one)."""
    storages = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[(tensor.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def module_tensors(*modules: torch.nn.Module) -> list[torch.Tensor]:
    return [t for module in modules for t in (*module.parameters(), *module.buffers())]


def model_peak_memory(work: Callable[[], object], device: torch.device, resident: Iterable[torch.Tensor] = ()) -> dict:
    """Run ``work()`` and return the model's peak memory during it: the bytes of ``resident``
    (tensors live before and after: weights, optimizer state) plus the peak of what ``work``
    allocated beyond what was live when it started."""
    resident_bytes = tensor_bytes(resident)
    extra = allocation_peak_bytes(work, device)
    source = "CUDA allocator statistics" if device.type == "cuda" else "CPU profiler memory events"
    return {"model_memory_mb": (resident_bytes + extra) / MB, "model_resident_mb": resident_bytes / MB,
            "model_memory_kind": f"resident tensors + peak allocated during the work ({source})"}


def allocation_peak_bytes(work: Callable[[], object], device: torch.device) -> int:
    """Bytes one call of ``work`` allocates above what was live when it started, at its peak."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        work()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    # PyTorch keeps no CPU allocator statistics; its profiler records every allocation and free
    # (``kineto_results``, where torch.profiler._memory_profiler reads them too), so the running
    # sum over them, in time order, peaks where the call held most memory.
    with quiet_kineto(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        work()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type().name == "CPU"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


@contextlib.contextmanager
def quiet_kineto() -> Iterator[None]:
    """Kineto, the profiler's backend, logs to stderr when it starts: ``profiler_start`` trace points
    and, with a CUDA build of torch on a machine without a GPU, ``ERROR: ... gpuGetDeviceCount failed``,
    though nothing went wrong. It reads ``KINETO_LOG_LEVEL`` once, at its first start: unless the user
    set it, that start logs nothing, and the environment is left as it was."""
    if KINETO_LOG_LEVEL in os.environ:
        yield
        return
    os.environ[KINETO_LOG_LEVEL] = KINETO_SILENT
    try:
        yield
    finally:
        os.environ.pop(KINETO_LOG_LEVEL, None)


def process_peak_memory(device: torch.device) -> dict:
    """Peak memory of this process: CUDA max allocated, or on the CPU the peak resident set."""
    if device.type == "cuda":
        return {"process_peak_mb": torch.cuda.max_memory_allocated(device) / MB, "process_peak_kind": "cuda_max_allocated"}
    # Linux's VmHWM belongs to this process image alone; ru_maxrss carries over the parent's peak
    # through fork and exec, so a child started by a large process would report the parent's size.
    try:
        with open("/proc/self/status") as status:
            kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"process_peak_mb": kib / 1024, "process_peak_kind": "cpu_peak_rss (interpreter and libraries included)"}
