"""A local OpenAI-compatible chat-completions server for tests and benchmarks: it injects faults on
request (500, 429, 400, slow, malformed/truncated/empty JSON) and records what it saw."""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default 5 drops bursts of connections: SYN retried after 1 s, a timeout


class FakeServer:
    """POST /v1/chat/completions on 127.0.0.1. The last user message "name|f1,f2,..." gets fault f1 on
    its first attempt, f2 on its second, ..., then the good reply {"answer": name} as JSON text.

    Faults: an HTTP status (500, 400, ...; 429 comes with Retry-After: 1); slow (answers after 2 s,
    past the client's timeout); badjson; trunc (cut JSON, finish_reason "length"); empty; schema (JSON
    without "answer"); prose (the good reply inside prose and a ```json fence). `reject` holds
    response_format types answered with 400, as a server that does not know them does; `delay` slows
    every reply."""

    def __init__(self, reject=(), delay=0.0):
        self.reject, self.delay = set(reject), delay
        self.lock = threading.Lock()
        self.log: list[dict] = []
        self.attempts: Counter = Counter()
        self.active = self.max_active = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.active += 1
                    server.max_active = max(server.max_active, server.active)
                try:
                    status, payload, extra = server.answer(self.path, body, self.headers.get("Authorization"))
                    data = json.dumps(payload).encode()
                    self.send_response(status)
                    headers = {"Content-Type": "application/json", "Content-Length": str(len(data)), **extra}
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout)
                finally:
                    with server.lock:
                        server.active -= 1

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"

    def answer(self, path, body, auth):
        name, _, faults = body["messages"][-1]["content"].partition("|")
        fmt = (body.get("response_format") or {}).get("type")
        with self.lock:
            attempt = self.attempts[name]
            self.attempts[name] += 1
            self.log.append({"name": name, "t": time.monotonic(), "format": fmt, "auth": auth})
        if path != "/v1/chat/completions":
            return 404, {"error": {"message": "not found"}}, {}
        if fmt in self.reject:
            return 400, {"error": {"message": f"response_format {fmt} is not supported"}}, {}
        faults = faults.split(",") if faults else []
        fault = faults[attempt] if attempt < len(faults) else "ok"
        time.sleep(self.delay)
        if fault.isdigit():
            return int(fault), {"error": {"message": "no"}}, {"Retry-After": "1"} if fault == "429" else {}
        if fault == "slow":
            time.sleep(2.0)
        good = json.dumps({"answer": name})
        content, finish = {
            "badjson": ("Sure! {answer: oops", "stop"), "trunc": (good[:8], "length"), "empty": ("", "stop"),
            "schema": ('{"wrong": 1}', "stop"), "prose": (f"Here:\n```json\n{good}\n```\nMore?", "stop"),
        }.get(fault, (good, "stop"))
        return 200, {"id": "x", "object": "chat.completion", "model": body["model"],
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                  "finish_reason": finish}],
                     "usage": {"prompt_tokens": 10, "completion_tokens": 5}}, {}

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class GroundedServer:
    """A fake teacher that answers every synth prompt with JSON built from the prompt's own chunk."""

    def __init__(self):
        self.fake = FakeServer()
        self.fake.answer = self.answer
        self.url = self.fake.url

    def answer(self, path, body, auth):
        prompt = body["messages"][-1]["content"]
        if '"""' not in prompt:  # bench's question generation: a plain-text question about the quoted sentence
            sentence = prompt.split('\n\n"', 1)[1].rsplit('"\n\n', 1)[0]
            return self._reply(body, f"What does the documentation say about {' '.join(sentence.split()[:4])}?\nMore.")
        chunk = prompt.split('"""')[1]
        sents = [s for s in re.split(r"(?<=\.)\s+", " ".join(chunk.split())) if len(s.split()) > 4] or [chunk[:200]]
        schema = body.get("response_format", {}).get("json_schema", {}).get("schema", {})
        keys = list(schema.get("properties", {})) or ["question", "answer"]
        fields = {"question": f"What does the section on {sents[0][:40]!r} say?", "answer": sents[0], "rationale": f'It says "{sents[0]}"',
                  "chosen": sents[0], "rejected": "Nothing at all about that.",
                  "options": [sents[0][:40], "alpha", "beta", "gamma"], "answer_index": 0}
        return self._reply(body, json.dumps({k: fields[k] for k in keys}))

    def _reply(self, body, content):
        with self.fake.lock:
            self.fake.log.append({"name": "synth"})
        return 200, {"id": "x", "object": "chat.completion", "model": body["model"],
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                  "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": 100, "completion_tokens": 20}}, {}
