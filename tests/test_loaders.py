"""Files in: the safetensors reader and the GPT-2 loader refuse every malformed or mismatched file with an error
that names the file, the tensor and both values, in bounded time and memory, before the model is built."""

import json
import resource
import struct

import pytest
import torch

from hf import load_gpt2
from tests.reference import read_safetensors
from tests.helpers import tiny_gpt, write_safetensors
from tests.helpers import hf_state_dict, write_hf_checkpoint


def raw_safetensors(path, header, data=b"", header_len=None):
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head) if header_len is None else header_len) + head + data)
    return path


F32_4 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}


@pytest.mark.parametrize("header,data,header_len,message", [
    ({"w": F32_4}, b"\0" * 16, 2 ** 63, "header length 9223372036854775808 runs past the end"),
    ({"w": F32_4}, b"\0" * 16, 10 ** 6, "header length 1000000 runs past the end"),
    ({"w": {**F32_4, "data_offsets": [-8, 8]}}, b"\0" * 16, None,
     r"tensor 'w': data_offsets \[-8, 8\] are not within"),
    ({"w": {**F32_4, "data_offsets": [8, 4]}}, b"\0" * 16, None,
     r"data_offsets \[8, 4\] are not within .* begin <= end"),
    ({"w": {**F32_4, "data_offsets": [0, 32]}}, b"\0" * 16, None, r"data_offsets \[0, 32\] are not within the 16"),
    ({"w": {**F32_4, "data_offsets": [0.0, 16.0]}}, b"\0" * 16, None, "is not a pair of integers"),
    ({"w": {**F32_4, "data_offsets": [0, 12]}}, b"\0" * 16, None, "needs 16 bytes, data_offsets hold 12"),
    ({"a": F32_4, "b": {**F32_4, "data_offsets": [8, 24]}}, b"\0" * 24, None, "'b' starts at byte 8.*an overlap"),
    ({"a": F32_4, "b": {**F32_4, "data_offsets": [20, 36]}}, b"\0" * 36, None, "'b' starts at byte 20.*a gap"),
    ({"w": F32_4}, b"\0" * 20, None, "the tensors cover 16 of the 20 data bytes"),
    ({"w": {"shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16, None, "expected the fields dtype, shape"),
    ({"w": {**F32_4, "dtype": "F8"}}, b"\0" * 16, None, "dtype 'F8' is not one of"),
    ({"w": {**F32_4, "shape": [-4]}}, b"\0" * 16, None, r"shape \[-4\] is not a list of non-negative"),
])
def test_malformed_safetensors_headers_are_refused_naming_the_tensor(tmp_path, header, data, header_len, message):
    path = raw_safetensors(tmp_path / "x.safetensors", header, data, header_len)
    with pytest.raises(ValueError, match=message):
        read_safetensors(path)


@pytest.mark.parametrize("raw,message", [(b"not json at all", "the header is not JSON"),
                                         (b"[1, 2, 3]", "the header is a JSON list, not an object"),
                                         (b"\xff\xfe", "the header is not JSON")])
def test_a_header_that_is_not_a_json_object_is_refused(tmp_path, raw, message):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(ValueError, match=message):
        read_safetensors(path)


def test_a_file_too_short_for_a_header_is_refused(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"abc")
    with pytest.raises(ValueError, match="3 bytes, too short"):
        read_safetensors(tmp_path / "x.safetensors")


def gpt2_dir(tmp_path, model=None, **config_overrides):
    model = model or tiny_gpt(dtype=torch.float32)
    write_hf_checkpoint(model, tmp_path)
    if config_overrides:
        cfg = json.loads((tmp_path / "config.json").read_text())
        (tmp_path / "config.json").write_text(json.dumps({**cfg, **config_overrides}))
    return model


@pytest.mark.parametrize("field,value", [("tie_word_embeddings", False), ("layer_norm_epsilon", 1e-6),
                                         ("scale_attn_weights", False), ("scale_attn_by_inverse_layer_idx", True),
                                         ("n_inner", 100), ("activation_function", "relu")])
def test_config_fields_that_change_the_math_are_refused_not_ignored(tmp_path, field, value):
    gpt2_dir(tmp_path, **{field: value})
    with pytest.raises(ValueError, match=f"{field} is {value!r}; this GPT computes GPT-2's"):
        load_gpt2(str(tmp_path))


def test_gpt2s_own_values_of_those_fields_load(tmp_path):
    model = gpt2_dir(tmp_path, tie_word_embeddings=True, layer_norm_epsilon=1e-5, n_inner=None)
    loaded = load_gpt2(str(tmp_path))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_integer_weights_are_refused_not_cast(tmp_path):
    model = gpt2_dir(tmp_path)
    state = hf_state_dict(model)
    state["transformer.wpe.weight"] = torch.zeros(64, 32, dtype=torch.int32)
    write_safetensors(tmp_path / "model.safetensors", state)
    with pytest.raises(ValueError, match="transformer.wpe.weight: checkpoint holds torch.int32 data"):
        load_gpt2(str(tmp_path))


def test_an_lm_head_that_differs_from_the_tied_embedding_is_refused(tmp_path):
    model = gpt2_dir(tmp_path)
    state = hf_state_dict(model)
    state["lm_head.weight"] = torch.randn_like(state["transformer.wte.weight"])
    write_safetensors(tmp_path / "model.safetensors", state)
    with pytest.raises(ValueError, match="lm_head.weight differs from transformer.wte.weight"):
        load_gpt2(str(tmp_path))
    state["lm_head.weight"] = state["transformer.wte.weight"].clone()  # the same matrix stored twice: fine
    write_safetensors(tmp_path / "model.safetensors", state)
    load_gpt2(str(tmp_path))


def test_a_tiny_directory_claiming_a_huge_model_is_refused_before_any_allocation(tmp_path):
    # 193 bytes once allocated 2.9 GB: the header is now checked against the config's shapes first.
    config = dict(model_type="gpt2", n_positions=100_000, vocab_size=500_000, n_layer=48, n_head=25, n_embd=1600)
    (tmp_path / "config.json").write_text(json.dumps(config))
    write_safetensors(tmp_path / "model.safetensors", {"transformer.wte.weight": torch.zeros(2, 2)})
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError, match="describes 48 layers, 580 tensors, but .*model.safetensors holds 1"):
        load_gpt2(str(tmp_path))
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 200, grown_mb  # the model it describes would be tens of GB
