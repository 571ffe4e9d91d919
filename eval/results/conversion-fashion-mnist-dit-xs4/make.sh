#!/usr/bin/env bash
# Attention -> ATConv / hybrid conversion on Fashion-MNIST (DiT-XS/4, CPU), 3 seeds. Run from the
# repository root after the 3-seed comparison, whose attention runs are the teachers
# (eval/results/compare-fashion-mnist-dit-xs4-3seeds/README.md, ~1 hour on 2 cores):
#   bash eval/results/conversion-fashion-mnist-dit-xs4/make.sh      (~1 hour on 2 cores)
# A rerun resumes: finished runs are kept and the comparison redoes only missing stages.
set -euo pipefail
TEACHERS=outputs/compare-fashion-mnist-dit-xs4-3seeds/fashion-mnist-dit-xs4-attention/seed-{seed}/run
RUNS=outputs/conversion-fashion-mnist-dit-xs4-runs
OUT=outputs/conversion-fashion-mnist-dit-xs4
FINE_TUNE_STEPS=600  # a quarter of the teachers' 2400 steps
SCRATCH_STEPS=3628   # the teacher's 2400 steps + a student's 600, in ATConv steps of the same cost (step_cost.json)
# What `atdiff compare --preset quick` gives the runs it trains, so that these runs' evals are the ones compared.
COMMON=(training.sample_every=0 training.checkpoints_total_limit=null training.eval_num_images=250
        training.eval_num_real=2000 sampling.num_inference_steps=20 sampling.guidance_scale=1.0)
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE  # two trainings at a time, one core each

train() {  # NAME SEED CONFIG KEY=VALUE...
    local name=$1 seed=$2 config=$3; shift 3
    local dir=$RUNS/$name/seed-$seed log=$RUNS/$name/seed-$seed.log
    [[ -f $dir/model_index.json ]] && return 0
    mkdir -p "$RUNS/$name"
    echo "[$name seed $seed] training, log in $log"
    atdiff train --config "$config" --resume latest "${COMMON[@]}" "$@" training.seed="$seed" \
        training.output_dir="$dir" > "$log" 2>&1 || { tail -n 3 "$log"; return 1; }
}

student() {  # MIXER SEED: the seed's teacher converted to MIXER, fine-tuned on the usual loss + distillation
    local mixer=$1 seed=$2 teacher=${TEACHERS/\{seed\}/$2}
    train "$mixer-distilled" "$seed" "configs/fashion-mnist-dit-xs4-$mixer.yaml" \
        model.init_from="$teacher" objective.distill_from="$teacher" objective.distill_weight=0.5 \
        training.max_steps=$FINE_TUNE_STEPS training.checkpoint_every=$FINE_TUNE_STEPS training.eval_every=$FINE_TUNE_STEPS
}

scratch() {  # SEED: ATConv from random weights, for the cost of the teacher's and a student's training
    train atconv-scratch-matched "$1" configs/fashion-mnist-dit-xs4-atconv.yaml \
        training.max_steps=$SCRATCH_STEPS training.checkpoint_every=$SCRATCH_STEPS training.eval_every=$SCRATCH_STEPS
}

if [[ ${1:-} == --job ]]; then shift; "$@"; exit; fi  # one line of the queue below

# Two trainings at a time, longest first; xargs fails (and set -e stops) if any of them fails.
{ for seed in 0 1 2; do echo "scratch $seed"; done
  for seed in 0 1 2; do echo "student atconv $seed"; echo "student hybrid $seed"; done
} | xargs -P 2 -L 1 bash "$0" --job

atdiff compare "$TEACHERS" "$RUNS/atconv-distilled/seed-{seed}" "$RUNS/hybrid-distilled/seed-{seed}" \
    "$RUNS/atconv-scratch-matched/seed-{seed}" --preset quick --seeds 0 1 2 --kid \
    --num-images 1000 --num-real 2000 --out "$OUT"
cp "$OUT"/{report.md,report.json,fid_vs_step.png,throughput.png,compare.json} eval/results/conversion-fashion-mnist-dit-xs4/
