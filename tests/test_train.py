"""train.py end to end on the toy task: tiny models, seconds per run."""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import nullcontext

import pytest
import torch

import config
import data
import grpo
import train
from checkpoint import CheckpointError, prepare_out_dir, read_checkpoint
from config import parse_config
from tests.helpers import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def run_train(args, **kwargs):
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, **kwargs)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_unknown_and_bad_flags_are_rejected_with_the_closest_names():
    with pytest.raises(SystemExit, match="unknown option --group_szie; did you mean --group_size"):
        parse_config(["--group_szie=4"])
    with pytest.raises(SystemExit, match="--lr='fast' is not a valid float"):
        parse_config(["--lr=fast"])
    with pytest.raises(SystemExit, match="loss_type='ppo' is not one of grpo, dapo, dr_grpo"):
        parse_config(["--loss_type=ppo"])
    with pytest.raises(SystemExit, match="expected --key=value or --key value"):
        parse_config(["lr=1"])
    with pytest.raises(SystemExit, match="--eval_games=201 is more than the 200 held-out games the wordle task"):
        parse_config(["--task=wordle", "--eval_games=201"])
    assert parse_config(["--task=wordle", "--eval_games=200"]).eval_games == 200
    cfg = parse_config(["--beta=0.04", "--dynamic_sampling", "--overwrite=false", "--task=addition"])
    assert cfg.beta == 0.04 and cfg.dynamic_sampling and not cfg.overwrite and cfg.task == "addition"


@pytest.mark.parametrize("flag,message", [
    ("--reward_weights=abc", "--reward_weights='abc' is not a valid comma-separated list of numbers"),
    ("--reward_weights=1", "--reward_weights has 1 values for 2 rewards"),
    ("--reward_weights=nan,1", "--reward_weights='nan,1' is not a valid"),
    ("--num_iterations=0", "num_iterations must be at least 1"),
    ("--top_k=5", "unknown option --top_k"),
    ("--minibatch_size=-4", "minibatch_size=-4 must be a positive multiple of group_size=8"),
    ("--minibatch_size=12", "minibatch_size=12 must be a positive multiple of group_size=8"),
    ("--eval_games=0", "--eval_games must be at least 1"),
    ("--eps_low=-0.1", "eps_low must be a finite number >= 0"),
    ("--eps_high=-1", "eps_high must be a finite number >= 0"),
    ("--sft_player=ghost", "--sft_player='ghost' is not one of oracle, sloppy, random"),
    ("--temperature=0", "temperature must be positive during GRPO"),
    ("--refill_factor=0.5", "refill_factor must be a finite number >= 1, got 0.5"),
    ("--refill_factor=inf", "--refill_factor='inf' is not a valid float"),
])
def test_every_bad_flag_is_refused_by_the_parser_naming_it(flag, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        parse_config([flag])


@pytest.mark.parametrize("flag", ["--prompts_per_step=3", "--sft_batch_size=1"])
def test_shares_that_do_not_divide_across_processes_are_refused_before_any_process_starts(flag, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="must be multiples of the 2 processes"):
        parse_config([flag])


def test_help_lists_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(config.TrainConfig):  # GRPOConfig's knobs included
        if f.name not in config.NOT_FLAGS:
            assert f"--{f.name}=" in out
    assert "--top_k=" not in out and "--beta=0.04" in out and "--adv_eps=1e-06" in out


def test_flags_take_their_value_after_a_space_too():
    cfg = parse_config(["--beta", "0.1", "--group_size", "4", "--dynamic_sampling", "--overwrite", "false",
                        "--lr=1e-4", "--reward_weights", "1,0.5"])
    assert (cfg.beta, cfg.group_size, cfg.dynamic_sampling, cfg.overwrite, cfg.lr) == (0.1, 4, True, False, 1e-4)
    assert cfg.reward_weights == (1.0, 0.5)
    assert parse_config(["--resume=false", "--task", "countdown"]).task == "countdown"
    with pytest.raises(SystemExit, match="--beta needs a value: --beta=VALUE or --beta VALUE"):
        parse_config(["--beta"])
    with pytest.raises(SystemExit, match="--beta needs a value"):
        parse_config(["--beta", "--lr=1"])
    with pytest.raises(SystemExit, match="--beta='' is not a valid float"):
        parse_config(["--beta="])
    with pytest.raises(SystemExit, match="expected --key=value or --key value, got 'maybe'"):
        parse_config(["--dynamic_sampling", "maybe"])  # a boolean alone, then a stray word


def test_help_groups_the_flags_with_the_runs_own_first_in_aligned_columns(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--help"])
    out = capsys.readouterr().out
    headings = [out.index(f"\n{group}:\n") for group in config.GROUPS]
    assert headings == sorted(headings) and config.GROUPS[0] == "task and run"
    lines = [line for line in out.splitlines() if line.startswith("  --")]
    columns = {line.index("  ", 4) + len(line[line.index("  ", 4):]) - len(line[line.index("  ", 4):].lstrip())
               for line in lines}
    assert len(columns) == 1  # every help text starts in the same column
    grpo_part = out[out.index("\nGRPO:\n"):out.index("\nevaluation:\n")]
    assert "--beta=0.04" in grpo_part and "--lr=0.0003" in grpo_part and "--task=" not in grpo_part


def test_end_to_end_run_writes_metrics_eval_samples_and_config(tmp_path):
    out = tmp_path / "run"
    result = run_train(TINY + [f"--out_dir={out}"])
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_jsonl(out / "metrics.jsonl")
    grpo_steps = [r for r in records if r["stage"] == "grpo"]
    assert [r["step"] for r in grpo_steps] == list(range(8))
    assert all("reward_mean" in r and "clip_low_frac" in r and "grad_norm" in r for r in grpo_steps)
    assert [r["step"] for r in records if r["stage"] == "sft"] == list(range(6))
    assert [r["step"] for r in records if r["stage"] == "eval"] == [0, 4, 8]
    table = json.loads((out / "eval.json").read_text())
    assert {"warm start", "GRPO", "player: oracle", "player: random"} <= set(table)
    assert table["player: oracle"]["exact_rate"] == 1.0
    assert json.loads((out / "config.json").read_text())["group_size"] == 4
    assert len(read_jsonl(out / "samples.jsonl")) == 3
    assert "step    7 | reward" in result.stdout
    # the folder now holds a run: a second run there must be refused
    again = run_train(TINY + [f"--out_dir={out}"])
    assert again.returncode != 0 and "already holds a run" in again.stderr


def test_a_run_without_grpo_evaluates_its_warm_start_once(tmp_path):
    out = tmp_path / "run"
    flags = [f for f in TINY if not f.startswith("--grpo_steps=")]
    result = run_train(flags + ["--grpo_steps=0", "--reference_players=false", f"--out_dir={out}"])
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records if r["stage"] == "eval"] == [0]  # not a second, identical "GRPO" one
    assert not any(r["stage"] == "grpo" for r in records)
    assert set(json.loads((out / "eval.json").read_text())) == {"warm start"}


def test_a_killed_run_resumes_to_exactly_the_uninterrupted_result(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert run_train(TINY + [f"--out_dir={whole}"]).returncode == 0
    proc = subprocess.Popen([sys.executable, "train.py", *TINY, f"--out_dir={killed}"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill it somewhere after GRPO step 3
        path = killed / "metrics.jsonl"
        if path.exists() and any(r["stage"] == "grpo" and r["step"] >= 3 for r in read_jsonl(path)):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "eval.json").exists()  # it really died before the end
    result = run_train(TINY + [f"--out_dir={killed}", "--resume"])
    assert result.returncode == 0, result.stderr[-3000:]
    a = torch.load(whole / "ckpt.pt", weights_only=True)
    b = torch.load(killed / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 7
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    grpo_a = [r["reward_mean"] for r in read_jsonl(whole / "metrics.jsonl") if r["stage"] == "grpo"]
    grpo_b = [r["reward_mean"] for r in read_jsonl(killed / "metrics.jsonl") if r["stage"] == "grpo"]
    assert grpo_a == grpo_b  # and the log has each step once
    ev_a, ev_b = (json.loads((d / "eval.json").read_text()) for d in (whole, killed))
    assert ev_a["GRPO"] == ev_b["GRPO"] and ev_a["warm start"] == ev_b["warm start"]


def test_resume_takes_the_runs_config_and_refuses_other_values(tmp_path):
    out = tmp_path / "run"
    train.main(TINY + [f"--out_dir={out}", "--grpo_steps=1", "--lr=1e-3", "--reference_players=false"])
    saved = (out / "config.json").read_text()
    with pytest.raises(SystemExit, match=r"(?s)these flags differ.*--lr: the run has 0.001, the command line 0.01"
                                         r".*--seed: the run has 1337, the command line 7"):
        parse_config([f"--out_dir={out}", "--resume", "--lr=1e-2", "--seed=7"])
    cfg = parse_config([f"--out_dir={out}", "--resume", "--lr=1e-3", "--threads=2"])
    assert cfg.lr == 1e-3 and cfg.n_embd == 32 and cfg.threads == 2  # the run's own values; threads may change
    assert (out / "config.json").read_text() == saved  # never overwritten
    assert train.main([f"--out_dir={out}", "--resume"]) is None  # finished: says so, does nothing
    assert (out / "config.json").read_text() == saved
    # a run made with --threads=1 resumes on one thread (another count rounds CPU sums differently)
    (out / "config.json").write_text(json.dumps({**json.loads(saved), "threads": 1}))
    assert parse_config([f"--out_dir={out}", "--resume"]).threads == 1
    assert parse_config([f"--out_dir={out}", "--resume", "--threads=2"]).threads == 2


def test_a_tasks_own_defaults_are_not_flags_given_to_a_resumed_run(tmp_path):
    # Wordle's TRAIN_DEFAULTS set lr=1e-4; a run made with --lr=3e-4 resumes with --task=wordle on the command
    # line as well as without it, and keeps its own 3e-4 (the default was not given, so it cannot differ).
    out = tmp_path / "run"
    prepare_out_dir(parse_config(["--task=wordle", "--lr=3e-4", f"--out_dir={out}"]), rank=0)
    for argv in ([f"--out_dir={out}", "--resume"], ["--task=wordle", f"--out_dir={out}", "--resume"]):
        assert parse_config(argv).lr == 3e-4
    with pytest.raises(SystemExit, match="--lr: the run has 0.0003, the command line 0.0001"):
        parse_config(["--task=wordle", "--lr=1e-4", f"--out_dir={out}", "--resume"])


def test_a_tasks_default_that_is_not_a_flag_is_refused_naming_it(monkeypatch):
    from data import wordle
    monkeypatch.setattr(wordle, "TRAIN_DEFAULTS", {**wordle.TRAIN_DEFAULTS, "grpo_stpes": 10})
    with pytest.raises(SystemExit, match="data/wordle.py's TRAIN_DEFAULTS sets grpo_stpes, not a flag of train"):
        parse_config(["--task=wordle"])
    assert parse_config(["--task=addition"]).task == "addition"  # another task's defaults are not read


def corrupt(path, n=20, seed=0):
    data = bytearray(path.read_bytes())
    g = torch.Generator().manual_seed(seed)
    for i in torch.randint(len(data) // 4, len(data) - 1024, (n,), generator=g).tolist():
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_corrupt_checkpoint_is_detected_and_the_one_before_it_is_used(tmp_path, capsys):
    out = tmp_path / "run"
    args = TINY + [f"--out_dir={out}", "--reference_players=false", "--grpo_steps=4"]
    train.main(args)
    (out / "eval.json").unlink()  # as if it had died after its last checkpoint
    previous = torch.load(out / "ckpt.prev.pt", weights_only=True)
    assert previous["step"] == 2  # the last two are kept
    corrupt(out / "ckpt.pt")
    with pytest.raises(CheckpointError, match="ckpt.pt is (corrupt: its contents do not match|not a readable)"):
        read_checkpoint(str(out / "ckpt.pt"))
    train.main(args + ["--resume"])
    assert "resuming from the one before it" in capsys.readouterr().out
    assert (out / "eval.json").exists()
    (out / "ckpt.pt").write_bytes((out / "ckpt.pt").read_bytes()[:5000])  # truncated
    with pytest.raises(CheckpointError, match="not a readable checkpoint: truncated or corrupt") as e:
        read_checkpoint(str(out / "ckpt.pt"))
    assert "weights_only" not in str(e.value)


def test_a_run_that_failed_before_its_first_checkpoint_can_simply_be_rerun(tmp_path):
    out = tmp_path / "run"
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")  # passes the flag checks, fails when it is read
    with pytest.raises(SystemExit, match="not a readable checkpoint"):
        train.main(TINY + [f"--out_dir={out}", f"--init_from={tmp_path / 'junk.pt'}"])
    assert (out / "config.json").exists() and not (out / "ckpt.pt").exists()
    with pytest.raises(SystemExit, match="has no checkpoint .* without --resume"):
        train.main(TINY + [f"--out_dir={out}", "--resume"])
    train.main(TINY + [f"--out_dir={out}", "--grpo_steps=1", "--reference_players=false"])  # no --overwrite needed
    assert (out / "eval.json").exists()


def test_resuming_with_another_model_shape_names_the_difference(tmp_path):
    out = tmp_path / "run"
    assert run_train(TINY + [f"--out_dir={out}", "--grpo_steps=1"]).returncode == 0
    result = run_train(TINY + [f"--out_dir={out}", "--resume", "--n_layer=3"])
    assert result.returncode != 0 and "--n_layer: the run has 2, the command line 3" in result.stderr


def test_a_nan_loss_stops_the_run_naming_the_step_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    import grpo
    calls = {"n": 0}
    original = grpo.grpo_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, stats = original(*args, **kwargs)
        return (loss * float("nan"), stats) if calls["n"] == 3 else (loss, stats)

    monkeypatch.setattr(grpo, "grpo_loss", poisoned)
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="stopped at GRPO step 2.*last good checkpoint"):
        # one loss call a step
        train.main(TINY + [f"--out_dir={out}", "--reference_players=false", "--num_iterations=1"])
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["stage"] == "grpo" and ckpt["step"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_two_processes_with_torchrun(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *TINY,
           f"--out_dir={out}", "--grpo_steps=3", "--reference_players=false"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records if r["stage"] == "grpo"] == [0, 1, 2]  # written once, by rank 0
    assert "x2" in result.stdout


def torchrun(args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *args]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: a kill reaches every worker


def test_a_resumed_two_process_run_equals_the_uninterrupted_one(tmp_path):
    # Each process draws its own prompts and samples; a resume must give each its own streams back (restoring
    # rank 0's on both would make the two processes train on identical data from then on).
    args = TINY + ["--grpo_steps=6", "--reference_players=false", "--eval_interval=100"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    proc = torchrun(args + [f"--out_dir={whole}"])
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    proc = torchrun(args + [f"--out_dir={killed}"])
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:  # kill it somewhere after GRPO step 2
        path = killed / "metrics.jsonl"
        if path.exists() and any(r["stage"] == "grpo" and r["step"] >= 2 for r in read_jsonl(path)):
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "eval.json").exists()  # it really died before the end
    proc = torchrun(args + [f"--out_dir={killed}", "--resume"])
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    a, b = (torch.load(d / "ckpt.pt", weights_only=True) for d in (whole, killed))
    assert a["step"] == b["step"] == 5 and len(a["rng"]) == 2
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    rewards = [[r["reward_mean"] for r in read_jsonl(d / "metrics.jsonl") if r["stage"] == "grpo"]
               for d in (whole, killed)]
    assert rewards[0] == rewards[1]


def test_a_skipped_dynamic_sampling_step_logs_a_complete_record(tmp_path):
    # Nearly greedy sampling makes every group's completions identical: no group has spread, every step skips.
    out = tmp_path / "run"
    train.main(TINY + [f"--out_dir={out}", "--dynamic_sampling", "--temperature=0.001", "--sft_steps=0",
                       "--grpo_steps=2", "--reference_players=false"])
    steps = [r for r in read_jsonl(out / "metrics.jsonl") if r["stage"] == "grpo"]
    assert [r["skipped"] for r in steps] == [1.0, 1.0] and all(r["optimizer_steps"] == 0 for r in steps)
    assert all(set(r) == set(steps[0]) for r in steps) and "completion_len" in steps[0]


def test_evaluations_do_not_change_the_run(tmp_path):
    # Held-out evaluations use their own generator and no training stream: how often they run (a cost of the
    # default's wall time) must not change the weights a run ends with.
    final = {}
    for interval in (1, 8):
        out = tmp_path / f"every{interval}"
        train.main(TINY + [f"--out_dir={out}", f"--eval_interval={interval}", "--reference_players=false",
                           "--sft_steps=40"])  # 40 warm-start steps: some groups have a spread, GRPO moves
        final[interval] = torch.load(out / "ckpt.pt", weights_only=True)["model"]
    warm = torch.load(tmp_path / "every1" / "warm_start.pt", weights_only=True)["model"]
    assert any(not torch.equal(final[1][k], warm[k]) for k in warm)  # GRPO moved the model
    for key in final[1]:
        assert torch.equal(final[1][key], final[8][key]), key


def test_grpo_starts_with_a_fresh_optimizer(tmp_path):
    # The warm start's AdamW moments would move the weights on GRPO's first step even with every advantage 0.
    out = tmp_path / "run"
    train.main(TINY + [f"--out_dir={out}", "--grpo_steps=2", "--num_iterations=1", "--reference_players=false"])
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert {float(s["step"]) for s in ckpt["optimizer"]["state"].values()} == {2.0}  # GRPO's 2 steps, not 6 + 2


def test_top_k_and_negative_clip_ranges_are_refused_before_any_work():
    with pytest.raises(TypeError, match="top_k"):  # GRPO samples the full distribution that the ratio scores
        grpo.GRPOConfig(top_k=5)
    with pytest.raises(ValueError, match="eps_low must be a finite number >= 0"):
        grpo.GRPOConfig(eps_low=-0.1)
    with pytest.raises(ValueError, match="minibatch_size=6 must be a positive multiple of group_size=4"):
        grpo.GRPOConfig(group_size=4, minibatch_size=6)


def test_a_local_gpt2_directory_trains_lora_adapters_through_gpt2s_tokenizer(tmp_path):
    from data.tokenizer import train_bpe
    from tests.helpers import tiny_gpt
    from tests.helpers import write_gpt2_vocab, write_hf_checkpoint
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    vocab = write_gpt2_vocab(gpt2, train_bpe([f"{a}+{b}={a + b}" for a in range(40) for b in range(40)], 300))
    base = tiny_gpt(dtype=torch.float32, vocab_size=len(vocab))
    write_hf_checkpoint(base, gpt2)
    out = tmp_path / "run"
    train.main(TINY + [f"--out_dir={out}", f"--init_from={gpt2}", "--grpo_steps=3", "--lora_rank=4", "--beta=0.04",
                       "--sft_lr=1e-2", "--reference_players=false"])
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["model_config"]["lora_rank"] == 4 and ckpt["model_config"]["vocab_size"] == len(vocab)
    warm = torch.load(out / "warm_start.pt", weights_only=True)["model"]  # the whole model after the warm start
    assert not torch.equal(warm["transformer.wte.weight"], base.state_dict()["transformer.wte.weight"])
    for key, value in warm.items():
        assert torch.equal(ckpt["model"][key], value), key  # GRPO never moved the base: only the adapters
    adapters = [v for k, v in ckpt["model"].items() if k.endswith("lora_B")]
    assert adapters and any(v.abs().sum() > 0 for v in adapters)
    kl = [r["kl"] for r in read_jsonl(out / "metrics.jsonl") if r["stage"] == "grpo"]
    assert kl[0] == 0 and kl[-1] > 0  # reference = the adapters switched off, equal to the policy at first


def whole_and_stopped_then_resumed(args, tmp_path, monkeypatch):
    """Runs args whole, then again stopped at GRPO step 3 (args must make one grpo_loss call per step) and
    resumed; returns the two final checkpoints."""
    train.main(args + [f"--out_dir={tmp_path / 'whole'}"])
    calls, loss = {"n": 0}, grpo.grpo_loss

    def dies_at_step_3(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # as if killed: checkpoints up to step 2 are on disk
        return loss(*a, **kw)

    monkeypatch.setattr(grpo, "grpo_loss", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train.main(args + [f"--out_dir={tmp_path / 'killed'}"])
    monkeypatch.setattr(grpo, "grpo_loss", loss)
    train.main(args + [f"--out_dir={tmp_path / 'killed'}", "--resume"])
    return [torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("whole", "killed")]


def test_a_lora_run_stopped_mid_grpo_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    args = TINY + ["--lora_rank=4", "--reference_players=false", "--num_iterations=1", "--grpo_steps=6"]
    a, b = whole_and_stopped_then_resumed(args, tmp_path, monkeypatch)
    assert a["step"] == b["step"] == 5 and a["model_config"]["lora_rank"] == 4
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


@pytest.mark.parametrize("flag,message", [("--lora_rank=33", "must be between 1 and the layer width n_embd=32"),
                                          ("--lora_rank=-1", "--lora_rank must be at least 0, got -1")])
def test_bad_lora_ranks_stop_before_any_work(tmp_path, flag, message):
    with pytest.raises(SystemExit, match=message):
        train.main(TINY + [f"--out_dir={tmp_path / 'run'}", flag])


@pytest.mark.parametrize("task", ["countdown", "summary"])
def test_the_other_tasks_run_end_to_end(tmp_path, task):
    out = tmp_path / task
    args = [a for a in TINY if not a.startswith(("--task", "--block_size", "--max_new_tokens"))]
    train.main(args + [f"--task={task}", f"--out_dir={out}", "--grpo_steps=2", "--eval_games=8"])
    table = json.loads((out / "eval.json").read_text())
    headline = {"countdown": "solved_rate", "summary": "quiz_score"}[task]
    ceiling = {"countdown": "player: solver", "summary": "player: facts"}[task]
    assert headline in table["GRPO"] and table[ceiling][headline] == 1


def test_wordle_states_are_played_by_the_policy_and_a_stopped_run_resumes_exactly(tmp_path, monkeypatch):
    from data import wordle
    args = ["--task=wordle", "--n_layer=2", "--n_head=2", "--n_embd=32", "--sft_steps=6", "--sft_batch_size=16",
            "--grpo_steps=6", "--prompts_per_step=4", "--group_size=4", "--eval_interval=3", "--eval_games=10",
            "--checkpoint_interval=1", "--threads=1", "--reference_players=false", "--num_iterations=1",
            "--dynamic_sampling=false"]  # one draw of states per step (Wordle's default redraws flat groups)
    players, original = [], wordle.training_examples

    def handed(n, rng, max_history=4, policy=None):
        players.append(policy)
        return original(n, rng, max_history, policy)

    monkeypatch.setattr(wordle, "training_examples", handed)
    a, b = whole_and_stopped_then_resumed(args, tmp_path, monkeypatch)
    # The model plays every step's earlier turns: 6 steps whole, 4 (0-3) before the stop, 3 (3-5) resumed.
    assert len(players) == 6 + 4 + 3 and all(callable(p) for p in players)
    assert a["step"] == b["step"] == 5
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_the_greedy_player_runs_each_distinct_prompt_once_and_answers_each_as_if_alone(monkeypatch):
    from data import wordle
    from tests.helpers import tiny_gpt
    enc = wordle.tokenizer()
    model = tiny_gpt(vocab_size=enc.n_vocab, dtype=torch.float32, block_size=40).eval()
    openings = [[], [("crane", "XYXXG")], [("crane", "XYXXG"), ("slate", "GXXXX")]]
    examples = [wordle.make_example("abbey", openings[i % 3]) for i in (0, 1, 0, 2, 2, 0, 1, 0)]
    batches, real_sample = [], data.sample
    monkeypatch.setattr(data, "sample", lambda model, prompts, **kw: batches.append(len(prompts)) or
                        real_sample(model, prompts, **kw))
    task = data.load_task("wordle")
    greedy = data.model_player(model, enc, task, 8, nullcontext())
    alone = [greedy([ex])[0] for ex in examples]
    batches.clear()
    assert greedy(examples) == alone and batches == [3]
    batches.clear()  # a sampled player draws every completion, the same prompt included
    data.model_player(model, enc, task, 8, nullcontext(), 1.0, torch.Generator().manual_seed(0))(examples)
    assert batches == [8]
