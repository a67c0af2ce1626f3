#!/usr/bin/env bash
# Lessons 5 and 6: reward hacking and its cure. The same warm start ("lead": copy the first one to three lines),
# then GRPO on the quiz reward alone (--reward_weights=1,0) or with the length penalty (the task's default 1,1);
# seeds 1 and 2; the two runs of a seed side by side on one thread each. Kept files in experiments/summary/.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p runs experiments/summary
for seed in 1 2; do
    for run in "quiz-only 1,0" "quiz+length 1,1"; do
        set -- $run
        python train.py --task=summary --sft_steps=400 --grpo_steps=200 --eval_interval=50 --reward_weights=$2 \
            --seed=$seed --threads=1 --out_dir=runs/summary-$1-seed$seed --overwrite \
            > runs/summary-$1-seed$seed.log 2>&1 &
    done
    wait
done
for seed in 1 2; do
    for run in quiz-only quiz+length; do
        mkdir -p experiments/summary/$run-seed$seed
        cp runs/summary-$run-seed$seed/{eval.json,config.json} experiments/summary/$run-seed$seed/
        python experiments/plot.py thin runs/summary-$run-seed$seed/metrics.jsonl experiments/summary/$run-seed$seed/metrics.jsonl.gz
    done
done
python experiments/plot.py hacking experiments/summary/hacking.png runs/summary-*-seed{1,2}
