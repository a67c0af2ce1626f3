#!/usr/bin/env bash
# The Wordle default run over three seeds (python train.py --task=wordle), one after another, each alone with
# torch's default threads (2 here) and timed. The run folders and their logs land in runs/; the tables are
# copied into experiments/wordle/ as TAG-seed*-eval.json, and the evaluations every 200 steps as
# TAG-seed*-evals.jsonl, TAG the argument (default `rerun`). experiments/wordle.md names the files it shows.
set -euo pipefail
tag=${1:-rerun}
cd "$(dirname "$0")/../.."
mkdir -p runs experiments/wordle
for seed in 1337 1 2; do
    /usr/bin/time -f "wall %e s" python train.py --task=wordle --seed=$seed --out_dir=runs/wordle-seed$seed \
        --overwrite > runs/wordle-seed$seed.log 2>&1
    grep -a "^wall" runs/wordle-seed$seed.log
    cp runs/wordle-seed$seed/eval.json experiments/wordle/$tag-seed$seed-eval.json
    grep '"stage": "eval"' runs/wordle-seed$seed/metrics.jsonl > experiments/wordle/$tag-seed$seed-evals.jsonl
done
