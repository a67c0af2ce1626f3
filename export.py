"""
A run's trained policy as a Hugging Face GPT-2 directory, for transformers, a serving stack or a notebook:

    python export.py RUN_DIR OUT_DIR

RUN_DIR is a train.py run folder (its ckpt.pt is checksum-verified; LoRA adapters are merged in). OUT_DIR gets
    config.json              GPT-2's config, plus a "nanogrpo" entry naming the task (transformers ignores it)
    model.safetensors        written here: the format model.read_safetensors reads, in reverse
    vocab.json, merges.txt   the BPE in GPT-2's files (our tokenizers are byte-level BPE with merges already)
    tokenizer.json           the same BPE with this project's pre-tokenizer and special tokens, for
                             transformers' fast tokenizer (AutoTokenizer)
    tokenizer_config.json    which tokens start, end and pad

GPT-2's slow tokenizer splits text with GPT-2's own pattern, which keeps digit runs and tags apart differently
from ours, so exact ids need tokenizer.json. A run trained from a GPT-2 directory keeps GPT-2's tokenizer files.
"""

import copy
import json
import os
import shutil
import struct
import sys

import torch

from data.tokenizer import PATTERN, to_readable
from model import CONV1D, merge_lora

SAFETENSORS_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def write_safetensors(path, tensors, metadata=None):
    """tensors {name: tensor} -> a safetensors file: 8-byte little-endian header length, the JSON header padded
    with spaces to a multiple of 8 (so the data is aligned), then each tensor's bytes in header order."""
    header, offset = {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for t in tensors.values():
            if t.numel():
                f.write(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    os.replace(tmp, path)


def hf_tensors(model):
    """Our state dict in Hugging Face's GPT-2 layout: Conv1D weights transposed, the tied lm_head left out."""
    return {key: (value.t() if key.endswith(CONV1D) else value).contiguous()
            for key, value in model.state_dict().items() if key != "lm_head.weight"}


def hf_config(model, enc, task):
    c = model.config
    ids = {name: enc.encode_single_token(f"<|{name}|>") if enc else None for name in ("begin", "end", "pad")}
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_positions": c.block_size,
            "n_ctx": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head,
            "vocab_size": c.vocab_size, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            "tie_word_embeddings": True, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "bos_token_id": ids["begin"], "eos_token_id": ids["end"], "pad_token_id": ids["pad"],
            "torch_dtype": "float32", "nanogrpo": {"task": task}}


def bpe_merges(enc):
    """(vocab {readable token: id}, merges [(left, right)] in rank order) of a tiktoken Encoding of ours: each
    token above the 256 bytes was made by one merge, found by running BPE on its bytes with the lower ranks only
    (the merge that would come next is the one that made it)."""
    specials = {enc.encode_single_token(s) for s in enc.special_tokens_set}
    tokens = [enc.decode_single_token_bytes(i) for i in range(enc.n_vocab) if i not in specials]
    ranks = {t: i for i, t in enumerate(tokens)}
    merges = []
    for token, rank in ranks.items():
        if rank < 256:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            pairs = [(ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            best, i = min(pairs)
            if best >= rank:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) is not one merge of two lower-ranked tokens")
        merges.append((parts[0], parts[1]))
    return {to_readable(t): i for t, i in ranks.items()}, merges


def write_tokenizer(enc, out_dir, block_size):
    vocab, merges = bpe_merges(enc)
    readable = [f"{to_readable(a)} {to_readable(b)}" for a, b in merges]
    specials = {s: enc.encode_single_token(s) for s in sorted(enc.special_tokens_set)}
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({**vocab, **specials}, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(line + "\n" for line in readable))
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "normalizer": None, "post_processor": None,
        "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for s, i in specials.items()],
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": PATTERN}, "behavior": "Isolated", "invert": False},
            byte_level]},
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": readable},
    }
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin|>", "eos_token": "<|end|>",
                   "pad_token": "<|pad|>", "model_max_length": block_size}, f, indent=1)


def export(model, enc, out_dir, task, gpt2_dir=None, tokenizer=True):
    """Write `model` (LoRA adapters merged into a copy) and its tokenizer `enc` to out_dir as a GPT-2 directory.
    gpt2_dir: the GPT-2 directory the run started from, whose tokenizer files are copied as they are.
    tokenizer=False writes the weights and a config without token ids (bench.py's load test)."""
    os.makedirs(out_dir, exist_ok=True)
    model = copy.deepcopy(model).cpu().float()
    if model.config.lora_rank:
        merge_lora(model)
    write_safetensors(os.path.join(out_dir, "model.safetensors"), hf_tensors(model), {"format": "pt"})
    config = hf_config(model, enc if tokenizer else None, task) if gpt2_dir is None else {
        **json.load(open(os.path.join(gpt2_dir, "config.json"))), "nanogrpo": {"task": task, "gpt2": True}}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    if gpt2_dir is None and tokenizer:
        write_tokenizer(enc, out_dir, model.config.block_size)
    elif tokenizer:
        for name in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "encoder.json",
                     "vocab.bpe"):
            if os.path.isfile(os.path.join(gpt2_dir, name)):
                shutil.copy(os.path.join(gpt2_dir, name), out_dir)


def main(argv):
    if len(argv) != 2 or argv[0] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if argv[:1] in (["-h"], ["--help"]) else 2)
    import train  # the run folder's reader: checksum-verified checkpoint, the run's tokenizer
    run_dir, out_dir = argv
    model, enc, cfg = train.load_run(run_dir)
    export(model, enc, out_dir, cfg.task, cfg.init_from if os.path.isdir(cfg.init_from) else None)
    print(f"exported {run_dir} ({model.num_params() / 1e6:.2f}M parameters, vocab {enc.n_vocab}) to {out_dir}")


if __name__ == "__main__":
    main(sys.argv[1:])
