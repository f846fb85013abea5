import json

import pytest

from slmforge.artifacts import ArtifactStore
from slmforge.config import load_recipe
from slmforge.stages import curate, ingest, tokenizer
from tests.conftest import small_recipe, write_recipe


@pytest.fixture(scope="module")
def tok_art(tmp_path_factory, small_corpus):
    tmp = tmp_path_factory.mktemp("tok")
    cfg = load_recipe(write_recipe(tmp, small_recipe(small_corpus, tmp / "w"))).stages
    store = ArtifactStore(tmp / "w")
    ing = ingest.run(cfg["ingest"], store)
    cur = curate.run(cfg["curate"], store, {"ingest": ing})
    return tokenizer.run(cfg["tokenizer"], store, {"curate": cur})


def test_loads_offline_with_autotokenizer_and_round_trips(tok_art):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_art.path / "tokenizer"), local_files_only=True)
    assert json.loads((tok_art.path / "tokenizer" / "tokenizer_config.json").read_text())["tokenizer_class"] == \
        "PreTrainedTokenizerFast"
    assert len(tok) == 600
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    text = "SELECT relname FROM pg_class WHERE relkind = 'r';\n    -- 12345 rows\n"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert "12345" not in tok.convert_ids_to_tokens(ids)  # digits are split into groups of at most 3
    for special in ("<|im_start|>", "<|im_end|>"):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1


def test_chat_template_is_plain_chatml_and_sft_marks_assistant_tokens(tok_art):
    from transformers import AutoTokenizer

    from slmforge.models.chat import training_template

    folder = tok_art.path / "tokenizer"
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == tok.chat_template and "generation %}" not in tok.chat_template  # servers read it
    assert cfg["additional_special_tokens"] == ["<|im_start|>", "<|im_end|>"] and "extra_special_tokens" not in cfg
    chat = [{"role": "user", "content": "How do I list tables?"}, {"role": "assistant", "content": "Use \\dt."}]
    text = tok.apply_chat_template(chat, tokenize=False)
    assert text == "<s><|im_start|>user\nHow do I list tables?<|im_end|>\n<|im_start|>assistant\nUse \\dt.<|im_end|>\n"
    prompt = tok.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    tok.chat_template = training_template(tok)  # what sft trains with
    out = tok.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    masked = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.decode(masked) == "Use \\dt.<|im_end|>"
    assert out["input_ids"].count(tok.bos_token_id) == 1


def test_domain_tokenizer_compresses_domain_text_better(tok_art):
    m = tok_art.manifest["metrics"]
    ev = m["eval"]
    assert ev["tokenizer"]["domain"]["bytes_per_token"] > ev["general_tokenizer"]["domain"]["bytes_per_token"]
    assert ev["tokenizer"]["domain"]["fertility"] < ev["general_tokenizer"]["domain"]["fertility"]
    assert ev["general_tokenizer"]["general"]["fertility"] < ev["tokenizer"]["general"]["fertility"]
    assert m["domain_token_saving"] > 0.1
    assert m["trained_on"] == ["pg"]
    assert (tok_art.path / "general_tokenizer" / "tokenizer.json").is_file()
