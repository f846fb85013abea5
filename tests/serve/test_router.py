import json
import math

import pytest

from slmforge.errors import UserError
from slmforge.serve.router import (
    BpbRouter,
    make_router,
    prompt_windows,
    read_texts,
    routing_accuracy,
    text_bits,
)


def _texts(path) -> list[str]:
    return [json.loads(x)["text"] for x in path.read_text().splitlines() if x.strip()]


def test_tfidf_router_separates_held_out_documents(small_corpus):
    pg, gen = _texts(small_corpus["domain"]), _texts(small_corpus["general"])
    router = make_router("tfidf", train={"pg": pg[:22], "general": gen[:120]})
    s = router.scores("SELECT relname FROM pg_class WHERE relkind = 'r'")
    assert set(s) == {"pg", "general"} and math.isclose(sum(s.values()), 1.0, rel_tol=1e-6)
    assert s["pg"] > 0.5
    r = routing_accuracy(router, {"pg": pg[22:], "general": gen[120:]})
    assert r["n"] == len(pg[22:]) + len(gen[120:])
    assert r["domains"]["pg"]["n"] == 8 and r["domains"]["pg"]["first_200"] >= 0.75
    assert r["accuracy_first_200"] >= 0.9 and r["accuracy"] >= 0.9
    with pytest.raises(UserError, match="no training text for domain"):
        make_router("tfidf", train={"pg": pg, "general": []})
    with pytest.raises(UserError, match="router.kind"):
        make_router("knn")


def test_bpb_router_is_the_posterior_of_each_models_bits(pretrained, small_corpus):
    from slmforge.models.modeling import load_model

    _, workdir, result = pretrained
    assert result.returncode == 0, result.stderr[-2000:]
    pre = next(m.parent for m in sorted((workdir / "pretrain").glob("*/manifest.json"))
               if (m.parent / "generalist").is_dir())
    models = {}
    for name, domain in (("specialist", "pg"), ("generalist", "general")):
        model, tok = load_model(pre / name)
        models[domain] = (model.eval(), tok, 64)
    router = BpbRouter(models)
    prompt = _texts(small_corpus["domain"])[25][:120]
    bits = {d: text_bits(m, t, prompt, ctx) for d, (m, t, ctx) in models.items()}
    s = router.scores(prompt)
    # p(pg) / p(general) = 2 ** (bits_general - bits_pg): Bayes with equal priors
    assert math.isclose(s["pg"] / s["general"], 2 ** (bits["general"] - bits["pg"]), rel_tol=1e-4)
    r = routing_accuracy(router, {"pg": [t[:150] for t in _texts(small_corpus["domain"])[22:]]})
    assert r["domains"]["pg"]["full"] >= 0.75  # the specialist spends fewer bits on its own domain


def test_read_texts_and_windows(tmp_path):
    f = tmp_path / "train.jsonl"
    f.write_text('{"text": "a b c"}\n\n{"text": ""}\n{"text": "d e f"}\n')
    assert read_texts(f) == ["a b c", "d e f"] and read_texts(f, limit=1) == ["a b c"]
    f.write_text('{"text": "ok"}\n{"txt": "wrong key"}\n')
    with pytest.raises(UserError, match=r"train.jsonl:2: expected a JSON object"):
        read_texts(f)
    with pytest.raises(UserError, match="router data file not found"):
        read_texts(tmp_path / "missing.jsonl")
    doc = "x" * 1000
    pieces = prompt_windows([doc, "short"], per_doc=4)
    assert len(pieces) == 5 and all(40 <= len(p) <= 400 for p in pieces[:4]) and pieces[4] == "short"
