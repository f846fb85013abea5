"""Teachers: models that write synthetic training data for the synth stage.

Both teachers have one method, `generate(requests, on_reply) -> replies in request order`:
- `OpenAITeacher`: one or more OpenAI-compatible chat servers (vLLM, SGLang, TGI, llama.cpp, Ollama,
  OpenAI) at once through the openai client, with a cap on requests in flight. Faults that pass (429, 5xx, timeouts, dropped
  connections) are retried with backoff; unusable replies (bad, cut or off-schema JSON, empty) are
  asked again, since a new sample may do better. JSON goes through the best `response_format` the
  server accepts.
- `HFTeacher`: a local Hugging Face checkpoint run with transformers in batches (offline, safetensors
  only, no remote code).

Every successful reply is cached on disk, one JSON file per request, keyed by what decides the answer
(model, messages, schema, max_tokens, temperature, the caller's key): a re-run or a resumed run pays
for nothing twice. Failures are not cached, so the next run asks again.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import email.utils
import hashlib
import json
import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from slmforge.artifacts import write_json_atomic
from slmforge.console import info
from slmforge.errors import UserError

TRANSIENT = {"timeout", "http_429", "http_5xx", "connection"}  # the server's trouble: back off, retry
CONTENT = {"bad_json", "schema", "truncated", "empty"}  # the model's: a new sample may do better
JSON_MODES = ("json_schema", "json_object", "none")  # what `auto` tries, in this order
DOWN_S = 10.0  # a server that refused a connection gets no new request for this long (if others are up)


@dataclass
class Request:
    """One chat completion. `key` is the caller's stable id (e.g. chunk id + task); it is part of the
    cache key, so two requests with the same messages but different keys are asked separately."""

    key: str
    messages: list[dict]
    json_schema: dict | None = None
    max_tokens: int = 512
    temperature: float = 0.7


@dataclass
class Reply:
    """The outcome of a Request. `error` is None or the last reason it failed for (see TRANSIENT,
    CONTENT, and http_4xx). `usage` counts every attempt; a cached reply keeps the usage it had when
    it was made, while the teacher's `stats` count only what this run paid for."""

    key: str
    text: str | None
    data: object | None
    error: str | None
    usage: dict = field(default_factory=lambda: {"prompt_tokens": 0, "completion_tokens": 0})
    cached: bool = False


# ---- JSON replies ----------------------------------------------------------------------------------
_FENCE = re.compile(r"```[A-Za-z]*[ \t]*\n?(.*?)```", re.DOTALL)
_OPEN = re.compile(r"[{\[]")
_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "array": list,
          "object": dict, "null": type(None)}


def _type_ok(value, expected) -> bool:
    if expected is None:
        return True
    for name in expected if isinstance(expected, list) else [expected]:
        if name not in _TYPES:
            return True  # a type we do not check
        if isinstance(value, bool) and name in ("integer", "number"):
            continue  # JSON true is not a number, though Python's bool is an int
        if isinstance(value, _TYPES[name]):
            return True
    return False


def check_schema(data, schema: dict) -> bool:
    """Top level only: the type, the required keys and each listed property's type. Full JSON Schema
    validation would throw away whole samples over a nested detail the synth filters judge better."""
    if not _type_ok(data, schema.get("type")):
        return False
    if isinstance(data, dict):
        props = schema.get("properties", {})
        return all(k in data for k in schema.get("required", ())) and all(
            _type_ok(data[k], props[k].get("type") if isinstance(props[k], dict) else None)
            for k in props if k in data)
    return True


def parse_json_reply(text: str, schema: dict | None) -> tuple[object | None, str | None]:
    """(data, None), or (None, reason): "empty", "bad_json" (no JSON value found) or "schema".

    Tolerant, because models without constrained decoding wrap JSON in ```json fences and prose: the
    first JSON object or array is taken (the first that fits the schema's top level, if one does not),
    looking in fenced blocks first, then in the whole text: an answer about SQL may hold a ```sql
    block inside its JSON strings, which is no wrapper."""
    if text is None or not text.strip():
        return None, "empty"
    decoder, found = json.JSONDecoder(), False
    for body in [m.group(1) for m in _FENCE.finditer(text)] + [text]:
        pos = 0
        while m := _OPEN.search(body, pos):
            try:
                data, end = decoder.raw_decode(body, m.start())
            except ValueError:
                pos = m.start() + 1
                continue
            if schema is None or check_schema(data, schema):
                return data, None
            found, pos = True, end  # skip the whole value: its insides are not candidates
    return None, "schema" if found else "bad_json"


def check_reply(text: str | None, finish_reason: str | None, schema: dict | None) -> tuple[object, str | None]:
    """Turn a completion into (data, error). A reply cut by max_tokens is "truncated" when it is text,
    or JSON that began and did not end (more max_tokens would help); JSON that never began is
    "bad_json" (the model does not follow the format). Valid JSON followed by a cut-off ramble is kept."""
    if text is None or not text.strip():
        return None, "empty"
    if schema is None:
        return None, "truncated" if finish_reason == "length" else None
    data, error = parse_json_reply(text, schema)
    if error == "bad_json" and finish_reason == "length" and _OPEN.search(text):
        error = "truncated"
    return data, error


# ---- the shared part: cache, order, stats ----------------------------------------------------------
class _Teacher:
    name = "base"

    def __init__(self, model_id: str, cache_dir: Path):
        self.model_id, self.cache_dir = model_id, Path(cache_dir)
        self.stats: collections.Counter = collections.Counter()

    def _cache_path(self, req: Request) -> Path:
        blob = json.dumps({"model": self.model_id, "messages": req.messages, "json_schema": req.json_schema,
                           "max_tokens": req.max_tokens, "temperature": req.temperature, "key": req.key},
                          sort_keys=True, ensure_ascii=False)
        digest = hashlib.sha256(blob.encode("utf-8")).hexdigest()
        return self.cache_dir / digest[:2] / f"{digest}.json"

    def _cached(self, req: Request) -> Reply | None:
        try:
            d = json.loads(self._cache_path(req).read_text(encoding="utf-8"))
            return Reply(req.key, d["text"], d["data"], None, d["usage"], cached=True)
        except (OSError, ValueError, KeyError):
            return None  # absent, or unreadable: ask again

    def generate(self, requests: list[Request],
                 on_reply: Callable[[Reply], None] | None = None) -> list[Reply]:
        """One Reply per request, in request order. `on_reply` is called as each is done (cache hits
        first), after a success is in the cache: a caller that saves there loses nothing to a crash."""
        replies: list[Reply | None] = [None] * len(requests)
        todo = []
        for i, req in enumerate(requests):
            self.stats["requests"] += 1
            hit = self._cached(req)
            if hit is None:
                todo.append(i)
                continue
            self.stats["cache_hits"] += 1
            replies[i] = hit
            if on_reply:
                on_reply(hit)

        def done(i: int, reply: Reply) -> None:
            if reply.error is None:
                path = self._cache_path(requests[i])
                path.parent.mkdir(parents=True, exist_ok=True)
                write_json_atomic(path, {"model": self.model_id, "key": reply.key, "text": reply.text,
                                         "data": reply.data, "usage": reply.usage})
            else:
                self.stats[f"failed_{reply.error}"] += 1
            self.stats["prompt_tokens"] += reply.usage["prompt_tokens"]
            self.stats["completion_tokens"] += reply.usage["completion_tokens"]
            replies[i] = reply
            if on_reply:
                on_reply(reply)

        if todo:
            self._generate(requests, todo, done)
        return replies

    def _generate(self, requests: list[Request], todo: list[int], done: Callable[[int, Reply], None]):
        """Produce a Reply for each index in `todo` and hand it to `done`, in any order."""
        raise NotImplementedError

    def cost_usd(self) -> float:
        return 0.0


# ---- OpenAI-compatible servers ---------------------------------------------------------------------
class OpenAIConfig(BaseModel):
    """Where the teacher runs and how hard to push it. The key itself never appears here."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # Fields that change how requests are made but not the replies (for a caller's cache key).
    NOT_IN_KEY: ClassVar[frozenset[str]] = frozenset({
        "base_urls", "api_key_env", "concurrency", "timeout_s", "max_retries", "backoff_s", "json_mode",
        "price_prompt_per_1m", "price_completion_per_1m"})

    base_urls: list[str] = Field(min_length=1, description="OpenAI-compatible servers, as for the openai "
                                 "client (e.g. http://localhost:8000/v1); requests are spread over all")
    model: str = Field(min_length=1, description="the model name the servers know")
    api_key_env: str | None = Field(None, description="NAME of the environment variable holding the API key")
    concurrency: int = Field(8, ge=1, description="requests in flight, over all servers")
    timeout_s: float = Field(60, gt=0, description="seconds before a request counts as timed out")
    max_retries: int = Field(4, ge=0, description="retries per request after the first attempt")
    backoff_s: float = Field(0.5, ge=0, description="first retry delay; doubles each retry, with jitter")
    json_mode: Literal["auto", "json_schema", "json_object", "none"] = Field(
        "auto", description="how JSON is asked for; auto: json_schema, else json_object, else parse text")
    price_prompt_per_1m: float = Field(0.0, ge=0, description="USD per million prompt tokens")
    price_completion_per_1m: float = Field(0.0, ge=0, description="USD per million completion tokens")

    @field_validator("base_urls")
    @classmethod
    def _urls(cls, urls: list[str]) -> list[str]:
        bad = [u for u in urls if not u.startswith(("http://", "https://"))]
        if bad:
            raise ValueError(f"{bad} must start with http:// or https://, e.g. http://localhost:8000/v1")
        return [u.rstrip("/") for u in urls]


def _retry_after(headers) -> float | None:
    """Retry-After in seconds or as an HTTP date, or OpenAI's retry-after-ms; None when absent."""
    with_ms, value = headers.get("retry-after-ms"), headers.get("retry-after")
    try:
        if with_ms:
            return max(0.0, float(with_ms) / 1000)
        if value:
            return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _run_sync(coro):
    """asyncio.run, also when called from inside a running event loop (Jupyter): then in a thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


class OpenAITeacher(_Teacher):
    """Chat completions through the openai client (its typed errors, timeouts and response parsing),
    `cfg.concurrency` at a time, each sent to the least busy server.

    The client's own retries are off (max_retries=0) and the loop in `_ask` retries instead: the
    client retries on the same server, so a request sent to a server that is down waited 3.25 s of
    backoff before it failed and could go elsewhere (max_retries=3 against a closed port, this machine;
    0.07 s with them off), and it does not retry replies that parse but are unusable (bad JSON, cut,
    off-schema), which a new sample often fixes. The key is passed explicitly, never read from
    OPENAI_API_KEY, and no Authorization header is sent when the recipe names none."""

    name = "openai"

    def __init__(self, cfg: OpenAIConfig, cache_dir: Path):
        super().__init__(cfg.model, cache_dir)
        self.cfg = cfg
        self._key = None
        if cfg.api_key_env:
            self._key = os.environ.get(cfg.api_key_env)
            if not self._key:
                raise UserError(f"teacher.api_key_env: the environment variable {cfg.api_key_env} is not "
                                f"set; export it with the API key (the key is never written to the recipe)")
        first = JSON_MODES[0] if cfg.json_mode == "auto" else cfg.json_mode
        self._mode = dict.fromkeys(cfg.base_urls, first)  # per server: the best mode it accepted
        self._busy = dict.fromkeys(cfg.base_urls, 0)
        self._down_until = dict.fromkeys(cfg.base_urls, 0.0)
        self._turn = 0
        self._said: set = set()

    def cost_usd(self) -> float:
        return (self.stats["prompt_tokens"] * self.cfg.price_prompt_per_1m
                + self.stats["completion_tokens"] * self.cfg.price_completion_per_1m) / 1e6

    def _say_once(self, tag, msg: str) -> None:
        if tag not in self._said:
            self._said.add(tag)
            info(msg.replace(self._key, "***") if self._key else msg)

    def _generate(self, requests, todo, done) -> None:
        import httpx
        from openai import AsyncOpenAI

        async def main():
            queue = iter(todo)  # shared by the workers: each index is taken once
            limits = httpx.Limits(max_connections=self.cfg.concurrency)
            async with httpx.AsyncClient(limits=limits) as http:
                clients = {u: AsyncOpenAI(base_url=u, api_key=self._key or "unused", max_retries=0,
                                          timeout=self.cfg.timeout_s, http_client=http)
                           for u in self.cfg.base_urls}

                async def worker():
                    for i in queue:
                        done(i, await self._ask(clients, requests[i]))

                await asyncio.gather(*(worker() for _ in range(min(self.cfg.concurrency, len(todo)))))

        _run_sync(main())

    def _pick_url(self) -> str:
        """The server with the fewest requests in flight among those up; ties go round-robin."""
        urls = self.cfg.base_urls
        self._turn = (self._turn + 1) % len(urls)
        now = time.monotonic()
        order = [u for u in urls[self._turn:] + urls[:self._turn] if self._down_until[u] <= now] or urls
        return min(order, key=self._busy.__getitem__)

    async def _ask(self, clients, req: Request) -> Reply:
        """Attempts until a usable reply, a reason not worth retrying, or max_retries is spent."""
        usage = {"prompt_tokens": 0, "completion_tokens": 0}
        retries, url = 0, None
        while True:
            if url is None:
                url = self._pick_url()
                mode = self._mode[url] if req.json_schema is not None else "none"
            text, data, error, wait = await self._attempt(clients[url], url, req, mode, usage)
            if error == "format_rejected":  # step down at once, on the same server
                mode = JSON_MODES[JSON_MODES.index(mode) + 1]
                self.stats[f"fallback_{mode}"] += 1
                continue
            lower = JSON_MODES.index(mode) > JSON_MODES.index(self._mode[url])
            if req.json_schema is not None and error != "http_4xx" and lower:
                self._mode[url] = mode  # remembered only once the lower mode got a real answer
                self._say_once(("mode", url, mode), f"teacher {url}: response_format falls back to {mode}")
            if error is None:
                return Reply(req.key, text, data, None, usage)
            content_retry = error in CONTENT and req.temperature > 0  # greedy decoding would say it again
            if retries >= self.cfg.max_retries or not (error in TRANSIENT or content_retry):
                return Reply(req.key, text, None, error, usage)
            retries += 1
            self.stats[f"retries_{error}"] += 1
            if error in TRANSIENT:
                backoff = self.cfg.backoff_s * 2 ** (retries - 1) * random.uniform(0.5, 1.5)
                await asyncio.sleep(min(wait if wait is not None else backoff, 120.0))
            url = None

    async def _attempt(self, client, url: str, req: Request, mode: str, usage: dict):
        """One request: (text, data, error, Retry-After seconds or None). Adds the tokens used to `usage`.
        A 400/422 to a response_format in `auto` mode is "format_rejected": the caller steps down (the
        servers answer 400, or 422 from pydantic, to a format they do not know; 401/404 are not that)."""
        import httpx
        import openai

        body = {"model": self.cfg.model, "messages": req.messages, "max_tokens": req.max_tokens,
                "temperature": req.temperature}
        if mode == "json_schema":
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "reply", "schema": req.json_schema}}
        elif mode == "json_object":
            body["response_format"] = {"type": "json_object"}
        if not self._key:
            body["extra_headers"] = {"Authorization": openai.Omit()}  # no key named: none sent
        self.stats["http_requests"] += 1
        self._busy[url] += 1
        try:
            answer = await client.chat.completions.create(**body)
        except openai.APITimeoutError:
            return None, None, "timeout", None
        except openai.APIConnectionError as e:
            if isinstance(e.__cause__, httpx.ConnectError):  # nothing listens there (a dropped reply is not)
                self._down_until[url] = time.monotonic() + DOWN_S
                self._say_once(("connect", url), f"teacher {url}: cannot connect; trying the others for now")
            return None, None, "connection", None
        except (openai.RateLimitError, openai.InternalServerError) as e:
            reason = "http_429" if isinstance(e, openai.RateLimitError) else "http_5xx"
            return None, None, reason, _retry_after(e.response.headers)
        except openai.APIStatusError as e:
            self._say_once((e.status_code, mode), f"teacher {url}: HTTP {e.status_code} ({mode}): "
                                                  f"{e.response.text[:300]}")
            stepping_down = e.status_code in (400, 422) and mode != "none" and self.cfg.json_mode == "auto"
            return None, None, "format_rejected" if stepping_down else "http_4xx", None
        except openai.APIResponseValidationError:
            return None, None, "bad_json", None
        finally:
            self._busy[url] -= 1
        try:
            choice = answer.choices[0]
            text, finish = choice.message.content, choice.finish_reason
        except (AttributeError, IndexError, TypeError):
            return None, None, "bad_json", None  # not a chat completion at all (a proxy's HTML page...)
        for k in usage:
            usage[k] += int(getattr(answer.usage, k, 0) or 0)
        data, error = check_reply(text, finish, req.json_schema)
        return text, data, error, None


# ---- a local Hugging Face checkpoint ---------------------------------------------------------------
def json_start(schema: dict | None) -> str:
    """The start of the JSON reply a schema asks for, `{"<first key>": ` (and `"` for a string, `["` for a
    list of strings), written into the reply before the model continues it ("prefilling"). A small model
    asked for JSON often writes prose instead (how often SmolLM2's replies parse on synth's qa prompt:
    benchmarks/synth_throughput.py, its `parsed` column)."""
    props = (schema or {}).get("properties") or {}
    if not props:
        return ""
    key, spec = next(iter(props.items()))
    return '{"' + key + '": ' + {"string": '"', "array": '["'}.get(spec.get("type"), "")


class HFTeacher(_Teacher):
    """A local checkpoint run with transformers through its chat template, `max_batch` prompts per
    generate() call (left padding, KV cache; prompts of similar length batched together), greedy or sampled
    from `seed`. No retries: a local model has no transient faults, and a JSON failure is counted
    (failed_<reason>) for the caller to judge whether the model is big enough to teach."""

    name = "hf"

    def __init__(self, model_dir: str | Path, cache_dir: Path, max_batch: int = 16, dtype: str | None = None,
                 seed: int = 0, device: str | None = None):
        from slmforge.models.chat import stop_token_ids
        from slmforge.models.modeling import load_model

        model_dir = Path(model_dir).resolve()
        # offline, safetensors, no remote code; on `device` (hardware.resolve_device's answer) when given
        self.model, self.tokenizer = load_model(model_dir, dtype=dtype, device=device)
        self.model.eval()
        if not getattr(self.tokenizer, "chat_template", None):
            raise UserError(f"{model_dir}: the tokenizer has no chat template; use an instruct/chat model")
        self.tokenizer.padding_side = "left"  # batched generation continues right after each prompt
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        stops = self.model.generation_config.eos_token_id
        stops = set(stops if isinstance(stops, list) else [stops]) | set(stop_token_ids(self.tokenizer))
        self._stops = sorted(s for s in stops if s is not None)
        self.max_batch, self.seed = max_batch, seed
        # The weights' sizes and times stand for their content: hashing gigabytes per run costs more.
        files = sorted([*model_dir.glob("*.safetensors"), model_dir / "config.json"])
        stamp = "|".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
        stamp += f"|{dtype}|{max_batch}|{seed}|prefill"  # replies depend on these (and the JSON prefill)
        super().__init__(f"hf:{model_dir}:{hashlib.sha256(stamp.encode()).hexdigest()[:16]}", cache_dir)

    def _generate(self, requests, todo, done) -> None:
        import torch

        groups = collections.defaultdict(list)  # one generate() call takes one max_tokens and temperature
        starts = {i: json_start(requests[i].json_schema) for i in todo}
        prompts = {i: self.tokenizer.apply_chat_template(requests[i].messages, tokenize=False,
                                                         add_generation_prompt=True) + starts[i] for i in todo}
        lengths = {i: len(self.tokenizer(prompts[i], add_special_tokens=False)["input_ids"]) for i in todo}
        for i in todo:
            groups[(requests[i].max_tokens, requests[i].temperature)].append(i)
        for (max_tokens, temperature), idx in groups.items():
            idx.sort(key=lambda i: (lengths[i], requests[i].key))  # similar lengths: less padding to compute
            for start in range(0, len(idx), self.max_batch):
                batch = idx[start:start + self.max_batch]
                enc = self.tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True,
                                     add_special_tokens=False).to(self.model.device)
                sampling = ({"do_sample": True, "temperature": temperature} if temperature > 0
                            else {"do_sample": False})
                # seeded from the batch's first request: a re-run samples the same
                torch.manual_seed(int(hashlib.sha256(f"{self.seed}:{requests[batch[0]].key}".encode())
                                      .hexdigest()[:8], 16))
                with torch.no_grad():
                    out = self.model.generate(**enc, max_new_tokens=max_tokens, eos_token_id=self._stops,
                                              pad_token_id=self.tokenizer.pad_token_id, **sampling)
                for row, i in enumerate(batch):
                    new = out[row, enc["input_ids"].shape[1]:].tolist()
                    stop = next((k for k, t in enumerate(new) if t in self._stops), None)
                    text = starts[i] + self.tokenizer.decode(new[:stop], skip_special_tokens=True)
                    data, error = check_reply(text, "length" if stop is None else "stop", requests[i].json_schema)
                    usage = {"prompt_tokens": int(enc["attention_mask"][row].sum()),
                             "completion_tokens": len(new) if stop is None else stop + 1}
                    done(i, Reply(requests[i].key, text, data, error, usage))
