"""
GRPO: Group Relative Policy Optimization (Shao et al., "DeepSeekMath", 2024, arXiv 2402.03300).

For each prompt q, sample a group of G completions o_1..o_G from the current policy (pi_old: the weights that
sampled them), score each with rewards r_i, and maximize

    J = E[ agg_{i,t} ( min( rho_{i,t} A_i, clip(rho_{i,t}, 1 - eps_low, 1 + eps_high) A_i ) - beta D_{i,t} ) ]

    rho_{i,t} = pi_theta(o_{i,t} | q, o_{i,<t}) / pi_old(o_{i,t} | q, o_{i,<t})      per-token ratio
    A_i       = (r_i - mean_j r_j) / (std_j r_j + eps)                                 group-relative advantage
    D_{i,t}   = exp(ref - logp) - (ref - logp) - 1                                     k3 estimate of KL(pi || pi_ref)

The group mean is the baseline: there is no value network (critic), which is what GRPO removes from PPO.
The KL term to a frozen reference model is optional: beta = 0 (the default) keeps no reference model at all.
For a LoRA policy (model.add_lora) the reference is the policy with its adapters off: pass reference=policy.

Every choice is one knob of GRPOConfig:
    scale_rewards     "group" (std of the group, above), "batch" (std of the whole batch), "none" (Dr. GRPO)
    eps_low/eps_high  the clip range; 0.2/0.2 is PPO/GRPO, eps_high=0.28 is DAPO's "clip-higher"
    beta              KL penalty weight; DeepSeekMath used 0.04, DAPO/Dr. GRPO/TRL default to 0
    loss_type         how token terms are averaged: "grpo" (per-sequence mean, then mean over sequences),
                      "dapo" (mean over all tokens of the batch), "dr_grpo" (sum / (N * max_new_tokens))
    importance_level  "token" (rho per token) or "sequence" (GSPO: one length-normalized ratio per sequence)
    num_iterations    optimizer passes over each rollout batch (mu in the paper)
    minibatch_size    rows per optimizer step within a pass (None: the whole batch, one step per pass)
    dynamic_sampling, overlong_buffer, mask_truncated     DAPO's extras, off by default

A trap worth knowing: with num_iterations = 1 and one minibatch, the policy being trained IS pi_old, so
rho = 1 exactly, the clip never acts, and the gradient is REINFORCE with the group-mean baseline,
sum_t A_i grad log pi(o_{i,t}). The clip only matters when the same rollout is reused for several optimizer
steps; then the old log-probs are computed once, without grad, right after sampling. pi_old is never the
reference model. Another: with loss_type "grpo" the loss VALUE is about 0 at rho = 1 (advantages are centred
within each group) while its gradient is not; that is expected.
"""

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from model import Samples, adapters_off, sample, token_logprobs

SCALES = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
IMPORTANCE_LEVELS = ("token", "sequence")


@dataclass
class GRPOConfig:
    group_size: int = 8              # completions sampled per prompt (G)
    max_new_tokens: int = 64         # completion length cap, tokens
    temperature: float = 1.0         # sampling temperature; log-probs use the same one
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    stop_token: Optional[int] = None  # ends a completion (and counts in its mask)
    pad_token: int = 0
    scale_rewards: str = "group"     # "group" | "batch" | "none"
    adv_eps: float = 1e-6            # added to the std before dividing
    eps_low: float = 0.2             # clip: rho >= 1 - eps_low
    eps_high: float = 0.2            # clip: rho <= 1 + eps_high
    beta: float = 0.0                # KL penalty weight; 0 keeps no reference model
    loss_type: str = "grpo"          # "grpo" | "dapo" | "dr_grpo"
    importance_level: str = "token"  # "token" | "sequence" (GSPO)
    num_iterations: int = 1          # optimizer passes over one rollout batch
    minibatch_size: Optional[int] = None  # rows per optimizer step; None = whole batch
    max_grad_norm: float = 1.0       # gradient clipping; 0 or less turns it off
    reward_weights: Optional[tuple] = None  # one weight per reward function; None = all 1
    dynamic_sampling: bool = False   # DAPO: drop zero-spread groups and sample more prompts
    max_sampling_rounds: int = 4     # cap on sampling rounds when dynamic_sampling is on
    overlong_buffer: int = 0         # DAPO: soft length penalty over the last this-many tokens; 0 = off
    mask_truncated: bool = False     # DAPO: completions without a stop token are left out of the loss
    logprob_chunk: int = 512         # rows of logits materialized at a time when computing log-probs

    def __post_init__(self):
        check_choice("scale_rewards", self.scale_rewards, SCALES)
        check_choice("loss_type", self.loss_type, LOSS_TYPES)
        check_choice("importance_level", self.importance_level, IMPORTANCE_LEVELS)
        if self.group_size < 1:
            raise ValueError(f"group_size must be at least 1, got {self.group_size}")
        if self.num_iterations < 1:
            raise ValueError(f"num_iterations must be at least 1, got {self.num_iterations}")


def check_choice(name, value, valid):
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(repr(v) for v in valid)}")


# ----------------------------------------------------------------------------------------------------------------
# The formulas: tensors in, tensors out


def group_advantages(rewards, group_size, scale="group", eps=1e-6):
    """A_i = (r_i - mean of its group) / (std + eps), for all groups at once. rewards (N,) are ordered group by
    group (rows i*G .. i*G+G-1 share a prompt). Bessel-corrected std, as torch.std. A group whose rewards are
    all equal gets exactly 0 (its centred rewards are 0), never NaN; a group of one has no spread and gets 0."""
    check_choice("scale", scale, SCALES)
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)  # (P, G)
    centred = grouped - grouped.mean(1, keepdim=True)
    if scale == "group":
        std = grouped.std(1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped[:, :1])
        centred = centred / (std + eps)
    elif scale == "batch":
        std = rewards.std() if rewards.numel() > 1 else torch.zeros(())
        centred = centred / (std + eps)
    return centred.view(-1)


def kl_k3(logp, ref_logp):
    """Schulman's k3 estimator of KL(pi || pi_ref) per token: exp(d) - d - 1 with d = ref - logp. Always >= 0,
    0 where the two agree, and unbiased for samples drawn from pi."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def overlong_penalty(lengths, max_len, buffer):
    """DAPO's soft overlong punishment: 0 up to max_len - buffer, then falling linearly to -1 at max_len,
    and -1 beyond."""
    lengths = lengths.float()
    penalty = (max_len - buffer - lengths) / buffer
    return penalty.clamp(min=-1.0, max=0.0)


def grpo_loss(logp, old_logp, advantages, mask, ref_logp=None, *, eps_low=0.2, eps_high=0.2, beta=0.0,
              loss_type="grpo", importance_level="token", max_completion_len=None):
    """The clipped GRPO surrogate, to minimize. logp, old_logp, ref_logp, mask: (N, T); advantages: (N,).
    Returns (loss, stats); stats are detached floats for logging."""
    check_choice("loss_type", loss_type, LOSS_TYPES)
    check_choice("importance_level", importance_level, IMPORTANCE_LEVELS)
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp, the log-probs of the reference model")
    mask = mask.to(logp.dtype)
    keep = mask > 0
    lengths = mask.sum(1)  # |o_i|
    # Padding may hold anything, even inf or NaN. Zero it before any arithmetic: masking only the result
    # would still send NaN gradients back through torch.where's unselected branch.
    logp = torch.where(keep, logp, 0.0)
    old_logp = torch.where(keep, old_logp, 0.0)
    if ref_logp is not None:
        ref_logp = torch.where(keep, ref_logp, 0.0)
    log_ratio = logp - old_logp
    if importance_level == "sequence":
        # GSPO: one ratio per sequence, the geometric mean of its token ratios, applied to all its tokens.
        log_ratio = (log_ratio.sum(1) / lengths.clamp(min=1)).unsqueeze(1).expand_as(logp)  # padding is 0
    ratio = torch.exp(log_ratio)
    A = advantages.unsqueeze(1)  # (N, 1): one advantage for every token of a completion
    unclipped = ratio * A
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * A
    objective = torch.minimum(unclipped, clipped)  # (N, T)
    kl = None
    if beta > 0:
        kl = kl_k3(logp, ref_logp)  # 0 on padding, where both are 0
        objective = objective - beta * kl
    objective = torch.where(keep, objective, 0.0)

    if loss_type == "grpo":  # DeepSeekMath: mean over each sequence's tokens, then over sequences
        aggregated = (objective.sum(1) / lengths.clamp(min=1)).mean()
    elif loss_type == "dapo":  # every token of the batch weighs the same
        aggregated = objective.sum() / mask.sum().clamp(min=1)
    else:  # "dr_grpo": a constant normalizer, so no length bias
        T = max_completion_len if max_completion_len is not None else mask.size(1)
        aggregated = objective.sum() / (mask.size(0) * T)
    loss = -aggregated

    with torch.no_grad():
        n_tokens = mask.sum().clamp(min=1)
        low = (ratio < 1 - eps_low) & (A < 0) & keep  # where the min takes the clipped branch
        high = (ratio > 1 + eps_high) & (A > 0) & keep
        stats = {
            "clip_low_frac": (low.sum() / n_tokens).item(),
            "clip_high_frac": (high.sum() / n_tokens).item(),
            "ratio_mean": (torch.where(keep, ratio, 0.0).sum() / n_tokens).item(),
            "ratio_max": torch.where(keep, ratio, 0.0).max().item() if keep.any() else 1.0,
            "kl": (kl.sum() / n_tokens).item() if kl is not None else 0.0,
        }
    return loss, stats


# ----------------------------------------------------------------------------------------------------------------
# Rewards


def score(completions, examples, reward_fns, weights=None):
    """Run every reward function on every completion. Returns (total (N,), per-function (N, F)).
    A function with `fn.batched = True` takes (completions, examples) and returns one value per completion.
    A reward function that raises, or returns NaN, inf or a non-number, stops the run with its name and the
    completion: a silently wrong reward trains a silently wrong model."""
    weights = [1.0] * len(reward_fns) if weights is None else list(weights)
    if len(weights) != len(reward_fns):
        raise ValueError(f"{len(weights)} reward weights for {len(reward_fns)} reward functions")
    table = torch.zeros(len(completions), len(reward_fns), dtype=torch.float64)
    for j, fn in enumerate(reward_fns):
        name = getattr(fn, "__name__", repr(fn))
        if getattr(fn, "batched", False):  # e.g. an LLM judge: one call grades the whole batch
            values = call_reward(name, fn, completions, examples)
            if len(values) != len(completions):
                raise ValueError(f"reward function {name} returned {len(values)} values for "
                                 f"{len(completions)} completions")
        else:
            values = [call_reward(name, fn, c, ex) for c, ex in zip(completions, examples)]
        for i, (completion, value) in enumerate(zip(completions, values)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"reward function {name} returned {value!r} (a finite number is required) "
                                 f"on completion {completion!r}")
            table[i, j] = float(value)
    total = table @ torch.tensor(weights, dtype=torch.float64)
    return total.float(), table.float()


def call_reward(name, fn, completion, example):
    """fn(completion, example), or for a batched fn the list it returns for (completions, examples); an
    exception becomes one that names the function and what it was given."""
    batched = getattr(fn, "batched", False)
    try:
        return list(fn(completion, example)) if batched else fn(completion, example)
    except Exception as e:
        given = f"a batch of {len(completion)} completions" if batched else f"completion {completion!r}"
        raise RuntimeError(f"reward function {name} raised {type(e).__name__}: {e} on {given}") from e


def reward_names(reward_fns):
    return [getattr(fn, "__name__", f"reward{j}") for j, fn in enumerate(reward_fns)]


# ----------------------------------------------------------------------------------------------------------------
# One whole GRPO iteration


def rollout(policy, prompts, examples, reward_fns, config, generator, decode):
    """Sample a group per prompt and score it. Returns (samples, total rewards (N,), per-function rewards (N, F))."""
    samples = sample(policy, prompts, max_new_tokens=config.max_new_tokens, group_size=config.group_size,
                     temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
                     stop_token=config.stop_token, pad_token=config.pad_token, generator=generator)
    row_examples = [ex for ex in examples for _ in range(config.group_size)]
    texts = [decode(tokens) for tokens in samples.completion_tokens(config.stop_token)]
    total, table = score(texts, row_examples, reward_fns, config.reward_weights)
    total = total.to(samples.tokens.device)
    if config.overlong_buffer > 0:
        lengths = samples.completion_mask.sum(1)
        total = total + overlong_penalty(lengths, config.max_new_tokens, config.overlong_buffer)
    return samples, total, table


def cat_samples(parts):
    """Join Samples of several sampling rounds (their prompt widths may differ: pad on the left)."""
    width = max(s.prompt_len for s in parts)
    length = max(s.completion.size(1) for s in parts)
    tokens, valid, masks = [], [], []
    for s in parts:
        left, right = width - s.prompt_len, length - s.completion.size(1)
        t = torch.nn.functional.pad(s.tokens, (left, right), value=0)
        tokens.append(t)
        valid.append(torch.nn.functional.pad(s.valid, (left, right), value=False) |
                     (torch.arange(t.size(1), device=t.device) >= width))
        masks.append(torch.nn.functional.pad(s.completion_mask, (0, right), value=0.0))
    return Samples(torch.cat(tokens), torch.cat(valid), width, torch.cat(masks),
                   torch.cat([s.truncated for s in parts]))


def has_spread(rewards, group_size):
    """(P,) bool: the group's rewards are not all equal, so its advantages are not all 0."""
    if group_size == 1:
        return torch.zeros(len(rewards), dtype=torch.bool, device=rewards.device)
    return rewards.view(-1, group_size).std(1) > 0


def keep_groups_with_spread(samples, rewards, wanted, policy, reward_fns, config, generator, decode, refill):
    """DAPO's dynamic sampling: drop groups whose rewards are all equal (they have no gradient) and sample
    groups for new prompts from refill(n) until `wanted` groups are kept or max_sampling_rounds is reached.
    Returns (samples, rewards, rounds); samples is None when no group was kept."""
    G = config.group_size
    parts, kept, rounds = [], [], 1
    while True:
        rows = has_spread(rewards, G).repeat_interleave(G)
        if rows.any():
            parts.append(subset(samples, rows))
            kept.append(rewards[rows])
        have = sum(len(r) for r in kept) // G
        if have >= wanted or rounds >= config.max_sampling_rounds or refill is None:
            break
        prompts, examples = refill(wanted - have)
        samples, rewards, _ = rollout(policy, prompts, examples, reward_fns, config, generator, decode)
        rounds += 1
    if not parts:
        return None, None, rounds
    samples, rewards = cat_samples(parts), torch.cat(kept)
    rows = torch.arange(len(rewards), device=rewards.device) < wanted * G  # a last round may overshoot
    return subset(samples, rows), rewards[rows], rounds


def subset(samples, rows):
    """The rows of a Samples selected by a bool mask (N,)."""
    return Samples(samples.tokens[rows], samples.valid[rows], samples.prompt_len, samples.completion_mask[rows],
                   samples.truncated[rows])


def average_gradients_across_ranks(model):
    """Plain DDP by hand: the mean gradient over processes (each rank sampled its own prompts)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= world


def grpo_step(policy, optimizer, prompts, examples, reward_fns, config, *, reference=None, generator=None,
              decode=None, refill=None, autocast=None):
    """One GRPO iteration: sample -> score -> advantages -> (old and reference log-probs) -> num_iterations
    passes of clipped-loss updates. Returns a dict of metrics (floats).

    prompts: list of token lists; examples: one task example per prompt, handed to the reward functions as
    `reward(completion_text, example)`; decode: token list -> completion text. refill(n) -> (prompts, examples)
    supplies more prompts for dynamic sampling. Under torch.distributed, gradients are averaged across ranks.
    reference: the frozen policy of the KL term (beta > 0), or `policy` itself for a LoRA policy (model.add_lora):
    then the reference is the policy with its adapters switched off."""
    if config.beta > 0 and reference is None:
        raise ValueError("beta > 0 needs a reference model (a frozen copy of the starting policy)")
    if config.beta > 0 and reference is policy and not policy.config.lora_rank:
        raise ValueError("reference=policy means 'the policy with its LoRA adapters off', but it has none")
    if len(prompts) != len(examples):
        raise ValueError(f"{len(prompts)} prompts but {len(examples)} examples")
    decode = decode or (lambda tokens: tokens)
    autocast = autocast or contextlib.nullcontext()  # e.g. torch.autocast("cuda", dtype=torch.bfloat16)
    G = config.group_size
    t0 = time.perf_counter()

    # 1. Rollout: groups of completions from the current policy (= pi_old), and their rewards.
    policy.eval()
    with autocast:
        samples, rewards, table = rollout(policy, prompts, examples, reward_fns, config, generator, decode)
    metrics = {"reward_mean": rewards.mean().item(), "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0}
    for name, column in zip(reward_names(reward_fns), table.T):
        metrics[f"reward_{name}"] = column.mean().item()
    metrics["zero_std_frac"] = 1.0 - has_spread(rewards, G).float().mean().item()
    metrics["sampling_rounds"] = 1.0
    if config.dynamic_sampling:
        with autocast:
            samples, rewards, rounds = keep_groups_with_spread(samples, rewards, len(prompts), policy, reward_fns,
                                                               config, generator, decode, refill)
        metrics["sampling_rounds"] = float(rounds)
        if samples is None:  # no group had any reward spread: nothing to learn from this batch
            return {**metrics, "skipped": 1.0, "time_sample_s": time.perf_counter() - t0, "time_learn_s": 0.0}
    t1 = time.perf_counter()

    # 2. Advantages, one per completion, broadcast over its tokens inside the loss.
    advantages = group_advantages(rewards, G, config.scale_rewards, config.adv_eps)
    mask = samples.completion_mask
    if config.mask_truncated:
        mask = mask * (~samples.truncated).float()[:, None]
    N = len(rewards)
    mb = config.minibatch_size or N
    minibatches = [torch.arange(i, min(i + mb, N), device=mask.device) for i in range(0, N, mb)]
    steps_per_rollout = config.num_iterations * len(minibatches)

    def logprobs(model, rows, with_entropy=False):
        # Minibatches of whole groups run each prompt once per group (model.grouped_hidden_states).
        return token_logprobs(model, samples.tokens[rows], samples.prompt_len, valid=samples.valid[rows],
                              temperature=config.temperature, chunk_size=config.logprob_chunk,
                              with_entropy=with_entropy, group_size=G if mb % G == 0 else 1)

    # 3. Old log-probs (pi_old) only when the policy moves before the last use of this rollout; reference
    #    log-probs only when there is a KL term. Neither needs gradients.
    old_logp = ref_logp = None
    with torch.no_grad(), autocast:
        if steps_per_rollout > 1:
            old_logp = torch.cat([logprobs(policy, rows) for rows in minibatches])
        if config.beta > 0:
            # reference is policy: a LoRA policy whose reference is itself with the adapters off (no copy kept)
            with adapters_off(policy) if reference is policy else contextlib.nullcontext():
                ref_logp = torch.cat([logprobs(reference, rows) for rows in minibatches])

    # 4. num_iterations passes of clipped-ratio updates over minibatches of the rollout.
    policy.train()
    history = []
    for _ in range(config.num_iterations):
        for rows in minibatches:
            with autocast:
                logp, entropy = logprobs(policy, rows, with_entropy=True)
            old = old_logp[rows] if old_logp is not None else logp.detach()  # one step: rho == 1 exactly
            loss, stats = grpo_loss(logp, old, advantages[rows], mask[rows],
                                    ref_logp[rows] if ref_logp is not None else None,
                                    eps_low=config.eps_low, eps_high=config.eps_high, beta=config.beta,
                                    loss_type=config.loss_type, importance_level=config.importance_level,
                                    max_completion_len=config.max_new_tokens)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the GRPO loss is {loss.item()}; stats {stats}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            average_gradients_across_ranks(policy)
            params = [p for p in policy.parameters() if p.grad is not None]
            if config.max_grad_norm > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm).item()
            else:
                grad_norm = torch.norm(torch.stack([p.grad.norm() for p in params])).item()
            optimizer.step()
            keep = mask[rows] > 0
            stats.update(loss=loss.item(), grad_norm=grad_norm,
                         entropy=(entropy[keep].mean().item() if keep.any() else 0.0))
            history.append(stats)
    t2 = time.perf_counter()

    for key in history[0]:
        metrics[key] = sum(h[key] for h in history) / len(history)
    metrics["ratio_max"] = max(h["ratio_max"] for h in history)
    metrics.update(completion_len=samples.completion_mask.sum(1).mean().item(),
                   truncated_frac=samples.truncated.float().mean().item(),
                   optimizer_steps=float(len(history)),
                   time_sample_s=t1 - t0, time_learn_s=t2 - t1)
    return metrics
