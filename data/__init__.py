"""
Tasks: one module per task in this folder, found by name (`python train.py --task=NAME` loads data/NAME.py).

A task module defines at least

    prompt(example) -> str                  the prompt text (special tokens allowed: "<|begin|>...")
    training_examples(n, rng) -> list       n fresh examples, any records its reward functions read; one that
                                            also takes policy= gets the model as a player (Wordle's states)
    reward_functions() -> (fns, weights)    reward(completion, example) -> float, as in rewards.py
    evaluation_examples(n) -> list          the first n of a fixed held-out set (or its own `evaluate`)
    reference_players(rng) -> {name: play}  play(examples) -> completion texts; the warm start imitates one

and may define, or gets these defaults:

    tokenizer()                        bytes and the special tokens <|begin|>, <|end|>, <|pad|>
    TRAIN_DEFAULTS                     train.py flags the task sets for itself ({}), e.g. block_size, lr
    DEFAULT_PLAYER                     the player the warm start imitates: the first of reference_players
    demonstrations(n, rng, player)     that player answers n fresh training examples
    evaluate(player, n, keep_games)    the mean of each reward and of their weighted total ("reward") on the
                                       first n held-out examples, and the first keep_games transcripts
    HEADLINE                           the evaluation's figures shown first: ("reward",)
    EVAL_LIMIT                         the most held-out examples there are (None: no limit)
    init_embeddings(weight, enc)       seeds structure into a new model's token embeddings
    show_games(player, n)              prints a multi-turn task's games (sample.py)

data/reverse.py is a whole task in under 40 lines. `load_task(name)` gives any of them as one Task.
"""

import importlib
import inspect
import pkgutil
import random
from dataclasses import dataclass
from typing import Callable, Optional

from data.tokenizer import encoding_from_merges, end_and_pad
from model import sample
from rewards import score

REQUIRED = ("prompt", "training_examples", "reward_functions", "reference_players")


@dataclass
class Task:
    """A task as train.py, sample.py and course.py use it: its module's functions, defaults filled in."""
    name: str
    prompt: Callable
    training_examples: Callable
    reward_functions: Callable
    reference_players: Callable
    tokenizer: Callable
    demonstrations: Callable
    evaluate: Callable
    train_defaults: dict
    default_player: str
    headline: tuple
    eval_limit: Optional[int]
    plays_policy: bool  # training_examples takes policy=: the model plays the states' earlier turns
    init_embeddings: Optional[Callable] = None
    show_games: Optional[Callable] = None
    evaluation_examples: Optional[Callable] = None


def task_names():
    """Every module in data/ that has the task interface: a new file here is a new --task."""
    names = [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]
    return [name for name in names if all(hasattr(importlib.import_module(f"data.{name}"), a) for a in REQUIRED)]


def load_task(name):
    """data/<name>.py as a Task; a module that lacks part of the required interface is refused, naming it."""
    if name not in task_names():
        raise ValueError(f"task {name!r} is not a module of data/ with the task interface; the tasks are "
                         f"{', '.join(task_names())}")
    m = importlib.import_module(f"data.{name}")
    if not (hasattr(m, "evaluate") or hasattr(m, "evaluation_examples")):
        raise ValueError(f"data/{name}.py needs evaluation_examples(n) (or its own evaluate)")
    task = Task(
        name=name, prompt=m.prompt, training_examples=m.training_examples, reward_functions=m.reward_functions,
        reference_players=m.reference_players,
        tokenizer=getattr(m, "tokenizer", lambda: encoding_from_merges([], name=name)),
        demonstrations=getattr(m, "demonstrations", None), evaluate=getattr(m, "evaluate", None),
        train_defaults=dict(getattr(m, "TRAIN_DEFAULTS", {})),
        default_player=getattr(m, "DEFAULT_PLAYER", None) or next(iter(m.reference_players(random.Random(0)))),
        headline=tuple(getattr(m, "HEADLINE", ("reward",))), eval_limit=getattr(m, "EVAL_LIMIT", None),
        plays_policy="policy" in inspect.signature(m.training_examples).parameters,
        init_embeddings=getattr(m, "init_embeddings", None), show_games=getattr(m, "show_games", None),
        evaluation_examples=getattr(m, "evaluation_examples", None))
    if task.demonstrations is None:
        task.demonstrations = lambda n, rng, player=task.default_player: demonstrations(task, n, rng, player)
    if task.evaluate is None:
        task.evaluate = lambda player, n, keep_games=0: mean_rewards(task, player, n, keep_games)
    return task


def demonstrations(task, n, rng, player):
    """n (prompt, completion) pairs: the player answers n fresh training examples."""
    play = task.reference_players(rng)[player]
    examples = task.training_examples(n, rng)
    return list(zip((task.prompt(ex) for ex in examples), play(examples)))


def mean_rewards(task, player, n, keep_games=0):
    """The player on the first n held-out examples: the mean of each reward and of their weighted total."""
    examples = task.evaluation_examples(n)
    texts = player(examples)
    fns, weights = task.reward_functions()
    _, table = score(texts, examples, fns)  # every reward, the ones weighted 0 included
    result = {"games": n, "reward": sum(sum(w * v for w, v in zip(weights, row)) for row in table) / n}
    result.update({f"reward_{fn.__name__}": sum(row[j] for row in table) / n for j, fn in enumerate(fns)})
    if keep_games:
        result["transcripts"] = [{"prompt": task.prompt(ex), "completion": t}
                                 for ex, t in zip(examples[:keep_games], texts)]
    return result


def model_player(model, enc, task, max_new_tokens, autocast, temperature=0.0, generator=None):
    """The model as a task player: greedy by default (as it will be used), or sampled at a temperature."""
    end, pad = end_and_pad(enc)

    def generate(prompts):
        texts = []
        for i in range(0, len(prompts), 256):
            with autocast:
                s = sample(model, prompts[i:i + 256], max_new_tokens=max_new_tokens, temperature=temperature,
                           stop_token=end, pad_token=pad, generator=generator)
            texts += [enc.decode(tokens) for tokens in s.completion_tokens(end)]
        return texts

    def play(examples):
        prompts = [tuple(enc.encode(task.prompt(ex), allowed_special="all")) for ex in examples]
        if temperature > 0:
            return generate(prompts)
        # Greedy answers a prompt the same way every time, so each distinct prompt runs once: every Wordle
        # game opens on the same prompt, and a draw of GRPO's states or an evaluation plays hundreds at once.
        distinct = list(dict.fromkeys(prompts))
        answer = dict(zip(distinct, generate(distinct)))
        return [answer[p] for p in prompts]
    return play
