"""
train.py's configuration: every flag (grpo.GRPOConfig's knobs and the run's own), its checks, the command line
and --resume's comparison with the run's saved config. Every flag and every combination is checked here, before
anything is built.

    --key=value or --key value; a boolean flag alone means true (--dynamic_sampling), or takes a value
    (--overwrite=false). Defaults: the field's below, then the task's TRAIN_DEFAULTS, then the command line.
"""

import dataclasses
import difflib
import json
import math
import os
import sys
import typing
from dataclasses import dataclass

from data import load_task, task_names
from grpo import GRPOConfig, knob
from hf import read_json


def flag(default, help, group, low=None, choices=None):
    """A run's own flag: a knob (checked as GRPOConfig's are) that --help lists under `group`."""
    return knob(default, help, low, choices, group=group)


@dataclass
class TrainConfig(GRPOConfig):
    """The flags: every GRPO knob of grpo.GRPOConfig, and the run's own below (--help shows them in groups)."""
    # task and run
    task: str = flag("addition", "a task module of data/ (addition is the default run)", "task and run")
    out_dir: str = flag("runs/default", "run folder", "task and run")
    resume: bool = flag(False, "continue the run in out_dir from its checkpoint, as configured", "task and run")
    overwrite: bool = flag(False, "replace a finished or different run in out_dir", "task and run")
    init_from: str = flag("scratch", "scratch, a checkpoint of ours (.pt), or a local GPT-2 directory (HF layout)",
                          "task and run")
    seed: int = flag(1337, "seed of the run (model init, data, sampling)", "task and run")
    device: str = flag("auto", "auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps", "task and run")
    dtype: str = flag("auto", "autocast dtype: auto (bfloat16 on cuda, else float32), float32, bfloat16",
                      "task and run", choices=("auto", "float32", "bfloat16"))
    compile: bool = flag(False, "torch.compile the model's forward pass", "task and run")
    threads: int = flag(0, "CPU threads for torch; 0 keeps torch's default", "task and run", low=0)
    checkpoint_interval: int = flag(50, "steps between checkpoints, in either stage", "task and run", low=1)
    wandb: bool = flag(False, "also log to Weights & Biases (needs wandb, installed and set up)", "task and run")
    # model (ignored when init_from loads one)
    n_layer: int = flag(4, "transformer blocks", "model", low=1)
    n_head: int = flag(4, "attention heads", "model", low=1)
    n_embd: int = flag(128, "model width", "model", low=1)
    block_size: int = flag(256, "context length, tokens", "model", low=1)
    # stage 1: supervised warm start
    sft_steps: int = flag(1500, "warm-start optimizer steps (0 skips the stage)", "warm start", low=0)
    sft_batch_size: int = flag(64, "demonstrations per warm-start step", "warm start", low=1)
    sft_lr: float = flag(3e-3, "warm-start peak learning rate (warmup, then cosine to 10%)", "warm start")
    sft_player: str = flag("", "reference player whose answers are the demonstrations; empty = the task's",
                           "warm start")
    # stage 2: GRPO (the algorithm's knobs are GRPOConfig's)
    grpo_steps: int = flag(300, "GRPO iterations (0 skips the stage)", "GRPO", low=0)
    prompts_per_step: int = flag(16, "prompts per GRPO step (split across processes)", "GRPO", low=1)
    lr: float = flag(3e-4, "GRPO learning rate (constant after a 5-step warmup)", "GRPO")
    weight_decay: float = flag(0.0, "AdamW weight decay on matrices", "GRPO", low=0)
    lora_rank: int = flag(0, "GRPO trains rank-r LoRA adapters only (base frozen, KL reference = adapters off); "
                             "0 = off", "GRPO", low=0)
    lora_alpha: float = flag(16.0, "LoRA output scale alpha / rank", "GRPO")
    lora_mlp: bool = flag(False, "LoRA adapters on the MLP projections too, not only attention", "GRPO")
    # evaluation
    eval_interval: int = flag(100, "GRPO steps between evaluations", "evaluation", low=1)
    eval_games: int = flag(200, "held-out games (or problems) per evaluation", "evaluation", low=1)
    log_samples: int = flag(4, "decoded games saved to samples.jsonl at each evaluation", "evaluation", low=0)
    reference_players: bool = flag(True, "evaluate the task's reference players for the final table", "evaluation")

    def __post_init__(self):
        super().__post_init__()  # every field's range (check_knobs), and GRPOConfig's own combinations
        world = int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun; checked before any process group exists
        if self.prompts_per_step % world or self.sft_batch_size % world:
            raise ValueError(f"--prompts_per_step and --sft_batch_size must be multiples of the {world} processes "
                             f"(each process takes an equal share)")
        if not (self.lr > 0 and self.sft_lr > 0 and math.isfinite(self.lr) and math.isfinite(self.sft_lr)):
            raise ValueError("learning rates must be positive")
        if not (self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:")):
            raise ValueError(f"--device={self.device!r} is not auto, cpu, cuda, cuda:N or mps")


GROUPS = ("task and run", "model", "warm start", "GRPO", "evaluation")  # --help's order: the run's own first
NOT_FLAGS = ("stop_token", "pad_token")  # set from the tokenizer
# No setting of the algorithm. --threads changes the rounding of CPU sums (one thread and two give different
# runs), so a resume keeps the run's own count, and its wandb choice, unless the command line gives them.
SAFE_TO_CHANGE_ON_RESUME = ("resume", "overwrite", "threads", "wandb")


def flags():
    return {f.name: f for f in dataclasses.fields(TrainConfig) if f.name not in NOT_FLAGS}


def parse_config(argv, usage=""):
    """The run's TrainConfig from the command line: every flag and every combination checked. --help prints
    `usage`, then every flag in its group, with its default."""
    known = flags()
    if any(a in ("-h", "--help") for a in argv):
        print_help(known, usage)
        sys.exit(0)
    values = parse_flags(argv, known)
    given = set(values)  # the command line's own flags: --resume checks these against the run, not task defaults
    try:
        task = load_task(values.get("task", TrainConfig.task))
        not_flags = sorted(set(task.train_defaults) - set(known))
        if not_flags:
            raise SystemExit(f"error: data/{task.name}.py's TRAIN_DEFAULTS sets {', '.join(not_flags)}, not a "
                             f"flag of train.py")
        reward_fns, weights = task.reward_functions()
        # The one place where defaults meet: the fields' own, the task's, the command line's.
        cfg = TrainConfig(**{"reward_weights": tuple(weights), **task.train_defaults, **values})
    except ValueError as e:
        message = str(e)
        raise SystemExit(f"error: {'--' if message.split('=')[0].split()[0] in known else ''}{message}") from None
    if len(cfg.reward_weights) != len(reward_fns):
        raise SystemExit(f"error: --reward_weights has {len(cfg.reward_weights)} values for {len(reward_fns)} "
                         f"rewards ({', '.join(f.__name__ for f in reward_fns)})")
    if task.eval_limit is not None and cfg.eval_games > task.eval_limit:
        raise SystemExit(f"error: --eval_games={cfg.eval_games} is more than the {task.eval_limit} held-out games "
                         f"the {cfg.task} task has")
    if (cfg.sft_player or task.default_player) not in task.reference_players():
        raise SystemExit(f"error: --sft_player={cfg.sft_player!r} is not one of "
                         f"{', '.join(task.reference_players())}")
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise SystemExit(f"error: --out_dir={cfg.out_dir} is a file, not a folder")
    if cfg.init_from != "scratch" and not (os.path.isfile(cfg.init_from) or
                                           os.path.isfile(os.path.join(cfg.init_from, "config.json"))):
        what = "a folder without config.json" if os.path.isdir(cfg.init_from) else "not there"
        raise SystemExit(f"error: --init_from={cfg.init_from} is {what}: give scratch, a checkpoint of this "
                         f"project (.pt), or a Hugging Face GPT-2 directory (config.json and its weights)")
    if cfg.resume:
        cfg = resumed_config(cfg, given)
    return cfg


def parse_flags(argv, known):
    """{name: typed value} of `--key=value`, `--key value` and a lone boolean `--key`."""
    values, i = {}, 0
    while i < len(argv):
        arg, i = argv[i], i + 1
        if not arg.startswith("--"):
            raise SystemExit(f"error: expected --key=value or --key value, got {arg!r}")
        key, has_value, raw = arg[2:].partition("=")
        if key not in known:
            close = ", ".join("--" + c for c in difflib.get_close_matches(key, known, n=3))
            hint = f"did you mean {close}?" if close else "see --help"
            raise SystemExit(f"error: unknown option --{key}; {hint}")
        kind = flag_type(known[key])
        next_is_value = i < len(argv) and not argv[i].startswith("--")
        if not has_value and kind is bool and not (next_is_value and argv[i].lower() in BOOLEANS):
            values[key] = True
            continue
        if not has_value:
            if not next_is_value:
                raise SystemExit(f"error: --{key} needs a value: --{key}=VALUE or --{key} VALUE")
            raw, i = argv[i], i + 1
        try:
            values[key] = parse_value(raw, kind)
        except ValueError:
            raise SystemExit(f"error: --{key}={raw!r} is not a valid {describe(kind)}") from None
    return values


BOOLEANS = {**dict.fromkeys(("1", "true", "yes", "on"), True), **dict.fromkeys(("0", "false", "no", "off"), False)}


def flag_type(f):
    """A field's type, Optional[...] unwrapped."""
    if typing.get_origin(f.type) is typing.Union:
        return next(t for t in typing.get_args(f.type) if t is not type(None))
    return f.type


def describe(kind):
    return "comma-separated list of numbers" if kind is tuple else kind.__name__


def parse_value(raw, kind):
    if kind is bool:
        if raw.lower() not in BOOLEANS:
            raise ValueError(raw)
        return BOOLEANS[raw.lower()]
    if kind is tuple:
        return tuple(parse_value(part, float) for part in raw.split(","))
    value = kind(raw)
    if kind is float and not math.isfinite(value):
        raise ValueError(raw)
    return value


def print_help(known, usage):
    print(usage + __doc__)
    cells = {name: f"--{name}={'unset' if f.default is None else f.default}" for name, f in known.items()}
    width = max(map(len, cells.values()))
    for group in GROUPS:
        print(f"\n{group}:")
        for name, f in known.items():
            if f.metadata.get("group", "GRPO") == group:
                print(f"  {cells[name]:<{width}}  {f.metadata['help']}")
    print(f"\ntasks (data/): {', '.join(task_names())}; a task may set its own defaults (its TRAIN_DEFAULTS)")


def resumed_config(requested, given):
    """--resume continues the run in out_dir as it was configured: its config.json is the configuration. Flags
    given with --resume must agree with it (a resumed run with another learning rate or seed would be neither
    run); a difference is an error that lists every one. The run follows its folder: a run moved or copied
    elsewhere resumes where it now is."""
    path = os.path.join(requested.out_dir, "config.json")
    if not os.path.exists(path):
        raise SystemExit(f"error: --resume but {requested.out_dir} holds no run (no config.json)")
    saved = read_run_config(path)
    differ = differences(saved, {k: getattr(requested, k) for k in given})
    if differ:
        raise SystemExit(f"error: --resume continues {requested.out_dir} as configured in its config.json, but "
                         f"these flags differ from it (drop them, or start a new run):\n  " + "\n  ".join(differ))
    changed = {k: getattr(requested, k) for k in SAFE_TO_CHANGE_ON_RESUME
               if k in given or k in ("resume", "overwrite")}
    return dataclasses.replace(saved, out_dir=requested.out_dir, **changed)


def check_against_checkpoint(cfg, saved):
    """The run's config.json (cfg) against the configuration its checkpoint was saved with, which its checksum
    protects: a hand edit since is refused, every difference listed."""
    differ = differences(cfg, saved, source="the checkpoint")
    if differ:
        raise SystemExit(f"error: {cfg.out_dir}/config.json differs from the configuration its checkpoint "
                         f"(checked by its checksum) was saved with:\n  " + "\n  ".join(differ))


def differences(run, values, source="the command line"):
    """'--flag: the run has A, SOURCE B' for every value that differs from the run's config, but the flags that
    may change on resume and the folder's own path."""
    def same(a, b):  # as JSON: a tuple and the list it was saved as are the same value
        return json.loads(json.dumps(a)) == json.loads(json.dumps(b))
    return [f"--{k}: the run has {getattr(run, k)!r}, {source} {values[k]!r}" for k in sorted(values)
            if k not in SAFE_TO_CHANGE_ON_RESUME + ("out_dir",) and not same(getattr(run, k), values[k])]


def read_run_config(path):
    """A run's config.json as a TrainConfig, or an error that names the file and what is wrong with it."""
    try:
        saved = read_json(path, 1_000_000)
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        if set(saved) - known:
            raise ValueError(f"{path} has options this train.py does not know: {sorted(set(saved) - known)}")
        for f in dataclasses.fields(TrainConfig):
            kind = flag_type(f)
            value = saved.get(f.name, f.default)
            ok = value is None and f.default is None or (
                isinstance(value, list) and all(isinstance(v, (int, float)) for v in value) if kind is tuple else
                isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
                type(value) is kind)
            if not ok:
                raise ValueError(f"{path}: {f.name} is {str(value)[:60]!r}, not a {describe(kind)}")
        return TrainConfig(**saved)
    except ValueError as e:
        message = str(e) if str(e).startswith(path) else f"{path}: {e}"
        raise SystemExit(f"error: {message}") from None
