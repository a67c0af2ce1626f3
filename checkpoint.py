"""
Checkpoints and run folders: atomic, verified, complete enough that a resumed run equals an uninterrupted one.

A checkpoint holds the model's state dict (uncompiled names), the optimizer, the stage and step, the run's config
and model config as plain data, every process's random streams, and a SHA-256 of all of that, checked whenever it
is read. Saving renames the previous checkpoint to ckpt.prev.pt, so a corrupt ckpt.pt never costs the run.
"""

import dataclasses
import fcntl
import hashlib
import json
import os
import time
import uuid

import torch
import torch.distributed as dist

from config import read_run_config
from data import load_task, task_names
from data.tokenizer import gpt2_encoding
from hf import exported_task, load_gpt2
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
    """torch.save with a checksum of everything in obj, written to a temporary file, flushed to the disk and
    renamed over path (a kill or a power cut mid-write leaves the previous file intact); keep_previous keeps the
    file it replaces as *.prev.pt."""
    with open(path + ".tmp", "wb") as f:
        torch.save({**obj, "sha256": digest(obj)}, f)
        f.flush()
        os.fsync(f.fileno())
    if keep_previous and os.path.exists(path):
        os.replace(path, previous(path))
    os.replace(path + ".tmp", path)
    sync_folder(path)


def atomic_write(path, text):
    """A text file replaced whole or not at all: written beside, flushed to the disk, renamed over path."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    sync_folder(path)


def sync_folder(path):
    """The rename itself on the disk: fsync the folder that holds path."""
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    try:
        load_state_dict_checked(model, ckpt["model"], source=path)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    optimizer.load_state_dict(ckpt["optimizer"])
    streams = ckpt["rng"][rank]
    py = streams["python"]
    rng.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(streams["torch"])
    generator.set_state(streams["generator"])  # a CPU byte tensor, for a CUDA generator too
    return ckpt["stage"], ckpt["step"]


def truncate_logs(out_dir, stage, step):
    """Drop log lines written after the checkpoint we resume from: they will be written again. The evaluation
    at GRPO step s + 1 is logged before checkpoint s, and the resumed run does not redo it, so it stays. Each log
    is rewritten whole or not at all."""
    def keep(record):
        if stage == "sft":
            return record["stage"] == "sft" and record["step"] <= step
        return (record["stage"] == "sft" or (record["stage"] == "grpo" and record["step"] <= step)
                or (record["stage"] in ("eval", "samples") and record["step"] <= step + 1))

    for name in ("metrics.jsonl", "samples.jsonl"):
        path = os.path.join(out_dir, name)
        if os.path.exists(path):
            atomic_write(path, "".join(json.dumps(r) + "\n" for r in read_log(path) if keep(r)))


def read_log(path):
    """The records of a JSON-lines log. A last line cut short (a crash or a full disk mid-write) is dropped with
    a warning; a bad line before it means the file was damaged otherwise, and is an error naming it."""
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    records = []
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            if not (isinstance(record, dict) and isinstance(record.get("stage"), str)
                    and isinstance(record.get("step"), int)):
                raise ValueError("not a record with a stage and a step")
        except ValueError as e:
            if n < len(lines):
                raise SystemExit(f"error: {path}, line {n}, is not a log record ({e}): the log is damaged"
                                 ) from None
            print(f"warning: {path}: its last line is cut short ({len(line)} characters); it is dropped")
            break
        records.append(record)
    return records


# ----------------------------------------------------------------------------------------------------------------
# Run folders. A run folder is known by its marker, run.json, written when the run starts; one process owns it at
# a time (an OS lock on run.lock, released when the process ends, however it ends).

RUN_MARKER, LOCK = "run.json", "run.lock"
OUTPUTS = ("metrics.jsonl", "samples.jsonl", "eval.json", "ckpt.pt", "ckpt.prev.pt", "warm_start.pt")
RUN_FILES = (RUN_MARKER, "config.json") + OUTPUTS


def prepare_out_dir(cfg, rank):
    """Rank 0 locks the run folder for the life of the process and checks what it holds: an empty folder, or one
    whose run stopped before writing anything, starts the run; a run with outputs needs --resume (to continue
    it) or --overwrite (to replace it); files that are not a run of this project are refused unless --overwrite,
    and even then only the run's own file names are replaced. The other ranks wait at a barrier. Returns the
    lock's open file (rank 0), to be held while the run lasts."""
    if rank != 0:
        return None
    os.makedirs(cfg.out_dir, exist_ok=True)
    lock = lock_folder(cfg.out_dir)
    there = sorted(set(os.listdir(cfg.out_dir)) - {LOCK})
    outputs = [name for name in OUTPUTS if name in there]
    foreign = [name for name in there if name not in RUN_FILES and not name.endswith(".tmp")]
    is_run = RUN_MARKER in there or "ckpt.pt" in there or "ckpt.prev.pt" in there  # marked, or older than marks
    if cfg.resume:
        if not ("ckpt.pt" in there or "ckpt.prev.pt" in there):
            raise SystemExit(f"error: --resume but {cfg.out_dir} has no checkpoint (the run stopped before its "
                             f"first one): run the same command without --resume to start it again")
        return lock  # config.json is the run's, and stays as it is
    if not cfg.overwrite:
        if foreign or (there and not is_run):
            raise SystemExit(f"error: {cfg.out_dir} holds files that are not a run of this project "
                             f"({', '.join(there[:8])}{', ...' if len(there) > 8 else ''}): choose another "
                             f"--out_dir, or pass --overwrite to write a run there (its own files replace any of "
                             f"the same name; the others stay)")
        if outputs:
            raise SystemExit(f"error: {cfg.out_dir} already holds a run ({', '.join(outputs)}); pass --resume to "
                             f"continue it or --overwrite to replace it (or choose another --out_dir)")
    for name in RUN_FILES:  # a run that stopped before any output, or --overwrite: the run's own files go
        if os.path.exists(os.path.join(cfg.out_dir, name)):
            os.remove(os.path.join(cfg.out_dir, name))
    atomic_write(os.path.join(cfg.out_dir, "config.json"), json.dumps(dataclasses.asdict(cfg), indent=1))
    atomic_write(os.path.join(cfg.out_dir, RUN_MARKER), json.dumps(
        {"project": "nanogrpo", "run": uuid.uuid4().hex, "task": cfg.task, "started": time.strftime("%F %T")}))
    return lock


def lock_folder(folder):
    """An exclusive lock on folder/run.lock for as long as the returned file stays open (the OS drops it when
    the process ends); a second process is refused at once, told the first one's process id."""
    f = open(os.path.join(folder, LOCK), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        owner = f.read().strip() or "unknown"
        f.close()
        raise SystemExit(f"error: {folder} is in use by another process (pid {owner}); wait for it to finish, "
                         f"or choose another --out_dir") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def warm_start_path(cfg):
    return os.path.join(cfg.out_dir, "warm_start.pt")


def load_run(run_dir, warm_start=False):
    """(model, tokenizer, config) of a run folder: its config.json and its latest good checkpoint (or, with
    warm_start, the model as stage 1 left it), on the CPU, in eval mode. For export.py and sample.py."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise SystemExit(f"error: {run_dir} is not a run folder (no config.json)")
    cfg = dataclasses.replace(read_run_config(path), out_dir=run_dir)  # the folder, wherever it now is
    try:
        if warm_start:
            ckpt = read_checkpoint(os.path.join(run_dir, "warm_start.pt"))
        else:
            ckpt, _ = latest_checkpoint(run_dir)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    try:
        model = GPT(config_from_dict(ckpt["model_config"]))
        load_state_dict_checked(model, ckpt["model"], source=run_dir)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    return model.eval(), run_tokenizer(load_task(cfg.task), cfg.init_from), cfg


def run_tokenizer(task, init_from):
    """The run's tokenizer: the task's own, except that GPT-2's weights mean GPT-2's token ids, so a run that
    starts from a GPT-2 directory reads its task through GPT-2's tokenizer. A directory this project exported
    holds the task's own tokenizer, which is used as it is (its task's tokens must be this task's)."""
    if not os.path.isdir(init_from):
        return task.tokenizer()
    try:
        exported, from_gpt2 = exported_task(init_from)
        if exported is None or from_gpt2:
            return gpt2_encoding(init_from, task_specials=True)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: --init_from: {e}") from None
    enc = task.tokenizer()
    theirs = load_task(exported).tokenizer() if exported in task_names() else None
    if theirs is None or (theirs.name, theirs.n_vocab) != (enc.name, enc.n_vocab):
        raise SystemExit(f"error: --init_from={init_from} was exported from a {exported} run, whose tokens are "
                         f"not the {task.name} task's: train it with --task={exported}")
    return enc


def logged_eval(out_dir, step):
    """The logged evaluation at a step (a resumed run evaluated its warm start before it was killed)."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    found = [r for r in read_log(path) if r["stage"] == "eval" and r["step"] == step]
    return {k: v for k, v in found[-1].items() if k not in ("stage", "step")} if found else None


def load_model(init_from, vocab_size):
    """--init_from: a GPT-2 directory (Hugging Face's layout), or a checkpoint of ours, whose LoRA adapters, if it
    has any, are folded in (a plain model to start from). vocab_size is the run's tokenizer's."""
    if os.path.isdir(init_from):
        try:
            model = load_gpt2(init_from)
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"error: --init_from: {e}") from None
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
    try:
        load_state_dict_checked(model, ckpt["model"], source=init_from)
    except ValueError as e:
        raise SystemExit(f"error: --init_from: {e}") from None
    return merge_lora(model) if config.lora_rank else model


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
    for name, value in state.items():
        if value.is_floating_point() and not bool(value.isfinite().all()):
            raise ValueError(f"{source}: tensor {name} holds values that are not finite (NaN or inf)")
    model.load_state_dict(state)


def config_from_dict(d):
    """GPTConfig from plain data (our checkpoints store it so), rejecting unknown keys."""
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown GPTConfig keys {sorted(unknown)}; known: {sorted(known)}")
    return GPTConfig(**d)
