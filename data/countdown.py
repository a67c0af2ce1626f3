"""
Countdown, the task of TinyZero and most minimal R1-Zero reproductions: combine the given numbers, each exactly
once, with + - * / into an expression that equals the target.

    <|begin|>use 7 3 25 to make 96      ->      <answer>(25+7)*3</answer><|end|>

The answer is checked by rewards.evaluate_expression, a bounded parser (never eval). Rewards: the format (a
well-formed expression in the answer tags) weighted 0.1 and correctness weighted 0.9, so a well-formed wrong
answer earns 0.1 and a right one 1.0, as in TinyZero. A brute-force solver (`reachable`) makes only solvable
instances, writes the warm-start demonstrations, and is the ceiling player.

The task interface is data/__init__.py's. Module constants set the difficulty: NUMBERS given numbers between 1 and
MAX_NUMBER, targets between TARGET_MIN and TARGET_MAX. The default (3 numbers up to 20, targets 10..100) is sized
for a tiny model on a CPU; R1-Zero-style runs use 3 or 4 numbers up to 99.

    python -m data.countdown            # the reference players on the held-out instances
"""

import random
import sys
from fractions import Fraction
from functools import lru_cache
from itertools import combinations

from data.tokenizer import encoding_from_merges, train_bpe
from rewards import countdown_correct, countdown_format, parse_answer

NUMBERS, MAX_NUMBER, TARGET_MIN, TARGET_MAX = 3, 20, 10, 100
TRAIN_DEFAULTS = dict(max_new_tokens=24, block_size=48)
EVAL_SEED = 2468
HEADLINE = ("solved_rate", "format_rate")
OPS = "+-*/"


# ----------------------------------------------------------------------------------------------------------------
# The solver: every value reachable from a multiset of numbers, each used once, with one expression for each


@lru_cache(maxsize=100_000)
def reachable(numbers):
    """{value (Fraction): expression} for every value that an expression using each of `numbers` (a sorted
    tuple) exactly once can take. Splits the multiset into two non-empty parts in every way, recursively, and
    combines their values with each operator: exhaustive, since every expression tree has a root split.
    3 numbers: about 100 values; 4: a few thousand."""
    if len(numbers) == 1:
        return {Fraction(numbers[0]): str(numbers[0])}
    out = {}
    n = len(numbers)
    for k in range(1, n // 2 + 1):
        for left_idx in combinations(range(n), k):
            left = tuple(numbers[i] for i in left_idx)
            right = tuple(numbers[i] for i in range(n) if i not in left_idx)
            for a, ea in reachable(left).items():
                for b, eb in reachable(right).items():
                    for value, text in combine(a, ea, b, eb):
                        out.setdefault(value, text)
    return out


def combine(a, ea, b, eb):
    """The values of a OP b and b OP a (the non-commutative ones both ways), with bracketed expressions."""
    def wrap(e):
        return e if e.isdigit() else f"({e})"
    yield a + b, f"{ea}+{eb}"
    yield a * b, f"{wrap(ea)}*{wrap(eb)}"
    yield a - b, f"{ea}-{wrap(eb)}"
    yield b - a, f"{eb}-{wrap(ea)}"
    if b != 0:
        yield a / b, f"{wrap(ea)}/{wrap(eb)}"
    if a != 0:
        yield b / a, f"{wrap(eb)}/{wrap(ea)}"


def solve(numbers, target):
    """An expression that uses each number once and equals target, or None."""
    return reachable(tuple(sorted(numbers))).get(Fraction(target))


def random_example(rng):
    """Numbers drawn uniformly, then a target drawn uniformly among the reachable integers in range (redrawing
    numbers that reach none): every instance is solvable, and easy targets are not favoured."""
    while True:
        numbers = tuple(rng.randint(1, MAX_NUMBER) for _ in range(NUMBERS))
        targets = sorted(int(v) for v in reachable(tuple(sorted(numbers)))
                         if v.denominator == 1 and TARGET_MIN <= v <= TARGET_MAX)
        if targets:
            return {"numbers": numbers, "target": rng.choice(targets)}


# ----------------------------------------------------------------------------------------------------------------
# The task interface


def prompt(example):
    return f"<|begin|>use {' '.join(map(str, example['numbers']))} to make {example['target']}\n"


def completion(expression):
    return f"<answer>{expression}</answer>"


def training_examples(n, rng):
    return [random_example(rng) for _ in range(n)]


def reward_functions():
    return [countdown_format, countdown_correct], [0.1, 0.9]


@lru_cache(maxsize=None)
def tokenizer():
    rng = random.Random(0)
    texts = []
    for ex in training_examples(1000, rng):
        texts.append(prompt(ex).removeprefix("<|begin|>") + completion(solve(ex["numbers"], ex["target"])))
    return encoding_from_merges(train_bpe(texts, 320), name="countdown")


def random_expression(numbers, rng):
    """A random expression using each number once: pair up two random parts with a random operator until one
    is left. The right format, right by chance."""
    parts = [str(x) for x in numbers]
    rng.shuffle(parts)
    while len(parts) > 1:
        a, b = parts.pop(), parts.pop()
        parts.insert(rng.randrange(len(parts) + 1), f"({a}{rng.choice(OPS)}{b})")
    return parts[0][1:-1] if len(numbers) > 1 else parts[0]


def reference_players(rng=None):
    rng = rng or random.Random(0)

    def solver(examples):  # the ceiling: every instance is solvable by construction
        return [completion(solve(ex["numbers"], ex["target"])) for ex in examples]

    def random_player(examples):
        return [completion(random_expression(ex["numbers"], rng)) for ex in examples]

    return {"solver": solver, "random": random_player}


DEFAULT_PLAYER = "solver"



def evaluation_examples(n):
    return training_examples(n, random.Random(EVAL_SEED))  # a stream of its own, never a training one


def evaluate(player, n=200, keep_games=0):
    """solved_rate: share of right answers; format_rate: share of well-formed expressions (right or not)."""
    examples = evaluation_examples(n)
    texts = player(examples)
    result = {"games": n,
              "solved_rate": sum(countdown_correct(t, ex) for t, ex in zip(texts, examples)) / n,
              "format_rate": sum(countdown_format(t, ex) for t, ex in zip(texts, examples)) / n}
    if keep_games:
        result["transcripts"] = [{"prompt": prompt(ex), "completion": t, "answer": parse_answer(t)}
                                 for ex, t in zip(examples[:keep_games], texts)]
    return result


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    for name, player in reference_players(random.Random(0)).items():
        print(f"{name:>8}: {evaluate(player, n)}")
