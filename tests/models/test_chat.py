"""The tokenizer files slmforge writes, read as transformers 4 and TGI-style (MiniJinja) servers read them,
and the one BOS convention of slmforge.models.chat."""

import json

import pytest

from slmforge.models.chat import (
    BOS,
    IM_END,
    IM_START,
    chat_template,
    portable_tokenizer_config,
    strip_generation_marks,
    training_template,
)

TEXT = ("SELECT relname FROM pg_class WHERE relkind = 'r'; VACUUM reclaims storage occupied by dead tuples. "
        "An index lets the planner find rows without reading the whole table. ") * 40
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does VACUUM do?"},
        {"role": "assistant", "content": "It reclaims storage."}, {"role": "user", "content": "And ANALYZE?"}]


def check_transformers4_config(cfg: dict, context: int | None = None) -> None:
    """What transformers 4.x's PreTrainedTokenizerFast.from_pretrained needs of tokenizer_config.json (4.57:
    `extra_special_tokens` is a dict of named tokens, `.keys()` on anything else fails; special tokens are
    strings or AddedToken dicts; the class must be one 4.x has), plus what TGI reads (`chat_template`)."""
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert isinstance(cfg.get("extra_special_tokens", {}), dict), "4.x calls .keys() on extra_special_tokens"
    extra = cfg.get("additional_special_tokens", [])
    assert isinstance(extra, list) and all(isinstance(t, str) for t in extra)
    for k in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert cfg.get(k) is None or isinstance(cfg[k], (str, dict))
    assert not {"is_local", "local_files_only"} & set(cfg)
    assert isinstance(cfg.get("chat_template"), str) and "generation %}" not in cfg["chat_template"]
    if context is not None:
        assert type(cfg["model_max_length"]) is int and 0 < cfg["model_max_length"] <= context
    else:
        assert "model_max_length" not in cfg or cfg["model_max_length"] < 2**63


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tokenizer folder the tokenizer stage's way (a 300-token BPE of TEXT), rewritten as export writes it."""
    from slmforge.stages.tokenizer import save_hf, train_bpe

    out = tmp_path_factory.mktemp("tok")
    save_hf(train_bpe(iter([TEXT]), 300, 1), out)
    return out


def test_a_transformers5_config_becomes_one_that_4x_and_5x_read():
    v5 = {"backend": "tokenizers", "bos_token": BOS, "eos_token": "</s>", "pad_token": "<pad>", "is_local": True,
          "extra_special_tokens": [IM_START, IM_END], "model_max_length": 10**30, "tokenizer_class": "TokenizersBackend",
          "chat_template": chat_template()}
    out = portable_tokenizer_config(v5, chat_template(), 256)
    check_transformers4_config(out, 256)
    assert out["additional_special_tokens"] == [IM_START, IM_END] and "extra_special_tokens" not in out
    assert out["chat_template"] == strip_generation_marks(chat_template()) and out["model_max_length"] == 256
    named = portable_tokenizer_config({"extra_special_tokens": {"image_token": "<img>"}}, None, None)
    assert named["extra_special_tokens"] == {"image_token": "<img>"} and "chat_template" not in named
    assert "model_max_length" not in portable_tokenizer_config(v5, None, None)


def test_the_folder_loads_in_transformers_with_the_plain_template_in_the_config(folder):
    from transformers import AutoTokenizer

    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    check_transformers4_config(cfg)
    assert (folder / "chat_template.jinja").read_text() == cfg["chat_template"]
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert tok.chat_template == cfg["chat_template"]
    assert [tok.convert_tokens_to_ids(t) for t in (IM_START, IM_END)] == [3, 4]
    assert {IM_START, IM_END} <= set(tok.all_special_tokens + list(tok.extra_special_tokens))  # 5.x's reading


def test_minijinja_renders_the_template_and_one_bos_reaches_the_model(folder):
    """MiniJinja (TGI's engine) renders the exported template as transformers does; the rendered text
    tokenized without special tokens (the convention) has one BOS, the ids apply_chat_template gives and
    trl trains on; tokenized with them (the mistake the card warns of) two."""
    from minijinja import Environment
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    env = Environment()
    for template in (tok.chat_template, strip_generation_marks(chat_template("[label] ", "[rationale]"))):
        for messages, gen in ((CHAT, True), (CHAT[:3], False)):
            text = env.render_str(template, messages=messages, bos_token=tok.bos_token, eos_token=tok.eos_token,
                                  add_generation_prompt=gen)
            assert text == tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                   add_generation_prompt=gen)
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
            assert ids == list(tok.apply_chat_template(messages, chat_template=template, add_generation_prompt=gen,
                                                       tokenize=True, return_dict=True)["input_ids"])
            assert tok(text)["input_ids"][:2] == [tok.bos_token_id] * 2
    assert tok("plain text")["input_ids"].count(tok.bos_token_id) == 1  # a base model's prompt: BOS added
    with pytest.raises(Exception, match="generation"):  # why the exports carry the plain template
        env.render_str(chat_template(), messages=CHAT, bos_token=BOS, add_generation_prompt=True)


def test_sft_builds_the_marked_template_from_the_plain_one_and_masks_the_answers(folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert "generation %}" not in tok.chat_template
    marked = training_template(tok)
    assert "{% generation %}" in marked and strip_generation_marks(marked) == tok.chat_template
    out = tok.apply_chat_template(CHAT[:3], chat_template=marked, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    assert out["input_ids"] == list(tok.apply_chat_template(CHAT[:3], tokenize=True, return_dict=True)["input_ids"])
    assert tok.decode([i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]) == \
        "It reclaims storage.<|im_end|>"
