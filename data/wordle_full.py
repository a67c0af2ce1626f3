"""
Wordle with the full lists, for a GPU: 6,748 allowed guesses and 2,118 answers (200 held out), otherwise the
same task as data/wordle.py (which holds all of it):

    python train.py --task=wordle_full --device=cuda --n_layer=8 --n_embd=384 --sft_steps=6000 --sft_batch_size=256
"""

from data import wordle

wordle.use_full_lists()
from data.wordle import *  # noqa: E402,F401,F403  the same functions, now on the full lists
