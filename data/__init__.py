"""
One module per task. Every task module has the same interface, which train.py, sample.py and course.py use:

    tokenizer()                         the task's tiktoken Encoding (built offline, cached)
    BLOCK_SIZE, MAX_NEW_TOKENS          the default context and completion lengths, tokens
    HEADLINE                            the evaluation figures reported first
    DEFAULT_PLAYER                      the reference player whose answers the warm start imitates
    training_examples(n, rng)           n examples (the record of a prompt, handed to the reward functions);
                                        one that takes policy= gets the model as a player (Wordle's states)
    prompt(example)                     the prompt text
    demonstrations(n, rng, player)      n (prompt, completion) pairs from a reference player
    reward_functions()                  (functions, default weights)
    reference_players(rng)              {name: player}; a player maps a list of examples to completion texts
    evaluate(player, n, keep_games)     held-out figures, and the first keep_games transcripts
    evaluation_examples(n)              the held-out examples of a single-turn task (Wordle plays whole games)

Optional: init_embeddings(weight, enc) seeds structure into a new model's token embeddings; show_games(player, n)
prints a multi-turn task's games; EVAL_LIMIT caps evaluate's n (Wordle has 200 held-out answers). The two helpers
below are what every single-turn task does the same way.
"""

import random


def single_turn_demonstrations(task, n, rng, player):
    """n (prompt, completion) pairs: the player answers n fresh training examples."""
    play = task.reference_players(rng)[player]
    examples = task.training_examples(n, rng)
    return list(zip((task.prompt(ex) for ex in examples), play(examples)))


def held_out_examples(task, n, seed):
    """The first n examples of the task's fixed held-out stream (its own seed, never used for training)."""
    return task.training_examples(n, random.Random(seed))
