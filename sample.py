"""
Completions from a trained policy, in nanoGPT's spirit:

    python sample.py RUN_DIR                          # the task's held-out examples, with each reward
    python sample.py RUN_DIR "<|begin|>58+67="        # prompts given here (the task's special tokens allowed)
    python sample.py OUT_DIR                          # a directory written by export.py works the same way
    python sample.py RUN_DIR --temperature=1 --num_samples=4 --n=3

Options: --n (held-out examples or games, 8), --num_samples (completions per prompt, 1), --temperature (0 is
greedy, the default, as evaluations play), --max_new_tokens (the run's), --seed (1337), --stage (grpo: the run's
latest checkpoint; warm_start: the model before GRPO, to compare, from a run folder only). For Wordle the
held-out examples are whole games, printed turn by turn with the feedback:

    python sample.py runs/wordle --n=4 --stage=warm_start && python sample.py runs/wordle --n=4
"""

import os
import sys
from contextlib import nullcontext

import torch

from checkpoint import load_run
from data import load_task, model_player, task_names
from data.tokenizer import end_and_pad, gpt2_encoding
from grpo import GRPOConfig
from hf import exported_task, load_gpt2
from model import sample

OPTIONS = {"n": 8, "num_samples": 1, "temperature": 0.0, "max_new_tokens": 0, "seed": 1337, "stage": "grpo"}


def load(path, stage="grpo"):
    """(model, tokenizer, task or None, max_new_tokens) from a run folder or an exported directory."""
    if stage not in ("grpo", "warm_start"):
        raise SystemExit(f"error: --stage={stage!r} is not grpo or warm_start")
    if any(os.path.exists(os.path.join(path, name)) for name in ("ckpt.pt", "ckpt.prev.pt")):
        model, enc, cfg = load_run(path, warm_start=stage == "warm_start")
        return model, enc, load_task(cfg.task), cfg.max_new_tokens
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise SystemExit(f"error: {path} is neither a run folder (ckpt.pt) nor a GPT-2 directory (config.json)")
    if stage != "grpo":  # an export holds one model: the warm start stays in the run folder it came from
        raise SystemExit(f"error: --stage={stage} needs a run folder (its warm_start.pt); {path} is an exported "
                         f"model, which holds only the final one")
    try:
        model = load_gpt2(path).eval()
        name, from_gpt2 = exported_task(path)  # what this project wrote into config.json, if it exported it
        task = load_task(name) if name in task_names() else None
        # a GPT-2's own tokenizer files (the task specials mapped onto them), or the task's own tokenizer
        enc = gpt2_encoding(path, task_specials=True) if task is None or from_gpt2 else task.tokenizer()
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    max_new_tokens = task.train_defaults.get("max_new_tokens", GRPOConfig.max_new_tokens) if task else 32
    return model, enc, task, max_new_tokens


def parse(argv):
    options, prompts = dict(OPTIONS), []
    for arg in argv:
        if arg.startswith("--"):
            key, _, value = arg[2:].partition("=")
            if key not in OPTIONS:
                raise SystemExit(f"error: unknown option --{key}; options: {', '.join('--' + k for k in OPTIONS)}")
            try:
                options[key] = type(OPTIONS[key])(value)
            except ValueError:
                kind = type(OPTIONS[key]).__name__
                raise SystemExit(f"error: --{key}={value!r} is not a valid {kind}") from None
        else:
            prompts.append(arg)
    if options["n"] < 1 or options["num_samples"] < 1 or options["temperature"] < 0:
        raise SystemExit("error: --n and --num_samples must be at least 1, --temperature at least 0")
    return options, prompts


def main(argv):
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if argv else 2)
    options, prompts = parse(argv[1:])
    model, enc, task, max_new_tokens = load(argv[0], options["stage"])
    max_new_tokens = options["max_new_tokens"] or max_new_tokens
    end, pad = end_and_pad(enc)
    generator = torch.Generator().manual_seed(options["seed"])
    if prompts or task is None:
        if not prompts:
            raise SystemExit("error: this directory names no task: give prompts on the command line")
        s = sample(model, [enc.encode(p, allowed_special="all") for p in prompts], max_new_tokens=max_new_tokens,
                   group_size=options["num_samples"], temperature=options["temperature"], stop_token=end,
                   pad_token=pad, generator=generator)
        for i, tokens in enumerate(s.completion_tokens(end)):
            print(f"{prompts[i // options['num_samples']]!r} -> {enc.decode(tokens)!r}")
        return
    player = model_player(model, enc, task, max_new_tokens, nullcontext(), options["temperature"], generator)
    if task.show_games:  # a multi-turn task prints its own games
        task.show_games(player, options["n"])
        return
    examples = task.evaluation_examples(options["n"])
    reward_fns, weights = task.reward_functions()
    for _ in range(options["num_samples"]):
        for example, text in zip(examples, player(examples)):
            scores = {fn.__name__: fn(text, example) for fn in reward_fns}
            total = sum(w * v for w, v in zip(weights, scores.values()))
            print(f"{task.prompt(example)!r} -> {text!r} | reward {total:.3f} ("
                  + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()) + ")")


if __name__ == "__main__":
    main(sys.argv[1:])
