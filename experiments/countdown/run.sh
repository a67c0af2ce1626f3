#!/usr/bin/env bash
# Countdown (3 numbers up to 20, targets 10..100): warm start on the solver's answers, then GRPO; three seeds, one
# after another on one thread each. Results are copied into experiments/countdown/.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs experiments/countdown
for seed in 1 2 3; do
  python train.py --task=countdown --sft_steps=300 --grpo_steps=400 --eval_interval=100 --seed=$seed --threads=1 \
    --out_dir=runs/countdown-seed$seed --overwrite > runs/countdown-seed$seed.log 2>&1
  mkdir -p experiments/countdown/seed$seed
  cp runs/countdown-seed$seed/{eval.json,metrics.jsonl,config.json} experiments/countdown/seed$seed/
done
