#!/usr/bin/env bash
# The default run over three seeds. Seeds 1 and 2 run side by side on one thread each; seed 1337 runs alone with
# torch's default threads (2 here) and is the one timed. Results are copied into experiments/default/.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs
python train.py --out_dir=runs/default-seed1 --seed=1 --threads=1 --overwrite > runs/default-seed1.log 2>&1 &
python train.py --out_dir=runs/default-seed2 --seed=2 --threads=1 --overwrite > runs/default-seed2.log 2>&1 &
wait
/usr/bin/time -f "wall %e s" python train.py --out_dir=runs/default-seed1337 --overwrite 2>&1 | tee runs/default-seed1337.log
for seed in 1337 1 2; do
    mkdir -p experiments/default/seed$seed
    cp runs/default-seed$seed/{eval.json,metrics.jsonl,config.json} experiments/default/seed$seed/
done
