"""``atdiff bench``: speed and memory of ATConv against attention, from the token mixer to the whole DiT.

Three studies in one run, on one device and dtype:

- ``mixers``: ATConv against SDPA self-attention of the same width and heads (head dim 64: DiT-S
  and DiT-B widths), forward and forward+backward, over widths x token counts; next to them the
  pieces of ATConv itself (its three projections run the paper's way and atdiff's way, the
  per-sample depthwise conv, the context step in both orders), so its cost above its GEMMs shows.
- ``impls``: every per-sample depthwise conv implementation (``atdiff.nn.functional``), plus
  ``torch.compile`` of the elementwise form; "auto" should name the fastest.
- ``models``: one sampling step (forward, no grad) and one training step (forward, backward,
  AdamW) of the attention and the ATConv DiT at several token counts.

Method. The candidates of one comparison are interleaved (A, B, C, A, B, C, ...), so a slowdown
from other processes hits all of them alike; each is repeated until it used ``budget_s`` (between
1 and ``max_repeats`` times) after an untimed warm-up call, and the median is reported. CUDA time
is taken between device synchronisations. A candidate whose time, predicted from its own
throughput at the previous size, exceeds ``max_call_s`` is skipped and the table says so. Peak
memory is what one call allocates above what was live before it: ``max_memory_allocated`` on
CUDA; on the CPU the PyTorch profiler's allocator events (every tensor allocation and free, in
order; buffers a library allocates outside PyTorch's allocator are not seen).

Outputs ``{stem}.md`` (tables, targets), ``{stem}.json`` (every timing) and ``{stem}.png`` (time
per sample against tokens, log-log) in ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from atdiff.config_loader import read_yaml, section_from_dict
from atdiff.devices import check_device
from atdiff.errors import UsageError
from atdiff.files import write_atomic
from atdiff.limits import check_forward, check_memory
from atdiff.memory import allocation_peak_bytes
from atdiff.models import DiTModel, dit_size
from atdiff.nn import ATConv, SelfAttention
from atdiff.settings import SEED_RANGE, in_interval
from atdiff.nn.functional import IMPL_FUNCTIONS, auto_conv_impl, per_sample_depthwise_conv2d, per_sample_depthwise_conv2d_shift

STUDIES = ("mixers", "impls", "models")
# How the models study runs each DiT besides as it is: with gradient checkpointing (training steps
# only) and under torch.compile.
MODEL_VARIANTS = ("plain", "checkpointing", "compile")
MODES = ("forward", "forward+backward")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COMPILED = "compile(shift)"
MIB = 2**20


@dataclass
class BenchConfig:
    """What ``atdiff bench`` measures; a YAML file (``--config``) sets any key, flags override it."""

    device: str = "auto"  # "auto": cuda when visible, else cpu
    threads: int = 0  # torch CPU threads; 0 keeps torch's default
    dtype: str = "float32"
    studies: list[str] = field(default_factory=lambda: list(STUDIES))
    widths: list[int] = field(default_factory=lambda: [384, 768])  # DiT-S and DiT-B
    tokens: list[int] = field(default_factory=lambda: [64, 256, 1024, 4096, 16384])  # square grids
    batch: int = 8
    max_batch_tokens: int = 32768  # batch shrinks so batch * tokens stays within this (at least 1)
    head_dim: int = 64  # attention heads = width / head_dim, as in DiT
    model_size: str = "S/2"  # width, heads and patch of the DiT
    model_depth: int = 2  # blocks (fewer than DiT-S's 12, to keep the run short: speed-ups are per block)
    model_tokens: list[int] = field(default_factory=lambda: [256, 1024, 4096])
    model_batch: int = 8
    model_max_batch_tokens: int = 4096
    model_variants: list[str] = field(default_factory=lambda: ["plain"])  # of MODEL_VARIANTS
    impl_widths: list[int] = field(default_factory=lambda: [384])  # widths of the impls study
    budget_s: float = 1.0  # timing time per candidate and comparison; sets the repeats
    max_repeats: int = 15
    max_call_s: float = 15.0  # skip candidates predicted to take longer than this per call
    compile: bool = True  # also time torch.compile of the elementwise conv (compile time reported)
    seed: int = 0


# ------------------------------------------------------------------------------------------------
# Timing and memory
# ------------------------------------------------------------------------------------------------


@dataclass
class Candidate:
    name: str
    fn: Callable[[], object]  # one call
    macs: float  # multiply-accumulates per call: predicts the time of a call too slow to run


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


class Runner:
    """Runs comparisons and remembers each candidate's throughput to predict the next, larger one."""

    def __init__(self, cfg: BenchConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        self.macs_per_s: dict[tuple, float] = {}
        self.rows: list[dict] = []

    def compare(self, key: dict, candidates: Sequence[Candidate]) -> list[dict]:
        """Time ``candidates`` interleaved; append one row per candidate (``key`` plus results)."""
        cfg, started = self.cfg, time.perf_counter()
        rows, live = {}, []
        for cand in candidates:
            row = dict(key, name=cand.name, macs=cand.macs)
            rows[cand.name] = row
            history = (key["study"], key["mode"], key.get("width"), cand.name)
            predicted = cand.macs / self.macs_per_s[history] if history in self.macs_per_s else 0.0
            if predicted > cfg.max_call_s:
                row["skipped"] = f"predicted {predicted:.0f} s per call > max_call_s {cfg.max_call_s:g}"
                continue
            row["first_call_s"] = timed(cand.fn, self.device)  # warm-up (and compile, if any)
            probe_start = time.perf_counter()
            row["peak_mem_bytes"] = allocation_peak_bytes(cand.fn, self.device)
            # The repeats come from the faster of the two untimed calls: the first may have compiled.
            row["repeats"] = self.repeats_for(min(row["first_call_s"], time.perf_counter() - probe_start))
            row["times_s"] = []
            live.append((cand, history))
        # Interleave: every round runs each candidate that still has repeats left.
        repeats = {cand.name: rows[cand.name]["repeats"] for cand, _ in live}
        for round_index in range(max(repeats.values(), default=0)):
            for cand, _ in live:
                if round_index < repeats[cand.name]:
                    rows[cand.name]["times_s"].append(timed(cand.fn, self.device))
        for cand, history in live:
            row = rows[cand.name]
            row["median_s"] = statistics.median(row["times_s"])
            if cand.macs:
                self.macs_per_s[history] = cand.macs / row["median_s"]
        summary = ", ".join(f"{n} {r['median_s'] * 1e3:.1f} ms" if "median_s" in r else f"{n} skipped" for n, r in rows.items())
        print(f"[{time.perf_counter() - started:5.1f}s] {describe(key)}: {summary}", flush=True)
        self.rows += rows.values()
        return list(rows.values())

    def repeats_for(self, call_s: float) -> int:
        return max(1, min(self.cfg.max_repeats, int(self.cfg.budget_s / max(call_s, 1e-6))))


def describe(key: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in key.items())


def call(fn: Callable[..., object], inputs: Sequence[torch.Tensor], params: Sequence[torch.nn.Parameter], mode: str) -> Callable[[], object]:
    """One forward (no grad) or forward+backward of ``fn(*inputs)``; the backward computes the
    gradients of the inputs and of ``params`` (not accumulated into ``.grad``)."""
    # Results are made contiguous, as the next layer needs them: a candidate returning a permuted
    # view would otherwise leave its layout copy to someone else's time.
    if mode == "forward":

        def forward():
            with torch.no_grad():
                return [o.contiguous() for o in as_tuple(fn(*inputs))]

        return forward
    inputs = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
    wrt = [t for t in inputs if t.requires_grad] + list(params)
    grad_outputs = []  # drawn at the first (warm-up) call, once the output shapes are known

    def forward_backward():
        outputs = as_tuple(fn(*inputs))
        if not grad_outputs:
            grad_outputs.extend(torch.randn_like(o) for o in outputs)
        grads = torch.autograd.grad(outputs, wrt, grad_outputs, allow_unused=True)
        return [g.contiguous() for g in grads if g is not None]

    return forward_backward


def as_tuple(x) -> tuple:
    return x if isinstance(x, tuple) else (x,)


# ------------------------------------------------------------------------------------------------
# Studies
# ------------------------------------------------------------------------------------------------


def batch_for(tokens: int, batch: int, max_batch_tokens: int) -> int:
    return max(1, min(batch, max_batch_tokens // tokens))


def attention_macs(width: int, tokens: int) -> float:
    """q, k, v and output projections plus QK^T and AV, per sample."""
    return 4 * tokens * width**2 + 2 * tokens**2 * width


def bench_mixers(runner: Runner, width: int, tokens: int, mode: str) -> None:
    cfg, device, dtype = runner.cfg, runner.device, DTYPES[runner.cfg.dtype]
    side = math.isqrt(tokens)
    B = batch_for(tokens, cfg.batch, cfg.max_batch_tokens)
    torch.manual_seed(cfg.seed)
    atconv = ATConv(width).to(device, dtype)
    attention = SelfAttention(width, width // cfg.head_dim).to(device, dtype)
    x = torch.randn(B, tokens, width, device=device, dtype=dtype)
    with torch.no_grad():
        pooled = atconv.pool(x, side, side)
        values = atconv.x_proj(x).view(B, side, side, width)
        kernels = atconv.generate_kernels(x, side, side)
    k2, linear = atconv.kernel_size**2, tokens * width**2
    params = lambda *modules: [p for m in modules for p in m.parameters()]  # noqa: E731
    parts = [
        # (name, fn, inputs, modules whose parameters get gradients, MACs per sample)
        ("atconv", atconv, [x], [atconv], 2 * linear + k2 * tokens * width),
        ("attention", attention, [x], [attention], attention_macs(width, tokens)),
        ("proj x3 (paper)", lambda t: (atconv.kernel_proj(t), atconv.x_proj(t), atconv.proj(t)), [x],
         [atconv.kernel_proj, atconv.x_proj, atconv.proj], 3 * linear),
        ("proj (as run)", lambda t, p: (atconv.kernel_proj(p), atconv.x_proj(t), atconv.proj(t)), [x, pooled],
         [atconv.kernel_proj, atconv.x_proj, atconv.proj], 2 * linear + k2 * width**2),
        ("conv", per_sample_depthwise_conv2d, [values, kernels], [], k2 * tokens * width),
        ("context (paper order)", lambda t: atconv.pool(atconv.kernel_proj(t), side, side), [x], [atconv.kernel_proj], linear),
        ("context (pool first)", lambda t: atconv.kernel_proj(atconv.pool(t, side, side)), [x], [atconv.kernel_proj],
         k2 * width**2),
    ]
    candidates = [Candidate(name, call(fn, inputs, params(*mods), mode), B * macs) for name, fn, inputs, mods, macs in parts]
    runner.compare(dict(study="mixers", mode=mode, width=width, tokens=tokens, batch=B), candidates)


def bench_impls(runner: Runner, width: int, tokens: int, mode: str) -> None:
    cfg, device, dtype = runner.cfg, runner.device, DTYPES[runner.cfg.dtype]
    side = math.isqrt(tokens)
    B = batch_for(tokens, cfg.batch, cfg.max_batch_tokens)
    torch.manual_seed(cfg.seed)
    values = torch.randn(B, side, side, width, device=device, dtype=dtype)
    kernels = torch.randn(B, width, 3, 3, device=device, dtype=dtype)
    impls = dict(IMPL_FUNCTIONS)
    if cfg.compile:
        impls[COMPILED] = compiled_shift()
    macs = B * 9 * tokens * width
    candidates = [Candidate(name, call(fn, [values, kernels], [], mode), macs) for name, fn in impls.items()]
    key = dict(study="impls", mode=mode, width=width, tokens=tokens, batch=B, auto=auto_conv_impl(values))
    rows = runner.compare(key, candidates)
    # Every implementation must give the same numbers, or its time means nothing.
    reference = impls["grouped"](values, kernels)
    for row in rows:
        if "median_s" in row:
            with torch.no_grad():
                row["max_abs_diff"] = (impls[row["name"]](values, kernels) - reference).abs().max().item()


_compiled_shift = None


def compiled_shift():
    """``torch.compile`` of the elementwise form: Inductor fuses its k*k taps into one pass.
    ``dynamic=True``: one compile serves every size instead of one per shape."""
    global _compiled_shift
    if _compiled_shift is None:
        _compiled_shift = torch.compile(per_sample_depthwise_conv2d_shift, dynamic=True)
    return _compiled_shift


def bench_models(runner: Runner, tokens: int, mode: str) -> None:
    cfg, device, dtype = runner.cfg, runner.device, DTYPES[runner.cfg.dtype]
    size = dit_size(cfg.model_size) | dict(depth=cfg.model_depth)
    side = math.isqrt(tokens) * size["patch_size"]
    B = batch_for(tokens, cfg.model_batch, cfg.model_max_batch_tokens)
    torch.manual_seed(cfg.seed)
    sample = torch.randn(B, 4, side, side, device=device, dtype=dtype)
    timestep = torch.randint(0, 1000, (B,), device=device)
    labels = torch.randint(0, 1000, (B,), device=device)
    target = torch.randn_like(sample)
    width, depth = size["hidden_size"], size["depth"]
    candidates = []
    for mixer in ("attention", "atconv"):
        mixer_macs = attention_macs(width, tokens) if mixer == "attention" else 2 * tokens * width**2 + 9 * tokens * width
        macs = B * depth * (mixer_macs + 8 * tokens * width**2)  # + MLP
        for variant in cfg.model_variants:
            if variant == "checkpointing" and mode == "sampling step":
                continue  # nothing is kept for a backward pass
            model = DiTModel(sample_size=side, in_channels=4, learn_sigma=False, token_mixer=mixer, **size).to(device, dtype)
            if variant == "checkpointing":
                model.enable_gradient_checkpointing()
            network = torch.compile(model) if variant == "compile" else model
            if mode == "sampling step":
                model.eval()
                fn = step_fn(lambda m=network: m(sample, timestep, labels).sample, None)
            else:
                model.train()
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
                fn = step_fn(lambda m=network: F.mse_loss(m(sample, timestep, labels).sample, target), optimizer)
            candidates.append(Candidate(mixer if variant == "plain" else f"{mixer} {variant}", fn, macs))
    runner.compare(dict(study="models", mode=mode, width=width, tokens=tokens, batch=B, depth=depth), candidates)


def step_fn(forward: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer | None) -> Callable[[], None]:
    if optimizer is None:

        def sampling_step():
            with torch.no_grad():
                forward()

        return sampling_step

    def train_step():
        forward().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return train_step


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A goal of issue 6 (set for the CPU at 2 threads, forward, C=384, batch 8)."""

    text: str
    value: Callable[[list[dict]], float | None]
    at_least: float | None = None
    at_most: float | None = None

    def status(self, rows: list[dict]) -> tuple[float | None, str]:
        value = self.value(rows)
        if value is None:
            return None, "not measured"
        ok = (self.at_least is None or value >= self.at_least) and (self.at_most is None or value <= self.at_most)
        return value, "met" if ok else "missed"


def median_of(rows: list[dict], **match) -> float | None:
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()) and "median_s" in row:
            return row["median_s"]
    return None


def ratio(rows: list[dict], top: dict, bottom: dict) -> float | None:
    a, b = median_of(rows, **top), median_of(rows, **bottom)
    return a / b if a is not None and b is not None else None


def mixer_ratio(numerator: str, denominator: str, tokens: int) -> Callable[[list[dict]], float | None]:
    key = dict(study="mixers", mode="forward", width=384, tokens=tokens, batch=8)
    return lambda rows: ratio(rows, dict(key, name=numerator), dict(key, name=denominator))


def model_speedup(tokens: int) -> Callable[[list[dict]], float | None]:
    key = dict(study="models", mode="sampling step", tokens=tokens)
    return lambda rows: ratio(rows, dict(key, name="attention"), dict(key, name="atconv"))


def worst_model_memory_ratio(rows: list[dict]) -> float | None:
    """Largest ATConv / attention peak-memory ratio over every measured model row."""
    ratios = []
    for row in rows:
        if row["study"] == "models" and row["name"] == "atconv" and "peak_mem_bytes" in row:
            other = next((r for r in rows if r["study"] == "models" and r["name"] == "attention"
                          and r["mode"] == row["mode"] and r["tokens"] == row["tokens"] and "peak_mem_bytes" in r), None)
            if other:
                ratios.append(row["peak_mem_bytes"] / other["peak_mem_bytes"])
    return max(ratios, default=None)


TARGETS = (
    Target("mixer forward, attention / ATConv at N=256", mixer_ratio("attention", "atconv", 256), at_least=1.7),
    Target("mixer forward, attention / ATConv at N=4096", mixer_ratio("attention", "atconv", 4096), at_least=8.0),
    Target("ATConv / its 3 projections (paper: 3 N C^2) at N=256", mixer_ratio("atconv", "proj x3 (paper)", 256), at_most=1.15),
    Target("ATConv / its 3 projections (paper: 3 N C^2) at N=4096", mixer_ratio("atconv", "proj x3 (paper)", 4096), at_most=1.15),
    Target("ATConv / its projections as run (2 N C^2 + k^2 C^2) at N=256", mixer_ratio("atconv", "proj (as run)", 256), at_most=1.15),
    Target("ATConv / its projections as run (2 N C^2 + k^2 C^2) at N=4096", mixer_ratio("atconv", "proj (as run)", 4096), at_most=1.15),
    Target("DiT sampling step, attention / ATConv at 256 tokens", model_speedup(256), at_least=1.15),
    Target("DiT sampling step, attention / ATConv at 4096 tokens", model_speedup(4096), at_least=2.8),
    Target("DiT peak memory, ATConv / attention (worst row)", worst_model_memory_ratio, at_most=1.0),
)


def ms(row: dict | None) -> str:
    if row is None:
        return ""
    if "median_s" not in row:
        return "skipped"
    return f"{row['median_s'] * 1e3:.3g}" if row["median_s"] < 1 else f"{row['median_s'] * 1e3:.0f}"


def mib(row: dict | None) -> str:
    return f"{row['peak_mem_bytes'] / MIB:.1f}" if row and "peak_mem_bytes" in row else ""


def times(a: dict | None, b: dict | None) -> str:
    """a / b of the medians, as "2.31x"."""
    if a is None or b is None or "median_s" not in a or "median_s" not in b:
        return ""
    return f"{a['median_s'] / b['median_s']:.2f}x"


def group_rows(rows: list[dict], study: str) -> dict[tuple, dict[str, dict]]:
    """{(mode, width, tokens, batch): {name: row}} in measuring order."""
    groups: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        if row["study"] == study:
            groups.setdefault((row["mode"], row["width"], row["tokens"], row["batch"]), {})[row["name"]] = row
    return groups


def table(header: list[str], lines: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(line) + " |" for line in lines]


def markdown_report(result: dict) -> str:
    cfg, rows, machine = result["config"], result["rows"], result["machine"]
    out = [
        "# ATConv vs attention: speed and memory",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {machine['processor']}, {machine['logical_cpus']} logical CPUs, torch {machine['torch']} "
        f"({machine['torch_threads']} threads, OMP_WAIT_POLICY {machine['omp_wait_policy']}), device `{machine['device']}`"
        + (f" ({machine['gpu']})" if machine.get("gpu") else "")
        + f", dtype {cfg['dtype']}. Load average {machine['load_before']} before, {machine['load_after']} after; "
        f"run took {result['wall_s'] / 60:.1f} min.",
        "",
        f"Times are medians in ms per call (batch B) of interleaved repeats within {cfg['budget_s']:g} s per "
        f"candidate (at least one, at most {cfg['max_repeats']}); `skipped` means predicted above "
        f"{cfg['max_call_s']:g} s per call. Memory: peak MiB one call allocates above what was live "
        f"({'CUDA max_memory_allocated' if machine['device'].startswith('cuda') else 'PyTorch profiler CPU allocator events'}).",
    ]
    measured = [(t, *t.status(rows)) for t in TARGETS]
    if any(status != "not measured" for _, _, status in measured):
        out += ["", "## Targets (issue 6: CPU, 2 threads, forward, C=384, batch 8)", ""]
        out += table(["target", "goal", "measured", "status"], [
            [t.text, f">= {t.at_least:g}" if t.at_least is not None else f"<= {t.at_most:g}",
             "" if value is None else f"{value:.2f}", status]
            for t, value, status in measured
        ])
    mixers = group_rows(rows, "mixers")
    for mode in MODES:
        groups = {k: v for k, v in mixers.items() if k[0] == mode}
        if not groups:
            continue
        out += ["", f"## Token mixers, {mode}", ""]
        out += table(["C", "N", "B", "attention ms", "ATConv ms", "speed-up", "attention MiB", "ATConv MiB"], [
            [str(c), str(n), str(b), ms(g.get("attention")), ms(g.get("atconv")), times(g.get("attention"), g.get("atconv")),
             mib(g.get("attention")), mib(g.get("atconv"))]
            for (_, c, n, b), g in groups.items()
        ])
        out += ["", f"ATConv's parts, {mode} (ms; ratios are ATConv / part):", ""]
        out += table(["C", "N", "ATConv", "proj x3 (paper)", "ratio", "proj (as run)", "ratio", "conv",
                      "context: project, pool", "context: pool, project"], [
            [str(c), str(n), ms(g.get("atconv")), ms(g.get("proj x3 (paper)")), times(g.get("atconv"), g.get("proj x3 (paper)")),
             ms(g.get("proj (as run)")), times(g.get("atconv"), g.get("proj (as run)")), ms(g.get("conv")),
             ms(g.get("context (paper order)")), ms(g.get("context (pool first)"))]
            for (_, c, n, _b), g in groups.items()
        ])
    out += PARTS_NOTE if mixers else []
    impls = group_rows(rows, "impls")
    if impls:
        names = list(next(iter(impls.values())))
        out += ["", "## Per-sample depthwise conv implementations (ms)", ""]
        lines, agree = [], 0
        for (mode, c, n, b), g in impls.items():
            timed_rows = [r for r in g.values() if "median_s" in r]
            fastest = min(timed_rows, key=lambda r: r["median_s"])["name"] if timed_rows else ""
            eager_fastest = min((r for r in timed_rows if r["name"] != COMPILED), key=lambda r: r["median_s"])["name"]
            auto = next(iter(g.values()))["auto"]
            agree += auto == eager_fastest
            lines.append([mode, str(c), str(n), str(b)] + [ms(g.get(name)) for name in names] + [fastest, auto])
        out += table(["mode", "C", "N", "B"] + names + ["fastest", "auto runs"], lines)
        diff = max((r.get("max_abs_diff", 0.0) for g in impls.values() for r in g.values()), default=0.0)
        compile_s = [r["first_call_s"] for g in impls.values() for r in g.values() if r["name"] == COMPILED and "first_call_s" in r]
        out += ["", f"`auto` ran the fastest eager implementation in {agree} of {len(impls)} rows. "
                f"Largest difference from `grouped`: {diff:.2g}."]
        if compile_s:
            out += [f"`{COMPILED}` is `torch.compile(dynamic=True)` of `shift`; its first call per mode "
                    f"(compiling) took up to {max(compile_s):.1f} s."]
    models = group_rows(rows, "models")
    if models:
        out += ["", f"## Whole DiT ({cfg['model_size']} width, {cfg['model_depth']} blocks)", ""]
        out += table(["step", "tokens", "B", "attention ms", "ATConv ms", "speed-up", "attention img/s", "ATConv img/s",
                      "attention MiB", "ATConv MiB"], [
            [mode, str(n), str(b), ms(g.get("attention")), ms(g.get("atconv")), times(g.get("attention"), g.get("atconv")),
             images_per_s(g.get("attention"), b), images_per_s(g.get("atconv"), b), mib(g.get("attention")), mib(g.get("atconv"))]
            for (mode, _c, n, b), g in models.items()
        ])
        variants = [(key, row) for key, g in models.items() for row in g.values() if row["name"] not in ("attention", "atconv")]
        if variants:
            out += ["", "Variants (`checkpointing`: gradient checkpointing; `compile`: torch.compile, its first call "
                    "compiling); ratios against the same mixer run plainly:", ""]
            out += table(["step", "tokens", "B", "model", "ms", "img/s", "MiB", "time ratio", "memory ratio", "first call s"], [
                [mode, str(n), str(b), row["name"], ms(row), images_per_s(row, b), mib(row),
                 times(row, models[(mode, c, n, b)].get(row["name"].split()[0])),
                 memory_ratio(row, models[(mode, c, n, b)].get(row["name"].split()[0])), f"{row.get('first_call_s', 0):.1f}"]
                for (mode, c, n, b), row in variants
            ])
    return "\n".join(out) + "\n"


def memory_ratio(a: dict | None, b: dict | None) -> str:
    if a is None or b is None or not a.get("peak_mem_bytes") or not b.get("peak_mem_bytes"):
        return ""
    return f"{a['peak_mem_bytes'] / b['peak_mem_bytes']:.2f}x"


PARTS_NOTE = [
    "",
    "`proj x3 (paper)` is ATConv's three Linear layers applied to all N tokens, as the paper counts "
    "them (3 N C^2). `proj (as run)` is how atdiff runs them: ATConv pools the tokens to k*k bins "
    "before `kernel_proj` (exact, since averaging commutes with an affine map), so `kernel_proj` costs "
    "k^2 C^2 instead of N C^2 and the mixer's GEMMs are 2 N C^2. The two `context` columns compare "
    "those two orders of the kernel-generation step.",
]


def images_per_s(row: dict | None, batch: int) -> str:
    return f"{batch / row['median_s']:.3g}" if row and "median_s" in row else ""


def plot(result: dict, path: Path) -> None:
    """Time per sample against tokens, log-log: one panel per (mode, width)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group_rows(result["rows"], "mixers")
    panels = sorted({(mode, c) for mode, c, _, _ in groups}, key=lambda p: (MODES.index(p[0]), p[1]))
    if not panels:
        panels = [("forward", 0)]
    modes = sorted({m for m, _ in panels}, key=MODES.index)
    widths = sorted({c for _, c in panels})
    fig, axes = plt.subplots(len(modes), len(widths), figsize=(5 * len(widths), 4 * len(modes)), squeeze=False)
    styles = {"attention": "o-", "atconv": "s-", "proj x3 (paper)": "^--", "proj (as run)": "v--", "conv": "x:"}
    for (mode, c), ax in zip(panels, [axes[modes.index(m)][widths.index(c)] for m, c in panels]):
        for name, style in styles.items():
            points = sorted(
                (n, g[name]["median_s"] * 1e3 / b)
                for (m, cc, n, b), g in groups.items()
                if m == mode and cc == c and name in g and "median_s" in g[name]
            )
            if points:
                ax.plot(*zip(*points), style, label=name)
        ax.set(xscale="log", yscale="log", xlabel="tokens N", ylabel="ms per sample", title=f"C={c}, {mode}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"ATConv vs attention on {result['machine']['device']} ({result['machine']['processor']})", fontsize=10)
    fig.tight_layout()
    partial = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(partial, dpi=110)
    plt.close(fig)
    os.replace(partial, path)


# ------------------------------------------------------------------------------------------------
# Machine description
# ------------------------------------------------------------------------------------------------


def processor_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine(device: torch.device) -> dict:
    return {
        "processor": processor_name(),
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "python": platform.python_version(),
        # OpenMP's wait policy decides how a thread waits at a barrier; on a shared machine it
        # changes CPU timings a lot, so it is part of the record.
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
    }


def load_average() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file of BenchConfig keys (flags override it)")
    parser.add_argument("--device", help="cpu, cuda or auto (default: cuda when visible)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--dtype", choices=list(DTYPES))
    parser.add_argument("--studies", nargs="+", choices=STUDIES, help=f"default: all of {' '.join(STUDIES)}")
    parser.add_argument("--widths", type=int, nargs="+", help="channel widths C of the mixers study (default 384 768)")
    parser.add_argument("--impl-widths", type=int, nargs="+", help="channel widths C of the impls study (default 384)")
    parser.add_argument("--tokens", type=int, nargs="+", help="token counts N, square grids (default 64 256 1024 4096 16384)")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--model-tokens", type=int, nargs="+", help="DiT token counts (default 256 1024 4096)")
    parser.add_argument("--model-size", help="DiT size of the models study, e.g. S/2, XL/2 (default S/2)")
    parser.add_argument("--model-depth", type=int)
    parser.add_argument("--model-batch", type=int)
    parser.add_argument("--model-variants", nargs="+", choices=MODEL_VARIANTS, help="how each DiT runs (default: plain)")
    parser.add_argument("--budget-s", type=float, help="timing seconds per candidate and comparison (sets repeats)")
    parser.add_argument("--max-call-s", type=float, help="skip candidates predicted slower than this per call")
    parser.add_argument("--no-compile", dest="compile", action="store_false", default=None,
                        help="leave torch.compile out of the conv implementations")
    parser.add_argument("--out", default="bench", help="output folder (default ./bench)")
    parser.add_argument("--stem", default="bench", help="output file names: STEM.md, STEM.json, STEM.png")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    values = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise UsageError(f"--config {path} does not exist")
        values = read_yaml(path, "a mapping of BenchConfig keys")
    values = dict(section_from_dict(BenchConfig, values, "bench").__dict__)
    for f in dataclasses.fields(BenchConfig):
        if getattr(args, f.name, None) is not None:
            values[f.name] = getattr(args, f.name)
    cfg = BenchConfig(**values)
    check_config(cfg)
    return cfg


def check_config(cfg: BenchConfig) -> None:
    if cfg.device != "auto":
        check_device(cfg.device)
    if cfg.dtype not in DTYPES:
        raise UsageError(f"dtype {cfg.dtype!r} is not one of {list(DTYPES)}")
    for name in ("studies", "widths", "impl_widths", "tokens", "model_tokens"):
        value = getattr(cfg, name)
        if not isinstance(value, list) or not value or not all(isinstance(v, str if name == "studies" else int) for v in value):
            raise UsageError(f"{name} must be a non-empty list of {'names' if name == 'studies' else 'integers'}, got {value!r}")
    if unknown := [s for s in cfg.studies if s not in STUDIES]:
        raise UsageError(f"unknown studies {unknown}; choose from {list(STUDIES)}")
    if not isinstance(cfg.model_variants, list) or not cfg.model_variants or (unknown := [v for v in cfg.model_variants if v not in MODEL_VARIANTS]):
        raise UsageError(f"model_variants must be a non-empty list of {list(MODEL_VARIANTS)}, got {cfg.model_variants!r}")
    for name in ("tokens", "model_tokens"):
        if bad := [n for n in getattr(cfg, name) if n < 1 or math.isqrt(n) ** 2 != n]:
            raise UsageError(f"{name} {bad} are not square token grids; use squares such as 64 256 1024 4096")
    if bad := [c for c in cfg.widths + cfg.impl_widths if c < 1 or c % cfg.head_dim]:
        raise UsageError(f"widths {bad} are not multiples of head_dim {cfg.head_dim} (attention heads = width / head_dim)")
    for name in ("threads", "batch", "max_batch_tokens", "model_depth", "model_batch", "model_max_batch_tokens", "max_repeats"):
        if getattr(cfg, name) < (0 if name == "threads" else 1):
            raise UsageError(f"{name} must be at least {0 if name == 'threads' else 1}, got {getattr(cfg, name)}")
    for name in ("budget_s", "max_call_s"):  # NaN compares false with everything: it would never stop a loop
        if not 0 < getattr(cfg, name) < math.inf:
            raise UsageError(f"{name} must be a positive number of seconds, got {getattr(cfg, name)}")
    if not in_interval(cfg.seed, SEED_RANGE):
        raise UsageError(f"seed must be in {SEED_RANGE} (torch's generators), got {cfg.seed}")
    try:
        dit_size(cfg.model_size)
    except ValueError as err:
        raise UsageError(f"model_size: {err}") from None
    check_sizes(cfg)


def check_sizes(cfg: BenchConfig) -> None:
    """The largest inputs of each study must fit in the device's memory (an input of the mixers, a DiT's forward pass)."""
    device, itemsize = resolve_device(cfg.device), DTYPES[cfg.dtype].itemsize
    if {"mixers", "impls"} & set(cfg.studies):
        tokens = max(cfg.tokens, key=lambda n: batch_for(n, cfg.batch, cfg.max_batch_tokens) * n)
        batch, width = batch_for(tokens, cfg.batch, cfg.max_batch_tokens), max(cfg.widths + cfg.impl_widths)
        check_memory(f"{batch} x {tokens} tokens of width {width} (tokens, batch, max_batch_tokens)", batch * tokens * width * itemsize,
                     device, "use fewer tokens or a smaller batch")
    if "models" in cfg.studies:
        size = dit_size(cfg.model_size)
        tokens = max(cfg.model_tokens, key=lambda n: batch_for(n, cfg.model_batch, cfg.model_max_batch_tokens) * n)
        batch = batch_for(tokens, cfg.model_batch, cfg.model_max_batch_tokens)
        model = dict(size, in_channels=4, sample_size=math.isqrt(tokens) * size["patch_size"])
        check_forward(f"a DiT-{cfg.model_size} forward pass of {batch} x {tokens} tokens (model_tokens, model_batch, model_max_batch_tokens)",
                      model, batch, device, "use fewer tokens or a smaller batch")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run_bench(cfg: BenchConfig, out: Path, stem: str, command: str) -> dict:
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    machine = describe_machine(device) | {"load_before": load_average()}
    runner, started = Runner(cfg, device), time.perf_counter()
    for mode in MODES:
        for width in sorted(set(cfg.widths) | set(cfg.impl_widths)):
            for tokens in sorted(cfg.tokens):
                if "mixers" in cfg.studies and width in cfg.widths:
                    bench_mixers(runner, width, tokens, mode)
                if "impls" in cfg.studies and width in cfg.impl_widths:
                    bench_impls(runner, width, tokens, mode)
    if "models" in cfg.studies:
        for mode in ("sampling step", "training step"):
            for tokens in sorted(cfg.model_tokens):
                bench_models(runner, tokens, mode)
    machine["load_after"] = load_average()
    result = {
        "command": command,
        "config": dataclasses.asdict(cfg),
        "machine": machine,
        "wall_s": time.perf_counter() - started,
        "rows": runner.rows,
    }
    result["targets"] = [
        {"target": t.text, "at_least": t.at_least, "at_most": t.at_most, "value": v, "status": s}
        for t in TARGETS
        for v, s in [t.status(runner.rows)]
    ]
    write_atomic(out / f"{stem}.json", json.dumps(result, indent=1) + "\n")
    write_atomic(out / f"{stem}.md", markdown_report(result))
    plot(result, out / f"{stem}.png")
    return result


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if Path(args.stem).name != args.stem or args.stem in ("", ".", ".."):  # the files go into --out, nowhere else
        raise UsageError(f"--stem {args.stem!r} is not a plain file name; name the folder with --out")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder")
    out.mkdir(parents=True, exist_ok=True)
    command = "atdiff bench " + shlex.join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else "atdiff bench (API)"
    run_bench(cfg, out, args.stem, command)
    print(f"wrote {out / args.stem}.md, .json, .png")
    return 0
