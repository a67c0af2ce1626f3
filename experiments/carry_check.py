"""
Where the default run's gain comes from: exact rate on sums with and without a carry, and how often a sum that
needs a carry gets the sloppy teacher's carry-free answer, greedy, on 1,000 held-out problems.

    python experiments/carry_check.py runs/default-seed1337/warm_start.pt runs/default-seed1337/ckpt.pt
"""

import os
import sys
from contextlib import nullcontext

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import data.addition as addition  # noqa: E402
from checkpoint import config_from_dict  # noqa: E402
from data import load_task, model_player  # noqa: E402
from model import GPT  # noqa: E402
from rewards import addition_exact  # noqa: E402

task = load_task("addition")

examples = task.evaluation_examples(1000)
carry = [addition.needs_carry(ex["a"], ex["b"]) for ex in examples]
print(f"{sum(carry)} of {len(examples)} sums need a carry")
print(f"{'checkpoint':<45} {'exact, carry':>13} {'exact, no carry':>16} {'carry-free slip':>16}")
for path in sys.argv[1:]:
    ckpt = torch.load(path, weights_only=True)
    model = GPT(config_from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    max_new_tokens = task.train_defaults["max_new_tokens"]
    answers = model_player(model, task.tokenizer(), task, max_new_tokens, nullcontext())(examples)
    right = [addition_exact(a, ex) == 1.0 for a, ex in zip(answers, examples)]
    slip = [a.strip() == str(addition.sum_without_carry(ex["a"], ex["b"])) for a, ex in zip(answers, examples)]

    def rate(values, want_carry):
        chosen = [v for v, c in zip(values, carry) if c == want_carry]
        return sum(chosen) / len(chosen)

    print(f"{path:<45} {rate(right, True):>13.3f} {rate(right, False):>16.3f} {rate(slip, True):>16.3f}")
