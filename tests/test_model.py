import json
import os

import pytest
import torch

from checkpoint import load_state_dict_checked
from hf import load_gpt2
from model import KVCache, ChunkedLogprob, pad_left, sample
from tests.reference import read_safetensors, sample_without_cache
from tests.helpers import PROMPTS, gpt2_like_head, tiny_gpt, write_hf_checkpoint, write_safetensors



def test_forward_always_returns_full_logits_and_loss():
    model = tiny_gpt()
    idx = torch.randint(0, 50, (3, 7))
    logits, loss = model(idx)
    assert logits.shape == (3, 7, 50) and loss is None
    logits2, loss = model(idx, targets=idx)
    assert logits2.shape == (3, 7, 50) and loss.ndim == 0
    ref = torch.nn.functional.cross_entropy(logits2.reshape(-1, 50), idx.reshape(-1))
    torch.testing.assert_close(loss, ref)


def test_forward_takes_non_contiguous_targets():
    model = tiny_gpt()
    idx = torch.randint(0, 50, (3, 8))
    _, loss = model(idx[:, :-1], targets=idx[:, 1:])  # the usual shift: a non-contiguous view
    _, same = model(idx[:, :-1], targets=idx[:, 1:].contiguous())
    assert torch.equal(loss, same)


def test_left_padded_row_computes_what_it_computes_alone():
    model = tiny_gpt()
    tokens, valid = pad_left([[1, 2], [9, 9, 9, 9, 3]], pad_token=0, device="cpu")
    padded, _ = model(tokens, valid=valid)
    alone, _ = model(torch.tensor([[1, 2]]))
    torch.testing.assert_close(padded[0, -2:], alone[0], rtol=0, atol=1e-12)


def test_prefill_then_decode_with_cache_matches_full_forward():
    model = tiny_gpt()
    idx = torch.randint(0, 50, (2, 12))
    full, _ = model(idx)
    cache = KVCache(model.config.n_layer, 12)
    parts = [model(idx[:, :5], cache=cache)[0], model(idx[:, 5:8], cache=cache)[0]]
    parts += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(8, 12)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=1e-12)


@pytest.mark.parametrize("options", [dict(), dict(top_k=5), dict(top_p=0.8), dict(temperature=0.7),
                                     dict(temperature=0), dict(top_k=3, top_p=0.5, temperature=1.3)])
def test_kv_cache_sampling_draws_exactly_the_no_cache_tokens(options):
    model = tiny_gpt()
    runs = [sampler(model, PROMPTS, max_new_tokens=20, group_size=3, stop_token=7, pad_token=0,
                    generator=torch.Generator().manual_seed(1), **options)
            for sampler in (sample, sample_without_cache)]
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    assert torch.equal(runs[0].completion_mask, runs[1].completion_mask)
    assert torch.equal(runs[0].truncated, runs[1].truncated)


def test_every_row_of_a_group_draws_its_own_first_token():
    model = tiny_gpt()
    s = sample(model, [[1, 2, 3]], max_new_tokens=1, group_size=64, generator=torch.Generator().manual_seed(0))
    assert s.completion.shape == (64, 1)
    assert len(set(s.completion[:, 0].tolist())) > 10  # a shared first token would give exactly 1


def test_stop_token_ends_a_row_and_masks_everything_after_it():
    model = tiny_gpt()
    stop = 7
    s = sample(model, PROMPTS, max_new_tokens=30, group_size=8, stop_token=stop, pad_token=0,
               generator=torch.Generator().manual_seed(3))
    stopped = 0
    for row, mask, truncated in zip(s.completion, s.completion_mask, s.truncated):
        hits = (row == stop).nonzero()
        if truncated:
            assert len(hits) == 0 and mask.all()
        else:
            stopped += 1
            first = hits[0].item()
            assert mask[:first + 1].all() and not mask[first + 1:].any()  # the stop token itself counts
            assert (row[first + 1:] == 0).all()
    assert stopped > 0
    for row, mask, kept in zip(s.completion.tolist(), s.completion_mask.tolist(), s.completion_tokens(stop)):
        assert kept == [t for t, m in zip(row, mask) if m][:len(kept)] and stop not in kept
        assert len(kept) == sum(mask) - (stop in row)


def test_greedy_sampling_is_the_argmax_of_the_forward_pass():
    model = tiny_gpt()
    s = sample(model, [[1, 2, 3]], max_new_tokens=5, temperature=0)
    logits, _ = model(s.tokens)
    torch.testing.assert_close(s.completion, logits[:, s.prompt_len - 1:-1].argmax(-1))


def test_top_k_one_is_greedy():
    model = tiny_gpt()
    greedy = sample(model, PROMPTS, max_new_tokens=6, temperature=0)
    top1 = sample(model, PROMPTS, max_new_tokens=6, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy.tokens, top1.tokens)


def naive_logprobs(model, tokens, start, valid, temperature):
    logits, _ = model(tokens, valid=valid)
    logp = (logits[:, start - 1:-1].float() / temperature).log_softmax(-1)
    return logp.gather(2, tokens[:, start:, None]).squeeze(2), -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
def test_chunked_logprobs_match_naive_values_and_gradients(chunk_size):
    model = tiny_gpt(dtype=torch.float32)
    s = sample(model, PROMPTS, max_new_tokens=9, group_size=2, generator=torch.Generator().manual_seed(0))
    weights = torch.randn(s.completion.shape)
    results = []
    for chunked in (True, False):
        model.zero_grad()
        if chunked:
            logp, entropy = model.logprobs(s.tokens, s.prompt_len, valid=s.valid, temperature=0.7,
                                           chunk_size=chunk_size, with_entropy=True)
        else:
            logp, entropy = naive_logprobs(model, s.tokens, s.prompt_len, s.valid, 0.7)
        (logp * weights).sum().backward()
        results.append((logp.detach(), entropy.detach(), [p.grad.clone() for p in model.parameters()]))
    (lp1, ent1, g1), (lp2, ent2, g2) = results
    without_entropy, none = model.logprobs(s.tokens, s.prompt_len, valid=s.valid, temperature=0.7,
                                           chunk_size=chunk_size)
    assert none is None and torch.equal(without_entropy.detach(), lp1)  # no entropy pass: the same log-probs
    torch.testing.assert_close(lp1, lp2, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent1, ent2, rtol=0, atol=1e-5)
    for a, b in zip(g1, g2):  # float32 sums in another order: agreement to a few ulps of the largest entry
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


def test_chunked_logprob_gradient_under_bf16_autocast_is_no_worse_than_a_plain_log_softmax():
    # The CUDA default (--dtype=auto) runs the learning pass under bf16 autocast. The chunked backward recomputes
    # the logits; if forward and backward computed them differently (bf16 once, float32 the other time), the
    # softmax in the gradient would not sum to 1 and the parameter gradient would be off by tens of percent.
    h, weight, target = gpt2_like_head()
    logits = h.double() @ weight.double().t()
    assert -110 < logits.mean() < -70  # the regime the test is about
    weights = torch.randn(len(target), generator=torch.Generator().manual_seed(1)).double()

    def grads(fn, dtype, autocast):
        hh, ww = (t.to(dtype, copy=True).requires_grad_() for t in (h, weight))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logp = fn(hh, ww)
        (logp.double() * weights).sum().backward()
        return logp.detach().double(), hh.grad.double(), ww.grad.double()

    def plain(hh, ww):
        return (hh @ ww.t()).float().log_softmax(-1).gather(1, target[:, None]).squeeze(1)

    def chunked(hh, ww):
        return ChunkedLogprob.apply(hh, ww, target, 1.0, 32, False)[0]

    truth = grads(plain, torch.float64, autocast=False)
    errors = {}
    for name, fn in (("plain", plain), ("chunked", chunked)):
        got = grads(fn, torch.float32, autocast=True)
        errors[name] = [((a - b).norm() / b.norm()).item() for a, b in zip(got, truth)]
    # log-probs, the gradient of the hidden states, the gradient of the embedding matrix
    for what, chunked_error, plain_error in zip(("logp", "grad h", "grad W"), errors["chunked"], errors["plain"]):
        assert chunked_error <= plain_error, (what, errors)
    assert max(errors["chunked"]) < 1e-4, errors  # float32 throughout: far better than bf16, in fact


@pytest.mark.parametrize("prompts", [PROMPTS, [[1, 2, 3], [4, 5, 6]]], ids=["left-padded", "same-length"])
def test_group_shared_prompt_gives_the_plain_values_and_gradients(prompts):
    # Each prompt runs once per group (grouped_hidden_states); the naive full pass over every row is the check.
    model = tiny_gpt()
    s = sample(model, prompts, max_new_tokens=6, group_size=3, generator=torch.Generator().manual_seed(1))
    weights = torch.randn(s.completion.shape, dtype=torch.float64)
    results = []
    for group_size in (3, 1):
        model.zero_grad()
        logp, _ = model.logprobs(s.tokens, s.prompt_len, valid=s.valid, temperature=0.8,
                                  group_size=group_size)
        (logp * weights).sum().backward()
        results.append((logp.detach(), [p.grad.clone() for p in model.parameters()]))
    (lp_shared, g_shared), (lp_plain, g_plain) = results
    expected, _ = naive_logprobs(model, s.tokens, s.prompt_len, s.valid, 0.8)
    torch.testing.assert_close(lp_shared, expected.detach().double(), rtol=0, atol=1e-6)  # naive is float32
    torch.testing.assert_close(lp_shared, lp_plain, rtol=0, atol=1e-10)
    for a, b in zip(g_shared, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_group_shared_prompt_refuses_rows_that_do_not_share_it():
    model = tiny_gpt()
    tokens = torch.tensor([[1, 2, 3, 4, 4], [1, 2, 3, 5, 5], [1, 7, 3, 4, 4], [1, 2, 3, 4, 4]])
    model.logprobs(tokens[:2], 3, group_size=2)  # one group, one shared prompt: fine
    with pytest.raises(ValueError, match="do not share their first 3 tokens"):
        model.logprobs(tokens, 3, group_size=2)
    with pytest.raises(ValueError, match="groups of 3"):
        model.logprobs(tokens, 3, group_size=3)


def test_logprobs_score_each_token_by_the_previous_position():
    # Independent check of the shift: log p(token t) computed by running the prefix alone, one token at a time.
    model = tiny_gpt()
    tokens = torch.tensor([[5, 6, 7, 8, 9, 10]])
    logp, _ = model.logprobs(tokens, start=2)
    for t in range(2, 6):
        logits, _ = model(tokens[:, :t])
        expected = logits[0, -1].log_softmax(-1)[tokens[0, t]]
        torch.testing.assert_close(logp[0, t - 2], expected, rtol=0, atol=1e-10)


def test_bf16_autocast_paths_run_and_stay_close():
    model = tiny_gpt(dtype=torch.float32)
    s = sample(model, PROMPTS, max_new_tokens=6, group_size=2, generator=torch.Generator().manual_seed(0))
    exact, _ = model.logprobs(s.tokens, s.prompt_len, valid=s.valid)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, _ = model.logprobs(s.tokens, s.prompt_len, valid=s.valid)
        sample(model, PROMPTS, max_new_tokens=4, group_size=2, generator=torch.Generator().manual_seed(0))
    assert low.dtype == torch.float32
    assert (low - exact).abs().max() < 0.1


# ---- bad input -----------------------------------------------------------------------------------------------

def test_sampling_rejects_bad_arguments_by_name():
    model = tiny_gpt()
    with pytest.raises(ValueError, match="group_size"):
        sample(model, PROMPTS, max_new_tokens=4, group_size=0)
    with pytest.raises(ValueError, match="longer than the context"):
        sample(model, [[1] * 60], max_new_tokens=10)
    with pytest.raises(ValueError, match="stop_token 50 is outside the vocabulary"):
        sample(model, PROMPTS, max_new_tokens=4, stop_token=50)
    with pytest.raises(ValueError, match="at least one token"):
        sample(model, [[1], []], max_new_tokens=4)
    with pytest.raises(ValueError, match="longer than the context"):
        model(torch.zeros(1, 65, dtype=torch.long))


# ---- loading GPT-2 checkpoints in the Hugging Face layout ----------------------------------------------------

@pytest.mark.parametrize("kind,prefix", [("safetensors", "transformer."), ("safetensors", ""), ("bin", ""),
                                         ("bin", "transformer.")])
def test_from_pretrained_reproduces_the_saved_model(tmp_path, kind, prefix):
    model = tiny_gpt(dtype=torch.float32)
    write_hf_checkpoint(model, tmp_path, kind, prefix)
    loaded = load_gpt2(str(tmp_path))
    idx = torch.randint(0, 50, (2, 10))
    torch.testing.assert_close(loaded(idx)[0], model(idx)[0], rtol=0, atol=0)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_safetensors_reader_reads_every_dtype(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.randn(2, dtype=torch.float64),
               "c": torch.randn(5).to(torch.bfloat16), "d": torch.randn(2, 2).half(), "e": torch.zeros(0)}
    write_safetensors(tmp_path / "x.safetensors", tensors)
    back = read_safetensors(tmp_path / "x.safetensors")
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)


def test_from_pretrained_matches_transformers_when_installed(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny_gpt(dtype=torch.float32)
    write_hf_checkpoint(model, tmp_path)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
    ours = load_gpt2(str(tmp_path))
    idx = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], theirs(idx).logits, rtol=1e-4, atol=1e-4)


def test_from_pretrained_errors_name_the_problem(tmp_path):
    model = tiny_gpt(dtype=torch.float32)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_gpt2(str(tmp_path))
    write_hf_checkpoint(model, tmp_path)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors nor pytorch_model.bin"):
        load_gpt2(str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type is 'llama'"):
        load_gpt2(str(tmp_path))
    # a config that says 3 layers while the weights have 2, and a tensor of the wrong shape
    write_hf_checkpoint(model, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "n_layer": 3}))
    with pytest.raises(ValueError, match="missing transformer.h.2"):
        load_gpt2(str(tmp_path))
    state = model.state_dict()
    state["transformer.wpe.weight"] = torch.zeros(10, 32)
    with pytest.raises(ValueError, match=r"transformer.wpe.weight: checkpoint \(10, 32\) vs model \(64, 32\)"):
        load_state_dict_checked(model, state)
