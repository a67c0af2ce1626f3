"""Slow, obvious implementations that the product is checked against (and bench.py times the cache against)."""

from collections import Counter

import torch

from hf import read_safetensors_header, read_safetensors_tensor
from model import Samples, check_sampling, pad_left, pick_next


@torch.no_grad()
def sample_without_cache(model, prompts, *, max_new_tokens, group_size=1, temperature=1.0, top_k=None, top_p=None,
                         stop_token=None, pad_token=0, generator=None):
    """model.sample's contract, rerunning the whole sequence at every step: no KV cache, no shared prefill."""
    check_sampling(model, prompts, max_new_tokens, group_size, stop_token)
    tokens, valid = pad_left(prompts, pad_token, model.transformer.wte.weight.device)
    prompt_len = tokens.size(1)
    tokens, valid = tokens.repeat_interleave(group_size, 0), valid.repeat_interleave(group_size, 0)
    done = torch.zeros(tokens.size(0), dtype=torch.bool, device=tokens.device)
    new_mask, logps = [], []
    for _ in range(max_new_tokens):
        logits = model(tokens, valid=None if valid.all() else valid)[0][:, -1]
        next_token, logp = pick_next(logits, temperature, top_k, top_p, generator)
        new_mask.append(~done)
        logps.append(logp.masked_fill(done, 0.0))
        next_token = next_token.masked_fill(done, pad_token)
        if stop_token is not None:
            done = done | (next_token == stop_token)
        tokens = torch.cat([tokens, next_token[:, None]], 1)
        valid = torch.cat([valid, valid.new_ones(len(valid), 1)], 1)
        if stop_token is not None and bool(done.all()):
            break
    return Samples(tokens, valid, prompt_len, torch.stack(new_mask, 1).float(), ~done, torch.stack(logps, 1))


def read_safetensors(path):
    """Every tensor of a safetensors file, checked, by name."""
    header, data_start = read_safetensors_header(path)
    return {name: read_safetensors_tensor(path, header, data_start, name) for name in header}


def wordle_feedback_by_counting(guess, answer):
    """Wordle's feedback as the official rules state it, with a Counter of the answer's unmatched letters."""
    result = ["X"] * 5
    unmatched = Counter(a for g, a in zip(guess, answer) if g != a)
    for i, (g, a) in enumerate(zip(guess, answer)):
        if g == a:
            result[i] = "G"
        elif unmatched[g] > 0:
            result[i] = "Y"
            unmatched[g] -= 1
    return "".join(result)
