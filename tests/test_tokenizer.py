import json
import random
import re

import pytest

from data.tokenizer import PATTERN, SPECIAL_TOKENS, encoding_from_merges, from_readable, gpt2_encoding, \
    load_merges, save_merges, to_readable, train_bpe
from tests.helpers import write_gpt2_vocab


def slow_bpe_encode(text, ranks, pattern=PATTERN):
    """Pure-Python byte-level BPE: within each regex piece, merge the leftmost adjacent pair whose bytes have
    the lowest rank until no pair is a token."""
    ids = []
    for piece in re.findall(pattern, text):
        parts = [bytes([b]) for b in piece.encode("utf-8")]
        while len(parts) > 1:
            candidates = [(ranks[parts[i] + parts[i + 1]], i) for i in range(len(parts) - 1)
                          if parts[i] + parts[i + 1] in ranks]
            if not candidates:
                break
            _, i = min(candidates)
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        ids.extend(ranks[p] for p in parts)
    return ids


def random_unicode(rng, n):
    pools = [range(32, 127), range(0x80, 0x800), range(0x4E00, 0x4F00), range(0x1F600, 0x1F650), [9, 10, 13, 32]]
    chars = []
    for _ in range(n):
        c = rng.choice(rng.choice(pools))
        chars.append(chr(c))
    return "".join(chars)


@pytest.fixture(scope="module")
def trained():
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 6))) for _ in range(400)]
    texts = [" ".join(rng.sample(words, 8)) + f" {rng.randint(0, 999)}+{rng.randint(0, 999)} GYX"
             for _ in range(500)]
    texts += [random_unicode(rng, 40) for _ in range(50)]
    merges = train_bpe(texts, 700)
    return merges, encoding_from_merges(merges)


def test_trainer_reaches_the_requested_vocabulary_and_is_deterministic(trained):
    merges, enc = trained
    assert len(merges) == 700 - 256
    assert enc.n_vocab == 700 + len(SPECIAL_TOKENS)
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 6))) for _ in range(400)]
    texts = [" ".join(rng.sample(words, 8)) + f" {rng.randint(0, 999)}+{rng.randint(0, 999)} GYX"
             for _ in range(500)]
    texts += [random_unicode(rng, 40) for _ in range(50)]
    assert train_bpe(texts, 700) == merges


def test_tiktoken_ids_equal_the_slow_pure_python_bpe(trained):
    merges, enc = trained
    ranks = enc._mergeable_ranks
    rng = random.Random(1)
    for _ in range(300):
        text = random_unicode(rng, rng.randint(0, 60)) if rng.random() < 0.5 else \
            " ".join("".join(rng.choice("abcdefghij ") for _ in range(rng.randint(1, 8))) for _ in range(5))
        assert enc.encode(text) == slow_bpe_encode(text, ranks), text


def test_round_trip_on_arbitrary_unicode(trained):
    _, enc = trained
    rng = random.Random(2)
    for _ in range(300):
        text = random_unicode(rng, rng.randint(0, 80))
        assert enc.decode(enc.encode(text)) == text
    assert enc.decode(enc.encode("")) == ""


def test_merges_file_round_trips_and_is_readable_text(trained, tmp_path):
    merges, enc = trained
    path = str(tmp_path / "merges.txt")
    save_merges(path, merges)
    assert load_merges(path) == merges
    first = open(path, encoding="utf-8").read().splitlines()[1]
    assert first == f"{to_readable(merges[0][0])} {to_readable(merges[0][1])}"
    assert all(from_readable(to_readable(bytes([b]))) == bytes([b]) for b in range(256))


def test_malformed_merges_file_is_rejected_with_its_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("#version: 0.2\na b\nonlyone\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 2"):
        load_merges(str(path))


def test_special_tokens_come_after_the_last_rank_and_never_from_text(trained):
    merges, enc = trained
    n_ranks = 256 + len(merges)
    for i, tok in enumerate(SPECIAL_TOKENS):
        assert enc.encode_single_token(tok) == n_ranks + i
        assert n_ranks + i not in enc.encode(tok, disallowed_special=())  # plain text stays plain text


def test_merge_of_unknown_tokens_is_rejected():
    with pytest.raises(ValueError, match="no earlier rank"):
        encoding_from_merges([(b"ab", b"c")])


def test_gpt2_encoding_from_a_checkpoint_directory(trained, tmp_path):
    merges, _ = trained
    vocab = write_gpt2_vocab(tmp_path, merges)
    enc = gpt2_encoding(str(tmp_path))
    assert enc.n_vocab == len(vocab)
    assert enc.encode("<|endoftext|>", allowed_special="all") == [vocab["<|endoftext|>"]]
    ranks = {from_readable(k): v for k, v in vocab.items() if k != "<|endoftext|>"}
    text = "héllo abc defg 123 ab"
    from data.tokenizer import GPT2_PATTERN
    import regex  # GPT-2's pattern uses \p{L}; only this test needs the third-party regex module
    assert enc.encode(text) == [i for piece in regex.findall(GPT2_PATTERN, text)
                                for i in slow_bpe_encode(piece, ranks, pattern=r"(?s).+")]


def test_gpt2_encoding_says_what_is_missing(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        gpt2_encoding(str(tmp_path))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not in tiktoken's cache"):
        gpt2_encoding()


def test_gpt2_encoding_from_tiktokens_cache_without_network(trained, tmp_path, monkeypatch):
    """A miniature cache in tiktoken's data-gym format (vocab.bpe + encoder.json, named by URL sha1), whose byte
    order tiktoken checks against encoder.json: the encoding is built from it, with no download."""
    import hashlib
    from data.tokenizer import GPT2_FILES, BYTE_TO_CHAR
    merges, _ = trained
    byte_order = [b for b in range(2 ** 8) if chr(b).isprintable() and chr(b) != " "]
    byte_order += [b for b in range(2 ** 8) if b not in byte_order]  # data gym's rank order of the 256 bytes
    encoder = {BYTE_TO_CHAR[b]: i for i, b in enumerate(byte_order)}
    for left, right in merges:
        encoder.setdefault(to_readable(left + right), len(encoder))
    encoder["<|endoftext|>"] = len(encoder)
    names = {name: hashlib.sha1(url.encode()).hexdigest() for name, url in GPT2_FILES.items()}
    (tmp_path / names["encoder.json"]).write_text(json.dumps(encoder), encoding="utf-8")
    save_merges(str(tmp_path / names["vocab.bpe"]), merges)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    enc = gpt2_encoding()
    assert enc.n_vocab == len(encoder)
    text = "abc defg 123 hij"
    assert enc.decode(enc.encode(text)) == text
    assert enc.encode("<|endoftext|>", allowed_special="all") == [len(encoder) - 1]
