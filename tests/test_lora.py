"""LoRA adapters on model.py's GPT: what a fresh adapter changes (nothing), what trains (only the adapter),
merging, the adapter-off reference, and the errors that name what is wrong."""

import pytest
import torch

import grpo
from tests.helpers import tiny_gpt
from checkpoint import load_state_dict_checked
from model import GPT, Linear, adapters_off, add_lora, merge_lora
from tests.reference import sample_without_cache


def tokens(seed=0, shape=(3, 10)):
    return torch.randint(0, 50, shape, generator=torch.Generator().manual_seed(seed))


def test_a_fresh_adapter_leaves_the_logits_unchanged_and_only_adapters_get_gradients():
    model = tiny_gpt()
    x = tokens()
    before, _ = model(x)
    add_lora(model, rank=4, alpha=8, mlp=True)
    after, loss = model(x, tokens(1))
    assert torch.equal(before, after)  # B starts at zero
    loss.backward()
    for name, p in model.named_parameters():
        if ".lora_" in name:
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name
    adapted = {n.rsplit(".", 1)[0] for n, _ in model.named_parameters() if ".lora_" in n}
    assert len(adapted) == 2 * 4  # c_attn, c_proj, c_fc, mlp.c_proj in each of the 2 blocks


def trained_adapter(mlp=False, seed=0):
    model = tiny_gpt(seed=seed)
    add_lora(model, rank=3, alpha=6, mlp=mlp)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.3)  # as if trained: the adapter now changes the function
    return model


@pytest.mark.parametrize("mlp", [False, True])
def test_merged_and_unmerged_adapters_compute_the_same_logits(mlp):
    model = trained_adapter(mlp)
    x = tokens()
    unmerged, _ = model(x)
    base = tiny_gpt()  # the same seed: the base weights before the adapter
    assert not torch.allclose(unmerged, base(x)[0], atol=1e-6)  # the adapter does change the function
    merged, _ = merge_lora(model)(x)
    assert torch.allclose(merged, unmerged, atol=1e-10)
    assert model.config.lora_rank == 0 and not any(".lora_" in n for n, _ in model.named_parameters())


def test_the_adapter_off_reference_is_the_base_model_and_by_hand():
    model = trained_adapter(mlp=True)
    base = tiny_gpt()
    x = tokens()
    with adapters_off(model):
        off, _ = model(x)
    assert torch.equal(off, base(x)[0])
    on, _ = model(x)
    assert not torch.allclose(on, off)  # and the adapters are back on after the block
    # one adapted layer by hand: y = x W^T + b + (alpha / r) x A^T B^T
    layer = model.transformer.h[0].attn.c_attn
    v = torch.randn(5, layer.in_features, dtype=torch.float64)
    want = v @ layer.weight.T + layer.bias + 2.0 * (v @ layer.lora_A.T @ layer.lora_B.T)
    assert torch.allclose(layer(v), want)


def test_kv_cache_sampling_uses_the_adapter():
    from model import sample
    model = trained_adapter()
    a = sample(model, [[1, 2, 3]], max_new_tokens=6, group_size=4, generator=torch.Generator().manual_seed(0))
    b = sample_without_cache(model, [[1, 2, 3]], max_new_tokens=6, group_size=4,
                             generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.tokens, b.tokens)


@pytest.mark.parametrize("rank", [0, -1, 33])
def test_bad_ranks_are_clear_errors(rank):
    with pytest.raises(ValueError, match=f"lora_rank={rank} must be between 1 and the layer width n_embd=32"):
        add_lora(tiny_gpt(), rank)


def test_checkpoints_with_and_without_adapters_say_what_differs():
    with_adapter, plain = trained_adapter(), tiny_gpt()
    with pytest.raises(ValueError, match="the checkpoint has LoRA adapters the model lacks"):
        load_state_dict_checked(plain, with_adapter.state_dict(), source="ckpt.pt")
    with pytest.raises(ValueError, match="the model has LoRA adapters the checkpoint lacks"):
        load_state_dict_checked(trained_adapter(), plain.state_dict(), source="ckpt.pt")
    rebuilt = GPT(with_adapter.config).double()  # the config records the adapter: the same model comes back
    load_state_dict_checked(rebuilt, with_adapter.state_dict())
    assert torch.equal(rebuilt(tokens())[0], with_adapter(tokens())[0])
    assert isinstance(rebuilt.transformer.h[0].attn.c_attn, Linear)


def test_grpo_step_with_a_lora_policy_uses_the_adapter_off_model_as_reference():
    policy = trained_adapter()
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    frozen_before = {n: p.clone() for n, p in policy.named_parameters() if ".lora_" not in n}
    config = grpo.GRPOConfig(group_size=4, max_new_tokens=5, beta=0.1, num_iterations=2)

    def reward(completion, example):
        return float(completion.count(7))
    g = torch.Generator().manual_seed(0)
    metrics = grpo.grpo_step(policy, optimizer, [[1, 2], [3, 4, 5]], [None, None], [reward], config, generator=g)
    assert metrics["kl"] > 0  # the trained adapter makes the policy differ from its base
    for n, p in policy.named_parameters():
        if ".lora_" not in n:
            assert torch.equal(p, frozen_before[n]), n  # the base never moves
    plain = tiny_gpt()
    with pytest.raises(ValueError, match="beta > 0 needs a reference model .* unless the policy has LoRA"):
        grpo.grpo_step(plain, optimizer, [[1, 2]], [None], [reward], config)  # no adapters: no base to compare
    with pytest.raises(ValueError, match="must be a frozen model, not the policy"):
        grpo.grpo_step(policy, optimizer, [[1, 2]], [None], [reward], config, reference=policy)
