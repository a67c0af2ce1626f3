"""
The DeepLearning.AI course "Reinforcement Fine-Tuning LLMs with GRPO", lessons 3 to 8, as runnable code.
Each lesson is one function that prints what it shows, offline; the README gives each one's time on 2 CPU cores.

    python course.py          # list the lessons
    python course.py 7        # run lesson 7 (the GRPO loss and the three mistakes of its notebook)

The README's course map says where each lesson lives in the library; this file only calls into it.
"""

import copy
import os
import random
import sys

import torch

import grpo
import rewards as R
from data import summary, wordle
from model import GPT, GPTConfig, sample


def lesson3():
    """Wordle as an RL task: a state is the feedback so far, an action is one guess, the reward comes later."""
    answer = wordle.words()[3][0]
    player = wordle.reference_players(random.Random(0))["max_info"]
    history = []
    print(f"One game of the max-information player; the answer is {answer!r}.\n")
    while not history or history[-1][0] != answer:
        example = wordle.make_example(answer, history)
        guess = R.parse_guess(player([example])[0])
        history.append((guess, R.wordle_feedback(guess, answer)))
        print(f"  turn {len(history)}: {guess} -> {history[-1][1]}")
    print("  (G: right letter, right place; Y: in the word, elsewhere; X: not in the word)")
    print("\nWhat the model sees on the last turn (the prompt), and what it should write (the completion):\n")
    print("  " + repr(wordle.prompt(wordle.make_example(answer, history[:-1]))))
    print("  " + repr(wordle.completion(answer)))
    print("\nReference players on 30 held-out games (python -m data.wordle players: all 200):")
    for name, play in wordle.reference_players(random.Random(0)).items():
        r = wordle.evaluate(play, 30)
        guesses = f"{r['mean_guesses']:.2f}" if r["win_rate"] else "- (no game won)"
        print(f"  {name:<10} win {r['win_rate']:6.1%}  mean guesses per win {guesses}")


def lesson4():
    """Reward functions, and GRPO's advantage: each completion's reward against its own group's."""
    history = [("stamp", R.wordle_feedback("stamp", "moist")), ("voice", R.wordle_feedback("voice", "moist"))]
    example = wordle.make_example("moist", history)
    group = ["moist", "exist", "noise", "point", "voice", "mosit", "zzzzz", "the answer is moist"]
    completions = [wordle.completion(g) if len(g) == 5 else g for g in group]
    fns, weights = wordle.reward_functions()
    fns = fns + [R.wordle_partial_credit]  # lesson 4's own first reward, for comparison (weight 0)
    weights = weights + [0.0]
    _, table = R.score(completions, [example] * len(group), fns)  # every reward, the ones weighted 0 too
    total = torch.tensor([sum(w * v for w, v in zip(weights, row)) for row in table])
    advantages = grpo.group_advantages(total, len(group))
    print(f"State: {history}; the answer is 'moist'. One group of {len(group)} completions for this prompt.\n")
    names = ["whole truth", "format", "feedback use", "info gain", "win", "partial"]  # rewards.wordle_*
    print(f"  {'completion':<22}" + "".join(f"{n:>13}" for n in names) + f"{'total':>8}{'advantage':>11}")
    for c, row, t, a in zip(completions, table, total.tolist(), advantages.tolist()):
        print(f"  {c:<22}" + "".join(f"{v:13.2f}" for v in row) + f"{t:8.2f}{a:11.2f}")
    print("\n  Columns: rewards.wordle_guess (the whole truth of a guess, the default, weight 1); the course's")
    print("  lesson 8 rewards wordle_format, _feedback_use, _info_gain, _win; lesson 4's wordle_partial_credit.")
    print("  The default ranks not-a-word < ruled out (a repeat too) < could still be the answer < the answer;")
    print("  --reward_weights=0,0.2,0.3,0.5,1 trains on the course's instead.")
    mean, std = total.mean().item(), total.std().item()
    print(f"  advantage = (total - group mean {mean:.3f}) / (group std {std:.3f} + 1e-6); Bessel-corrected std.")
    print("  No value network: the group's mean is the baseline (DeepSeekMath's GRPO).")


def lesson5():
    """Rewards without a rule: a quiz answered from the summary, and an LLM as the judge."""
    example = summary.evaluation_examples(1)[0]
    print("A document:\n  " + "\n  ".join(example["lines"]) + "\n")
    print("Quiz reward of four summaries (the reader answers each fact from the summary alone):")
    for name, play in summary.reference_players(random.Random(1)).items():
        text = play([example])[0]
        print(f"  {name:<6} {R.quiz_reward(text, example):.2f}  {text!r}")
    print("\nAn LLM as the judge: a small GPT trained here on the rubric 'one point per fact kept, minus one per")
    print("filler line', 0..3. The reward is its expected grade over the grade tokens, not parsed text.\n")
    summary.judge_demo(steps=150, n=100)


def lesson6():
    """Reward hacking: the quiz alone pays for copying the document; a length penalty cures it."""
    fns, _ = summary.reward_functions()
    print(f"{'player':<8}{'quiz':>7}{'chars':>8}{'quiz alone':>12}{'quiz + length penalty':>24}")
    for name, play in summary.reference_players(random.Random(0)).items():
        r = summary.evaluate(play, 200)
        print(f"{name:<8}{r['quiz_score']:7.3f}{r['mean_chars']:8.1f}{r['quiz_score']:12.3f}{r['reward']:24.3f}")
    print(f"\nThe penalty ({fns[1].__name__}: -{summary.PER_CHAR} a character past {summary.SUMMARY_CHARS}) makes"
          " the copy worthless\nand the fact summary best. experiments/summary.md trains both ways with GRPO:")
    steps = "--task=summary --sft_steps=400 --grpo_steps=200"
    print(f"  python train.py {steps} --reward_weights=1,0    # the hack: reward and length rise together")
    print(f"  python train.py {steps}                         # with the penalty: concise")
    example = wordle.make_example("moist", [("stamp", R.wordle_feedback("stamp", "moist"))])
    print("\nWordle has its hack too: repeating a valid guess earns the format reward but tells nothing, so")
    print(f"wordle_feedback_use gives it {R.wordle_feedback_use('<guess>stamp</guess>', example)} and the default "
          f"wordle_guess {R.wordle_guess('<guess>stamp</guess>', example)} (ruled out, like any repeat).")


def lesson7():
    """The GRPO loss: ratio, clipping, KL, and the three mistakes of the course's loss notebook."""
    f = loss_mistakes()
    print("(a) The ratio must be pi / pi_old, pi_old = the policy that sampled, not pi / pi_ref.")
    print("    A policy that has moved from its reference; one group sampled from it. Clipped tokens:")
    print(f"      ratio to pi_old (ours):    {f['clip_old']:.0%}   gradient = REINFORCE with the group baseline")
    print(f"      ratio to pi_ref (mistake): {f['clip_ref']:.0%}   clipped tokens get no gradient; "
          f"cosine to the right gradient {f['cosine_ref']:.2f}")
    print("    Clipping is a trust region around the sampler (PPO); distance to the reference is the KL term's "
          "job.")
    print("\n(b) Log-probs need the one-token shift: the logit at position t-1 scores token t.")
    print("    Sampled completions, their log-prob recorded while sampling, per token on average:")
    print(f"      at sampling time:            {f['logp_sampling']:.4f}")
    print(f"      shifted (ours):              {f['logp_shifted']:.4f}   max difference {f['shift_error']:.1e}")
    print(f"      unshifted (mistake):         {f['logp_unshifted']:.4f}   each token scored by its own "
          "position's prediction of the NEXT token")
    print("\n(c) Advantages use the Bessel-corrected group std (torch.std, as TRL), not the population std.")
    for G, factor in f["std_inflation"].items():
        print(f"      group of {G:>2}: population-std advantages are {factor:.3f}x larger")
    print("    A constant factor sqrt(G / (G - 1)) per group size: it acts as a larger step and a smaller KL")
    print("    weight, most for small groups. The least harmful of the three, but not the formula (grpo.py's "
          "docstring).")


def lesson8():
    """Training Wordle: a warm start on a sloppy teacher's games, then GRPO on the whole truth of each guess."""
    import train
    print("The mechanism, in about a minute: 200 warm-start steps on the sloppy teacher's games (it ignores the")
    print("yellows half the time), then ten GRPO steps of 16 states x 8 guesses, the states being the model's own")
    print("games against words outside the game, the reward rewards.wordle_guess: -1 not a word, 0 a word the")
    print("feedback rules out, 1 a word that could be the answer, 2 the answer. Then 50 held-out games.\n")
    print("What to expect: 200 steps are far too few to spell, so this quick model wins no game and every guess")
    print("of its warm start is invalid (invalid_rate 1.000 below). The ten GRPO steps push it toward real words:")
    print("on one 2-core machine its invalid guesses fell from 100% to 43%, still without a win. That is the")
    print("mechanism at work, not the result.\n")
    threads = min(2, os.cpu_count() or 1)  # a fixed count: torch's own guess can oversubscribe a shared machine
    train.main(["--task=wordle", f"--threads={threads}", "--sft_steps=200", "--grpo_steps=10",
                "--prompts_per_step=16", "--eval_games=50", "--eval_interval=10", "--reference_players=false",
                "--out_dir=runs/course-lesson8", "--overwrite"])
    print("\nThe result: python train.py --task=wordle --out_dir=runs/wordle, 3,000 warm-start steps and 800 GRPO")
    print("steps, 19 to 33 minutes on 2 cores. Over three seeds it won 29.5% of held-out games after the warm")
    print("start and 49.3% after GRPO (+19.8 points, every seed up), invalid guesses 30% -> 4%")
    print("(experiments/wordle.md).")
    print("Watch its games: python sample.py runs/wordle --n=4 (--stage=warm_start for the model before GRPO).")


# ----------------------------------------------------------------------------------------------------------------
# Lesson 7's measurements, on a tiny random GPT (tests/test_course.py checks them)


def loss_mistakes(seed=0):
    torch.manual_seed(seed)
    reference = GPT(GPTConfig(block_size=32, vocab_size=16, n_layer=2, n_head=2, n_embd=32)).double()
    policy = copy.deepcopy(reference)
    with torch.no_grad():  # the policy some GRPO steps later: moved away from its reference
        for p in policy.parameters():
            p.add_(0.1 * torch.randn_like(p))
    G = 8
    s = sample(policy, [[1, 2, 3]], max_new_tokens=6, group_size=G, generator=torch.Generator().manual_seed(seed))
    rewards = s.completion.eq(5).double().sum(1)  # any reward will do: the share of token 5
    advantages = grpo.group_advantages(rewards, G)
    mask = s.completion_mask

    def gradient(old_logp):
        policy.zero_grad()
        logp, _ = policy.logprobs(s.tokens, s.prompt_len, valid=s.valid)
        loss, stats = grpo.grpo_loss(logp, old_logp, advantages, mask)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in policy.parameters()]), stats

    with torch.no_grad():
        logp_old, _ = policy.logprobs(s.tokens, s.prompt_len, valid=s.valid)
        logp_ref, _ = reference.logprobs(s.tokens, s.prompt_len, valid=s.valid)
    right, stats_old = gradient(logp_old)
    wrong, stats_ref = gradient(logp_ref)

    # (b) the log-prob of each sampled token as sampling drew it: the last position's distribution, step by step
    with torch.no_grad():
        at_sampling = torch.zeros_like(logp_old)
        for t in range(s.completion.size(1)):
            logits, _ = policy(s.tokens[:, :s.prompt_len + t], valid=s.valid[:, :s.prompt_len + t])
            at_sampling[:, t] = logits[:, -1].log_softmax(-1).gather(1, s.completion[:, t:t + 1]).squeeze(1)
        logits, _ = policy(s.tokens, valid=s.valid)
        unshifted = logits[:, s.prompt_len:].log_softmax(-1).gather(2, s.completion[..., None]).squeeze(2)

    def mean(x):
        return ((x * mask).sum() / mask.sum()).item()

    std_inflation = {}  # (c) the best of a group with one success: population-std vs Bessel-std advantage
    for size in (2, 4, 8, 16):
        r = torch.tensor([1.0] + [0.0] * (size - 1))
        population = (r - r.mean()) / r.std(correction=0)
        std_inflation[size] = (population[0] / grpo.group_advantages(r, size)[0]).item()
    return {"clip_old": stats_old["clip_low_frac"] + stats_old["clip_high_frac"],
            "clip_ref": stats_ref["clip_low_frac"] + stats_ref["clip_high_frac"],
            "cosine_ref": torch.nn.functional.cosine_similarity(right, wrong, dim=0).item(),
            "logp_sampling": mean(at_sampling), "logp_shifted": mean(logp_old), "logp_unshifted": mean(unshifted),
            "shift_error": ((logp_old - at_sampling) * mask).abs().max().item(), "std_inflation": std_inflation}


LESSONS = {3: lesson3, 4: lesson4, 5: lesson5, 6: lesson6, 7: lesson7, 8: lesson8}

if __name__ == "__main__":
    if len(sys.argv) != 2 or not sys.argv[1].isdigit() or int(sys.argv[1]) not in LESSONS:
        print(__doc__)
        for number, fn in LESSONS.items():
            print(f"  lesson {number}: {fn.__doc__}")
        sys.exit(0 if len(sys.argv) == 1 else 2)
    sys.stdout.reconfigure(line_buffering=True)  # piped output (| tee, a log) shows each line as it comes
    lesson = LESSONS[int(sys.argv[1])]
    print(f"Lesson {sys.argv[1]}: {lesson.__doc__}\n")
    lesson()
