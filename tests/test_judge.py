"""The LLM-as-judge reward: its expected grade against a direct computation, and a judge trained here to prefer
one pattern grading by that preference."""

import random

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import tiny_gpt
from model import pad_left
from data.summary import llm_judge
from rewards import score

CHARS = "abcdefgh ?:"
GRADES = [40, 41, 42, 43, 44]  # token ids of the grades "0".."4", worst first


def encode(text):
    return [CHARS.index(c) for c in text]


def make_prompt(completion, example):
    return f"{example}:{completion}?"


def test_expected_grade_equals_a_one_by_one_softmax_over_the_grade_tokens():
    judge = tiny_gpt(seed=3)
    reward = llm_judge(judge, encode, make_prompt, GRADES, batch_size=3)
    completions = ["abc", "h", "abcdefgh abcdefgh", "", "gg hh"]
    examples = ["a", "bb", "c", "ddd", "e"]
    got = reward(completions, examples)
    for value, c, ex in zip(got, completions, examples):
        with torch.no_grad():
            logits, _ = judge(torch.tensor([encode(make_prompt(c, ex))]))  # alone: no padding, no batch
        p = logits[0, -1, GRADES].double().softmax(-1)
        assert value == pytest.approx(float(sum(p[i] * i / 4 for i in range(5))), abs=1e-9)
        assert 0.0 <= value <= 1.0


def test_prompts_longer_than_the_judge_context_keep_their_end():
    judge = tiny_gpt(seed=3, block_size=16)
    reward = llm_judge(judge, encode, make_prompt, GRADES)
    long = "a" * 40 + "bcd"
    [value] = reward([long], ["e"])
    with torch.no_grad():
        logits, _ = judge(torch.tensor([encode(make_prompt(long, "e"))[-16:]]))
    p = logits[0, -1, GRADES].double().softmax(-1)
    assert value == pytest.approx(float(sum(p[i] * i / 4 for i in range(5))), abs=1e-9)


def test_huge_empty_and_odd_completions_are_graded_not_raised():
    judge = tiny_gpt(seed=3, block_size=16)
    encoded = []

    def recording_encode(text):
        encoded.append(len(text))
        return encode(text)
    reward = llm_judge(judge, recording_encode, make_prompt, GRADES)
    values = reward(["a" * 10_000_000, " " * 1_000_000, "", None], ["e"] * 4)
    assert max(encoded) <= 16 * 16 + len(make_prompt("", "e"))  # cut before encoding, not after
    assert len(values) == 4 and all(0.0 <= v <= 1.0 for v in values)
    # A non-string completion is graded as the empty one. Alone or in a padded batch of four the same prompt
    # is a different matmul, so the two agree to rounding, not bit for bit.
    assert values[3] == pytest.approx(values[2], abs=1e-9)
    assert values[3] == pytest.approx(reward([""], ["e"])[0], abs=1e-6)


def test_a_judge_trained_to_prefer_a_pattern_grades_by_it():
    # The judge learns: grade 4 for completions made of "a", grade 0 for completions made of "b".
    torch.manual_seed(0)
    judge = tiny_gpt(seed=0, dtype=torch.float32)
    optimizer = torch.optim.AdamW(judge.parameters(), lr=3e-3)
    rng = random.Random(0)
    for _ in range(60):
        texts = ["".join(rng.choice("ab" if good else "bc") for _ in range(rng.randint(3, 8))) for good in
                 [rng.random() < 0.5 for _ in range(32)]]
        labels = [GRADES[4] if t.count("a") > t.count("b") else GRADES[0] for t in texts]
        tokens, valid = pad_left([encode(make_prompt(t, "h")) for t in texts], 0, "cpu")
        logits, _ = judge(tokens, valid=valid)
        loss = F.cross_entropy(logits[:, -1], torch.tensor(labels))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    judge.eval()
    reward = llm_judge(judge, encode, make_prompt, GRADES)
    good, bad = reward(["aaaaa", "abaaa"], ["h", "h"]), reward(["bbbbb", "bcbcb"], ["h", "h"])
    assert min(good) > 0.8 and max(bad) < 0.2
    # and through rewards.score, as a batched reward function next to a per-completion one
    total, table = score(["aaaaa", "bbbbb"], ["h", "h"], [reward, lambda c, ex: float(len(c))], [1.0, 0.5])
    assert total == pytest.approx([table[0][0] + 2.5, table[1][0] + 2.5])
    assert table[0][0] > 0.8 and table[1][0] < 0.2


def test_score_names_a_batched_reward_that_breaks_its_contract():
    def short(completions, examples):
        return [1.0]
    short.batched = True

    def nan(completions, examples):
        return [float("nan")] * len(completions)
    nan.batched = True
    with pytest.raises(ValueError, match="short returned 1 values for 2 completions"):
        score(["a", "b"], [None, None], [short])
    with pytest.raises(ValueError, match="nan returned nan"):
        score(["a", "b"], [None, None], [nan])
