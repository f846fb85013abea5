"""What tests/test_serve.py builds its servers from: export-like model folders, a live uvicorn server,
and a hand-written HTTP client for hostile uploads."""

import json
import shutil
import socket
import threading
import time
from pathlib import Path

import openai

KEY = "test-key-1"


def export_like(model_dir: Path, out: Path, name: str, domain: str, train: list[str], test: list[str],
                 chat: bool = True) -> Path:
    """An export folder as stages/export.py writes it (the parts serve reads), built here by hand."""
    shutil.copytree(model_dir, out, ignore=shutil.ignore_patterns("snapshots", "*.jsonl"))
    (out / "domain").mkdir()
    for split, texts in (("train", train), ("test", test)):
        (out / "domain" / f"{split}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (out / "slmforge.json").write_text(json.dumps({
        "format": 1, "name": name, "domain": domain, "description": f"test {domain} model", "context": 64,
        "chat": chat, "router": {"train": "domain/train.jsonl", "test": "domain/test.jsonl"}}))
    return out


class Live:
    """create_app's app under uvicorn in a thread, on a free loopback port."""

    def __init__(self, app):
        import uvicorn

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "uvicorn did not start"
            time.sleep(0.02)

    def client(self, key: str | None = KEY, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or "none", max_retries=0, **kw)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


def texts_of(path: Path) -> list[str]:
    return [json.loads(x)["text"] for x in path.read_text().splitlines() if x.strip()]


def raw_post(url: str, head: bytes, parts: list[bytes], pause: float = 0.0, read: bool = True) -> bytes:
    """A hand-written HTTP/1.1 POST over a socket: the body in parts with pauses (a slow client), or cut
    short and closed (an aborted upload, read=False)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as s:
        s.sendall(head)
        for p in parts:
            s.sendall(p)
            time.sleep(pause)
        if not read:
            return b""
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return data
