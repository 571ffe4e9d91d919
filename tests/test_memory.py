"""Memory figures: the model's own tensors (resident + peak of a piece of work) versus the process."""

import os
import subprocess
import sys

import torch

from atdiff import DiTModel, dit_size
from atdiff.memory import allocation_peak_bytes, model_peak_memory, module_tensors, process_peak_memory, tensor_bytes

MB = 2**20


def test_peak_follows_allocations_and_frees():
    n = 2**18  # float32: 1 MiB

    def fn():
        a = torch.ones(n)
        b = a * 2  # a and b live: 2 MiB
        del a
        c = b + 1  # b and c live: still 2 MiB
        return c.sum()

    peak = allocation_peak_bytes(fn, torch.device("cpu"))
    assert 2 * 4 * n <= peak < 2 * 4 * n + 1024  # + a few scalars


def test_model_memory_is_resident_tensors_plus_the_peak_of_the_work():
    def work():
        a = torch.ones(4 * MB, dtype=torch.uint8)  # 4 MB
        b = torch.ones(6 * MB, dtype=torch.uint8)  # + 6 MB: the peak, 10 MB
        del a, b
        torch.ones(3 * MB, dtype=torch.uint8)  # 3 MB after the peak: no change

    resident = [torch.zeros(MB // 4)]  # 1 MB of float32 live throughout, counted once with its view
    memory = model_peak_memory(work, torch.device("cpu"), [*resident, resident[0][:10]])
    assert memory["model_resident_mb"] == 1.0
    assert 11.0 <= memory["model_memory_mb"] < 11.1


def forward_memory(size: str) -> float:
    torch.manual_seed(0)
    model = DiTModel(sample_size=16, in_channels=1, num_classes=10, **dit_size(size)).eval()
    x, t, y = torch.randn(4, 1, 16, 16), torch.full((4,), 500), torch.arange(4)
    with torch.no_grad():
        memory = model_peak_memory(lambda: model(x, t, class_labels=y), torch.device("cpu"), module_tensors(model))
    assert memory["model_resident_mb"] * MB == tensor_bytes(model.parameters()) + tensor_bytes(model.buffers())
    return memory["model_memory_mb"]


def test_bigger_model_takes_more_and_the_interpreter_is_not_counted():
    small, big = forward_memory("XS/4"), forward_memory("T/4")
    assert small < big
    process = process_peak_memory(torch.device("cpu"))["process_peak_mb"]
    # an interpreter with torch and diffusers imported is hundreds of MB; these models are a few
    assert small < 10 < 100 < process


def test_measuring_on_the_cpu_prints_nothing(tmp_path):
    """The profiler's backend (kineto) logged 'ERROR: ... gpuGetDeviceCount failed' and USDT lines on
    every CPU run; the figure must come without them, and leave the environment as it was."""
    script = (
        "import os, torch\n"
        "from atdiff.memory import allocation_peak_bytes\n"
        "peak = allocation_peak_bytes(lambda: torch.ones(2**18) * 2, torch.device('cpu'))\n"
        "print(peak, 'KINETO_LOG_LEVEL' in os.environ)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    done = subprocess.run([sys.executable, "-c", script], env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    peak, leaked = done.stdout.split()
    assert 2 * 4 * 2**18 <= int(peak) < 2 * 4 * 2**18 + 1024 and leaked == "False"
