#!/usr/bin/env bash
# Ablation: loss aggregation (grpo vs dr_grpo) x KL beta (0 vs 0.04), 3 seeds each, every run starting from the
# same warm start (the default run's, seed 1337) so only GRPO differs. 200 GRPO steps, evaluated at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
base=runs/default-seed1337/warm_start.pt
for loss in grpo dr_grpo; do
  for beta in 0 0.04; do
    for seed in 1 2 3; do
      python train.py --init_from=$base --sft_steps=0 --grpo_steps=200 --eval_interval=200 --threads=1 \
        --reference_players=false --loss_type=$loss --beta=$beta --seed=$seed --overwrite \
        --out_dir=runs/ablation/$loss-beta$beta-seed$seed > runs/ablation-$loss-$beta-$seed.log 2>&1 &
      while [ "$(jobs -r | wc -l)" -ge 2 ]; do sleep 1; done
    done
  done
done
wait
