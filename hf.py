"""
Hugging Face's GPT-2 files, read and written: a local GPT-2 directory as a GPT (`load_gpt2`, behind
`train.py --init_from=DIR`), and a trained GPT with its tokenizer as such a directory (`export`, behind
`python export.py RUN_DIR OUT_DIR`). No network and no transformers: safetensors is read and written here.

A directory holds config.json (GPT-2's, plus a "nanogrpo" entry naming the task, which transformers ignores),
model.safetensors (or pytorch_model.bin, read with torch.load(weights_only=True)), and the tokenizer: vocab.json
and merges.txt (GPT-2's files for the same byte-level BPE), tokenizer.json (the same BPE with this project's
pre-tokenizer and special tokens, for transformers' fast tokenizer) and tokenizer_config.json. GPT-2's slow
tokenizer splits text with GPT-2's own pattern, which keeps digit runs and tags apart differently from ours, so
exact ids need tokenizer.json. A run trained from a GPT-2 directory keeps GPT-2's tokenizer files.

Hugging Face's GPT-2 uses Conv1D, whose weight is (in, out): four of our weights are its transpose (CONV1D).
"""

import copy
import json
import math
import os
import shutil
import struct

import torch

from data.tokenizer import PATTERN, to_readable
from model import GPT, GPTConfig, merge_lora

# ----------------------------------------------------------------------------------------------------------------
# Reading: safetensors, GPT-2's config, a GPT-2 directory

def read_json(path, limit=10_000_000):
    """A JSON object from a file of at most `limit` bytes, or a ValueError that names the file and what is wrong
    with it: too large, not JSON (nested beyond what the parser allows included), or not an object."""
    size = os.path.getsize(path)
    if size > limit:
        raise ValueError(f"{path}: {size:,} bytes, more than the {limit:,} a file of this kind may hold")
    with open(path, "rb") as f:
        return json_object(f.read(), path, "the file")


def json_object(raw, path, what):
    """raw bytes parsed as a JSON object, or a ValueError that names the file, the part, and what is wrong."""
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise ValueError(f"{path}: {what} is not JSON ({reason})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: {what} is a JSON {type(value).__name__}, not an object")
    return value


def exported_task(path):
    """(task, trained from GPT-2) of a directory this project exported (config.json's "nanogrpo" entry), or
    (None, False) for any other Hugging Face directory; a malformed entry is refused, naming the field."""
    ours = read_json(os.path.join(path, "config.json"), 1_000_000).get("nanogrpo")
    if ours is None:
        return None, False
    task, gpt2 = (ours.get("task"), ours.get("gpt2", False)) if isinstance(ours, dict) else (None, None)
    if not isinstance(task, str) or not isinstance(gpt2, bool):
        raise ValueError(f"{path}/config.json: its \"nanogrpo\" entry must be an object with a task name (text) "
                         f"and optionally \"gpt2\" (true or false), got {ours!r}"[:400])
    return task, gpt2


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit


def read_safetensors_header(path):
    """A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
    {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the data the offsets
    index. Every field is checked before a byte of data is read: offsets within the data, each tensor's bytes
    exactly its shape times its dtype's size, the tensors tiling the data with no overlap and no gap.
    Returns ({name: (dtype, shape, begin, end)}, where the data starts)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: {size} bytes, too short to be a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"{path}: header length {n} runs past the end of the file ({size} bytes) or the "
                             f"format's limit of {MAX_HEADER_BYTES}")
        header = json_object(f.read(n), path, "the header")
    data_len, tensors = size - 8 - n, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise ValueError(f"{where}: expected the fields dtype, shape, data_offsets, got {info!r}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{where}: dtype {dtype!r} is not one of {', '.join(SAFETENSORS_DTYPES)}")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise ValueError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise ValueError(f"{where}: data_offsets {offsets!r} is not a pair of integers")
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            raise ValueError(f"{where}: data_offsets [{begin}, {end}] are not within the {data_len} data bytes "
                             f"with begin <= end")
        nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
        if end - begin != nbytes:
            raise ValueError(f"{where}: shape {shape} of {dtype} needs {nbytes} bytes, data_offsets hold "
                             f"{end - begin}")
        tensors[name] = (SAFETENSORS_DTYPES[dtype], tuple(shape), begin, end)
    at = 0
    for name, (_, _, begin, end) in sorted(tensors.items(), key=lambda item: item[1][2:]):
        if begin != at:
            raise ValueError(f"{path}: tensor {name!r} starts at byte {begin}, but the previous one ends at {at} "
                             f"({'an overlap' if begin < at else 'a gap'})")
        at = end
    if at != data_len:
        raise ValueError(f"{path}: the tensors cover {at} of the {data_len} data bytes")
    return tensors, 8 + n


def read_safetensors_tensor(path, header, data_start, name, out=None):
    """One tensor of a checked header, read straight from the file into `out` (or a new tensor): memory for
    that tensor only, never a copy of the file."""
    dtype, shape, begin, end = header[name]
    out = torch.empty(shape, dtype=dtype) if out is None else out
    if end > begin:
        with open(path, "rb") as f:
            f.seek(data_start + begin)
            if f.readinto(out.view(-1).view(torch.uint8).numpy()) != end - begin:
                raise ValueError(f"{path}: tensor {name!r} is cut short")
    return out


# GPT-2 config fields that change the math; each is honoured as GPT-2 has it, or refused (never ignored).
GPT2_DEFAULTS = {"tie_word_embeddings": True, "layer_norm_epsilon": 1e-5, "scale_attn_weights": True,
                 "scale_attn_by_inverse_layer_idx": False, "activation_function": "gelu_new", "n_inner": None}


def gpt2_config(path):
    """GPTConfig from a Hugging Face GPT-2 config.json, every field checked."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face GPT-2 directory)")
    hf = read_json(config_file, 1_000_000)
    if hf.get("model_type") != "gpt2":
        raise ValueError(f"{config_file}: model_type is {hf.get('model_type')!r}, only 'gpt2' can be loaded")
    sizes = {}
    for key in ("n_positions", "vocab_size", "n_layer", "n_head", "n_embd"):
        value = hf.get(key)
        if type(value) is not int or not 1 <= value <= 1_000_000:
            raise ValueError(f"{config_file}: {key} is {value!r}, expected an integer from 1 to 1,000,000")
        sizes[key] = value
    for key, gpt2 in GPT2_DEFAULTS.items():
        value = hf.get(key, gpt2)
        if key == "n_inner" and value == 4 * sizes["n_embd"]:  # written out, it is GPT-2's default
            value = None
        if key == "layer_norm_epsilon" and isinstance(value, (int, float)) and math.isclose(value, gpt2):
            value = gpt2
        if value != gpt2:
            raise ValueError(f"{config_file}: {key} is {value!r}; this GPT computes GPT-2's {gpt2!r} only")
    return GPTConfig(block_size=sizes["n_positions"], vocab_size=sizes["vocab_size"], n_layer=sizes["n_layer"],
                     n_head=sizes["n_head"], n_embd=sizes["n_embd"], bias=True)


CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def gpt2_shapes(config):
    """{name: shape} of GPT(config)'s state dict, by arithmetic: what a file is checked against before any
    model is built (tests check it against the built model's)."""
    V, T, C = config.vocab_size, config.block_size, config.n_embd
    shapes = {"transformer.wte.weight": (V, C), "transformer.wpe.weight": (T, C), "lm_head.weight": (V, C),
              "transformer.ln_f.weight": (C,), "transformer.ln_f.bias": (C,)}
    for i in range(config.n_layer):
        layer = {"ln_1.weight": (C,), "ln_1.bias": (C,), "ln_2.weight": (C,), "ln_2.bias": (C,),
                 "attn.c_attn.weight": (3 * C, C), "attn.c_attn.bias": (3 * C,),
                 "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,),
                 "mlp.c_fc.weight": (4 * C, C), "mlp.c_fc.bias": (4 * C,),
                 "mlp.c_proj.weight": (C, 4 * C), "mlp.c_proj.bias": (C,)}
        shapes.update({f"transformer.h.{i}.{name}": shape for name, shape in layer.items()})
    return shapes


def hf_key(key):
    """Our parameter name for a Hugging Face GPT-2 key (hub files name keys with or without "transformer."),
    or None for the attention-mask buffers old files carry ("attn.bias", "attn.masked_bias")."""
    if key.endswith((".attn.bias", ".attn.masked_bias")) or key in ("attn.bias", "attn.masked_bias"):
        return None
    return key if key.startswith(("transformer.", "lm_head.")) else "transformer." + key


def load_gpt2(path):
    """A GPT from a local Hugging Face GPT-2 directory: config.json and model.safetensors or pytorch_model.bin.
    The config and every tensor's name, dtype and shape are checked against the model they describe before
    the model is built; then the tensors are read one at a time into it (memory: the model, plus one tensor)."""
    config = gpt2_config(path)
    st_file, bin_file = os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(st_file):
        source = st_file
        header, data_start = read_safetensors_header(st_file)
        found = {key: (dtype, shape) for key, (dtype, shape, _, _) in header.items()}

        def fetch(key, out=None):
            return read_safetensors_tensor(st_file, header, data_start, key, out)
    elif os.path.isfile(bin_file):
        source = bin_file
        try:  # mmap: tensors stay on disk until read
            state = torch.load(bin_file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise ValueError(f"{bin_file} is not a readable weights file ({type(e).__name__})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{bin_file} does not hold a dict of tensors")
        found = {key: (v.dtype, tuple(v.shape)) for key, v in state.items()}

        def fetch(key, out=None):
            return state[key] if out is None else out.copy_(state[key])
    else:
        raise FileNotFoundError(f"{path}: neither model.safetensors nor pytorch_model.bin is there")
    names = {hf_key(key): key for key in found if hf_key(key) is not None}  # ours -> theirs
    # The file bounds the work, not config.json: a config that claims far more layers than the file holds
    # tensors for is refused before anything is built or even listed (GPT-2 has 12 tensors a layer and 4 others);
    # a near miss is listed name by name below.
    if 12 * config.n_layer + 4 > 2 * len(names) + 100:
        raise ValueError(f"{path}/config.json describes {config.n_layer} layers, {12 * config.n_layer + 4} "
                         f"tensors, but {source} holds {len(names)}")
    expected = gpt2_shapes(config)
    problems = [f"missing {k}" for k in sorted(set(expected) - set(names) - {"lm_head.weight"})]
    problems += [f"unexpected {k}" for k in sorted(set(names) - set(expected))]
    for ours, theirs in names.items():
        if ours not in expected:
            continue
        dtype, shape = found[theirs]
        want = expected[ours][::-1] if ours.endswith(CONV1D) else expected[ours]
        if shape != want:
            problems.append(f"{ours}: checkpoint {shape} vs model {want}")
        if not dtype.is_floating_point:
            problems.append(f"{ours}: checkpoint holds {dtype} data, the model's weights are floating point")
    if problems:
        raise ValueError(f"{source} does not match the model:\n  " + "\n  ".join(problems[:20]))
    # Storage for the parameters, uninitialized (no random init: every one is read from the file), tied again
    # (to_empty gives the two names of the tied matrix two tensors).
    with torch.device("meta"):  # the parameter shapes, without allocating anything
        model = GPT(config)
    model = model.to_empty(device="cpu")
    model.lm_head.weight = model.transformer.wte.weight
    params = model.state_dict()
    with torch.no_grad():
        for ours, theirs in names.items():
            if ours == "lm_head.weight":
                continue  # tied to wte: checked below
            if ours.endswith(CONV1D) or found[theirs][0] != params[ours].dtype:
                value = fetch(theirs)
                params[ours].copy_(value.t() if ours.endswith(CONV1D) else value)
            else:  # straight from the file into the parameter: no copy
                fetch(theirs, out=params[ours])
            if not bool(params[ours].isfinite().all()):
                raise ValueError(f"{source}: tensor {theirs} holds values that are not finite (NaN or inf)")
        if "lm_head.weight" in names:  # a file may store the tied matrix twice: it must be the same one
            lm_head = fetch(names["lm_head.weight"]).to(params["lm_head.weight"].dtype)
            if not torch.equal(lm_head, params["transformer.wte.weight"]):
                raise ValueError(f"{source}: lm_head.weight differs from transformer.wte.weight, but GPT-2 ties "
                                 f"them (an untied output layer is not supported)")
    return model


# ----------------------------------------------------------------------------------------------------------------
# Writing: safetensors, GPT-2's config, the tokenizer, a whole directory

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
        **read_json(os.path.join(gpt2_dir, "config.json"), 1_000_000), "nanogrpo": {"task": task, "gpt2": True}}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    if gpt2_dir is None and tokenizer:
        write_tokenizer(enc, out_dir, model.config.block_size)
    elif tokenizer:
        for name in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "encoder.json",
                     "vocab.bpe"):
            if os.path.isfile(os.path.join(gpt2_dir, name)):
                shutil.copy(os.path.join(gpt2_dir, name), out_dir)
