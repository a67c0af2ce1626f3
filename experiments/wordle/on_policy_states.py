"""An experiment (experiments/wordle.md): GRPO on Wordle states from the policy's own games, the earlier turns
sampled at a temperature. Its greedy version against off-list hidden words (--history_temperature=0
--off_list=1.0) is the best lever measured and is now the default (data.wordle.training_examples); this script
keeps the variants measured on the way: sampled histories (temperature 1, gained nothing over three seeds from
the default warm start) and any share of off-list words. Every GRPO step's states are made by the current
policy playing 0-4 turns on training answers, sampled at temperature 1 (or --history_temperature=T; 0 is greedy,
as the evaluation plays); a guess that is not a word uses the turn and adds no line, as in the evaluation.
--off_list=P makes P of the hidden words dictionary words outside the game (such a state is kept only while
some game word still fits). Everything else is train.py as is (this script swaps data.wordle.training_examples
before train.main runs). The sampled-history figures in experiments/wordle.md were measured at commit bf06502,
whose version found a won game by equality and could mark the wrong one of two identical games (same answer,
same history); this one cannot. Since the sixth session it also stops a game once no game word fits (the state
would be dropped anyway), so the batches it plays differ and a run need not repeat an earlier figure bit for bit.

    python experiments/wordle/on_policy_states.py --task=wordle --init_from=runs/wordle-seed1337/warm_start.pt \
        --sft_steps=0 --reference_players=false --out_dir=runs/wordle-onpolicy
    python experiments/wordle/on_policy_states.py --history_temperature=0 --off_list=1.0 --task=wordle \
        --sft_steps=6000 --grpo_steps=1600 --threads=1 --reference_players=false \
        --out_dir=runs/longsft-greedyoff1-1600-seed1337      # the fifth session's runs (the default's states)
"""
import os
import sys
from contextlib import nullcontext

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import train
from data import wordle

OWN = {"--history_temperature": 1.0, "--off_list": 0.0}  # this script's flags and their defaults
own = {key: float(arg.partition("=")[2]) for arg in sys.argv for key in OWN if arg.startswith(key + "=")}
HISTORY_TEMPERATURE = own.get("--history_temperature", OWN["--history_temperature"])
wordle.OFF_LIST_SHARE = own.get("--off_list", OWN["--off_list"])
policy = {}
train_grpo, policy_states = train.train_grpo, wordle.training_examples


def train_grpo_with_policy(run, model, state):
    policy["play"] = train.model_player(model, run.enc, wordle, run.cfg.max_new_tokens, nullcontext(),
                                        temperature=HISTORY_TEMPERATURE)
    return train_grpo(run, model, state)


def training_examples(n, rng, max_history=4):
    """data.wordle.training_examples, its earlier turns played by the policy at HISTORY_TEMPERATURE. (It takes no
    policy argument, so train.py hands it none: the player above, sampled or greedy, is the one used.)"""
    return policy_states(n, rng, max_history, policy=policy["play"])


train.train_grpo = train_grpo_with_policy
wordle.training_examples = training_examples
train.main([arg for arg in sys.argv[1:] if arg.partition("=")[0] not in OWN])
