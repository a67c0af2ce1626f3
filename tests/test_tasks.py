import random

import pytest

from data import addition, wordle
from rewards import is_consistent, parse_guess, wordle_feedback


def test_word_lists_are_clean_and_split():
    allowed, answers, train, heldout = wordle.words()
    assert len(heldout) == wordle.HELDOUT and 1500 <= len(answers) <= 2500
    assert not set(train) & set(heldout) and set(answers) <= allowed
    assert all(len(w) == 5 and w.isascii() and w.isalpha() and w.islower() for w in allowed)


def test_every_allowed_word_is_one_token_and_prompts_round_trip():
    enc = wordle.tokenizer()
    allowed, _, _, _ = wordle.words()
    assert all(len(enc.encode(w)) == 1 for w in allowed)
    example = wordle.make_example("crane", [("slate", "XXGXG"), ("grape", "XGGXG")])
    text = wordle.prompt(example) + wordle.completion("crane") + "<|end|>"
    ids = enc.encode(text, allowed_special="all")
    assert enc.decode(ids) == text and len(ids) == 1 + 6 * 2 + 4  # begin, (5 letter+mark, newline) x 2, guess


def test_numpy_feedback_codes_match_the_rules():
    allowed, answers, _, _ = wordle.words()
    rng = random.Random(0)
    guesses, targets = rng.sample(sorted(allowed), 200), rng.sample(answers, 200)
    codes = wordle.feedback_codes(guesses, targets)
    for i, g in enumerate(guesses):
        for j, a in enumerate(targets):
            assert wordle.code_to_pattern(codes[i, j]) == wordle_feedback(g, a)


def test_evaluator_counts_wins_guesses_invalid_and_consistent():
    def oracle(examples):
        return [wordle.completion(ex["answer"]) for ex in examples]

    def garbage(examples):
        return ["no guess here" for _ in examples]

    def second_try(examples):  # a fixed non-answer first, then the answer: consistent only on turn two
        return [wordle.completion(ex["answer"] if ex["history"] else
                                  ("crane" if ex["answer"] != "crane" else "slate")) for ex in examples]

    r = wordle.evaluate(oracle, 10)
    assert r["win_rate"] == 1 and r["mean_guesses"] == 1 and r["consistent_rate"] == 1
    r = wordle.evaluate(garbage, 10)
    assert r["win_rate"] == 0 and r["invalid_rate"] == 1 and r["consistent_rate"] == 0
    r = wordle.evaluate(second_try, 10, keep_games=2)
    assert r["win_rate"] == 1 and r["mean_guesses"] == 2 and r["consistent_rate"] == 1
    assert len(r["transcripts"]) == 2 and len(r["transcripts"][0]["guesses"]) == 2


def test_reference_players_order_random_candidate_max_info():
    players = wordle.reference_players(random.Random(0))
    results = {name: wordle.evaluate(player, 25) for name, player in players.items()}
    assert results["random"]["win_rate"] < 0.1
    assert results["candidate"]["win_rate"] >= 0.9 and results["candidate"]["consistent_rate"] == 1
    assert results["max_info"]["win_rate"] == 1
    assert results["max_info"]["mean_guesses"] < results["candidate"]["mean_guesses"]


def test_demonstrations_and_training_states_are_well_formed():
    rng = random.Random(0)
    allowed, _, _, _ = wordle.words()
    for player in ("random", "candidate"):
        pairs = wordle.demonstrations(40, rng, player)
        assert len(pairs) == 40 and all(p.startswith("<|begin|>") for p, _ in pairs)
        assert all(parse_guess(c) in allowed for _, c in pairs)
    for ex in wordle.training_examples(50, rng, max_history=3):
        assert len(ex["history"]) <= 3 and ex["answer"] not in [g for g, _ in ex["history"]]
        assert is_consistent(ex["answer"], ex["history"])


def test_addition_task_players_and_tokenizer():
    enc = addition.tokenizer()
    text = addition.prompt({"a": 12, "b": 345}) + "357<|end|>"
    assert enc.decode(enc.encode(text, allowed_special="all")) == text
    assert all(len(enc.encode(str(d))) == 1 for d in range(10))
    players = addition.reference_players(random.Random(0))
    assert addition.evaluate(players["oracle"], 50)["exact_rate"] == 1.0
    assert addition.evaluate(players["random"], 50)["exact_rate"] < 0.3
    pairs = addition.demonstrations(10, random.Random(0))
    assert all(p.endswith("=") and c.isdigit() for p, c in pairs)


@pytest.mark.parametrize("task", [wordle, addition])
def test_tasks_share_one_interface(task):
    for name in ("tokenizer", "training_examples", "prompt", "demonstrations", "reward_functions", "evaluate",
                 "reference_players", "HEADLINE"):
        assert hasattr(task, name), name
