#!/usr/bin/env bash
# The GPU check: on a lent machine with one H100 or H200, under ~8 minutes, measures ATConv against
# attention where atdiff's users train, and writes eval/results/bench-gpu.{md,json} (plus the two
# runs' own reports, bench-gpu-bf16.* and bench-gpu-fp32.*):
#   - token mixers, SDPA (flash) attention vs ATConv, forward and forward+backward, C in {384, 1152},
#     N in {256, 1024, 4096}, and every per-sample conv implementation: in bf16 and in fp32;
#   - a whole DiT-XL/2 (28 blocks) sampling step and training step (AdamW) at 256 and 1024 tokens, in
#     bf16, plain, with gradient checkpointing and under torch.compile; peak CUDA memory of each.
#
#   bash eval/gpu/check.sh              # on the GPU machine (device tool: `run`), from the repository root
#   bash eval/gpu/check.sh --smoke DIR  # the same studies at toy sizes on the CPU, into DIR (CI runs this)
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
if [[ "${1:-}" == "--smoke" ]]; then
  out=${2:?--smoke needs an output folder}
  sizes=(--device cpu --widths 64 --impl-widths 64 --tokens 16 --batch 2 --model-size T/4 --model-depth 1
         --model-tokens 16 --model-batch 2 --budget-s 0.01 --max-call-s 5)
else
  out=eval/results
  sizes=(--device cuda --widths 384 1152 --impl-widths 384 1152 --tokens 256 1024 4096 --batch 8
         --model-size XL/2 --model-depth 28 --model-tokens 256 1024 --model-batch 8 --budget-s 0.25 --max-call-s 20)
fi
mkdir -p "$out"
started=$SECONDS
# bf16: everything, the DiT-XL/2 steps in their three variants; fp32: the mixers and conv implementations.
"$PYTHON" -m atdiff bench "${sizes[@]}" --dtype bfloat16 --model-variants plain checkpointing compile --out "$out" --stem bench-gpu-bf16
"$PYTHON" -m atdiff bench "${sizes[@]}" --dtype float32 --studies mixers impls --out "$out" --stem bench-gpu-fp32
"$PYTHON" - "$out" "$(( SECONDS - started ))" <<'PY'
import json, sys
from pathlib import Path

out, seconds = Path(sys.argv[1]), int(sys.argv[2])
runs = {dtype: json.loads((out / f"bench-gpu-{short}.json").read_text()) for dtype, short in (("bfloat16", "bf16"), ("float32", "fp32"))}
(out / "bench-gpu.json").write_text(json.dumps({"wall_s": seconds, "runs": runs}, indent=1) + "\n")
parts = [f"# GPU check ({runs['bfloat16']['machine']['device']}, {runs['bfloat16']['machine'].get('gpu') or 'no GPU'}): {seconds} s in all",
         "", "Made by `bash eval/gpu/check.sh`. The bf16 run, then the fp32 run:", ""]
parts += ["#" + (out / f"bench-gpu-{short}.md").read_text() for short in ("bf16", "fp32")]  # its title one level down
(out / "bench-gpu.md").write_text("\n".join(parts))
print(f"wrote {out / 'bench-gpu.md'} and .json ({seconds} s)")
PY
