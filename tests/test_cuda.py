"""The CUDA paths, run by .ci/gpu on a GPU machine; skipped where there is no CUDA device."""

import pytest
import torch

import grpo
import train
from model import ChunkedLogprob, sample
from tests.reference import sample_without_cache
from tests.helpers import tiny_gpt
from tests.helpers import PROMPTS, TINY, gpt2_like_head

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_kv_cache_sampling_draws_exactly_the_no_cache_tokens_on_cuda():
    model = tiny_gpt(dtype=torch.float32).cuda()
    runs = [sampler(model, PROMPTS, max_new_tokens=20, group_size=3, stop_token=7, temperature=0.9,
                    generator=torch.Generator("cuda").manual_seed(1))
            for sampler in (sample, sample_without_cache)]
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    assert torch.equal(runs[0].completion_mask, runs[1].completion_mask)


def test_chunked_logprob_gradient_under_bf16_autocast_on_cuda():
    h, weight, target = gpt2_like_head()
    truth_h, truth_w = h.double().requires_grad_(), weight.double().requires_grad_()
    (truth_h @ truth_w.t()).log_softmax(-1).gather(1, target[:, None]).sum().backward()
    hh, ww = h.cuda().requires_grad_(), weight.cuda().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ChunkedLogprob.apply(hh, ww, target.cuda(), 1.0, 32, False)[0].sum().backward()
    for got, want in ((hh.grad, truth_h.grad), (ww.grad, truth_w.grad)):
        error = ((got.double().cpu() - want).norm() / want.norm()).item()
        assert error < 1e-2, error  # float32 logits (TF32 matmuls at most), not bf16 ones


def test_one_grpo_step_on_cuda_under_bf16_autocast():
    model = tiny_gpt(seed=1, dtype=torch.float32).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    config = grpo.GRPOConfig(group_size=8, max_new_tokens=8, num_iterations=2, beta=0.0)

    def reward(completion, example):
        return sum(t == 3 for t in completion) / max(1, len(completion))

    before = [p.detach().clone() for p in model.parameters()]
    metrics = grpo.grpo_step(model, optimizer, [[1, 2, 3], [4, 5]], [None, None], [reward], config,
                             generator=torch.Generator("cuda").manual_seed(0),
                             autocast=torch.autocast("cuda", dtype=torch.bfloat16))
    assert metrics["optimizer_steps"] == 2 and all(v == v for v in metrics.values())  # no NaN
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_train_runs_on_cuda_with_bf16_and_compile(tmp_path):
    out = tmp_path / "run"
    train.main(TINY + [f"--out_dir={out}", "--device=cuda", "--dtype=bfloat16", "--compile", "--grpo_steps=3",
                       "--reference_players=false"])
    assert (out / "eval.json").exists()
