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
import hashlib
import importlib
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from tqdm import tqdm

import grpo
from data.tokenizer import gpt2_encoding
from model import (GPT, GPTConfig, add_lora, check_lora_rank, config_from_dict, load_state_dict_checked,
                   merge_lora, pad_left, sample)


def opt(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # task and run
    task: str = opt("addition", "task module under data/: addition (the default run), wordle, countdown, summary")
    out_dir: str = opt("runs/default", "run folder")
    resume: bool = opt(False, "continue the run in out_dir from its checkpoint")
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
    # stage 2: GRPO
    grpo_steps: int = opt(300, "GRPO iterations (0 skips the stage)")
    prompts_per_step: int = opt(16, "prompts per GRPO step (split across processes)")
    group_size: int = opt(8, "completions sampled per prompt")
    num_iterations: int = opt(2, "optimizer passes over each rollout batch (>1 makes the clip act)")
    minibatch_size: int = opt(0, "rows per optimizer step within a pass; 0 = the whole batch")
    lr: float = opt(3e-4, "GRPO learning rate (constant after a 5-step warmup)")
    weight_decay: float = opt(0.0, "AdamW weight decay on matrices")
    eps_low: float = opt(0.2, "clip range below 1")
    eps_high: float = opt(0.2, "clip range above 1 (0.28 = DAPO clip-higher)")
    beta: float = opt(0.04, "KL penalty to the warm-start model (DeepSeekMath's 0.04); 0 keeps no reference model")
    loss_type: str = opt("grpo", "grpo, dapo or dr_grpo: how token terms are averaged")
    scale_rewards: str = opt("group", "group, batch or none (Dr. GRPO): advantage scaling")
    importance_level: str = opt("token", "token, or sequence (GSPO)")
    temperature: float = opt(1.0, "sampling temperature during GRPO")
    max_new_tokens: int = opt(0, "completion length cap, tokens; 0 = the task's MAX_NEW_TOKENS")
    reward_weights: str = opt("", "comma-separated weights, one per task reward; empty = the task's defaults")
    max_grad_norm: float = opt(1.0, "gradient clipping; 0 = off")
    dynamic_sampling: bool = opt(False, "DAPO dynamic sampling")
    mask_truncated: bool = opt(False, "DAPO: leave completions without a stop token out of the loss")
    overlong_buffer: int = opt(0, "DAPO soft overlong penalty width, tokens; 0 = off")
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


# ----------------------------------------------------------------------------------------------------------------
# Config from the command line: --key=value (or --flag for booleans), nothing else


def parse_config(argv):
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        for f in fields.values():
            print(f"  --{f.name}={f.default!s:<12} {f.metadata['help']}")
        sys.exit(0)
    values = {}
    for arg in argv:
        if not arg.startswith("--"):
            raise SystemExit(f"error: expected --key=value, got {arg!r}")
        key, has_value, raw = arg[2:].partition("=")
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=3)
            raise SystemExit(f"error: unknown option --{key}" + (f"; did you mean {', '.join('--' + c for c in close)}?"
                                                                if close else "; see --help"))
        kind = type(fields[key].default)
        if kind is bool and not has_value:
            values[key] = True
            continue
        try:
            values[key] = parse_value(raw, kind)
        except ValueError:
            raise SystemExit(f"error: --{key}={raw!r} is not a valid {kind.__name__}") from None
    cfg = TrainConfig(**values)
    check_config(cfg)
    task = importlib.import_module(f"data.{cfg.task}")  # zeros mean "the task's own size"
    cfg.block_size = cfg.block_size or task.BLOCK_SIZE
    cfg.max_new_tokens = cfg.max_new_tokens or task.MAX_NEW_TOKENS
    if cfg.resume:
        cfg = resumed_config(cfg, set(values))
    return cfg


SAFE_TO_CHANGE_ON_RESUME = ("resume", "overwrite", "threads", "wandb")  # they change no number the run computes


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
    differ = [f"--{k}: the run has {saved[k]!r}, the command line {getattr(requested, k)!r}"
              for k in sorted(given) if k not in SAFE_TO_CHANGE_ON_RESUME and k in saved
              and saved[k] != getattr(requested, k)]
    if differ:
        raise SystemExit(f"error: --resume continues {requested.out_dir} as configured in its config.json, but "
                         f"these flags differ from it (drop them, or start a new run):\n  " + "\n  ".join(differ))
    return TrainConfig(**{**saved, **{k: getattr(requested, k) for k in SAFE_TO_CHANGE_ON_RESUME}})


def parse_value(raw, kind):
    if kind is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(raw)
    value = kind(raw)
    if kind is float and not math.isfinite(value):
        raise ValueError(raw)
    return value


TASKS = ("addition", "wordle", "countdown", "summary")


def check_config(cfg):
    world = int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun; checked before any process group exists
    checks = [(cfg.task in TASKS, f"task must be one of {', '.join(TASKS)}"),
              (cfg.group_size >= 1, "group_size must be at least 1"),
              (cfg.prompts_per_step >= 1, "prompts_per_step must be at least 1"),
              (cfg.prompts_per_step % world == 0 and cfg.sft_batch_size % world == 0,
               f"prompts_per_step and sft_batch_size must be multiples of the {world} processes (each process "
               f"takes an equal share)"),
              (cfg.sft_steps >= 0 and cfg.grpo_steps >= 0, "step counts cannot be negative"),
              (cfg.max_new_tokens >= 0 and cfg.block_size >= 0, "sizes cannot be negative"),
              (cfg.temperature > 0, "temperature must be positive during GRPO"),
              (cfg.lr > 0 and cfg.sft_lr > 0, "learning rates must be positive"),
              (cfg.beta >= 0, "beta cannot be negative"),
              (cfg.lora_rank >= 0, "lora_rank cannot be negative (0 turns LoRA off)"),
              (cfg.eval_interval >= 1 and cfg.checkpoint_interval >= 1, "intervals must be at least 1"),
              (cfg.device in ("auto", "cpu", "cuda", "mps") or cfg.device.startswith("cuda:"), "unknown device"),
              (cfg.dtype in ("auto", "float32", "bfloat16"), "dtype must be auto, float32 or bfloat16")]
    for ok, message in checks:
        if not ok:
            raise SystemExit(f"error: {message}")
    for name, valid in (("loss_type", grpo.LOSS_TYPES), ("scale_rewards", grpo.SCALES),
                        ("importance_level", grpo.IMPORTANCE_LEVELS)):
        if getattr(cfg, name) not in valid:
            raise SystemExit(f"error: --{name}={getattr(cfg, name)!r} is not one of {', '.join(valid)}")


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


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: atomic, complete enough that a resumed run equals an uninterrupted one


def save_checkpoint(path, model, optimizer, cfg, stage, step, rng, generator):
    """Called on every process: each one's random streams are saved (rank r resumes stream r), by rank 0."""
    streams = {"python": rng.getstate(), "torch": torch.get_rng_state(), "generator": generator.get_state()}
    every_rank = [streams]
    if dist.is_initialized():
        every_rank = [None] * dist.get_world_size()
        dist.all_gather_object(every_rank, streams)
    if not dist.is_initialized() or dist.get_rank() == 0:
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "stage": stage, "step": step,
                 "config": dataclasses.asdict(cfg), "model_config": dataclasses.asdict(model.config),
                 "rng": every_rank}
        atomic_save(state, path, keep_previous=True)


def atomic_save(obj, path, keep_previous=False):
    """torch.save with a checksum of everything in obj, written to a temporary file and renamed over path (a
    kill mid-write leaves the previous file intact); keep_previous keeps the file it replaces as *.prev.pt."""
    torch.save({**obj, "sha256": digest(obj)}, path + ".tmp")
    if keep_previous and os.path.exists(path):
        os.replace(path, previous(path))
    os.replace(path + ".tmp", path)


def previous(path):
    return path[:-len(".pt")] + ".prev.pt"


def digest(obj):
    """SHA-256 of a checkpoint's contents: tensors by dtype, shape and bytes, everything else by value."""
    h = hashlib.sha256()

    def walk(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(x, dict):
            h.update(b"{")
            for key in sorted(x, key=str):
                h.update(repr(key).encode())
                walk(x[key])
            h.update(b"}")
        elif isinstance(x, (list, tuple)):  # a tuple may come back from torch.load as a list
            h.update(b"[")
            for item in x:
                walk(item)
            h.update(b"]")
        else:
            h.update(repr(x).encode())
    walk(obj)
    return h.hexdigest()


def read_checkpoint(path):
    """A checkpoint of ours, verified against the checksum it was saved with. Raises CheckpointError."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except Exception as e:  # torch's own message would even suggest weights_only=False: never
        raise CheckpointError(f"{path} is not a readable checkpoint: truncated or corrupt "
                              f"({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "sha256" not in ckpt:
        raise CheckpointError(f"{path} is not a checkpoint of this project (it has no checksum)")
    saved = ckpt.pop("sha256")
    if digest(ckpt) != saved:
        raise CheckpointError(f"{path} is corrupt: its contents do not match the checksum they were saved with")
    return ckpt


class CheckpointError(Exception):
    pass


def run_tokenizer(cfg, task):
    """The task's tokenizer; GPT-2's weights mean GPT-2's token ids, so a run that started from a GPT-2
    directory reads its task through GPT-2's tokenizer."""
    return gpt2_encoding(cfg.init_from, task_specials=True) if os.path.isdir(cfg.init_from) else task.tokenizer()


def load_run(run_dir):
    """(model, tokenizer, config) of a run folder: its config.json and its latest good checkpoint, on the CPU,
    in eval mode. For export.py and sample.py."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise SystemExit(f"error: {run_dir} is not a run folder (no config.json)")
    with open(path) as f:
        saved = json.load(f)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    if not isinstance(saved, dict) or set(saved) - known:
        raise SystemExit(f"error: {path} is not a config of this train.py")
    cfg = TrainConfig(**saved)
    ckpt, _ = latest_checkpoint(run_dir)
    model = GPT(config_from_dict(ckpt["model_config"]))
    load_state_dict_checked(model, ckpt["model"], source=run_dir)
    return model.eval(), run_tokenizer(cfg, importlib.import_module(f"data.{cfg.task}")), cfg


def latest_checkpoint(out_dir):
    """(checkpoint, path): ckpt.pt, or when it fails its check, the one before it (ckpt.prev.pt)."""
    path = os.path.join(out_dir, "ckpt.pt")
    try:
        return read_checkpoint(path), path
    except CheckpointError as e:
        try:
            ckpt = read_checkpoint(previous(path))
        except CheckpointError as e2:
            raise SystemExit(f"error: no good checkpoint to resume from:\n  {e}\n  {e2}") from None
        print(f"warning: {e}; resuming from the one before it, {previous(path)} (step {ckpt['step']})")
        return ckpt, previous(path)


def load_checkpoint(ckpt, path, model, optimizer, rng, generator):
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if len(ckpt["rng"]) != world:
        raise SystemExit(f"error: {path} was written by {len(ckpt['rng'])} processes; resume it with as many "
                         f"(this run has {world}), so that each one continues its own random streams")
    load_state_dict_checked(model, ckpt["model"], source=path)
    optimizer.load_state_dict(ckpt["optimizer"])
    streams = ckpt["rng"][rank]
    py = streams["python"]
    rng.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(streams["torch"])
    generator.set_state(streams["generator"])  # a CPU byte tensor, for a CUDA generator too
    return ckpt["stage"], ckpt["step"]


def truncate_logs(out_dir, stage, step):
    """Drop log lines written after the checkpoint we resume from: they will be written again. The evaluation
    at GRPO step s + 1 is logged before checkpoint s, and the resumed run does not redo it, so it stays."""
    def keep(record):
        if stage == "sft":
            return record["stage"] == "sft" and record["step"] <= step
        return (record["stage"] == "sft" or (record["stage"] == "grpo" and record["step"] <= step)
                or (record["stage"] in ("eval", "samples") and record["step"] <= step + 1))

    for name in ("metrics.jsonl", "samples.jsonl"):
        path = os.path.join(out_dir, name)
        if os.path.exists(path):
            with open(path) as f:
                records = [json.loads(line) for line in f if line.strip()]
            with open(path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in records if keep(r))


# ----------------------------------------------------------------------------------------------------------------
# Evaluation: the model as a task player (greedy, as it will be used)


def end_and_pad(enc):
    """The ids of <|end|> (stops a completion) and <|pad|> in the run's tokenizer."""
    return enc.encode_single_token("<|end|>"), enc.encode_single_token("<|pad|>")


def model_player(model, enc, task, max_new_tokens, autocast, temperature=0.0, generator=None):
    """The model as a task player: greedy by default (as it will be used), or sampled at a temperature."""
    end, pad = end_and_pad(enc)

    def play(examples):
        prompts = [enc.encode(task.prompt(ex), allowed_special="all") for ex in examples]
        texts = []
        for i in range(0, len(prompts), 256):
            with autocast:
                s = sample(model, prompts[i:i + 256], max_new_tokens=max_new_tokens, temperature=temperature,
                           stop_token=end, pad_token=pad, generator=generator)
            texts += [enc.decode(tokens) for tokens in s.completion_tokens(end)]
        return texts
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


def log(run, record, line=None):
    """One JSON object per line in metrics.jsonl (rank 0), and optionally a dense line on the terminal."""
    if run["rank"] != 0:
        return
    with open(os.path.join(run["out_dir"], "metrics.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
    if run["wandb"] is not None:
        run["wandb"].log({f"{record['stage']}/{k}": v for k, v in record.items()
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


def main(argv):
    cfg = parse_config(argv)
    if cfg.resume and os.path.exists(os.path.join(cfg.out_dir, "eval.json")):
        print(f"{cfg.out_dir} is a finished run (its final table is in eval.json): nothing to resume")
        return None
    rank, world = setup_distributed(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg)
    autocast, dtype = pick_autocast(cfg, device)
    prepare_out_dir(cfg, rank)
    if dist.is_initialized():
        dist.barrier()  # rank 0 has checked and prepared the run folder
    task = importlib.import_module(f"data.{cfg.task}")
    sft_player = cfg.sft_player or task.DEFAULT_PLAYER
    if sft_player not in task.reference_players():
        raise SystemExit(f"error: --sft_player={sft_player!r} is not one of {', '.join(task.reference_players())}")
    enc = run_tokenizer(cfg, task)
    end, pad = end_and_pad(enc)

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = build_model(cfg, enc.n_vocab)
    if cfg.lora_rank:
        try:
            check_lora_rank(cfg.lora_rank, model.config)  # now, not after the warm start
        except ValueError as e:
            raise SystemExit(f"error: --{e}") from None
    if cfg.init_from == "scratch" and hasattr(task, "init_embeddings"):
        task.init_embeddings(model.transformer.wte.weight, enc)  # a task may seed structure into its tokens
    model.to(device)
    if cfg.compile:
        model.hidden_states = torch.compile(model.hidden_states, dynamic=True)  # state_dict keys stay unprefixed
    rng = random.Random(cfg.seed + 1000 * rank)  # each rank draws its own data
    generator = torch.Generator(device).manual_seed(cfg.seed + 1000 * rank)
    optimizer = make_optimizer(model, cfg.sft_lr, cfg.weight_decay)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    stage, step = "sft", 0
    if cfg.resume:
        ckpt, loaded_from = latest_checkpoint(cfg.out_dir)
        saved = ckpt["model_config"]
        if saved.get("lora_rank"):  # it stopped in a LoRA stage 2: the adapters come first
            add_lora(model, saved["lora_rank"], saved["lora_alpha"], saved["lora_mlp"])
            optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
        stage, step = load_checkpoint(ckpt, loaded_from, model, optimizer, rng, generator)
        if rank == 0:
            truncate_logs(cfg.out_dir, stage, step)
            print(f"resumed {cfg.out_dir} at {stage} step {step}")
        step += 1
    resumed_in_grpo = cfg.resume and stage == "grpo"
    run = {"rank": rank, "out_dir": cfg.out_dir, "wandb": None}
    if cfg.wandb and rank == 0:
        import wandb  # optional, never required
        run["wandb"] = wandb.init(project="nanogrpo", config=dataclasses.asdict(cfg), resume="allow")
    if rank == 0:
        print(f"task {cfg.task} | device {device} ({dtype}) x{world} | {model.num_params() / 1e6:.2f}M parameters "
              f"+ {model.transformer.wte.weight.numel() / 1e6:.2f}M embedding | vocab {enc.n_vocab}")

    def checkpoint(stage_, step_):  # every process: each one's random streams go into the checkpoint
        save_checkpoint(ckpt_path, model, optimizer, cfg, stage_, step_, rng, generator)

    # ---- Stage 1: warm start ------------------------------------------------------------------------------------
    if stage == "sft" and cfg.sft_steps > 0:
        t0 = time.time()
        learner = grpo.data_parallel(model)  # the log-probs; under torchrun it averages the gradients
        bar = tqdm(range(step, cfg.sft_steps), desc="warm start", disable=rank != 0, initial=step,
                   total=cfg.sft_steps)
        for step in bar:
            pairs = task.demonstrations(cfg.sft_batch_size // world, rng, sft_player)  # each its own share
            tokens, valid, start, mask = sft_batch(pairs, enc, device)
            lr = sft_lr(step, cfg.sft_steps, cfg.sft_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            model.train()
            with autocast:
                logp, _ = learner(tokens, start, valid)
            loss = -(logp * mask).sum() / mask.sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            record = average_across_ranks({"loss": loss.item(), "lr": lr})
            bar.set_postfix(loss=f"{record['loss']:.3f}")
            log(run, {"stage": "sft", "step": step, **record, "time_s": time.time() - t0})
            if (step + 1) % cfg.checkpoint_interval == 0 or step == cfg.sft_steps - 1:
                checkpoint("sft", step)
        bar.close()
    if stage == "sft":  # stage 1 is done (or has no steps)
        stage, step = "grpo", 0

    # ---- Stage 2: GRPO ---------------------------------------------------------------------------------------------
    evals = {}
    warm_path = os.path.join(cfg.out_dir, "warm_start.pt")
    if not resumed_in_grpo:
        if rank == 0:  # the model as stage 1 left it: the KL reference, and for comparisons later
            atomic_save({"model": model.state_dict(), "model_config": dataclasses.asdict(model.config)}, warm_path)
        evals["warm start"] = evaluate_and_log(run, model, enc, task, cfg, autocast, step=0)
        if cfg.lora_rank:  # from here on only the adapters train
            add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_mlp)
        # A fresh optimizer: the warm start's AdamW moments would move the weights even when every advantage
        # is 0 (measured: up to 5e-5 on the first step), a push from the supervised loss, not from rewards.
        optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
        checkpoint("grpo", -1)  # so a resume from here does not redo stage 1
    learner = grpo.data_parallel(model)  # after add_lora: DDP hooks the parameters that train
    reference = None
    if cfg.beta > 0 and cfg.lora_rank:
        reference = grpo.LORA_BASE  # the policy with its adapters off: the warm-start model
    elif cfg.beta > 0:  # the frozen warm-start policy; with beta = 0 no second model exists at all
        reference = GPT(model.config).to(device).eval().requires_grad_(False)
        try:
            load_state_dict_checked(reference, read_checkpoint(warm_path)["model"], source=warm_path)
        except CheckpointError as e:
            raise SystemExit(f"error: the KL reference: {e}") from None
    try:
        weights = [float(w) for w in cfg.reward_weights.split(",")] if cfg.reward_weights else None
    except ValueError:
        raise SystemExit(f"error: --reward_weights={cfg.reward_weights!r} is not comma-separated numbers") from None
    reward_fns, default_weights = task.reward_functions()
    if weights is not None and len(weights) != len(reward_fns):
        raise SystemExit(f"error: --reward_weights has {len(weights)} values for {len(reward_fns)} rewards "
                         f"({', '.join(f.__name__ for f in reward_fns)})")
    grpo_config = grpo.GRPOConfig(
        group_size=cfg.group_size, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
        stop_token=end, pad_token=pad, scale_rewards=cfg.scale_rewards,
        eps_low=cfg.eps_low, eps_high=cfg.eps_high, beta=cfg.beta, loss_type=cfg.loss_type,
        importance_level=cfg.importance_level, num_iterations=cfg.num_iterations,
        minibatch_size=cfg.minibatch_size or None, max_grad_norm=cfg.max_grad_norm,
        reward_weights=tuple(weights or default_weights), dynamic_sampling=cfg.dynamic_sampling,
        overlong_buffer=cfg.overlong_buffer, mask_truncated=cfg.mask_truncated)
    prompts_here = cfg.prompts_per_step // world

    def draw(n):
        examples = task.training_examples(n, rng)
        return [enc.encode(task.prompt(ex), allowed_special="all") for ex in examples], examples

    t0 = time.time()
    for step in range(max(step, 0), cfg.grpo_steps):
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / 5)
        prompts, examples = draw(prompts_here)
        try:
            metrics = grpo.grpo_step(model, optimizer, prompts, examples, reward_fns, grpo_config,
                                     reference=reference, generator=generator, decode=enc.decode, refill=draw,
                                     autocast=autocast, learner=learner)
        except FloatingPointError as e:  # raised before the optimizer step: the weights are still good
            raise SystemExit(f"error: stopped at GRPO step {step}: {e}. The last good checkpoint is {ckpt_path}")
        m = average_across_ranks(metrics)
        log(run, {"stage": "grpo", "step": step, **m, "time_s": time.time() - t0},
            f"step {step:4d} | reward {m['reward_mean']:.3f} ± {m['reward_std']:.3f} | "
            f"zero-std {m['zero_std_frac']:.2f} | clip {m.get('clip_low_frac', 0) + m.get('clip_high_frac', 0):.3f} | "
            f"kl {m.get('kl', 0):.4f} | ent {m.get('entropy', 0):.2f} | len {m['completion_len']:.1f} | "
            f"{m['time_sample_s'] + m['time_learn_s']:.2f} s")
        if (step + 1) % cfg.eval_interval == 0 and step + 1 < cfg.grpo_steps:
            evaluate_and_log(run, model, enc, task, cfg, autocast, step=step + 1)
        if (step + 1) % cfg.checkpoint_interval == 0 or step == cfg.grpo_steps - 1:
            checkpoint("grpo", step)

    # ---- Final table ------------------------------------------------------------------------------------------------
    if "warm start" not in evals:
        evals["warm start"] = previous_eval(cfg.out_dir, step=0)
    evals["GRPO"] = evaluate_and_log(run, model, enc, task, cfg, autocast, step=cfg.grpo_steps)
    if rank == 0:
        if cfg.reference_players:
            for name, player in task.reference_players(random.Random(cfg.seed)).items():
                evals[f"player: {name}"] = task.evaluate(player, cfg.eval_games)
        table = {name: {k: v for k, v in r.items() if k != "transcripts"} for name, r in evals.items() if r}
        with open(os.path.join(cfg.out_dir, "eval.json"), "w") as f:
            json.dump(table, f, indent=1)
        print_table(table, task.HEADLINE)
    if dist.is_initialized():
        dist.destroy_process_group()
    return evals


def evaluate_and_log(run, model, enc, task, cfg, autocast, step):
    result = evaluate_model(model, enc, task, cfg, autocast) if run["rank"] == 0 else None
    if run["rank"] == 0:
        summary = {k: v for k, v in result.items() if k != "transcripts"}
        log(run, {"stage": "eval", "step": step, **summary},
            f"eval @ {step} | " + " | ".join(f"{k} {v:.3f}" for k, v in summary.items() if isinstance(v, float)))
        with open(os.path.join(cfg.out_dir, "samples.jsonl"), "a") as f:
            f.write(json.dumps({"stage": "samples", "step": step, "transcripts": result.get("transcripts", [])}) + "\n")
    if dist.is_initialized():
        dist.barrier()
    return result


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
