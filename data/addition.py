"""
Addition, the toy task: small enough for seconds-long end-to-end tests, and a clear learning signal.

    <|begin|>123+45=      ->      168<|end|>

Numbers have 1..max_digits digits; digits are single tokens (the tokenizer's pattern splits them). The reward
gives partial credit per digit (rewards.addition_digits) and full credit for the exact sum. The tokenizer is
trained in memory on a few thousand equations (a fraction of a second), so there is no file to ship.

The task interface is data/__init__.py's.
"""

import random
from functools import lru_cache

from data.tokenizer import encoding_from_merges, train_bpe
from rewards import addition_digits, addition_exact

MAX_DIGITS = 2
EVAL_SEED = 4321
TRAIN_DEFAULTS = dict(max_new_tokens=5, block_size=64)  # "168<|end|>" is 4 tokens
HEADLINE = ("exact_rate", "digit_score")


@lru_cache(maxsize=None)
def tokenizer():
    rng = random.Random(0)
    texts = [f"{rng.randint(0, 999)}+{rng.randint(0, 999)}={rng.randint(0, 1998)}" for _ in range(2000)]
    return encoding_from_merges(train_bpe(texts, 300), name="addition")


def random_example(rng, max_digits=MAX_DIGITS):
    def number():
        return rng.randint(0, 10 ** rng.randint(1, max_digits) - 1)
    return {"a": number(), "b": number()}


def prompt(example):
    return f"<|begin|>{example['a']}+{example['b']}="


def training_examples(n, rng):
    return [random_example(rng) for _ in range(n)]


def reward_functions():
    return [addition_digits, addition_exact], [1.0, 1.0]


def reference_players(rng=None):
    rng = rng or random.Random(0)

    def oracle(examples):
        return [str(ex["a"] + ex["b"]) for ex in examples]

    def random_digits(examples):
        return [str(rng.randint(0, 10 ** len(str(ex["a"] + ex["b"])) - 1)) for ex in examples]

    def sloppy(examples):  # forgets to carry half the time: right on carry-free sums, else a coin flip
        return [str(ex["a"] + ex["b"] if rng.random() < 0.5 else sum_without_carry(ex["a"], ex["b"]))
                for ex in examples]

    return {"oracle": oracle, "sloppy": sloppy, "random": random_digits}


def sum_without_carry(a, b):
    """Digit-wise sum mod 10, the classic slip: 58 + 67 -> 15 (5+6=11 -> 1, 8+7=15 -> 5)."""
    digits, place = 0, 1
    while a or b:
        digits += ((a % 10 + b % 10) % 10) * place
        a, b, place = a // 10, b // 10, place * 10
    return digits


# The default warm start imitates a teacher who forgets the carry half the time. Supervised learning can at best
# copy its teacher, slips included; the reward checks the sum itself, so GRPO can learn what no demonstration
# shows reliably. (With "oracle" demonstrations the warm start is already as good as the model gets in minutes,
# and GRPO has little left to add: experiments/README.md.)
DEFAULT_PLAYER = "sloppy"



def evaluation_examples(n):
    return training_examples(n, random.Random(EVAL_SEED))  # a stream of its own, never a training one


def needs_carry(a, b):
    return sum_without_carry(a, b) != a + b


def evaluate(player, n=200, keep_games=0):
    """exact_rate: share of exact sums; digit_score: mean partial credit (rewards.addition_digits);
    carry_slip_rate: share of the sums that need a carry answered with the carry-free sum (the teacher's slip)."""
    examples = evaluation_examples(n)
    texts = player(examples)
    carry = [(t, ex) for t, ex in zip(texts, examples) if needs_carry(ex["a"], ex["b"])]
    result = {"games": n, "exact_rate": sum(addition_exact(t, ex) for t, ex in zip(texts, examples)) / n,
              "digit_score": sum(addition_digits(t, ex) for t, ex in zip(texts, examples)) / n,
              "carry_slip_rate": sum(t.strip() == str(sum_without_carry(ex["a"], ex["b"])) for t, ex in carry)
              / max(len(carry), 1)}
    if keep_games:
        result["transcripts"] = [{"prompt": prompt(ex), "completion": t}
                                 for ex, t in zip(examples[:keep_games], texts)]
    return result
