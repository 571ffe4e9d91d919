#!/usr/bin/env bash
# Attention vs ATConv vs hybrid, DiT-XS/4 on Fashion-MNIST, 3 training seeds each (CPU, ~1.5 hours on
# 2 cores). Run from the repository root; a rerun resumes where it stopped. The sampling-speed probes
# ran a second time once the machine was idle: see README.md.
set -euo pipefail
export OMP_WAIT_POLICY=PASSIVE
OUT=outputs/compare-fashion-mnist-dit-xs4-3seeds
atdiff compare configs/fashion-mnist-dit-xs4-{attention,atconv,hybrid}.yaml \
    training.max_steps=2400 training.checkpoint_every=800 training.eval_every=800 \
    --preset quick --seeds 0 1 2 --jobs 2 --kid --num-images 2000 --num-real 2000 --out "$OUT"
cp "$OUT"/{report.md,report.json,fid_vs_step.png,throughput.png,compare.json} eval/results/compare-fashion-mnist-dit-xs4-3seeds/
