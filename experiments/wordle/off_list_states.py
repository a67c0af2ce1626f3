"""An experiment, not a default: GRPO on Wordle states whose hidden word is, some of the time, a dictionary word
that is not in the game at all (SCOWL's allowed list minus the game's 600 words), so no state is tied to the
answer list. The diagnosis it tests (experiments/wordle.md): every training state's hidden word is a training
answer, so a consistent training answer always exists, and the model learns to fall back to training answers;
in held-out games the consistent words are held-out words, which it rarely plays. The reward needs only the
history (consistent or not), so an off-list hidden word is a fair state: the sloppy teacher plays 0-4 turns
against it, and a state is kept only while some game word still fits the feedback. No held-out answer is ever
a hidden word. With --off_list_demos the warm start's games mix the hidden words the same way. Everything
else is train.py as is (this script swaps data.wordle.training_examples, and demonstrations). Since the sixth
session the states come from data.wordle.training_examples without a policy (the teacher's games side by side,
a turn at a time): the same distribution as the figures in experiments/wordle.md, another random stream.

    python experiments/wordle/off_list_states.py --task=wordle --init_from=runs/wordle-seed1337/warm_start.pt \
        --sft_steps=0 --reference_players=false --out_dir=runs/wordle-offlist
    python experiments/wordle/off_list_states.py --off_list_demos --task=wordle --reference_players=false \
        --out_dir=runs/wordle-offdemo
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import train
from data import wordle
from rewards import parse_guess, wordle_feedback

OFF_LIST_SHARE = 0.5  # share of the states (and, with --off_list_demos, of the demonstration games) off the list
OFF_LIST_DEMOS = "--off_list_demos" in sys.argv  # the warm start's games too
_, _, train_answers, _ = wordle.words()
teacher_states = wordle.training_examples
wordle.OFF_LIST_SHARE = OFF_LIST_SHARE


def training_examples(n, rng, max_history=4):
    """data.wordle.training_examples played by the teacher: it takes no policy, so train.py hands it none."""
    return teacher_states(n, rng, max_history)


def demonstrations(n, rng, player=wordle.DEFAULT_PLAYER):
    """wordle.demonstrations with the same mix of hidden words (--off_list_demos): a game against an off-list
    word ends when no game word fits the feedback any more."""
    play = wordle.reference_players(rng)[player]
    pairs = []
    while len(pairs) < n:
        hidden = rng.choice(wordle.off_list_words() if rng.random() < OFF_LIST_SHARE else train_answers)
        history = []
        for _ in range(wordle.MAX_TURNS):
            if not len(wordle.pool_after(tuple(history))):
                break
            example = wordle.make_example(hidden, history)
            text = play([example])[0]
            pairs.append((wordle.prompt(example), text))
            guess = parse_guess(text)
            if guess == hidden:
                break
            history.append((guess, wordle_feedback(guess, hidden)))
    return pairs[:n]


wordle.training_examples = training_examples
if OFF_LIST_DEMOS:
    wordle.demonstrations = demonstrations
train.main([arg for arg in sys.argv[1:] if arg != "--off_list_demos"])
