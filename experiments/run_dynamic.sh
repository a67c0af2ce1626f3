#!/usr/bin/env bash
# DAPO's dynamic sampling on the default run: the ablation's group 8, beta 0.04 setting with --dynamic_sampling,
# from the same warm start (runs/default-seed1337/warm_start.pt: run experiments/run_default.sh first), 3 seeds.
set -euo pipefail
cd "$(dirname "$0")/.."
base=runs/default-seed1337/warm_start.pt
for seed in 1 2 3; do
  python train.py --init_from=$base --sft_steps=0 --grpo_steps=200 --eval_interval=200 --threads=1 \
    --reference_players=false --dynamic_sampling --seed=$seed --overwrite \
    --out_dir=runs/dynamic/seed$seed > runs/dynamic-$seed.log 2>&1 &
  while [ "$(jobs -r | wc -l)" -ge 2 ]; do sleep 1; done
done
wait
for seed in 1 2 3; do
  mkdir -p experiments/dynamic/seed$seed
  cp runs/dynamic/seed$seed/{eval.json,metrics.jsonl,config.json} experiments/dynamic/seed$seed/
done
