"""
Train a small GPT with GRPO, end to end: a supervised warm start on a task's demonstrations, then GRPO from
rewards alone, with held-out evaluations before, during and after.

    python train.py                                   # the default run: addition, CPU-sized, a few minutes
    python train.py --task=countdown --group_size=4   # any config field is a flag; --help lists them all
    python train.py --resume                          # continue a killed run from its last checkpoint
    torchrun --nproc_per_node=2 train.py              # data parallel: prompts split across processes

The run folder (--out_dir) gets config.json, metrics.jsonl (one JSON object per step and stage), eval.json
(the final table), samples.jsonl (decoded games at every evaluation) and ckpt.pt (atomic, for --resume).
"""

import dataclasses
import difflib
import importlib
import inspect
import json
import math
import os
import random
import sys
import time
import typing
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from tqdm import tqdm

import grpo
from checkpoint import (CheckpointError, atomic_save, latest_checkpoint, load_checkpoint, read_checkpoint,
                        save_checkpoint, truncate_logs)
from data.tokenizer import gpt2_encoding
from model import (GPT, GPTConfig, add_lora, check_lora_rank, config_from_dict, load_state_dict_checked,
                   merge_lora, pad_left, sample)


def opt(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig(grpo.GRPOConfig):
    """The flags: every GRPO knob of grpo.GRPOConfig (the one source of their defaults) and the run's own below.
    The last block is the one place where the default run departs from GRPOConfig, with the reason."""
    # task and run
    task: str = opt("addition", "task module under data/: addition (the default run), wordle, countdown, summary")
    out_dir: str = opt("runs/default", "run folder")
    resume: bool = opt(False, "continue the run in out_dir from its checkpoint, as configured there")
    overwrite: bool = opt(False, "replace a finished or different run in out_dir")
    init_from: str = opt("scratch", "scratch, a checkpoint of ours (.pt), or a local GPT-2 directory (HF layout)")
    seed: int = opt(1337, "seed of the run (model init, data, sampling)")
    device: str = opt("auto", "auto (cuda > mps > cpu), cpu, cuda, mps")
    dtype: str = opt("auto", "auto (bfloat16 on cuda, else float32), float32, bfloat16: autocast dtype")
    compile: bool = opt(False, "torch.compile the training forward pass")
    threads: int = opt(0, "CPU threads for torch; 0 keeps torch's default")
    # model (ignored when init_from loads one)
    n_layer: int = opt(4, "transformer blocks")
    n_head: int = opt(4, "attention heads")
    n_embd: int = opt(128, "model width")
    block_size: int = opt(0, "context length, tokens; 0 = the task's BLOCK_SIZE")
    # stage 1: supervised warm start
    sft_steps: int = opt(1500, "warm-start optimizer steps (0 skips the stage)")
    sft_batch_size: int = opt(64, "demonstrations per warm-start step")
    sft_lr: float = opt(3e-3, "warm-start peak learning rate (warmup, then cosine to 10%)")
    sft_player: str = opt("", "reference player whose games are the demonstrations; empty = the task's default")
    # stage 2: GRPO (the algorithm's knobs are GRPOConfig's)
    grpo_steps: int = opt(300, "GRPO iterations (0 skips the stage)")
    prompts_per_step: int = opt(16, "prompts per GRPO step (split across processes)")
    lr: float = opt(3e-4, "GRPO learning rate (constant after a 5-step warmup)")
    weight_decay: float = opt(0.0, "AdamW weight decay on matrices")
    lora_rank: int = opt(0, "GRPO trains rank-r LoRA adapters only (base frozen, KL reference = adapters off); "
                            "0 = off")
    lora_alpha: float = opt(16.0, "LoRA output scale alpha / rank")
    lora_mlp: bool = opt(False, "LoRA adapters on the MLP projections too, not only attention")
    # evaluation and logging
    eval_interval: int = opt(100, "GRPO steps between evaluations")
    eval_games: int = opt(200, "held-out games (or problems) per evaluation")
    log_samples: int = opt(4, "decoded games saved to samples.jsonl at each evaluation")
    checkpoint_interval: int = opt(50, "steps between checkpoints, in either stage")
    reference_players: bool = opt(True, "evaluate the task's reference players for the final table")
    wandb: bool = opt(False, "also log to Weights & Biases (needs wandb installed and configured)")
    # ---- Where the default run departs from GRPOConfig's defaults, and why ----
    beta: float = opt(0.04, "KL penalty to the warm-start model: DeepSeekMath's 0.04, which kept the default run's "
                            "KL per token below 0.1 (GRPOConfig: 0, no reference model)")
    num_iterations: int = opt(2, "optimizer passes over each rollout: 2, so that the clip acts (GRPOConfig: 1, "
                                 "where rho is exactly 1)")
    max_new_tokens: int = opt(0, "completion length cap, tokens; 0 = the task's MAX_NEW_TOKENS")

    def __post_init__(self):
        world = int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun; checked before any process group exists
        checks = [(self.task in TASKS, f"--task must be one of {', '.join(TASKS)}"),
                  (self.prompts_per_step >= 1 and self.sft_batch_size >= 1,
                   "--prompts_per_step and --sft_batch_size must be at least 1"),
                  (self.prompts_per_step % world == 0 and self.sft_batch_size % world == 0,
                   f"--prompts_per_step and --sft_batch_size must be multiples of the {world} processes (each "
                   f"process takes an equal share)"),
                  (self.sft_steps >= 0 and self.grpo_steps >= 0, "step counts cannot be negative"),
                  (self.block_size >= 0 and self.max_new_tokens >= 0, "sizes cannot be negative"),
                  (self.lr > 0 and self.sft_lr > 0, "learning rates must be positive"),
                  (self.lora_rank >= 0, "--lora_rank cannot be negative (0 turns LoRA off)"),
                  (self.eval_interval >= 1 and self.checkpoint_interval >= 1 and self.eval_games >= 1,
                   "--eval_interval, --checkpoint_interval and --eval_games must be at least 1"),
                  (self.log_samples >= 0 and self.threads >= 0, "--log_samples and --threads cannot be negative"),
                  (self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:"),
                   f"--device={self.device!r} is not auto, cpu, cuda, cuda:N or mps"),
                  (self.dtype in ("auto", "float32", "bfloat16"), "--dtype must be auto, float32 or bfloat16")]
        for name, valid in (("loss_type", grpo.LOSS_TYPES), ("scale_rewards", grpo.SCALES),
                            ("importance_level", grpo.IMPORTANCE_LEVELS)):
            checks.append((getattr(self, name) in valid,
                           f"--{name}={getattr(self, name)!r} is not one of {', '.join(valid)}"))
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.reward_weights is not None:
            self.reward_weights = tuple(self.reward_weights)  # config.json holds a list
        if self.max_new_tokens:  # 0 waits for the task's size (parse_config)
            super().__post_init__()  # every GRPO knob: ranges, clip, minibatches, weights


TASKS = ("addition", "wordle", "wordle_full", "countdown", "summary")
NOT_FLAGS = ("stop_token", "pad_token", "top_k", "top_p")  # set from the tokenizer, or refused during GRPO


def grpo_config(cfg, enc):
    """The GRPOConfig part of the run's config, with the tokenizer's stop and pad tokens."""
    end, pad = end_and_pad(enc)
    knobs = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(grpo.GRPOConfig)}
    return grpo.GRPOConfig(**{**knobs, "stop_token": end, "pad_token": pad})


# ----------------------------------------------------------------------------------------------------------------
# Config from the command line: --key=value (or --flag for booleans), nothing else. Every flag and every
# combination is checked here, before anything is built.


def flags():
    return {f.name: f for f in dataclasses.fields(TrainConfig) if f.name not in NOT_FLAGS}


def parse_config(argv):
    known = flags()
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        for f in known.values():
            default = "unset" if f.default is None else f.default
            print(f"  --{f.name}={default!s:<12} {f.metadata['help']}")
        sys.exit(0)
    values = {}
    for arg in argv:
        if not arg.startswith("--"):
            raise SystemExit(f"error: expected --key=value, got {arg!r}")
        key, has_value, raw = arg[2:].partition("=")
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3)
            raise SystemExit(f"error: unknown option --{key}" + (f"; did you mean {', '.join('--' + c for c in close)}?"
                                                                if close else "; see --help"))
        kind = flag_type(known[key])
        if kind is bool and not has_value:
            values[key] = True
            continue
        try:
            values[key] = parse_value(raw, kind)
        except ValueError:
            raise SystemExit(f"error: --{key}={raw!r} is not a valid {describe(kind)}") from None
    given = set(values)  # the command line's own flags: --resume checks these against the run, not task defaults
    try:
        task_name = values.get("task", TrainConfig.task)
        if task_name in TASKS:  # a task's own defaults for the flags not given (data/wordle.py has some)
            task_defaults = getattr(importlib.import_module(f"data.{task_name}"), "TRAIN_DEFAULTS", {})
            not_flags = sorted(set(task_defaults) - set(known))
            if not_flags:
                raise SystemExit(f"error: data/{task_name}.py's TRAIN_DEFAULTS sets {', '.join(not_flags)}, "
                                 f"not a flag of train.py")
            values = {**task_defaults, **values}
        cfg = TrainConfig(**values)
        task = importlib.import_module(f"data.{cfg.task}")  # zeros and unset values: the task's own
        reward_fns, default_weights = task.reward_functions()
        cfg = dataclasses.replace(cfg, block_size=cfg.block_size or task.BLOCK_SIZE,
                                  max_new_tokens=cfg.max_new_tokens or task.MAX_NEW_TOKENS,
                                  reward_weights=cfg.reward_weights or tuple(default_weights))
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if len(cfg.reward_weights) != len(reward_fns):
        raise SystemExit(f"error: --reward_weights has {len(cfg.reward_weights)} values for {len(reward_fns)} "
                         f"rewards ({', '.join(f.__name__ for f in reward_fns)})")
    limit = getattr(task, "EVAL_LIMIT", None)
    if limit is not None and cfg.eval_games > limit:
        raise SystemExit(f"error: --eval_games={cfg.eval_games} is more than the {limit} held-out games the "
                         f"{cfg.task} task has")
    if (cfg.sft_player or task.DEFAULT_PLAYER) not in task.reference_players():
        raise SystemExit(f"error: --sft_player={cfg.sft_player!r} is not one of "
                         f"{', '.join(task.reference_players())}")
    if cfg.resume:
        cfg = resumed_config(cfg, given)
    return cfg


def flag_type(f):
    """A field's type, Optional[...] unwrapped."""
    if typing.get_origin(f.type) is typing.Union:
        return next(t for t in typing.get_args(f.type) if t is not type(None))
    return f.type


def describe(kind):
    return "comma-separated list of numbers" if kind is tuple else kind.__name__


def parse_value(raw, kind):
    if kind is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(raw)
    if kind is tuple:
        return tuple(parse_value(part, float) for part in raw.split(","))
    value = kind(raw)
    if kind is float and not math.isfinite(value):
        raise ValueError(raw)
    return value


# No setting of the algorithm. --threads changes the rounding of CPU sums (one thread and two give different
# runs), so a resume keeps the run's own count, and its wandb choice, unless the command line gives them.
SAFE_TO_CHANGE_ON_RESUME = ("resume", "overwrite", "threads", "wandb")


def resumed_config(requested, given):
    """--resume continues the run in out_dir as it was configured: its config.json is the configuration. Flags
    given with --resume must agree with it (a resumed run with another learning rate or seed would be neither
    run); a difference is an error that lists every one."""
    path = os.path.join(requested.out_dir, "config.json")
    if not os.path.exists(path):
        raise SystemExit(f"error: --resume but {requested.out_dir} holds no run (no config.json)")
    with open(path) as f:
        saved = json.load(f)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    if set(saved) - known:
        raise SystemExit(f"error: {path} has options this train.py does not know: {sorted(set(saved) - known)}")

    def same(a, b):  # as JSON: a tuple and the list it was saved as are the same value
        return json.loads(json.dumps(a)) == json.loads(json.dumps(b))
    differ = [f"--{k}: the run has {saved[k]!r}, the command line {getattr(requested, k)!r}"
              for k in sorted(given) if k not in SAFE_TO_CHANGE_ON_RESUME and k in saved
              and not same(saved[k], getattr(requested, k))]
    if differ:
        raise SystemExit(f"error: --resume continues {requested.out_dir} as configured in its config.json, but "
                         f"these flags differ from it (drop them, or start a new run):\n  " + "\n  ".join(differ))
    changed = {k: getattr(requested, k) for k in SAFE_TO_CHANGE_ON_RESUME
               if k in given or k in ("resume", "overwrite") or k not in saved}
    return TrainConfig(**{**saved, **changed})


# ----------------------------------------------------------------------------------------------------------------
# The pipeline: config -> setup -> warm start -> GRPO -> evaluation -> table


def main(argv):
    cfg = parse_config(argv)  # every flag and combination checked: nothing is built before
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
        evals["warm start"] = previous_eval(cfg.out_dir, step=0)
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
    wandb: object = None

    @property
    def ckpt_path(self):
        return os.path.join(self.cfg.out_dir, "ckpt.pt")


@dataclass
class State:
    """What changes as the run goes, besides the weights: all of it is in every checkpoint."""
    optimizer: torch.optim.Optimizer
    rng: random.Random           # data: prompts and demonstrations
    generator: torch.Generator   # sampling
    stage: str = "sft"
    step: int = 0                # the next step to run


def setup(cfg):
    rank, world = setup_distributed(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg)
    autocast, dtype = pick_autocast(cfg, device)
    prepare_out_dir(cfg, rank)
    if dist.is_initialized():
        dist.barrier()  # rank 0 has checked and prepared the run folder
    task = importlib.import_module(f"data.{cfg.task}")
    run = Run(cfg, rank, world, device, autocast, dtype, task, run_tokenizer(cfg, task))
    if cfg.wandb and rank == 0:
        import wandb  # optional, never required
        run.wandb = wandb.init(project="nanogrpo", config=dataclasses.asdict(cfg), resume="allow")
    return run


def new_model(run):
    """The policy: new or from --init_from, on the run's device, compiled if asked."""
    cfg = run.cfg
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = build_model(cfg, run.enc.n_vocab)
    if cfg.lora_rank:
        try:
            check_lora_rank(cfg.lora_rank, model.config)  # now, not after the warm start
        except ValueError as e:
            raise SystemExit(f"error: --{e}") from None
    if cfg.init_from == "scratch" and hasattr(run.task, "init_embeddings"):
        run.task.init_embeddings(model.transformer.wte.weight, run.enc)  # a task may seed structure into tokens
    model.to(run.device)
    if cfg.compile:
        model.hidden_states = torch.compile(model.hidden_states, dynamic=True)  # state_dict keys stay unprefixed
    if run.rank == 0:
        print(f"task {cfg.task} | device {run.device} ({run.dtype}) x{run.world} | {model.num_params() / 1e6:.2f}M "
              f"parameters + {model.transformer.wte.weight.numel() / 1e6:.2f}M embedding | vocab {run.enc.n_vocab}")
    return model


def start(run, model):
    """A new run's optimizer and random streams (each rank draws its own data), or, with --resume, the
    checkpoint's: weights, optimizer, stage, step and this rank's streams."""
    cfg = run.cfg
    state = State(make_optimizer(model, cfg.sft_lr, cfg.weight_decay), random.Random(cfg.seed + 1000 * run.rank),
                  torch.Generator(run.device).manual_seed(cfg.seed + 1000 * run.rank))
    if cfg.resume:
        ckpt, loaded_from = latest_checkpoint(cfg.out_dir)
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


def checkpoint(run, model, state, stage, step):  # every process: each one's random streams go into it
    save_checkpoint(run.ckpt_path, model, state.optimizer, run.cfg, stage, step, state.rng, state.generator)


def warm_start(run, model, state):
    """Stage 1: supervised learning on the task's demonstrations, the loss on completion tokens only."""
    cfg = run.cfg
    learner = grpo.data_parallel(model)  # the log-probs; under torchrun it averages the gradients
    player = cfg.sft_player or run.task.DEFAULT_PLAYER
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
            logp, _ = learner(tokens, start, valid)
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
    # A fresh optimizer: the warm start's AdamW moments would move the weights even when every advantage is 0
    # (measured: up to 5e-5 on the first step), a push from the supervised loss, not from rewards.
    state.optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    checkpoint(run, model, state, "grpo", -1)  # so a resume from here does not redo stage 1
    return result


def warm_start_path(cfg):
    return os.path.join(cfg.out_dir, "warm_start.pt")


def train_grpo(run, model, state):
    """Stage 2: GRPO from rewards alone, one grpo.grpo_step per step, evaluations and checkpoints between."""
    cfg, task, enc = run.cfg, run.task, run.enc
    learner = grpo.data_parallel(model)  # after add_lora: DDP hooks the parameters that train
    reference = kl_reference(run, model)
    config = grpo_config(cfg, enc)
    reward_fns, _ = task.reward_functions()

    # A task whose states are games in progress can have the policy play their earlier turns (Wordle: greedily,
    # as the evaluation plays, so GRPO trains on the states the model will be judged on): it takes a `policy`.
    policy = model_player(model, enc, task, cfg.max_new_tokens, run.autocast)
    takes_policy = "policy" in inspect.signature(task.training_examples).parameters

    def draw(n):
        if takes_policy:
            model.eval()  # grpo_step sets train mode again for its update
            examples = task.training_examples(n, state.rng, policy=policy)
        else:
            examples = task.training_examples(n, state.rng)
        return [enc.encode(task.prompt(ex), allowed_special="all") for ex in examples], examples

    t0 = time.time()
    for step in range(max(state.step, 0), cfg.grpo_steps):
        for group in state.optimizer.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / 5)
        prompts, examples = draw(cfg.prompts_per_step // run.world)
        try:
            metrics = grpo.grpo_step(model, state.optimizer, prompts, examples, reward_fns, config,
                                     reference=reference, generator=state.generator, decode=enc.decode,
                                     refill=draw, autocast=run.autocast, learner=learner)
        except FloatingPointError as e:  # raised before the optimizer step: the weights are still good
            raise SystemExit(f"error: stopped at GRPO step {step}: {e}. The last good checkpoint is "
                             f"{run.ckpt_path}") from None
        m = average_across_ranks(metrics)
        log(run, {"stage": "grpo", "step": step, **m, "time_s": time.time() - t0}, step_line(step, m))
        if (step + 1) % cfg.eval_interval == 0 and step + 1 < cfg.grpo_steps:
            evaluate_and_log(run, model, step=step + 1)
        if (step + 1) % cfg.checkpoint_interval == 0 or step == cfg.grpo_steps - 1:
            checkpoint(run, model, state, "grpo", step)


def kl_reference(run, model):
    """The KL term's reference: none at beta = 0 (no second model exists at all), the LoRA policy's own base
    (adapters off), or the frozen warm-start model."""
    cfg = run.cfg
    if cfg.beta == 0:
        return None
    if cfg.lora_rank:
        return grpo.LORA_BASE
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


def final_table(run, evals):
    """The warm start, GRPO and the task's reference players, in eval.json and on the terminal."""
    cfg = run.cfg
    if cfg.reference_players:
        for name, player in run.task.reference_players(random.Random(cfg.seed)).items():
            evals[f"player: {name}"] = run.task.evaluate(player, cfg.eval_games)
    table = {name: {k: v for k, v in r.items() if k != "transcripts"} for name, r in evals.items() if r}
    with open(os.path.join(cfg.out_dir, "eval.json"), "w") as f:
        json.dump(table, f, indent=1)
    print_table(table, run.task.HEADLINE)


def evaluate_and_log(run, model, step):
    result = evaluate_model(model, run.enc, run.task, run.cfg, run.autocast) if run.rank == 0 else None
    if run.rank == 0:
        summary = {k: v for k, v in result.items() if k != "transcripts"}
        log(run, {"stage": "eval", "step": step, **summary},
            f"eval @ {step} | " + " | ".join(f"{k} {v:.3f}" for k, v in summary.items() if isinstance(v, float)))
        with open(os.path.join(run.cfg.out_dir, "samples.jsonl"), "a") as f:
            f.write(json.dumps({"stage": "samples", "step": step, "transcripts": result.get("transcripts", [])}) + "\n")
    if dist.is_initialized():
        dist.barrier()
    return result


# ----------------------------------------------------------------------------------------------------------------
# Setup helpers


def setup_distributed(cfg):
    """torchrun sets RANK and WORLD_SIZE: then one process per device (gloo on CPU, nccl on CUDA)."""
    if "RANK" not in os.environ:
        return 0, 1
    use_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size()


def pick_device(cfg):
    if cfg.device != "auto":
        return torch.device(f"cuda:{torch.cuda.current_device()}" if cfg.device == "cuda" and dist.is_initialized()
                            else cfg.device)
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_autocast(cfg, device):
    dtype = cfg.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if dtype == "float32":
        return nullcontext(), dtype
    return torch.autocast(device.type, dtype=torch.bfloat16), dtype


RUN_FILES = ("config.json", "metrics.jsonl", "samples.jsonl", "eval.json", "ckpt.pt", "ckpt.prev.pt", "warm_start.pt")


def prepare_out_dir(cfg, rank):
    """Refuse to mix two runs in one folder: an existing run needs --resume (same run) or --overwrite.
    Rank 0 alone checks and writes; the others wait at a barrier (checking too would race with its writes)."""
    if rank != 0:
        return
    # A folder whose start-up failed before its first checkpoint holds nothing to keep: it is simply re-run.
    has_run = any(os.path.exists(os.path.join(cfg.out_dir, name)) for name in ("ckpt.pt", "ckpt.prev.pt"))
    if has_run and not (cfg.resume or cfg.overwrite):
        raise SystemExit(f"error: {cfg.out_dir} already holds a run; pass --resume to continue it or "
                         f"--overwrite to replace it (or choose another --out_dir)")
    if cfg.resume and not has_run:
        raise SystemExit(f"error: --resume but {cfg.out_dir} has no checkpoint (the run stopped before its first "
                         f"one): run the same command without --resume to start it again")
    if cfg.resume:
        return  # config.json is the run's, and stays as it is
    os.makedirs(cfg.out_dir, exist_ok=True)
    for name in RUN_FILES:
        if os.path.exists(os.path.join(cfg.out_dir, name)):
            os.remove(os.path.join(cfg.out_dir, name))
    with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=1)


def build_model(cfg, vocab_size):
    """A new GPT, or one loaded from a checkpoint of ours or a GPT-2 directory. Its shape is model.config."""
    if cfg.init_from == "scratch":
        return GPT(GPTConfig(block_size=cfg.block_size, vocab_size=vocab_size, n_layer=cfg.n_layer,
                             n_head=cfg.n_head, n_embd=cfg.n_embd))
    if os.path.isdir(cfg.init_from):  # a GPT-2 in the Hugging Face layout; main() gave us its tokenizer
        model = GPT.from_pretrained(cfg.init_from)
        if model.config.vocab_size < vocab_size:
            raise SystemExit(f"error: {cfg.init_from} has {model.config.vocab_size} token embeddings but its "
                             f"tokenizer has {vocab_size} tokens")
        return model
    try:
        ckpt = read_checkpoint(cfg.init_from)
    except CheckpointError as e:
        raise SystemExit(f"error: --init_from: {e}") from None
    config = config_from_dict(ckpt["model_config"])
    if config.vocab_size != vocab_size:
        raise SystemExit(f"error: {cfg.init_from} was trained with a vocabulary of {config.vocab_size}, the task's "
                         f"tokenizer has {vocab_size}")
    model = GPT(config)
    load_state_dict_checked(model, ckpt["model"], source=cfg.init_from)
    if config.lora_rank:  # a LoRA run's result: fold its adapters in and start from the plain model
        merge_lora(model)
    return model


def make_optimizer(model, lr, weight_decay):
    """AdamW; weight decay only on matrices (not biases, norms, or the position table)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:  # frozen under LoRA
            continue
        (decay if p.dim() >= 2 and "wpe" not in name else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.99))


def sft_lr(step, total, peak):
    warmup = max(1, total // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def run_tokenizer(cfg, task):
    """The task's tokenizer; GPT-2's weights mean GPT-2's token ids, so a run that started from a GPT-2
    directory reads its task through GPT-2's tokenizer."""
    return gpt2_encoding(cfg.init_from, task_specials=True) if os.path.isdir(cfg.init_from) else task.tokenizer()


def load_run(run_dir, warm_start=False):
    """(model, tokenizer, config) of a run folder: its config.json and its latest good checkpoint (or, with
    warm_start, the model as stage 1 left it), on the CPU, in eval mode. For export.py and sample.py."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise SystemExit(f"error: {run_dir} is not a run folder (no config.json)")
    with open(path) as f:
        saved = json.load(f)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    if not isinstance(saved, dict) or set(saved) - known:
        raise SystemExit(f"error: {path} is not a config of this train.py")
    cfg = TrainConfig(**saved)
    try:
        ckpt = read_checkpoint(warm_start_path(cfg)) if warm_start else latest_checkpoint(run_dir)[0]
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    model = GPT(config_from_dict(ckpt["model_config"]))
    load_state_dict_checked(model, ckpt["model"], source=run_dir)
    return model.eval(), run_tokenizer(cfg, importlib.import_module(f"data.{cfg.task}")), cfg


# ----------------------------------------------------------------------------------------------------------------
# Evaluation: the model as a task player (greedy, as it will be used)


def end_and_pad(enc):
    """The ids of <|end|> (stops a completion) and <|pad|> in the run's tokenizer."""
    return enc.encode_single_token("<|end|>"), enc.encode_single_token("<|pad|>")


def model_player(model, enc, task, max_new_tokens, autocast, temperature=0.0, generator=None):
    """The model as a task player: greedy by default (as it will be used), or sampled at a temperature."""
    end, pad = end_and_pad(enc)

    def generate(prompts):
        texts = []
        for i in range(0, len(prompts), 256):
            with autocast:
                s = sample(model, prompts[i:i + 256], max_new_tokens=max_new_tokens, temperature=temperature,
                           stop_token=end, pad_token=pad, generator=generator)
            texts += [enc.decode(tokens) for tokens in s.completion_tokens(end)]
        return texts

    def play(examples):
        prompts = [tuple(enc.encode(task.prompt(ex), allowed_special="all")) for ex in examples]
        if temperature > 0:
            return generate(prompts)
        # Greedy answers a prompt the same way every time, so each distinct prompt runs once: every Wordle
        # game opens on the same prompt, and a draw of GRPO's states or an evaluation plays hundreds at once.
        distinct = list(dict.fromkeys(prompts))
        answer = dict(zip(distinct, generate(distinct)))
        return [answer[p] for p in prompts]
    return play


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
        if key in task.HEADLINE:
            result[f"sampled_{key}"] = value
    return result


# ----------------------------------------------------------------------------------------------------------------
# Stage 1: supervised warm start on demonstrations (loss on completion tokens only)


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


# ----------------------------------------------------------------------------------------------------------------
# Logging


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
    def reduced(keys, op):
        values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=grpo.collective_device())
        dist.all_reduce(values, op=op)
        return dict(zip(keys, values.tolist()))

    floats = [k for k, v in metrics.items() if isinstance(v, float)]
    means = reduced([k for k in floats if not k.endswith("_max")], dist.ReduceOp.SUM)
    maxes = reduced([k for k in floats if k.endswith("_max")], dist.ReduceOp.MAX)
    return {**metrics, **{k: v / dist.get_world_size() for k, v in means.items()}, **maxes}


# ----------------------------------------------------------------------------------------------------------------
# The final table


def previous_eval(out_dir, step):
    """The logged evaluation at a step (a resumed run evaluated its warm start before it was killed)."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        found = [json.loads(line) for line in f if line.strip()]
    found = [r for r in found if r["stage"] == "eval" and r["step"] == step]
    return {k: v for k, v in found[-1].items() if k not in ("stage", "step")} if found else None


def print_table(table, headline):
    keys = list(headline) + sorted({k for r in table.values() for k in r} - set(headline) - {"games"})
    width = max(len(n) for n in table)
    print("\n" + f"{'':<{width}}  " + "  ".join(f"{k:>15}" for k in keys))
    for name, r in table.items():
        cells = [f"{r[k]:>15.3f}" if isinstance(r.get(k), float) else f"{'-':>15}" for k in keys]
        print(f"{name:<{width}}  " + "  ".join(cells))


if __name__ == "__main__":
    main(sys.argv[1:])
