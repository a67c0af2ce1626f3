"""Shared test utilities: a tiny GPT, GPT-2-like logits, train.py's tiny run, and writers of Hugging Face files
(the loaders' independent counterparts)."""

import json
import os
import struct

import torch

from data.tokenizer import save_merges, to_readable
from model import GPT, GPTConfig

PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]  # different lengths: left padding is exercised
# train.py on the toy task in seconds
TINY = ["--task=addition", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--sft_steps=6",
        "--sft_batch_size=16", "--grpo_steps=8", "--prompts_per_step=4", "--group_size=4", "--eval_interval=4",
        "--eval_games=20", "--checkpoint_interval=1", "--max_new_tokens=5", "--threads=1"]


def tiny_gpt(seed=0, dtype=torch.float64, **overrides):
    torch.manual_seed(seed)
    cfg = dict(block_size=64, vocab_size=50, n_layer=2, n_head=2, n_embd=32)
    cfg.update(overrides)
    return GPT(GPTConfig(**cfg)).to(dtype)


def write_safetensors(path, tensors):
    names = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int32: "I32", torch.int64: "I64"}
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        t = t.contiguous()
        raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    header["__metadata__"] = {"format": "pt"}
    head = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def gpt2_like_head(N=96, C=64, V=2048, seed=0):
    """Hidden states and an embedding matrix at GPT-2's scale: every embedding shares a large direction that the
    hidden states oppose, so the logits sit near -90 with a spread of a few nats (a tiny random model's logits
    near 0 hide the precision bugs of a bf16 log-softmax)."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(C, generator=g)
    shared /= shared.norm()
    weight = 0.1 * torch.randn(V, C, generator=g) + 3.0 * shared
    h = torch.randn(N, C, generator=g) - 30.0 * shared
    return h, weight, torch.randint(0, V, (N,), generator=g)


CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def hf_state_dict(model, prefix="transformer.", dtype=torch.float32):
    """The model's tensors as Hugging Face's GPT-2 names and lays them out (Conv1D weights transposed)."""
    state = {}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight":
            continue  # tied: Hugging Face's files usually leave it out
        value = value.t().contiguous() if key.endswith(CONV1D) else value.clone()
        state[prefix + key[len("transformer."):]] = value.to(dtype)
    return state


def write_hf_checkpoint(model, path, kind="safetensors", prefix="transformer.", dtype=torch.float32):
    os.makedirs(path, exist_ok=True)
    c = model.config
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_positions=c.block_size,
                       n_ctx=c.block_size, vocab_size=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head,
                       n_embd=c.n_embd, activation_function="gelu_new", layer_norm_epsilon=1e-5), f)
    state = hf_state_dict(model, prefix, dtype)
    for layer in range(c.n_layer):  # the causal-mask buffer old files carry
        state[f"{prefix}h.{layer}.attn.bias"] = torch.ones(1, 1, c.block_size, c.block_size).tril().to(dtype)
    if kind == "safetensors":
        write_safetensors(os.path.join(path, "model.safetensors"), state)
    else:
        torch.save(state, os.path.join(path, "pytorch_model.bin"))


def write_gpt2_vocab(path, merges):
    """A miniature GPT-2 tokenizer directory: vocab.json (ids in the readable byte alphabet) + merges.txt."""
    vocab = {to_readable(bytes([b])): b for b in range(256)}
    for left, right in merges:
        vocab.setdefault(to_readable(left + right), len(vocab))
    vocab["<|endoftext|>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    save_merges(str(path / "merges.txt"), merges)
    return vocab
