"""An experiment (experiments/wordle.md): GRPO only on states with at least one earlier line. A state with an empty
history is the opening, where every allowed word fits, so its group is flat unless a sample misspells: about a
third of the default's states teach spelling only. This script drops them (and redraws) before train.main runs;
every flag is train.py's.

    python experiments/wordle/min_history.py --task=wordle --seed=1337 --init_from=runs/ws1337/warm_start.pt \
        --sft_steps=0 --grpo_steps=400 --reference_players=false --threads=1 --out_dir=runs/s-minhist
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import train
from data import wordle

default_states = wordle.training_examples


def training_examples(n, rng, max_history=4, policy=None):
    """data.wordle.training_examples without the states that have no earlier line."""
    states = []
    while len(states) < n:
        states += [ex for ex in default_states(n - len(states), rng, max_history, policy=policy) if ex["history"]]
    return states


wordle.training_examples = training_examples
train.main(sys.argv[1:])
