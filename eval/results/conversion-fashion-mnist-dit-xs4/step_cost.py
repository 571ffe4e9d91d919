"""Training cost of one step of each kind this experiment runs (DiT-XS/4, batch 32, one thread, as
make.sh trains), as medians of interleaved steps in one process so that the ratios hold on a shared
machine; and from them the steps of ATConv-from-scratch that cost what the teacher's 2400 steps plus
a student's 600 fine-tuning steps cost. Run from the repository root:
    OMP_NUM_THREADS=1 python eval/results/conversion-fashion-mnist-dit-xs4/step_cost.py
"""

import json
import statistics
import sys
from pathlib import Path

import torch

from atdiff.eval.bench import timed
from atdiff.models import DiTModel, dit_size
from atdiff.objectives import DistillationObjective, FlowMatchingObjective

TEACHER_STEPS, FINE_TUNE_STEPS, BATCH, ROUNDS = 2400, 600, 32, 30


def model(mixer: str) -> DiTModel:
    return DiTModel(sample_size=32, in_channels=1, num_classes=10, class_dropout_prob=0.1, learn_sigma=False,
                    token_mixer=mixer, **dit_size("XS/4"))


def step_of(net: DiTModel, objective):
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x0, labels = torch.rand(BATCH, 1, 32, 32) * 2 - 1, torch.randint(0, 10, (BATCH,))

    def step():
        objective.loss(net, x0, labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    torch.manual_seed(0)
    flow = FlowMatchingObjective(1000, "uniform")
    teacher = model("attention").eval().requires_grad_(False)
    kinds = {"attention": step_of(model("attention"), flow), "atconv": step_of(model("atconv"), flow)}
    for mixer in ("atconv", "hybrid"):
        distill = DistillationObjective(flow, "(in memory)", weight=0.5)
        distill.teacher = teacher  # timing only: a random teacher costs what a trained one does
        kinds[f"{mixer}+distillation"] = step_of(model(mixer), distill)
    times = {kind: [] for kind in kinds}
    for index in range(ROUNDS + 3):  # interleaved; the first 3 rounds warm up
        for kind, step in kinds.items():
            seconds = timed(step, torch.device("cpu"))
            if index >= 3:
                times[kind].append(seconds)
    median = {kind: statistics.median(t) for kind, t in times.items()}
    spent = TEACHER_STEPS * median["attention"] + FINE_TUNE_STEPS * median["atconv+distillation"]
    result = {
        "threads": torch.get_num_threads(), "batch": BATCH, "rounds": ROUNDS, "median_step_s": median,
        "relative_to_attention": {kind: m / median["attention"] for kind, m in median.items()},
        "teacher_plus_fine_tune_s": spent, "atconv_scratch_steps_same_cost": round(spent / median["atconv"]),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if sys.argv[1:] == ["--write"]:
        (Path(__file__).parent / "step_cost.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
