#!/usr/bin/env bash
# The default run (python train.py, addition) over three seeds, and what its parts are worth. Run from anywhere;
# the run folders land in runs/ and the kept files in experiments/default/.
#   bash experiments/default/run.sh seeds      # seeds 1337, 1, 2, one after another, each alone with torch's
#                                              # default threads (2 here), timed
#   bash experiments/default/run.sh ablation   # from seed 1337's warm start: KL beta (0, 0.04) x group size
#                                              # (4, 8), then dynamic sampling, 200 GRPO steps, seeds 1-3, two
#                                              # runs at a time on one thread each
#   bash experiments/default/run.sh oracle     # the default with a correct teacher (--sft_player=oracle), 3 seeds
set -euo pipefail
cd "$(dirname "$0")/../.."
out=experiments/default
mkdir -p runs
keep() {  # keep RUN AS: the table, the config and the thinned log of a run folder
    mkdir -p $out/$2
    cp runs/$1/eval.json runs/$1/config.json $out/$2/
    python experiments/plot.py thin runs/$1/metrics.jsonl $out/$2/metrics.jsonl.gz
}
case ${1:?seeds, ablation or oracle} in
seeds)
    for seed in 1337 1 2; do
        /usr/bin/time -f "wall %e s" python train.py --seed=$seed --out_dir=runs/default-seed$seed --overwrite \
            > runs/default-seed$seed.log 2>&1
        grep -a "^wall" runs/default-seed$seed.log
        keep default-seed$seed seed$seed
    done
    python experiments/carry_check.py runs/default-seed{1337,1,2}/warm_start.pt runs/default-seed{1337,1,2}/ckpt.pt \
        | tee $out/carry_check.txt
    python experiments/plot.py curves $out/curves.png runs/default-seed{1337,1,2} ;;
ablation)
    base=runs/default-seed1337/warm_start.pt
    for setting in "group4-beta0:--group_size=4 --beta=0" "group4-beta0.04:--group_size=4 --beta=0.04" \
                   "group8-beta0:--group_size=8 --beta=0" "group8-beta0.04:--group_size=8 --beta=0.04" \
                   "group8-beta0.04-dynamic:--group_size=8 --beta=0.04 --dynamic_sampling"; do
        name=${setting%%:*} flags=${setting#*:}
        for seed in 1 2 3; do
            python train.py --init_from=$base --sft_steps=0 --grpo_steps=200 --eval_interval=200 --threads=1 \
                --reference_players=false --seed=$seed $flags --out_dir=runs/ablation/$name-seed$seed \
                --overwrite > runs/ablation-$name-$seed.log 2>&1 &
            while [ "$(jobs -r | wc -l)" -ge 2 ]; do sleep 1; done
        done
    done
    wait
    for run in runs/ablation/*; do keep ablation/$(basename $run) ablation/$(basename $run); done
    python experiments/plot.py ablation $out/ablation/reward.png $out/ablation/table.md runs/ablation/* ;;
oracle)
    for seed in 1337 1 2; do
        python train.py --sft_player=oracle --seed=$seed --out_dir=runs/oracle-seed$seed --overwrite \
            > runs/oracle-seed$seed.log 2>&1
        keep oracle-seed$seed oracle/seed$seed
    done ;;
esac
