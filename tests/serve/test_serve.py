"""slmforge serve through the official openai client, on loopback: one server per module (two tiny models,
API keys, one generation slot and no queue), a second one forwarding low-confidence auto requests to the first
as its fallback endpoint, and the chat page in headless Chromium."""

import json
import os
import shutil
import threading
import time

import httpx
import openai
import pytest

from slmforge.cli import build_parser, main, serve_config, serve_section
from slmforge.errors import UserError
from slmforge.serve.app import create_app
from slmforge.serve.config import Config, build_config
from slmforge.serve.decode import _held_back
from tests.serve_helpers import KEY, Live, export_like, raw_post, texts_of

KEY_ENV = "SLMFORGE_TEST_SERVE_KEYS"
PG_PROMPT = "How do I create an index on a table with CREATE INDEX, and when does VACUUM run?"


@pytest.fixture(scope="module")
def exports(pretrained, small_corpus, tmp_path_factory):
    _, workdir, result = pretrained
    assert result.returncode == 0, result.stderr[-2000:]
    pre = next(m.parent for m in sorted((workdir / "pretrain").glob("*/manifest.json"))
               if (m.parent / "generalist").is_dir())
    pg, gen = texts_of(small_corpus["domain"]), texts_of(small_corpus["general"])
    root = tmp_path_factory.mktemp("serve-exports")
    return {"spec": export_like(pre / "specialist", root / "spec", "spec", "pg", pg[:22], pg[22:]),
            # the generalist as the export stage writes it: a chat template, but not post-trained to chat
            "gen": export_like(pre / "generalist", root / "gen", "gen", "general", gen[:120], gen[120:], chat=False),
            "pg_test": pg[22:], "gen_test": gen[120:]}


@pytest.fixture(scope="module")
def live(exports):
    os.environ[KEY_ENV] = f"{KEY},other-key"
    try:
        cfg = Config(models=[str(exports["spec"]), str(exports["gen"])], api_keys_env=KEY_ENV, max_concurrency=1,
                     max_queue=0, max_tokens=8)
        server = Live(create_app(cfg, log=lambda msg: None))
    finally:
        del os.environ[KEY_ENV]
    yield server
    server.stop()


def test_models_listed_and_keys_required(live):
    ids = [m.id for m in live.client().models.list().data]
    assert ids == ["auto", "spec", "gen"]
    for key in (None, "wrong"):
        with pytest.raises(openai.AuthenticationError) as e:
            live.client(key).models.list()
        assert e.value.code == "invalid_api_key"
    page = httpx.get(live.url + "/")
    assert page.status_code == 200 and 'id="key"' in page.text  # public; keys are on, so it has the key field
    ext = {m.id: m.model_extra["slmforge"] for m in live.client().models.list().data}
    assert ext["spec"]["chat"] is True and ext["gen"]["chat"] is False  # slmforge.json's, as the catalog records
    assert ext["gen"]["chat_template"] is True


def test_completion_usage_and_seeds(live, exports):
    from transformers import AutoTokenizer

    c = live.client()
    r = c.completions.create(model="spec", prompt="The catalog pg_class stores", max_tokens=6, temperature=0)
    tok = AutoTokenizer.from_pretrained(str(exports["spec"]))
    assert r.model == "spec" and r.object == "text_completion"
    assert r.usage.prompt_tokens == len(tok("The catalog pg_class stores").input_ids)
    assert 1 <= r.usage.completion_tokens <= 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason in ("stop", "length")
    again = c.completions.create(model="spec", prompt="The catalog pg_class stores", max_tokens=6, temperature=0)
    assert again.choices[0].text == r.choices[0].text  # greedy is deterministic
    sampled = [c.completions.create(model="gen", prompt="A", max_tokens=12, temperature=1.0, seed=s)
               .choices[0].text for s in (1, 1, 2, 3, 4)]
    assert sampled[0] == sampled[1]  # same seed, same sample
    assert len(set(sampled[1:])) > 1  # different seeds sample differently


def test_stop_sequences_cut_the_text(live):
    c = live.client()
    full = c.completions.create(model="gen", prompt="The", max_tokens=20, temperature=0).choices[0].text
    stripped = full.strip()
    assert len(stripped) >= 4, full
    stop = stripped[len(stripped) // 2: len(stripped) // 2 + 2]
    r = c.completions.create(model="gen", prompt="The", max_tokens=20, temperature=0, stop=[stop, "zzzz"])
    assert r.choices[0].text == full[: full.find(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_chat_streaming_matches_non_streaming(live):
    c = live.client()
    msgs = [{"role": "user", "content": "What is a table?"}]
    whole = c.chat.completions.create(model="spec", messages=msgs, max_tokens=8, temperature=0)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    chunks = list(c.chat.completions.create(model="spec", messages=msgs, max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == whole.choices[0].finish_reason
    assert all(ch.model == "spec" for ch in chunks)
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="spec", prompt="SELECT", max_tokens=6, temperature=0, stream=True))
    assert streamed == c.completions.create(model="spec", prompt="SELECT", max_tokens=6, temperature=0).choices[0].text


def test_invalid_requests_get_openai_errors(live):
    c = live.client()
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="spec", messages=msgs, temperature=3)
    assert e.value.body["param"] == "temperature" and e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="spec", messages=msgs, n=2)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="spec", messages=msgs, max_tokens=10_000)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="spec", prompt="SELECT * FROM pg_class; " * 40, max_tokens=4)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="spec", messages=msgs, stop=["a", "b", "c", "d", "e"])
    assert e.value.body["param"] == "stop"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="spec", messages=msgs, extra_body={"best_guess": True})
    assert e.value.body["param"] == "best_guess"
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="nope", messages=msgs)
    assert e.value.code == "model_not_found"
    r = httpx.post(live.url + "/v1/completions", content=b"{not json", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert c.completions.create(model="spec", prompt="ok", max_tokens=2).usage.completion_tokens >= 1  # still up


def test_hostile_bodies_get_4xx_and_never_reach_the_model(live):
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    raw = b'{"model": "spec", "messages": [{"role": "user", "content": "hi \\ud800 there"}]}'
    r = httpx.post(live.url + "/v1/chat/completions", content=raw, headers=h)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.content", r.text
    big = b'{"model": "spec", "prompt": "' + b"a" * (2 * 2**20) + b'"}'
    r = httpx.post(live.url + "/v1/completions", content=big, headers=h)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunked():  # no Content-Length: the cap is counted while the body streams in
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]

    r = httpx.post(live.url + "/v1/completions", content=chunked(), headers=h)
    assert r.status_code == 413 and "max_body_kb" in r.json()["error"]["message"]
    deep = b'{"model": "spec", "prompt": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    r = httpx.post(live.url + "/v1/completions", content=deep, headers=h)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(live.url + "/health").json()["status"] == "ok"


def test_request_fuzzer_gets_openai_errors_and_health_stays_fast(live):
    """Malformed and hostile bodies, slow and aborted clients: every reply is a 200 or a 4xx with an OpenAI
    error body, and /health answers throughout (each poll timed from another thread)."""
    url, key = live.url, {"Authorization": f"Bearer {KEY}"}
    times: list[float] = []
    stop = threading.Event()

    def poll():
        with httpx.Client() as h:
            while not stop.is_set():
                t0 = time.perf_counter()
                assert h.get(url + "/health").status_code == 200
                times.append(time.perf_counter() - t0)
                time.sleep(0.02)

    bodies = [b"", b"{", b"[]", b"null", b'"text"', b"\xff\xfe{}", b'{"model": 5, "messages": "hi"}',
              b'{"model": "spec", "messages": [{"role": "user", "content": 7}]}',
              b'{"model": "spec", "messages": [{"role": "robot", "content": "hi"}]}',
              b'{"model": "spec", "messages": [], "max_tokens": "many"}',
              b'{"model": "spec", "messages": [{"role": "user", "content": "x"}], "temperature": [1]}',
              b'{"model": "spec", "prompt": {"nested": {"deeper": [1, 2, {"x": null}]}}}',
              b'{"model": "spec", "messages": [{"role": "user", "content": "\\udfff"}]}',
              b'{"model": "spec", "prompt": "' + b"long " * 150_000 + b'"}',
              b'{"model": "spec", "prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
              b'{"model": "spec", "prompt": "ok", "max_tokens": 2}']
    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        with httpx.Client(timeout=60) as h:
            for route in ("/v1/chat/completions", "/v1/completions"):
                for body in bodies:
                    r = h.post(url + route, content=body, headers={**key, "Content-Type": "application/json"})
                    assert r.status_code == 200 or 400 <= r.status_code < 500, (route, body[:80], r.status_code)
                    if r.status_code != 200:
                        err = r.json()["error"]
                        assert err["message"] and err["type"], (body[:80], err)
        body = b'{"model": "spec", "prompt": "ok", "max_tokens": 2}'
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: "
                f"application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        slow = raw_post(url, head, [body[i:i + 8] for i in range(0, len(body), 8)], pause=0.1)
        assert slow.startswith(b"HTTP/1.1 ") and slow.split()[1] in (b"200", b"429"), slow[:200]
        big_head = head.replace(f"Content-Length: {len(body)}".encode(), b"Content-Length: 100000")
        import logging

        logged: list[logging.LogRecord] = []
        catch = logging.Handler()
        catch.emit = logged.append
        logging.getLogger("uvicorn.error").addHandler(catch)
        try:
            raw_post(url, big_head, [body[:20]], read=False)  # the client hangs up mid-upload
            time.sleep(0.5)
        finally:
            logging.getLogger("uvicorn.error").removeHandler(catch)
        assert not [x for x in logged if x.exc_info], [x.getMessage() for x in logged]  # no traceback
        assert httpx.post(url + "/v1/completions", json={"model": "spec", "prompt": "ok", "max_tokens": 2},
                          headers=key, timeout=60).status_code in (200, 429)
    finally:
        stop.set()
        thread.join(5)
    print(f"health: {len(times)} polls, max {max(times) * 1000:.0f} ms")
    assert len(times) > 10 and max(times) < 1.0, (len(times), max(times))  # no stall (a 5 MB body once took 7 s)


def test_full_server_answers_429(live):
    """One slot, no queue: of several simultaneous requests some get 429 (Retry-After), none crash."""
    clients = [live.client() for _ in range(6)]
    for c in clients:  # warm up each client (lazy imports, connection) so that the six requests really overlap
        c.completions.create(model="spec", prompt="The", max_tokens=1)
    start = threading.Barrier(6)
    results: list = []

    def one(c):
        start.wait()
        try:
            # temperature 2 flattens the distribution: end-of-text is unlikely, so each request runs ~60 tokens
            c.completions.create(model="spec", prompt="The", max_tokens=60, temperature=2.0, seed=0)
            results.append("ok")
        except openai.RateLimitError as e:
            results.append(e.response.headers.get("retry-after"))

    threads = [threading.Thread(target=one, args=(c,)) for c in clients]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert len(results) == 6
    assert "ok" in results and "1" in results, results
    assert set(results) <= {"ok", "1"}
    assert httpx.get(live.url + "/health").json() == {"status": "ok", "running": 0, "waiting": 0}


def test_client_gone_mid_stream_frees_the_slot(live):
    body = {"model": "spec", "prompt": "The", "max_tokens": 60, "temperature": 2.0, "stream": True}
    with httpx.stream("POST", live.url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200 and r.headers["x-slmforge-model"] == "spec"
        next(r.iter_lines())  # one event, then hang up
    deadline = time.time() + 10
    while httpx.get(live.url + "/health").json()["running"] and time.time() < deadline:
        time.sleep(0.05)
    assert httpx.get(live.url + "/health").json() == {"status": "ok", "running": 0, "waiting": 0}
    assert live.client().completions.create(model="spec", prompt="The", max_tokens=2).model == "spec"


def test_auto_routes_by_domain(live, exports):
    c = live.client()
    raw = c.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": exports["pg_test"][0][:60]}], max_tokens=4)
    r = raw.parse()
    assert r.model == "spec" and raw.headers["x-slmforge-model"] == "spec"
    ext = r.model_extra["slmforge"]
    assert ext["routed"] and not ext["fallback"] and ext["candidates"]["spec"] == ext["confidence"] > 0.5
    r = c.completions.create(model="auto", prompt=exports["gen_test"][0][:60], max_tokens=4)
    assert r.model == "gen"
    report = httpx.get(live.url + "/v1/router", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert report["kind"] == "tfidf" and set(report["accuracy"]["domains"]) == {"pg", "general"}
    assert report["accuracy"]["accuracy_first_200"] >= 0.8


def test_fallback_forwards_to_another_endpoint(live, exports):
    """threshold 1: every auto request is below it and goes to the fallback (the first server's generalist)."""
    os.environ["SLMFORGE_TEST_FALLBACK_KEY"] = KEY
    cfg = Config(models=[str(exports["spec"]), str(exports["gen"])], api_keys_env="SLMFORGE_TEST_UNSET_KEYS",
                 router={"threshold": 1.0, "eval_docs": 0},
                 fallback={"base_url": live.url + "/v1", "model": "gen", "api_key_env": "SLMFORGE_TEST_FALLBACK_KEY"})
    front = Live(create_app(cfg, log=lambda msg: None))
    try:
        c = front.client(None)
        msgs = [{"role": "user", "content": PG_PROMPT}]
        r = c.chat.completions.create(model="auto", messages=msgs, max_tokens=4, temperature=0)
        direct = live.client().chat.completions.create(model="gen", messages=msgs, max_tokens=4, temperature=0)
        assert r.model == "gen" and r.choices[0].message.content == direct.choices[0].message.content
        ext = r.model_extra["slmforge"]
        assert ext["fallback"] and ext["confidence"] < 1.0 and ext["endpoint"] == live.url + "/v1"
        chunks = list(c.chat.completions.create(model="auto", messages=msgs, max_tokens=4, temperature=0,
                                                stream=True))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == \
            direct.choices[0].message.content
        assert chunks[0].model == "gen" and chunks[0].model_extra["slmforge"]["fallback"]
        assert c.chat.completions.create(model="spec", messages=msgs, max_tokens=2).model == "spec"  # named: local
    finally:
        front.stop()
        del os.environ["SLMFORGE_TEST_FALLBACK_KEY"]


def test_local_fallback_model_is_a_routing_class(exports):
    """fallback = a model folder: it is loaded and listed, and auto sends its domain's prompts to it."""
    from fastapi.testclient import TestClient

    app = create_app(Config(models=[str(exports["spec"])], fallback=str(exports["gen"]), max_tokens=2),
                     log=lambda msg: None)
    with TestClient(app) as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["auto", "spec", "gen"]
        r = c.post("/v1/completions", json={"model": "auto", "prompt": exports["gen_test"][1][:60]}).json()
        assert r["model"] == "gen" and r["slmforge"]["fallback"] is True
        r = c.post("/v1/completions", json={"model": "auto", "prompt": exports["pg_test"][1][:60]}).json()
        assert r["model"] == "spec" and r["slmforge"]["fallback"] is False
        assert c.get("/v1/router").json()["fallback"] == "gen"


def test_serves_catalog_models_by_name(exports, tmp_path):
    from fastapi.testclient import TestClient

    from slmforge.deploy.catalog import Catalog

    catalog = Catalog(tmp_path / "catalog.db")
    catalog.add(exports["spec"])
    catalog.add(exports["gen"])
    app = create_app(Config(catalog=str(catalog.path), max_tokens=2), log=lambda msg: None)  # all of them
    with TestClient(app) as c:
        listed = c.get("/v1/models").json()["data"]
        assert [m["id"] for m in listed] == ["auto", "gen", "spec"]
        for m in listed[1:]:  # one source of truth for `chat`: the catalog's (slmforge.json's), not the template
            assert m["slmforge"]["chat"] is catalog.get(m["id"]).chat and m["slmforge"]["chat_template"] is True
        assert [m["slmforge"]["chat"] for m in listed[1:]] == [False, True]
        page = c.get("/").text  # no keys on this server: no key field on its chat page
        assert 'id="key"' not in page and "API key" not in page and 'id="new"' in page
        assert c.get("/v1/router").json()["accuracy"]["domains"]["pg"]["n"] == 8  # router data via the catalog
        r = c.post("/v1/completions", json={"model": "auto", "prompt": exports["pg_test"][2][:60]}).json()
        assert r["model"] == "spec"
    with pytest.raises(UserError, match="no model called 'nope'"):
        create_app(Config(catalog=str(catalog.path), models=["spec", "nope"]))


def test_chat_page_in_chromium(live, exports):
    """The page keeps the conversation and sends all of it; New chat forgets it; the key field is there and
    shown with keys on, absent with keys off."""
    from playwright.sync_api import sync_playwright

    from slmforge.serve.app import chat_page

    # an answer is complete (or has failed) when Send is enabled again (send() disables it before its first await)
    answered = "n => !document.getElementById('send').disabled && (document.getElementById('error').textContent " \
               "|| document.querySelectorAll('.turn.assistant .who').length === n && " \
               "[...document.querySelectorAll('.who')].every(w => w.textContent !== '…'))"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            sent = []
            page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith(
                "/v1/chat/completions") else None)
            page.goto(live.url + "/")
            assert page.is_visible("#key")
            page.fill("#key", KEY)
            page.dispatch_event("#key", "change")
            page.wait_for_selector("#model option[value=gen]", state="attached", timeout=10_000)
            assert "not chat-tuned" in page.text_content("#model option[value=gen]")
            page.fill("#max_tokens", "3")  # the whole conversation has to fit the tiny models' 64 tokens
            first = "The catalog pg_class"  # short: the tiny tokenizers spend many tokens on the chat markup
            page.fill("#prompt", first)  # auto, streaming: routed to the pg specialist
            page.click("#send")
            page.wait_for_function(answered, arg=1, timeout=20_000)
            whos = page.locator(".turn.assistant .who")
            assert whos.nth(0).text_content().startswith("answered by spec (routed, confidence")
            assert not page.text_content("#error")
            reply = page.locator(".turn.assistant .text").nth(0).text_content()
            assert reply.strip() and page.input_value("#prompt") == ""
            page.select_option("#model", "gen")  # a chosen model, not streaming, the conversation goes on
            page.uncheck("#stream")
            page.fill("#prompt", "A cynic?")
            page.click("#send")
            page.wait_for_function(answered, arg=2, timeout=20_000)
            assert not page.text_content("#error") and whos.nth(1).text_content() == "answered by gen"
            assert page.locator(".turn.user").count() == 2
            assert sent[1]["messages"] == [{"role": "user", "content": first},
                                           {"role": "assistant", "content": reply if reply != "(empty answer)" else ""},
                                           {"role": "user", "content": "A cynic?"}]
            page.click("#new")
            assert page.locator(".turn").count() == 0
            page.fill("#prompt", "Hello")
            page.click("#send")
            page.wait_for_function(answered, arg=1, timeout=20_000)
            assert not page.text_content("#error") and sent[2]["messages"] == [{"role": "user", "content": "Hello"}]

            page.set_content(chat_page(keys=False))  # a server without keys: no key field at all
            assert page.locator("#key").count() == 0 and "API key" not in page.content()
        finally:
            browser.close()


def test_serve_loads_on_its_device_and_a_missing_gpu_is_a_clear_error(exports, monkeypatch):
    import torch

    app = create_app(Config(models=[str(exports["spec"])], device="cpu"), log=lambda msg: None)
    assert [m.model.device.type for m in app.state.server.models.values()] == ["cpu"]
    assert app.state.server.concurrency == 16  # max_concurrency: auto on the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match=r"serve.device: 'cuda', but no GPU is visible"):
        create_app(Config(models=[str(exports["spec"])], device="cuda"), log=lambda msg: None)
    with pytest.raises(UserError, match="int8 .* CPU only"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        create_app(Config(models=[str(exports["spec"])], device="cuda", dtype="int8"), log=lambda msg: None)


def test_loads_only_safetensors(exports, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(exports["spec"], folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(UserError, match="no .safetensors weights"):
        create_app(Config(models=[str(folder)]), log=lambda msg: None)


def test_helpers_and_config_errors(tmp_path):
    assert _held_back("abc</", ["</s>"]) == 2 and _held_back("abc", ["</s>"]) == 0
    assert _held_back("ab\ufffd", []) == 1
    with pytest.raises(UserError, match=r"serve.router.threshold"):
        build_config({"router": {"threshold": 2}})
    with pytest.raises(UserError, match=r"serve.fallback.*base_url.*http"):
        build_config({"fallback": {"base_url": "ftp://x", "model": "m"}})
    with pytest.raises(UserError, match="folder not found"):
        create_app(Config(models=[str(tmp_path / "missing/model")]))
    recipe = tmp_path / "r" / "recipe.yaml"
    (tmp_path / "r" / "models" / "a").mkdir(parents=True)
    recipe.write_text("name: x\nserve:\n  models: [models/a, some-catalog-name]\n  port: 9000\n"
                      "  router: {threshold: 0.7}\n")
    cfg = build_config(serve_section(str(recipe)))
    assert cfg.models == [str(tmp_path / "r" / "models" / "a"), "some-catalog-name"]
    assert cfg.port == 9000 and cfg.router.threshold == 0.7 and cfg.router.kind == "tfidf"
    parser = build_parser("serve")
    for argv in ([str(recipe)], ["--recipe", str(recipe)], [str(recipe), "--port", "9001"]):  # RECIPE or --recipe
        assert serve_config(parser.parse_args(["serve", *argv])).port == (9001 if "--port" in argv else 9000)
    assert main(["serve", str(recipe), "--recipe", str(tmp_path / "other.yaml")]) == 2
    with pytest.raises(SystemExit) as e:  # a value outside a flag's choices: argparse's usage error
        main(["serve", "--dtype", "float64"])
    assert e.value.code == 2
    assert main(["serve", "--model", str(tmp_path / "nope/x")]) == 2


def test_a_chat_request_is_routed_only_to_models_with_a_chat_template(exports, tmp_path):
    """A base model's export has no chat template: `auto` sends chat requests to a model that has one, and
    completions still go to the base model's domain."""
    import json
    import shutil

    from fastapi.testclient import TestClient

    base = tmp_path / "gen-base"
    shutil.copytree(exports["gen"], base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    cfg_path = base / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text())
    tok_cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(tok_cfg))
    app = create_app(Config(models=[str(exports["spec"]), str(base)], max_tokens=2, router={"threshold": 0.0}),
                     log=lambda msg: None)
    with TestClient(app) as c:
        general = exports["gen_test"][1][:60]
        r = c.post("/v1/completions", json={"model": "auto", "prompt": general}).json()
        assert r["model"] == "gen" and "chat_models_only" not in r["slmforge"]  # named by its slmforge.json
        r = c.post("/v1/chat/completions", json={"model": "auto", "messages": [{"role": "user", "content": general}]})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "spec" and r.json()["slmforge"]["chat_models_only"] is True
        r = c.post("/v1/chat/completions", json={"model": "gen", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]


SCHEMA = {"type": "object", "properties": {"table": {"type": "string", "maxLength": 6},
                                           "rows": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "vacuumed": {"type": "boolean"}},
          "required": ["table", "rows", "vacuumed"], "additionalProperties": False}


def test_structured_outputs_parse_and_validate(live):
    """json_schema and json_object by constrained decoding: every sampled answer (streamed or not) parses
    and validates; a schema that is not JSON Schema, or a type we do not know, is a 400 naming the field."""
    import jsonschema

    c = live.client()
    fmt = {"type": "json_schema", "json_schema": {"name": "table", "schema": SCHEMA, "strict": True}}
    msgs = [{"role": "user", "content": "Which table?"}]
    for seed in range(6):
        r = c.chat.completions.create(model="spec", messages=msgs, max_tokens=40, temperature=1.0, seed=seed,
                                      response_format=fmt)
        assert r.choices[0].finish_reason == "stop", r
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    chunks = list(c.chat.completions.create(model="spec", messages=msgs, max_tokens=40, temperature=1.0, seed=9,
                                            response_format=fmt, stream=True))
    jsonschema.validate(json.loads("".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)),
                        SCHEMA)
    r = c.chat.completions.create(model="spec", messages=msgs, max_tokens=40, temperature=0,
                                  response_format={"type": "json_object"})
    content, finish = r.choices[0].message.content, r.choices[0].finish_reason
    if finish == "stop":
        assert isinstance(json.loads(content), dict)
    else:  # cut by max_tokens: still a prefix that the JSON grammar accepts, byte for byte
        import llguidance

        from slmforge.serve.structured import grammar_for

        srv = live.server.config.app.state.server
        m = srv.models["spec"]
        matcher = llguidance.LLMatcher(srv.tokenizers.get(m), grammar_for({"type": "json_object"}), log_level=0)
        ids = m.tok(content, add_special_tokens=False)["input_ids"]
        assert finish == "length" and content.lstrip().startswith("{"), (finish, content)
        assert matcher.validate_tokens(ids) == len(ids), content
    for bad, where in (({"type": "json_schema", "json_schema": {"name": "t", "schema": {"type": "objekt"}}},
                        "response_format.json_schema.schema"),
                       ({"type": "json_schema", "json_schema": {"name": "t"}}, "response_format.json_schema.schema"),
                       ({"type": "yaml"}, "response_format")):
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="spec", messages=msgs, max_tokens=4, response_format=bad)
        assert where in str(e.value), e.value


def test_knowledge_mode_puts_the_specialists_passage_in_the_generalists_prompt(exports):
    """slmforge.knowledge: the routed specialist writes a passage, the fallback endpoint (the fake OpenAI
    server, which records what it gets) answers with it in its system message; `gen+spec` does the same
    with a local generalist."""
    from fastapi.testclient import TestClient

    from tests.fake_openai import FakeServer

    fake, seen = FakeServer(), []
    answer = fake.answer
    fake.answer = lambda path, body, auth: (seen.append(body), answer(path, body, auth))[1]
    cfg = Config(models=[str(exports["spec"]), str(exports["gen"])], max_tokens=4, router={"eval_docs": 0},
                 fallback={"base_url": fake.url, "model": "big-generalist"})
    question = exports["pg_test"][0][:60]  # the router sends it to spec (test_auto_routes_by_domain)
    try:
        with TestClient(create_app(cfg, log=lambda msg: None)) as c:
            r = c.post("/v1/chat/completions", json={"model": "auto", "messages": [{"role": "user", "content": question}],
                                                     "slmforge": {"knowledge": True, "passage_tokens": 12}}).json()
            know = r["slmforge"]["knowledge"]
            assert know["specialist"] == "spec" and 1 <= know["passage_tokens"] <= 12 and know["passage"].strip()
            (sent,) = seen
            assert sent["model"] == "big-generalist" and "slmforge" not in sent
            assert sent["messages"][0]["role"] == "system" and know["passage"].strip() in sent["messages"][0]["content"]
            assert sent["messages"][-1] == {"role": "user", "content": question}
            assert json.loads(r["choices"][0]["message"]["content"]) == {"answer": question}  # the fake's answer
            r = c.post("/v1/chat/completions", json={"model": "gen+spec", "max_tokens": 3,
                                                     "slmforge": {"passage_tokens": 4},
                                                     "messages": [{"role": "user", "content": "VACUUM?"}]}).json()
            assert r.get("model") == "gen", r
            assert r["slmforge"]["knowledge"]["specialist"] == "spec" and len(seen) == 1
            bad = c.post("/v1/chat/completions", json={"model": "gen+nope", "messages": [{"role": "user", "content": "x"}]})
            assert bad.status_code == 404 and bad.json()["error"]["param"] == "model"
            bad = c.post("/v1/chat/completions", json={"model": "auto", "messages": [{"role": "user", "content": "x"}],
                                                       "slmforge": {"knowledge": True, "passage_tokens": 0}})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "slmforge.passage_tokens"
    finally:
        fake.close()


def test_a_catalog_endpoint_is_served_through_its_server(live, exports, tmp_path):
    """`slmforge models add FOLDER --endpoint URL`: the folder gives the tokenizer, card and router data, the
    endpoint (here the first server's `spec`, as vLLM or `slmforge llama-server` would serve it) generates;
    named and auto requests go there, streamed too; an old catalog file gains the column."""
    import sqlite3

    from fastapi.testclient import TestClient

    from slmforge.cli import main as cli_main
    from slmforge.deploy.catalog import Catalog

    path = tmp_path / "catalog.db"
    assert cli_main(["models", "--catalog", str(path), "add", str(exports["spec"]), "--name", "spec-remote",
                     "--endpoint", live.url + "/v1", "--endpoint-model", "spec", "--api-key-env", "SLMFORGE_TEST_EP_KEY"]) == 0
    assert cli_main(["models", "--catalog", str(path), "add", str(exports["gen"]), "--endpoint-model", "x"]) == 2
    catalog = Catalog(path)
    catalog.add(exports["gen"])
    assert catalog.get("spec-remote").endpoint == {"base_url": live.url + "/v1", "model": "spec",
                                                   "api_key_env": "SLMFORGE_TEST_EP_KEY"}
    os.environ["SLMFORGE_TEST_EP_KEY"] = KEY
    try:
        with TestClient(create_app(Config(catalog=str(path), max_tokens=4), log=lambda msg: None)) as c:
            listed = {m["id"]: m["slmforge"] for m in c.get("/v1/models").json()["data"]}
            assert listed["spec-remote"]["endpoint"] == live.url + "/v1" and listed["gen"]["endpoint"] is None
            msgs = [{"role": "user", "content": exports["pg_test"][0][:60]}]
            direct = live.client().chat.completions.create(model="spec", messages=msgs, max_tokens=4, temperature=0)
            r = c.post("/v1/chat/completions", json={"model": "auto", "messages": msgs, "max_tokens": 4,
                                                     "temperature": 0}).json()
            assert r["choices"][0]["message"]["content"] == direct.choices[0].message.content
            assert r["slmforge"]["routed"] and r["slmforge"]["endpoint"] == live.url + "/v1"
            with c.stream("POST", "/v1/completions", json={"model": "spec-remote", "prompt": "The catalog",
                                                           "max_tokens": 3, "stream": True}) as s:
                lines = [x for x in s.iter_lines() if x.startswith("data: ")]
            assert lines[-1] == "data: [DONE]" and json.loads(lines[0][6:])["slmforge"]["endpoint"]
            too_long = c.post("/v1/completions", json={"model": "spec-remote", "prompt": "x " * 200})
            assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
    finally:
        del os.environ["SLMFORGE_TEST_EP_KEY"]
    old = tmp_path / "old.db"  # a catalog written before endpoints existed
    with sqlite3.connect(old) as db:
        db.executescript(
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL); INSERT INTO meta VALUES ('schema', '1');"
            "CREATE TABLE models (name TEXT PRIMARY KEY, domain TEXT NOT NULL, description TEXT NOT NULL, params "
            "INTEGER NOT NULL, context INTEGER NOT NULL, chat INTEGER NOT NULL, tokenizer TEXT NOT NULL, path TEXT "
            "NOT NULL, lineage TEXT NOT NULL, scores TEXT NOT NULL, gguf TEXT, router TEXT, created TEXT NOT NULL);")
    assert Catalog(old).list() == []
    assert Catalog(old).add(exports["gen"]).endpoint is None and Catalog(old).get("gen").endpoint is None
