"""A whole task in one file, to copy for your own problem: spell a word backwards (`<|begin|>grpo>` -> `oprg`),
from a teacher who reverses the middle letters half the time, for a reward per letter in place. `--task=reverse`"""

import random
import string

TRAIN_DEFAULTS = dict(block_size=16, max_new_tokens=6, sft_steps=300, grpo_steps=200)


def training_examples(n, rng):
    return [{"word": "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 5)))} for _ in range(n)]


def evaluation_examples(n):
    return training_examples(n, random.Random(4242))  # a fixed stream, never a training one


def prompt(example):
    return f"<|begin|>{example['word']}>"


def letters_in_place(completion, example):
    """The share of the reversed word's letters that the completion has in the right place."""
    want = example["word"][::-1]
    return sum(a == b for a, b in zip(completion, want)) / max(len(want), len(completion))


def reward_functions():
    return [letters_in_place], [1.0]


def reference_players(rng=None):
    rng = rng or random.Random(0)

    def sloppy(examples):  # the outer letters swapped, the middle ones reversed only half the time
        words = [ex["word"] for ex in examples]
        return [w[-1] + (w[-2:0:-1] if rng.random() < 0.5 else w[1:-1]) + w[0] for w in words]

    return {"sloppy": sloppy, "oracle": lambda examples: [ex["word"][::-1] for ex in examples]}
