"""
Byte-level BPE tokenizers as `tiktoken.Encoding`s, built offline.

tiktoken ships no trainer and downloads GPT-2's vocabulary at run time, which fails without a network. So we
train byte-level BPE merges on a task's own text (`train_bpe`), write them as a readable text file in GPT-2's
merges.txt format (`save_merges`), and build a tiktoken Encoding from them (`encoding_from_merges`): tiktoken
then does the fast encoding. Special tokens come after the last merge; none of them can be produced from text.

GPT-2's own encoding (for a loaded GPT-2) is built from the vocab.json + merges.txt of its checkpoint directory,
or from tiktoken's cache when it is there: `gpt2_encoding`.

Encoding rule (tiktoken's, and the one the slow reference in tests/ implements): split text with PATTERN, turn
each piece into bytes, then repeatedly merge the adjacent pair whose concatenation has the lowest rank.
"""

import collections
import hashlib
import heapq
import json
import os
import re

import tiktoken
import tiktoken.load

# Like GPT-2's pre-tokenizer, with ASCII classes spelled out so Python's `re` (the trainer) and tiktoken's
# regex engine split every string identically. Digits stand alone, so numbers tokenize digit by digit, and
# tags such as <guess> and </think> stay whole, so BPE can make each of them one token.
PATTERN = (r"""</?[a-z]+>|'(?:s|t|re|ve|m|ll|d)| ?[A-Za-z]+| ?[0-9]| ?[^ \t\r\nA-Za-z0-9]+"""
           r"""|[ \t\r\n]+(?![^ \t\r\n])|[ \t\r\n]+""")
SPECIAL_TOKENS = ("<|begin|>", "<|end|>", "<|pad|>")


def bytes_to_unicode():
    """GPT-2's map from the 256 bytes to printable characters, so merges files stay readable text."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def to_readable(token: bytes) -> str:
    return "".join(BYTE_TO_CHAR[b] for b in token)


def from_readable(text: str) -> bytes:
    return bytes(CHAR_TO_BYTE[c] for c in text)


def train_bpe(texts, vocab_size):
    """Learn byte-level BPE merges until there are `vocab_size` tokens (256 bytes + merges; specials come on
    top). Returns a list of (left, right) byte pairs in rank order. Ties go to the smaller pair of bytes, so the
    result is deterministic."""
    if vocab_size < 256:
        raise ValueError(f"vocab_size must be at least 256 (the bytes), got {vocab_size}")
    piece_counts = collections.Counter(piece for text in texts for piece in re.findall(PATTERN, text))
    words = [[bytes([b]) for b in piece.encode("utf-8")] for piece in piece_counts]
    counts = list(piece_counts.values())
    pair_counts = collections.Counter()
    where = collections.defaultdict(set)  # pair -> indices of words that (may) contain it
    for i, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += counts[i]
            where[pair].add(i)
    # A heap of (-count, pair) with stale entries skipped on pop: the most frequent pair without a full scan.
    heap = [(-c, pair) for pair, c in pair_counts.items()]
    heapq.heapify(heap)
    merges, vocab = [], {bytes([b]) for b in range(256)}
    while len(vocab) < vocab_size and heap:
        neg, best = heapq.heappop(heap)
        if pair_counts.get(best, 0) != -neg or neg == 0:
            continue
        merged = best[0] + best[1]
        if merged not in vocab:  # two splits can make the same bytes; a token gets one rank
            merges.append(best)
            vocab.add(merged)
        changed = set()
        for i in where.pop(best):
            word, new, j = words[i], [], 0
            while j < len(word):
                if j + 1 < len(word) and (word[j], word[j + 1]) == best:
                    new.append(merged)
                    j += 2
                else:
                    new.append(word[j])
                    j += 1
            if len(new) == len(word):
                continue
            for pair in zip(word, word[1:]):  # the word's old pairs out, its new pairs in
                pair_counts[pair] -= counts[i]
                changed.add(pair)
            for pair in zip(new, new[1:]):
                pair_counts[pair] += counts[i]
                where[pair].add(i)
                changed.add(pair)
            words[i] = new
        for pair in changed:
            if pair_counts[pair] > 0:
                heapq.heappush(heap, (-pair_counts[pair], pair))
            else:
                del pair_counts[pair]
    return merges


def save_merges(path, merges):
    """GPT-2's merges.txt format: a version line, then one merge per line in rank order."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("#version: 0.2 (byte-level BPE; bytes shown with GPT-2's printable byte map)\n")
        for left, right in merges:
            f.write(f"{to_readable(left)} {to_readable(right)}\n")
    os.replace(tmp, path)


def load_merges(path):
    with open(path, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f if not line.startswith("#version")]
    merges = []
    for n, line in enumerate(lines, 1):
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts) or any(c not in CHAR_TO_BYTE for c in parts[0] + parts[1]):
            raise ValueError(f"{path}: merge line {n} is not two tokens in the byte alphabet: {line!r}")
        merges.append((from_readable(parts[0]), from_readable(parts[1])))
    return merges


def encoding_from_merges(merges, name="task", special_tokens=SPECIAL_TOKENS):
    """A tiktoken Encoding: ranks 0..255 are the bytes, then one rank per merge, then the special tokens."""
    ranks = {bytes([b]): b for b in range(256)}
    for left, right in merges:
        if left not in ranks or right not in ranks:
            raise ValueError(f"merge {left!r} + {right!r} uses a token that no earlier rank makes")
        ranks.setdefault(left + right, len(ranks))
    specials = {tok: len(ranks) + i for i, tok in enumerate(special_tokens)}
    return tiktoken.Encoding(name=name, pat_str=PATTERN, mergeable_ranks=ranks, special_tokens=specials,
                             explicit_n_vocab=len(ranks) + len(specials))


def end_and_pad(enc):
    """The ids of <|end|> (stops a completion) and <|pad|> in a run's tokenizer."""
    return enc.encode_single_token("<|end|>"), enc.encode_single_token("<|pad|>")


def load_encoding(path, name=None):
    return encoding_from_merges(load_merges(path), name or os.path.splitext(os.path.basename(path))[0])


# ----------------------------------------------------------------------------------------------------------------
# GPT-2's encoding, offline

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_FILES = {  # where tiktoken fetches GPT-2's files from; its cache names each file by the sha1 of its URL
    "vocab.bpe": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "encoder.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
}


def gpt2_encoding(path=None, task_specials=False):
    """GPT-2's tokenizer from a directory holding vocab.json (or encoder.json) + merges.txt (or vocab.bpe),
    as a Hugging Face GPT-2 checkpoint does; without a path, from tiktoken's download cache if present.

    task_specials=True also maps our tasks' <|begin|>, <|end|> and <|pad|> to GPT-2's one special token,
    <|endoftext|>, which GPT-2 saw between documents and so is its natural start, stop and padding (padding is
    masked anyway): a loaded GPT-2 can then read any task. Decoding it gives back "<|endoftext|>"."""
    ranks, eot = gpt2_ranks(path)
    specials = {"<|endoftext|>": eot, **({s: eot for s in SPECIAL_TOKENS} if task_specials else {})}
    return tiktoken.Encoding("gpt2-tasks" if task_specials else "gpt2", pat_str=GPT2_PATTERN,
                             mergeable_ranks=ranks, special_tokens=specials,
                             # with task_specials four names share one id, so the count check cannot apply
                             explicit_n_vocab=None if task_specials else len(ranks) + 1)


def read_vocab(path, limit=100_000_000):
    """vocab.json: {token in GPT-2's readable byte alphabet: id}, ids distinct integers from 0, or a ValueError
    that names the file and the first entry that is not so."""
    if os.path.getsize(path) > limit:
        raise ValueError(f"{path}: {os.path.getsize(path):,} bytes, too large for a vocabulary")
    try:
        with open(path, encoding="utf-8") as f:
            vocab = json.load(f)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        reason = "nested too deeply" if isinstance(e, RecursionError) else e
        raise ValueError(f"{path}: not a readable JSON file ({reason})") from None
    if not isinstance(vocab, dict):
        raise ValueError(f"{path}: a JSON {type(vocab).__name__}, where an object of token: id is expected")
    for token, i in vocab.items():
        if type(i) is not int or i < 0:
            raise ValueError(f"{path}: token {token[:40]!r} has id {str(i)[:40]!r}, not a non-negative integer")
        if token not in SPECIAL_TOKENS + ("<|endoftext|>",) and any(c not in CHAR_TO_BYTE for c in token):
            raise ValueError(f"{path}: token {token[:40]!r} is not in GPT-2's byte alphabet")
    if len(set(vocab.values())) != len(vocab):
        raise ValueError(f"{path}: two tokens share an id")
    return vocab


def gpt2_ranks(path=None):
    """(GPT-2's BPE ranks {bytes: id}, the id of <|endoftext|>) from `path`, else tiktoken's cache; never
    downloaded."""
    if path is not None:
        for vocab_name in ("vocab.json", "encoder.json"):
            vocab_file = os.path.join(path, vocab_name)
            if os.path.isfile(vocab_file):
                vocab = read_vocab(vocab_file)
                # GPT-2's ids double as BPE ranks: a merged token always has a larger id than its parts.
                ranks = {from_readable(tok): i for tok, i in vocab.items() if tok != "<|endoftext|>"}
                return ranks, vocab.get("<|endoftext|>", len(ranks))
        raise FileNotFoundError(f"{path}: no vocab.json or encoder.json, so GPT-2's tokenizer cannot be built "
                                f"offline; copy them from the checkpoint's source next to config.json")
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or \
        os.path.join(os.environ.get("TMPDIR", "/tmp"), "data-gym-cache")
    files = {name: os.path.join(cache, hashlib.sha1(url.encode()).hexdigest()) for name, url in GPT2_FILES.items()}
    missing = [name for name, file in files.items() if not os.path.isfile(file)]
    if missing:
        raise FileNotFoundError(f"GPT-2's tokenizer is not in tiktoken's cache {cache} (missing {missing}) and "
                                f"there is no network: pass the checkpoint directory holding vocab.json")
    # Read the cached files by path: tiktoken.get_encoding would try to download whatever it cannot find.
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=files["vocab.bpe"],
                                                          encoder_json_file=files["encoder.json"])
    return ranks, len(ranks)
