"""How much of what a Wordle run wins comes from having learned which words are answers, not from reading the
feedback: its greedy player on 200 training answers against the 200 held-out ones, before and after GRPO, and
how often its guesses after the first in held-out games are held-out words (the teacher's share beside it).

    python experiments/wordle/train_vs_heldout.py runs/wordle-seed1337 [RUN ...]
"""
import os
import random
import sys
from contextlib import nullcontext

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import train
from data import wordle
from rewards import parse_guess

allowed, _, train_answers, heldout = wordle.words()
train_sample = random.Random(0).sample(list(train_answers), len(heldout))  # the same 200 for every run


def heldout_share(result):
    """Share of the valid guesses after the first turn that are held-out words."""
    later = [parse_guess(text) for game in result["transcripts"] for text in game["guesses"][1:]]
    later = [guess for guess in later if guess in allowed]
    return sum(guess in set(heldout) for guess in later) / max(1, len(later))


teacher = wordle.evaluate(wordle.reference_players(random.Random(0))[wordle.DEFAULT_PLAYER], keep_games=len(heldout))
print(f"teacher ({wordle.DEFAULT_PLAYER}): held-out words among its later guesses in held-out games "
      f"{heldout_share(teacher):.3f}")
for run_dir in sys.argv[1:]:
    for stage in ("warm_start", "grpo"):
        model, enc, cfg = train.load_run(run_dir, warm_start=stage == "warm_start")
        model.eval()
        player = train.model_player(model, enc, wordle, cfg.max_new_tokens, nullcontext())
        seen = wordle.evaluate(player, answers=train_sample)
        unseen = wordle.evaluate(player, answers=heldout, keep_games=len(heldout))
        print(f"{run_dir} {stage:<10} | training answers: win {seen['win_rate']:.3f} consistent "
              f"{seen['consistent_rate']:.3f} | held-out: win {unseen['win_rate']:.3f} consistent "
              f"{unseen['consistent_rate']:.3f}, held-out words among later guesses {heldout_share(unseen):.3f}",
              flush=True)
