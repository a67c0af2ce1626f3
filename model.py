"""
A GPT-2 in one file, plus the two things GRPO spends its time on:

1. `sample`: a group of completions per prompt, with a KV cache. Each prompt is prefilled once, its cache is
   copied to `group_size` rows, and every row then draws its own tokens (its first token included).
2. `GPT.logprobs`: log pi(token) of given completion tokens, in chunks of rows with a backward pass that
   recomputes the logits, so the (B, T, V) float32 log-softmax never exists at once. The forward returns them
   (`model(tokens, logprobs_from=start)`), so DistributedDataParallel, which wraps forward, averages gradients.

Parameter names follow GPT-2 (`transformer.wte/wpe/h/ln_f`, `attn.c_attn/c_proj`, `mlp.c_fc/c_proj`, `lm_head`),
so a Hugging Face GPT-2 state dict maps one to one (hf.py reads and writes those files).

Prompts of different lengths are left-padded. `valid` (B, T) marks the real tokens: padding is hidden from
attention and does not advance the position ids, so a padded row computes exactly what it would alone.
"""

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------------------------
# The network: GPT-2. (Linear is nn.Linear that can also carry a LoRA adapter: see the LoRA section.)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x, attn_mask, cache, layer):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        hs = C // self.n_head
        q, k, v = (t.view(B, T, self.n_head, hs).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # all keys so far: (B, nh, past + T, hs)
        if T == 1 and cache is not None:
            # Decoding one token: two small matmuls beat the fused kernel, whose setup dominates at this size.
            # Flattening (B, nh) into one batch axis is a view of the cache and roughly halves the time.
            nh, L, hs = k.shape[1:]
            att = torch.bmm(q.reshape(B * nh, 1, hs), k.reshape(B * nh, L, hs).transpose(1, 2))
            att = att.view(B, nh, 1, L) * (1.0 / math.sqrt(hs))
            if attn_mask is not None:
                att = att.masked_fill(~attn_mask, float("-inf"))
            y = torch.bmm(att.softmax(-1).view(B * nh, 1, L), v.reshape(B * nh, L, hs)).view(B, nh, 1, hs)
        else:
            # attn_mask None means plain causal attention over the new tokens: the fused causal kernel.
            is_causal = attn_mask is None
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # GPT-2's "gelu_new"


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask, cache, layer):
        x = x + self.attn(self.ln_1(x), attn_mask, cache, layer)
        return x + self.mlp(self.ln_2(x))


@dataclass
class GPTConfig:
    block_size: int = 256  # context length in tokens
    vocab_size: int = 512
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2
    lora_rank: int = 0  # > 0: low-rank adapters on the attention projections, base weights frozen (add_lora)
    lora_alpha: float = 16.0  # adapter output scale alpha / rank
    lora_mlp: bool = False  # adapters on the MLP projections too


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.n_embd % config.n_head:
            raise ValueError(f"n_embd={config.n_embd} is not divisible by n_head={config.n_head}")
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2: scale residual projections by 1/sqrt(2 * n_layer)
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if config.lora_rank:
            add_lora(self, config.lora_rank, config.lora_alpha, config.lora_mlp)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() - self.transformer.wte.weight.numel() * non_embedding

    def hidden_states(self, idx, valid=None, cache=None):
        """Final-layer-norm output (B, T, C) for tokens idx (B, T).

        valid: (B, past + T) bool, True at real tokens, covering the cached positions too; None means no padding.
        cache: a KVCache holding `past` positions; the new keys and values are appended to it."""
        B, T = idx.shape
        past = cache.length if cache is not None else 0
        if past + T > self.config.block_size:
            raise ValueError(f"sequence of {past + T} tokens is longer than the context of "
                             f"{self.config.block_size}")
        query_pos = torch.arange(past, past + T, device=idx.device)[:, None]
        key_pos = torch.arange(past + T, device=idx.device)[None, :]
        if valid is None:
            pos = query_pos[:, 0]
            # No mask when there is no prefix (the fused causal kernel) or one new token (it sees every key).
            attn_mask = None if past == 0 or T == 1 else key_pos <= query_pos  # (T, past + T)
        else:
            if valid.shape != (B, past + T):
                raise ValueError(f"valid has shape {tuple(valid.shape)}, expected {(B, past + T)}")
            # Left padding must not shift positions: a row's first real token is position 0.
            pos = (valid.long().cumsum(1) - 1).clamp(min=0)[:, past:]
            # A pad query also sees itself, so no row of the mask is empty (an empty row makes NaN).
            seen = (key_pos <= query_pos) & valid[:, None, None, :]  # (B, 1, T, past + T)
            attn_mask = seen | (key_pos == query_pos)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, attn_mask, cache, layer)
        if cache is not None:
            cache.length += T
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None, *, valid=None, cache=None, logprobs_from=None, **logprob_options):
        """(logits (B, T, V), loss): loss is the mean cross-entropy over targets != -1, else None.

        With logprobs_from=s it returns self.logprobs(idx, s, valid=valid, **logprob_options) instead: the
        per-token log-probs that training differentiates, so that a DistributedDataParallel wrapper (it hooks
        forward) averages their gradients."""
        if logprobs_from is not None:
            return self.logprobs(idx, logprobs_from, valid=valid, **logprob_options)
        logits = self.lm_head(self.hidden_states(idx, valid, cache))
        loss = None
        if targets is not None:
            # autocast runs cross_entropy (log_softmax inside) in float32 even when the logits are bf16
            loss = F.cross_entropy(logits.flatten(0, 1), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def logprobs(self, tokens, start, *, valid=None, temperature=1.0, group_size=1, with_entropy=False,
                 chunk_size=512):
        """(log pi(tokens[:, t] | tokens[:, :t]) for every t >= start, and the entropy of each of those
        distributions when with_entropy, else None), each (B, T - start) float32.

        The logit at position t-1 scores token t (the shift by one). Logits are divided by the sampling
        temperature, so these are the log-probs of the distribution the tokens were actually drawn from.
        group_size > 1: rows come in groups that share their first `start` tokens (a GRPO rollout), and each
        prompt runs once per group."""
        if temperature <= 0:
            temperature = 1.0  # greedy decoding has no temperature; score under the model itself
        B, T = tokens.shape
        if group_size > 1 and T - start > 1:
            h = grouped_hidden_states(self, tokens, start, valid, group_size)
        else:
            h = self.hidden_states(tokens, valid)[:, start - 1:-1]  # (B, T - start, C): positions that predict
        target = tokens[:, start:]
        # = (lm_head(h) / temperature).log_softmax(-1).gather(-1, target), in chunks of rows (speed section)
        logp, entropy = ChunkedLogprob.apply(h.reshape(-1, h.size(-1)), self.lm_head.weight, target.reshape(-1),
                                             temperature, chunk_size, with_entropy)
        return logp.view(B, T - start), entropy.view(B, T - start) if with_entropy else None


# ----------------------------------------------------------------------------------------------------------------
# Sampling groups of completions


class KVCache:
    """Keys and values of every layer; `length` positions are filled. With max_len they are preallocated and
    written in place (sampling, under no_grad). Without, each update concatenates: slower, but autograd can
    differentiate through it, which lets a training pass run a group's shared prompt once (GPT.logprobs)."""

    def __init__(self, n_layer, max_len=None):
        self.max_len, self.length = max_len, 0
        self.k, self.v = [None] * n_layer, [None] * n_layer

    def update(self, layer, k, v):  # k, v: (B, nh, T, hs) of the new tokens -> all so far (B, nh, past + T, hs)
        if self.max_len is None:
            if self.k[layer] is not None:
                k, v = torch.cat([self.k[layer], k], 2), torch.cat([self.v[layer], v], 2)
            self.k[layer], self.v[layer] = k, v
            return k, v
        if self.k[layer] is None:
            self.k[layer] = k.new_empty(k.size(0), k.size(1), self.max_len, k.size(3))
            self.v[layer] = torch.empty_like(self.k[layer])
        end = self.length + k.size(2)
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def repeat_rows(self, n):
        """Row i becomes rows i*n .. i*n+n-1: a prompt prefilled once serves its whole group."""
        self.k = [k.repeat_interleave(n, dim=0) for k in self.k]
        self.v = [v.repeat_interleave(n, dim=0) for v in self.v]


@dataclass
class Samples:
    tokens: torch.Tensor           # (N, prompt_len + C) left-padded prompt, then completion; N = P * group_size
    valid: torch.Tensor            # (N, prompt_len + C) bool: False on the prompt's left padding
    prompt_len: int                # completions start at this column
    completion_mask: torch.Tensor  # (N, C) float: 1 on generated tokens up to and including the stop token
    truncated: torch.Tensor        # (N,) bool: the row never produced the stop token
    sampler_logp: torch.Tensor = None  # (N, C) float32: the log-prob each token was drawn with; 0 after the stop

    @property
    def completion(self):  # (N, C)
        return self.tokens[:, self.prompt_len:]

    def completion_tokens(self, stop_token=None):
        """Each row's generated tokens as a list, without padding and without the stop token: what to decode."""
        return [[t for t, m in zip(row, mask) if m and t != stop_token]
                for row, mask in zip(self.completion.tolist(), self.completion_mask.tolist())]

    def select(self, rows):
        """The rows selected by a bool mask (N,)."""
        return Samples(self.tokens[rows], self.valid[rows], self.prompt_len, self.completion_mask[rows],
                       self.truncated[rows], None if self.sampler_logp is None else self.sampler_logp[rows])

    @staticmethod
    def cat(parts):
        """One Samples from several (dynamic sampling's rounds), prompts left-padded, completions right-padded."""
        width = max(s.prompt_len for s in parts)
        length = max(s.completion.size(1) for s in parts)
        tokens, valid, masks, logps = [], [], [], []
        for s in parts:
            left, right = width - s.prompt_len, length - s.completion.size(1)
            tokens.append(F.pad(s.tokens, (left, right), value=0))
            valid.append(F.pad(s.valid, (left, right), value=False) |
                         (torch.arange(tokens[-1].size(1), device=s.tokens.device) >= width))
            masks.append(F.pad(s.completion_mask, (0, right), value=0.0))
            logps.append(None if s.sampler_logp is None else F.pad(s.sampler_logp, (0, right), value=0.0))
        return Samples(torch.cat(tokens), torch.cat(valid), width, torch.cat(masks),
                       torch.cat([s.truncated for s in parts]), None if None in logps else torch.cat(logps))


def pad_left(prompts, pad_token, device):
    """Token lists -> (P, T) left-padded tokens and (P, T) bool valid mask."""
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), width), pad_token, dtype=torch.long)
    valid = torch.zeros(len(prompts), width, dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        valid[i, width - len(p):] = True
    return tokens.to(device), valid.to(device)


def pick_next(logits, temperature, top_k, top_p, generator):
    """One token per row from logits (N, V), and its log-prob under the distribution it was drawn from (at the
    temperature, after top-k and top-p). Temperature 0 is greedy: the argmax, drawn with probability 1."""
    if temperature == 0:
        token = logits.argmax(-1)
        return token, torch.zeros(token.shape, device=token.device)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    token = torch.multinomial(probs, 1, generator=generator)  # (N, 1)
    return token.squeeze(1), probs.gather(1, token).squeeze(1).log()  # the softmax it drew from: no extra pass


def check_sampling(model, prompts, max_new_tokens, group_size, stop_token):
    if group_size < 1:
        raise ValueError(f"group_size must be at least 1, got {group_size}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if stop_token is not None and not 0 <= stop_token < model.config.vocab_size:
        raise ValueError(f"stop_token {stop_token} is outside the vocabulary of {model.config.vocab_size}")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > model.config.block_size:
        raise ValueError(f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} is longer than the "
                         f"context of {model.config.block_size}")


@torch.no_grad()
def sample(model, prompts, *, max_new_tokens, group_size=1, temperature=1.0, top_k=None, top_p=None,
           stop_token=None, pad_token=0, generator=None):
    """Sample `group_size` completions for each prompt (a list of token lists). Returns Samples whose rows
    are grouped by prompt: rows i*group_size .. (i+1)*group_size-1 answer prompt i.

    The KV cache is an optimization, never a different sampler: tests/reference.py reruns the whole sequence at
    every step and draws exactly the same tokens with the same generator."""
    check_sampling(model, prompts, max_new_tokens, group_size, stop_token)
    device = model.transformer.wte.weight.device
    tokens, valid = pad_left(prompts, pad_token, device)  # (P, Tp)
    prompt_len = tokens.size(1)
    if valid.all():
        valid = None  # no padding: take the plain causal attention kernel

    cache = KVCache(model.config.n_layer, prompt_len + max_new_tokens)
    logits = model(tokens, valid=valid, cache=cache)[0][:, -1]  # (P, V): each prompt once
    cache.repeat_rows(group_size)
    logits = logits.repeat_interleave(group_size, 0)  # (N, V); each row still draws its own token
    tokens = tokens.repeat_interleave(group_size, 0)  # (N, Tp)
    if valid is not None:
        valid = valid.repeat_interleave(group_size, 0)
    N = tokens.size(0)
    done = torch.zeros(N, dtype=torch.bool, device=device)
    new_mask, logps = [], []
    for step in range(max_new_tokens):
        next_token, logp = pick_next(logits, temperature, top_k, top_p, generator)
        new_mask.append(~done)
        logps.append(logp.masked_fill(done, 0.0))
        next_token = next_token.masked_fill(done, pad_token)  # after its stop token a row only pads
        if stop_token is not None:
            done = done | (next_token == stop_token)
        tokens = torch.cat([tokens, next_token[:, None]], 1)
        if valid is not None:
            valid = torch.cat([valid, valid.new_ones(N, 1)], 1)
        if step == max_new_tokens - 1 or (stop_token is not None and bool(done.all())):
            break
        logits = model(next_token[:, None], valid=valid, cache=cache)[0][:, -1]
    if valid is None:
        valid = torch.ones_like(tokens, dtype=torch.bool)
    completion_mask = torch.stack(new_mask, 1).float()
    return Samples(tokens, valid, prompt_len, completion_mask, ~done, torch.stack(logps, 1))


# ----------------------------------------------------------------------------------------------------------------
# Speed (skippable): GPT.logprobs without a (B, T, V) float32 tensor, and a group's shared prompt run once. Both
# are tested against the plain computation (tests/reference.py), values and gradients.


class ChunkedLogprob(torch.autograd.Function):
    """logp[n] = (h[n] @ W.T / temperature)[target[n]] - logsumexp(h[n] @ W.T / temperature), over row chunks:
    apply(h (N, C), weight (V, C), target (N,), temperature, chunk, with_entropy) -> (logp (N,), entropy).

    The backward recomputes each chunk's logits instead of saving them: memory is O(chunk * V), not O(N * V).
    d logp / d logits = (onehot(target) - softmax(logits)) / temperature. The entropy H rides along when asked
    for (one more pass over each chunk), with its own gradient, dH / d logits = -p (log p + H) / temperature, so
    an entropy bonus moves the weights; otherwise an empty tensor comes back in its place.

    The logits are float32 in forward and backward alike, with autocast off inside: the backward subtracts the
    forward's logsumexp from its recomputed logits, so both must be the same numbers. (bf16 logits once and
    float32 the other time make a "softmax" that does not sum to 1: at GPT-2's logit scale, near -90, the
    gradient was wrong by 100%.) float64 inputs stay float64."""

    @staticmethod
    def forward(ctx, h, weight, target, temperature, chunk, with_entropy):
        acc = torch.promote_types(h.dtype, torch.float32)
        w = weight.to(acc)
        logp = torch.empty(h.size(0), device=h.device, dtype=acc)
        lse = torch.empty_like(logp)
        entropy = torch.empty_like(logp) if with_entropy else logp.new_empty(0)
        with torch.autocast(h.device.type, enabled=False):
            for i in range(0, h.size(0), chunk):
                logits = (h[i:i + chunk].to(acc) @ w.t()) / temperature  # (chunk, V)
                lse[i:i + chunk] = logits.logsumexp(-1)
                logp[i:i + chunk] = logits.gather(1, target[i:i + chunk, None]).squeeze(1) - lse[i:i + chunk]
                if with_entropy:
                    probs = (logits - lse[i:i + chunk, None]).exp_()
                    entropy[i:i + chunk] = lse[i:i + chunk] - (probs * logits).sum(-1)
        ctx.save_for_backward(h, weight, target, lse, entropy)
        ctx.temperature, ctx.chunk = temperature, chunk
        ctx.set_materialize_grads(False)  # an output the loss does not use sends None: its term is skipped
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        h, weight, target, lse, entropy = ctx.saved_tensors
        T, chunk = ctx.temperature, ctx.chunk
        acc = lse.dtype
        w = weight.to(acc)
        grad_logp = torch.zeros_like(lse) if grad_logp is None else grad_logp.to(acc)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, device=weight.device, dtype=acc)
        with torch.autocast(h.device.type, enabled=False):
            for i in range(0, h.size(0), chunk):
                hc = h[i:i + chunk].to(acc)
                logits = (hc @ w.t()) / T  # exactly the forward's logits
                if grad_entropy is None:
                    grad_logits = logits.sub_(lse[i:i + chunk, None]).exp_().neg_()  # -softmax, in place
                    grad_logits.scatter_add_(1, target[i:i + chunk, None], torch.ones_like(grad_logits[:, :1]))
                    grad_logits *= grad_logp[i:i + chunk, None] / T  # (chunk, V)
                else:  # -p (g_logp + (log p + H) g_H) + onehot g_logp, all over T
                    log_p = logits.sub_(lse[i:i + chunk, None])
                    term = (log_p + entropy[i:i + chunk, None]).mul_(grad_entropy[i:i + chunk, None].to(acc))
                    grad_logits = log_p.exp().neg_().mul_(term.add_(grad_logp[i:i + chunk, None]))
                    grad_logits.scatter_add_(1, target[i:i + chunk, None], grad_logp[i:i + chunk, None])
                    grad_logits /= T
                if grad_h is not None:
                    grad_h[i:i + chunk] = (grad_logits @ w).to(h.dtype)
                grad_w += grad_logits.t() @ hc
        return grad_h, grad_w.to(weight.dtype), None, None, None, None


def grouped_hidden_states(model, tokens, start, valid, group_size):
    """model.hidden_states(tokens, valid)[:, start - 1:-1], with each group's shared prompt computed once.

    A GRPO batch holds group_size copies of every prompt: the prompt runs once, its keys and values are repeated
    for the group (a differentiable KVCache), and the completions attend to them. Backward sums the group's
    gradients into the one prompt pass, so values and gradients are those of the plain pass, while a
    (group_size - 1) / group_size share of the prompt's compute is skipped."""
    B, T = tokens.shape
    G = group_size
    if B % G:
        raise ValueError(f"{B} rows do not split into groups of {G}")
    prompts = tokens[::G, :start]  # (B / G, start)
    prompt_valid = valid[::G, :start] if valid is not None else None
    same = tokens[:, :start].view(B // G, G, start) == prompts[:, None]
    if valid is not None:
        same = same & (valid[:, :start].view(B // G, G, start) == prompt_valid[:, None])
    if not bool(same.all()):
        raise ValueError(f"the rows of a group of {G} do not share their first {start} tokens")
    cache = KVCache(model.config.n_layer)
    h_prompt = model.hidden_states(prompts, prompt_valid, cache)[:, -1:]  # (B / G, 1, C): predicts token `start`
    cache.repeat_rows(G)
    # The completion's last token predicts nothing, so it never enters: inputs are tokens[start : T - 1].
    h_rest = model.hidden_states(tokens[:, start:-1], valid[:, :-1] if valid is not None else None, cache)
    return torch.cat([h_prompt.repeat_interleave(G, 0), h_rest], 1)  # (B, T - start, C)


# ----------------------------------------------------------------------------------------------------------------
# LoRA: train a few low-rank matrices instead of the whole model (the course fine-tunes its policy so)


class Linear(nn.Linear):
    """nn.Linear with an optional low-rank adapter (LoRA, Hu et al. 2021): y = x W^T + b + (alpha / r) x A^T B^T.
    A (r, in) starts random and B (out, r) at zero, so a new adapter changes nothing until it is trained; only
    A and B train, W stays frozen. `adapter_on = False` computes the base layer alone: the reference policy."""
    def __init__(self, in_features, out_features, bias=True):
        super().__init__(in_features, out_features, bias=bias)
        self.register_parameter("lora_A", None)  # no adapter until add_adapter
        self.register_parameter("lora_B", None)
        self.adapter_on = True

    def add_adapter(self, rank, alpha):
        self.lora_A = nn.Parameter(self.weight.new_empty(rank, self.in_features))
        self.lora_B = nn.Parameter(self.weight.new_zeros(self.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear's own init, and the LoRA paper's
        self.lora_scale = alpha / rank

    def forward(self, x):
        y = super().forward(x)
        if self.lora_A is not None and self.adapter_on:
            y = y + (x @ self.lora_A.t()) @ self.lora_B.t() * self.lora_scale
        return y


def adapted_layers(model, mlp):
    for block in model.transformer.h:
        yield from (block.attn.c_attn, block.attn.c_proj)
        if mlp:
            yield from (block.mlp.c_fc, block.mlp.c_proj)


def check_lora_rank(rank, config):
    if not 1 <= rank <= config.n_embd:
        raise ValueError(f"lora_rank={rank} must be between 1 and the layer width n_embd={config.n_embd}")


def add_lora(model, rank, alpha=16.0, mlp=False):
    """Freeze every weight of `model` and add rank-`rank` adapters to the attention projections (and the MLP's
    with mlp=True). The config records it, so checkpoints rebuild the same model. Returns the model."""
    check_lora_rank(rank, model.config)
    if any(layer.lora_A is not None for layer in adapted_layers(model, True)):
        raise ValueError("the model already has LoRA adapters")
    model.requires_grad_(False)
    for layer in adapted_layers(model, mlp):
        layer.add_adapter(rank, alpha)
    model.config.lora_rank, model.config.lora_alpha, model.config.lora_mlp = rank, float(alpha), mlp
    return model


@contextmanager
def adapters_off(model):
    """Within the block the model computes without its adapters: the frozen base model, which is the KL
    reference of a LoRA policy. No second copy of the weights is kept."""
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    for layer in layers:
        layer.adapter_on = False
    try:
        yield model
    finally:
        for layer in layers:
            layer.adapter_on = True


@torch.no_grad()
def merge_lora(model):
    """Fold each adapter into its weight (W += alpha / r * B A) and remove it: a plain GPT that computes the
    same function, for export or fast inference. Every weight trains again afterwards."""
    for layer in (m for m in model.modules() if isinstance(m, Linear) and m.lora_A is not None):
        layer.weight += layer.lora_scale * (layer.lora_B @ layer.lora_A).to(layer.weight.dtype)
        layer.lora_A = layer.lora_B = None
    model.config.lora_rank = 0
    return model.requires_grad_(True)
