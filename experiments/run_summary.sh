#!/usr/bin/env bash
# Lessons 5 and 6: reward hacking and its cure. The same warm start ("lead": copy the first one or two lines),
# then GRPO on the quiz reward alone (--reward_weights=1,0) or with the length penalty (the task's default 1,1).
# Results are copied into experiments/summary/.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs experiments/summary
seeds=${SEEDS:-1}
for seed in $seeds; do
  for run in "quiz-only 1,0" "quiz+length 1,1"; do
    set -- $run
    out=summary-$1-seed$seed
    python train.py --task=summary --sft_steps=200 --grpo_steps=200 --eval_interval=50 --reward_weights=$2 \
      --seed=$seed --threads=1 --out_dir=runs/$out --overwrite > runs/$out.log 2>&1
    mkdir -p experiments/summary/$out
    cp runs/$out/{eval.json,metrics.jsonl,config.json} experiments/summary/$out/
  done
done
