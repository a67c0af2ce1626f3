"""
Train a small GPT with GRPO, end to end: a supervised warm start on a task's demonstrations, then GRPO from
rewards alone, with held-out evaluations before, during and after.

    python train.py                                   # the default run: addition, CPU-sized
    python train.py --task=countdown --group_size 4   # any config field is a flag; --help lists them all
    python train.py --resume                          # continue a killed run from its last checkpoint
    torchrun --nproc_per_node=2 train.py              # data parallel: prompts split across processes

The run folder (--out_dir) gets config.json, metrics.jsonl (one JSON object per step and stage), eval.json
(the final table), samples.jsonl (decoded games at every evaluation) and ckpt.pt (atomic, for --resume).
"""

import dataclasses
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import grpo
from checkpoint import (CheckpointError, atomic_save, atomic_write, latest_checkpoint, load_checkpoint, load_model,
                        load_state_dict_checked, logged_eval, prepare_out_dir, read_checkpoint, run_tokenizer,
                        save_checkpoint, truncate_logs, warm_start_path)
from config import TrainConfig, check_against_checkpoint, parse_config
from data import load_task, model_player
from data.tokenizer import end_and_pad
from model import GPT, GPTConfig, add_lora, check_lora_rank, pad_left


def main(argv):
    cfg = parse_config(argv, usage=__doc__)  # every flag and combination checked: nothing is built before
    if cfg.resume and os.path.exists(os.path.join(cfg.out_dir, "eval.json")):
        print(f"{cfg.out_dir} is a finished run (its final table is in eval.json): nothing to resume")
        return None
    run = setup(cfg)
    model = new_model(run)
    state = start(run, model)  # the optimizer and random streams, or where the checkpoint left them
    evals = {}
    if state.stage == "sft":
        warm_start(run, model, state)
        evals["warm start"] = begin_grpo(run, model, state)
    else:  # resumed in stage 2: the warm start was evaluated before the run stopped
        evals["warm start"] = logged_eval(cfg.out_dir, step=0)
    if cfg.grpo_steps:  # with --grpo_steps=0 the run is the warm start, and its evaluation is the last one
        train_grpo(run, model, state)
        evals["GRPO"] = evaluate_and_log(run, model, step=cfg.grpo_steps)
    if run.rank == 0:
        final_table(run, evals)
    if dist.is_initialized():
        dist.destroy_process_group()
    return evals


@dataclass
class Run:
    """What every stage reads: the config, the processes, the device, the task and its tokenizer."""
    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    autocast: object
    dtype: str
    task: object
    enc: object
    lock: object = None   # the run folder's lock, held while the process lives
    wandb: object = None


@dataclass
class State:
    """What changes as the run goes, besides the weights: all of it is in every checkpoint."""
    optimizer: torch.optim.Optimizer
    rng: random.Random           # data: prompts and demonstrations
    generator: torch.Generator   # sampling
    stage: str = "sft"
    step: int = 0                # the next step to run


# ----------------------------------------------------------------------------------------------------------------
# Setup: processes, device, run folder, task, model, optimizer


def setup(cfg):
    """Processes (torchrun sets RANK and WORLD_SIZE: one process per device, gloo on CPU, nccl on CUDA), the
    device (auto: cuda > mps > cpu), bf16 autocast where asked (auto: on CUDA), the run folder and the task."""
    rank, world = 0, 1
    device = cfg.device if cfg.device != "auto" else \
        "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dtype = cfg.dtype if cfg.dtype != "auto" else \
        "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    autocast = nullcontext() if dtype == "float32" else torch.autocast(device.type, dtype=torch.bfloat16)
    lock = prepare_out_dir(cfg, rank)
    if dist.is_initialized():
        dist.barrier()  # rank 0 has locked, checked and prepared the run folder
    task = load_task(cfg.task)
    run = Run(cfg, rank, world, device, autocast, dtype, task, run_tokenizer(task, cfg.init_from), lock)
    if cfg.wandb and rank == 0:
        import wandb  # optional, never required
        run.wandb = wandb.init(project="nanogrpo", config=dataclasses.asdict(cfg), resume="allow")
    return run


def new_model(run):
    """The policy: new or from --init_from, on the run's device, compiled if asked."""
    cfg = run.cfg
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    if cfg.init_from == "scratch":
        model = GPT(GPTConfig(block_size=cfg.block_size, vocab_size=run.enc.n_vocab, n_layer=cfg.n_layer,
                              n_head=cfg.n_head, n_embd=cfg.n_embd))
    else:  # a checkpoint of ours (LoRA adapters merged in), or a GPT-2 directory (setup gave us its tokenizer)
        model = load_model(cfg.init_from, run.enc.n_vocab)
    if cfg.lora_rank:
        try:
            check_lora_rank(cfg.lora_rank, model.config)  # now, not after the warm start
        except ValueError as e:
            raise SystemExit(f"error: --{e}") from None
    if cfg.init_from == "scratch" and run.task.init_embeddings:
        run.task.init_embeddings(model.transformer.wte.weight, run.enc)  # a task may seed structure into tokens
    model.to(run.device)
    if cfg.compile:
        model.hidden_states = torch.compile(model.hidden_states, dynamic=True)  # state_dict keys stay unprefixed
    if run.rank == 0:
        params, embedding = model.num_params() / 1e6, model.transformer.wte.weight.numel() / 1e6
        print(f"task {cfg.task} | device {run.device} ({run.dtype}) x{run.world} | {params:.2f}M parameters + "
              f"{embedding:.2f}M embedding | vocab {run.enc.n_vocab}")
    return model


def start(run, model):
    """A new run's optimizer and random streams (each rank draws its own data), or, with --resume, the
    checkpoint's: weights, optimizer, stage, step and this rank's streams."""
    cfg = run.cfg
    state = State(make_optimizer(model, cfg.sft_lr, cfg.weight_decay), random.Random(cfg.seed + 1000 * run.rank),
                  torch.Generator(run.device).manual_seed(cfg.seed + 1000 * run.rank))
    if cfg.resume:
        ckpt, loaded_from = latest_checkpoint(cfg.out_dir)
        check_against_checkpoint(cfg, ckpt["config"])  # config.json edited by hand since?
        saved = ckpt["model_config"]
        if saved.get("lora_rank"):  # it stopped in a LoRA stage 2: the adapters come first
            add_lora(model, saved["lora_rank"], saved["lora_alpha"], saved["lora_mlp"])
            state.optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
        state.stage, state.step = load_checkpoint(ckpt, loaded_from, model, state.optimizer, state.rng,
                                                  state.generator)
        if run.rank == 0:
            truncate_logs(cfg.out_dir, state.stage, state.step)
            print(f"resumed {cfg.out_dir} at {state.stage} step {state.step}")
        state.step += 1
    return state


# ----------------------------------------------------------------------------------------------------------------
# Stage 1: supervised warm start on demonstrations (loss on completion tokens only)


def warm_start(run, model, state):
    """Stage 1: supervised learning on the task's demonstrations, the loss on completion tokens only."""
    cfg = run.cfg
    policy = data_parallel(model, run)  # under torchrun its forward averages the gradients across processes
    player = cfg.sft_player or run.task.default_player
    t0 = time.time()
    bar = tqdm(range(state.step, cfg.sft_steps), desc="warm start", disable=run.rank != 0, initial=state.step,
               total=cfg.sft_steps)
    for step in bar:
        pairs = run.task.demonstrations(cfg.sft_batch_size // run.world, state.rng, player)  # each its own share
        tokens, valid, start, mask = sft_batch(pairs, run.enc, run.device)
        lr = sft_lr(step, cfg.sft_steps, cfg.sft_lr)
        for group in state.optimizer.param_groups:
            group["lr"] = lr
        model.train()
        with run.autocast:
            logp, _ = policy(tokens, valid=valid, logprobs_from=start)  # (B, completion length)
        loss = -(logp * mask).sum() / mask.sum()
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        state.optimizer.step()
        record = average_across_ranks({"loss": loss.item(), "lr": lr})
        bar.set_postfix(loss=f"{record['loss']:.3f}")
        log(run, {"stage": "sft", "step": step, **record, "time_s": time.time() - t0})
        if (step + 1) % cfg.checkpoint_interval == 0 or step == cfg.sft_steps - 1:
            checkpoint(run, model, state, "sft", step)
    bar.close()
    state.stage, state.step = "grpo", 0


def sft_batch(pairs, enc, device):
    """Left-padded prompts then right-padded completions + <|end|>, so every completion starts in one column."""
    end, pad = end_and_pad(enc)
    prompts = [enc.encode(p, allowed_special="all") for p, _ in pairs]
    completions = [enc.encode(c) + [end] for _, c in pairs]
    prompt_tokens, prompt_valid = pad_left(prompts, pad, device)
    width = max(len(c) for c in completions)
    comp = torch.full((len(pairs), width), pad, dtype=torch.long)
    mask = torch.zeros(len(pairs), width)
    for i, c in enumerate(completions):
        comp[i, :len(c)] = torch.tensor(c)
        mask[i, :len(c)] = 1
    tokens = torch.cat([prompt_tokens, comp.to(device)], 1)
    valid = torch.cat([prompt_valid, torch.ones_like(comp, dtype=torch.bool, device=device)], 1)
    return tokens, valid, prompt_tokens.size(1), mask.to(device)


def sft_lr(step, total, peak):
    warmup = max(1, total // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def begin_grpo(run, model, state):
    """Between the stages: keep the warm-start model (the KL reference, and the comparison), evaluate it, add
    LoRA adapters if asked, and start a fresh optimizer. Returns the warm start's evaluation."""
    cfg = run.cfg
    if run.rank == 0:
        atomic_save({"model": model.state_dict(), "model_config": dataclasses.asdict(model.config)},
                    warm_start_path(cfg))
    result = evaluate_and_log(run, model, step=0)
    if cfg.lora_rank:  # from here on only the adapters train
        add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_mlp)
    # A fresh optimizer: the warm start's AdamW moments would move the weights even when every advantage is 0,
    # a push from the supervised loss, not from rewards.
    state.optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    checkpoint(run, model, state, "grpo", -1)  # so a resume from here does not redo stage 1
    return result


# ----------------------------------------------------------------------------------------------------------------
# Stage 2: GRPO from rewards alone


def train_grpo(run, model, state):
    """Stage 2: GRPO from rewards alone, one grpo.grpo_step per step, evaluations and checkpoints between."""
    cfg, task, enc = run.cfg, run.task, run.enc
    policy = data_parallel(model, run)  # after add_lora: DDP hooks the parameters that train
    reference = kl_reference(run, model)
    end, pad = end_and_pad(enc)
    knobs = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(grpo.GRPOConfig)}
    config = grpo.GRPOConfig(**{**knobs, "stop_token": end, "pad_token": pad})
    reward_fns, _ = task.reward_functions()

    # A task whose states are games in progress can have the policy play their earlier turns (Wordle: greedily,
    # as the evaluation plays, so GRPO trains on the states the model will be judged on): it takes a `policy`.
    player = model_player(model, enc, task, cfg.max_new_tokens, run.autocast)

    def draw(n):
        if task.plays_policy:
            model.eval()  # grpo_step sets train mode again for its update
            examples = task.training_examples(n, state.rng, policy=player)
        else:
            examples = task.training_examples(n, state.rng)
        return [enc.encode(task.prompt(ex), allowed_special="all") for ex in examples], examples

    t0 = time.time()
    for step in range(max(state.step, 0), cfg.grpo_steps):
        for group in state.optimizer.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / 5)
        prompts, examples = draw(cfg.prompts_per_step // run.world)
        try:
            metrics = grpo.grpo_step(policy, state.optimizer, prompts, examples, reward_fns, config,
                                     reference=reference, generator=state.generator, decode=enc.decode,
                                     refill=draw, autocast=run.autocast)
        except FloatingPointError as e:  # raised before the optimizer step: the weights are still good
            raise SystemExit(f"error: stopped at GRPO step {step}: {e}. The last good checkpoint is "
                             f"{os.path.join(cfg.out_dir, 'ckpt.pt')}") from None
        m = average_across_ranks(metrics)
        log(run, {"stage": "grpo", "step": step, **m, "time_s": time.time() - t0}, step_line(step, m))
        if (step + 1) % cfg.eval_interval == 0 and step + 1 < cfg.grpo_steps:
            evaluate_and_log(run, model, step=step + 1)
        if (step + 1) % cfg.checkpoint_interval == 0 or step == cfg.grpo_steps - 1:
            checkpoint(run, model, state, "grpo", step)


def kl_reference(run, model):
    """The KL term's reference: the frozen warm-start model; none at beta = 0 (no second model exists at all) or
    for a LoRA policy, whose reference is its own base (grpo_step turns its adapters off)."""
    cfg = run.cfg
    if cfg.beta == 0 or cfg.lora_rank:
        return None
    reference = GPT(model.config).to(run.device).eval().requires_grad_(False)
    try:
        load_state_dict_checked(reference, read_checkpoint(warm_start_path(cfg))["model"],
                                source=warm_start_path(cfg))
    except CheckpointError as e:
        raise SystemExit(f"error: the KL reference: {e}") from None
    return reference


def step_line(step, m):
    return (f"step {step:4d} | reward {m['reward_mean']:.3f} ± {m['reward_std']:.3f} | "
            f"zero-std {m['zero_std_frac']:.2f} | clip {m['clip_low_frac'] + m['clip_high_frac']:.3f} | "
            f"kl {m['kl']:.4f} | ent {m['entropy']:.2f} | len {m['completion_len']:.1f} | "
            f"{m['time_sample_s'] + m['time_learn_s']:.2f} s")


# ----------------------------------------------------------------------------------------------------------------
# Evaluation: the model as a task player (greedy, as it will be used), and the final table


def evaluate_model(model, enc, task, cfg, autocast):
    """Held-out evaluation, greedy and sampled at temperature 1. GRPO optimizes the sampled policy, and the
    two can move differently (a flat distribution's argmax is fragile): both are reported. The sampled pass
    has its own fixed-seed generator, so every evaluation sees the same random draws and the training
    generator is untouched (a resumed run stays exact)."""
    model.eval()
    device = model.transformer.wte.weight.device
    greedy = model_player(model, enc, task, cfg.max_new_tokens, autocast)
    result = task.evaluate(greedy, cfg.eval_games, keep_games=cfg.log_samples)
    sampled = model_player(model, enc, task, cfg.max_new_tokens, autocast, temperature=1.0,
                           generator=torch.Generator(device).manual_seed(cfg.seed))
    for key, value in task.evaluate(sampled, cfg.eval_games).items():
        if key in task.headline:
            result[f"sampled_{key}"] = value
    return result


def evaluate_and_log(run, model, step):
    result = evaluate_model(model, run.enc, run.task, run.cfg, run.autocast) if run.rank == 0 else None
    if run.rank == 0:
        summary = {k: v for k, v in result.items() if k != "transcripts"}
        log(run, {"stage": "eval", "step": step, **summary},
            f"eval @ {step} | " + " | ".join(f"{k} {v:.3f}" for k, v in summary.items() if isinstance(v, float)))
        with open(os.path.join(run.cfg.out_dir, "samples.jsonl"), "a") as f:
            record = {"stage": "samples", "step": step, "transcripts": result.get("transcripts", [])}
            f.write(json.dumps(record) + "\n")
    if dist.is_initialized():
        dist.barrier()
    return result


def final_table(run, evals):
    """The warm start, GRPO and the task's reference players, in eval.json and on the terminal."""
    cfg = run.cfg
    if cfg.reference_players:
        for name, player in run.task.reference_players(random.Random(cfg.seed)).items():
            evals[f"player: {name}"] = run.task.evaluate(player, cfg.eval_games)
    table = {name: {k: v for k, v in r.items() if k != "transcripts"} for name, r in evals.items() if r}
    atomic_write(os.path.join(cfg.out_dir, "eval.json"), json.dumps(table, indent=1))  # it marks the run done
    keys = list(run.task.headline) + sorted({k for r in table.values() for k in r} - set(run.task.headline)
                                            - {"games"})
    width = max(len(n) for n in table)
    print("\n" + f"{'':<{width}}  " + "  ".join(f"{k:>15}" for k in keys))
    for name, r in table.items():
        cells = [f"{r[k]:>15.3f}" if isinstance(r.get(k), float) else f"{'-':>15}" for k in keys]
        print(f"{name:<{width}}  " + "  ".join(cells))


# ----------------------------------------------------------------------------------------------------------------
# Machinery: data parallel, the optimizer, checkpoints and logs


def data_parallel(model, run):
    """The model, wrapped once per stage in DistributedDataParallel under torchrun, as nanoGPT does: its forward
    (the log-probs) then averages the gradients across processes. Built after add_lora, it hooks the adapters."""
    if run.world == 1:
        return model
    return DistributedDataParallel(model, device_ids=[run.device.index] if run.device.type == "cuda" else None)


def make_optimizer(model, lr, weight_decay):
    """AdamW; weight decay only on matrices (not biases, norms, or the position table)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:  # frozen under LoRA
            continue
        (decay if p.dim() >= 2 and "wpe" not in name else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.99))


def checkpoint(run, model, state, stage, step):  # every process: each one's random streams go into it
    save_checkpoint(os.path.join(run.cfg.out_dir, "ckpt.pt"), model, state.optimizer, run.cfg, stage, step,
                    state.rng, state.generator)


def log(run, record, line=None):
    """One JSON object per line in metrics.jsonl (rank 0), and optionally a dense line on the terminal."""
    if run.rank != 0:
        return
    with open(os.path.join(run.cfg.out_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
    if run.wandb is not None:
        run.wandb.log({f"{record['stage']}/{k}": v for k, v in record.items()
                          if isinstance(v, (int, float)) and k != "step"}, step=record["step"])
    if line:
        tqdm.write(line)


def average_across_ranks(metrics):
    """The mean over processes of each figure; the max of a *_max figure."""
    if not dist.is_initialized():
        return metrics
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"

    def reduced(keys, op):
        values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=device)
        dist.all_reduce(values, op=op)
        return dict(zip(keys, values.tolist()))

    floats = [k for k, v in metrics.items() if isinstance(v, float)]
    means = reduced([k for k in floats if not k.endswith("_max")], dist.ReduceOp.SUM)
    maxes = reduced([k for k in floats if k.endswith("_max")], dist.ReduceOp.MAX)
    return {**metrics, **{k: v / dist.get_world_size() for k, v in means.items()}, **maxes}


if __name__ == "__main__":
    main(sys.argv[1:])
