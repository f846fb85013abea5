"""vocab: choosing domain tokens for a base tokenizer and growing a model's vocabulary with them.

A tiny "base" (a byte-level BPE trained on literature and a random 2-layer Llama) and a "domain" BPE
trained on a few PostgreSQL manual pages; everything is built in seconds, nothing is downloaded.
"""

from __future__ import annotations

import json

import pytest
import torch

from slmforge.models.modeling import ModelSize, build_model
from slmforge.models.vocab import bytes_per_token, choose_tokens, expand
from slmforge.stages.tokenizer import save_hf, train_bpe
from tests.conftest import DATA, slice_jsonl

PLAIN = "The old man walked to the village and said that he was tired of the long road."
SIZE = ModelSize(depth=2, aspect=16, head_dim=16, context=128)


def _texts(path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    """(base tokenizer, domain tokenizer, domain train texts, domain val texts), as transformers loads them."""
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("vocab")
    general = _texts(slice_jsonl(DATA / "general" / "literature_pd.jsonl.gz", d / "gen.jsonl", 8))
    domain = _texts(slice_jsonl(DATA / "postgresql_docs.jsonl.gz", d / "pg.jsonl", 24, skip=100))
    sql = [f"SET autovacuum_vacuum_scale_factor = 0.{i}; VACUUM ANALYZE pg_stat_user_tables;" for i in range(40)]
    train, val = domain[:18] + sql[:30], domain[18:] + sql[30:]
    save_hf(train_bpe(iter(general), 600), d / "base")
    save_hf(train_bpe(iter(train), 600), d / "domain")
    return (AutoTokenizer.from_pretrained(str(d / "base")), AutoTokenizer.from_pretrained(str(d / "domain")),
            train, val)


@pytest.fixture()
def expanded(toks):
    base, domain, train, val = toks
    model, _ = build_model(SIZE, base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    chosen = choose_tokens(base, domain, train, 40)
    model, tok, report = expand(model, base, chosen, val)
    return before, chosen, model, tok, report


def test_chosen_tokens_are_multi_piece_domain_tokens_ranked_by_savings(toks):
    base, domain, train, _ = toks
    chosen = choose_tokens(base, domain, train, 40)
    assert len(chosen) == 40
    assert chosen == choose_tokens(base, domain, train, 40)  # deterministic
    assert [(-c.savings, c.token) for c in chosen] == sorted((-c.savings, c.token) for c in chosen)
    base_vocab = base.get_vocab()
    for c in chosen:
        assert len(c.pieces) >= 2 and c.count > 0 and c.savings == (len(c.pieces) - 1) * c.count
        assert c.token not in base_vocab and c.token in domain.get_vocab()
        assert base(c.text, add_special_tokens=False).input_ids == list(c.pieces)
        assert "".join(base.convert_ids_to_tokens(list(c.pieces))) == c.token
    assert not {c.text for c in chosen} & set(domain.all_special_tokens)
    # the leading-space marker: words are chosen with their space, as the domain BPE emits them
    assert any(c.token.startswith("Ġ") and c.text.startswith(" ") for c in chosen)


def test_n_zero_is_a_no_op_and_a_large_n_returns_every_candidate(toks):
    base, domain, train, val = toks
    assert choose_tokens(base, domain, train, 0) == []
    everything = choose_tokens(base, domain, train, 10**6)
    assert 40 < len(everything) < len(domain)
    assert everything[:40] == choose_tokens(base, domain, train, 40)
    model, _ = build_model(SIZE, base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model, tok, report = expand(model, base, [], val)
    assert tok is base and report["added"] == 0
    assert report["bytes_per_token"]["base"] == report["bytes_per_token"]["expanded"]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_new_rows_are_the_mean_of_their_pieces_and_old_rows_are_unchanged(toks, expanded):
    base, *_ = toks
    before, chosen, model, tok, report = expanded
    old_emb = before["model.embed_tokens.weight"]
    emb = model.get_input_embeddings().weight
    n_old = old_emb.shape[0]
    assert emb.shape[0] == len(tok) == n_old + report["added"]
    assert torch.equal(emb[:n_old], old_emb)
    assert all(tok.convert_tokens_to_ids(c.token) >= n_old for c in chosen)
    new = {t: i for t, i in tok.get_vocab().items() if i >= n_old}
    assert len(new) == report["added"] == len(chosen) + report["intermediates"]
    for t, i in new.items():  # the chosen tokens and the intermediates their merges need
        pieces = base(tok.convert_tokens_to_string([t]), add_special_tokens=False).input_ids
        assert len(pieces) >= 2 and "".join(base.convert_ids_to_tokens(pieces)) == t
        assert torch.equal(emb[i], old_emb[pieces].mean(0)), t
    for k, v in model.state_dict().items():  # every other weight untouched
        if k not in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(v, before[k]), k


def test_tied_embeddings_stay_tied(expanded):
    _, _, model, _, report = expanded
    assert report["tied"] is True
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_untied_output_rows_are_the_mean_of_their_pieces_too(toks):
    base, domain, train, _ = toks
    model, _ = build_model(SIZE, base)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    old_out = model.lm_head.weight.detach().clone()
    chosen = choose_tokens(base, domain, train, 10)
    model, tok, report = expand(model, base, chosen)
    out = model.get_output_embeddings().weight
    assert report["tied"] is False and out.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert torch.equal(out[: old_out.shape[0]], old_out)
    for c in chosen:
        assert torch.equal(out[tok.convert_tokens_to_ids(c.token)], old_out[list(c.pieces)].mean(0))


def test_domain_text_needs_fewer_tokens_and_decodes_unchanged(toks, expanded):
    base, _, _, val = toks
    _, chosen, _, tok, report = expanded
    n_base = sum(len(base(t, add_special_tokens=False).input_ids) for t in val)
    n_new = sum(len(tok(t, add_special_tokens=False).input_ids) for t in val)
    assert n_new < n_base
    bpt = report["bytes_per_token"]
    assert bpt["expanded"] > bpt["base"] == bytes_per_token(base, val)
    assert report["chosen_emitted_whole"] >= 0.9 * len(chosen)
    for t in val + [PLAIN]:
        assert tok.decode(tok(t, add_special_tokens=False).input_ids) == t
    assert tok("SET x;").input_ids[0] == base.bos_token_id  # BOS and the specials are kept
    assert tok.convert_tokens_to_ids(list(base.all_special_tokens)) == base.convert_tokens_to_ids(
        list(base.all_special_tokens))


def test_logits_on_old_tokens_are_unchanged(toks, expanded):
    base, *_ = toks
    before, _, model, _, _ = expanded
    ids = torch.tensor([base(PLAIN).input_ids])
    old, _ = build_model(SIZE, base)
    old.load_state_dict(before)
    old.eval(), model.eval()
    with torch.no_grad():
        want = old(ids).logits
        got = model(ids).logits
    assert torch.equal(got[..., : want.shape[-1]], want)


def test_save_and_load_round_trip(toks, expanded, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    val = toks[3]
    _, _, model, tok, _ = expanded
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model2 = AutoModelForCausalLM.from_pretrained(tmp_path)
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok2) == len(tok) and tok2.get_vocab() == tok.get_vocab()
    assert model2.get_output_embeddings().weight.data_ptr() == model2.get_input_embeddings().weight.data_ptr()
    for t in val[:3] + [PLAIN]:
        ids = tok(t).input_ids
        assert tok2(t).input_ids == ids
        x = torch.tensor([ids[:128]])
        model.eval(), model2.eval()
        with torch.no_grad():
            assert torch.equal(model(x).logits, model2(x).logits)


def test_a_domain_term_becomes_one_token(toks, expanded):
    base, *_ = toks
    _, chosen, _, tok, _ = expanded
    assert "Ġautovacuum" in {c.token for c in chosen}
    line = "SET autovacuum_vacuum_scale_factor = 0.5;"
    assert "Ġautovacuum" in tok.tokenize(line) and "Ġautovacuum" not in base.tokenize(line)


def test_tokens_chosen_for_another_base_are_refused(toks):
    from slmforge.errors import UserError

    base, domain, *_ = toks
    chosen = choose_tokens(domain, base, [PLAIN] * 3, 5)  # pieces are domain-tokenizer ids
    model, _ = build_model(SIZE, base)
    with pytest.raises(UserError, match="another base tokenizer"):
        expand(model, base, chosen)


def test_an_expanded_model_exports_to_gguf_and_loads_back_like_any_other(expanded, toks, tmp_path):
    """The appended merges are plain BPE: the GGUF writer takes them, and transformers reads the GGUF
    back into the same tokenizer and the same logits (f32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slmforge.deploy.gguf import write_gguf

    _, _, _, val = toks
    _, _, model, tok, _ = expanded
    folder = tmp_path / "expanded"
    model.save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    write_gguf(folder, tmp_path / "x.gguf", "f32", "expanded")
    tok2 = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="x.gguf")
    model2 = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="x.gguf")
    text = val[-1]
    ids = tok(text, return_tensors="pt").input_ids
    assert tok2(text, return_tensors="pt").input_ids.tolist() == ids.tolist()
    assert any(i >= len(toks[0]) for i in ids[0].tolist())  # the text uses new tokens
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, model2(ids).logits, atol=1e-4)
