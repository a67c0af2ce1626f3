"""Nothing lost by a careless command, and nothing read back unchecked: a run folder is known by its marker and
owned by one process, its logs and checkpoints are written whole or not at all, a resumed run follows its folder
and checks its config against its checkpoint, and every file read back is verified or refused with a sentence
that names it."""

import json
import os
import resource
import shutil
import struct
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import export
import sample
import train
from checkpoint import atomic_save, atomic_write, read_log
from config import parse_config
from hf import load_gpt2, read_safetensors_header
from tests.helpers import TINY, tiny_gpt, write_hf_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = TINY + ["--reference_players=false", "--grpo_steps=2"]


def run(tmp_path, name="run", *flags):
    out = tmp_path / name
    train.main(QUICK + [f"--out_dir={out}", *flags])
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("exported")
    train.main(QUICK + [f"--out_dir={root / 'run'}"])
    export.main([str(root / "run"), str(root / "hf")])
    return root / "run", root / "hf"


def snapshot(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder)) if name != "run.lock"}


# ---- work lost ----------------------------------------------------------------------------------------------


def test_an_export_folder_given_as_out_dir_is_refused_and_left_whole(exported, tmp_path):
    _, hf_dir = exported
    copy = tmp_path / "hf"
    shutil.copytree(hf_dir, copy)
    before = snapshot(copy)
    with pytest.raises(SystemExit, match="holds files that are not a run of this project .*config.json"):
        train.main(QUICK + [f"--out_dir={copy}"])
    assert snapshot(copy) == before
    load_gpt2(str(copy))  # still an export


def test_a_finished_run_without_its_checkpoints_is_not_replaced(tmp_path):
    out = run(tmp_path)
    for name in ("ckpt.pt", "ckpt.prev.pt"):
        (out / name).unlink()
    before = snapshot(out)
    with pytest.raises(SystemExit, match="already holds a run .*eval.json"):
        train.main(QUICK + [f"--out_dir={out}"])
    assert snapshot(out) == before  # eval.json, metrics.jsonl, warm_start.pt, config.json untouched
    train.main(QUICK + [f"--out_dir={out}", "--overwrite"])  # replacing it is one flag away
    assert (out / "ckpt.pt").exists()


def test_export_refuses_the_run_folder_itself_and_any_folder_that_holds_something(exported, tmp_path):
    run_dir, hf_dir = exported
    before = snapshot(run_dir)
    with pytest.raises(SystemExit, match="is the run folder itself"):
        export.main([str(run_dir), str(run_dir)])
    with pytest.raises(SystemExit, match="is the run folder itself"):
        export.main([str(run_dir), str(run_dir) + "/"])
    assert snapshot(run_dir) == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not an empty folder .*notes.txt.* --overwrite"):
        export.main([str(run_dir), str(other)])
    assert os.listdir(other) == ["notes.txt"]
    export.main([str(run_dir), str(other), "--overwrite"])
    assert (other / "notes.txt").read_text() == "mine" and (other / "model.safetensors").exists()


def test_a_second_process_on_the_same_run_folder_is_refused_naming_the_first(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; sys.path.insert(0, '.'); from checkpoint import lock_folder; "
         f"lock = lock_folder({str(out)!r}); print('locked', flush=True); time.sleep(60)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit, match=f"is in use by another process \\(pid {holder.pid}\\)"):
            train.main(QUICK + [f"--out_dir={out}"])
        assert os.listdir(out) == ["run.lock"]  # refused before it wrote anything
    finally:
        holder.kill()
        holder.wait()
    train.main(QUICK + [f"--out_dir={out}"])  # the lock went with the process that held it
    assert (out / "eval.json").exists()


def test_a_torn_last_log_line_is_dropped_with_a_warning_and_the_run_resumes_exactly(tmp_path, capsys):
    whole = run(tmp_path, "whole", "--grpo_steps=4")
    killed = tmp_path / "killed"
    train.main(QUICK + [f"--out_dir={killed}", "--grpo_steps=4"])
    # As if killed during step 3's checkpoint write, with the log's last line cut short by a full disk.
    (killed / "eval.json").unlink()
    ckpt = torch.load(killed / "ckpt.prev.pt", weights_only=True)
    assert ckpt["step"] == 2
    os.replace(killed / "ckpt.prev.pt", killed / "ckpt.pt")
    with open(killed / "metrics.jsonl", "a") as f:
        f.write('{"stage": "grpo", "step": 3, "reward_me')
    train.main(QUICK + [f"--out_dir={killed}", "--grpo_steps=4", "--resume"])
    assert "its last line is cut short" in capsys.readouterr().out
    a, b = (torch.load(d / "ckpt.pt", weights_only=True)["model"] for d in (whole, killed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    logged = [r["step"] for r in read_log(killed / "metrics.jsonl") if r["stage"] == "grpo"]
    assert logged == [0, 1, 2, 3]


def test_a_damaged_line_inside_a_log_is_an_error_naming_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"stage": "sft", "step": 0}\nnot json\n{"stage": "sft", "step": 1}\n')
    with pytest.raises(SystemExit, match="metrics.jsonl, line 2, is not a log record"):
        read_log(path)


def test_logs_and_checkpoints_are_replaced_whole_and_flushed_to_disk(tmp_path, monkeypatch):
    path = tmp_path / "log.jsonl"
    path.write_text("old\n")

    def fails(*args):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", fails)
    with pytest.raises(OSError):
        atomic_write(str(path), "new\n")
    assert path.read_text() == "old\n"  # a failed rewrite leaves the old file as it was
    monkeypatch.undo()
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    atomic_save({"x": torch.ones(2)}, str(tmp_path / "c.pt"))
    atomic_write(str(path), "new\n")
    assert len(synced) == 4  # the file and its folder, each time
    assert path.read_text() == "new\n"


def test_the_final_table_is_written_whole_or_not_at_all(tmp_path):
    """eval.json marks a run finished (a rerun is refused, --resume has nothing to do): a table cut short by a
    failure while writing it would mark a run finished that has no table."""
    run = SimpleNamespace(cfg=SimpleNamespace(reference_players=False, out_dir=str(tmp_path), seed=0),
                          task=SimpleNamespace(headline=("reward",)))
    with pytest.raises(TypeError):  # a figure that is not JSON, found only after the first rows are written
        train.final_table(run, {"warm start": {"reward": 0.5}, "GRPO": {"reward": object()}})
    assert not (tmp_path / "eval.json").exists()
    train.final_table(run, {"warm start": {"reward": 0.5}, "GRPO": {"reward": 0.75}})
    assert json.loads((tmp_path / "eval.json").read_text()) == {"warm start": {"reward": 0.5},
                                                                 "GRPO": {"reward": 0.75}}


# ---- read back, verified ------------------------------------------------------------------------------------


def test_a_hand_edited_config_json_is_refused_on_resume_listing_each_difference(tmp_path):
    out = run(tmp_path, "run", "--grpo_steps=4")
    (out / "eval.json").unlink()
    saved = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**saved, "lr": 0.5, "beta": 0.0}))
    with pytest.raises(SystemExit, match=r"(?s)differs from the configuration its checkpoint.*--beta: the run "
                                         r"has 0.0, the checkpoint 0.04.*--lr: the run has 0.5, the checkpoint "
                                         r"0.0003"):
        train.main([f"--out_dir={out}", "--resume"])


@pytest.mark.parametrize("text,message", [
    ("{not json", "the file is not JSON"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("[1, 2]", "the file is a JSON list, not an object"),
    ('{"lr": "fast"}', "lr is 'fast', not a float"),
    ('{"group_size": 4.5}', "group_size is '4.5', not a int"),
    ('{"wings": 2}', "options this train.py does not know"),
])
def test_a_malformed_config_json_gets_a_sentence_naming_the_file(tmp_path, text, message):
    out = run(tmp_path)
    (out / "eval.json").unlink()
    (out / "config.json").write_text(text)
    with pytest.raises(SystemExit, match=f"config.json.*{message}"):
        parse_config([f"--out_dir={out}", "--resume"])


def test_a_moved_run_folder_resumes_where_it_now_is(tmp_path):
    whole = run(tmp_path, "whole", "--grpo_steps=4")
    first = run(tmp_path, "first", "--grpo_steps=4")
    (first / "eval.json").unlink()
    ckpt = torch.load(first / "ckpt.prev.pt", weights_only=True)
    os.replace(first / "ckpt.prev.pt", first / "ckpt.pt")  # as if stopped after step 2
    assert ckpt["step"] == 2
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(str(first), str(moved))
    train.main([f"--out_dir={moved}/", "--resume"])  # a trailing slash too
    a, b = (torch.load(d / "ckpt.pt", weights_only=True)["model"] for d in (whole, moved))
    assert all(torch.equal(a[k], b[k]) for k in a)
    sample.main([str(moved), "--n=2", "--stage=warm_start"])  # the tools follow the folder too


def test_a_config_claiming_ten_thousand_layers_is_refused_by_the_file_before_any_model(tmp_path):
    model = tiny_gpt(dtype=torch.float32)
    write_hf_checkpoint(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_layer": 10_000}))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError, match="describes 10000 layers, 120004 tensors, but .* holds 28"):
        load_gpt2(str(tmp_path))
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024 < 100  # MB: nothing was built


@pytest.mark.parametrize("flag,message", [
    ("--out_dir={file}", "is a file, not a folder"),
    ("--init_from={empty}", "is a folder without config.json"),
    ("--init_from={missing}", "is not there"),
])
def test_bad_folders_and_files_in_flags_are_refused_before_any_work(tmp_path, flag, message):
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    arg = flag.format(file=tmp_path / "file", empty=tmp_path / "empty", missing=tmp_path / "missing")
    with pytest.raises(SystemExit, match=message):
        parse_config(QUICK + [arg] + ([f"--out_dir={tmp_path / 'run'}"] if "out_dir" not in arg else []))
    assert not (tmp_path / "run").exists()


def test_deeply_nested_json_in_a_header_or_a_config_names_the_file(tmp_path):
    nested = b"[" * 100_000 + b"]" * 100_000
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(nested)) + nested)
    with pytest.raises(ValueError, match="model.safetensors: the header is not JSON \\(nested too deeply\\)"):
        read_safetensors_header(tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_bytes(nested)
    with pytest.raises(ValueError, match="config.json: the file is not JSON \\(nested too deeply\\)"):
        load_gpt2(str(tmp_path))


@pytest.mark.parametrize("vocab,message", [
    ({"a": "0", "b": 1}, "token 'a' has id '0', not a non-negative integer"),
    (["a", "b"], "a JSON list, where an object of token: id is expected"),
    ({"a": 0, "b": 0}, "two tokens share an id"),
])
def test_a_malformed_vocab_json_is_refused_naming_the_file(tmp_path, vocab, message):
    from data.tokenizer import gpt2_encoding
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(ValueError, match=f"vocab.json: {message}"):
        gpt2_encoding(str(tmp_path))


def test_an_exports_own_entry_of_the_wrong_type_is_refused_naming_it(exported, tmp_path):
    _, hf_dir = exported
    copy = tmp_path / "hf"
    shutil.copytree(hf_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "nanogrpo": ["addition"]}))
    with pytest.raises(SystemExit, match="its \"nanogrpo\" entry must be an object with a task name"):
        sample.main([str(copy), "--n=1"])


def test_weights_that_are_not_finite_are_refused_naming_the_tensor(tmp_path):
    model = tiny_gpt(dtype=torch.float32, vocab_size=259)  # the addition task's vocabulary
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.bias[3] = float("nan")
    write_hf_checkpoint(model, tmp_path / "hf")
    with pytest.raises(ValueError, match="tensor transformer.h.1.mlp.c_fc.bias holds values that are not finite"):
        load_gpt2(str(tmp_path / "hf"))
    atomic_save({"model": model.state_dict(), "model_config": {"block_size": 64, "vocab_size": 259, "n_layer": 2,
                                                               "n_head": 2, "n_embd": 32}}, str(tmp_path / "m.pt"))
    with pytest.raises(SystemExit, match="transformer.h.1.mlp.c_fc.bias holds values that are not finite"):
        train.main(TINY + [f"--out_dir={tmp_path / 'run'}", f"--init_from={tmp_path / 'm.pt'}",
                           "--block_size=64"])


def test_an_export_is_a_valid_init_from_and_starts_from_the_same_model(exported, tmp_path):
    run_dir, hf_dir = exported
    out = tmp_path / "again"
    train.main(QUICK + [f"--out_dir={out}", f"--init_from={hf_dir}", "--sft_steps=0", "--grpo_steps=1"])
    start = torch.load(out / "warm_start.pt", weights_only=True)["model"]
    trained = torch.load(run_dir / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(start[k], trained[k]) for k in trained)  # the export's weights, bit for bit
    with pytest.raises(SystemExit, match="exported from a addition run, whose tokens are not the countdown"):
        train.main([a for a in QUICK if not a.startswith(("--task", "--block_size", "--max_new_tokens"))]
                   + ["--task=countdown", f"--out_dir={tmp_path / 'other'}", f"--init_from={hf_dir}"])
