"""
Summaries with a quiz reward: the course's lessons 5 (LLM-as-judge and quiz rewards) and 6 (reward hacking and
the length penalty), offline and small enough for a CPU.

A document is three facts among three filler lines, shuffled; the summary should keep the facts:

    <|begin|>kai waved at liv          ->      ana: pet = cat
    ana: pet = cat                             dee: city = oslo
    the bus was late                           cy: food = rice<|end|>
    dee: city = oslo
    cy: food = rice
    it rained all day
    summary:

The quiz reward (rewards.quiz_reward) asks each fact of the document as a question, and a reader program answers
it from the summary alone. Copying the whole document answers every question, so the quiz reward alone is
hackable: GRPO drifts from short summaries toward copies, reward and length rising together. The task's
default reward adds lesson 6's cure, a length penalty that starts past the length of the facts alone, so the
best policy keeps the facts and drops the filler. experiments/summary.md shows both runs.

The warm start imitates "lead", the classic summarization baseline (lead-3): copy the first one to three lines.

    python -m data.summary                # the reference players
    python -m data.summary judge          # lesson 5: train a small GPT judge, compare its grades with the quiz
"""

import random
import sys
from functools import lru_cache

import torch
import torch.nn.functional as F

from data.tokenizer import encoding_from_merges, train_bpe
from model import GPT, GPTConfig, pad_left
from rewards import length_penalty, quiz_reward

NAMES = ("ana", "bo", "cy", "dee", "eli", "fay", "gus", "hal", "ivy", "jo", "kai", "liv", "max", "ned", "oz",
         "pia")
VALUES = {"pet": ("cat", "dog", "fox", "owl", "eel", "yak", "bat", "ant"),
          "city": ("oslo", "rome", "lima", "kyiv", "doha", "bern", "riga", "baku"),
          "food": ("rice", "soup", "figs", "corn", "kale", "tofu", "stew", "pie"),
          "color": ("red", "blue", "gold", "gray", "pink", "teal", "tan", "jade"),
          "sport": ("golf", "judo", "polo", "ski", "swim", "row", "box", "surf")}
FILLER = ("the bus was late", "it rained all day", "{a} waved at {b}", "{a} met {b} for tea",
          "nothing else happened", "{a} lost a glove", "the room was cold", "{a} called {b} twice",
          "lunch ran long", "{a} and {b} laughed")
FACTS, FILLERS = 3, 3
TRAIN_DEFAULTS = dict(max_new_tokens=48, block_size=104)  # a full copy is 46 tokens with <|end|>; prompts up to 50
EVAL_SEED = 1357
HEADLINE = ("quiz_score", "mean_chars")
# The length penalty's free budget: three facts such as "dee: city = oslo" fit (about 45 characters with
# newlines); each character past it costs 0.02, so a full copy of the document (about 100) costs about 1.
SUMMARY_CHARS, PER_CHAR = 50, 0.02


def fact_line(name, attribute, value):
    return f"{name}: {attribute} = {value}"


def random_example(rng):
    names = rng.sample(NAMES, FACTS + 2)
    facts = tuple((n, a, rng.choice(VALUES[a])) for n, a in zip(names, rng.sample(sorted(VALUES), FACTS)))
    fillers = [rng.choice(FILLER).format(a=names[-2], b=names[-1]) for _ in range(FILLERS)]
    lines = [fact_line(*f) for f in facts] + fillers
    rng.shuffle(lines)
    return {"lines": tuple(lines), "facts": facts, "quiz": facts}


def prompt(example):
    return "<|begin|>" + "\n".join(example["lines"]) + "\nsummary:\n"


def training_examples(n, rng):
    return [random_example(rng) for _ in range(n)]


def reward_functions():
    """The quiz, and the length penalty that keeps it honest. --reward_weights=1,0 trains on the quiz alone."""
    return [quiz_reward, length_penalty(SUMMARY_CHARS, PER_CHAR)], [1.0, 1.0]


@lru_cache(maxsize=None)
def tokenizer():
    texts = [prompt(ex).removeprefix("<|begin|>") for ex in training_examples(2000, random.Random(0))]
    return encoding_from_merges(train_bpe(texts, 400), name="summary")


def reference_players(rng=None):
    rng = rng or random.Random(0)

    def lead(examples):  # the first one to three lines, whatever they are
        return ["\n".join(ex["lines"][:rng.randint(1, 3)]) for ex in examples]

    def copy(examples):  # the reward hack: every question answered, every filler line kept
        return ["\n".join(ex["lines"]) for ex in examples]

    def facts(examples):  # the ideal extractive summary: the fact lines, in document order
        return ["\n".join(line for line in ex["lines"] if " = " in line) for ex in examples]

    def empty(examples):
        return ["" for _ in examples]

    return {"lead": lead, "copy": copy, "facts": facts, "empty": empty}


DEFAULT_PLAYER = "lead"



def evaluation_examples(n):
    return training_examples(n, random.Random(EVAL_SEED))  # a stream of its own, never a training one


def evaluate(player, n=200, keep_games=0):
    """quiz_score: mean quiz reward; mean_chars: summary length; filler_rate: share of the filler lines the
    summaries repeat (0 for a pure fact summary, 1 for a copy); reward: the task's default total reward."""
    examples = evaluation_examples(n)
    texts = player(examples)
    quiz = [quiz_reward(t, ex) for t, ex in zip(texts, examples)]
    (_, penalty), (w_quiz, w_penalty) = reward_functions()
    result = {"games": n,
              "quiz_score": sum(quiz) / n,
              "mean_chars": sum(len(t) for t in texts) / n,
              "filler_rate": sum(line in t for t, ex in zip(texts, examples) for line in ex["lines"]
                                 if " = " not in line) / (n * FILLERS),
              "reward": sum(w_quiz * q + w_penalty * penalty(t, None) for q, t in zip(quiz, texts)) / n}
    if keep_games:
        result["transcripts"] = [{"prompt": prompt(ex), "completion": t}
                                 for ex, t in zip(examples[:keep_games], texts)]
    return result


# ----------------------------------------------------------------------------------------------------------------
# LLM as a judge (lesson 5): a judge model grades each completion from a rubric prompt.
#
# Asking the judge to write "Grade: 4" and parsing the text throws away what it knows: its next-token
# probabilities over the grade tokens say how sure it is. The reward is the expected grade under those
# probabilities, renormalized over the grade tokens only and scaled to [0, 1]: smooth, and never unparsable.


def llm_judge(judge, encode, make_prompt, grade_tokens, batch_size=64, name="llm_judge"):
    """A batched reward function: reward(completions, examples) -> list of floats in [0, 1].
    judge: a GPT (ours, or GPT.from_pretrained); encode: text -> token ids in the judge's vocabulary;
    make_prompt(completion, example) -> the rubric text, ending where the grade token comes next;
    grade_tokens: the token ids of the grades, worst first (for example the ids of "1".."5").
    Prompts longer than the judge's context keep their end, where the question is. A completion is cut to its
    last 16 characters per context token before anything is encoded (no token is made of more), so a huge
    completion costs no more than a long one; a non-string one is graded as empty. It never raises."""
    grades = torch.linspace(0.0, 1.0, len(grade_tokens), dtype=torch.float64)
    grade_ids = torch.tensor(grade_tokens)

    @torch.no_grad()
    def reward(completions, examples):
        device = next(judge.parameters()).device
        limit = judge.config.block_size
        cut = [c[-16 * limit:] if isinstance(c, str) else "" for c in completions]
        prompts = [encode(make_prompt(c, ex))[-limit:] for c, ex in zip(cut, examples)]
        scores = []
        for i in range(0, len(prompts), batch_size):
            tokens, valid = pad_left(prompts[i:i + batch_size], 0, device)
            # Only the last position's logits are needed (left padding: the last column is real), so the
            # vocabulary projection runs on it alone, not on every position (B x T x 50257 for GPT-2).
            h = judge.hidden_states(tokens, valid)[:, -1]  # (B, C)
            last = judge.lm_head(h)[:, grade_ids.to(device)].double()
            scores += (last.softmax(-1).cpu() @ grades).tolist()
        return scores
    reward.__name__, reward.batched = name, True
    return reward


# ----------------------------------------------------------------------------------------------------------------
# Lesson 5: an LLM as the judge. No API and no download here, so the judge is a small GPT of ours, trained in
# a minute to grade summaries by a rubric; llm_judge (below) turns its grade probabilities into a reward.

JUDGE_RUBRIC = "<|begin|>grade this summary:\n{summary}\ngrade:"  # the grade token comes next


def rubric_grade(summary, example):
    """The rubric the judge learns: one point per fact kept, minus one per filler line kept, from 0 to 3."""
    kept = [line for line in summary.split("\n") if line in example["lines"]]
    return max(0, sum(" = " in line for line in kept) - sum(" = " not in line for line in kept))


def judge_prompt(summary, example):
    return JUDGE_RUBRIC.format(summary=summary)


def random_summary(example, rng):
    """Some facts and some filler lines of the document, in its order: 0..3 of each, uniformly, so the judge
    sees every grade often (lines kept at random with probability 1/2 would rarely keep all facts and nothing
    else, the one summary that earns a 3)."""
    facts = [line for line in example["lines"] if " = " in line]
    filler = [line for line in example["lines"] if " = " not in line]
    kept = set(rng.sample(facts, rng.randint(0, len(facts))))
    kept |= set(rng.sample(filler, rng.randint(0, len(filler))))
    return "\n".join(line for line in example["lines"] if line in kept)


def train_judge(steps=200, batch_size=64, seed=0, device="cpu"):
    """A 2-layer GPT that reads a summary (JUDGE_RUBRIC) and predicts its rubric grade as one token "0".."3",
    trained on random mixes of facts and filler."""
    enc, rng = tokenizer(), random.Random(seed)
    grade_tokens = [enc.encode_single_token(str(g).encode()) for g in range(4)]
    torch.manual_seed(seed)
    judge = GPT(GPTConfig(block_size=80, vocab_size=enc.n_vocab, n_layer=2, n_head=2, n_embd=64)).to(device)
    optimizer = torch.optim.AdamW(judge.parameters(), lr=2e-3)
    for step in range(steps):
        examples = training_examples(batch_size, rng)
        summaries = [random_summary(ex, rng) for ex in examples]
        prompts = [enc.encode(judge_prompt(s, ex), allowed_special="all") for s, ex in zip(summaries, examples)]
        tokens, valid = pad_left(prompts, 0, device)
        logits = judge.lm_head(judge.hidden_states(tokens, valid)[:, -1])  # (B, V): the grade's position only
        grades = [rubric_grade(s, ex) for s, ex in zip(summaries, examples)]
        target = torch.tensor([grade_tokens[g] for g in grades], device=device)
        loss = F.cross_entropy(logits, target)
        for group in optimizer.param_groups:
            group["lr"] = 2e-3 * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * (1 - step / steps))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"judge step {step:4d} | loss {loss.item():.3f}")
    judge.eval()
    return judge, grade_tokens


def judge_reward(judge, grade_tokens):
    enc = tokenizer()
    return llm_judge(judge, lambda text: enc.encode(text, allowed_special="all"), judge_prompt, grade_tokens)


def judge_demo(steps=200, n=200):
    """Train the judge, then grade the reference players' summaries of n held-out documents with it, beside the
    rubric it learned and the quiz."""
    judge, grade_tokens = train_judge(steps)
    reward = judge_reward(judge, grade_tokens)
    examples = evaluation_examples(n)
    print(f"\n  {'player':<6} {'judge':>7} {'rubric':>7} {'quiz':>7}   on {n} held-out documents (scaled to 0..1)")
    for name, player in reference_players(random.Random(0)).items():
        texts = player(examples)
        judged = sum(reward(texts, examples)) / n
        rubric = sum(rubric_grade(t, ex) for t, ex in zip(texts, examples)) / (3 * n)
        quiz = sum(quiz_reward(t, ex) for t, ex in zip(texts, examples)) / n
        print(f"  {name:<6} {judged:7.3f} {rubric:7.3f} {quiz:7.3f}")


if __name__ == "__main__":
    if sys.argv[1:] == ["judge"]:
        judge_demo()
    else:
        for name, player in reference_players(random.Random(0)).items():
            print(f"{name:>6}: " + " | ".join(f"{k} {v:.3f}" for k, v in evaluate(player).items() if k != "games"))
