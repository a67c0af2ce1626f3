"""
Wordle with the full lists, for a GPU: 6,748 allowed guesses and 2,118 answers (200 held out), otherwise the
same task as data/wordle.py, whose functions take full=True for it:

    python train.py --task=wordle_full --device=cuda --n_layer=8 --n_embd=384 --sft_steps=6000 --sft_batch_size=256
"""

from functools import partial

from data import wordle
from data.wordle import (DEFAULT_PLAYER, EVAL_LIMIT, HEADLINE, TRAIN_DEFAULTS, prompt,  # noqa: F401
                         reward_functions, tokenizer)

training_examples = partial(wordle.training_examples, full=True)
demonstrations = partial(wordle.demonstrations, full=True)
reference_players = partial(wordle.reference_players, full=True)
evaluate = partial(wordle.evaluate, full=True)
show_games = partial(wordle.show_games, full=True)
