"""Pretrained bases (bases.py): a GGUF or an HF folder becomes a safetensors base with its provenance."""

from __future__ import annotations

import json

import pytest
import torch

from slmforge.cli import main
from slmforge.errors import UserError
from slmforge.models import bases

TEXT = ("VACUUM reclaims storage occupied by dead tuples. ANALYZE collects statistics about the contents of "
        "tables. The planner uses these statistics to choose query plans. ") * 40


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A 2-layer random Llama with a small byte-level BPE, saved as a safetensors HF folder."""
    from slmforge.models.modeling import ModelSize, build_model
    from slmforge.stages.tokenizer import save_hf, train_bpe

    d = tmp_path_factory.mktemp("tiny")
    save_hf(train_bpe(iter([TEXT]), 400, 1), d)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(d))
    model, _ = build_model(ModelSize(depth=2, aspect=16, head_dim=16, context=128), tok, seed=3)
    model.save_pretrained(str(d), safe_serialization=True)
    (d / "README.md").write_text("A tiny model, trained on 1.5B tokens of nothing.\n")
    return d


def _logits(folder, text="VACUUM collects statistics"):
    from slmforge.models.modeling import load_model

    model, tok = load_model(folder)
    with torch.no_grad():
        return model(**tok(text, return_tensors="pt")).logits


def test_a_gguf_becomes_a_base_with_the_same_logits(tiny_hf, tmp_path):
    from slmforge.deploy.gguf import write_gguf

    gguf = tmp_path / "tiny.gguf"
    write_gguf(tiny_hf, gguf, "f32", "tiny")
    cache = tmp_path / "cache"
    b = bases.add("tiny", gguf, tokens=2e9, license="mit", cache=cache)
    assert b.path == cache / "tiny" and (b.path / "model.safetensors").is_file()
    assert b.params == sum(p.numel() for p in bases_model(tiny_hf).parameters()) and b.context == 128
    assert b.pretrain_flops == 6 * b.params * 2e9 and b.license == "mit" and len(b.sha256) == 64
    assert torch.allclose(_logits(tiny_hf), _logits(b.path), atol=1e-4)
    assert bases.get("tiny", cache) == b and [x.name for x in bases.list_bases(cache)] == ["tiny"]
    assert json.loads((b.path / "base.json").read_text())["source"] == str(gguf.resolve())


def bases_model(folder):
    from slmforge.models.modeling import load_model

    return load_model(folder)[0]


def test_an_hf_folder_becomes_a_base_and_its_card_gives_the_tokens(tiny_hf, tmp_path):
    b = bases.add("tiny-hf", tiny_hf, cache=tmp_path)
    assert b.pretrain_tokens == 1.5e9 and torch.equal(_logits(tiny_hf), _logits(b.path))
    with pytest.raises(UserError, match="exists.*--force"):
        bases.add("tiny-hf", tiny_hf, cache=tmp_path)
    assert bases.add("tiny-hf", tiny_hf, cache=tmp_path, force=True, tokens=7.0).pretrain_tokens == 7.0


def test_bad_bases_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        bases.add("x", tmp_path / "nope.gguf", cache=tmp_path)
    bins = tmp_path / "bins"
    bins.mkdir()
    (bins / "config.json").write_text("{}")
    (bins / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(UserError, match=r"no .safetensors weights \(only .bin\).*Convert once"):
        bases.add("x", bins, cache=tmp_path)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    with pytest.raises(UserError, match="not a readable GGUF"):
        bases.add("x", junk, cache=tmp_path)
    with pytest.raises(UserError, match="lowercase"):
        bases.add("Bad Name", bins, cache=tmp_path)
    with pytest.raises(UserError, match="known: .*smollm2-135m.*slmforge base add nope PATH"):
        bases.get("nope", tmp_path)


def test_base_cli_lists_builtins_and_exits_2_on_bad_input(tmp_path, capsys):
    assert main(["base", "--cache", str(tmp_path), "list"]) == 0
    assert "smollm2-135m" in capsys.readouterr().out
    assert main(["base", "--cache", str(tmp_path), "add", "x"]) == 2
    assert "give PATH" in capsys.readouterr().err


def test_a_quantized_gguf_base_says_it_is_a_dequantized_copy(tiny_hf, tmp_path):
    """base.json's `quantized` is the GGUF's own weight type: what the report says of the base."""
    from slmforge.deploy.gguf import write_gguf

    for kind, want in (("f32", None), ("q8_0", "Q8_0")):
        path = tmp_path / f"tiny-{kind}.gguf"
        write_gguf(tiny_hf, path, kind, "tiny")
        assert bases.gguf_weight_type(path) == want
    b = bases.add("tiny-q8", tmp_path / "tiny-q8_0.gguf", cache=tmp_path / "cache")
    assert b.quantized == "Q8_0" and b.weights == "a dequantized Q8_0 copy"
    assert json.loads((b.path / "base.json").read_text())["quantized"] == "Q8_0"
    assert bases.add("tiny-hf", tiny_hf, cache=tmp_path / "cache").quantized is None
    assert bases.gguf_weight_type(bases.builtin_file("smollm2-135m")) == "Q4_1"  # the built-in SmolLM2
