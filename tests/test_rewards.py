"""The worked examples of rewards.py's docstrings as a table, plus hostile inputs that must score, not raise."""

import math
import random
import time
from fractions import Fraction

import pytest

import rewards as R

ALLOWED = frozenset(["crane", "crate", "grape", "slate", "email", "speed", "abide", "sweet", "eerie", "nacre",
                     "zesty"])
ANSWERS = ("crane", "crate", "grape")


def ex(answer="crane", history=(), answers=ANSWERS):
    return {"answer": answer, "history": tuple(history), "allowed": ALLOWED, "answers": answers}


@pytest.mark.parametrize("guess,answer,expected", [
    ("crane", "crane", "GGGGG"),
    ("speed", "abide", "XXYXY"),   # two e's in the guess, one in the answer: only the first is yellow
    ("eerie", "sweet", "YYXXX"),   # two e's in both, none in place: both yellow, third e grey
    ("abbey", "babes", "YYGGX"),   # repeated b: one green-free copy each side
    ("steel", "lever", "XXYGY"),   # the answer's other e is still unmatched: the first e is yellow
    ("geese", "eerie", "XGYXG"),   # two greens, and the answer's first e is left for a yellow
    ("lolly", "hello", "XYGGX"),   # both of the answer's l's go to greens: the first l is grey
    ("mamma", "maxim", "GGYXX"),
    ("zzzzz", "crane", "XXXXX"),
])
def test_wordle_feedback_follows_the_official_duplicate_rules(guess, answer, expected):
    assert R.wordle_feedback(guess, answer) == expected


def test_feedback_matches_a_brute_force_definition():
    # Independent statement of the rules: greens; then each non-green guess letter takes one unused,
    # non-green copy from the answer, left to right.
    def slow(guess, answer):
        out, used = [], [g == a for g, a in zip(guess, answer)]
        for i, g in enumerate(guess):
            if g == answer[i]:
                out.append("G")
                continue
            for j, a in enumerate(answer):
                if not used[j] and a == g:
                    used[j] = True
                    out.append("Y")
                    break
            else:
                out.append("X")
        return "".join(out)
    rng = random.Random(0)
    for _ in range(3000):
        g, a = ("".join(rng.choice("abcde") for _ in range(5)) for _ in range(2))
        assert R.wordle_feedback(g, a) == slow(g, a), (g, a)


@pytest.mark.parametrize("fn,completion,example,expected", [
    (R.wordle_format, "<guess>crane</guess>", ex(), 1.0),
    (R.wordle_format, "<guess>zzzzz</guess>", ex(), 0.5),
    (R.wordle_format, "<guess>cranes</guess>", ex(), 0.1),
    (R.wordle_format, "crane", ex(), 0.0),
    (R.wordle_format, "<think>hmm</think><guess> Crane </guess>", ex(), 1.0),
    (R.wordle_feedback_use, "<guess>email</guess>", ex(history=[("crane", "XXGXY")]), 0.45),
    (R.wordle_feedback_use, "<guess>crane</guess>", ex(history=[("crane", "XXGXY")]), -1.0),  # repeated
    (R.wordle_feedback_use, "<guess>zzzzz</guess>", ex(history=[("crane", "XXGXY")]), 0.0),   # not a word
    (R.wordle_feedback_use, "<guess>crate</guess>", ex(history=[("crane", "GGGXG")]), 0.85),  # 4 greens, new t
    (R.wordle_info_gain, "<guess>crane</guess>", ex(), 1.0),
    (R.wordle_info_gain, "<guess>email</guess>", ex(), 0.0),      # YXGXX from all three: splits nothing
    (R.wordle_info_gain, "<guess>zesty</guess>", ex(), 2 / 3),    # splits off crate: E|C'| = (2*2 + 1) / 3
    (R.wordle_info_gain, "<guess>crane</guess>", ex(history=[("crane", "GGGXG")]), 0.0),  # repeated
    (R.wordle_info_gain, "<guess>crate</guess>", ex(answer="crate", history=[("crane", "GGGXG")]), 1.0),
    (R.wordle_win, "<guess>crane</guess>", ex(), 1.0),
    (R.wordle_win, "<guess>crate</guess>", ex(), 0.0),
    (R.wordle_partial_credit, "<guess>crate</guess>", ex(), 0.8),
    (R.wordle_partial_credit, "<guess>nacre</guess>", ex(), 0.6),
    (R.wordle_partial_credit, "<guess>crane</guess>", ex(), 1.0),
    (R.wordle_guess, "<guess>crane</guess>", ex(history=[("slate", "XXGXG")]), 2.0),
    (R.wordle_guess, "<guess>grape</guess>", ex(history=[("slate", "XXGXG")]), 1.0),
    (R.wordle_guess, "<guess>slate</guess>", ex(history=[("slate", "XXGXG")]), 0.0),  # a repeat
    (R.wordle_guess, "<guess>crnae</guess>", ex(history=[("slate", "XXGXG")]), -1.0),  # misspelled
    (R.wordle_guess, "<guess>email</guess>", ex(history=[("slate", "XXGXG")]), 0.0),  # ruled out
    (R.wordle_guess, "crane", ex(), -1.0),  # no tags
    (R.wordle_consistent, "<guess>crate</guess>", ex(history=[("crane", "GGGXG")]), 1.0),
    (R.wordle_consistent, "<guess>grape</guess>", ex(history=[("crane", "GGGXG")]), 0.0),
    (R.addition_digits, "42", {"a": 12, "b": 30}, 1.0),
    (R.addition_digits, "41", {"a": 12, "b": 30}, 0.5),
    (R.addition_digits, "142", {"a": 12, "b": 30}, 2 / 3),
    (R.addition_digits, "x", {"a": 12, "b": 30}, 0.0),
    (R.addition_exact, " 42 ", {"a": 12, "b": 30}, 1.0),
    (R.countdown_format, "<answer>(3+4)*2</answer>", {"numbers": (3, 4, 2), "target": 14}, 1.0),
    (R.countdown_format, "<answer>3+</answer>", {"numbers": (3, 4, 2), "target": 14}, 0.0),
    (R.countdown_format, "14", {"numbers": (3, 4, 2), "target": 14}, 0.0),
    (R.countdown_correct, "<answer>(3+4)*2</answer>", {"numbers": (3, 4, 2), "target": 14}, 1.0),
    (R.countdown_correct, "<think>try</think><answer> 3*4 + 2 </answer>", {"numbers": (3, 4, 2), "target": 14},
     1.0),
    (R.countdown_correct, "<answer>7*2</answer>", {"numbers": (3, 4, 2), "target": 14}, 0.0),       # 7 not given
    (R.countdown_correct, "<answer>(3+4)*2*1</answer>", {"numbers": (3, 4, 2), "target": 14}, 0.0),  # 1 not given
    (R.countdown_correct, "<answer>(3+4)*2</answer>", {"numbers": (3, 4, 2, 2), "target": 14}, 0.0),  # a 2 unused
    (R.countdown_correct, "<answer>6/4*2</answer>", {"numbers": (6, 4, 2), "target": 3}, 1.0),  # exact fractions
    (R.countdown_correct, "<answer>2/(4-4)</answer>", {"numbers": (2, 4, 4), "target": 0}, 0.0),
    (R.quiz_reward, "ana: pet = cat", {"quiz": (("ana", "pet", "cat"), ("bo", "city", "rome"))}, 0.5),
    (R.quiz_reward, "bo city rome\nana pet cat", {"quiz": (("ana", "pet", "cat"), ("bo", "city", "rome"))}, 1.0),
    (R.quiz_reward, "ana: pet = dog", {"quiz": (("ana", "pet", "cat"),)}, 0.0),
    (R.quiz_reward, "bo: pet = cat", {"quiz": (("ana", "pet", "cat"),)}, 0.0),  # someone else's pet
    (R.length_penalty(5), "abc", None, 0.0),
    (R.length_penalty(5, 0.1), "abcdefg", None, -0.2),
])
def test_worked_examples(fn, completion, example, expected):
    assert fn(completion, example) == pytest.approx(expected)


def test_combine_weights_parts_and_names_them():
    fn = R.combine({R.wordle_format: 0.5, R.wordle_win: 2.0}, name="total")
    assert fn("<guess>crane</guess>", ex()) == pytest.approx(2.5)
    assert fn.parts("<guess>crane</guess>", ex()) == {"wordle_format": 1.0, "wordle_win": 1.0}
    assert fn.__name__ == "total"


def test_info_gain_is_the_normalized_expected_reduction_by_brute_force():
    answers = ("crane", "crate", "grape", "slate", "email", "abide")
    example = ex(answers=answers)
    for guess in sorted(ALLOWED):
        outcomes = [R.wordle_feedback(guess, a) for a in answers]
        expected_left = sum(outcomes.count(o) for o in outcomes) / len(answers)  # E|C'| = sum n_k^2 / |C|
        want = (len(answers) - expected_left) / (len(answers) - 1)
        assert R.wordle_info_gain(f"<guess>{guess}</guess>", example) == pytest.approx(want)


HOSTILE_EXPRESSIONS = ["__import__('os').system('x')", "9**9**9", "9" * 5000, "1" + "*9999" * 30,
                      "(" * 5000 + "1" + ")" * 5000, "(" * 13 + "1" + ")" * 13, "1/0", "1/(2-2)", "٣+٤", "３+４",
                      "1e9", "0x10", "1_000", "3.5", "-3", "+3", "3 4", "()", "", " " * 10_000, "1+" * 5000 + "1",
                      "lambda: 0", "[1]*9**9", "'a'*9", "2\n+2", "\x00"]
HOSTILE = ["", " ", "<guess></guess>", "<guess>", "</guess>", "<guess> </guess>", "<guess>\x00\x01</guess>",
           "<guess>ÉCLAT</guess>", "<guess>ｃｒａｎｅ</guess>", "<guess>١٢٣٤٥</guess>",
           "<guess>" + "a" * 10_000 + "</guess>",
           "x" * 1_000_000, "<guess>crane</guess>" * 10_000, "\ud800", "9" * 5000, "<think>" * 1000,
           bytes(range(256)).decode("latin-1")]


@pytest.mark.parametrize("fn", [R.wordle_guess, R.wordle_format, R.wordle_feedback_use, R.wordle_info_gain,
                                R.wordle_win,
                                R.wordle_partial_credit, R.wordle_consistent, R.addition_digits, R.addition_exact,
                                R.length_penalty(10), R.countdown_format, R.countdown_correct, R.quiz_reward])
def test_rewards_never_raise_and_stay_finite_on_hostile_text(fn):
    rng = random.Random(0)
    texts = HOSTILE + ["".join(chr(rng.randint(1, 0x2FFF)) for _ in range(rng.randint(0, 50))) for _ in range(50)]
    texts += [f"<answer>{e}</answer>" for e in HOSTILE_EXPRESSIONS] + [None, 123]  # the last: not even strings
    example = ex(history=[("crane", "XXGXY")]) if fn.__name__.startswith("wordle") else \
        {"a": 1, "b": 2, "numbers": (3, 4, 2), "target": 14, "quiz": (("ana", "pet", "cat"),)}
    for text in texts:
        value = fn(text, example)
        assert isinstance(value, float) and math.isfinite(value), (fn.__name__, text[:40] if text else text)


@pytest.mark.parametrize("text", HOSTILE_EXPRESSIONS)
def test_parser_rejects_hostile_expressions_fast(text):
    start = time.perf_counter()
    parsed = R.evaluate_expression(text)
    assert time.perf_counter() - start < 0.05  # bounded by the parser's limits, not by luck
    if text == "2\n+2":
        assert parsed == (4, [2, 2])  # whitespace, newlines included, is allowed between tokens
    elif text == "(" * 13 + "1" + ")" * 13:
        assert parsed is None  # MAX_DEPTH
    else:
        assert parsed is None, text


def test_parser_agrees_with_a_naive_evaluator_on_random_expressions():
    # The independent computation: Python's own arithmetic on the same tree, built here as a nested tuple.
    rng = random.Random(0)

    def tree(depth):
        if depth == 0 or rng.random() < 0.3:
            n = rng.randint(0, 99)
            return str(n), Fraction(n), [n]
        (ta, va, na), (tb, vb, nb) = tree(depth - 1), tree(depth - 1)
        op = rng.choice("+-*/")
        if op == "/" and vb == 0:
            op = "+"
        value = {"+": va + vb, "-": va - vb, "*": va * vb, "/": va / vb if op == "/" else None}[op]
        return f"({ta}){op}({tb})", value, na + nb

    for _ in range(500):
        text, value, numbers = tree(3)
        if len(text) <= R.MAX_EXPR_CHARS and text.count("(") // 2 < R.MAX_DEPTH:
            assert R.evaluate_expression(text) == (value, numbers), text
    assert R.evaluate_expression("2+3*4-6/3") == (Fraction(12), [2, 3, 4, 6, 3])  # precedence, left to right
    assert R.evaluate_expression("8-4-2") == (Fraction(2), [8, 4, 2])  # left-associative
    assert R.evaluate_expression("8/4/2") == (Fraction(1), [8, 4, 2])


def test_reader_answers_from_the_summary_only_and_in_order():
    assert R.answer_question("ana: pet = cat", "ana", "pet") == "cat"
    assert R.answer_question("pet cat ana", "ana", "pet") is None      # the name must come first
    assert R.answer_question("anabel: pet = dog", "ana", "pet") is None  # whole words only
    assert R.answer_question("ana: city = rome\nbo: pet = cat", "ana", "pet") is None  # not across lines
