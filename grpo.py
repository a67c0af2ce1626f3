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
For a LoRA policy (model.add_lora) the reference is the policy with its adapters off: pass reference=LORA_BASE.

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
steps; then the old log-probs are fixed numbers from before the first update: the first pass's own, detached,
when the whole rollout is one minibatch, else a pass without grad right after sampling. pi_old is never the
reference model. Another: with loss_type "grpo" the loss VALUE is about 0 at rho = 1 (advantages are centred
within each group) while its gradient is not; that is expected.
"""

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from model import Samples, adapters_off, sample, token_logprobs

SCALES = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
IMPORTANCE_LEVELS = ("token", "sequence")


def knob(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class GRPOConfig:
    """Every GRPO knob, with the defaults of plain GRPO. train.py makes each one a flag (its help is below)."""
    group_size: int = knob(8, "completions sampled per prompt (G)")
    max_new_tokens: int = knob(64, "completion length cap, tokens")
    temperature: float = knob(1.0, "sampling temperature; the log-probs use the same one")
    scale_rewards: str = knob("group", "advantage scaling: group (std of the group), batch, or none (Dr. GRPO)")
    adv_eps: float = knob(1e-6, "added to the std before dividing")
    eps_low: float = knob(0.2, "clip range below 1: rho >= 1 - eps_low")
    eps_high: float = knob(0.2, "clip range above 1: rho <= 1 + eps_high (0.28 = DAPO's clip-higher)")
    beta: float = knob(0.0, "KL penalty weight to a frozen reference; 0 keeps no reference model at all")
    loss_type: str = knob("grpo", "how token terms are averaged: grpo, dapo or dr_grpo")
    importance_level: str = knob("token", "token, or sequence (GSPO: one length-normalized ratio per sequence)")
    num_iterations: int = knob(1, "optimizer passes over each rollout batch (mu); >1 makes the clip act")
    minibatch_size: Optional[int] = knob(None, "rows per optimizer step within a pass, a multiple of "
                                               "group_size; unset = the whole batch")
    max_grad_norm: float = knob(1.0, "gradient clipping; 0 = off")
    reward_weights: Optional[tuple] = knob(None, "one weight per reward function, comma-separated; unset = all 1")
    dynamic_sampling: bool = knob(False, "DAPO: drop zero-spread groups and sample more prompts")
    max_sampling_rounds: int = knob(4, "cap on sampling rounds with dynamic_sampling")
    refill_factor: float = knob(1.0, "dynamic sampling: a later round samples this many times the groups "
                                     "still missing (>1 fills the batch in fewer rounds)")
    overlong_buffer: int = knob(0, "DAPO: soft length penalty over the last this-many tokens; 0 = off")
    mask_truncated: bool = knob(False, "DAPO: completions without a stop token are left out of the loss")
    logprob_chunk: int = knob(512, "rows of logits materialized at a time when computing log-probs")
    # Set by the caller, not knobs: the tokenizer's ids, and truncated sampling, which GRPO refuses (below).
    stop_token: Optional[int] = None  # ends a completion (and counts in its mask)
    pad_token: int = 0
    top_k: Optional[int] = None
    top_p: Optional[float] = None

    def __post_init__(self):
        check_choice("scale_rewards", self.scale_rewards, SCALES)
        check_choice("loss_type", self.loss_type, LOSS_TYPES)
        check_choice("importance_level", self.importance_level, IMPORTANCE_LEVELS)
        for name in ("group_size", "num_iterations", "max_new_tokens", "max_sampling_rounds", "logprob_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not (math.isfinite(self.refill_factor) and self.refill_factor >= 1):
            raise ValueError(f"refill_factor must be a finite number >= 1, got {self.refill_factor}")
        for name in ("eps_low", "eps_high", "beta", "adv_eps", "overlong_buffer"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):  # a negative clip range zeroes half the gradients
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.eps_low >= 1:
            raise ValueError(f"eps_low must be below 1 (the clip's floor is 1 - eps_low), got {self.eps_low}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be positive during GRPO, got {self.temperature}")
        if self.top_k is not None or self.top_p is not None:
            # The ratio and the KL term score tokens under the model's full distribution (at the temperature).
            # Top-k/top-p tokens come from a truncated one, so pi_old would not be the sampler's distribution:
            # with top_k=5 the full distribution put 0.21 of its mass where the sampler put all of it.
            raise ValueError("top_k/top_p sampling is not supported during GRPO: the tokens would come from a "
                             "truncated distribution while the ratio and the KL score the full one; use the "
                             "temperature instead (top-k and top-p remain available to model.sample)")
        if self.minibatch_size is not None and (self.minibatch_size < 1 or self.minibatch_size % self.group_size):
            raise ValueError(f"minibatch_size={self.minibatch_size} must be a positive multiple of group_size="
                             f"{self.group_size}: minibatches hold whole groups (each prompt runs once per group)")
        if self.reward_weights is not None and not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w)
                for w in self.reward_weights):
            raise ValueError(f"reward_weights must be finite numbers, got {self.reward_weights}")


def check_choice(name, value, valid):
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(repr(v) for v in valid)}")


# ----------------------------------------------------------------------------------------------------------------
# The formulas: tensors in, tensors out


def group_advantages(rewards, group_size, scale="group", eps=1e-6):
    """A_i = (r_i - mean of its group) / (std + eps), for all groups at once. rewards (N,) are ordered group by
    group (rows i*G .. i*G+G-1 share a prompt). Bessel-corrected std, as torch.std.

    A group whose rewards are all equal gets exactly 0, never NaN, for any value and every scale. That needs
    saying: in float32, x - mean(x) of a constant group is not 0 for most x (eight copies of 2/3 leave 6e-8),
    and dividing by std + eps = 1e-6 would turn that residue into an advantage of 0.06 on every row."""
    check_choice("scale", scale, SCALES)
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)  # (P, G)
    centred = torch.where(has_spread(rewards, group_size)[:, None], grouped - grouped.mean(1, keepdim=True), 0.0)
    if scale == "group":
        std = grouped.std(1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped[:, :1])
        centred = centred / (std + eps)
    elif scale == "batch":
        std = rewards.std() if rewards.numel() > 1 else torch.zeros((), device=rewards.device)
        centred = centred / (std + eps)
    return centred.view(-1)


def has_spread(rewards, group_size):
    """(P,) bool: the group's rewards are not all equal, so its advantages are not all 0. Compared exactly
    (max > min): a std computed in float32 is not 0 for most constant groups."""
    grouped = rewards.view(-1, group_size)
    return grouped.amax(1) > grouped.amin(1)


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
              loss_type="grpo", importance_level="token", max_completion_len=None, normalizer=None):
    """The clipped GRPO surrogate, to minimize. logp, old_logp, ref_logp, mask: (N, T); advantages: (N,).
    Returns (loss, stats); stats are detached floats for logging.

    normalizer: what the summed objective is divided by: the number of sequences ("grpo", each first averaged
    over its own tokens), of tokens ("dapo") or sequences x max_completion_len ("dr_grpo"). None counts these
    rows. grpo_step passes the whole rollout's count (every process's) per optimizer step, so that every
    sequence, or every token, weighs the same however the batch is split into minibatches and processes."""
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
        summed = (objective.sum(1) / lengths.clamp(min=1)).sum()
        count = mask.size(0)
    elif loss_type == "dapo":  # every token of the batch weighs the same
        summed, count = objective.sum(), mask.sum().clamp(min=1)
    else:  # "dr_grpo": a constant normalizer, so no length bias
        T = max_completion_len if max_completion_len is not None else mask.size(1)
        summed, count = objective.sum(), mask.size(0) * T
    aggregated = summed / (normalizer if normalizer is not None else count)
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
# One whole GRPO iteration

LORA_BASE = "lora base"  # reference=LORA_BASE: the KL reference is the policy with its LoRA adapters off


def grpo_step(policy, optimizer, prompts, examples, reward_fns, config, *, reference=None, generator=None,
              decode=None, refill=None, autocast=None, learner=None):
    """One GRPO iteration: rollout -> advantages -> old and reference log-probs -> num_iterations passes of
    clipped-loss updates. Returns a dict of metrics (floats), the same keys on every step.

    prompts: list of token lists; examples: one task example per prompt, handed to the reward functions as
    `reward(completion_text, example)`; decode: token list -> completion text. refill(n) -> (prompts, examples)
    supplies more prompts for dynamic sampling. reference: the frozen model of the KL term (beta > 0), or
    LORA_BASE for a LoRA policy (model.add_lora), whose reference is itself with the adapters off.
    learner: data_parallel(policy), built once, under torch.distributed; it averages the gradients."""
    check_step_arguments(policy, prompts, examples, config, reference, learner)
    autocast = autocast or contextlib.nullcontext()  # e.g. torch.autocast("cuda", dtype=torch.bfloat16)
    t0 = time.perf_counter()

    # 1. Rollout: a group of completions per prompt from the current policy (= pi_old), and their rewards.
    policy.eval()
    with autocast:
        samples, rewards, table = rollout(policy, prompts, examples, reward_fns, config, generator, decode)
        metrics = rollout_metrics(samples, rewards, table, reward_fns, config)
        if config.dynamic_sampling:  # DAPO: keep only groups with reward spread, sample more to fill up
            samples, rewards, metrics["sampling_rounds"] = keep_groups_with_spread(
                samples, rewards, len(prompts), policy, reward_fns, config, generator, decode, refill)
    t1 = time.perf_counter()
    metrics["groups_learned"] = len(rewards) / config.group_size  # fewer if sampling ran out of rounds
    if len(rewards) == 0:  # no group had any reward spread, on any process: nothing to learn from this batch
        return {**metrics, **update_metrics([]), "skipped": 1.0, "time_sample_s": t1 - t0, "time_learn_s": 0.0}

    # 2. Advantages, one per completion, broadcast over its tokens inside the loss.
    advantages = group_advantages(rewards, config.group_size, config.scale_rewards, config.adv_eps)
    minibatches = torch.arange(len(rewards), device=rewards.device).split(config.minibatch_size or len(rewards))

    # 3. pi_old's log-probs (only when the policy moves between minibatches of one pass) and the reference's
    #    (only with a KL term), computed once, without gradients.
    with torch.no_grad(), autocast:
        old_logp, ref_logp = frozen_logprobs(policy, reference, samples, minibatches, config)

    # 4. num_iterations passes of clipped-ratio updates over minibatches of the rollout.
    policy.train()
    history = update_passes(policy, learner or PolicyLogprobs(policy), optimizer, samples, advantages, old_logp,
                            ref_logp, minibatches, config, autocast)
    t2 = time.perf_counter()
    return {**metrics, **update_metrics(history), "skipped": 0.0, "time_sample_s": t1 - t0, "time_learn_s": t2 - t1}


def logprobs(module, samples, rows, config, with_entropy=False):
    """(log-probs, entropies or None) of the rollout's completion tokens in `rows`, under a PolicyLogprobs
    module (or the learner, its DDP wrapper), at the sampling temperature; each group's prompt runs once."""
    return module(samples.tokens[rows], samples.prompt_len, samples.valid[rows], config.temperature,
                  config.logprob_chunk, config.group_size, with_entropy)


def frozen_logprobs(policy, reference, samples, minibatches, config):
    """(pi_old's log-probs or None, the reference's or None). With the whole rollout in one minibatch the first
    pass runs before any optimizer step, so its own log-probs are pi_old's (update_passes keeps them, detached):
    no extra forward. The reference is `reference`, or for reference=LORA_BASE the policy with its LoRA adapters
    switched off."""
    old_logp = ref_logp = None
    if len(minibatches) > 1:
        old_logp = torch.cat([logprobs(PolicyLogprobs(policy), samples, rows, config)[0] for rows in minibatches])
    if config.beta > 0:
        with adapters_off(policy) if reference == LORA_BASE else contextlib.nullcontext():
            frozen = PolicyLogprobs(policy if reference == LORA_BASE else reference)
            ref_logp = torch.cat([logprobs(frozen, samples, rows, config)[0] for rows in minibatches])
    return old_logp, ref_logp


def update_passes(policy, learner, optimizer, samples, advantages, old_logp, ref_logp, minibatches, config,
                  autocast):
    """num_iterations passes over the minibatches, one optimizer step each. Returns each step's stats."""
    mask = samples.completion_mask
    if config.mask_truncated:  # DAPO: a completion cut off by the length cap says nothing about its reward
        mask = mask * (~samples.truncated).float()[:, None]
    normalizer = loss_normalizer(mask, config, len(minibatches))
    history = []
    for _ in range(config.num_iterations):
        for rows in minibatches:
            with autocast:
                logp, entropy = logprobs(learner, samples, rows, config, with_entropy=True)
            if old_logp is None:  # one minibatch, first pass: the weights have not moved, this IS pi_old
                old_logp = logp.detach()  # rho == 1 exactly now; later passes divide by these same numbers
            old = old_logp[rows]
            loss, stats = grpo_loss(logp, old, advantages[rows], mask[rows],
                                    ref_logp[rows] if ref_logp is not None else None,
                                    eps_low=config.eps_low, eps_high=config.eps_high, beta=config.beta,
                                    loss_type=config.loss_type, importance_level=config.importance_level,
                                    max_completion_len=config.max_new_tokens, normalizer=normalizer)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the GRPO loss is {loss.item()}; stats {stats}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # under DistributedDataParallel this also averages the gradients across processes
            grad_norm = clip_gradients(policy, config.max_grad_norm)
            optimizer.step()
            keep = mask[rows] > 0
            stats.update(loss=loss.item(), grad_norm=grad_norm,
                         entropy=entropy[keep].mean().item() if keep.any() else 0.0)
            history.append(stats)
    return history


def rollout(policy, prompts, examples, reward_fns, config, generator, decode):
    """Sample a group per prompt and score it. Returns (samples, total rewards (N,), per-function rewards (N, F))."""
    samples = sample(policy, prompts, max_new_tokens=config.max_new_tokens, group_size=config.group_size,
                     temperature=config.temperature, stop_token=config.stop_token, pad_token=config.pad_token,
                     generator=generator)
    row_examples = [ex for ex in examples for _ in range(config.group_size)]
    decode = decode or (lambda tokens: tokens)
    texts = [decode(tokens) for tokens in samples.completion_tokens(config.stop_token)]
    total, table = score(texts, row_examples, reward_fns, config.reward_weights)
    total = total.to(samples.tokens.device)
    if config.overlong_buffer > 0:
        lengths = samples.completion_mask.sum(1)
        total = total + overlong_penalty(lengths, config.max_new_tokens, config.overlong_buffer)
    return samples, total, table


def check_step_arguments(policy, prompts, examples, config, reference, learner):
    if config.beta > 0 and reference is None:
        raise ValueError("beta > 0 needs a reference model (a frozen copy of the starting policy)")
    if reference is policy:
        raise ValueError("the KL reference must be a frozen model, not the policy being trained; for a LoRA "
                         "policy pass reference=grpo.LORA_BASE (the policy with its adapters off)")
    if reference == LORA_BASE and not policy.config.lora_rank:
        raise ValueError("reference=LORA_BASE means 'the policy with its LoRA adapters off', but it has none")
    if len(prompts) != len(examples):
        raise ValueError(f"{len(prompts)} prompts but {len(examples)} examples")
    if world_size() > 1 and not isinstance(learner, DistributedDataParallel):
        raise ValueError("under torch.distributed pass learner=grpo.data_parallel(policy), built once: it "
                         "averages the gradients across processes")


def clip_gradients(model, max_norm):
    """The gradient's global norm before clipping (clipping only if max_norm > 0)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm).item()
    return torch.norm(torch.stack([p.grad.norm() for p in params])).item()


# ----------------------------------------------------------------------------------------------------------------
# Rewards


def score(completions, examples, reward_fns, weights=None):
    """Run every reward function on every completion. Returns (total (N,), per-function (N, F)), float32.
    A reward weighted 0 is not run. A function with `fn.batched = True` takes (completions, examples) and
    returns a list or tuple of one value per completion. A reward function that raises, or returns anything but
    a real number that is finite in float32, stops the run with its name and the completion: a silently wrong
    reward trains a silently wrong model."""
    weights = [1.0] * len(reward_fns) if weights is None else list(weights)
    if len(weights) != len(reward_fns):
        raise ValueError(f"{len(weights)} reward weights for {len(reward_fns)} reward functions")
    table = torch.zeros(len(completions), len(reward_fns), dtype=torch.float64)
    for j, fn in enumerate(reward_fns):
        if weights[j] == 0:  # weighted 0: not even computed (its column stays 0 and is not logged)
            continue
        name = getattr(fn, "__name__", repr(fn))
        if getattr(fn, "batched", False):  # e.g. an LLM judge: one call grades the whole batch
            values = call_reward(name, fn, completions, examples)
            if not isinstance(values, (list, tuple)) or len(values) != len(completions):
                got = f"{len(values)} values" if isinstance(values, (list, tuple)) else repr(type(values))
                raise ValueError(f"batched reward function {name} returned {got} for {len(completions)} "
                                 f"completions (a list or tuple of one number each is required)")
        else:
            values = [call_reward(name, fn, c, ex) for c, ex in zip(completions, examples)]
        for i, (completion, value) in enumerate(zip(completions, values)):
            if not is_float32_number(value):
                raise ValueError(f"reward function {name} returned {value!r} (a number finite in float32 is "
                                 f"required) on completion {completion!r}")
            table[i, j] = float(value)
    total = table @ torch.tensor(weights, dtype=torch.float64)
    if not bool(total.float().isfinite().all()):
        raise ValueError(f"the weighted reward overflows float32 (weights {weights}, largest total "
                         f"{total.abs().max().item():.3g})")
    return total.float(), table.float()


def is_float32_number(value):
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and abs(value) <= torch.finfo(torch.float32).max)


def call_reward(name, fn, completion, example):
    """fn(completion, example); an exception becomes one that names the function and what it was given."""
    try:
        return fn(completion, example)
    except Exception as e:
        given = (f"a batch of {len(completion)} completions" if getattr(fn, "batched", False)
                 else f"completion {completion!r}")
        raise RuntimeError(f"reward function {name} raised {type(e).__name__}: {e} on {given}") from e


def reward_names(reward_fns):
    return [getattr(fn, "__name__", f"reward{j}") for j, fn in enumerate(reward_fns)]


# ----------------------------------------------------------------------------------------------------------------
# Metrics. Under torch.distributed the rollout's figures are over every process's rollout.


def rollout_metrics(samples, rewards, table, reward_fns, config):
    everything = all_gather(torch.cat([rewards[:, None], table.to(rewards.device)], 1))  # (N * world, 1 + F)
    metrics = {"reward_mean": everything[:, 0].mean().item(),
               "reward_std": everything[:, 0].std().item() if len(everything) > 1 else 0.0,
               "zero_std_frac": 1.0 - has_spread(everything[:, 0], config.group_size).float().mean().item(),
               "completion_len": samples.completion_mask.sum(1).mean().item(),
               "truncated_frac": samples.truncated.float().mean().item(),
               "sampling_rounds": 1.0}
    weights = config.reward_weights or [1.0] * len(reward_fns)
    for name, weight, column in zip(reward_names(reward_fns), weights, everything[:, 1:].T):
        if weight != 0:  # a reward weighted 0 was not computed
            metrics[f"reward_{name}"] = column.mean().item()
    return metrics


UPDATE_KEYS = ("clip_low_frac", "clip_high_frac", "ratio_mean", "ratio_max", "kl", "loss", "grad_norm", "entropy")


def update_metrics(history):
    """The update passes' figures: means over the optimizer steps (ratio_max: the max). A skipped step (no
    optimizer step) reports zeros and a ratio of 1, so every step's record has the same keys."""
    if not history:
        return {**{key: 0.0 for key in UPDATE_KEYS}, "ratio_mean": 1.0, "ratio_max": 1.0, "optimizer_steps": 0.0}
    metrics = {key: sum(h[key] for h in history) / len(history) for key in UPDATE_KEYS}
    metrics.update(ratio_max=max(h["ratio_max"] for h in history), optimizer_steps=float(len(history)))
    return metrics


# ----------------------------------------------------------------------------------------------------------------
# Data parallel: each process samples its own prompts; gradients are averaged by PyTorch's own engine.


def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class PolicyLogprobs(torch.nn.Module):
    """The policy's token log-probs and entropies as a module's forward: what DistributedDataParallel wraps.
    DDP averages the gradients of what runs inside forward, in buckets that overlap the backward pass."""

    def __init__(self, policy):
        super().__init__()
        self.policy = policy

    def forward(self, tokens, start, valid, temperature=1.0, chunk_size=512, group_size=1, with_entropy=False):
        return token_logprobs(self.policy, tokens, start, valid=valid, temperature=temperature,
                              chunk_size=chunk_size, with_entropy=with_entropy, group_size=group_size)


def data_parallel(policy):
    """PolicyLogprobs(policy), wrapped in DistributedDataParallel under torch.distributed. Build it once per set of
    trainable parameters (after add_lora, a new one): DDP registers its gradient hooks when it is built."""
    module = PolicyLogprobs(policy)
    if world_size() == 1:
        return module
    device = next(policy.parameters()).device
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def all_reduce(value, op="sum"):
    """A number reduced over every process (the same number on all of them); the number itself in one process."""
    if world_size() == 1:
        return value
    t = torch.tensor(float(value), dtype=torch.float64, device=collective_device())
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return t.item()


def collective_device():
    """Where a collective's tensors must live: nccl reduces CUDA tensors, gloo CPU ones."""
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def all_gather(tensor):
    """Every process's tensor (all the same shape), concatenated along dim 0 in rank order."""
    if world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def loss_normalizer(mask, config, steps_per_pass):
    """grpo_loss's normalizer for one optimizer step: the count of the whole rollout, every process's, over the
    steps of a pass and the processes (DDP then averages over processes). The mean gradient of a pass's steps
    is then the gradient of one step over the whole batch, as if there were one minibatch and one process."""
    if config.loss_type == "grpo":
        count = mask.size(0)
    elif config.loss_type == "dapo":
        count = mask.sum().item()
    else:
        count = mask.size(0) * config.max_new_tokens
    return max(all_reduce(count), 1.0) / (steps_per_pass * world_size())


# ----------------------------------------------------------------------------------------------------------------
# DAPO's dynamic sampling


def keep_groups_with_spread(samples, rewards, wanted, policy, reward_fns, config, generator, decode, refill):
    """DAPO's dynamic sampling: drop groups whose rewards are all equal (they have no gradient) and sample
    groups for new prompts from refill(n) until `wanted` groups are kept or max_sampling_rounds is reached.
    Returns (samples, rewards, rounds); no rows at all when no group was kept.

    Every process takes the same decisions: it samples another round while any process still lacks groups,
    and keeps the number of groups the poorest process has, so all take the same number of optimizer steps
    (and all skip the step together)."""
    G = config.group_size
    parts, kept, rounds = [], [], 1
    while True:
        rows = has_spread(rewards, G).repeat_interleave(G)
        parts.append(subset(samples, rows))
        kept.append(rewards[rows])
        have = sum(len(r) for r in kept) // G
        if rounds >= config.max_sampling_rounds or refill is None or all_reduce(have, "min") >= wanted:
            break
        rounds += 1
        if have < wanted:  # most of the missing groups may come out flat again: refill_factor samples extra
            prompts, examples = refill(math.ceil(config.refill_factor * (wanted - have)))
            samples, rewards, _ = rollout(policy, prompts, examples, reward_fns, config, generator, decode)
        else:  # this process is full; it only joins the others' decision
            samples, rewards = subset(samples, torch.zeros_like(rows)), rewards[:0]
    keep = int(all_reduce(min(have, wanted), "min"))
    samples, rewards = cat_samples(parts), torch.cat(kept)
    rows = torch.arange(len(rewards), device=rewards.device) < keep * G  # the first `keep` groups
    return subset(samples, rows), rewards[rows], float(rounds)


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


def subset(samples, rows):
    """The rows of a Samples selected by a bool mask (N,)."""
    return Samples(samples.tokens[rows], samples.valid[rows], samples.prompt_len, samples.completion_mask[rows],
                   samples.truncated[rows])
