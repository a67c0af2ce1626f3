#!/usr/bin/env bash
# Ablation: KL beta (0 vs 0.04) x group size (4 vs 8), 3 seeds each, every run starting from the same warm start
# (the default run's, seed 1337: run experiments/run_default.sh first) so only GRPO differs. 200 GRPO steps of
# 16 prompts, evaluated at the end. Two runs at a time, one thread each.
set -euo pipefail
cd "$(dirname "$0")/.."
base=runs/default-seed1337/warm_start.pt
for group in 4 8; do
  for beta in 0 0.04; do
    for seed in 1 2 3; do
      python train.py --init_from=$base --sft_steps=0 --grpo_steps=200 --eval_interval=200 --threads=1 \
        --reference_players=false --group_size=$group --beta=$beta --seed=$seed --overwrite \
        --out_dir=runs/ablation/group$group-beta$beta-seed$seed > runs/ablation-$group-$beta-$seed.log 2>&1 &
      while [ "$(jobs -r | wc -l)" -ge 2 ]; do sleep 1; done
    done
  done
done
wait
mkdir -p experiments/ablation
for run in runs/ablation/*; do
  mkdir -p experiments/ablation/$(basename $run)
  cp $run/{eval.json,metrics.jsonl,config.json} experiments/ablation/$(basename $run)/
done
python experiments/plot.py ablation experiments/ablation/reward.png experiments/ablation/table.md runs/ablation/* || true
