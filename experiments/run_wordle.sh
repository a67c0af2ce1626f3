#!/usr/bin/env bash
# The Wordle default run over three seeds (python train.py --task=wordle), one after another, each alone with
# torch's default threads (2 here) and timed. The run folders and their logs land in runs/; the tables are
# copied into experiments/wordle/ (rf2-seed*-eval.json, and the evaluations every 200 steps in
# rf2-seed*-evals.jsonl; the previous defaults' are dynsamp-seed* with --refill_factor=1, and eval-seed*.json
# and evals-seed*.jsonl before dynamic sampling). An argument replaces the prefix rf2 (`bash
# experiments/run_wordle.sh s11`: the eleventh session's rerun on another day's machine).
set -euo pipefail
tag=${1:-rf2}
cd "$(dirname "$0")/.."
mkdir -p runs experiments/wordle
for seed in 1337 1 2; do
    /usr/bin/time -f "wall %e s" python train.py --task=wordle --seed=$seed --out_dir=runs/wordle-seed$seed \
        --overwrite > runs/wordle-seed$seed.log 2>&1
    grep -a "^wall" runs/wordle-seed$seed.log
    cp runs/wordle-seed$seed/eval.json experiments/wordle/$tag-seed$seed-eval.json
    grep '"stage": "eval"' runs/wordle-seed$seed/metrics.jsonl > experiments/wordle/$tag-seed$seed-evals.jsonl
done
