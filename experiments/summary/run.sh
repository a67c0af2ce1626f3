#!/usr/bin/env bash
# Lessons 5 and 6: reward hacking and its cure. The same warm start ("lead": copy the first one to three lines),
# then GRPO on the quiz reward alone (--reward_weights=1,0) or with the length penalty (the task's default 1,1).
# The two runs go side by side on one thread each. Results are copied into experiments/summary/.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs experiments/summary
seed=${SEED:-1}
for run in "quiz-only 1,0" "quiz+length 1,1"; do
  set -- $run
  python train.py --task=summary --sft_steps=400 --grpo_steps=200 --eval_interval=50 --reward_weights=$2 \
    --seed=$seed --threads=1 --out_dir=runs/summary-$1-seed$seed --overwrite > runs/summary-$1-seed$seed.log 2>&1 &
done
wait
for run in quiz-only quiz+length; do
  mkdir -p experiments/summary/$run-seed$seed
  cp runs/summary-$run-seed$seed/{eval.json,metrics.jsonl,config.json} experiments/summary/$run-seed$seed/
done
