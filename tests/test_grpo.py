import math

import pytest
import torch

import grpo
from grpo import GRPOConfig, grpo_loss, grpo_step, group_advantages, kl_k3, overlong_penalty
from model import GPT, sample
from rewards import score
from tests.helpers import tiny_gpt

# ---- advantages ----------------------------------------------------------------------------------------------


def loop_advantages(rewards, G, scale, eps):
    """Reference: one group at a time, with Python's statistics."""
    r = rewards.tolist()
    out = []
    batch_mean = sum(r) / len(r)
    batch_std = math.sqrt(sum((x - batch_mean) ** 2 for x in r) / (len(r) - 1))
    for start in range(0, len(r), G):
        group = r[start:start + G]
        mean = sum(group) / G
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / (G - 1))
        for x in group:
            if scale == "group":
                out.append((x - mean) / (std + eps))
            elif scale == "batch":
                out.append((x - mean) / (batch_std + eps))
            else:
                out.append(x - mean)
    return torch.tensor(out)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("G", [2, 4])
def test_advantages_match_a_loop_over_groups(scale, G):
    torch.manual_seed(G)
    rewards = torch.rand(6 * G, dtype=torch.float64)
    rewards[:G] = 0.5  # a zero-spread group
    got = group_advantages(rewards, G, scale=scale, eps=1e-6)
    torch.testing.assert_close(got, loop_advantages(rewards, G, scale, 1e-6).to(got.dtype))


def test_zero_spread_group_gets_exactly_zero_not_nan():
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    A = group_advantages(rewards, 4)
    assert torch.equal(A[:4], torch.zeros(4)) and torch.isfinite(A).all()
    assert torch.equal(group_advantages(torch.ones(4), 1), torch.zeros(4))  # groups of one: no spread


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("G", [1, 2, 3, 8, 16])
def test_constant_groups_get_exactly_zero_in_float32_for_any_value(scale, G):
    # In float32, x - mean(x) of a constant group is not 0 for most x (2/3 with G = 8 leaves ~6e-8), and the
    # division by std + eps then blows that residue up to a visible advantage. 2,000 constants, some of them the
    # project's own reward values (addition's digit credit 1/3 and 2/3, Countdown's 0.1).
    g = torch.Generator().manual_seed(G)
    values = torch.cat([torch.tensor([1 / 3, 2 / 3, 0.1, 0.9, 0.7, 1e6 / 3]),
                        torch.randint(0, 10_000, (2_000,), generator=g) / 100]).float()
    rewards = values.repeat_interleave(G)  # one constant group per value
    A = group_advantages(rewards, G, scale=scale)
    assert A.dtype == torch.float32 and torch.equal(A, torch.zeros_like(A))
    assert not grpo.has_spread(rewards, G).any()
    mixed = rewards.clone()
    if G > 1:
        mixed[::G] += 0.5  # now every group has spread: nothing is zeroed that should not be
        assert grpo.has_spread(mixed, G).all() and (group_advantages(mixed, G, scale=scale)[::G] > 0).all()


def test_group_std_is_bessel_corrected():
    A = group_advantages(torch.tensor([0.0, 1.0]), 2, eps=0.0)
    torch.testing.assert_close(A, torch.tensor([-1.0, 1.0]) / math.sqrt(2))  # std of {0, 1} is 1/sqrt(2)


def test_advantage_errors_name_the_problem():
    with pytest.raises(ValueError, match="do not split into groups of 3"):
        group_advantages(torch.zeros(8), 3)
    with pytest.raises(ValueError, match="scale='rank' is not one of group, batch, none"):
        group_advantages(torch.zeros(8), 4, scale="rank")


# ---- the clipped loss ------------------------------------------------------------------------------------------


def random_batch(N=6, T=7, seed=0, spread=0.5):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(N, T, generator=g, dtype=torch.float64) * 3
    old = logp + (torch.rand(N, T, generator=g, dtype=torch.float64) - 0.5) * spread
    ref = logp + (torch.rand(N, T, generator=g, dtype=torch.float64) - 0.5) * spread
    A = torch.randn(N, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (N,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).double()
    return logp, old, A, mask, ref


def loop_loss(logp, old, A, mask, ref, eps_low, eps_high, beta, loss_type, importance_level, max_len):
    """Reference: the formulas of grpo.py's docstring, one token at a time."""
    N, T = logp.shape
    total, per_seq, n_tok = 0.0, [], 0
    for i in range(N):
        L = int(mask[i].sum())
        if importance_level == "sequence":
            s = math.exp(sum(float(logp[i, t] - old[i, t]) for t in range(L)) / L)
        seq_sum = 0.0
        for t in range(L):
            rho = s if importance_level == "sequence" else math.exp(float(logp[i, t] - old[i, t]))
            a = float(A[i])
            term = min(rho * a, min(max(rho, 1 - eps_low), 1 + eps_high) * a)
            if beta > 0:
                d = float(ref[i, t] - logp[i, t])
                term -= beta * (math.exp(d) - d - 1)
            seq_sum += term
        per_seq.append(seq_sum / L)
        total += seq_sum
        n_tok += L
    if loss_type == "grpo":
        return -sum(per_seq) / N
    if loss_type == "dapo":
        return -total / n_tok
    return -total / (N * max_len)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("importance_level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_matches_a_double_loop(loss_type, importance_level, beta):
    logp, old, A, mask, ref = random_batch()
    eps = (0.2, 0.28) if importance_level == "token" else (3e-4, 4e-4)
    loss, _ = grpo_loss(logp, old, A, mask, ref, eps_low=eps[0], eps_high=eps[1], beta=beta, loss_type=loss_type,
                        importance_level=importance_level, max_completion_len=10)
    expected = loop_loss(logp, old, A, mask, ref, eps[0], eps[1], beta, loss_type, importance_level, 10)
    assert loss.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_k3_is_nonnegative_and_zero_when_policies_agree():
    x = torch.randn(1000, dtype=torch.float64) * 3
    y = torch.randn(1000, dtype=torch.float64) * 3
    assert (kl_k3(x, y) >= 0).all()
    assert torch.equal(kl_k3(x, x), torch.zeros_like(x))


def test_k3_mean_estimates_the_true_kl():
    # Samples from p; E_p[k3] = KL(p || q) for the categorical distributions p, q.
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    draws = torch.multinomial(p, 200_000, replacement=True, generator=g)
    estimate = kl_k3(p.log()[draws], q.log()[draws]).mean()
    assert estimate.item() == pytest.approx((p * (p / q).log()).sum().item(), rel=0.02)


def test_at_ratio_one_the_gradient_is_reinforce_with_the_group_baseline():
    model = tiny_gpt()
    s = sample(model, [[1, 2, 3], [4, 5]], max_new_tokens=6, group_size=4, stop_token=7,
               generator=torch.Generator().manual_seed(0))
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.2, 0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    A = group_advantages(rewards, 4)
    mask = s.completion_mask.double()

    model.zero_grad()
    logp, _ = model.logprobs(s.tokens, s.prompt_len, valid=s.valid)
    loss, stats = grpo_loss(logp, logp.detach(), A, mask)
    loss.backward()
    ours = [p.grad.clone() for p in model.parameters()]
    assert stats["clip_low_frac"] == stats["clip_high_frac"] == 0 and stats["ratio_mean"] == 1

    model.zero_grad()
    logp, _ = model.logprobs(s.tokens, s.prompt_len, valid=s.valid)
    reinforce = -sum(A[i] * (logp[i] * mask[i]).sum() / mask[i].sum() for i in range(len(A))) / len(A)
    reinforce.backward()
    for a, b in zip(ours, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_tokens_on_the_clipped_side_get_zero_gradient_and_the_others_do_not():
    old = torch.zeros(1, 4, dtype=torch.float64)
    #                  rho > 1.2       rho < 0.8        rho > 1.2       rho < 0.8
    logp = torch.tensor([[math.log(1.5), math.log(0.5), math.log(1.5), math.log(0.5)]], dtype=torch.float64,
                        requires_grad=True)
    mask = torch.ones(1, 4, dtype=torch.float64)
    for A, clipped in ((1.0, [True, False, True, False]), (-1.0, [False, True, False, True])):
        logp.grad = None
        loss, stats = grpo_loss(logp, old, torch.tensor([A], dtype=torch.float64), mask)
        loss.backward()
        assert [g == 0 for g in logp.grad[0].tolist()] == clipped
        assert stats["clip_high_frac" if A > 0 else "clip_low_frac"] == 0.5


def test_clip_edges_are_inclusive_of_the_unclipped_value():
    # At rho exactly 1 + eps_high the clipped and unclipped branches agree, so the gradient is still there.
    logp = torch.tensor([[math.log(1.2)]], dtype=torch.float64, requires_grad=True)
    loss, stats = grpo_loss(logp, torch.zeros(1, 1, dtype=torch.float64), torch.ones(1, dtype=torch.float64),
                            torch.ones(1, 1, dtype=torch.float64))
    loss.backward()
    assert logp.grad.item() == pytest.approx(-1.2) and stats["clip_high_frac"] == 0


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("importance_level", ["token", "sequence"])
def test_masked_padding_changes_nothing_value_or_gradient(loss_type, importance_level):
    logp, old, A, mask, ref = random_batch(spread=0.1)
    results = []
    for garbage in (False, True):
        lp, o, r = logp.clone(), old.clone(), ref.clone()
        if garbage:
            pad = mask == 0
            lp[pad], o[pad], r[pad] = 50.0, float("-inf"), float("nan")
        lp.requires_grad_(True)
        loss, _ = grpo_loss(lp, o, A, mask, r, beta=0.04, loss_type=loss_type, importance_level=importance_level)
        loss.backward()
        results.append((loss.item(), lp.grad * mask))
    assert results[0][0] == results[1][0]
    assert torch.equal(results[0][1], results[1][1])


def test_loss_value_is_about_zero_at_ratio_one_with_centred_advantages():
    logp, _, _, mask, _ = random_batch()
    mask = torch.ones_like(mask)  # equal lengths, so per-sequence means of centred advantages cancel
    A = group_advantages(torch.rand(6, dtype=torch.float64), 3)
    loss, _ = grpo_loss(logp, logp, A, mask)
    assert abs(loss.item()) < 1e-9


def test_loss_errors_name_the_problem():
    logp, old, A, mask, _ = random_batch()
    with pytest.raises(ValueError, match="loss_type='ppo' is not one of grpo, dapo, dr_grpo"):
        grpo_loss(logp, old, A, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="beta > 0 needs ref_logp"):
        grpo_loss(logp, old, A, mask, beta=0.1)
    with pytest.raises(ValueError, match="importance_level='word' is not one of token, sequence"):
        GRPOConfig(importance_level="word")


def test_overlong_penalty_is_dapos_piecewise_line():
    lengths = torch.tensor([0, 10, 12, 14, 16, 20])
    got = overlong_penalty(lengths, max_len=16, buffer=4)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, 0.0, -0.5, -1.0, -1.0]))


# ---- rewards -------------------------------------------------------------------------------------------------


def test_score_weights_and_validates_reward_functions():
    def length(c, ex):
        return float(len(c))

    def const(c, ex):
        return 2.0

    def boom(c, ex):
        raise KeyError("x")

    total, table = score(["ab", "abcd"], [None, None], [length, const], weights=(0.5, 1.0))
    assert total == [3.0, 4.0] and table == [[2.0, 2.0], [4.0, 2.0]]
    assert score(["ab"], [None], [length, boom], weights=(1.0, 0.0)) == ([2.0], [[2.0, 0.0]])  # 0: never run
    with pytest.raises(ValueError, match="the weighted reward overflows float32"):
        score(["x"], [None], [lambda c, ex: 3e38, const], weights=(1e30, 1.0))
    # the rollout's rewards: the weighted totals (learned from, and reported), and the table, in float32
    config = GRPOConfig(group_size=4, max_new_tokens=5, reward_weights=(0.5, 1.0), beta=0.0)
    _, learned, total, table = grpo.rollout(tiny_gpt(dtype=torch.float32), [[1, 2], [3]], [None, None],
                                            [length, const], config, torch.Generator().manual_seed(0), None)
    assert table.shape == (8, 2) and total.dtype == table.dtype == torch.float32
    torch.testing.assert_close(total, 0.5 * table[:, 0] + table[:, 1])
    assert torch.equal(learned, total)

    with pytest.raises(RuntimeError, match=r"reward function boom raised KeyError.*'abcd'"):
        score(["abcd"], [None], [boom])
    for bad in (float("nan"), float("inf"), "1.0", None, True):
        with pytest.raises(ValueError, match="reward function <lambda> returned"):
            score(["x"], [None], [lambda c, ex, bad=bad: bad])


# ---- grpo_step -----------------------------------------------------------------------------------------------


def share_of_token(target):
    def reward(completion, example):
        return sum(t == target for t in completion) / max(1, len(completion))
    reward.__name__ = f"share_of_{target}"
    return reward


def run_toy(steps=25, flip_sign=False, monkeypatch=None, **overrides):
    model = tiny_gpt(seed=1, dtype=torch.float32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    config = GRPOConfig(**{**dict(group_size=8, max_new_tokens=8, beta=0.0, num_iterations=1), **overrides})
    g = torch.Generator().manual_seed(0)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
    if flip_sign:
        original = grpo.grpo_loss
        monkeypatch.setattr(grpo, "grpo_loss", lambda *a, **k: (lambda out: (-out[0], out[1]))(original(*a, **k)))
    history = [grpo_step(model, optimizer, prompts, [None] * 4, [share_of_token(3)], config, generator=g)
               for _ in range(steps)]
    return history


def test_end_to_end_reward_rises_on_a_toy_task():
    history = run_toy()
    first = sum(h["reward_mean"] for h in history[:3]) / 3
    last = sum(h["reward_mean"] for h in history[-3:]) / 3
    assert first < 0.1 and last > first + 0.3, (first, last)
    assert {"reward_share_of_3", "zero_std_frac", "clip_low_frac", "clip_high_frac", "kl", "entropy",
            "completion_len", "truncated_frac", "grad_norm", "time_sample_s", "time_learn_s"} <= set(history[0])


def test_end_to_end_with_a_flipped_loss_sign_fails_to_learn(monkeypatch):
    history = run_toy(flip_sign=True, monkeypatch=monkeypatch)
    last = sum(h["reward_mean"] for h in history[-3:]) / 3
    assert last < 0.05


def test_several_inner_iterations_clip_and_stay_finite():
    history = run_toy(steps=4, num_iterations=3, minibatch_size=16, beta=0.0)
    assert all(h["optimizer_steps"] == 6 for h in history)
    assert any(h["clip_low_frac"] + h["clip_high_frac"] > 0 for h in history)  # the clip acts off-policy
    assert all(math.isfinite(h["loss"]) for h in history)


def test_two_passes_over_one_minibatch_divide_by_the_sampling_policys_logprobs():
    # With the whole rollout in one minibatch, grpo_step takes pi_old's log-probs from its own first pass. An
    # independent computation: score the rollout under the policy before any update (the plain, ungrouped pass),
    # then two Adam steps of the clipped loss against those fixed numbers. (Taking each pass's own detached
    # log-probs instead would make rho 1 in the second pass, and the clip would never act: different weights.)
    config = GRPOConfig(group_size=8, max_new_tokens=6, beta=0.0, num_iterations=2, eps_low=0.05, eps_high=0.05)
    model, twin = tiny_gpt(seed=1, dtype=torch.float64), tiny_gpt(seed=1, dtype=torch.float64)  # Adam magnifies
    # float32 rounding on weights whose gradients are near 0: float64 makes the comparison exact to 1e-9
    optimizer, twin_optimizer = (torch.optim.Adam(m.parameters(), lr=1e-2) for m in (model, twin))
    prompts, reward = [[1, 2, 3], [4, 5, 6]], share_of_token(3)
    m = grpo_step(model, optimizer, prompts, [None] * 2, [reward], config,
                  generator=torch.Generator().manual_seed(0))
    assert m["clip_low_frac"] + m["clip_high_frac"] > 0  # the second pass is off-policy and the clip acts

    s = sample(twin, prompts, max_new_tokens=6, group_size=8, generator=torch.Generator().manual_seed(0))
    r = torch.tensor([reward(c, None) for c in s.completion_tokens(None)]).view(2, 8)
    advantages = torch.where(r.std(1, keepdim=True) > 0, (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True)
                                                                                         + 1e-6), 0.0).view(-1)
    with torch.no_grad():
        old = twin.logprobs(s.tokens, s.prompt_len, valid=s.valid)[0]
    for _ in range(2):
        logp = twin.logprobs(s.tokens, s.prompt_len, valid=s.valid)[0]
        loss, _ = grpo_loss(logp, old, advantages, s.completion_mask, eps_low=0.05, eps_high=0.05)
        twin_optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(twin.parameters(), 1.0)
        twin_optimizer.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-7, atol=1e-9)


def test_kl_term_uses_the_reference_and_is_zero_at_the_start():
    model = tiny_gpt(seed=1, dtype=torch.float32)
    reference = tiny_gpt(seed=1, dtype=torch.float32).requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    config = GRPOConfig(group_size=8, max_new_tokens=6, beta=0.04, num_iterations=1)
    g = torch.Generator().manual_seed(0)

    def first_token_odd(completion, example):
        return float(completion[0] % 2)

    m1 = grpo_step(model, optimizer, [[1, 2]], [None], [first_token_odd], config, reference=reference, generator=g)
    m2 = grpo_step(model, optimizer, [[1, 2]], [None], [first_token_odd], config, reference=reference, generator=g)
    assert m1["kl"] == pytest.approx(0.0, abs=1e-7) and m2["kl"] > 0
    with pytest.raises(ValueError, match="beta > 0 needs a reference model"):
        grpo_step(model, optimizer, [[1, 2]], [None], [share_of_token(3)], config, generator=g)


def test_logprobs_use_the_sampling_temperature(monkeypatch):
    seen = []
    original = GPT.logprobs

    def spy(*args, **kwargs):
        seen.append(kwargs["temperature"])
        return original(*args, **kwargs)

    monkeypatch.setattr(GPT, "logprobs", spy)
    run_toy(steps=1, temperature=0.6, num_iterations=2)
    assert seen and set(seen) == {0.6}


def test_sampled_token_frequencies_match_logprobs_at_the_sampling_temperature():
    # Independent of grpo_step: 20,000 one-token draws at temperature 0.5 follow exp(token_logprobs at 0.5).
    model = tiny_gpt(seed=2, dtype=torch.float64)
    with torch.no_grad():
        model.transformer.wte.weight *= 3  # sharper logits, so the temperature visibly changes the distribution
    s = sample(model, [[1, 2, 3]], max_new_tokens=1, group_size=20_000, temperature=0.5,
               generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(s.completion[:, 0], minlength=50).double() / 20_000
    tokens = torch.tensor([[1, 2, 3, t] for t in range(50)])
    at = {T: model.logprobs(tokens, 3, temperature=T)[0][:, 0].exp() for T in (0.5, 1.0)}
    assert (freq - at[0.5]).abs().max() < 0.015
    assert (freq - at[1.0]).abs().max() > 0.1


def test_dynamic_sampling_refills_groups_with_spread():
    model = tiny_gpt(seed=1, dtype=torch.float32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    calls = []

    def reward(completion, example):  # prompts whose example is "flat" give every completion the same reward
        return 0.0 if example == "flat" else float(len(completion) > 0 and completion[0] % 2)

    def refill(n):
        calls.append(n)
        return [[5, 6]] * n, ["spread"] * n

    config = GRPOConfig(group_size=8, max_new_tokens=4, dynamic_sampling=True, beta=0.0, num_iterations=1)
    m = grpo_step(model, optimizer, [[1, 2], [3, 4]], ["flat", "spread"], [reward], config,
                  generator=torch.Generator().manual_seed(0), refill=refill)
    assert calls == [1] and m["sampling_rounds"] == 2 and m["zero_std_frac"] == 0.5 and m["groups_learned"] == 2
    m = grpo_step(model, optimizer, [[1, 2]], ["flat"], [reward], config,
                  generator=torch.Generator().manual_seed(0))
    assert m["skipped"] == 1.0 and m["groups_learned"] == 0
    # refill_factor: the later round samples 3 x the one missing group; the batch keeps the 2 wanted.
    calls.clear()
    config = GRPOConfig(group_size=8, max_new_tokens=4, dynamic_sampling=True, refill_factor=3.0, beta=0.0,
                        num_iterations=1)
    m = grpo_step(model, optimizer, [[1, 2], [3, 4]], ["flat", "spread"], [reward], config,
                  generator=torch.Generator().manual_seed(0), refill=refill)
    assert calls == [3] and m["sampling_rounds"] == 2 and m["groups_learned"] == 2


def test_mask_truncated_leaves_unfinished_completions_out():
    history = run_toy(steps=1, mask_truncated=True, stop_token=3, max_new_tokens=3)
    assert math.isfinite(history[0]["loss"])
