import json
import os

import pytest

from slmforge.artifacts import ArtifactStore
from slmforge.config import load_recipe
from slmforge.stages import curate, ingest, synth
from slmforge.synthetic.extractive import Chunk
from slmforge.synthetic.synthesis import Filters, FilterState, NearDup, apply_filters, ngrams
from tests.conftest import small_recipe, write_recipe


@pytest.fixture(scope="module")
def made(tmp_path_factory, small_corpus):
    tmp = tmp_path_factory.mktemp("syn")
    recipe = small_recipe(small_corpus, tmp / "w")
    recipe["synth"] = {"max_chunks": 40, "shard_chunks": 10}
    cfg = load_recipe(write_recipe(tmp, recipe)).stages
    store = ArtifactStore(tmp / "w")
    cur = curate.run(cfg["curate"], store, {"ingest": ingest.run(cfg["ingest"], store)})
    return synth.run(cfg["synth"], store, {"curate": cur}), cfg, store, cur


def _jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_every_kind_is_made_grounded_and_recorded(made):
    art, *_ = made
    m = art.manifest["metrics"]
    assert set(m["kept"]) == set(synth.default_kinds("extractive")) and all(v > 0 for v in m["kept"].values())
    items = _jsonl(art.path / "items.jsonl")
    for it in items:
        assert it["chunk_id"] and it["teacher"] == "extractive" and it["template"]
        assert set(it["verdicts"]) == {"schema", "length", "exact_dup", "near_dup", "grounded", "decontam"}
        assert all(v == "ok" for v in it["verdicts"].values())
    mcq = [it for it in items if it["kind"] == "mcq"]
    assert all(len(set(it["options"])) == 4 and it["options"][it["answer_index"]] == it["answer"] for it in mcq)
    assert m["quality"]["mcq"]["longest_option"] < 0.5  # distractors are length-matched
    assert "Spot-check sample" in (art.path / "report.md").read_text()


def test_only_train_documents_are_used(made):
    art, cfg, store, cur = made
    from slmforge.records import read_documents

    heldout = {d["id"] for s in ("val", "test") for d in read_documents(cur.path / "data" / s)}
    assert heldout
    assert not {it["chunk_id"].rsplit("#", 1)[0] for it in _jsonl(art.path / "items.jsonl")} & heldout


def test_outputs_are_in_trl_formats(made):
    art, *_ = made
    sft = _jsonl(art.path / "sft.jsonl")
    assert sft and all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in sft)
    dpo = _jsonl(art.path / "dpo.jsonl")
    assert dpo and all(r["prompt"][0]["role"] == "user" and r["chosen"][0]["role"] == "assistant"
                       and r["chosen"][0]["content"] != r["rejected"][0]["content"] for r in dpo)
    rat = _jsonl(art.path / "rationale.jsonl")
    assert rat and all(r["kind"] == "evidence" and r["rationale"].count('"') >= 4 for r in rat)  # quotes


def test_filters_reject_what_they_should():
    chunk = Chunk("d#0", "d", "s", "Pumps", "The pump must be primed before start. Seals wear out when it runs dry.")
    state = FilterState(Filters.of(synth.Config()),
                        ngrams("one two three four five six seven eight nine ten eleven twelve thirteen words", 13))

    def item(q, a):
        return {"kind": "qa", "question": q, "answer": a, "messages": []}

    assert all(v == "ok" for v in apply_filters(item("When to prime?", "The pump must be primed before start."),
                                                 chunk, state).values())
    v = apply_filters(item("When to prime?", "The pump must be primed before start."), chunk, state)
    assert v["exact_dup"] == "duplicate"
    v = apply_filters(item("When should one prime it?", "Valves rotate clockwise under heavy loads."), chunk, state)
    assert v["grounded"].endswith("in the chunk")
    v = apply_filters(item("Count?", "one two three four five six seven eight nine ten eleven twelve thirteen"),
                      chunk, state)
    assert "shared with val/test" in v["decontam"]
    v = apply_filters({"kind": "mcq", "question": "x", "options": ["a", "a", "b", "c"], "answer_index": 0},
                      chunk, state)
    assert v == {"schema": "options must be 4 distinct strings and answer_index in 0..3"}
    reason = {"kind": "rationale", "question": "Why prime it?", "answer": "The pump must be primed before start.",
              "messages": []}
    v = apply_filters({**reason, "rationale": "Seals wear out when the pump runs dry, so it must be primed."}, chunk, state)
    assert v["grounded"] == "ok"  # reasoning in the chunk's own terms
    v = apply_filters({**reason, "question": "Why prime?", "rationale": "Gravity accelerates falling apples quickly."},
                      chunk, state)
    assert v["grounded"] == "0% of the rationale's words are in the chunk"
    v = apply_filters({"kind": "reading", "question": "Read", "answer": "x y", "pairs": [["Q?", ""]], "messages": []},
                      chunk, state)
    assert v == {"schema": "questions and answers must be non-empty strings, as many of each"}
    nd = NearDup(0.7)
    assert not nd.seen("how do I create an index on a large table without locking writes")
    assert nd.seen("how do I create an index on a large table without locking writes?")
    assert not nd.seen("what does vacuum do to dead tuples in a heap")


def test_the_minhash_signature_is_the_exact_universal_hash_and_estimates_jaccard():
    nd = NearDup(0.7)
    sh = ngrams("how do I create an index on a large table without locking writes to it", 3)
    p = 2**31 - 1
    exact = [min((int(a) * (h % p) + int(b)) % p for h in sh) for a, b in zip(nd.a, nd.b)]  # Python ints: no wrap
    assert nd.signature(sh).tolist() == exact
    # the share of equal signature slots estimates Jaccard (64 hashes: standard error about 0.06)
    words = [f"w{i}" for i in range(200)]
    x, y = ngrams(" ".join(words[:150]), 3), ngrams(" ".join(words[50:]), 3)
    jaccard = len(x & y) / len(x | y)
    estimate = float((nd.signature(x) == nd.signature(y)).mean())
    assert abs(estimate - jaccard) < 0.15, (estimate, jaccard)


def test_the_near_duplicate_filter_decides_the_same_in_every_process():
    """Its n-gram hashes must not depend on PYTHONHASHSEED (Python's str hash is salted per process)."""
    import subprocess
    import sys

    code = ("from slmforge.synthetic.synthesis import NearDup, ngrams\n"
            "texts = [f'How do I {v} the {o} in PostgreSQL {i}?' for i in range(30) for v in ('drop', 'create')"
            " for o in ('table', 'index')]\n"
            "nd = NearDup(0.5)\n"
            "print(sorted(ngrams('VACUUM reclaims storage occupied by dead tuples', 3))[:3],"
            " [nd.seen(t) for t in texts])")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**__import__("os").environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(outs) == 1, outs


def test_a_killed_run_resumes_from_finished_shards(made):
    art, cfg, store, cur = made
    before = (art.path / "items.jsonl").read_text()
    partial = store.partial_dir("synth", art.key)
    os.rename(art.path, partial)  # as if killed before the rename: shards 0-2 done, shard 3 not
    (partial / "manifest.json").unlink()
    (partial / "shards" / "shard-00003.jsonl").unlink()
    stamp = (partial / "shards" / "shard-00000.jsonl").stat().st_mtime_ns
    again = synth.run(cfg["synth"], store, {"curate": cur})
    assert again.manifest["resumed"] is True
    assert (again.path / "shards" / "shard-00000.jsonl").stat().st_mtime_ns == stamp  # not redone
    assert (again.path / "items.jsonl").read_text() == before


def test_model_teacher_needs_its_settings(tmp_path, small_corpus):
    from slmforge.errors import UserError

    recipe = small_recipe(small_corpus, tmp_path / "w")
    recipe["synth"] = {"teacher": "openai"}
    with pytest.raises(UserError, match="needs an `openai:` section"):
        load_recipe(write_recipe(tmp_path, recipe))


def test_default_kinds_follow_the_teacher_and_rationale_needs_a_model():
    assert "evidence" in synth.Config().kinds and "rationale" not in synth.Config().kinds
    hf = synth.Config(teacher="hf", hf_model="smollm2-135m")
    assert "rationale" in hf.kinds and "evidence" not in hf.kinds
    with pytest.raises(ValueError, match="kinds: rationale .* extractive teacher has no model"):
        synth.Config(kinds=["qa", "rationale"])


def test_openai_teacher_end_to_end_with_cache(made, tmp_path):
    _, cfg, store, cur = made
    from tests.fake_openai import GroundedServer

    server = GroundedServer()
    try:
        scfg = synth.Config.model_validate({**cfg["synth"].model_dump(),
            "teacher": "openai", "kinds": ["qa", "summary", "rationale", "preference"], "max_chunks": 6,
            "openai": {"base_urls": [server.url], "model": "fake", "concurrency": 4,
                       "price_prompt_per_1m": 1.0, "price_completion_per_1m": 2.0}})
        art = synth.run(scfg, store, {"curate": cur})
        m = art.manifest["metrics"]
        assert m["teacher"] == "openai" and sum(m["kept"].values()) >= 12
        items = _jsonl(art.path / "items.jsonl")
        assert {it["template"] for it in items} <= {f"builtin:{k}" for k in ("qa", "summary", "rationale", "preference")}
        assert m["cost_usd"] > 0 and m["teacher_stats"]["requests"] > 0
        assert m["teacher_tokens"]["completion_tokens"] > 0 and set(m["acceptance"]) == set(m["generated"])
        assert all(0 <= a <= 1 for a in m["acceptance"].values())
        assert sum(sum(d.values()) for d in m["dropped_by_kind"].values()) == sum(m["dropped_by_filter"].values())
        report = (art.path / "report.md").read_text()
        assert "| kind | generated | kept | acceptance | dropped by filter |" in report and "teacher tokens" in report
        sent = len(server.fake.log)
        again = synth.run(scfg, store, {"curate": cur}, force=True)  # every reply comes from the cache
        assert len(server.fake.log) == sent and again.manifest["metrics"]["kept"] == m["kept"]
    finally:
        server.fake.close()


def test_fitness_check_names_the_failing_filter(made):
    from slmforge.errors import UserError
    from tests.fake_openai import FakeServer

    _, cfg, store, cur = made
    server = FakeServer()  # answers {"answer": <the prompt>}: no question field, so the schema fails
    try:
        scfg = synth.Config.model_validate({**cfg["synth"].model_dump(),
            "teacher": "openai", "kinds": ["qa"], "max_chunks": 4,
            "openai": {"base_urls": [server.url], "model": "fake-broken", "max_retries": 1, "backoff_s": 0.01}})
        with pytest.raises(UserError, match="fitness check.*Most common failure: teacher: schema"):
            synth.run(scfg, store, {"curate": cur})
    finally:
        server.close()


def test_hf_teacher_is_a_base_name_or_a_folder_relative_to_the_recipe(tmp_path, small_corpus, monkeypatch):
    from transformers import AutoTokenizer

    from slmforge.models import bases
    from slmforge.models.modeling import ModelSize, build_model
    from slmforge.stages import bench
    from slmforge.stages.tokenizer import save_hf, train_bpe

    monkeypatch.setenv("SLMFORGE_BASES", str(tmp_path / "bases"))
    save_hf(train_bpe(iter(["a table of rows", "an index on a table"] * 20), vocab_size=300, min_frequency=1),
            tmp_path / "m")
    build_model(ModelSize(depth=1, aspect=32, head_dim=16, context=64), AutoTokenizer.from_pretrained(tmp_path / "m"),
                seed=0)[0].save_pretrained(tmp_path / "m")
    bases.add("tiny-teacher", tmp_path / "m")
    recipe = small_recipe(small_corpus, tmp_path / "w")
    recipe["synth"] = {"teacher": "hf", "hf_model": "tiny-teacher"}
    recipe["bench"] = {"teacher": "hf", "hf_model": "m"}  # a folder next to the recipe
    stages = load_recipe(write_recipe(tmp_path, recipe)).stages
    assert stages["synth"].hf_model == "tiny-teacher" and stages["bench"].hf_model == str(tmp_path / "m")
    assert synth.external(stages["synth"]) == {"hf_model": bases.fingerprint("tiny-teacher")}
    from slmforge.artifacts import fingerprint

    before = bench.external(stages["bench"])
    assert before == {"hf_model": fingerprint(tmp_path / "m")} and "model.safetensors" in before["hf_model"]
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 1e-5}))
    assert bench.external(stages["bench"]) != before  # an edited teacher folder re-runs bench
    assert bases.locate(stages["synth"].hf_model) == bases.get("tiny-teacher").path


def test_openai_settings_are_checked_with_the_recipe(tmp_path, small_corpus):
    from slmforge.errors import UserError

    recipe = small_recipe(small_corpus, tmp_path / "w")
    recipe["synth"] = {"teacher": "openai", "openai": {"base_urls": ["http://127.0.0.1:9/v1"], "modle": "x"}}
    with pytest.raises(UserError, match=r"(?s)synth\.openai\.model: required key is missing.*synth\.openai\.modle: unknown key"):
        load_recipe(write_recipe(tmp_path, recipe))


def test_topics_are_covered_evenly_and_seeds_and_templates_reach_the_prompt(tmp_path):
    from slmforge.synthetic.synthesis import load_seeds, render_prompt, select_chunks

    chunks = [Chunk(f"d{i}#0", f"d{i}", "s", t, f"All about {t}. " * 5)
              for i, t in enumerate(["vacuum"] * 8 + ["index"] * 3 + ["backup"] * 2)]
    picked = select_chunks(chunks, 6, ["vacuum", "index", "backup"], seed=0)
    assert sorted(c.title for c in picked) == ["backup", "backup", "index", "index", "vacuum", "vacuum"]
    assert select_chunks(chunks, None, None, seed=0) != chunks and len(select_chunks(chunks, None, None, 0)) == 13

    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"instruction": "How do I reclaim space?", "response": "Run VACUUM FULL."}\n')
    got = load_seeds(str(seeds))
    assert got == [{"question": "How do I reclaim space?", "answer": "Run VACUUM FULL."}]
    prompt, name = render_prompt("qa", chunks[0], got, synth.Config().templates)
    assert name == "builtin:qa" and "How do I reclaim space?" in prompt and "All about vacuum." in prompt
    custom = tmp_path / "qa.j2"
    custom.write_text("Q about {{ title }}: {{ chunk }} ({{ seeds | length }} seeds)")
    prompt, name = render_prompt("qa", chunks[0], got, synth.Config(templates={"qa": str(custom)}).templates)
    assert name == str(custom) and prompt.startswith("Q about vacuum: All about vacuum.") and "(1 seeds)" in prompt
    seeds.write_text('{"q": "no"}\n')
    with pytest.raises(Exception, match="needs question/answer or instruction/response"):
        load_seeds(str(seeds))
