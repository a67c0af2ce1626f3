"""train.py with one of the Wordle game's constants changed, for the experiments in experiments/wordle.md (none of
them a default). Its own flags come first and are taken off before train.py reads the rest:

    --slip=P            how often the sloppy teacher ignores the yellows (data.wordle.SLIP, default 0.5)
    --train_answers=N   training answers in the CPU game (data.wordle.TRAIN_ANSWERS, default 400; the allowed
                        guesses are these plus the 200 held out)
    --answer_reward=R   what rewards.wordle_guess pays for the answer (default 2.0; 1.0 = no win bonus)
    --teacher_reads=greens  the teacher's slip keeps only the greens (and never repeats), not greens and greys
    --off_list=P        share of GRPO's states whose hidden word is outside the game (data.wordle.OFF_LIST_SHARE,
                        default 1.0; 0 = training answers only)
    --teacher_states    the sloppy teacher plays GRPO's states' earlier turns, not the policy (with --off_list=0:
                        the states of the defaults before the fifth session, the same distribution, not the same
                        random stream)
    --all_turns         every turn of a game the policy plays for GRPO's states is a state, not one state per game
                        at a random length (half the games a draw; timed in the fourteenth session: slower early,
                        faster late, shorter histories; not pursued, experiments/wordle.md)

    python experiments/wordle/variant.py --answer_reward=1 --task=wordle \
        --init_from=runs/wordle-seed1337/warm_start.pt --sft_steps=0 --reference_players=false --out_dir=runs/x
"""
import os
import sys
from functools import lru_cache

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import numpy as np

import rewards
import train
from data import wordle

OWN = {"--slip": float, "--train_answers": int, "--answer_reward": float, "--teacher_reads": str,
       "--off_list": float, "--teacher_states": bool, "--all_turns": bool}
own, rest = {}, []
for arg in sys.argv[1:]:
    key, _, value = arg.partition("=")
    if key in OWN:
        if OWN[key] is bool and value not in ("", "true"):
            sys.exit(f"{key} takes no value (give it or leave it out), not {value!r}")
        own[key] = True if OWN[key] is bool else OWN[key](value)
    else:
        rest.append(arg)
wordle.SLIP = own.get("--slip", wordle.SLIP)
wordle.TRAIN_ANSWERS = own.get("--train_answers", wordle.TRAIN_ANSWERS)  # read when the lists are first built
wordle.OFF_LIST_SHARE = own.get("--off_list", wordle.OFF_LIST_SHARE)
if own.get("--teacher_states"):  # a training_examples without a policy argument: train.py hands it none
    policy_states = wordle.training_examples
    wordle.training_examples = lambda n, rng, max_history=4: policy_states(n, rng, max_history)
if own.get("--all_turns"):
    def all_turn_states(n, rng, max_history=4, policy=None):
        """n states as training_examples draws them (the policy's games, never won, some game word still fits,
        at least MIN_HISTORY lines), but each game is played up to max_history turns and every turn that adds a
        line is a state; the n are drawn at random from all of them, so short and long histories mix."""
        allowed, _, train_answers, _ = wordle.words()
        off_list = wordle.off_list_words() or train_answers
        states = []
        while len(states) < n:
            games = [{"answer": rng.choice(off_list if rng.random() < wordle.OFF_LIST_SHARE else train_answers),
                      "history": [], "won": False} for _ in range(max(1, (n - len(states) + 1) // 2))]
            for _ in range(max_history):
                playing = [g for g in games if not g["won"] and len(wordle.pool_after(tuple(g["history"])))]
                if not playing:
                    break
                texts = policy([wordle.make_example(g["answer"], g["history"]) for g in playing])
                for game, text in zip(playing, texts):
                    guess = wordle.parse_guess(text)
                    if guess == game["answer"]:
                        game["won"] = True
                    elif guess in allowed:
                        game["history"].append((guess, wordle.wordle_feedback(guess, game["answer"])))
                        if (len(game["history"]) >= wordle.MIN_HISTORY
                                and len(wordle.pool_after(tuple(game["history"])))):
                            states.append(wordle.make_example(game["answer"], game["history"]))
        return rng.sample(states, n)
    wordle.training_examples = all_turn_states
if "--answer_reward" in own:
    def wordle_guess_answer_paid(completion, example):
        reward = rewards.wordle_guess(completion, example)
        return own["--answer_reward"] if reward == 2.0 else reward
    wordle.reward_functions = lambda: ([wordle_guess_answer_paid], [1.0])
if own.get("--teacher_reads", "greens_and_greys") == "greens":
    @lru_cache(maxsize=100_000)
    def greens_only(history):
        _, answers, _, _ = wordle.words()
        guessed = {g for g, _ in history}
        greens = {(i, g) for guess, fb in history for i, (g, m) in enumerate(zip(guess, fb)) if m == "G"}
        return np.array([i for i, w in enumerate(answers)
                         if w not in guessed and all(w[i] == g for i, g in greens)])
    wordle.greens_and_greys = greens_only
elif own.get("--teacher_reads", "greens_and_greys") != "greens_and_greys":
    sys.exit(f"--teacher_reads must be greens or greens_and_greys, not {own['--teacher_reads']!r}")
train.main(rest)
