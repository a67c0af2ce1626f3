#!/usr/bin/env bash
# The GRPO variants on the default task (addition), 3 seeds each: every run starts from the default run's warm
# start of its seed (bash experiments/default/run.sh seeds first) and runs the default's 300 GRPO steps with one
# variant changed; two runs at a time, one thread each. Kept files in experiments/variants/; the table and the plot
# by experiments/variants/table.py. Names as arguments run those variants only (bash run.sh rloo gdpo).
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p runs/variants
for setting in "grpo:" "dapo:--loss_type=dapo" "dr_grpo:--loss_type=dr_grpo --scale_rewards=none" \
               "cispo:--loss_type=cispo --eps_high=4" "sapo:--loss_type=sapo" \
               "gspo:--importance_level=sequence --eps_low=3e-4 --eps_high=4e-4" \
               "dual_clip:--delta=3" "kl_bias_correction:--kl_bias_correction" \
               "rloo:--baseline=leave_one_out" "gdpo:--reward_normalization=normalize_then_sum"; do
    name=${setting%%:*} flags=${setting#*:}
    if [ $# -gt 0 ] && [[ " $* " != *" $name "* ]]; then continue; fi
    for seed in 1337 1 2; do
        python train.py --init_from=runs/default-seed$seed/warm_start.pt --sft_steps=0 --seed=$seed --threads=1 \
            --reference_players=false $flags --out_dir=runs/variants/$name-seed$seed --overwrite \
            > runs/variants/$name-seed$seed.log 2>&1 &
        while [ "$(jobs -r | wc -l)" -ge 2 ]; do sleep 1; done
    done
done
wait
for run in runs/variants/*/; do
    name=$(basename $run)
    mkdir -p experiments/variants/$name
    cp $run/eval.json $run/config.json experiments/variants/$name/
    python experiments/plot.py thin $run/metrics.jsonl experiments/variants/$name/metrics.jsonl.gz
done
python experiments/variants/table.py experiments/variants
