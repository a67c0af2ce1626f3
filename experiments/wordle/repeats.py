"""How often a run's greedy player repeats a guess in the 200 held-out games, before and after GRPO. (An invalid
guess adds no feedback, so greedy decoding sees the same prompt and repeats it for the rest of the game.)

    python experiments/wordle/repeats.py runs/wordle-seed1337
"""
import os
import sys
from contextlib import nullcontext

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import train
from data import wordle
from rewards import parse_guess

allowed = wordle.words()[0]
for stage in ("warm_start", "grpo"):
    model, enc, cfg = train.load_run(sys.argv[1], warm_start=stage == "warm_start")
    model.eval()
    result = wordle.evaluate(train.model_player(model, enc, wordle, cfg.max_new_tokens, nullcontext()), 200,
                             keep_games=200)
    guesses = repeats = invalid_repeats = 0
    for game in result["transcripts"]:
        seen = []
        for text in game["guesses"]:
            guess = parse_guess(text)
            guesses += 1
            repeats += guess in seen
            invalid_repeats += guess in seen and guess not in allowed
            seen.append(guess)
    print(f"{stage:<10} win {result['win_rate']:.3f} | invalid {result['invalid_rate']:.3f} | repeated guesses "
          f"{repeats / guesses:.3f} ({repeats} of {guesses}; {invalid_repeats} of them not words)")
