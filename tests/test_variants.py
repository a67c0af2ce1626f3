"""The second generation of GRPO variants (CISPO, SAPO, dual clip, sampler correction, bias-corrected KL, entropy
bonus, leave-one-out baseline, per-reward normalization), each against the formula written out one row and one
token at a time in float64, value and gradient, with padding that holds garbage; and the sampler's own log-probs
against the learner's."""

import math

import pytest
import torch

import grpo
from grpo import GRPOConfig, group_advantages, grpo_loss, normalized_sum
from model import sample
from tests.helpers import PROMPTS, tiny_gpt
from tests.reference import sample_without_cache


def batch(N=6, T=7, seed=0, spread=0.8):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(N, T, generator=g, dtype=torch.float64) * 3
    old = logp + (torch.rand(N, T, generator=g, dtype=torch.float64) - 0.5) * spread
    ref = logp + (torch.rand(N, T, generator=g, dtype=torch.float64) - 0.5) * spread
    sampler = old + (torch.rand(N, T, generator=g, dtype=torch.float64) - 0.5) * 0.6
    entropy = torch.rand(N, T, generator=g, dtype=torch.float64) * 2
    A = torch.randn(N, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (N,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).double()
    return dict(logp=logp, old=old, ref=ref, sampler=sampler, entropy=entropy, A=A, mask=mask)


def reference_loss(b, loss_type="grpo", importance_level="token", eps_low=0.2, eps_high=0.2, beta=0.0, delta=None,
                   tau_pos=1.0, tau_neg=1.05, is_correction="none", is_cap=2.0, kl_bias_correction=False,
                   entropy_coef=0.0, max_len=10):
    """The published formulas, one token at a time, on 0-dim tensors so that autograd gives the gradient."""
    logp, old, ref, sampler, entropy, A, mask = (b[k] for k in ("logp", "old", "ref", "sampler", "entropy", "A",
                                                                "mask"))
    N = logp.size(0)
    per_sequence, total, tokens = [], 0.0, 0
    for i in range(N):
        L = int(mask[i].sum())
        a = float(A[i])
        seq_log_ratio = sum(logp[i, t] - old[i, t] for t in range(L)) / L
        seq_log_w = sum(float(old[i, t] - sampler[i, t]) for t in range(L))
        seq = 0.0
        for t in range(L):
            rho = torch.exp(seq_log_ratio if importance_level == "sequence" else logp[i, t] - old[i, t])
            if loss_type == "cispo":
                term = min(rho.item(), 1 + eps_high) * a * logp[i, t]  # a constant weight
            elif loss_type == "sapo":
                tau = tau_pos if a > 0 else tau_neg
                term = 4 / tau * torch.sigmoid(tau * (rho - 1)) * a
            else:
                capped = rho if delta is None else torch.clamp(rho, max=delta)
                term = torch.minimum(capped * a, torch.clamp(rho, 1 - eps_low, 1 + eps_high) * a)
            if is_correction != "none":
                log_w = seq_log_w if is_correction.startswith("sequence") else float(old[i, t] - sampler[i, t])
                w = math.exp(log_w)
                if is_correction.endswith("truncate"):
                    w = min(w, is_cap)
                elif not 1 / is_cap <= w <= is_cap:
                    w = 0.0
                term = term * w
            if beta > 0:
                d = ref[i, t] - logp[i, t]
                k3 = torch.exp(d) - d - 1
                term = term - beta * (k3 * rho if kl_bias_correction else k3)
            term = term + entropy_coef * entropy[i, t]
            seq = seq + term
        per_sequence.append(seq / L)
        total, tokens = total + seq, tokens + L
    if loss_type in ("grpo", "sapo"):
        return -sum(per_sequence) / N
    if loss_type in ("dapo", "cispo"):
        return -total / tokens
    return -total / (N * max_len)


CASES = [
    dict(loss_type="cispo", eps_high=0.25), dict(loss_type="cispo", eps_high=4.0),
    dict(loss_type="sapo"), dict(loss_type="sapo", tau_pos=0.5, tau_neg=2.0),
    dict(loss_type="sapo", importance_level="sequence"), dict(loss_type="grpo", importance_level="sequence"),
    dict(loss_type="grpo", delta=1.3), dict(loss_type="dapo", delta=1.3), dict(loss_type="dr_grpo", delta=1.5),
    dict(is_correction="token_truncate", is_cap=1.1), dict(is_correction="token_mask", is_cap=1.1),
    dict(is_correction="sequence_truncate", is_cap=1.5), dict(is_correction="sequence_mask", is_cap=1.5),
    dict(loss_type="dapo", is_correction="token_mask", is_cap=1.2),
    dict(beta=0.04, kl_bias_correction=True), dict(loss_type="dapo", beta=0.1, kl_bias_correction=True),
    dict(entropy_coef=0.01), dict(loss_type="dapo", entropy_coef=0.05), dict(loss_type="sapo", entropy_coef=0.05),
    dict(loss_type="cispo", beta=0.04, kl_bias_correction=True, is_correction="token_truncate", entropy_coef=0.01),
]


def run_loss(b, garbage=False, **kw):
    """grpo_loss on the batch (garbage in the padding if asked); returns (loss, d loss / d logp, d loss / d H)."""
    logp, entropy = b["logp"].clone(), b["entropy"].clone()
    old, ref, sampler = b["old"].clone(), b["ref"].clone(), b["sampler"].clone()
    if garbage:
        pad = b["mask"] == 0
        logp[pad], entropy[pad], old[pad], ref[pad], sampler[pad] = 40.0, float("nan"), float("-inf"), \
            float("nan"), float("inf")
    logp.requires_grad_(True)
    entropy.requires_grad_(True)
    names = dict(tau_pos="sapo_tau_pos", tau_neg="sapo_tau_neg")
    loss, _ = grpo_loss(logp, old, b["A"], b["mask"], ref, sampler_logp=sampler, entropy=entropy,
                        max_completion_len=10, **{names.get(k, k): v for k, v in kw.items()})
    loss.backward()
    entropy_grad = entropy.grad if entropy.grad is not None else torch.zeros_like(entropy)  # unused: no gradient
    return loss.detach(), logp.grad * b["mask"], entropy_grad * b["mask"]


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_every_variant_matches_its_formula_token_by_token_value_and_gradient(case):
    b = batch()
    loss, grad_logp, grad_entropy = run_loss(b, **case)
    ref = {k: v.clone().requires_grad_(k in ("logp", "entropy")) for k, v in b.items()}
    expected = reference_loss(ref, **case)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10, abs=1e-12)
    torch.testing.assert_close(grad_logp, ref["logp"].grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad_entropy, ref["entropy"].grad, rtol=1e-9, atol=1e-12)
    garbage = run_loss(b, garbage=True, **case)  # padding may hold anything: nothing changes
    assert garbage[0].item() == loss.item() and torch.equal(garbage[1], grad_logp)


def test_each_variant_changes_the_loss_it_claims_to():
    """A variant that silently did nothing would pass the formula test only if the formula were the plain one."""
    b = batch()
    plain = run_loss(b)[0].item()
    for case in CASES:
        assert run_loss(b, **case)[0].item() != plain, case
    # and the defaults of every new knob are the plain loss, to the last digit
    defaults = dict(delta=None, sapo_tau_pos=1.0, sapo_tau_neg=1.05, is_correction="none", is_cap=2.0,
                    kl_bias_correction=False, entropy_coef=0.0)
    assert run_loss(b, **defaults)[0].item() == plain


def test_cispo_keeps_the_gradient_of_every_token_that_the_clip_drops():
    logp = torch.tensor([[math.log(1.5), math.log(0.5)]], dtype=torch.float64, requires_grad=True)
    old, mask = torch.zeros(1, 2, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64)
    A = torch.ones(1, dtype=torch.float64)
    grpo_loss(logp, old, A, mask)[0].backward()
    assert logp.grad[0, 0] == 0  # PPO's clip: rho = 1.5 > 1.2 with A > 0, no gradient
    logp.grad = None
    grpo_loss(logp, old, A, mask, loss_type="cispo", eps_high=0.2)[0].backward()
    assert logp.grad[0, 0] != 0 and logp.grad[0, 0] == pytest.approx(-1.2 / 2)  # the capped weight, token mean


def test_sapo_has_the_clipped_losss_gradient_at_ratio_one():
    b = batch()
    b["old"] = b["logp"].clone()  # rho = 1 exactly
    _, g_clip, _ = run_loss(b)
    _, g_sapo, _ = run_loss(b, loss_type="sapo")
    torch.testing.assert_close(g_sapo, g_clip, rtol=1e-12, atol=1e-15)


def loop_leave_one_out(rewards, G):
    out = []
    for start in range(0, len(rewards), G):
        group = rewards[start:start + G].tolist()
        spread = max(group) > min(group)
        out += [(x - (sum(group) - x) / (G - 1)) if spread else 0.0 for x in group]
    return torch.tensor(out, dtype=rewards.dtype)


@pytest.mark.parametrize("G", [2, 4, 8])
def test_leave_one_out_baseline_is_the_mean_of_the_others(G):
    rewards = torch.rand(5 * G, dtype=torch.float64, generator=torch.Generator().manual_seed(G))
    rewards[:G] = 2 / 3  # a flat group
    got = group_advantages(rewards, G, scale="none", baseline="leave_one_out")
    torch.testing.assert_close(got, loop_leave_one_out(rewards, G), rtol=1e-12, atol=1e-15)
    assert torch.equal(got[:G], torch.zeros(G))
    scaled = group_advantages(rewards, G, baseline="leave_one_out")  # with std scaling: G / (G - 1) x the plain
    torch.testing.assert_close(scaled, group_advantages(rewards, G) * G / (G - 1), rtol=1e-12, atol=1e-15)
    flat32 = torch.full((4 * G,), 2 / 3, dtype=torch.float32)
    assert torch.equal(group_advantages(flat32, G, baseline="leave_one_out"), torch.zeros(4 * G))


def test_per_reward_normalization_normalizes_each_column_within_its_group_then_sums():
    G, g = 4, torch.Generator().manual_seed(0)
    table = torch.rand(3 * G, 3, dtype=torch.float64, generator=g) * torch.tensor([1.0, 100.0, 0.01])
    table[:G, 1] = 7.0  # one column flat in one group: it contributes 0 there
    weights = [1.0, 0.5, 2.0]
    expected = torch.zeros(3 * G, dtype=torch.float64)
    for start in range(0, 3 * G, G):
        for j, w in enumerate(weights):
            col = table[start:start + G, j].tolist()
            mean = sum(col) / G
            std = math.sqrt(sum((x - mean) ** 2 for x in col) / (G - 1))
            for k, x in enumerate(col):
                expected[start + k] += w * ((x - mean) / (std + 1e-6) if max(col) > min(col) else 0.0)
    torch.testing.assert_close(normalized_sum(table, weights, G), expected, rtol=1e-12, atol=1e-12)


def test_normalize_then_sum_gives_each_reward_the_same_say_in_a_step():
    """Two rewards on very different scales: summed first, the large one decides the advantage; normalized first,
    the small one counts as much."""
    def big(completion, example):
        return 100.0 * (len(completion) > 0 and completion[0] % 2)

    def small(completion, example):
        return 0.01 * (len(completion) > 1 and completion[1] % 2)

    totals = {}
    for mode in ("sum_then_normalize", "normalize_then_sum"):
        config = GRPOConfig(group_size=8, max_new_tokens=3, beta=0.0, reward_normalization=mode)
        model = tiny_gpt(dtype=torch.float32)
        _, totals[mode], _, table = grpo.rollout(model, [[1, 2]], [None], [big, small], config,
                                              torch.Generator().manual_seed(0), None)
    small_part = table[:, 1] - table[:, 1].mean()
    corr = {m: torch.corrcoef(torch.stack([t, small_part]))[0, 1].item() for m, t in totals.items()}
    assert corr["normalize_then_sum"] > corr["sum_then_normalize"] + 0.2, corr


def test_normalize_then_sum_changes_what_is_learned_not_the_reward_the_logs_report():
    """GDPO learns from per-reward group scores (mean 0), but the step still reports the task's reward: the same
    figures as the default's on the same rollout (the first step samples before any update)."""
    def length(completion, example):
        return float(len(completion))

    def odd_first(completion, example):
        return float(len(completion) > 0 and completion[0] % 2)

    metrics = {}
    for mode in ("sum_then_normalize", "normalize_then_sum"):
        config = GRPOConfig(group_size=8, max_new_tokens=5, beta=0.0, stop_token=7, reward_normalization=mode)
        model = tiny_gpt(seed=2, dtype=torch.float32)
        metrics[mode] = grpo.grpo_step(model, torch.optim.SGD(model.parameters(), lr=1e-2), [[1, 2], [3, 4]],
                                       [None, None], [length, odd_first], config,
                                       generator=torch.Generator().manual_seed(0))
    default, gdpo = metrics["sum_then_normalize"], metrics["normalize_then_sum"]
    assert default["reward_mean"] > 1.0  # lengths of 1 to 5 and a 0/1 reward: far from GDPO's mean of 0
    for key in ("reward_mean", "reward_std", "reward_length", "reward_odd_first", "completion_len"):
        assert gdpo[key] == default[key], key


@pytest.mark.parametrize("cached", [True, False])
def test_the_samplers_log_probs_are_the_learners_in_float32(cached):
    model = tiny_gpt(seed=3, dtype=torch.float32)
    sampler = sample if cached else sample_without_cache
    s = sampler(model, PROMPTS, max_new_tokens=12, group_size=4, temperature=0.8, stop_token=7,
                generator=torch.Generator().manual_seed(0))
    learner, _ = model.logprobs(s.tokens, s.prompt_len, valid=s.valid, temperature=0.8)
    keep = s.completion_mask > 0
    assert keep.sum() > 20 and torch.equal(s.sampler_logp[~keep], torch.zeros_like(s.sampler_logp[~keep]))
    torch.testing.assert_close(s.sampler_logp[keep], learner.detach()[keep], rtol=0, atol=2e-6)
    assert grpo.sampler_kl(learner.detach(), s.sampler_logp, keep) < 1e-10


def test_a_grpo_step_logs_the_sampler_mismatch_and_corrects_with_weights_of_one():
    model = tiny_gpt(seed=1, dtype=torch.float32)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)

    def reward(completion, example):
        return float(len(completion) > 0 and completion[0] % 2)

    for mode in ("none", "token_truncate", "sequence_mask"):
        config = GRPOConfig(group_size=8, max_new_tokens=6, beta=0.0, num_iterations=1, is_correction=mode)
        m = grpo.grpo_step(model, optimizer, [[1, 2], [3, 4]], [None, None], [reward], config,
                           generator=torch.Generator().manual_seed(0))
        assert 0 <= m["sampler_kl"] < 1e-10 and m["optimizer_steps"] == 1


def test_the_entropy_bonus_moves_the_weights_by_the_entropys_gradient():
    """d loss / d theta with entropy_coef c is the plain loss's gradient minus c times the gradient of the mean
    token entropy, computed here from a naive log-softmax: the bonus changes the update, not only the value."""
    model = tiny_gpt(seed=2)
    s = sample(model, PROMPTS[:2], max_new_tokens=6, group_size=4, generator=torch.Generator().manual_seed(0))
    A = torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    mask = s.completion_mask.double()

    def grads(coef):
        model.zero_grad()
        logp, entropy = model.logprobs(s.tokens, s.prompt_len, valid=s.valid, with_entropy=True)
        grpo_loss(logp, logp.detach(), A, mask, loss_type="dapo", entropy=entropy, entropy_coef=coef)[0].backward()
        return [p.grad.clone() for p in model.parameters()]

    plain, bonus = grads(0.0), grads(0.3)
    model.zero_grad()
    logits, _ = model(s.tokens, valid=s.valid)
    log_p = logits[:, s.prompt_len - 1:-1].log_softmax(-1)
    naive_entropy = -(log_p.exp() * log_p).sum(-1)
    ((naive_entropy * mask).sum() / mask.sum()).backward()
    for a, b, h in zip(bonus, plain, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(a, b - 0.3 * h, rtol=1e-8, atol=1e-10)
    assert any(not torch.equal(a, b) for a, b in zip(bonus, plain))


@pytest.mark.parametrize("kwargs,message", [
    (dict(importance_level="sequence", loss_type="dapo"), "not GSPO as published"),
    (dict(importance_level="sequence", loss_type="cispo"), "weighs each sequence by its length"),
    (dict(delta=3.0, loss_type="sapo"), "sapo has no clip to bound"),
    (dict(delta=1.1), "must be a finite number above 1 \\+ eps_high"),
    (dict(kl_bias_correction=True, beta=0.0), "which beta=0 turns off"),
    (dict(baseline="leave_one_out", group_size=1), "needs groups of 2 or more"),
    (dict(is_correction="token"), "is_correction='token' is not one of none, token_truncate"),
    (dict(is_cap=0.5), "is_cap must be a finite number >= 1"),
    (dict(sapo_tau_neg=0.0), "sapo's temperatures must be positive"),
    (dict(entropy_coef=-0.1), "entropy_coef must be a finite number >= 0"),
])
def test_combinations_that_mean_nothing_are_refused_with_the_reason(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GRPOConfig(**kwargs)


def test_an_is_correction_without_the_samplers_log_probs_is_an_error_naming_them():
    b = batch()
    with pytest.raises(ValueError, match="needs the sampler's own log-probs"):
        grpo_loss(b["logp"], b["old"], b["A"], b["mask"], is_correction="token_truncate")
