"""Data parallel equals one process: two gloo processes on the CPU, their rollouts injected so that sampling noise
does not enter. Also: how a batch is split into minibatches changes no gradient, and dynamic sampling takes the
same decisions on every process."""

import datetime
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from torch.nn.parallel import DistributedDataParallel

import grpo
from model import Samples
from tests.helpers import tiny_gpt

G, PROMPT_LEN, COMPLETION_LEN = 4, 3, 6
LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "cispo", "sapo")  # the normalizers: sequences, tokens, a constant


def handmade_rollout(lengths, seed=0):
    """Samples whose completions have the given lengths (one per row, groups of G sharing a prompt), and
    random rewards: a rollout with very different token counts per row, without sampling."""
    g = torch.Generator().manual_seed(seed)
    N = len(lengths)
    prompts = torch.randint(1, 50, (N // G, PROMPT_LEN), generator=g).repeat_interleave(G, 0)
    completion = torch.randint(1, 50, (N, COMPLETION_LEN), generator=g)
    mask = (torch.arange(COMPLETION_LEN)[None, :] < torch.tensor(lengths)[:, None]).float()
    tokens = torch.cat([prompts, completion], 1)
    samples = Samples(tokens, torch.ones_like(tokens, dtype=torch.bool), PROMPT_LEN, mask,
                      truncated=torch.tensor(lengths) == COMPLETION_LEN)
    return samples, torch.rand(N, generator=g, dtype=torch.float64).float()


# Rank 0 holds long completions, rank 1 short ones: with a per-process token mean, a short rank's token would
# weigh several times more after the processes' gradients are averaged.
LENGTHS = [6, 6, 5, 6, 6, 5, 6, 6] + [1, 1, 2, 1, 1, 1, 2, 1]


class GradientRecorder:
    """Stands in for the optimizer: keeps each step's gradients and moves nothing, so every step sees the same
    weights and the gradients of different splits can be compared."""

    def __init__(self, model):
        self.params, self.steps = list(model.parameters()), []

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None

    def step(self):
        self.steps.append([p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in self.params])

    def mean_gradient(self):
        return [sum(step[i] for step in self.steps) / len(self.steps) for i in range(len(self.params))]


def gradient_of_injected_rollout(rows, loss_type, monkeypatch_module, minibatch_size=None, ddp=False):
    """One grpo_step's mean gradient over its optimizer steps, with grpo.rollout replaced by the rows given of
    the handmade rollout."""
    samples, rewards = handmade_rollout(LENGTHS)
    sub = samples.select(rows)

    def injected(policy, prompts, examples, reward_fns, config, generator, decode):
        return sub, rewards[rows], rewards[rows], rewards[rows][:, None]

    monkeypatch_module(injected)
    model = tiny_gpt(seed=3)
    recorder = GradientRecorder(model)
    config = grpo.GRPOConfig(group_size=G, max_new_tokens=COMPLETION_LEN, loss_type=loss_type, max_grad_norm=0,
                             minibatch_size=minibatch_size, beta=0.0, num_iterations=1)
    n_prompts = int(rows.sum()) // G
    policy = DistributedDataParallel(model) if ddp else model  # as train.py wraps it under torchrun
    grpo.grpo_step(policy, recorder, [[1]] * n_prompts, [None] * n_prompts, [lambda c, e: 0.0], config)
    return recorder.mean_gradient(), len(recorder.steps)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_two_minibatches_give_the_gradient_of_one_batch(loss_type, monkeypatch):
    every_row = torch.ones(len(LENGTHS), dtype=torch.bool)

    def patch(fn):
        monkeypatch.setattr(grpo, "rollout", fn)

    whole, steps = gradient_of_injected_rollout(every_row, loss_type, patch)
    split, split_steps = gradient_of_injected_rollout(every_row, loss_type, patch, minibatch_size=8)
    assert (steps, split_steps) == (1, 2)
    for a, b in zip(split, whole):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(body):
    """body(rank) in two gloo processes; returns {rank: what it returned}."""
    port = free_port()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(rank, 2, port, results, body.__name__)) for rank in range(2)]
    for p in procs:
        p.start()
    out = {}
    for _ in procs:
        rank, value = results.get(timeout=240)
        assert not isinstance(value, str), f"rank {rank} failed:\n{value}"
        out[rank] = value
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0, f"a worker exited with {p.exitcode}"
    return out


def worker(rank, world, port, results, body):
    """A process: the named body's result, or its traceback, goes to the queue as plain data (a tensor sent
    through a queue lives in shared memory that vanishes when the worker exits)."""
    try:
        init_gloo(rank, world, port)
        results.put((rank, globals()[body](rank)))
    except Exception:
        results.put((rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def init_gloo(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))


def ddp_gradients(rank):
    half = torch.arange(len(LENGTHS)) // (len(LENGTHS) // 2) == rank  # rank 0: the long half
    grads = {}
    for loss_type in LOSS_TYPES:
        def patch(fn):
            grpo.rollout = fn
        mean, steps = gradient_of_injected_rollout(half, loss_type, patch, ddp=True)
        grads[loss_type] = ([g.numpy() for g in mean], steps)
    return grads


def test_two_gloo_processes_take_the_step_of_one_process_over_both_rollouts(monkeypatch):
    per_rank = run_two_processes(ddp_gradients)
    every_row = torch.ones(len(LENGTHS), dtype=torch.bool)

    def patch(fn):
        monkeypatch.setattr(grpo, "rollout", fn)

    for loss_type in LOSS_TYPES:
        one_process, _ = gradient_of_injected_rollout(every_row, loss_type, patch)
        for rank in (0, 1):
            grads, steps = per_rank[rank][loss_type]
            assert steps == 1
            # DDP averaged them: both ranks hold the same gradient, the union's
            for a, b in zip(map(torch.from_numpy, grads), one_process):
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=f"{loss_type}, rank {rank}")


def flat_or_spread(completion, example):
    """Prompts whose example is "flat" give every completion the same reward: a group without spread."""
    return 0.0 if example == "flat" else float(len(completion) > 0 and completion[0] % 2)


def dynamic_sampling(rank):
    model = tiny_gpt(seed=1, dtype=torch.float32)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    config = grpo.GRPOConfig(group_size=8, max_new_tokens=4, dynamic_sampling=True, max_sampling_rounds=3,
                             beta=0.0, num_iterations=1)
    policy = DistributedDataParallel(model)
    g = torch.Generator().manual_seed(rank)
    out = []
    # 1. rank 1 never finds a group with spread (its refills are flat too): every rank must skip together
    kind = "spread" if rank == 0 else "flat"
    m = grpo.grpo_step(policy, optimizer, [[1, 2], [3, 4]], [kind, kind], [flat_or_spread], config,
                       generator=g, refill=lambda n: ([[5, 6]] * n, [kind] * n))
    out.append(m)
    # 2. rank 1's first round is flat, its refill has spread: both keep the same number of groups
    m = grpo.grpo_step(policy, optimizer, [[1, 2], [3, 4]], ["spread", kind], [flat_or_spread], config,
                       generator=g, refill=lambda n: ([[5, 6]] * n, ["spread"] * n))
    out.append(m)
    import train  # train.py's cross-process metrics: the mean of each figure, the max of a *_max one
    out.append(train.average_across_ranks({"ratio_max": float(rank), "kl": float(rank)}))
    return out


def test_dynamic_sampling_takes_the_same_decisions_on_every_process():
    per_rank = run_two_processes(dynamic_sampling)
    skipped = [per_rank[r][0] for r in (0, 1)]
    assert [m["skipped"] for m in skipped] == [1.0, 1.0]  # rank 0 had spread but may not step alone
    assert skipped[0]["sampling_rounds"] == skipped[1]["sampling_rounds"] == 3
    assert set(skipped[0]) == set(skipped[1]) and "completion_len" in skipped[0]
    filled = [per_rank[r][1] for r in (0, 1)]
    assert [m["skipped"] for m in filled] == [0.0, 0.0]
    assert filled[0]["optimizer_steps"] == filled[1]["optimizer_steps"] >= 1
    assert filled[0]["sampling_rounds"] == filled[1]["sampling_rounds"] >= 2
    assert filled[0]["reward_std"] == filled[1]["reward_std"]  # over both processes' rollouts: one figure
    assert per_rank[0][2] == per_rank[1][2] == {"ratio_max": 1.0, "kl": 0.5}
