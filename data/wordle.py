"""
Wordle, the course's running example, as a GRPO task: letters in, letters out.

A prompt is the game so far, one line per earlier guess, each letter followed by its mark (G right place,
Y elsewhere, X absent); the completion is the next guess, spelled letter by letter in the course's tags:

    <|begin|>..........\n..........\n..........\ncXrXaGnXeY\nsXlXaGtXeG\n   ->   <guess>image</guess><|end|>

An earlier guess's letter and its mark are one token ("aG"), so a single attention head reads a whole fact
(this letter, here, is green); the guess is spelled one letter per token; each tag is one token. The layout
never moves: every prompt is 31 tokens. A tiny model trained from scratch reads this feedback within minutes;
with a letter and its mark as two tokens it did not (nor with one token per word): experiments/wordle.md.

The CPU-sized default game: 600 answers, which are also the allowed guesses (200 held out as evaluation
answers, never a training answer; 400 for training), full rules (six turns, duplicate letters as the official
game). `--task=wordle_full` plays the full lists (6,748 allowed guesses, 2,118 answers), sized for a GPU: every
function below takes full=True for it.

The warm start imitates a sloppy teacher: after the first turn it plays, half the time, a word that fits the
greens and greys but ignores the yellows (never a repeat), otherwise a word that could still be the answer. The
default reward sees the whole truth of a guess (rewards.wordle_guess: -1 not an allowed word, 0 ruled out by
the feedback, a repeat included, 1 could still be the answer, 2 the answer), so GRPO can learn to use the
yellows that the demonstrations ignore. GRPO's states are the policy's own greedy games against words outside
the game (training_examples), so the reward pays for reading the feedback, not for knowing the answer list.
The course's rewards (format, feedback use, information gain, win) are there too, weighted 0:
`--reward_weights=0,0.2,0.3,0.5,1` trains on them instead.

Files in data/wordle/ (source and license in data/wordle/README.md):
    allowed.txt            allowed guesses (SCOWL size 70, plus every answer)
    answers_train.txt      answers for training games and demonstrations
    answers_heldout.txt    200 answers kept for evaluation, split off with a fixed seed

    python -m data.wordle build-lists DICT_DIR   # rebuild the word lists from Debian's wamerican packages
    python -m data.wordle players [N]            # the reference players on N held-out games

The task interface is data/__init__.py's; show_games(player, n) prints held-out games turn by turn. The game's
rules (feedback, which words are still possible) are rewards.py's, written once.
"""

import os
import random
import re
import string
import sys
from functools import lru_cache

import numpy as np

from data.tokenizer import encoding_from_merges, train_bpe
from rewards import (candidates, parse_guess, wordle_consistent, wordle_feedback, wordle_feedback_use,
                     wordle_format, wordle_guess, wordle_info_gain, wordle_win)

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wordle")
MAX_TURNS = 6
HELDOUT = 200
EVAL_LIMIT = HELDOUT  # an evaluation plays each held-out answer once: --eval_games above it is refused
HEADLINE = ("win_rate", "mean_guesses", "invalid_rate", "consistent_rate")  # greedy and sampled in the table
SPLIT_SEED = 1234
TRAIN_ANSWERS = 400  # the CPU-sized game: these many training answers (a fixed sample) + the 200 held out
SLIP = 0.5           # how often the sloppy teacher ignores the yellows
# train.py's defaults for this task (flags given on the command line win): measured in experiments/wordle.md.
# A prompt is 31 tokens and a completion 9 ("<guess>", five letters, "</guess>", <|end|>). dynamic_sampling
# (DAPO): half to four fifths of the groups score all 8 samples alike, so they are dropped and more states drawn;
# refill_factor=2 samples twice the groups still missing in a refill round, since most come out flat again;
# max_sampling_rounds=3 stops refilling sooner than 4 and learns from about as many groups, in less time.
TRAIN_DEFAULTS = dict(block_size=40, max_new_tokens=8, sft_steps=3000, sft_batch_size=64, grpo_steps=800,
                      prompts_per_step=32, group_size=8, lr=1e-4, beta=0.04, eval_interval=200,
                      dynamic_sampling=True, refill_factor=2, max_sampling_rounds=3)


# ----------------------------------------------------------------------------------------------------------------
# Word lists and tokenizer


def read_list(name):
    with open(os.path.join(HERE, name)) as f:
        return [w.strip() for w in f if w.strip()]


@lru_cache(maxsize=None)
def words(full=False):
    """(allowed frozenset, all answers tuple, train answers tuple, held-out answers tuple). The default game's
    answers are the held-out 200 and a fixed sample of TRAIN_ANSWERS training answers, and they are also its
    allowed guesses; the full game has every answer and SCOWL's allowed list."""
    train, heldout = tuple(read_list("answers_train.txt")), tuple(read_list("answers_heldout.txt"))
    if full:
        allowed = frozenset(read_list("allowed.txt"))
    else:
        train = tuple(sorted(random.Random(SPLIT_SEED).sample(train, TRAIN_ANSWERS)))
        allowed = frozenset(train + heldout)
    return allowed, tuple(sorted(train + heldout)), train, heldout


@lru_cache(maxsize=None)
def tokenizer():
    """Bytes, one token per tag, and one token per letter of an earlier guess together with its mark ("aG",
    "aY", "aX": 78 tokens) and per pair of dots (a turn not played yet is five tokens, as a played one).
    A guess is spelled letter by letter (lower case only: none of these merges applies to it)."""
    tags = train_bpe(["<guess>", "</guess>"], vocab_size=1 << 20)
    marked = [(letter.encode(), mark.encode()) for letter in string.ascii_lowercase for mark in "GYX"]
    return encoding_from_merges(tags + marked + [(b".", b".")], name="wordle")


def build_lists(dict_dir):
    """Answers: five-letter lower-case words of SCOWL's small list (size 35: common words) without plurals,
    -ed/-ies forms and Roman numerals. Allowed guesses: the same from the large list (size 70), plus answers."""
    def five_letter(name):
        with open(os.path.join(dict_dir, name), encoding="latin-1") as f:
            return {w.strip() for w in f if re.fullmatch(r"[a-z]{5}", w.strip())}

    with open(os.path.join(dict_dir, "american-english-large"), encoding="latin-1") as f:
        lexicon = {w.strip().lower() for w in f}
    roman = re.compile(r"m{0,4}(cm|cd|d?c{0,3})(xc|xl|l?x{0,3})(ix|iv|v?i{0,3})")

    def inflected(w):
        return ((w.endswith("s") and not w.endswith("ss") and (w[:-1] in lexicon or
                 (w.endswith("es") and w[:-2] in lexicon) or (w.endswith("ies") and w[:-3] + "y" in lexicon)))
                or (w.endswith("ed") and (w[:-1] in lexicon or w[:-2] in lexicon))
                or (w.endswith("ied") and w[:-3] + "y" in lexicon))

    small = five_letter("american-english-small")
    answers = sorted(w for w in small if not inflected(w) and not roman.fullmatch(w))
    allowed = sorted(five_letter("american-english-large") | set(answers))
    shuffled = answers[:]
    random.Random(SPLIT_SEED).shuffle(shuffled)
    heldout, train = sorted(shuffled[:HELDOUT]), sorted(shuffled[HELDOUT:])
    for name, lst in (("allowed.txt", allowed), ("answers_train.txt", train), ("answers_heldout.txt", heldout)):
        with open(os.path.join(HERE, name), "w") as f:
            f.write("\n".join(lst) + "\n")
    print(f"wrote {len(allowed)} allowed, {len(train)} train and {len(heldout)} held-out answers to {HERE}")


# ----------------------------------------------------------------------------------------------------------------
# Prompts, examples, rewards


EMPTY_LINE = "." * 10 + "\n"  # a turn not played yet


def prompt(example):
    """Five lines, one per earlier turn, every letter followed by its mark ("cXrXaGnXeY"); the turns not played
    yet come first, as dots. The layout never moves: letter i of the k-th line before the guess, and letter i
    of the guess, sit at the same positions in every prompt (no padding either)."""
    lines = ["".join(letter + mark for letter, mark in zip(guess, fb)) + "\n" for guess, fb in example["history"]]
    return "<|begin|>" + EMPTY_LINE * (MAX_TURNS - 1 - len(lines)) + "".join(lines)


def completion(guess):
    return f"<guess>{guess}</guess>"


def make_example(answer, history, full=False):
    allowed, answers, _, _ = words(full)
    return {"answer": answer, "history": tuple(history), "allowed": allowed, "answers": answers}


def pool_after(history, full=False):
    """The answers still possible after history, a tuple of (guess, feedback), in the answer list's order."""
    return candidates(tuple(history), words(full)[1])


# GRPO's states (experiments/wordle.md). A state is a game in progress whose earlier turns the policy itself
# played, greedily, as the evaluation plays (train.py hands it over as `policy`); its hidden word is, with
# probability OFF_LIST_SHARE, a dictionary word outside the game, so no game word is the answer and the reward
# can pay only for reading the feedback (a guess that still fits it), not for recalling the 400 training answers.
OFF_LIST_SHARE = 1.0
# The fewest earlier lines a state holds. The opening (no line) is fitted by every allowed word, so its group is
# flat unless a sample misspells: at 0, about a third of the states teach spelling only and the warm start already
# spells the opening (experiments/wordle.md).
MIN_HISTORY = 1


@lru_cache(maxsize=None)
def off_list_words(full=False):
    """The allowed.txt words outside the game (never a held-out answer). The full game has none (every allowed
    word is a game word), so there every state's hidden word is a training answer."""
    allowed, _, _, _ = words(full)
    return tuple(sorted(set(read_list("allowed.txt")) - allowed))


def training_examples(n, rng, max_history=4, policy=None, full=False):
    """n game states, never won, in which some game word still fits the feedback: MIN_HISTORY..max_history turns
    played by `policy` (a player, examples -> completion texts) or, without one, by the warm start's teacher,
    against an off-list word (probability OFF_LIST_SHARE) or a training answer. The games are played side by
    side, one call of the player per turn; a guess that is not an allowed word uses its turn and adds no line,
    as in the evaluation (a state left with fewer than MIN_HISTORY lines is dropped)."""
    allowed, _, train, _ = words(full)
    off_list = off_list_words(full) or train
    play = policy or reference_players(rng, full)[DEFAULT_PLAYER]
    examples, rounds = [], 0
    while len(examples) < n:
        # A player that seldom spells a word (a model with no warm start) or always wins leaves few states with
        # MIN_HISTORY lines: after 8 rounds, states with fewer are drawn and kept, rather than drawing forever.
        fewest, rounds = (MIN_HISTORY if rounds < 8 else 0), rounds + 1
        # Twice the games still needed: about half are dropped (won, or nothing fits), and every round costs up
        # to max_history calls of the policy whatever its size (15 calls per draw of 32 at 1x, 4 at 2x). The
        # games are independent, so the first n survivors are as good a sample as any n; the rest go unused.
        games = [{"answer": rng.choice(off_list if rng.random() < OFF_LIST_SHARE else train), "history": [],
                  "turns": rng.randint(fewest, max_history)} for _ in range(2 * (n - len(examples)))]
        for turn in range(max_history):
            # Still playing: not won (turns = -1), and some game word still fits (else the state is dropped).
            playing = [game for game in games if turn < game["turns"] and pool_after(game["history"], full)]
            if not playing:
                break
            texts = play([make_example(game["answer"], game["history"], full) for game in playing])
            for game, text in zip(playing, texts):
                guess = parse_guess(text)
                if guess == game["answer"]:
                    game["turns"] = -1  # won: not a state to train on
                elif guess in allowed:
                    game["history"].append((guess, wordle_feedback(guess, game["answer"])))
        examples += [make_example(game["answer"], game["history"], full) for game in games  # a non-word adds
                     if game["turns"] >= 0 and len(game["history"]) >= fewest  # no line
                     and pool_after(game["history"], full)]
    return examples[:n]


def reward_functions():
    """(functions, weights): the whole truth of a guess (rewards.wordle_guess), and the course's lesson 8 trio
    plus the win, weighted 0 (a reward weighted 0 is not even computed): --reward_weights=0,0.2,0.3,0.5,1
    trains on the course's instead."""
    return [wordle_guess, wordle_format, wordle_feedback_use, wordle_info_gain, wordle_win], [1.0, 0, 0, 0, 0]


DEFAULT_PLAYER = "sloppy"  # whose games the warm start imitates


def demonstrations(n, rng, player=DEFAULT_PLAYER, full=False):
    """n (prompt, completion) pairs for the supervised warm start: every turn of games on training answers
    played by a reference player ("random" teaches the format and the words but no strategy)."""
    _, _, train, _ = words(full)
    play = reference_players(rng, full)[player]
    pairs = []
    while len(pairs) < n:
        answer, history = rng.choice(train), []
        for _ in range(MAX_TURNS):
            example = make_example(answer, history, full)
            text = play([example])[0]
            pairs.append((prompt(example), text))
            guess = parse_guess(text)
            if guess == answer:
                break
            history.append((guess, wordle_feedback(guess, answer)))
    return pairs[:n]


# ----------------------------------------------------------------------------------------------------------------
# Players and the full-game evaluator. A player maps a list of examples to a list of completion texts.


@lru_cache(maxsize=None)  # 243 patterns; the table asks 14 million times in the full game
def code(pattern):
    """A feedback pattern as a base-3 number, G = 2, Y = 1, X = 0 at 3**i: one byte per guess-answer pair."""
    return sum("XYG".index(mark) * 3 ** i for i, mark in enumerate(pattern))


@lru_cache(maxsize=None)
def feedback_table(full=False):
    """The feedback code of every allowed guess (rows, sorted) against every answer (columns), by
    rewards.wordle_feedback, computed once (half a second for the default game, about 20 for the full one), so
    the maximum-information player scores every guess against the answers still possible with one indexing
    operation."""
    allowed, answers, _, _ = words(full)
    guesses = sorted(allowed)
    codes = np.array([[code(wordle_feedback(g, a)) for a in answers] for g in guesses], dtype=np.uint8)
    return guesses, {w: i for i, w in enumerate(answers)}, codes


def max_info_guess(history, full=False):
    """The allowed guess that minimizes the expected number of candidates left (sum of squared partition
    sizes); ties go to a guess that could itself be the answer, then alphabetical order."""
    pool = pool_after(history, full)
    if len(pool) <= 2:
        return pool[0]
    guesses, column, codes = feedback_table(full)
    cols = codes[:, [column[w] for w in pool]].astype(np.int64)  # (guesses, |pool|)
    rows = np.repeat(np.arange(len(guesses)), len(pool))
    counts = np.bincount(rows * 243 + cols.ravel(), minlength=len(guesses) * 243).reshape(len(guesses), 243)
    expected = (counts ** 2).sum(1)
    pool_words = set(pool)
    is_candidate = np.array([g in pool_words for g in guesses])
    best = np.lexsort((np.arange(len(guesses)), ~is_candidate, expected))[0]
    return guesses[best]


@lru_cache(maxsize=None)
def first_guess(full=False):
    return max_info_guess((), full)  # the same for every game: computed once


@lru_cache(maxsize=None)
def answer_letters(full=False):
    """(answers, 5) int8 table of the answers' letters (a = 0), for filtering all answers at once."""
    _, answers, _, _ = words(full)
    return np.array([[ord(c) - 97 for c in w] for w in answers], dtype=np.int8)


@lru_cache(maxsize=100_000)
def greens_and_greys(history, full=False):
    """The answers that fit the greens and greys of history but may break its yellows (the sloppy teacher's
    slip), none of them an earlier guess, in the answer list's order."""
    _, answers, _, _ = words(full)
    letters = answer_letters(full)  # (A, 5)
    fits = np.ones(len(letters), dtype=bool)
    for guess, fb in history:
        marked = {g for g, m in zip(guess, fb) if m != "X"}
        for i, (g, m) in enumerate(zip(guess, fb)):
            if m == "G":  # this letter in this place
                fits &= letters[:, i] == ord(g) - 97
            elif m == "X" and g not in marked:  # absent, unless another copy in that guess was marked
                fits &= ~(letters == ord(g) - 97).any(1)
    earlier = {guess for guess, _ in history}  # never an earlier guess
    # a numpy loop over the answers: the warm start's teacher calls it every turn
    return tuple(answers[i] for i in np.flatnonzero(fits) if answers[i] not in earlier)


def reference_players(rng=None, full=False):
    """random: any allowed word; candidate: a random answer still possible; sloppy: the warm start's teacher
    (candidate, but after the first turn, SLIP of the time, a word that ignores the yellows); max_info: the
    guess that leaves the fewest candidates on average."""
    rng = rng or random.Random(0)
    allowed, answers, _, _ = words(full)
    allowed_list = sorted(allowed)

    def random_word(examples):
        return [completion(rng.choice(allowed_list)) for _ in examples]

    def candidate(examples):
        return [completion(rng.choice(pool_after(ex["history"], full))) for ex in examples]

    def sloppy(examples):
        out = []
        for ex in examples:
            history = tuple(ex["history"])
            slip = history and rng.random() < SLIP
            pool = greens_and_greys(history, full) if slip else pool_after(history, full)
            out.append(completion(rng.choice(pool)))
        return out

    def max_info(examples):
        return [completion(max_info_guess(ex["history"], full) if ex["history"] else first_guess(full))
                for ex in examples]

    return {"random": random_word, "candidate": candidate, "sloppy": sloppy, "max_info": max_info}


def evaluate(player, n=HELDOUT, keep_games=0, answers=None, max_turns=MAX_TURNS, full=False):
    """Play a full game for each of the first n held-out answers (or `answers`), all games a turn at a time.
    A guess that does not parse or is not an allowed word uses up the turn and adds no feedback.
    Returns win_rate (won within max_turns), mean_guesses (over wins), invalid_rate and consistent_rate
    (shares of all guesses: consistent = could still be the answer given the feedback so far), and the first
    `keep_games` transcripts under "transcripts"."""
    allowed, _, _, heldout = words(full)
    answers = list(answers if answers is not None else heldout[:n])
    histories = [[] for _ in answers]
    transcripts = [[] for _ in answers]
    turns_to_win = [None] * len(answers)
    guesses = invalid = consistent = 0
    for turn in range(1, max_turns + 1):
        active = [i for i in range(len(answers)) if turns_to_win[i] is None]
        if not active:
            break
        texts = player([make_example(answers[i], histories[i], full) for i in active])
        for i, text in zip(active, texts):
            guess = parse_guess(text)
            guesses += 1
            transcripts[i].append(text)
            if guess is None or guess not in allowed:
                invalid += 1
                continue
            consistent += wordle_consistent(completion(guess), make_example(answers[i], histories[i], full)) == 1.0
            histories[i].append((guess, wordle_feedback(guess, answers[i])))
            if guess == answers[i]:
                turns_to_win[i] = turn
    wins = [t for t in turns_to_win if t is not None]
    result = {"games": len(answers), "win_rate": len(wins) / len(answers),
              "mean_guesses": sum(wins) / len(wins) if wins else float("nan"),
              "invalid_rate": invalid / guesses, "consistent_rate": consistent / guesses}
    if keep_games:  # at most every game played (--log_samples may exceed --eval_games)
        result["transcripts"] = [{"answer": answers[i], "guesses": transcripts[i]}
                                 for i in range(min(keep_games, len(answers)))]
    return result


def show_games(player, n=4, full=False):
    """Print n held-out games of `player`, turn by turn: the completion, the guess's feedback, and the result."""
    result = evaluate(player, n, keep_games=n, full=full)
    allowed, _, _, _ = words(full)
    for game in result["transcripts"]:
        answer = game["answer"]
        print(f"answer {answer}")
        for turn, text in enumerate(game["guesses"], 1):
            guess = parse_guess(text)
            mark = wordle_feedback(guess, answer) if guess in allowed else "invalid guess"
            print(f"  {turn}. {text!r:<32} {mark}")
        print("  won" if parse_guess(game["guesses"][-1]) == answer else "  lost")
    print(" | ".join(f"{k} {v:.3f}" for k, v in result.items() if isinstance(v, float)))


def main(argv):
    if argv[:1] == ["build-lists"] and len(argv) == 2:
        build_lists(argv[1])
    elif argv[:1] == ["players"]:
        n = int(argv[1]) if len(argv) > 1 else HELDOUT
        for name, player in reference_players(random.Random(0)).items():
            r = evaluate(player, n)
            print(f"{name:<10} win {r['win_rate']:.1%}  mean guesses {r['mean_guesses']:.2f}  "
                  f"invalid {r['invalid_rate']:.1%}  consistent {r['consistent_rate']:.1%}")
    else:
        print(__doc__)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
