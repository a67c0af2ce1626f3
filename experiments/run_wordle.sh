#!/usr/bin/env bash
# The Wordle default run over three seeds (python train.py --task=wordle). Seeds 1 and 2 run side by side on one
# thread each; seed 1337 runs alone with torch's default threads (2 here) and is the one timed. The run folders
# and their logs land in runs/; the tables are copied into experiments/wordle/.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs experiments/wordle
/usr/bin/time -f "wall %e s" python train.py --task=wordle --out_dir=runs/wordle-seed1337 --overwrite \
    > runs/wordle-seed1337.log 2>&1
python train.py --task=wordle --out_dir=runs/wordle-seed1 --seed=1 --threads=1 --overwrite > runs/wordle-seed1.log 2>&1 &
python train.py --task=wordle --out_dir=runs/wordle-seed2 --seed=2 --threads=1 --overwrite > runs/wordle-seed2.log 2>&1 &
wait
for seed in 1337 1 2; do
    cp runs/wordle-seed$seed/eval.json experiments/wordle/eval-seed$seed.json
    grep '"stage": "eval"' runs/wordle-seed$seed/metrics.jsonl > experiments/wordle/evals-seed$seed.jsonl
done
