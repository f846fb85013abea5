"""Every local input a recipe names is in its stage's cache key by content: editing it changes the key of
the stage that reads it and of every stage after (pipeline.stage_states computes the keys; nothing runs)."""

import json
import os

import pytest

from slmforge import artifacts
from slmforge.artifacts import fingerprint
from slmforge.config import load_recipe
from slmforge.pipeline import stage_states
from tests.conftest import small_recipe, write_recipe


def _tiny_model(folder):
    from transformers import AutoTokenizer

    from slmforge.models.modeling import ModelSize, build_model
    from slmforge.stages.tokenizer import save_hf, train_bpe

    save_hf(train_bpe(iter(["a table of rows", "an index on a table"] * 20), vocab_size=300, min_frequency=1),
            folder)
    build_model(ModelSize(depth=1, aspect=32, head_dim=16, context=64), AutoTokenizer.from_pretrained(folder),
                seed=0)[0].save_pretrained(folder)
    return folder


def _keys(recipe_path) -> dict[str, str]:
    return {p.stage: p.key for p in stage_states(load_recipe(recipe_path))}


def _edit_weights(folder):
    from safetensors.torch import load_file, save_file

    w = load_file(folder / "model.safetensors")
    k = sorted(w)[0]
    w[k] = w[k] + 1.0  # the same shapes and header: only the content changes
    save_file(w, folder / "model.safetensors", metadata={"format": "pt"})


def _edit_json(path):
    path.write_text(json.dumps({**json.loads(path.read_text()), "edited": True}))


def _append(path):
    with open(path, "a") as f:
        f.write(json.dumps({"question": "What is VACUUM?", "answer": "It reclaims storage."}) + "\n")


CASES = {  # input kind -> (recipe sections, the stage that reads it, how to edit it)
    "pretrain.init_from folder": (lambda m, f: {"pretrain": {"init_from": str(m), "tokens": "2k"}},
                                  "pretrain", lambda m, f: _edit_weights(m)),
    "compress.teacher folder": (lambda m, f: {"pretrain": {"tokens": "2k"},
                                              "compress": {"teacher": str(m), "tokens": "2k"}},
                                "compress", lambda m, f: _edit_json(m / "config.json")),
    "synth.hf_model folder": (lambda m, f: {"synth": {"teacher": "hf", "hf_model": str(m)}},
                              "synth", lambda m, f: _edit_json(m / "tokenizer_config.json")),
    "bench.hf_model folder": (lambda m, f: {"synth": {}, "bench": {"teacher": "hf", "hf_model": str(m)}},
                              "bench", lambda m, f: _edit_weights(m)),
    "synth.seeds": (lambda m, f: {"synth": {"seeds": str(f)}}, "synth", lambda m, f: _append(f)),
    "synth.templates": (lambda m, f: {"synth": {"templates": {"qa": str(f)}}}, "synth",
                        lambda m, f: f.write_text(f.read_text() + "\nAnswer briefly.")),
    "sft.general_data": (lambda m, f: {"pretrain": {"tokens": "2k"}, "synth": {}, "sft": {"general_data": str(f)}},
                         "sft", lambda m, f: _append(f)),
    "sft.base folder": (lambda m, f: {"pretrain": {"tokens": "2k"}, "synth": {}, "sft": {"base": str(m)}},
                        "sft", lambda m, f: _edit_weights(m)),
    "evaluate model path": (lambda m, f: {"synth": {}, "bench": {},
                                          "evaluate": {"models": [{"name": "mine", "path": str(m)}]}},
                            "evaluate", lambda m, f: _edit_weights(m)),
    "evaluate tokenizer folder": (lambda m, f: {"synth": {}, "bench": {}, "evaluate": {"models": [
        {"name": "ep", "base_url": "http://127.0.0.1:9/v1", "tokenizer": str(m)}]}},
        "evaluate", lambda m, f: _edit_json(m / "tokenizer_config.json")),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_editing_a_local_input_changes_the_key_of_the_stage_that_reads_it(kind, tmp_path, small_corpus):
    sections, stage, edit = CASES[kind]
    model = _tiny_model(tmp_path / "m")
    other = tmp_path / ("template.jinja" if "templates" in kind else "data.jsonl")
    if "templates" in kind:
        other.write_text("Write one question about {{ chunk }} as JSON.")
    else:
        _append(other)
    recipe = small_recipe(small_corpus, tmp_path / "w")
    recipe.update(sections(model, other))
    path = write_recipe(tmp_path, recipe)
    before = _keys(path)
    assert _keys(path) == before  # stable while nothing changes
    edit(model, other)
    after = _keys(path)
    names = list(before)
    for s in names[:names.index(stage)]:
        assert after[s] == before[s], (kind, s)  # what runs before it is untouched
    for s in names[names.index(stage):]:
        assert after[s] != before[s], (kind, s)  # it and every stage after it re-run


def test_large_weights_are_fingerprinted_by_size_mtime_and_header(tmp_path, monkeypatch):
    model = _tiny_model(tmp_path / "m")
    monkeypatch.setattr(artifacts, "WHOLE_FILE_MAX", 0)  # every file counts as large
    first = fingerprint(model)
    weights = model / "model.safetensors"
    assert first["model.safetensors"].startswith(f"{weights.stat().st_size}:")
    assert fingerprint(model) == first
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: re-run, not stale
    assert fingerprint(model) != first
    assert fingerprint(tmp_path / "nothing") == "missing" and fingerprint(None) is None
    (model / ".hidden").write_text("x")
    (model / "snapshots").mkdir()
    assert set(fingerprint(model)) == set(first)  # hidden files and subfolders are not what loads
