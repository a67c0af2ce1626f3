"""Where a Wordle run's time goes: matrix-multiply FLOPs and wall seconds of each phase, against the machine's
matmul peak (bench.py's), for experiments/wordle.md ("What 15 minutes allows on this machine"). Any train.py flag
passes through (--task=wordle and --out_dir=runs/cost are added unless given):

    python experiments/wordle/cost.py --sft_steps=100 --grpo_steps=0                       # warm-start steps
    python experiments/wordle/cost.py --init_from=runs/wordle-seed1337/ckpt.pt --sft_steps=0 --grpo_steps=30 \
        --eval_interval=1000 --eval_games=1 --log_samples=1 --reference_players=false  # late GRPO steps

train.py runs twice: once under torch's FlopCounterMode, which counts every matmul and attention FLOP, forward
and backward (its dispatch slows every operation, so that run is not timed), then once plain, timed. A phase
is the outermost of the functions below that is running; the evaluation's own games count as evaluation.
"""
import os
import sys
import time
from collections import defaultdict
from contextlib import nullcontext

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import torch
from torch.utils.flop_counter import FlopCounterMode

import bench
import data
import grpo
import train
from config import parse_config
from data import wordle

PHASES = [  # (module, function, phase name)
    (train, "warm_start", "warm start"),
    (train, "evaluate_model", "evaluation (greedy + sampled)"),
    (data, "sample", "GRPO: states (the policy's greedy games)"),
    (grpo, "sample", "GRPO: groups sampled"),
    (grpo, "logprobs", "GRPO: frozen log-probs (reference, pi_old)"),
    (grpo, "update_passes", "GRPO: update passes"),
]
ORIGINAL = {(module, name): getattr(module, name) for module, name, _ in PHASES}


def measure(argv, count_flops, device):
    """Run train.main(argv) with every phase wrapped: {phase: [FLOPs, seconds, calls]}."""
    totals, running = defaultdict(lambda: [0, 0.0, 0]), []

    def clock():  # CUDA runs asynchronously: wait for the queued kernels before reading the time
        bench.sync(device)
        return time.perf_counter()

    def wrapped(fn, phase):
        def run_phase(*args, **kwargs):
            if running:  # inside another phase: its FLOPs and seconds are that phase's
                return fn(*args, **kwargs)
            running.append(phase)
            counter = FlopCounterMode(display=False) if count_flops else nullcontext()
            try:
                with counter:
                    t0 = clock()
                    out = fn(*args, **kwargs)
                    seconds = clock() - t0
            finally:
                running.pop()
            total = totals[phase]
            total[0] += counter.get_total_flops() if count_flops else 0
            total[1] += seconds
            total[2] += 1
            return out
        return run_phase

    for module, name, phase in PHASES:
        setattr(module, name, wrapped(ORIGINAL[module, name], phase))
    try:
        t0 = time.perf_counter()
        train.main(argv)
        totals["whole run"][1] = time.perf_counter() - t0
    finally:
        for module, name, _ in PHASES:
            setattr(module, name, ORIGINAL[module, name])
    return totals


def stage_steps(phase, sft_steps, grpo_steps, evaluations):
    """What a phase's figures are divided by: its stage's steps, or for the evaluation the evaluations."""
    if phase == "warm start":
        return sft_steps
    return evaluations if phase.startswith("evaluation") else grpo_steps


def main(argv):
    given = {arg.split("=")[0] for arg in argv}
    argv = (["--task=wordle"] if "--task" not in given else []) + (
        ["--out_dir=runs/cost"] if "--out_dir" not in given else []) + (
        ["--overwrite"] if "--overwrite" not in given else []) + argv  # the timed run replaces the counted one
    cfg = parse_config(argv)
    cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and cuda and torch.cuda.is_bf16_supported())
    dtype = torch.bfloat16 if bf16 else torch.float32
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    peak = bench.bench_peak(device, dtype, repeats=5)  # bench.py's: first, on a quiet machine
    flops = measure(argv, count_flops=True, device=device)
    seconds = measure(argv, count_flops=False, device=device)

    # Per step of its stage; the evaluations per evaluation. A stage given 0 steps is not measured.
    d = wordle.TRAIN_DEFAULTS
    evaluations = d["grpo_steps"] // d["eval_interval"] + 1  # at GRPO's start, every eval_interval, at the end
    steps, default_steps = {}, {}
    for phase, (_, _, calls) in seconds.items():
        n = stage_steps(phase, cfg.sft_steps, cfg.grpo_steps, calls) if phase != "whole run" else 0
        if n:
            steps[phase] = n
            default_steps[phase] = stage_steps(phase, d["sft_steps"], d["grpo_steps"], evaluations)

    print(f"\n{' '.join(argv)}\n{device} {str(dtype)[6:]} matmul peak (bench.py's): {peak:.1f} GFLOP/s")
    print(f"{'phase':42s} {'calls':>6s} {'GFLOP':>8s} {'s':>7s} {'GFLOP/s':>8s} | per step (evaluation: "
          "per evaluation): GFLOP, s")
    for phase, n in steps.items():
        gflop, (_, sec, calls) = flops[phase][0] / 1e9, seconds[phase]
        print(f"{phase:42s} {calls:6d} {gflop:8.1f} {sec:7.2f} {gflop / sec:8.1f} | "
              f"{gflop / n:7.2f} {sec / n:7.3f}")
    in_phases = sum(seconds[phase][1] for phase in steps)
    print(f"whole run {seconds['whole run'][1]:.1f} s, {in_phases:.1f} s of it in the phases above (the rest: "
          "set-up, rewards, game logic, checkpoints, logging, the reference players)")

    # The default run's matmul FLOPs at these per-step figures, and the least time they take at the peak.
    tflop = sum(flops[phase][0] / n * default_steps[phase] for phase, n in steps.items()) / 1e12
    print(f"the default's {', '.join(f'{default_steps[p]} x {p}' for p in steps)} at these figures: "
          f"{tflop:.1f} TFLOP, at least {tflop * 1e3 / peak:.0f} s at the peak")


if __name__ == "__main__":
    main(sys.argv[1:])
