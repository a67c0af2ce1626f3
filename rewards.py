"""
Reward functions: pure, `reward(completion, example) -> float`, never raising, always finite.

`completion` is the decoded text the policy wrote; `example` is the task's record of the prompt (for Wordle a
dict with the answer, the game so far and the word lists). Each function's docstring has worked examples; the
same cases are a parametrized table in tests/test_rewards.py.

Sections: generic helpers (length penalty, weighted combination, `score`: every function on a batch, checked),
Wordle (the course's running example: its rules, then format, use of feedback, information gain, win, partial
credit), addition (the toy task for fast tests),
Countdown (a safe arithmetic parser: model output is parsed, never eval'd), and the quiz reward for summaries.
No torch and no model here: the LLM-as-judge reward, which runs a model, lives with the task that uses it
(data/summary.py).
"""

import math
import operator
import re
from collections import Counter
from fractions import Fraction
from functools import lru_cache

# ----------------------------------------------------------------------------------------------------------------
# Generic


def length_penalty(max_chars, per_char=0.01, floor=-1.0):
    """A reward function: 0 up to max_chars characters, then -per_char per extra character, down to floor.
    The course's lesson 6 cure for reward hacking by verbosity.
        length_penalty(5)("abc", None) == 0.0;  length_penalty(5, 0.1)("abcdefg", None) == -0.2"""
    def reward(completion, example):
        if not isinstance(completion, str):
            return 0.0
        return max(floor, -per_char * max(0, len(completion) - max_chars))
    reward.__name__ = f"length_penalty_{max_chars}"
    return reward


def combine(weighted, name="combined"):
    """One reward function from {reward_fn: weight}: the weighted sum, with the parts reported too:
    `fn.parts(completion, example)` -> {name: value}."""
    items = list(weighted.items())

    def parts(completion, example):
        return {getattr(fn, "__name__", str(i)): fn(completion, example) for i, (fn, _) in enumerate(items)}

    def reward(completion, example):
        return sum(w * fn(completion, example) for fn, w in items)
    reward.__name__, reward.parts = name, parts
    return reward


def score(completions, examples, reward_fns, weights=None):
    """Every reward function on every completion, checked: (the weighted total of each completion, and a table
    of one row per completion, one float per function, 0.0 for a function weighted 0, which is not even run).
    A function with `fn.batched = True` takes (completions, examples) and returns a list or tuple of one value
    per completion. A reward function that raises, or returns anything but a real number that is finite in
    float32, stops the run with its name and the completion: a silently wrong reward trains a silently wrong
    model; so does a weighted total beyond float32.
        score(["ab"], [None], [lambda c, ex: len(c), lambda c, ex: 1], [0.5, 1]) == ([2.0], [[2.0, 1.0]])"""
    weights = [1.0] * len(reward_fns) if weights is None else list(weights)
    if len(weights) != len(reward_fns):
        raise ValueError(f"{len(weights)} reward weights for {len(reward_fns)} reward functions")
    table = [[0.0] * len(reward_fns) for _ in completions]
    for j, fn in enumerate(reward_fns):
        if weights[j] == 0:
            continue
        name = getattr(fn, "__name__", repr(fn))
        if getattr(fn, "batched", False):  # e.g. an LLM judge: one call grades the whole batch
            values = call_reward(name, fn, completions, examples)
            if not isinstance(values, (list, tuple)) or len(values) != len(completions):
                got = f"{len(values)} values" if isinstance(values, (list, tuple)) else repr(type(values))
                raise ValueError(f"batched reward function {name} returned {got} for {len(completions)} "
                                 f"completions (a list or tuple of one number each is required)")
        else:
            values = [call_reward(name, fn, c, ex) for c, ex in zip(completions, examples)]
        for i, (completion, value) in enumerate(zip(completions, values)):
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                    and abs(value) <= FLOAT32_MAX):
                raise ValueError(f"reward function {name} returned {value!r} (a number finite in float32 is "
                                 f"required) on completion {completion!r}")
            table[i][j] = float(value)
    totals = [sum(w * v for w, v in zip(weights, row)) for row in table]
    if not all(abs(t) <= FLOAT32_MAX for t in totals):
        raise ValueError(f"the weighted reward overflows float32 (weights {weights}, largest total "
                         f"{max(map(abs, totals)):.3g})")
    return totals, table


FLOAT32_MAX = 3.4028234663852886e38


def call_reward(name, fn, completion, example):
    """fn(completion, example); an exception becomes one that names the function and what it was given."""
    try:
        return fn(completion, example)
    except Exception as e:
        given = (f"a batch of {len(completion)} completions" if getattr(fn, "batched", False)
                 else f"completion {completion!r}")
        raise RuntimeError(f"reward function {name} raised {type(e).__name__}: {e} on {given}") from e


# ----------------------------------------------------------------------------------------------------------------
# Wordle: the rules

GUESS_RE = re.compile(r"<guess>\s*([^<>\s]*)\s*</guess>", re.IGNORECASE)


def parse_guess(completion):
    """The word between the last <guess> and </guess> tags, lower-cased, or None. Never raises.
        "<guess>crane</guess>" -> "crane";  "<think>x</think><guess> Slate </guess>" -> "slate"
        "crane" -> None"""
    if not isinstance(completion, str):
        return None
    found = GUESS_RE.findall(completion[-2000:])  # a guess is near the end; bounded work on huge strings
    return found[-1].lower() if found else None


def wordle_feedback(guess, answer):
    """Official rules: greens first; then, left to right, a letter is yellow while the answer still has
    unmatched copies of it; otherwise grey.  G = right place, Y = elsewhere, X = not in the word / no copies left.
    The one statement of the rule: data/wordle.py's players and filters all come back here.
        ("crane", "crane") -> "GGGGG";  ("speed", "abide") -> "XXYXY";  ("eerie", "sweet") -> "YYXXX" """
    result = ["X"] * 5
    unmatched = [a for g, a in zip(guess, answer) if g != a]  # the answer's letters not matched green
    for i, (g, a) in enumerate(zip(guess, answer)):
        if g == a:
            result[i] = "G"
        elif g in unmatched:
            result[i] = "Y"
            unmatched.remove(g)
    return "".join(result)


def is_consistent(word, history):
    """Could `word` be the answer, given every (guess, feedback) so far? Exactly the rules: it must produce
    the same feedback for each past guess."""
    return all(wordle_feedback(guess, word) == fb for guess, fb in history)


@lru_cache(maxsize=100_000)
def candidates(history, answers):
    """The answers still possible after `history` (a tuple of (guess, feedback)), in the order of `answers`:
    those of the history before its last guess that give that guess its feedback (is_consistent, one guess at a
    time, so each game's filtering is shared by every later turn)."""
    if not history:
        return answers
    guess, fb = history[-1]
    return tuple(w for w in candidates(history[:-1], answers) if wordle_feedback(guess, w) == fb)


# ----------------------------------------------------------------------------------------------------------------
# Wordle: the course's rewards. example = {"answer": str, "history": tuple of (guess, feedback),
#                                          "allowed": frozenset of guesses, "answers": tuple of possible answers}


def wordle_format(completion, example):
    """Lesson 8's format reward: 1.0 for a tagged guess that is an allowed word, 0.5 for five letters that are
    not in the list, 0.1 for a tagged guess of the wrong length, 0.0 when no guess parses.
        "<guess>crane</guess>" -> 1.0;  "<guess>zzzzz</guess>" -> 0.5;  "<guess>cranes</guess>" -> 0.1
        "crane" -> 0.0"""
    guess = parse_guess(completion)
    if guess is None:
        return 0.0
    if len(guess) != 5 or not guess.isascii() or not guess.isalpha():
        return 0.1
    return 1.0 if guess in example["allowed"] else 0.5


def wordle_feedback_use(completion, example):
    """Lesson 8's "uses previous feedback": for each letter of a valid guess, +0.2 for keeping a green in its
    place, +0.1 for moving a yellow to a new place, -0.2 for putting a yellow back where it was yellow, -0.5 for
    a letter already shown absent, +0.05 for a letter not tried yet; the sum is clipped to [-1, 1]. Repeating an
    earlier guess scores -1: it is a valid word that tells nothing (the reward hack the course warns about).
    An unparsable or invalid guess scores 0.
        history [("crane", "XXGXY")], "<guess>email</guess>" -> e moved +0.1, m,i,l new +0.15, a kept +0.2: 0.45"""
    guess = parse_guess(completion)
    history = example["history"]
    if guess is None or guess not in example["allowed"]:
        return 0.0
    if any(guess == g for g, _ in history):
        return -1.0
    green, yellow, present = set(), set(), set()
    for g, fb in history:
        for i, (letter, mark) in enumerate(zip(g, fb)):
            if mark == "G":
                green.add((letter, i))
                present.add(letter)
            elif mark == "Y":
                yellow.add((letter, i))
                present.add(letter)
    absent = {letter for g, fb in history for letter, mark in zip(g, fb) if mark == "X"} - present
    tried = {letter for g, _ in history for letter in g}
    score = 0.0
    for i, letter in enumerate(guess):
        if (letter, i) in green:
            score += 0.2
        elif (letter, i) in yellow:
            score -= 0.2
        elif letter in absent:
            score -= 0.5
        elif any(letter == y for y, _ in yellow):
            score += 0.1
        elif letter not in tried:
            score += 0.05
    return max(-1.0, min(1.0, score))


def wordle_info_gain(completion, example):
    """Lesson 8's information gain: how much the guess is expected to shrink the set C of answers still
    possible, (|C| - E[|C after|]) / (|C| - 1), in [0, 1], computed exactly over the answer list. 1.0 means
    every outcome leaves one candidate; a repeated guess or one that cannot split C scores 0. With one
    candidate left, 1.0 for guessing it. Invalid or unparsable guesses score 0.
        C = {"crane", "crate", "grape"}: "<guess>crane</guess>" -> each outcome distinct -> 1.0"""
    guess = parse_guess(completion)
    if guess is None or guess not in example["allowed"]:
        return 0.0
    return expected_reduction(guess, tuple(example["history"]), example["answers"])


@lru_cache(maxsize=65536)
def expected_reduction(guess, history, answers):
    pool = candidates(history, answers)
    if len(pool) <= 1:
        return 1.0 if pool and pool[0] == guess else 0.0
    sizes = Counter(wordle_feedback(guess, w) for w in pool)
    expected_left = sum(n * n for n in sizes.values()) / len(pool)
    return (len(pool) - expected_left) / (len(pool) - 1)


def wordle_win(completion, example):
    """1.0 if the guess is the answer, else 0.0.  "<guess>crane</guess>" with answer "crane" -> 1.0"""
    return 1.0 if parse_guess(completion) == example["answer"] else 0.0


def wordle_partial_credit(completion, example):
    """Lesson 4's partial credit: 1.0 for the answer, else 0.2 per green and 0.1 per yellow of an allowed
    guess (at most 0.8 short of a win); 0 for an invalid or unparsable guess.
        answer "crane": "<guess>crate</guess>" -> 4 greens -> 0.8;  "<guess>nacre</guess>" -> 0.1*4 + 0.2 = 0.6"""
    guess = parse_guess(completion)
    if guess is None or guess not in example["allowed"]:
        return 0.0
    if guess == example["answer"]:
        return 1.0
    fb = wordle_feedback(guess, example["answer"])
    return min(0.8, 0.2 * fb.count("G") + 0.1 * fb.count("Y"))


def wordle_guess(completion, example):
    """The default Wordle reward, the whole truth of one guess, ranked: -1.0 when no allowed word parses (a
    misspelling, a word off the list, no tags), 0.0 for an allowed word that the feedback so far rules out (a
    repeated guess always is), 1.0 for one that could still be the answer, 2.0 for the answer. Nothing else pays,
    so it cannot be farmed: partial credit for letters is what a repeated guess once exploited.
        answer "crane", history [("slate", "XXGXG")]: "<guess>crane</guess>" -> 2.0;  "<guess>grape</guess>" -> 1.0
        "<guess>slate</guess>" -> 0.0 (a repeat);  "<guess>crnae</guess>" -> -1.0"""
    guess = parse_guess(completion)
    if guess is None or guess not in example["allowed"]:
        return -1.0
    if guess == example["answer"]:
        return 2.0
    return 1.0 if is_consistent(guess, example["history"]) else 0.0


def wordle_consistent(completion, example):
    """1.0 if the guess is an allowed word that could still be the answer given all feedback, else 0.0; a
    repeated guess is never consistent (its own feedback rules it out unless it was the answer)."""
    guess = parse_guess(completion)
    if guess is None or guess not in example["allowed"]:
        return 0.0
    return 1.0 if is_consistent(guess, example["history"]) else 0.0


# ----------------------------------------------------------------------------------------------------------------
# Addition: the toy task. example = {"a": int, "b": int}; the completion should be the digits of a + b.

NUMBER_RE = re.compile(r"\s*([0-9]{1,40})")


def addition_digits(completion, example):
    """Partial credit per digit: the share of the answer's digits that are right, aligned from the right,
    minus nothing for length; 1.0 only for the exact sum. Non-numbers score 0.
        a=12, b=30 (42): "42" -> 1.0;  "41" -> 0.5;  "142" -> 2/3;  "x" -> 0.0"""
    if not isinstance(completion, str):
        return 0.0
    m = NUMBER_RE.match(completion[:64])
    if not m:
        return 0.0
    got, want = m.group(1), str(example["a"] + example["b"])
    if got == want:
        return 1.0
    right = sum(g == w for g, w in zip(reversed(got), reversed(want)))
    return right / max(len(got), len(want))


def addition_exact(completion, example):
    """1.0 for exactly the sum (surrounding whitespace allowed), else 0.0."""
    return 1.0 if isinstance(completion, str) and completion.strip() == str(example["a"] + example["b"]) else 0.0


# ----------------------------------------------------------------------------------------------------------------
# Countdown: example = {"numbers": tuple of ints, "target": int}. The completion ends with
# <answer>EXPRESSION</answer>, where EXPRESSION uses each number exactly once with + - * / and parentheses.
#
# The expression is model output, so it is parsed by the small recursive-descent parser below, never eval'd:
# "__import__('os')" is not arithmetic, and "9**9**9" (no power operator here) is a syntax error, not an hour of
# CPU. Work is bounded by the input, whatever it holds: at most MAX_EXPR_CHARS characters, numbers of at most
# MAX_NUMBER_DIGITS ASCII digits (so no 5,000-digit integers and no unicode digits such as "٣"), parentheses
# nested at most MAX_DEPTH deep; exact fractions, so 6/4*2 is exactly 3; dividing by zero makes it invalid.

ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
EXPR_TOKEN_RE = re.compile(r"\s*(?:([0-9]+)|([-+*/()]))")
MAX_EXPR_CHARS, MAX_NUMBER_DIGITS, MAX_DEPTH = 100, 4, 12
ARITHMETIC = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


def parse_answer(completion):
    """The text inside the last <answer>...</answer>, or None.  "<answer>3+4</answer>" -> "3+4" """
    if not isinstance(completion, str):
        return None
    found = ANSWER_RE.findall(completion[-(MAX_EXPR_CHARS + 200):])  # bounded work on huge strings
    return found[-1] if found else None


def evaluate_expression(text):
    """(value as a Fraction, list of the numbers it uses) for an arithmetic expression, or None if the text is
    not one (or breaks a bound, or divides by zero). Grammar: expr = term (("+"|"-") term)*;
    term = factor (("*"|"/") factor)*; factor = NUMBER | "(" expr ")". No unary minus: Countdown combines the
    given numbers, so every number in the text is one of them.
        "(25+7)*3" -> (Fraction(96), [25, 7, 3]);  "6/4*2" -> (Fraction(3), [6, 4, 2]);  "1/(2-2)" -> None"""
    if not isinstance(text, str) or len(text) > MAX_EXPR_CHARS:
        return None
    tokens, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = EXPR_TOKEN_RE.match(text, pos)
        if not m or (m.group(1) and len(m.group(1)) > MAX_NUMBER_DIGITS):
            return None
        tokens.append(int(m.group(1)) if m.group(1) else m.group(2))
        pos = m.end()
    numbers, at = [], 0

    def peek():
        return tokens[at] if at < len(tokens) else None

    def chain(depth, operand, ops):  # operand (op operand)*, left to right: one level of precedence
        nonlocal at
        value = operand(depth)
        while peek() in ops:
            op, at = tokens[at], at + 1
            value = ARITHMETIC[op](value, operand(depth))  # Fraction / 0 raises ZeroDivisionError
        return value

    def expr(depth):
        return chain(depth, term, ("+", "-"))

    def term(depth):
        return chain(depth, factor, ("*", "/"))

    def factor(depth):
        nonlocal at
        token = peek()
        if isinstance(token, int):
            at += 1
            numbers.append(token)
            return Fraction(token)
        if token == "(" and depth < MAX_DEPTH:
            at += 1
            value = expr(depth + 1)
            if peek() != ")":
                raise SyntaxError
            at += 1
            return value
        raise SyntaxError

    try:
        value = expr(0)
    except (SyntaxError, ZeroDivisionError):
        return None
    return (value, numbers) if tokens and at == len(tokens) else None


def countdown_format(completion, example):
    """1.0 if the completion ends its answer with a well-formed arithmetic expression, else 0.0 (right or not).
        "<answer>(3+4)*2</answer>" -> 1.0;  "<answer>3+</answer>" -> 0.0;  "14" -> 0.0"""
    return 0.0 if evaluate_expression(parse_answer(completion)) is None else 1.0


def countdown_correct(completion, example):
    """1.0 if the answer uses each given number exactly once and equals the target, else 0.0.
        numbers (3, 4, 2), target 14: "<answer>(3+4)*2</answer>" -> 1.0;  "<answer>3*4+2</answer>" -> 1.0
        "<answer>7*2</answer>" -> 0.0 (7 is not given);  "<answer>(3+4)*2*1</answer>" -> 0.0 (1 is not given)"""
    parsed = evaluate_expression(parse_answer(completion))
    if parsed is None:
        return 0.0
    value, used = parsed
    return 1.0 if value == example["target"] and sorted(used) == sorted(example["numbers"]) else 0.0


# ----------------------------------------------------------------------------------------------------------------
# Summaries (lessons 5 and 6): example = {"facts": tuple of (name, attribute, value), "quiz": the facts asked}.
# A document is a list of facts among filler lines; a good summary keeps the facts and drops the filler.


def answer_question(summary, name, attribute):
    """The reader: the word after `attribute` on a line that names `name` earlier, or None. It reads the
    summary alone, as the course's quiz-taker does, and accepts any wording that keeps that order:
        ("ana: pet = cat", "ana", "pet") -> "cat";  ("ana pet cat", "ana", "pet") -> "cat" """
    pattern = rf"\b{re.escape(name)}\b[^\n]*?\b{re.escape(attribute)}\b\W+(\w+)"
    found = re.search(pattern, summary)
    return found.group(1) if found else None


def quiz_reward(completion, example):
    """The share of quiz questions (facts of the document) the reader answers right from the summary alone.
    Nothing in it prefers short summaries: copying the whole document scores 1.0, which is the reward hack of
    lesson 6 (add a length_penalty to cure it).
        quiz [("ana", "pet", "cat"), ("bo", "city", "rome")]: "ana: pet = cat" -> 0.5"""
    if not isinstance(completion, str) or not example["quiz"]:
        return 0.0
    text = completion[:2000]  # bounded work on huge strings: only the first 2,000 characters are read
    return sum(answer_question(text, n, a) == v for n, a, v in example["quiz"]) / len(example["quiz"])
