#!/usr/bin/env bash
# Countdown (3 numbers up to 20, targets 10..100): a warm start on the solver's answers, then GRPO; seeds 1, 2
# and 3, two at a time on one thread each. Run folders in runs/; the kept files in experiments/countdown/.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p runs experiments/countdown
for seed in 1 2 3; do
    python train.py --task=countdown --sft_steps=300 --grpo_steps=400 --eval_interval=100 --seed=$seed \
        --threads=1 --out_dir=runs/countdown-seed$seed --overwrite > runs/countdown-seed$seed.log 2>&1 &
    while [ "$(jobs -r | wc -l)" -ge 2 ]; do sleep 1; done
done
wait
for seed in 1 2 3; do
    mkdir -p experiments/countdown/seed$seed
    cp runs/countdown-seed$seed/{eval.json,config.json} experiments/countdown/seed$seed/
    python experiments/plot.py thin runs/countdown-seed$seed/metrics.jsonl experiments/countdown/seed$seed/metrics.jsonl.gz
done
python experiments/plot.py curves experiments/countdown/curves.png runs/countdown-seed{1,2,3}
