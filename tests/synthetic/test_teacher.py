"""Teachers against a local OpenAI-compatible server that misbehaves on request, and a tiny HF model."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from slmforge.errors import UserError
from slmforge.synthetic.teacher import OpenAIConfig, OpenAITeacher, Request, parse_json_reply
from tests.fake_openai import FakeServer

SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}


@pytest.fixture
def server():
    s = FakeServer()
    yield s
    s.close()


def ask(name: str, faults=(), schema=SCHEMA, temperature=0.7) -> Request:
    return Request(key=name, messages=[{"role": "system", "content": "Answer in JSON."},
                                       {"role": "user", "content": f"{name}|{','.join(faults)}"}],
                   json_schema=schema, max_tokens=32, temperature=temperature)


def teacher(urls, cache, **kw) -> OpenAITeacher:
    kw = {"model": "m", "timeout_s": 1.0, "backoff_s": 0.01, "max_retries": 3, **kw}
    return OpenAITeacher(OpenAIConfig(base_urls=urls, **kw), cache)


def test_parse_json_reply():
    assert parse_json_reply('{"answer": "a"}', SCHEMA) == ({"answer": "a"}, None)
    assert parse_json_reply('Sure [1]: ```json\n{"answer": "a"}\n```', SCHEMA) == ({"answer": "a"}, None)
    assert parse_json_reply('Here [see]: {"answer": "a", "n": 2}.', SCHEMA) == ({"answer": "a", "n": 2}, None)
    assert parse_json_reply("[1, 2] then", None) == ([1, 2], None)
    sql = {"answer": "Run:\n```sql\nSELECT 1;\n```\nDone."}  # a fence inside the JSON is no wrapper
    assert parse_json_reply(json.dumps(sql), SCHEMA) == (sql, None)
    assert parse_json_reply('[1] and {"answer": "b"}', SCHEMA) == ({"answer": "b"}, None)  # first that fits
    assert parse_json_reply('{"answer": 3}', SCHEMA) == (None, "schema")
    assert parse_json_reply('{"other": "x", "inner": {"answer": "no"}}', SCHEMA) == (None, "schema")
    assert parse_json_reply('{"answer": "cut', SCHEMA) == (None, "bad_json")
    assert parse_json_reply("no json here", SCHEMA) == (None, "bad_json")
    assert parse_json_reply("  \n", SCHEMA) == (None, "empty")
    assert parse_json_reply('{"n": true}', {"properties": {"n": {"type": "integer"}}}) == (None, "schema")


def test_every_fault_is_retried_then_succeeds_in_order(server, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-the-environment")  # not named by the recipe: never sent
    faults = {"a": ["500"], "b": ["429"], "c": ["slow"], "d": ["badjson"], "e": ["trunc"], "f": ["empty"],
              "g": ["schema"], "h": ["prose"], "i": ["500", "500", "500"], "j": []}
    t = teacher([server.url], tmp_path)
    seen = []
    replies = t.generate([ask(n, f) for n, f in faults.items()], on_reply=lambda r: seen.append(r.key))
    assert [r.key for r in replies] == list(faults)
    assert [(r.error, r.data) for r in replies] == [(None, {"answer": n}) for n in faults]
    assert sorted(seen) == sorted(faults) and not any(r.cached for r in replies)
    assert {k: v for k, v in t.stats.items() if k.startswith(("retries_", "failed_"))} == {
        "retries_http_5xx": 4, "retries_http_429": 1, "retries_timeout": 1, "retries_bad_json": 1,
        "retries_truncated": 1, "retries_empty": 1, "retries_schema": 1}
    # 20 attempts ("h" and "j" once, "i" 4 times, the rest twice); the 14 that got a completion are
    # paid for: not the 5 errors, nor the slow one the client gave up on
    assert server.attempts["i"] == 4 and len(server.log) == 20
    assert {e["auth"] for e in server.log} == {None}
    assert replies[3].usage == {"prompt_tokens": 20, "completion_tokens": 10}  # bad JSON, then good
    assert replies[8].usage == {"prompt_tokens": 10, "completion_tokens": 5}
    assert t.stats["prompt_tokens"] == 140 and t.stats["requests"] == 10 and t.stats["http_requests"] == 20
    b = [e["t"] for e in server.log if e["name"] == "b"]
    assert b[1] - b[0] >= 0.95  # Retry-After: 1 was honoured (the backoff alone is 0.01 s)


def test_faults_that_persist_fail_with_their_reason_and_are_not_cached(server, tmp_path):
    reqs = [ask("500", ["500"] * 9), ask("429", ["429"] * 9), ask("400", ["400"], schema=None),
            ask("401", ["401"] * 9),  # with a schema, but 401 is not about response_format: no fallback
            ask("badjson", ["badjson"] * 9), ask("trunc", ["trunc"] * 9), ask("empty", ["empty"] * 9),
            ask("schema", ["schema"] * 9), ask("greedy", ["badjson"] * 9, temperature=0.0), ask("ok")]
    t = teacher([server.url], tmp_path, max_retries=1)
    replies = t.generate(reqs)
    assert [r.error for r in replies] == ["http_5xx", "http_429", "http_4xx", "http_4xx", "bad_json",
                                          "truncated", "empty", "schema", "bad_json", None]
    assert [server.attempts[r.key] for r in reqs] == [2, 2, 1, 1, 2, 2, 2, 2, 1, 1]  # 4xx, greedy: no retry
    assert not any(k.startswith("fallback_") for k in t.stats)
    assert {k: v for k, v in t.stats.items() if k.startswith("failed_")} == {
        "failed_http_5xx": 1, "failed_http_429": 1, "failed_http_4xx": 2, "failed_bad_json": 2,
        "failed_truncated": 1, "failed_empty": 1, "failed_schema": 1}
    before = len(server.log)
    again = t.generate(reqs)  # failures are asked again; the success comes from the cache
    assert [r.error for r in again] == ["http_5xx", "http_429", None, "http_4xx", "bad_json", "truncated",
                                        "empty", "schema", "bad_json", None]  # "400" had one fault only
    assert Counter(e["name"] for e in server.log[before:]) == {
        "500": 2, "429": 2, "400": 1, "401": 1, "badjson": 2, "trunc": 2, "empty": 2, "schema": 2,
        "greedy": 1}
    assert again[-1].cached and not any(r.cached for r in again[:-1])


def test_timeout_and_dead_server_fail_as_timeout_and_connection(server, tmp_path):
    dead = "http://127.0.0.1:9/v1"  # discard port: nothing listens there
    replies = teacher([dead], tmp_path, max_retries=1).generate([ask("x")])
    assert replies[0].error == "connection"
    replies = teacher([server.url], tmp_path, max_retries=1).generate([ask("slow", ["slow"] * 9)])
    assert replies[0].error == "timeout"


def test_cache_means_no_second_request_and_the_key_stays_out_of_it(server, tmp_path, monkeypatch):
    monkeypatch.setenv("SLMF_TEST_KEY", "sk-secret-4242")
    reqs = [ask(f"q{i}") for i in range(6)]
    t = teacher([server.url], tmp_path / "cache", api_key_env="SLMF_TEST_KEY",
                price_prompt_per_1m=1.0, price_completion_per_1m=2.0)
    first = t.generate(reqs)
    assert all(r.error is None for r in first) and len(server.log) == 6
    assert {e["auth"] for e in server.log} == {"Bearer sk-secret-4242"}
    assert t.cost_usd() == pytest.approx((6 * 10 * 1.0 + 6 * 5 * 2.0) / 1e6)

    again = teacher([server.url], tmp_path / "cache", api_key_env="SLMF_TEST_KEY")
    seen = []
    second = again.generate(reqs, on_reply=seen.append)
    assert len(server.log) == 6 and len(seen) == 6  # zero HTTP requests
    assert [(r.key, r.data, r.cached) for r in second] == [(r.key, r.data, True) for r in first]
    assert again.stats["cache_hits"] == 6 and again.cost_usd() == 0.0

    files = list((tmp_path / "cache").rglob("*"))
    cached = [f for f in files if f.is_file()]
    assert len(cached) == 6 and all(f.parent.name == f.stem[:2] and f.suffix == ".json" for f in cached)
    assert not any("sk-secret-4242" in f.read_text() for f in cached)
    assert not [f for f in files if ".tmp" in f.name]

    changed = [Request(r.key, r.messages, r.json_schema, r.max_tokens, 0.2) for r in reqs[:2]]
    again.generate(changed)  # another temperature is another request
    assert len(server.log) == 8


def test_missing_api_key_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.delenv("SLMF_NO_SUCH_KEY", raising=False)
    with pytest.raises(UserError, match="SLMF_NO_SUCH_KEY"):
        teacher(["http://127.0.0.1:9/v1"], tmp_path, api_key_env="SLMF_NO_SUCH_KEY")
    with pytest.raises(ValueError, match="http"):
        OpenAIConfig(base_urls=["localhost:8000"], model="m")


@pytest.mark.parametrize("reject,final", [({"json_schema"}, "json_object"),
                                          ({"json_schema", "json_object"}, None)])
def test_json_mode_falls_back_and_remembers(tmp_path, reject, final):
    s = FakeServer(reject=reject)
    try:
        t = teacher([s.url], tmp_path, concurrency=1)
        replies = t.generate([ask(f"q{i}", ["prose"]) for i in range(3)])
        assert [r.data for r in replies] == [{"answer": f"q{i}"} for i in range(3)]
        formats = [e["format"] for e in s.log]
        tried = ["json_schema", "json_object", None][:len(reject) + 1]
        assert formats == tried + [final, final]  # the first request steps down; the rest start there
        assert t.stats[f"fallback_{final or 'none'}"] == 1
    finally:
        s.close()


def test_concurrency_reaches_the_limit(tmp_path):
    s = FakeServer(delay=0.15)
    try:
        replies = teacher([s.url], tmp_path, concurrency=4).generate([ask(f"q{i}") for i in range(12)])
        assert all(r.error is None for r in replies)
        assert s.max_active == 4
    finally:
        s.close()


def test_requests_are_spread_over_servers_and_a_dead_one_is_avoided(tmp_path):
    a, b = FakeServer(delay=0.05), FakeServer(delay=0.05)
    try:
        dead = "http://127.0.0.1:9/v1"
        t = teacher([a.url, b.url, dead], tmp_path, concurrency=4)
        replies = t.generate([ask(f"q{i}") for i in range(16)])
        assert [r.error for r in replies] == [None] * 16
        assert len(a.log) >= 4 and len(b.log) >= 4 and len(a.log) + len(b.log) == 16
        assert t.stats["retries_connection"] <= 2  # the dead server is tried, then left alone
    finally:
        a.close()
        b.close()


def test_json_start_opens_the_first_field():
    from slmforge.synthetic.teacher import json_start

    assert json_start(SCHEMA) == '{"answer": "'
    assert json_start({"properties": {"questions": {"type": "array"}, "answers": {"type": "array"}}}) == '{"questions": ["'
    assert json_start({"properties": {"answer_index": {"type": "integer"}}}) == '{"answer_index": '
    assert json_start(None) == ""


def test_hf_teacher(tmp_path):
    import torch
    from transformers import AutoTokenizer

    from slmforge.models.modeling import ModelSize, build_model
    from slmforge.stages.tokenizer import save_hf, train_bpe
    from slmforge.synthetic.teacher import HFTeacher

    sentences = ["The server stores rows in tables.", "A query returns rows from a table.",
                 "An index makes a query faster.", "The planner chooses how to run a query."] * 20
    save_hf(train_bpe(iter(sentences), vocab_size=300, min_frequency=1), tmp_path / "m")
    model, _ = build_model(ModelSize(depth=1, aspect=32, head_dim=16, context=128),
                           AutoTokenizer.from_pretrained(tmp_path / "m"), seed=0)
    model.save_pretrained(tmp_path / "m")

    t = HFTeacher(tmp_path / "m", tmp_path / "cache", max_batch=2)
    # sampled, not greedy: a random model with tied embeddings greedily repeats the prompt's last "\n"
    reqs = [Request(k, [{"role": "user", "content": q}], json_schema=schema, max_tokens=8, temperature=1.0)
            for k, q, schema in [("a", "What is a table?", None), ("b", "What does an index do?", None),
                                 ("c", "Answer in JSON.", SCHEMA)]]
    replies = t.generate(reqs)
    assert [r.key for r in replies] == ["a", "b", "c"]
    assert all(isinstance(r.text, str) and r.text.strip() for r in replies)
    # the JSON reply's opening is written for the model ("prefilled"), which a random model does not close
    assert replies[2].text.startswith('{"answer": "') and not replies[0].text.startswith("{")
    assert replies[2].error == "truncated" and replies[2].data is None
    assert all(0 < r.usage["completion_tokens"] <= 8 and r.usage["prompt_tokens"] > 0 for r in replies)
    assert t.stats["failed_truncated"] == 3 and t.stats["requests"] == 3  # all three ran into max_tokens
    again = HFTeacher(tmp_path / "m", tmp_path / "cache").generate(reqs)  # successes come from the cache
    assert [r.cached for r in again] == [r.error is None for r in replies]
    assert [r.text for r in again if r.cached] == [r.text for r in replies if r.error is None]
    # sampling is seeded: the same seed and batch give the same replies, another seed others
    same = HFTeacher(tmp_path / "m", tmp_path / "cache-2", max_batch=2).generate(reqs)
    other = HFTeacher(tmp_path / "m", tmp_path / "cache-3", max_batch=2, seed=1).generate(reqs)
    assert [r.text for r in same] == [r.text for r in replies] != [r.text for r in other]
    torch.manual_seed(0)  # the global RNG does not matter
    half = HFTeacher(tmp_path / "m", tmp_path / "cache-4", max_batch=2, dtype="bfloat16")
    assert half.model.dtype == torch.bfloat16 and half.model_id != t.model_id
