"""Files out: export.py (hf.export) writes a run's policy as a Hugging Face GPT-2 directory that our loader, and
transformers where it is installed, read back to the same logits and token ids."""

import json
import random

import pytest
import torch

import export
import hf
import train
from checkpoint import load_run
from data import load_task, task_names
from data.tokenizer import encoding_from_merges
from model import add_lora
from tests.helpers import tiny_gpt
from tests.helpers import TINY
from tests.reference import read_safetensors

TASKS = task_names()


def task_texts(name, n=40):
    """Prompts and demonstrations of a task, the text its tokenizer is for, plus some it never saw."""
    task = load_task(name)
    pairs = task.demonstrations(n, random.Random(0), task.default_player)
    return [p + c + "<|end|>" for p, c in pairs] + ["  Hello,   world!\n\n\tünïcode 123 <guess>x</guess> é"]


def test_safetensors_writer_and_reader_round_trip(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "empty": torch.zeros(0, 4),
               "scalar": torch.tensor(2.5, dtype=torch.float64)}
    hf.write_safetensors(str(tmp_path / "x.safetensors"), tensors, {"format": "pt"})
    raw = (tmp_path / "x.safetensors").read_bytes()
    assert int.from_bytes(raw[:8], "little") % 8 == 0  # the data starts aligned
    back = read_safetensors(tmp_path / "x.safetensors")
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name


@pytest.mark.parametrize("name", TASKS)
def test_exported_merges_rebuild_the_tasks_tokenizer_exactly(name):
    enc = load_task(name).tokenizer()
    vocab, merges = hf.bpe_merges(enc)
    rebuilt = encoding_from_merges(merges)
    assert len(vocab) == rebuilt.n_vocab - 3
    for text in task_texts(name):
        assert rebuilt.encode(text, allowed_special="all") == enc.encode(text, allowed_special="all")


@pytest.fixture(scope="module")
def exported_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    train.main(TINY + [f"--out_dir={root / 'run'}", "--grpo_steps=2", "--reference_players=false"])
    export.main([str(root / "run"), str(root / "hf")])
    model, enc, _ = load_run(str(root / "run"))
    return model, enc, root / "hf"


def test_an_exported_run_loads_back_to_the_same_logits(exported_run):
    model, enc, hf_dir = exported_run
    idx = torch.tensor([enc.encode("<|begin|>12+30=42<|end|>", allowed_special="all")])
    loaded = hf.load_gpt2(str(hf_dir))
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], model(idx)[0])
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["eos_token_id"] == enc.encode_single_token("<|end|>")
    assert config["nanogrpo"]["task"] == "addition"


def test_lora_adapters_are_merged_into_the_export(tmp_path):
    model = tiny_gpt(dtype=torch.float32)
    add_lora(model, rank=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.5)  # adapters that change the output
    enc = load_task("addition").tokenizer()
    hf.export(model, enc, str(tmp_path), "addition")
    idx = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(hf.load_gpt2(str(tmp_path))(idx)[0], model(idx)[0], rtol=1e-5,
                                   atol=1e-5)
    assert model.config.lora_rank == 4  # the run's model itself is untouched


def test_transformers_reads_the_export_to_the_same_logits_and_ids(exported_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    model, enc, hf_dir = exported_run
    theirs = transformers.GPT2LMHeadModel.from_pretrained(str(hf_dir)).eval()
    texts = task_texts("addition")
    idx = torch.tensor([enc.encode(texts[0], allowed_special="all")])
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, model(idx)[0], rtol=1e-5, atol=1e-5)
    for name in TASKS:  # every task's tokenizer, through transformers' fast tokenizer
        task_enc = load_task(name).tokenizer()
        hf.write_tokenizer(task_enc, str(tmp_path), 64)
        tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
        for text in task_texts(name):
            assert tok(text)["input_ids"] == task_enc.encode(text, allowed_special="all"), (name, text)
            assert tok.decode(tok(text)["input_ids"]) == text


def test_sample_prints_held_out_examples_with_rewards_and_given_prompts(exported_run, capsys):
    import sample
    model, enc, hf_dir = exported_run
    run_dir = str(hf_dir.parent / "run")
    sample.main([run_dir, "--n=3"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all("| reward " in line and "addition_exact" in line for line in lines)
    sample.main([str(hf_dir), "--n=3"])  # the exported directory gives the same greedy completions
    assert capsys.readouterr().out.strip().splitlines() == lines
    sample.main([run_dir, "<|begin|>58+67=", "<|begin|>1+1=", "--temperature=1", "--num_samples=2"])
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 4 and out[0].startswith("'<|begin|>58+67=' -> ")
    with pytest.raises(SystemExit, match="unknown option --temp"):
        sample.main([run_dir, "--temp=1"])
    sample.main([run_dir, "--n=3", "--stage=warm_start"])  # the model before GRPO, for comparison
    assert len(capsys.readouterr().out.strip().splitlines()) == 3
    with pytest.raises(SystemExit, match="--stage='sft' is not grpo or warm_start"):
        sample.main([run_dir, "--stage=sft"])
    with pytest.raises(SystemExit, match="--stage=warm_start needs a run folder"):  # not the export's model
        sample.main([str(hf_dir), "--stage=warm_start"])


def test_sample_shows_wordle_games_turn_by_turn(capsys):
    import data.wordle as wordle
    wordle.show_games(wordle.reference_players(random.Random(0))["candidate"], 2)
    out = capsys.readouterr().out
    assert out.count("answer ") == 2 and "GGGGG" in out and "win_rate" in out
