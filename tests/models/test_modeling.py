import pytest

from slmforge.errors import UserError
from slmforge.models.modeling import ModelSize, derive, load_model, parse_count


def test_size_dial_derives_a_documented_shape():
    s = derive(ModelSize(params="5M"), 8192)
    assert s["depth"] == 4 and s["hidden_size"] == 256 and s["num_attention_heads"] == 4
    assert s["intermediate_size"] % 64 == 0 and s["context"] == 256
    assert 4e6 < s["params"] < 6.5e6
    big = derive(ModelSize(params="1B"), 32000)
    assert big["num_attention_heads"] % big["num_key_value_heads"] == 0 and big["num_key_value_heads"] < big["num_attention_heads"]
    assert 0.8e9 < big["params"] < 1.25e9 and big["context"] == 2048
    assert derive(ModelSize(depth=2, aspect=16, head_dim=16), 600)["hidden_size"] == 32
    assert parse_count("1.5B") == 1.5e9 and parse_count(20000) == 20000


def test_size_dial_rejects_two_dials_and_bad_counts():
    with pytest.raises(ValueError, match="Choose one"):
        ModelSize(params="5M", depth=4)
    with pytest.raises(ValueError, match="not a count"):
        ModelSize(params="five")


def test_load_model_refuses_folders_without_safetensors(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(UserError, match="only safetensors"):
        load_model(tmp_path)
