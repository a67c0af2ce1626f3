"""
Checkpoints and run folders: atomic, verified, complete enough that a resumed run equals an uninterrupted one.

A checkpoint holds the model's state dict (uncompiled names), the optimizer, the stage and step, the run's config
and model config as plain data, every process's random streams, and a SHA-256 of all of that, checked whenever it
is read. Saving renames the previous checkpoint to ckpt.prev.pt, so a corrupt ckpt.pt never costs the run.
"""

import dataclasses
import hashlib
import json
import os

import torch
import torch.distributed as dist

from config import TrainConfig
from data import load_task, run_tokenizer
from hf import load_gpt2
from model import GPT, GPTConfig, merge_lora


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
# Run folders


RUN_FILES = ("config.json", "metrics.jsonl", "samples.jsonl", "eval.json", "ckpt.pt", "ckpt.prev.pt",
             "warm_start.pt")


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


def warm_start_path(cfg):
    return os.path.join(cfg.out_dir, "warm_start.pt")


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
    return model.eval(), run_tokenizer(load_task(cfg.task), cfg.init_from), cfg


def load_model(init_from, vocab_size):
    """--init_from: a GPT-2 directory (Hugging Face's layout), or a checkpoint of ours, whose LoRA adapters, if it
    has any, are folded in (a plain model to start from). vocab_size is the run's tokenizer's."""
    if os.path.isdir(init_from):
        model = load_gpt2(init_from)
        if model.config.vocab_size < vocab_size:
            raise SystemExit(f"error: {init_from} has {model.config.vocab_size} token embeddings but its "
                             f"tokenizer has {vocab_size} tokens")
        return model
    try:
        ckpt = read_checkpoint(init_from)
    except CheckpointError as e:
        raise SystemExit(f"error: --init_from: {e}") from None
    config = config_from_dict(ckpt["model_config"])
    if config.vocab_size != vocab_size:
        raise SystemExit(f"error: {init_from} was trained with a vocabulary of {config.vocab_size}, the task's "
                         f"tokenizer has {vocab_size}")
    model = GPT(config)
    load_state_dict_checked(model, ckpt["model"], source=init_from)
    return merge_lora(model) if config.lora_rank else model


def logged_eval(out_dir, step):
    """The logged evaluation at a step (a resumed run evaluated its warm start before it was killed)."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        found = [json.loads(line) for line in f if line.strip()]
    found = [r for r in found if r["stage"] == "eval" and r["step"] == step]
    return {k: v for k, v in found[-1].items() if k not in ("stage", "step")} if found else None


def load_state_dict_checked(model, state, source="checkpoint"):
    """load_state_dict that names every missing, unexpected or wrongly shaped tensor."""
    ours = model.state_dict()
    missing = sorted(set(ours) - set(state))
    unexpected = sorted(set(state) - set(ours))
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(ours[k].shape)}"
             for k in ours if k in state and state[k] is not None and state[k].shape != ours[k].shape]
    problems = ([f"missing {k}" for k in missing] + [f"unexpected {k}" for k in unexpected] + wrong)
    if problems:
        hint = ""
        if any(".lora_" in k for k in missing):
            hint += "\n  (the model has LoRA adapters the checkpoint lacks)"
        if any(".lora_" in k for k in unexpected):
            hint += "\n  (the checkpoint has LoRA adapters the model lacks: build it with the same lora_rank)"
        raise ValueError(f"{source} does not match the model:\n  " + "\n  ".join(problems[:20]) + hint)
    model.load_state_dict(state)


def config_from_dict(d):
    """GPTConfig from plain data (our checkpoints store it so), rejecting unknown keys."""
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown GPTConfig keys {sorted(unknown)}; known: {sorted(known)}")
    return GPTConfig(**d)
