"""
The tokenization probe of experiments/wordle.md: a warm start on one teacher's games for a fixed wall-clock
budget, then 200 held-out games, greedy. Formats:

    pair    the fixed layout, a letter and its mark two tokens ("c", "X"): the tokenizer before 2026-12-03
    game    the whole game as one sequence (each guess in its tags, then its line), letter and mark two tokens
    merged  the fixed layout, a letter and its mark one token ("cX"): data.wordle.tokenizer()

    python experiments/wordle/probe_format.py FORMAT TEACHER SECONDS   # e.g. merged candidate 240
"""
import json
import math
import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import torch

from data import wordle as W
from data.tokenizer import encoding_from_merges, train_bpe
from model import GPT, GPTConfig, sample
from rewards import parse_guess, wordle_feedback

fmt, teacher, budget = sys.argv[1], sys.argv[2], float(sys.argv[3])
torch.manual_seed(0)
rng = random.Random(0)
torch.set_num_threads(2)
if fmt == "merged":
    enc = W.tokenizer()
else:  # bytes and the two tags only: every letter and every mark its own token
    enc = encoding_from_merges(train_bpe(["<guess>", "</guess>"], vocab_size=1 << 20), name="pairs")
END = enc.encode("<|end|>", allowed_special="all")[0]


def game_prompt(history):
    lines = ("".join(a + b for a, b in zip(guess, fb)) + "\n" for guess, fb in history)
    return "<|begin|>" + "".join(f"<guess>{guess}</guess><|end|>{line}" for (guess, _), line in zip(history, lines))


prompt_of = W.prompt if fmt in ("pair", "merged") else (lambda example: game_prompt(example["history"]))
model = GPT(GPTConfig(block_size={"pair": 64, "merged": 40, "game": 128}[fmt], vocab_size=enc.n_vocab,
                      n_layer=4, n_head=4, n_embd=128))
play = W.reference_players(rng)[teacher]
_, _, train_answers, _ = W.words()


def one_game():
    """[(prompt, completion)] for every turn of one teacher game on a training answer."""
    answer, history, turns = rng.choice(train_answers), [], []
    for _ in range(W.MAX_TURNS):
        example = W.make_example(answer, history)
        text = play([example])[0]
        turns.append((prompt_of(example), text))
        guess = parse_guess(text)
        if guess == answer:
            break
        history.append((guess, wordle_feedback(guess, answer)))
    return turns


def batch(n):
    """n rows of (tokens, loss mask): n game states, or n whole games (the loss on the guesses only)."""
    rows = []
    while len(rows) < n:
        turns = one_game()
        if fmt == "game":
            tokens, mask = [], []
            for p, c in turns:  # each prompt extends the one before: add only its new tokens
                new = enc.encode(p, allowed_special="all")[len(tokens):]
                guess = enc.encode(c) + [END]
                tokens, mask = tokens + new + guess, mask + [0] * len(new) + [1] * len(guess)
            rows.append((tokens, mask))
        else:
            for p, c in turns:
                prompt, guess = enc.encode(p, allowed_special="all"), enc.encode(c) + [END]
                rows.append((prompt + guess, [0] * len(prompt) + [1] * len(guess)))
    rows = rows[:n]
    T = max(len(t) for t, _ in rows)
    x, y = torch.full((n, T), END), torch.full((n, T), -1)
    for i, (tokens, mask) in enumerate(rows):
        x[i, :len(tokens)] = torch.tensor(tokens)
        y[i, :len(tokens) - 1] = torch.where(torch.tensor(mask[1:]).bool(), torch.tensor(tokens[1:]), -1)
    return x, y


optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.99), weight_decay=0.1)
t0, step, guesses_seen = time.time(), 0, 0
while time.time() - t0 < budget:  # warmup, then cosine to 10% over the wall-clock budget
    lr = 3e-3 * min(1, (step + 1) / 50) * (0.1 + 0.45 * (1 + math.cos(math.pi * (time.time() - t0) / budget)))
    for group in optimizer.param_groups:
        group["lr"] = lr
    x, y = batch(64)
    guesses_seen += (y == END).sum().item()
    _, loss = model(x, y)
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    if step % 200 == 0:
        print(f"step {step} | {time.time() - t0:.0f} s | loss {loss.item():.3f} | guesses {guesses_seen}", flush=True)
    step += 1
model.eval()


def greedy(examples):
    prompts = [enc.encode(prompt_of(example), allowed_special="all") for example in examples]
    with torch.no_grad():
        s = sample(model, prompts, max_new_tokens=8, temperature=0.0, stop_token=END, pad_token=END)
    return [enc.decode(tokens) for tokens in s.completion_tokens(END)]


result = W.evaluate(greedy, 200)
print(json.dumps({"format": fmt, "teacher": teacher, "seconds": budget, "steps": step, "guesses_seen": guesses_seen,
                  "final_loss": loss.item(), **result}))
