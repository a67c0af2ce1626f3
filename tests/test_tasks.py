import json
import os
import pathlib
import random
from itertools import permutations, product

import pytest

import data
from config import TrainConfig
from data import addition, countdown, load_task, summary, task_names, wordle
from rewards import evaluate_expression, is_consistent, parse_guess, quiz_reward, wordle_feedback
from tests.reference import wordle_feedback_by_counting

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT_DIR = pathlib.Path(ROOT)


def test_word_lists_are_clean_and_split():
    allowed, answers, train, heldout = wordle.words()
    assert len(heldout) == wordle.HELDOUT and len(train) == wordle.TRAIN_ANSWERS  # the CPU-sized game
    assert not set(train) & set(heldout) and set(answers) == allowed == set(train) | set(heldout)
    assert all(len(w) == 5 and w.isascii() and w.isalpha() and w.islower() for w in allowed)


def test_the_full_game_has_the_full_lists():
    allowed, answers, train, heldout = map(len, wordle.words(full=True))
    assert heldout == 200 and answers == train + heldout and 1500 <= answers <= 2500 and allowed > 5000
    assert set(wordle.words()[3]) == set(wordle.read_list("answers_heldout.txt"))  # the same 200 held out
    full = load_task("wordle_full")  # the task plays the full lists, and the small game is unchanged beside it
    _, full_answers, full_train, _ = wordle.words(full=True)
    assert {ex["answer"] for ex in full.training_examples(30, random.Random(0))} <= set(full_train)
    assert {parse_guess(c) for _, c in full.demonstrations(20, random.Random(0))} - set(wordle.words()[1])
    assert len(wordle.words()[1]) == 600


def test_a_letter_with_its_mark_is_one_token_a_guess_one_token_per_letter_and_prompts_round_trip():
    enc = wordle.tokenizer()
    assert all(len(enc.encode(c)) == 1 for c in "abcdefghijklmnopqrstuvwxyzGYX\n")
    assert len(enc.encode("<guess>")) == len(enc.encode("</guess>")) == 1
    line = enc.encode("sXlXaGtXeY\n")
    assert [enc.decode([t]) for t in line] == ["sX", "lX", "aG", "tX", "eY", "\n"]
    assert [enc.decode([t]) for t in enc.encode("<guess>seize</guess>")] == ["<guess>", *"seize", "</guess>"]
    assert len(enc.encode("..........\n")) == 6  # a turn not played yet takes the room of a played one
    example = wordle.make_example("crane", [("slate", "XXGXG"), ("grape", "XGGXG")])
    text = wordle.prompt(example) + wordle.completion("crane") + "<|end|>"
    assert wordle.prompt(example) == "<|begin|>" + "..........\n" * 3 + "sXlXaGtXeG\ngXrGaGpXeG\n"
    ids = enc.encode(text, allowed_special="all")
    assert enc.decode(ids) == text
    assert len(ids) == 1 + 6 * 5 + 7 + 1 <= wordle.TRAIN_DEFAULTS["block_size"]  # lines, guess, end
    assert len(enc.encode(wordle.prompt(wordle.make_example("crane", [])), allowed_special="all")) == 31


def test_the_feedback_rule_and_its_table_match_the_rules_counted_out():
    rng = random.Random(0)  # five-letter strings over five letters: repeated letters in most of them
    for _ in range(20_000):
        guess, answer = ("".join(rng.choice("abcde") for _ in range(5)) for _ in range(2))
        assert wordle_feedback(guess, answer) == wordle_feedback_by_counting(guess, answer), (guess, answer)
    guesses, column, codes = wordle.feedback_table()
    _, answers, _, _ = wordle.words()
    for g in rng.sample(guesses, 100):
        for a in rng.sample(answers, 100):
            assert codes[guesses.index(g), column[a]] == wordle.code(wordle_feedback_by_counting(g, a))


def test_evaluator_counts_wins_guesses_invalid_and_consistent():
    def oracle(examples):
        return [wordle.completion(ex["answer"]) for ex in examples]

    def garbage(examples):
        return ["no guess here" for _ in examples]

    first, other = sorted(wordle.words()[0])[:2]  # two allowed words

    def second_try(examples):  # a fixed non-answer first, then the answer: consistent only on turn two
        return [wordle.completion(ex["answer"] if ex["history"] else
                                  (first if ex["answer"] != first else other)) for ex in examples]

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
    assert results["sloppy"]["win_rate"] >= 0.9 and 0.6 < results["sloppy"]["consistent_rate"] < 1
    assert results["max_info"]["win_rate"] == 1
    assert results["max_info"]["mean_guesses"] < results["candidate"]["mean_guesses"]


def test_demonstrations_and_training_states_are_well_formed():
    rng = random.Random(0)
    allowed, _, _, _ = wordle.words()
    for player in ("random", "candidate", "sloppy"):
        pairs = wordle.demonstrations(40, rng, player)
        assert len(pairs) == 40 and all(p.startswith("<|begin|>") for p, _ in pairs)
        assert all(parse_guess(c) in allowed for _, c in pairs)
    for ex in wordle.training_examples(50, rng, max_history=3):
        assert len(ex["history"]) <= 3 and ex["answer"] not in [g for g, _ in ex["history"]]
        assert is_consistent(ex["answer"], ex["history"])


def test_grpo_states_are_the_policys_own_games_against_off_list_words(monkeypatch):
    allowed, _, train, heldout = wordle.words()
    off_list = set(wordle.off_list_words())
    assert off_list and not off_list & allowed and not off_list & set(heldout)
    calls, coin = [], random.Random(2)
    line = ["spray", "spray", "moist", "pudgy"]  # what this policy plays, turn by turn, with a repeat

    def policy(examples):  # half the time a non-word: it must use its turn and add no line
        calls.append(len(examples))
        return [wordle.completion("zzzzz" if coin.random() < 0.5 else line[len(ex["history"])]) for ex in examples]

    monkeypatch.setattr(wordle, "OFF_LIST_SHARE", 1.0)
    for min_history in (0, 1, 2):
        monkeypatch.setattr(wordle, "MIN_HISTORY", min_history)
        calls.clear()
        states = wordle.training_examples(200, random.Random(0), policy=policy)
        assert set(line) <= allowed and len(states) == 200 and calls[0] > 200  # one call per turn: twice the games
        assert all(ex["answer"] in off_list for ex in states)
        assert {len(ex["history"]) for ex in states} == set(range(min_history, 5))  # too few lines: dropped
        for ex in states:
            assert [g for g, _ in ex["history"]] == line[:len(ex["history"])]
            assert is_consistent(ex["answer"], ex["history"]) and len(wordle.pool_after(ex["history"]))

    # A player that never spells a word, or always wins, still gets its states: after 8 rounds, shorter ones.
    def never_a_word(examples):
        return [wordle.completion("zzzzz")] * len(examples)

    def always_wins(examples):
        return [wordle.completion(ex["answer"]) for ex in examples]

    for player in (never_a_word, always_wins):
        states = wordle.training_examples(20, random.Random(3), policy=player)
        assert len(states) == 20 and not any(ex["history"] for ex in states)

    monkeypatch.setattr(wordle, "OFF_LIST_SHARE", 0.0)
    states = wordle.training_examples(100, random.Random(1))  # no policy: the warm start's teacher plays
    assert all(ex["answer"] in train for ex in states)
    assert all(ex["answer"] not in [g for g, _ in ex["history"]] for ex in states)  # never an already won game


def test_the_sloppy_teachers_slip_keeps_greens_and_greys_and_never_repeats():
    _, answers, _, heldout = wordle.words()
    rng = random.Random(0)
    grew = 0
    for answer in heldout[:30]:
        others = [w for w in answers if w != answer]
        history = tuple((g, wordle_feedback(g, answer)) for g in rng.sample(others, 2))
        slip = set(wordle.greens_and_greys(history))
        exact = set(wordle.pool_after(history)) - {g for g, _ in history}
        assert exact <= slip and not {g for g, _ in history} & slip
        grew += len(slip) > len(exact)
        for word in slip:  # greens in place, and no letter the feedback shows absent
            for guess, fb in history:
                present = {c for c, m in zip(guess, fb) if m != "X"}
                assert all(word[i] == c for i, (c, m) in enumerate(zip(guess, fb)) if m == "G")
                assert not {c for c, m in zip(guess, fb) if m == "X" and c not in present} & set(word)
    assert grew > 10  # ignoring the yellows does admit more words, usually


def test_the_slip_pool_is_exactly_the_words_that_fit_greens_and_greys():
    """The numpy filter against the rule written out word by word, on histories of 1-4 guesses (words with a
    repeated letter included: a grey copy beside a marked one is not absent)."""
    _, answers, _, _ = wordle.words()
    rng = random.Random(3)
    doubled = [w for w in answers if len(set(w)) < 5]
    for _ in range(200):
        answer = rng.choice(answers)
        guesses = rng.sample(answers, rng.randint(0, 3)) + [rng.choice(doubled)]
        history = tuple((g, wordle_feedback(g, answer)) for g in guesses)

        def fits(word):
            for guess, fb in history:
                marked = {c for c, m in zip(guess, fb) if m != "X"}
                if word == guess or any(m == "G" and word[i] != c for i, (c, m) in enumerate(zip(guess, fb))):
                    return False
                if any(m == "X" and c not in marked and c in word for c, m in zip(guess, fb)):
                    return False
            return True
        assert list(wordle.greens_and_greys(history)) == [w for w in answers if fits(w)]


def test_addition_task_players_and_tokenizer():
    enc = addition.tokenizer()
    text = addition.prompt({"a": 12, "b": 345}) + "357<|end|>"
    assert enc.decode(enc.encode(text, allowed_special="all")) == text
    assert all(len(enc.encode(str(d))) == 1 for d in range(10))
    players = addition.reference_players(random.Random(0))
    assert addition.evaluate(players["oracle"], 50)["exact_rate"] == 1.0
    assert addition.evaluate(players["random"], 50)["exact_rate"] < 0.3
    pairs = load_task("addition").demonstrations(10, random.Random(0))
    assert all(p.endswith("=") and c.isdigit() for p, c in pairs)


def test_addition_carry_slip_counts_the_carry_free_answer():
    def carries(a, b):  # column by column, independently of sum_without_carry
        return any(int(x) + int(y) >= 10 for x, y in zip(str(a).zfill(4)[::-1], str(b).zfill(4)[::-1]))

    examples = addition.evaluation_examples(200)
    assert [addition.needs_carry(ex["a"], ex["b"]) for ex in examples] == [carries(ex["a"], ex["b"])
                                                                          for ex in examples]
    assert addition.sum_without_carry(58, 67) == 15
    share_without = sum(not carries(ex["a"], ex["b"]) for ex in examples) / 200

    def slip_always(exs):
        return [str(addition.sum_without_carry(ex["a"], ex["b"])) for ex in exs]

    slipping = addition.evaluate(slip_always, 200)
    assert slipping["carry_slip_rate"] == 1.0 and slipping["exact_rate"] == share_without
    assert addition.evaluate(addition.reference_players()["oracle"], 200)["carry_slip_rate"] == 0.0
    sloppy = addition.reference_players(random.Random(0))["sloppy"]
    assert 0.3 < addition.evaluate(sloppy, 200)["carry_slip_rate"] < 0.7


def test_every_module_with_the_task_interface_is_found():
    assert {"addition", "wordle", "wordle_full", "countdown", "summary", "reverse"} <= set(task_names())
    assert "tokenizer" not in task_names()  # data/tokenizer.py is no task


@pytest.mark.parametrize("name", task_names())
def test_tasks_share_one_interface(name):
    task = load_task(name)
    assert task.default_player in task.reference_players()
    cfg = TrainConfig(**{**task.train_defaults, "task": name})  # the task's own sizes, or the run's defaults
    enc = task.tokenizer()
    for p, c in task.demonstrations(20, random.Random(0)):
        ids = enc.encode(p + c + "<|end|>", allowed_special="all")
        assert enc.decode(ids) == p + c + "<|end|>" and len(ids) <= cfg.block_size
        assert len(enc.encode(c + "<|end|>", allowed_special="all")) <= cfg.max_new_tokens
    fns, weights = task.reward_functions()
    assert len(fns) == len(weights) and all(callable(fn) for fn in fns)
    # More transcripts asked for than games played (--log_samples above --eval_games): as many as were played.
    player = task.reference_players(random.Random(0))[task.default_player]
    result = task.evaluate(player, 2, keep_games=5)
    assert len(result["transcripts"]) == 2 and all(k in result for k in task.headline)


def all_values_naively(numbers):
    """Every value of every expression over `numbers` (each once): all orders, all operator choices, all
    bracketings of a sequence (for 3 numbers: (a o b) o c and a o (b o c)). Independent of the solver's split
    recursion; only for 3 numbers."""
    values = set()
    for a, b, c in permutations(numbers):
        for o1, o2 in product("+-*/", repeat=2):
            for text in (f"({a}{o1}{b}){o2}{c}", f"{a}{o1}({b}{o2}{c})"):
                parsed = evaluate_expression(text)
                if parsed is not None:
                    values.add(parsed[0])
    return values


def test_countdown_solver_finds_exactly_the_reachable_values_and_its_expressions_check():
    rng = random.Random(0)
    for _ in range(30):
        numbers = tuple(sorted(rng.randint(1, 12) for _ in range(3)))
        found = countdown.reachable(numbers)
        assert set(found) == all_values_naively(numbers)
        for value, text in found.items():
            got, used = evaluate_expression(text)
            assert got == value and sorted(used) == list(numbers), text
    assert countdown.solve((1, 1, 1), 100) is None
    # four numbers (R1-Zero's harder setting): the classic 24 game, with expressions that check
    found = countdown.reachable((1, 2, 3, 4))
    assert 24 in found and 25 in found and 1000 not in found
    for value, text in found.items():
        got, used = evaluate_expression(text)
        assert got == value and sorted(used) == [1, 2, 3, 4], text
    assert evaluate_expression(countdown.solve((3, 3, 8, 8), 24))[0] == 24  # needs a fraction: 8/(3-8/3)


def test_countdown_instances_are_solvable_and_players_bracket_the_task():
    for ex in countdown.training_examples(50, random.Random(0)):
        assert countdown.TARGET_MIN <= ex["target"] <= countdown.TARGET_MAX
        assert len(ex["numbers"]) == countdown.NUMBERS
        assert countdown.solve(ex["numbers"], ex["target"]) is not None
    players = countdown.reference_players(random.Random(0))
    assert countdown.evaluate(players["solver"], 100)["solved_rate"] == 1.0  # the ceiling
    random_result = countdown.evaluate(players["random"], 100, keep_games=3)
    assert random_result["format_rate"] > 0.9 and random_result["solved_rate"] < 0.2
    assert len(random_result["transcripts"]) == 3


def test_summary_players_show_the_hack_and_the_cure():
    players = summary.reference_players(random.Random(0))
    r = {name: summary.evaluate(player, 100) for name, player in players.items()}
    assert r["copy"]["quiz_score"] == 1.0 and r["copy"]["filler_rate"] == 1.0  # the hack: a perfect quiz
    assert r["facts"]["quiz_score"] == 1.0 and r["facts"]["filler_rate"] == 0.0
    assert r["facts"]["mean_chars"] < 0.6 * r["copy"]["mean_chars"]
    assert r["facts"]["reward"] > 0.9 > 0.1 > r["copy"]["reward"]  # the length penalty cures it
    assert 0 < r["lead"]["quiz_score"] < 0.5 and r["empty"]["quiz_score"] == 0
    for ex in summary.training_examples(20, random.Random(1)):
        assert sum(" = " in line for line in ex["lines"]) == summary.FACTS
        assert quiz_reward("\n".join(ex["lines"]), ex) == 1.0


def test_a_completion_made_of_marked_letter_tokens_is_scored_not_parsed_as_a_guess():
    """The policy can emit the merged prompt tokens ("aG") in its completion: the text is upper case, so it is
    no guess, and every reward scores it without an error."""
    enc = wordle.tokenizer()
    ids = enc.encode("<guess>") + [enc.encode(pair)[0] for pair in ("cX", "rX", "aG", "nX", "eY")] \
        + enc.encode("</guess>")
    text = enc.decode(ids)
    assert text == "<guess>cXrXaGnXeY</guess>"
    example = wordle.make_example("crane", [("slate", "XXGXG")])
    fns, _ = wordle.reward_functions()
    scores = {fn.__name__: fn(text, example) for fn in fns}
    assert scores["wordle_guess"] == -1.0 and scores["wordle_win"] == 0.0
    assert all(isinstance(v, float) and v == v for v in scores.values())


def test_a_task_module_dropped_into_data_is_found_and_trains(tmp_path, monkeypatch):
    """data/reverse.py is the README's example of a whole task: under 40 lines, found by name, and GRPO raises its
    reward above the warm start's, greedy and sampled. A copy under another name, in another folder on data's
    path, is a task too: nothing lists the tasks by hand."""
    source = (ROOT_DIR / "data" / "reverse.py").read_text()
    assert len(source.splitlines()) <= 40
    (tmp_path / "backwards.py").write_text(source)
    monkeypatch.setattr(data, "__path__", [*data.__path__, str(tmp_path)])
    assert "backwards" in task_names()
    import train
    out = tmp_path / "run"
    train.main(["--task=backwards", "--n_layer=2", "--n_head=2", "--n_embd=64", "--sft_steps=150",
                "--grpo_steps=40", "--eval_interval=40", "--eval_games=100", "--threads=1",
                "--reference_players=false", f"--out_dir={out}"])
    table = json.loads((out / "eval.json").read_text())
    for key in ("reward", "sampled_reward"):
        assert table["GRPO"][key] > table["warm start"][key], (key, table)
