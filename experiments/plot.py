"""
Plots and tables from run folders (matplotlib is an optional extra: train.py never needs it).

    python experiments/plot.py curves OUT.png RUN [RUN ...]          # GRPO reward and eval curves of runs
    python experiments/plot.py ablation OUT.png OUT.md RUN [RUN ...]  # final eval by setting, mean and spread
    python experiments/plot.py hacking OUT.png RUN [RUN ...]         # summary runs: quiz reward and length
    python experiments/plot.py thin METRICS OUT.jsonl.gz              # a run's log, thinned to what these read

Runs are grouped by their config.json minus the seed and run folder, so seeds of one setting become one line of the
table (mean, standard deviation, min and max) and one colour in the plot.
"""

import gzip
import json
import os
import statistics
import sys


def load(run):
    path = os.path.join(run, "metrics.jsonl")
    opener = (gzip.open, path + ".gz") if not os.path.exists(path) else (open, path)  # kept runs are gzipped
    with opener[0](opener[1], "rt") as f:
        records = [json.loads(line) for line in f if line.strip()]
    with open(os.path.join(run, "config.json")) as f:
        config = json.load(f)
    return config, records


KEPT = ("stage", "step", "reward_mean", "zero_std_frac", "completion_len", "kl", "entropy", "clip_low_frac",
        "clip_high_frac", "dual_clip_frac", "time_sample_s", "time_learn_s")


def thin(src, dst):
    """A run's log as the pages keep it (gzipped): every evaluation whole, and of each GRPO step the figures the
    plots and tables read (KEPT, and each reward function's mean) to 5 significant digits; the warm start's steps
    are left out. src may be a run's metrics.jsonl or an already kept .gz."""
    with (gzip.open if src.endswith(".gz") else open)(src, "rt") as f:
        records = [json.loads(line) for line in f if line.strip()]
    lines = []
    for r in records:
        if r["stage"] == "eval":
            lines.append(json.dumps(r))
        elif r["stage"] == "grpo":
            kept = {k: float(f"{v:.5g}") if isinstance(v, float) else v
                    for k, v in r.items() if k in KEPT or k.startswith("reward_")}
            lines.append(json.dumps(kept))
    with open(dst, "wb") as raw, gzip.GzipFile("", "wb", fileobj=raw, mtime=0) as f:  # no name, no time stamp:
        f.write("".join(line + "\n" for line in lines).encode())                   # a log thins to the same bytes


def smooth(values, k=20):
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= k:
            total -= values[i - k]
        out.append(total / min(i + 1, k))
    return out


HEADLINES = ("exact_rate", "win_rate", "solved_rate", "quiz_score")  # the first one an eval record has is plotted


def curves(out_png, runs):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        config, records = load(run)
        label = os.path.basename(run.rstrip("/"))
        grpo = [r for r in records if r["stage"] == "grpo"]
        ax1.plot([r["step"] for r in grpo], smooth([r["reward_mean"] for r in grpo]), label=label)
        evals = [r for r in records if r["stage"] == "eval"]
        key = next(k for k in HEADLINES if k in evals[0])
        line, = ax2.plot([r["step"] for r in evals], [r[key] for r in evals], marker="o", label=f"{label} greedy")
        if f"sampled_{key}" in evals[0]:
            ax2.plot([r["step"] for r in evals], [r[f"sampled_{key}"] for r in evals], marker="x", linestyle="--",
                     color=line.get_color(), label=f"{label} sampled (T=1)")
    ax1.set(title="GRPO reward (mean of the batch, 20-step average)", xlabel="GRPO step", ylabel="reward")
    ax2.set(title=f"held-out {key}: greedy (solid), sampled (dashed)", xlabel="GRPO step", ylabel=key)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    print(f"wrote {out_png}")


def ablation(out_png, out_md, runs):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loaded = [load(run) for run in runs]
    # The knobs are the config fields that differ between runs, the seed aside.
    knobs = sorted(k for k in loaded[0][0] if k not in ("seed", "out_dir")
                   and len({json.dumps(config.get(k)) for config, _ in loaded}) > 1)
    groups = {}
    for config, records in loaded:
        evals = [r for r in records if r["stage"] == "eval"]
        setting = tuple(config[k] for k in knobs)
        groups.setdefault(setting, []).append((config["seed"], evals[0], evals[-1], records))
    first_eval = next(iter(groups.values()))[0][1]
    metrics = [k for k, v in first_eval.items()
               if isinstance(v, float) and not k.startswith("sampled_") and k not in ("games", "step")]
    lines = ["| " + " | ".join(knobs) + " | seeds | " +
             " | ".join(f"{m}: before -> after, mean ± std (min..max)" for m in metrics) + " |",
             "|" + "---|" * (len(knobs) + 1 + len(metrics))]
    fig, ax = plt.subplots(figsize=(7, 4))
    for color, (setting, items) in enumerate(sorted(groups.items())):
        cells = []
        for m in metrics:
            after = [final[m] for _, _, final, _ in items]
            sd = statistics.stdev(after) if len(after) > 1 else 0.0
            cells.append(f"{items[0][1][m]:.3f} -> {statistics.mean(after):.3f} ± {sd:.3f} "
                         f"({min(after):.3f}..{max(after):.3f})")
        name = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in zip(knobs, setting))
        lines.append("| " + " | ".join(str(v) for v in setting) + f" | {len(items)} | " + " | ".join(cells) + " |")
        for i, (seed, _, _, records) in enumerate(items):
            grpo = [r for r in records if r["stage"] == "grpo"]
            ax.plot([r["step"] for r in grpo], smooth([r["reward_mean"] for r in grpo], 30), alpha=0.7,
                    color=f"C{color}", label=name if i == 0 else None)
    ax.set(title="GRPO reward by setting, one line per seed (30-step average)", xlabel="GRPO step",
           ylabel="reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    with open(out_md, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out_png} and {out_md}")


def hacking(out_png, runs):
    """Summary runs: the quiz reward and the completion length per GRPO step, and the held-out quiz score."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for run in runs:
        config, records = load(run)
        label = os.path.basename(run.rstrip("/"))
        grpo = [r for r in records if r["stage"] == "grpo"]
        steps = [r["step"] for r in grpo]
        line, = axes[0].plot(steps, smooth([r["reward_quiz_reward"] for r in grpo]), label=label)
        axes[1].plot(steps, smooth([r["completion_len"] for r in grpo]), label=label, color=line.get_color())
        evals = [r for r in records if r["stage"] == "eval"]
        axes[2].plot([r["step"] for r in evals], [r["mean_chars"] for r in evals], marker="o",
                     color=line.get_color(), label=f"{label}: characters")
    axes[0].set(title="quiz reward of the samples (20-step average)", xlabel="GRPO step", ylabel="quiz reward")
    axes[1].set(title="completion length, tokens (20-step average)", xlabel="GRPO step", ylabel="tokens")
    axes[2].set(title="held-out greedy summaries: length", xlabel="GRPO step", ylabel="characters")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    print(f"wrote {out_png}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["curves"]:
        curves(sys.argv[2], sys.argv[3:])
    elif sys.argv[1:2] == ["hacking"]:
        hacking(sys.argv[2], sys.argv[3:])
    elif sys.argv[1:2] == ["thin"]:
        thin(sys.argv[2], sys.argv[3])
    elif sys.argv[1:2] == ["ablation"]:
        ablation(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        print(__doc__)
        sys.exit(2)
