"""The variants' table (markdown, printed) and plot (variants.png) from the kept runs: python table.py FOLDER.
Each row is a variant over its seeds: the held-out evaluation at the end (greedy and sampled exact rate, the greedy
one's difference from grpo's of the same seed and warm start, the carry slip), and per GRPO step, the median over
the last 100 steps (a median: the k3 KL of a single step reached 1,040 once, when a sampled token was far likelier
under the reference), of the KL to the warm start, the entropy, the clip fractions and the seconds; each as
mean ± standard deviation over the seeds. matplotlib is an optional extra."""

import gzip
import json
import os
import statistics
import sys

ORDER = ("grpo", "dapo", "dr_grpo", "cispo", "sapo", "gspo", "dual_clip", "kl_bias_correction", "rloo", "gdpo")


def load(folder):
    runs = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name, "metrics.jsonl.gz")
        if os.path.exists(path):
            variant, seed = name.rsplit("-seed", 1)
            with gzip.open(path, "rt") as f:
                records = [json.loads(line) for line in f]
            with open(os.path.join(folder, name, "eval.json")) as f:
                runs.setdefault(variant, {})[seed] = (records, json.load(f))
    return runs


def mean_sd(values):
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(runs):
    print("| variant | seeds | exact, greedy | minus grpo's, same seed | exact, sampled | carry slip | kl "
          "| entropy | clip low | clip high | dual clip | s a step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    warm = [e["warm start"] for r in runs["grpo"].values() for e in [r[1]]]
    print(f"| warm start | {len(warm)} | {mean_sd([w['exact_rate'] for w in warm])} | | "
          f"{mean_sd([w['sampled_exact_rate'] for w in warm])} | {mean_sd([w['carry_slip_rate'] for w in warm])} "
          f"| | | | | | |")
    for variant in [v for v in ORDER if v in runs]:
        seeds = runs[variant]
        final = [e["GRPO"] for _, e in seeds.values()]
        paired = [e["GRPO"]["exact_rate"] - runs["grpo"][seed][1]["GRPO"]["exact_rate"]
                  for seed, (_, e) in seeds.items() if seed in runs["grpo"]]
        late = [[r for r in records if r["stage"] == "grpo"][-100:] for records, _ in seeds.values()]

        def per_step(key):
            return mean_sd([statistics.median(r[key] for r in steps) for steps in late])
        seconds = mean_sd([statistics.median(r["time_sample_s"] + r["time_learn_s"] for r in steps)
                           for steps in late])
        exact, sampled, slip = ([f[key] for f in final] for key in ("exact_rate", "sampled_exact_rate",
                                                                     "carry_slip_rate"))
        print(f"| {variant} | {len(seeds)} | {mean_sd(exact)} | {mean_sd(paired) if variant != 'grpo' else ''} | "
              f"{mean_sd(sampled)} | {mean_sd(slip)} | "
              f"{per_step('kl')} | {per_step('entropy')} | {per_step('clip_low_frac')} | "
              f"{per_step('clip_high_frac')} | {per_step('dual_clip_frac')} | {seconds} |")


def smooth(values, k=20, average=statistics.mean):
    return [average(values[max(0, i - k + 1):i + 1]) for i in range(len(values))]


def plot(runs, out_png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for i, variant in enumerate(v for v in ORDER if v in runs):
        color = f"C{i}"
        for j, (records, _) in enumerate(runs[variant].values()):
            steps = [r for r in records if r["stage"] == "grpo"]
            label = variant if j == 0 else None
            axes[0].plot([r["step"] for r in steps], smooth([r["reward_mean"] for r in steps]), color=color,
                         alpha=0.7, label=label)
            axes[1].plot([r["step"] for r in steps], smooth([r["kl"] for r in steps], average=statistics.median),
                         color=color, alpha=0.7)
            evals = [r for r in records if r["stage"] == "eval"]
            axes[2].plot([r["step"] for r in evals], [r["exact_rate"] for r in evals], color=color, marker="o",
                         alpha=0.7)
    axes[0].set(title="batch reward (20-step average)", xlabel="GRPO step")
    axes[1].set(title="KL to the warm start per token (20-step median)", xlabel="GRPO step", yscale="log")
    axes[2].set(title="held-out exact rate, greedy", xlabel="GRPO step")
    axes[0].legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    print(f"\nwrote {out_png}")


if __name__ == "__main__":
    folder = sys.argv[1]
    runs = load(folder)
    table(runs)
    plot(runs, os.path.join(folder, "variants.png"))
