"""
A GPT-2 in one file, plus the two things GRPO spends its time on:

1. `sample`: a group of completions per prompt, with a KV cache. Each prompt is prefilled once, its cache is
   copied to `group_size` rows, and every row then draws its own tokens (its first token included).
2. `token_logprobs`: log pi(token) of given completion tokens, computed in chunks of rows with a backward pass
   that recomputes the logits, so the (B, T, V) float32 log-softmax never exists at once.

Parameter names follow GPT-2 (`transformer.wte/wpe/h/ln_f`, `attn.c_attn/c_proj`, `mlp.c_fc/c_proj`,
`lm_head`) so a Hugging Face GPT-2 state dict maps one to one: `GPT.from_pretrained(path)`.

Prompts of different lengths are left-padded. `valid` (B, T) marks the real tokens: padding is hidden from
attention and does not advance the position ids, so a padded row computes exactly what it would alone.
"""

import json
import math
import os
import struct
from contextlib import contextmanager
from dataclasses import dataclass, fields

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
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
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
            raise ValueError(f"sequence of {past + T} tokens is longer than the context of {self.config.block_size}")
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
            attn_mask = ((key_pos <= query_pos) & valid[:, None, None, :]) | (key_pos == query_pos)  # (B,1,T,past+T)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, attn_mask, cache, layer)
        if cache is not None:
            cache.length += T
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None, *, valid=None, cache=None):
        """Returns (logits (B, T, V), loss). loss is the mean cross-entropy over targets != -1, else None."""
        logits = self.lm_head(self.hidden_states(idx, valid, cache))
        loss = None
        if targets is not None:
            # autocast runs cross_entropy (log_softmax inside) in float32 even when the logits are bf16
            loss = F.cross_entropy(logits.flatten(0, 1), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    @classmethod
    def from_pretrained(cls, path):
        """A GPT-2 from a local Hugging Face directory: config.json and model.safetensors or pytorch_model.bin."""
        return load_hf_gpt2(cls, path)


# ----------------------------------------------------------------------------------------------------------------
# Sampling groups of completions


class KVCache:
    """Keys and values of every layer; `length` positions are filled. With max_len they are preallocated and
    written in place (sampling, under no_grad). Without, each update concatenates: slower, but autograd can
    differentiate through it, which lets a training pass run a group's shared prompt once (token_logprobs)."""

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

    @property
    def completion(self):  # (N, C)
        return self.tokens[:, self.prompt_len:]

    def completion_tokens(self, stop_token=None):
        """Each row's generated tokens as a list, without padding and without the stop token: what to decode."""
        return [[t for t, m in zip(row, mask) if m and t != stop_token]
                for row, mask in zip(self.completion.tolist(), self.completion_mask.tolist())]


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
    """One token per row from logits (N, V). temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)


@torch.no_grad()
def sample(model, prompts, *, max_new_tokens, group_size=1, temperature=1.0, top_k=None, top_p=None,
           stop_token=None, pad_token=0, generator=None, use_cache=True):
    """Sample `group_size` completions for each prompt (a list of token lists). Returns Samples whose rows
    are grouped by prompt: rows i*group_size .. (i+1)*group_size-1 answer prompt i.

    With the same generator the KV-cache path and the no-cache path (`use_cache=False`, which reruns the whole
    sequence every step) draw exactly the same tokens: the cache is an optimization, never a different sampler."""
    V = model.config.vocab_size
    if group_size < 1:
        raise ValueError(f"group_size must be at least 1, got {group_size}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if stop_token is not None and not 0 <= stop_token < V:
        raise ValueError(f"stop_token {stop_token} is outside the vocabulary of {V}")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > model.config.block_size:
        raise ValueError(f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} is longer than the "
                         f"context of {model.config.block_size}")
    device = model.transformer.wte.weight.device
    tokens, valid = pad_left(prompts, pad_token, device)  # (P, Tp)
    prompt_len = tokens.size(1)
    if valid.all():
        valid = None  # no padding: take the plain causal attention kernel

    if use_cache:
        cache = KVCache(model.config.n_layer, prompt_len + max_new_tokens)
        logits = model(tokens, valid=valid, cache=cache)[0][:, -1]  # (P, V): each prompt once
        cache.repeat_rows(group_size)
        logits = logits.repeat_interleave(group_size, 0)  # (N, V); each row still draws its own token
    tokens = tokens.repeat_interleave(group_size, 0)  # (N, Tp)
    if valid is not None:
        valid = valid.repeat_interleave(group_size, 0)
    N = tokens.size(0)
    done = torch.zeros(N, dtype=torch.bool, device=device)
    new_mask = []
    for step in range(max_new_tokens):
        if not use_cache:
            logits = model(tokens, valid=valid)[0][:, -1]
        next_token = pick_next(logits, temperature, top_k, top_p, generator)
        new_mask.append(~done)
        next_token = next_token.masked_fill(done, pad_token)  # after its stop token a row only pads
        if stop_token is not None:
            done = done | (next_token == stop_token)
        tokens = torch.cat([tokens, next_token[:, None]], 1)
        if valid is not None:
            valid = torch.cat([valid, valid.new_ones(N, 1)], 1)
        if step == max_new_tokens - 1 or (stop_token is not None and bool(done.all())):
            break
        if use_cache:
            logits = model(next_token[:, None], valid=valid, cache=cache)[0][:, -1]
    if valid is None:
        valid = torch.ones_like(tokens, dtype=torch.bool)
    completion_mask = torch.stack(new_mask, 1).float()
    return Samples(tokens, valid, prompt_len, completion_mask, truncated=~done)


# ----------------------------------------------------------------------------------------------------------------
# Token log-probabilities: log_softmax(logits / temperature)[token], shifted by one


def token_logprobs(model, tokens, start, *, valid=None, temperature=1.0, chunk_size=512, with_entropy=False,
                   group_size=1):
    """(log pi(tokens[:, t] | tokens[:, :t]) for every t >= start, and the entropy of each of those
    distributions when with_entropy, else None), each (B, T - start) float32.

    The logit at position t-1 scores token t (the shift by one). Logits are divided by the sampling temperature,
    so these are the log-probs of the distribution the tokens were actually drawn from. group_size > 1: rows come
    in groups that share their first `start` tokens (a GRPO rollout), and each prompt runs once per group."""
    if temperature <= 0:
        temperature = 1.0  # greedy decoding has no temperature; score under the model itself
    B, T = tokens.shape
    if group_size > 1 and T - start > 1:
        h = grouped_hidden_states(model, tokens, start, valid, group_size)
    else:
        h = model.hidden_states(tokens, valid)[:, start - 1:-1]  # (B, T - start, C): positions that predict
    target = tokens[:, start:]
    # = (model.lm_head(h) / temperature).log_softmax(-1).gather(-1, target), in chunks of rows (speed section)
    logp, entropy = logprobs_from_hidden(h.reshape(-1, h.size(-1)), model.lm_head.weight, target.reshape(-1),
                                         temperature, chunk_size, with_entropy)
    return logp.view(B, T - start), entropy.view(B, T - start) if with_entropy else None


# ----------------------------------------------------------------------------------------------------------------
# Speed (skippable): the same log-probs without a (B, T, V) float32 tensor, and a group's shared prompt
# run once. Both are tested against the plain computation, values and gradients.


def logprobs_from_hidden(h, weight, target, temperature=1.0, chunk_size=512, with_entropy=False):
    """(logp, entropy or None) of targets (N,) under logits h (N, C) @ weight (V, C).T / temperature, chunked."""
    logp, entropy = _ChunkedTokenLogprob.apply(h, weight, target, temperature, chunk_size, with_entropy)
    return logp, entropy if with_entropy else None


class _ChunkedTokenLogprob(torch.autograd.Function):
    """logp[n] = (h[n] @ W.T / temperature)[target[n]] - logsumexp(h[n] @ W.T / temperature), over row chunks.

    The backward recomputes each chunk's logits instead of saving them: memory is O(chunk * V), not O(N * V).
    d logp / d logits = (onehot(target) - softmax(logits)) / temperature. Entropy rides along when asked
    for (one more pass over each chunk), without grad; otherwise an empty tensor comes back in its place.

    The logits are float32 in forward and backward alike, with autocast off inside: the backward subtracts the
    forward's logsumexp from its recomputed logits, so both must be the same numbers. (bf16 logits once and
    float32 the other time make a "softmax" that does not sum to 1: at GPT-2's logit scale, near -90, the
    gradient was wrong by 100%.) float64 inputs stay float64."""

    @staticmethod
    def forward(ctx, h, weight, target, temperature, chunk, with_entropy):  # h (N, C), weight (V, C), target (N,)
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
        ctx.save_for_backward(h, weight, target, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        h, weight, target, lse = ctx.saved_tensors
        T, chunk = ctx.temperature, ctx.chunk
        acc = lse.dtype
        w = weight.to(acc)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, device=weight.device, dtype=acc)
        with torch.autocast(h.device.type, enabled=False):
            for i in range(0, h.size(0), chunk):
                hc = h[i:i + chunk].to(acc)
                logits = (hc @ w.t()) / T  # exactly the forward's logits
                grad_logits = logits.sub_(lse[i:i + chunk, None]).exp_().neg_()  # -softmax, in place: one buffer
                grad_logits.scatter_add_(1, target[i:i + chunk, None], torch.ones_like(grad_logits[:, :1]))
                grad_logits *= grad_logp[i:i + chunk, None].to(acc) / T  # (chunk, V)
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


# ----------------------------------------------------------------------------------------------------------------
# Loading GPT-2 from a local Hugging Face directory (no network, no transformers)

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit


def read_safetensors_header(path):
    """A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
    {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the data the offsets
    index. Every field is checked before a byte of data is read: offsets within the data, each tensor's bytes
    exactly its shape times its dtype's size, the tensors tiling the data with no overlap and no gap.
    Returns ({name: (dtype, shape, begin, end)}, where the data starts)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: {size} bytes, too short to be a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"{path}: header length {n} runs past the end of the file ({size} bytes) or the "
                             f"format's limit of {MAX_HEADER_BYTES}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: the header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the header is a JSON {type(header).__name__}, not an object")
    data_len, tensors = size - 8 - n, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise ValueError(f"{where}: expected the fields dtype, shape, data_offsets, got {info!r}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{where}: dtype {dtype!r} is not one of {', '.join(SAFETENSORS_DTYPES)}")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise ValueError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise ValueError(f"{where}: data_offsets {offsets!r} is not a pair of integers")
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            raise ValueError(f"{where}: data_offsets [{begin}, {end}] are not within the {data_len} data bytes "
                             f"with begin <= end")
        nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
        if end - begin != nbytes:
            raise ValueError(f"{where}: shape {shape} of {dtype} needs {nbytes} bytes, data_offsets hold "
                             f"{end - begin}")
        tensors[name] = (SAFETENSORS_DTYPES[dtype], tuple(shape), begin, end)
    at = 0
    for name, (_, _, begin, end) in sorted(tensors.items(), key=lambda item: item[1][2:]):
        if begin != at:
            raise ValueError(f"{path}: tensor {name!r} starts at byte {begin}, but the previous one ends at {at} "
                             f"({'an overlap' if begin < at else 'a gap'})")
        at = end
    if at != data_len:
        raise ValueError(f"{path}: the tensors cover {at} of the {data_len} data bytes")
    return tensors, 8 + n


def read_safetensors_tensor(path, header, data_start, name, out=None):
    """One tensor of a checked header, read straight from the file into `out` (or a new tensor): memory for
    that tensor only, never a copy of the file."""
    dtype, shape, begin, end = header[name]
    out = torch.empty(shape, dtype=dtype) if out is None else out
    if end > begin:
        with open(path, "rb") as f:
            f.seek(data_start + begin)
            if f.readinto(out.view(-1).view(torch.uint8).numpy()) != end - begin:
                raise ValueError(f"{path}: tensor {name!r} is cut short")
    return out


def read_safetensors(path):
    """Every tensor of a safetensors file, checked, by name."""
    header, data_start = read_safetensors_header(path)
    return {name: read_safetensors_tensor(path, header, data_start, name) for name in header}


# GPT-2 config fields that change the math; each is honoured as GPT-2 has it, or refused (never ignored).
GPT2_DEFAULTS = {"tie_word_embeddings": True, "layer_norm_epsilon": 1e-5, "scale_attn_weights": True,
                 "scale_attn_by_inverse_layer_idx": False, "activation_function": "gelu_new", "n_inner": None}


def gpt2_config(path):
    """GPTConfig from a Hugging Face GPT-2 config.json, every field checked."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face GPT-2 directory)")
    if os.path.getsize(config_file) > 1_000_000:
        raise ValueError(f"{config_file}: {os.path.getsize(config_file)} bytes, too large for a config")
    with open(config_file) as f:
        try:
            hf = json.load(f)
        except ValueError as e:
            raise ValueError(f"{config_file}: not JSON ({e})") from None
    if not isinstance(hf, dict) or hf.get("model_type") != "gpt2":
        found = hf.get("model_type") if isinstance(hf, dict) else type(hf).__name__
        raise ValueError(f"{config_file}: model_type is {found!r}, only 'gpt2' can be loaded")
    sizes = {}
    for key in ("n_positions", "vocab_size", "n_layer", "n_head", "n_embd"):
        value = hf.get(key)
        if type(value) is not int or not 1 <= value <= 1_000_000:
            raise ValueError(f"{config_file}: {key} is {value!r}, expected an integer from 1 to 1,000,000")
        sizes[key] = value
    for key, gpt2 in GPT2_DEFAULTS.items():
        value = hf.get(key, gpt2)
        if key == "n_inner" and value == 4 * sizes["n_embd"]:  # written out, it is GPT-2's default
            value = None
        if key == "layer_norm_epsilon" and isinstance(value, (int, float)) and math.isclose(value, gpt2):
            value = gpt2
        if value != gpt2:
            raise ValueError(f"{config_file}: {key} is {value!r}; this GPT computes GPT-2's {gpt2!r} only")
    return GPTConfig(block_size=sizes["n_positions"], vocab_size=sizes["vocab_size"], n_layer=sizes["n_layer"],
                     n_head=sizes["n_head"], n_embd=sizes["n_embd"], bias=True)


# Hugging Face's GPT-2 uses Conv1D, whose weight is (in, out): ours are its transpose.
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def hf_key(key):
    """Our parameter name for a Hugging Face GPT-2 key (hub files name keys with or without "transformer."),
    or None for the attention-mask buffers old files carry ("attn.bias", "attn.masked_bias")."""
    if key.endswith((".attn.bias", ".attn.masked_bias")) or key in ("attn.bias", "attn.masked_bias"):
        return None
    return key if key.startswith(("transformer.", "lm_head.")) else "transformer." + key


def load_hf_gpt2(cls, path):
    """The config and every tensor's name, dtype and shape are checked against the model they describe before
    the model is built; then the tensors are read one at a time into it (memory: the model, plus one tensor)."""
    config = gpt2_config(path)
    with torch.device("meta"):  # the parameter shapes, without allocating anything
        model = cls(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    st_file, bin_file = os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(st_file):
        source = st_file
        header, data_start = read_safetensors_header(st_file)
        found = {key: (dtype, shape) for key, (dtype, shape, _, _) in header.items()}

        def fetch(key, out=None):
            return read_safetensors_tensor(st_file, header, data_start, key, out)
    elif os.path.isfile(bin_file):
        source = bin_file
        try:  # mmap: tensors stay on disk until read
            state = torch.load(bin_file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise ValueError(f"{bin_file} is not a readable weights file ({type(e).__name__})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{bin_file} does not hold a dict of tensors")
        found = {key: (v.dtype, tuple(v.shape)) for key, v in state.items()}

        def fetch(key, out=None):
            return state[key] if out is None else out.copy_(state[key])
    else:
        raise FileNotFoundError(f"{path}: neither model.safetensors nor pytorch_model.bin is there")
    names = {hf_key(key): key for key in found if hf_key(key) is not None}  # ours -> theirs
    problems = [f"missing {k}" for k in sorted(set(expected) - set(names) - {"lm_head.weight"})]
    problems += [f"unexpected {k}" for k in sorted(set(names) - set(expected))]
    for ours, theirs in names.items():
        if ours not in expected:
            continue
        dtype, shape = found[theirs]
        want = expected[ours][::-1] if ours.endswith(CONV1D) else expected[ours]
        if shape != want:
            problems.append(f"{ours}: checkpoint {shape} vs model {want}")
        if not dtype.is_floating_point:
            problems.append(f"{ours}: checkpoint holds {dtype} data, the model's weights are floating point")
    if problems:
        raise ValueError(f"{source} does not match the model:\n  " + "\n  ".join(problems[:20]))
    # Storage for the parameters, uninitialized (no random init: every one is read from the file), tied again
    # (to_empty gives the two names of the tied matrix two tensors).
    model = model.to_empty(device="cpu")
    model.lm_head.weight = model.transformer.wte.weight
    params = model.state_dict()
    with torch.no_grad():
        for ours, theirs in names.items():
            if ours == "lm_head.weight":
                continue  # tied to wte: checked below
            if ours.endswith(CONV1D) or found[theirs][0] != params[ours].dtype:
                value = fetch(theirs)
                params[ours].copy_(value.t() if ours.endswith(CONV1D) else value)
            else:  # straight from the file into the parameter: no copy
                fetch(theirs, out=params[ours])
        if "lm_head.weight" in names:  # a file may store the tied matrix twice: it must be the same one
            lm_head = fetch(names["lm_head.weight"]).to(params["lm_head.weight"].dtype)
            if not torch.equal(lm_head, params["transformer.wte.weight"]):
                raise ValueError(f"{source}: lm_head.weight differs from transformer.wte.weight, but GPT-2 ties "
                                 f"them (an untied output layer is not supported)")
    return model


def load_state_dict_checked(model, state, source="checkpoint"):
    """load_state_dict that names every missing, unexpected or wrongly shaped tensor."""
    ours = model.state_dict()
    missing = sorted(set(ours) - set(state))
    unexpected = sorted(set(state) - set(ours))
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(ours[k].shape)}"
             for k in ours if k in state and state[k] is not None and state[k].shape != ours[k].shape]
    problems = ([f"missing {k}" for k in missing] + [f"unexpected {k}" for k in unexpected] + wrong)
    if problems:
        hint = ""
        if any(".lora_" in k for k in missing):
            hint += "\n  (the model has LoRA adapters the checkpoint lacks)"
        if any(".lora_" in k for k in unexpected):
            hint += "\n  (the checkpoint has LoRA adapters the model lacks: build it with the same lora_rank)"
        raise ValueError(f"{source} does not match the model:\n  " + "\n  ".join(problems[:20]) + hint)
    model.load_state_dict(state)


def config_from_dict(d):
    """GPTConfig from plain data (our checkpoints store it so), rejecting unknown keys."""
    known = {f.name for f in fields(GPTConfig)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown GPTConfig keys {sorted(unknown)}; known: {sorted(known)}")
    return GPTConfig(**d)
