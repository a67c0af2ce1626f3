"""
GRPO: Group Relative Policy Optimization (Shao et al., "DeepSeekMath", 2024, arXiv 2402.03300).

For each prompt q, sample a group of G completions o_1..o_G from the current policy (pi_old: the weights that
sampled them), score each with rewards r_i, and maximize

    J = E[ agg_{i,t} ( min( rho_{i,t} A_i, clip(rho_{i,t}, 1 - eps_low, 1 + eps_high) A_i ) - beta D_{i,t} ) ]

    rho_{i,t} = pi_theta(o_{i,t} | q, o_{i,<t}) / pi_old(o_{i,t} | q, o_{i,<t})    per-token ratio
    A_i       = (r_i - mean_j r_j) / (std_j r_j + eps)                            group-relative advantage
    D_{i,t}   = exp(ref - logp) - (ref - logp) - 1                                k3 estimate of KL(pi || pi_ref)

The group mean is the baseline: there is no value network (critic), which is what GRPO removes from PPO.
The KL term to a frozen reference model is optional: beta = 0 keeps no reference model at all. A LoRA policy
(model.add_lora) needs none given: its reference is itself with the adapters off, no second copy of the weights.

Every choice is one knob of GRPOConfig below (and one flag of train.py): the advantage's scaling (scale_rewards:
Dr. GRPO's "none"), its baseline (RLOO's leave-one-out) and how several rewards combine (GDPO normalizes each
first), the clip range (eps_low, eps_high: DAPO's clip-higher) and PPO's dual clip (delta), beta and its bias
correction, the per-token objective and how it is averaged (loss_type: "grpo" per sequence, DAPO's token mean,
Dr. GRPO's constant, CISPO's clipped and detached IS weight, SAPO's soft gate), the ratio's level (GSPO's
"sequence"), a correction for a sampler that differs from pi_old (truncated or masked IS), an entropy bonus, the
passes over a rollout (num_iterations, mu in the paper, and minibatch_size), and DAPO's dynamic sampling,
overlong penalty and truncation mask. Each one's default changes nothing.

A trap worth knowing: with num_iterations = 1 and one minibatch, the policy being trained IS pi_old, so
rho = 1 exactly, the clip never acts, and the gradient is REINFORCE with the group-mean baseline,
sum_t A_i grad log pi(o_{i,t}). The clip only matters when the same rollout is reused for several optimizer
steps (hence num_iterations = 2 by default); then the old log-probs are fixed numbers from before the first
update: the first pass's own, detached, when the whole rollout is one minibatch, else a pass without grad right
after sampling. pi_old is never the reference model. Another: with loss_type "grpo" the loss VALUE is about 0
at rho = 1 (advantages are centred within each group) while its gradient is not; that is expected.
"""

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from typing import Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from model import Samples, adapters_off, sample
from rewards import score


SCALES = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "cispo", "sapo")
IMPORTANCE_LEVELS = ("token", "sequence")
IS_CORRECTIONS = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def knob(default, help, low=None, choices=None, **more):
    """A config field: its default, its --help line, what it accepts (check_knobs), and any more metadata."""
    return field(default=default, metadata={"help": help, "low": low, "choices": choices, **more})


@dataclass
class GRPOConfig:
    """Every GRPO knob, with the defaults of `python train.py` (a task may override some: data/<task>.py's
    TRAIN_DEFAULTS). train.py makes each one a flag; its help is below."""
    group_size: int = knob(8, "completions sampled per prompt (G)", low=1)
    max_new_tokens: int = knob(64, "completion length cap, tokens", low=1)
    # No top-k or top-p: the ratio and the KL term score the model's full distribution (at the temperature), so
    # the tokens must come from it; a truncated sampler's pi_old would be another distribution.
    temperature: float = knob(1.0, "sampling temperature, > 0; the log-probs use the same one")
    scale_rewards: str = knob("group", "advantage scaling: group std, batch std, none (Dr. GRPO)", choices=SCALES)
    adv_eps: float = knob(1e-6, "added to the std before dividing", low=0)
    baseline: str = knob("group_mean", "group_mean, or leave_one_out (RLOO: the mean of the other samples)",
                         choices=("group_mean", "leave_one_out"))
    reward_normalization: str = knob("sum_then_normalize", "sum_then_normalize, or normalize_then_sum (GDPO: each "
                                     "reward within its group first)", choices=("sum_then_normalize",
                                                                                 "normalize_then_sum"))
    eps_low: float = knob(0.2, "clip range below 1: rho >= 1 - eps_low", low=0)
    eps_high: float = knob(0.2, "clip range above 1: rho <= 1 + eps_high (0.28 = DAPO's clip-higher; cispo's cap "
                                "is 1 + eps_high)", low=0)
    delta: Optional[float] = knob(None, "dual clip: rho capped at delta (about 3) too, which binds where A < 0")
    beta: float = knob(0.04, "KL penalty weight (DeepSeekMath's); 0 keeps no reference model at all", low=0)
    kl_bias_correction: bool = knob(False, "the k3 term times rho: unbiased for tokens drawn from pi_old")
    loss_type: str = knob("grpo", "the per-token objective and its average: grpo, dapo, dr_grpo, cispo, sapo",
                          choices=LOSS_TYPES)
    sapo_tau_pos: float = knob(1.0, "sapo's gate temperature where A > 0", low=0)
    sapo_tau_neg: float = knob(1.05, "sapo's gate temperature where A < 0", low=0)
    is_correction: str = knob("none", "weigh each token (or sequence) by pi_old / the sampler's probability: "
                              "token_truncate, token_mask, sequence_truncate, sequence_mask",
                              choices=IS_CORRECTIONS)
    is_cap: float = knob(2.0, "truncate the IS weight at this C, or mask outside [1/C, C]", low=1)
    entropy_coef: float = knob(0.0, "entropy bonus: the objective plus this times the mean token entropy", low=0)
    importance_level: str = knob("token", "token, or sequence (GSPO's ratio)", choices=IMPORTANCE_LEVELS)
    num_iterations: int = knob(2, "optimizer passes over each rollout (mu); at 1 the clip never acts", low=1)
    minibatch_size: Optional[int] = knob(None, "rows per optimizer step, a multiple of group_size; unset = all")
    max_grad_norm: float = knob(1.0, "gradient clipping; 0 = off", low=0)
    reward_weights: Optional[tuple] = knob(None, "one weight per reward function, comma-separated; the task's")
    dynamic_sampling: bool = knob(False, "DAPO: drop zero-spread groups and sample more prompts")
    max_sampling_rounds: int = knob(4, "cap on sampling rounds with dynamic_sampling", low=1)
    refill_factor: float = knob(1.0, "dynamic sampling: a later round samples this many times the groups "
                                     "still missing (>1 fills the batch in fewer rounds)", low=1)
    overlong_buffer: int = knob(0, "DAPO: soft length penalty over the last this-many tokens; 0 = off", low=0)
    mask_truncated: bool = knob(False, "DAPO: completions without a stop token are left out of the loss")
    logprob_chunk: int = knob(512, "rows of logits materialized at a time when computing log-probs", low=1)
    # Not knobs: the tokenizer's ids, set by the caller.
    stop_token: Optional[int] = None  # ends a completion (and counts in its mask)
    pad_token: int = 0

    def __post_init__(self):
        check_knobs(self)
        if self.eps_low >= 1:
            raise ValueError(f"eps_low must be below 1 (the clip's floor is 1 - eps_low), got {self.eps_low}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be positive during GRPO, got {self.temperature}")
        refusals = [  # combinations that mean nothing, with the reason
            (self.importance_level == "sequence" and self.loss_type in ("dapo", "dr_grpo", "cispo"),
             f"a sequence-level ratio with loss_type={self.loss_type!r} sums token terms, which weighs each "
             f"sequence by its length: not GSPO as published (it averages per sequence: loss_type grpo or sapo)"),
            (self.delta is not None and self.loss_type in ("cispo", "sapo"),
             f"delta is the dual clip of PPO's clipped objective; {self.loss_type} has no clip to bound"),
            (self.delta is not None and not (math.isfinite(self.delta) and self.delta > 1 + self.eps_high),
             f"delta={self.delta} must be a finite number above 1 + eps_high: it caps the ratio beyond the clip"),
            (self.kl_bias_correction and self.beta == 0, "kl_bias_correction weighs the KL term, which beta=0 "
                                                         "turns off"),
            (self.baseline == "leave_one_out" and self.group_size < 2,
             "a leave-one-out baseline needs groups of 2 or more"),
            (min(self.sapo_tau_pos, self.sapo_tau_neg) <= 0, "sapo's temperatures must be positive")]
        for refused, reason in refusals:
            if refused:
                raise ValueError(reason)
        if self.minibatch_size is not None and (self.minibatch_size < 1 or self.minibatch_size % self.group_size):
            raise ValueError(f"minibatch_size={self.minibatch_size} must be a positive multiple of group_size="
                             f"{self.group_size}: minibatches hold whole groups (each prompt runs once per group)")
        if self.reward_weights is not None:
            self.reward_weights = tuple(self.reward_weights)  # config.json holds a list
            if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w)
                       for w in self.reward_weights):
                raise ValueError(f"reward_weights must be finite numbers, got {self.reward_weights}")


def check_knobs(config):
    """Each field within what its knob accepts: one of its choices, or a finite number at least its low. (A
    negative clip range, for one, would zero half the gradients.)"""
    for f in fields(config):
        value, low, choices = getattr(config, f.name), f.metadata.get("low"), f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise ValueError(f"{f.name}={value!r} is not one of {', '.join(choices)}")
        if low is not None and not (math.isfinite(value) and value >= low):
            raise ValueError(f"{f.name} must be {'at least' if f.type is int else 'a finite number >='} {low}, "
                             f"got {value}")


# ----------------------------------------------------------------------------------------------------------------
# The formulas: tensors in, tensors out


def group_advantages(rewards, group_size, scale="group", eps=1e-6, baseline="group_mean"):
    """A_i = (r_i - mean of its group) / (std + eps), for all groups at once. rewards (N,) are ordered group by
    group (rows i*G .. i*G+G-1 share a prompt). Bessel-corrected std, as torch.std, TRL and verl. With
    baseline="leave_one_out" (RLOO, Ahmadian et al. 2024) the baseline is the mean of the group's other rewards,
    which makes A_i = G / (G - 1) times the group-mean advantage.

    A group whose rewards are all equal gets exactly 0, never NaN, for any value and every scale. That needs
    saying: in float32, x - mean(x) of a constant group is not 0 for most x (eight copies of 2/3 leave 6e-8),
    and dividing by std + eps = 1e-6 would turn that residue into an advantage of 0.06 on every row."""
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)  # (P, G)
    if baseline == "group_mean":
        base = grouped.mean(1, keepdim=True)
    else:  # "leave_one_out"
        base = (grouped.sum(1, keepdim=True) - grouped) / (group_size - 1)
    centred = torch.where(has_spread(rewards, group_size)[:, None], grouped - base, 0.0)
    if scale == "group":
        std = grouped.std(1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped[:, :1])
        centred = centred / (std + eps)
    elif scale == "batch":
        std = rewards.std() if rewards.numel() > 1 else torch.zeros((), device=rewards.device)
        centred = centred / (std + eps)
    elif scale != "none":
        raise ValueError(f"scale={scale!r} is not one of {', '.join(SCALES)}")
    return centred.view(-1)


def has_spread(rewards, group_size):
    """(P,) bool: the group's rewards are not all equal, so its advantages are not all 0. Compared exactly
    (max > min): a std computed in float32 is not 0 for most constant groups."""
    grouped = rewards.view(-1, group_size)
    return grouped.amax(1) > grouped.amin(1)


def normalized_sum(table, weights, group_size, eps=1e-6):
    """GDPO's reward (arXiv 2601.05242): each reward function's column normalized within its group (mean 0, std
    1, a flat column 0), then the weighted sum. table (N, F) -> (N,). The paper then scales the advantages by the
    batch's std (--scale_rewards=batch)."""
    columns = [group_advantages(column, group_size, "group", eps) for column in table.T]
    return torch.stack(columns, 1) @ torch.tensor(weights, dtype=table.dtype, device=table.device)


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


def loss_normalizer(mask, loss_type, max_completion_len):
    """What the summed objective is divided by: the number of sequences (grpo and sapo, each first averaged over
    its own tokens), of tokens (dapo, cispo), or sequences x max_completion_len (dr_grpo: a constant, so no
    length bias)."""
    if loss_type in ("grpo", "sapo"):
        return mask.size(0)
    if loss_type in ("dapo", "cispo"):
        return mask.sum().item()
    return mask.size(0) * max_completion_len  # "dr_grpo"


def grpo_loss(logp, old_logp, advantages, mask, ref_logp=None, *, eps_low=0.2, eps_high=0.2, beta=0.0,
              loss_type="grpo", importance_level="token", max_completion_len=None, normalizer=None, delta=None,
              sapo_tau_pos=1.0, sapo_tau_neg=1.05, sampler_logp=None, is_correction="none", is_cap=2.0,
              kl_bias_correction=False, entropy=None, entropy_coef=0.0):
    """The GRPO surrogate, to minimize. logp, old_logp, ref_logp, sampler_logp, mask, entropy: (N, T);
    advantages: (N,). Returns (loss, stats); stats are detached floats for logging. normalizer: what the summed
    objective is divided by (loss_normalizer); None counts these rows, with max_completion_len defaulting to T.
    grpo_step passes the whole rollout's count per optimizer step, so that every sequence, or every token, weighs
    the same however the batch is split into minibatches and processes. The per-token objectives:

        grpo, dapo, dr_grpo   min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)   PPO's clip; with delta, rho is
                                                                                  also capped at delta (dual clip)
        cispo                 sg(min(rho, 1 + eps_high)) A log pi                  MiniMax-M1 (arXiv 2506.13585);
                                                                                  TRL's epsilon_high is the cap
        sapo                  (4 / tau) sigmoid(tau (rho - 1)) A                   SAPO (arXiv 2511.20347): tau_pos
                                                                                  where A > 0, tau_neg where A < 0

    then times the sampler correction w = pi_old / pi_sampler (is_correction: per token, or per sequence as the
    product of its tokens' ratios; truncated at is_cap, or zero outside [1/is_cap, is_cap], as TRL's modes), minus
    beta times the k3 KL (kl_bias_correction: times rho, live, as TRL), plus entropy_coef times the token's
    entropy (averaged as the objective is, by loss_type)."""
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp, the log-probs of the reference model")
    for name, value, valid in (("loss_type", loss_type, LOSS_TYPES), ("is_correction", is_correction,
                                                                      IS_CORRECTIONS),
                               ("importance_level", importance_level, IMPORTANCE_LEVELS)):
        if value not in valid:
            raise ValueError(f"{name}={value!r} is not one of {', '.join(valid)}")
    if normalizer is None:
        normalizer = max(loss_normalizer(mask, loss_type, max_completion_len or mask.size(1)), 1)
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
    if loss_type == "cispo":  # the IS weight clipped and detached: no token's gradient is dropped
        objective = torch.clamp(ratio, max=1 + eps_high).detach() * A * logp
    elif loss_type == "sapo":  # a soft gate in place of the clip, with the same gradient at rho = 1
        tau = torch.full_like(A, sapo_tau_neg).masked_fill(A > 0, sapo_tau_pos)  # A's dtype, not the default
        objective = 4 / tau * torch.sigmoid(tau * (ratio - 1)) * A
    else:
        unclipped = (ratio if delta is None else torch.clamp(ratio, max=delta)) * A
        clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * A
        objective = torch.minimum(unclipped, clipped)  # (N, T)
    if is_correction != "none":
        objective = objective * sampler_weight(old_logp, sampler_logp, keep, is_correction, is_cap)
    kl = None
    if beta > 0:
        kl = kl_k3(logp, ref_logp)  # 0 on padding, where both are 0
        objective = objective - beta * (kl * ratio if kl_bias_correction else kl)
    if entropy_coef > 0:
        objective = objective + entropy_coef * torch.where(keep, entropy, 0.0)
    objective = torch.where(keep, objective, 0.0)
    if loss_type in ("grpo", "sapo"):  # DeepSeekMath: mean over each sequence's tokens, then over sequences
        summed = (objective.sum(1) / lengths.clamp(min=1)).sum()
    else:  # "dapo", "cispo", "dr_grpo": every token weighs the same; only the normalizer differs
        summed = objective.sum()
    loss = -summed / normalizer

    with torch.no_grad():
        n_tokens = mask.sum().clamp(min=1)
        clips = loss_type not in ("cispo", "sapo")  # cispo caps the weight from above only; sapo has no clip
        low = (ratio < 1 - eps_low) & (A < 0) & keep & clips  # where the min takes the clipped branch
        high = (ratio > 1 + eps_high) & (A > 0) & keep & (loss_type != "sapo")
        dual = (ratio > delta) & (A < 0) & keep if delta is not None else torch.zeros_like(keep)
        stats = {
            "clip_low_frac": (low.sum() / n_tokens).item(),
            "clip_high_frac": (high.sum() / n_tokens).item(),
            "dual_clip_frac": (dual.sum() / n_tokens).item(),
            "ratio_mean": (torch.where(keep, ratio, 0.0).sum() / n_tokens).item(),
            "ratio_max": torch.where(keep, ratio, 0.0).max().item() if keep.any() else 1.0,
            "kl": (kl.sum() / n_tokens).item() if kl is not None else 0.0,
        }
    return loss, stats


def sampler_weight(old_logp, sampler_logp, keep, mode, cap):
    """w = pi_old / pi_sampler per token, or per sequence (the product over its tokens); truncated at cap, or 0
    outside [1/cap, cap] (a mask that also keeps w where it is inside): (N, T) or (N, 1), without gradient."""
    if sampler_logp is None:
        raise ValueError(f"is_correction={mode!r} needs the sampler's own log-probs (sampler_logp)")
    log_w = torch.where(keep, old_logp - sampler_logp, 0.0).detach()
    if mode.startswith("sequence"):
        log_w = log_w.sum(1, keepdim=True)
    w = log_w.exp()
    if mode.endswith("truncate"):
        return w.clamp(max=cap)
    return torch.where((w >= 1 / cap) & (w <= cap), w, 0.0)


# ----------------------------------------------------------------------------------------------------------------
# One whole GRPO iteration

def grpo_step(policy, optimizer, prompts, examples, reward_fns, config, *, reference=None, generator=None,
              decode=None, refill=None, autocast=None):
    """One GRPO iteration: rollout -> advantages -> old and reference log-probs -> num_iterations passes of
    clipped-loss updates. Returns a dict of metrics (floats), the same keys on every step.

    policy: the GPT (under torch.distributed, wrapped in DistributedDataParallel). prompts: token lists; examples:
    one per prompt, for `reward(completion_text, example)`; decode: tokens -> text; refill(n) -> (prompts,
    examples) for dynamic sampling; reference: the KL term's frozen model (a LoRA policy's: its own base)."""
    model = policy.module if isinstance(policy, DistributedDataParallel) else policy  # the GPT itself
    check_step_arguments(policy, model, prompts, examples, config, reference)
    autocast = autocast or nullcontext()  # e.g. torch.autocast("cuda", dtype=torch.bfloat16)
    t0 = time.perf_counter()

    # 1. Rollout: a group of completions per prompt from the current policy (= pi_old), and their rewards.
    model.eval()
    with autocast:
        samples, rewards, total, table = rollout(model, prompts, examples, reward_fns, config, generator, decode)
        metrics = rollout_metrics(samples, rewards, total, table, reward_fns, config)
        if config.dynamic_sampling:  # DAPO: keep only groups with reward spread, sample more to fill up
            samples, rewards, metrics["sampling_rounds"] = keep_groups_with_spread(
                samples, rewards, len(prompts), model, reward_fns, config, generator, decode, refill)
    t1 = time.perf_counter()
    metrics["groups_learned"] = len(rewards) / config.group_size  # fewer if sampling ran out of rounds
    if len(rewards) == 0:  # no group had any reward spread, on any process: nothing to learn from this batch
        return {**metrics, **update_metrics([]), "skipped": 1.0, "time_sample_s": t1 - t0, "time_learn_s": 0.0}

    # 2. Advantages, one per completion, broadcast over its tokens inside the loss.
    advantages = group_advantages(rewards, config.group_size, config.scale_rewards, config.adv_eps,
                                  config.baseline)
    minibatches = torch.arange(len(rewards), device=rewards.device).split(config.minibatch_size or len(rewards))

    # 3. pi_old's log-probs (only when the policy moves between minibatches of one pass) and the reference's
    #    (only with a KL term), computed once, without gradients.
    with torch.no_grad(), autocast:
        old_logp = ref_logp = None
        if len(minibatches) > 1:
            old_logp = torch.cat([logprobs(model, samples, rows, config)[0] for rows in minibatches])
        if config.beta > 0:
            with adapters_off(model) if reference is None else nullcontext():  # a LoRA policy's base
                frozen = reference or model
                ref_logp = torch.cat([logprobs(frozen, samples, rows, config)[0] for rows in minibatches])

    # 4. num_iterations passes of clipped-ratio updates over minibatches of the rollout.
    model.train()
    history = update_passes(policy, optimizer, samples, advantages, old_logp, ref_logp, minibatches, config,
                            autocast)
    times = {"time_sample_s": t1 - t0, "time_learn_s": time.perf_counter() - t1}
    return {**metrics, **update_metrics(history), "skipped": 0.0, **times}


def rollout(model, prompts, examples, reward_fns, config, generator, decode):
    """Sample a group per prompt and score it: (samples, what the advantages are computed from (N,), the weighted
    reward total (N,), per-function rewards (N, F)). The first two are the same numbers unless GDPO's
    normalize_then_sum makes the first a sum of per-reward group scores; the logs report the second."""
    samples = sample(model, prompts, max_new_tokens=config.max_new_tokens, group_size=config.group_size,
                     temperature=config.temperature, stop_token=config.stop_token, pad_token=config.pad_token,
                     generator=generator)
    row_examples = [ex for ex in examples for _ in range(config.group_size)]
    decode = decode or (lambda tokens: tokens)
    texts = [decode(tokens) for tokens in samples.completion_tokens(config.stop_token)]
    total, table = score(texts, row_examples, reward_fns, config.reward_weights)
    learned = total
    if config.reward_normalization == "normalize_then_sum":  # GDPO: each reward within its group, then the sum
        learned = normalized_sum(torch.tensor(table, dtype=torch.float64), config.reward_weights or
                                 [1.0] * len(reward_fns), config.group_size, config.adv_eps).tolist()
    total, learned = (torch.tensor(v, dtype=torch.float32, device=samples.tokens.device) for v in (total, learned))
    if config.overlong_buffer > 0:
        penalty = overlong_penalty(samples.completion_mask.sum(1), config.max_new_tokens, config.overlong_buffer)
        total, learned = total + penalty, learned + penalty
    return samples, learned, total, torch.tensor(table, dtype=torch.float32)


def logprobs(model, samples, rows, config, with_entropy=False):
    """(log-probs, entropies or None) of the rollout's completions in `rows` under `model` (the policy, its DDP
    wrapper, or the reference), at the sampling temperature."""
    return model(samples.tokens[rows], valid=samples.valid[rows], logprobs_from=samples.prompt_len,
                 temperature=config.temperature, group_size=config.group_size, with_entropy=with_entropy,
                 chunk_size=config.logprob_chunk)


def update_passes(policy, optimizer, samples, advantages, old_logp, ref_logp, minibatches, config, autocast):
    """num_iterations passes over the minibatches, one optimizer step each. Returns each step's stats."""
    mask = samples.completion_mask
    if config.mask_truncated:  # DAPO: a completion cut off by the length cap says nothing about its reward
        mask = mask * (~samples.truncated).float()[:, None]
    # The whole rollout's count, every process's, shared by the steps of a pass and the processes (DDP then
    # averages over processes): the mean gradient of a pass's steps is the gradient of one step over everything.
    count = all_reduce(loss_normalizer(mask, config.loss_type, config.max_new_tokens))
    normalizer = max(count, 1.0) / (len(minibatches) * world_size())
    history, sampler = [], samples.sampler_logp
    for _ in range(config.num_iterations):
        for rows in minibatches:
            with autocast:
                logp, entropy = logprobs(policy, samples, rows, config, with_entropy=True)
            if old_logp is None:  # one minibatch, first pass: the weights have not moved, this IS pi_old
                old_logp = logp.detach()  # rho == 1 exactly now; later passes divide by these same numbers
            loss, stats = grpo_loss(logp, old_logp[rows], advantages[rows], mask[rows],
                                    ref_logp[rows] if ref_logp is not None else None,
                                    eps_low=config.eps_low, eps_high=config.eps_high, beta=config.beta,
                                    loss_type=config.loss_type, importance_level=config.importance_level,
                                    max_completion_len=config.max_new_tokens, normalizer=normalizer,
                                    delta=config.delta, sapo_tau_pos=config.sapo_tau_pos,
                                    sapo_tau_neg=config.sapo_tau_neg, is_correction=config.is_correction,
                                    sampler_logp=sampler[rows] if sampler is not None else None,
                                    is_cap=config.is_cap, kl_bias_correction=config.kl_bias_correction,
                                    entropy=entropy, entropy_coef=config.entropy_coef)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the GRPO loss is {loss.item()}; stats {stats}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # under DistributedDataParallel this also averages the gradients across processes
            max_norm = config.max_grad_norm or math.inf  # 0: no clipping, the norm only
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), max_norm).item()
            optimizer.step()
            keep = mask[rows] > 0
            stats.update(loss=loss.item(), grad_norm=grad_norm,
                         entropy=entropy[keep].mean().item() if keep.any() else 0.0,
                         sampler_kl=sampler_kl(old_logp[rows], sampler[rows], keep) if sampler is not None
                         else 0.0)
            history.append(stats)
    return history


def sampler_kl(old_logp, sampler_logp, keep):
    """How far the sampler's own log-probs are from pi_old's: the mean over tokens of w - log w - 1, w = pi_old /
    pi_sampler, an estimate of KL(sampler || pi_old) from the sampler's tokens. About 0 in float32 on a CPU (the
    same weights, the same arithmetic up to rounding); not 0 where a bf16 or another engine samples."""
    log_w = (old_logp - sampler_logp)[keep].double()
    return (log_w.exp() - log_w - 1).mean().item() if keep.any() else 0.0


def check_step_arguments(policy, model, prompts, examples, config, reference):
    if config.beta > 0 and reference is None and not model.config.lora_rank:
        raise ValueError("beta > 0 needs a reference model (a frozen copy of the starting policy), unless the "
                         "policy has LoRA adapters (its reference is then itself with the adapters off)")
    if reference is model:
        raise ValueError("the KL reference must be a frozen model, not the policy being trained (a LoRA policy "
                         "needs none: its reference is itself with the adapters off)")
    if len(prompts) != len(examples):
        raise ValueError(f"{len(prompts)} prompts but {len(examples)} examples")
    if world_size() > 1 and policy is model:
        raise ValueError("under torch.distributed pass the policy wrapped in DistributedDataParallel, built once "
                         "per set of trainable parameters: it averages the gradients across processes")


# ----------------------------------------------------------------------------------------------------------------
# Metrics. Under torch.distributed the rollout's figures are over every process's rollout.


def rollout_metrics(samples, rewards, total, table, reward_fns, config):
    """The rollout's figures: the reward (the weighted total), the share of groups whose advantages are all 0
    (no spread in what they are computed from), lengths, and each reward function's mean."""
    everything = torch.cat([total[:, None], rewards[:, None], table.to(rewards.device)], 1)  # (N, 2 + F)
    if world_size() > 1:  # every process's rollout: (N * world, 2 + F)
        parts = [torch.empty_like(everything) for _ in range(world_size())]
        dist.all_gather(parts, everything)
        everything = torch.cat(parts)
    metrics = {"reward_mean": everything[:, 0].mean().item(),
               "reward_std": everything[:, 0].std().item() if len(everything) > 1 else 0.0,
               "zero_std_frac": 1.0 - has_spread(everything[:, 1], config.group_size).float().mean().item(),
               "completion_len": samples.completion_mask.sum(1).mean().item(),
               "truncated_frac": samples.truncated.float().mean().item(),
               "sampling_rounds": 1.0}
    weights = config.reward_weights or [1.0] * len(reward_fns)
    for j, (fn, weight, column) in enumerate(zip(reward_fns, weights, everything[:, 2:].T)):
        if weight != 0:  # a reward weighted 0 was not computed
            metrics[f"reward_{getattr(fn, '__name__', f'reward{j}')}"] = column.mean().item()
    return metrics


UPDATE_KEYS = ("clip_low_frac", "clip_high_frac", "dual_clip_frac", "ratio_mean", "ratio_max", "kl", "loss",
               "grad_norm", "entropy", "sampler_kl")


def update_metrics(history):
    """The update passes' figures: means over the optimizer steps (ratio_max: the max). A skipped step (no
    optimizer step) reports zeros and a ratio of 1, so every step's record has the same keys."""
    if not history:
        return {**{key: 0.0 for key in UPDATE_KEYS}, "ratio_mean": 1.0, "ratio_max": 1.0, "optimizer_steps": 0.0}
    metrics = {key: sum(h[key] for h in history) / len(history) for key in UPDATE_KEYS}
    metrics.update(ratio_max=max(h["ratio_max"] for h in history), optimizer_steps=float(len(history)))
    return metrics


# ----------------------------------------------------------------------------------------------------------------
# DAPO's dynamic sampling


def keep_groups_with_spread(samples, rewards, wanted, model, reward_fns, config, generator, decode, refill):
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
        parts.append(samples.select(rows))
        kept.append(rewards[rows])
        have = sum(len(r) for r in kept) // G
        if rounds >= config.max_sampling_rounds or refill is None or all_reduce(have, "min") >= wanted:
            break
        rounds += 1
        if have < wanted:  # most of the missing groups may come out flat again: refill_factor samples extra
            prompts, examples = refill(math.ceil(config.refill_factor * (wanted - have)))
            samples, rewards, _, _ = rollout(model, prompts, examples, reward_fns, config, generator, decode)
        else:  # this process is full; it only joins the others' decision
            samples, rewards = samples.select(torch.zeros_like(rows)), rewards[:0]
    keep = int(all_reduce(min(have, wanted), "min"))
    samples, rewards = Samples.cat(parts), torch.cat(kept)
    rows = torch.arange(len(rewards), device=rewards.device) < keep * G  # the first `keep` groups
    return samples.select(rows), rewards[rows], float(rounds)


# ----------------------------------------------------------------------------------------------------------------
# Across processes. Each process samples its own prompts and DistributedDataParallel averages the gradients; the
# algorithm reduces only what every process must agree on: the loss normalizer's count and dynamic sampling's
# decisions (all_reduce), and the logged reward figures (rollout_metrics gathers every process's rewards).


def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce(value, op="sum"):
    """A number reduced over every process (the same number on all of them): a count or a decision."""
    if world_size() == 1:
        return value
    t = torch.tensor(float(value), dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN}[op])
    return t.item()
