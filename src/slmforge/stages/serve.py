"""`slmforge serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) for one or more models.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streaming as server-sent
events in the OpenAI wire format), GET /v1/router (routing report), GET /health, and a chat page at /.

- Models come from the catalog (names) or from folders (an export folder with slmforge.json, or any
  save_pretrained folder); they load through slmforge.modeling.load_model: safetensors only, no remote code.
- `model: "auto"` routes the prompt with slmforge.router (TF-IDF + logistic regression over the served
  models' domains by default). Below `router.threshold` the request goes to the configured fallback (another
  OpenAI-compatible endpoint, streaming passed through, or a local model); with no fallback the top
  specialist answers. The answering model is named in `model`, in an extension field `slmforge` and in the
  `x-slmforge-model` header.
- Robustness: at most `max_concurrency` generations at once, at most `max_queue` requests waiting (beyond:
  429 with Retry-After); every field validated (OpenAI-style 400 bodies); prompts or max_tokens beyond the
  model's context rejected with code context_length_exceeded; optional API keys (401).
- Chat requests use the model's chat template. A model without one answers /v1/chat/completions with a 400
  naming the model (formatting a conversation plainly would give text the model never saw in training);
  /v1/completions still works for it.
"""


import argparse
import asyncio
import hmac
import json
import os
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from slmforge.config import RecipePath, StageConfig, resolve_path
from slmforge.errors import UserError
from slmforge.router import DEFAULT_KIND, KINDS, PROMPT_CUT
from slmforge.catalog import Catalog, read_meta

NAME = "serve"
INPUTS: tuple[str, ...] = ()

# Decode speed, ms per token: serve's loop (generate below) vs transformers' generate, on the demo DPO model
# (2.9M params, vocab 8192, 3 layers), 2 torch threads, 64 greedy tokens (benchmarks/serve_load.py):
#   idle machine, best of 3:        float32 2.27 vs 2.80; bfloat16 2.29 vs 2.53; int8 1.55 vs 1.95
#   beside other work, best of 5:   float32 1.57 vs 2.06; bfloat16 2.08 vs 2.64; int8 1.65 vs 2.06
# int8 (dynamic quantization of the Linear layers) kept the bits per byte (1.9701 vs 1.9716 on 30 held-out
# docs) but its greedy continuations differ from float32's (benchmarks/gguf_verify.py: 13% of 128 tokens
# equal), and its speed-up did not hold on the busy machine; float32 stays the default: exact, and int8 goes
# through torch.ao.quantization, which torch deprecates. bfloat16 is never faster on this CPU.
DEFAULT_DTYPE = "float32"
DTYPES = ("float32", "bfloat16", "int8")


# ----------------------------------------------------------------------------------------------- config

class RouterConfig(BaseModel):
    """How `model: "auto"` picks a model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["tfidf", "bpb"] = Field(DEFAULT_KIND, description="tfidf: character n-gram TF-IDF + logistic "
                                          "regression trained on each model's domain/train.jsonl; bpb: each "
                                          "model's bits per byte on the prompt (no training data needed)")
    threshold: float = Field(0.5, ge=0.0, le=1.0, description="below this routing probability the fallback "
                             "answers (when one is configured); 0 = always the top specialist")
    max_docs: int = Field(2000, ge=1, description="documents per domain read to train the TF-IDF router")
    eval_docs: int = Field(200, ge=0, description="held-out documents per domain scored at start (bpb: "
                           "at most 30, since it runs every model)")


class FallbackConfig(BaseModel):
    """Where low-confidence `auto` requests go: an OpenAI-compatible endpoint or a local model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str | None = Field(None, description="an OpenAI-compatible endpoint, e.g. http://host:8001/v1; "
                                 "unset = `model` is a catalog name or a model folder served locally")
    model: str = Field(..., min_length=1, description="the model name at the endpoint, or a catalog name/folder")
    api_key_env: str | None = Field(None, description="environment variable holding the endpoint's API key")

    @field_validator("base_url")
    @classmethod
    def _url(cls, v):
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError(f"fallback.base_url: {v!r} must start with http:// or https://")
        return v.rstrip("/") if v else v


class Config(StageConfig):
    """`slmforge serve`: which models, where, and the limits that keep the server up under load."""

    catalog: RecipePath | None = Field(None, description="catalog database (default: $SLMFORGE_CATALOG or "
                                "~/.slmforge/catalog.db)")
    models: list[str] = Field(default_factory=list, description="catalog names or model folders to serve "
                              "(default: every model in the catalog)")
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0 = every interface)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port")
    api_keys_env: str = Field("SLMFORGE_API_KEYS", description="environment variable with comma-separated API "
                              "keys; when it is unset or empty, no key is required")
    max_concurrency: int = Field(2, ge=1, description="generations running at once")
    max_queue: int = Field(32, ge=0, description="requests waiting for a generation slot; more get 429")
    queue_timeout_s: float = Field(120.0, gt=0, description="longest wait for a slot before a 429")
    router: RouterConfig = Field(default_factory=RouterConfig, description="routing for model \"auto\"")
    fallback: FallbackConfig | str | None = Field(None, description="low-confidence auto requests go here: "
                                                  "{base_url, model, api_key_env} or a catalog name/folder")
    fallback_timeout_s: float = Field(120.0, gt=0, description="timeout of a request to the fallback endpoint")
    dtype: Literal["float32", "bfloat16", "int8"] = Field(DEFAULT_DTYPE, description="weights in memory; int8 = "
                                                          "dynamic quantization of the Linear layers")
    max_tokens: int = Field(128, ge=1, description="completion length when a request gives no max_tokens")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice)")

    @field_validator("models")
    @classmethod
    def _models(cls, v: list[str], info) -> list[str]:
        """Folders (anything with '/' or starting with '.' or '~') resolve against the recipe's folder."""
        return [str(resolve_path(m, info)) if "/" in m or m.startswith((".", "~")) else m for m in v]

    @model_validator(mode="after")
    def _check(self):
        if isinstance(self.fallback, str) and not self.fallback.strip():
            raise ValueError("fallback: give a catalog name, a model folder or {base_url, model}")
        return self


# ----------------------------------------------------------------------------------------------- models

@dataclass
class Served:
    name: str
    domain: str
    path: Path
    model: Any
    tok: Any
    context: int
    chat: bool
    eos_ids: set[int]
    params: int
    description: str = ""
    router_data: dict | None = None  # {"train": Path, "test": Path}
    meta: dict = field(default_factory=dict)


def resolve(spec: str, catalog: str | None) -> dict:
    """A catalog name or a folder -> {name, domain, path, description, router}. A bare name is looked up in
    the catalog first; a path (with '/', or starting with '.' or '~') is always a folder."""
    p = Path(spec).expanduser()
    if "/" not in spec and not spec.startswith((".", "~")):
        try:
            e = Catalog(catalog).get(spec)
        except UserError as err:
            if not p.is_dir():
                raise UserError(f"model {spec!r}: not a folder, and {err}") from None
        else:
            router = {k: (Path(e.path) / v) for k, v in (e.router or {}).items() if v}
            return {"name": e.name, "domain": e.domain or e.name, "path": Path(e.path),
                    "description": e.description or "", "router": router or None}
    if not p.is_dir():
        raise UserError(f"model {spec!r}: folder not found. Give an existing model folder or a catalog name")
    meta = read_meta(p)
    router = meta.get("router")
    if router:
        router = {k: (p / v) for k, v in router.items() if v}
    name = meta.get("name") or p.resolve().name
    return {"name": name, "domain": meta.get("domain") or name, "path": p.resolve(),
            "description": meta.get("description", ""), "router": router}


def catalog_names(catalog: str | None) -> list[str]:
    names = [e.name for e in Catalog(catalog).list()]
    if not names:
        raise UserError("no models to serve: the catalog is empty. Add one with `slmforge models add "
                        "<export folder>` or pass --model FOLDER")
    return names


def load_served(info: dict, dtype: str) -> Served:
    import torch

    from slmforge.modeling import load_model

    model, tok = load_model(info["path"], dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    if dtype == "int8":
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    cfg = model.config
    context = int(getattr(cfg, "max_position_embeddings", 0) or 0) or 2048
    eos = set()
    for src in (getattr(model, "generation_config", None), cfg):
        ids = getattr(src, "eos_token_id", None) if src is not None else None
        if ids is not None:
            eos |= set(ids if isinstance(ids, list) else [ids])
    if tok.eos_token_id is not None:
        eos.add(tok.eos_token_id)
    return Served(name=info["name"], domain=info["domain"], path=Path(info["path"]), model=model, tok=tok,
                  context=context, chat=bool(getattr(tok, "chat_template", None)), eos_ids=eos, params=params,
                  description=info.get("description", ""), router_data=info.get("router"))


# ------------------------------------------------------------------------------------------- generation

@dataclass
class GenResult:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "length"


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters may still become a stop sequence (or are an unfinished UTF-8 char)."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    n = len(text) - len(text.rstrip("\ufffd"))
    return max(hold, n)


def generate(m: Served, ids: list[int], max_tokens: int, temperature: float, top_p: float, seed: int | None,
             stops: list[str], res: GenResult, cancel: threading.Event | None = None) -> Iterator[str]:
    """Text pieces of the completion of `ids`; `res` gets the token counts and the finish reason.

    A bare decode loop over the model's forward with a KV cache rather than `model.generate`: it decides stop
    sequences, seeds and streaming per token without a streamer thread, and measured faster per token
    (see the numbers at DEFAULT_DTYPE: 1.57 vs 2.06 ms/token on the demo model, 2 threads).
    """
    import torch
    from transformers import DynamicCache

    res.prompt_tokens = len(ids)
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    cache = DynamicCache()
    x = torch.tensor([ids], dtype=torch.long)
    out: list[int] = []
    sent = 0
    res.finish_reason = "length"
    with torch.inference_mode():
        for _ in range(max_tokens):
            if cancel is not None and cancel.is_set():
                res.finish_reason = "cancelled"
                return
            logits = m.model(input_ids=x, past_key_values=cache, use_cache=True).logits[0, -1].float()
            if temperature == 0:
                nxt = int(torch.argmax(logits))
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                if top_p < 1.0:
                    sp, si = torch.sort(probs, descending=True)
                    keep = torch.cumsum(sp, 0) - sp < top_p  # the smallest prefix whose mass reaches top_p
                    sp = sp * keep
                    nxt = int(si[torch.multinomial(sp / sp.sum(), 1, generator=gen)])
                else:
                    nxt = int(torch.multinomial(probs, 1, generator=gen))
            if nxt in m.eos_ids:
                res.completion_tokens = len(out) + 1
                res.finish_reason = "stop"
                break
            out.append(nxt)
            res.completion_tokens = len(out)
            text = m.tok.decode(out, skip_special_tokens=True)
            cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                if cut > sent:
                    yield text[sent:cut]
                res.finish_reason = "stop"
                return
            safe = len(text) - _held_back(text, stops)
            if safe > sent:
                yield text[sent:safe]
                sent = safe
            x = torch.tensor([[nxt]], dtype=torch.long)
    text = m.tok.decode(out, skip_special_tokens=True).rstrip("\ufffd")
    if len(text) > sent:
        yield text[sent:]


# ------------------------------------------------------------------------------------- request schemas

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class _Sampling(_Strict):
    model: str = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator("n")
    @classmethod
    def _n(cls, v):
        if v not in (None, 1):
            raise ValueError("only n=1 is supported; send several requests for several completions")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, list):
            if len(v) > 4:
                raise ValueError("at most 4 stop sequences")
            if any(not s for s in v):
                raise ValueError("stop sequences must not be empty")
        elif v == "":
            raise ValueError("stop sequence must not be empty")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _pen(cls, v):
        if v not in (None, 0, 0.0):
            raise ValueError("penalties are not supported; leave it at 0")
        return v

    # OpenAI fields this server does not implement: a request that sets one gets a 400 naming it
    @field_validator("logit_bias", "logprobs", "top_logprobs", "echo", "suffix", check_fields=False)
    @classmethod
    def _unsupported(cls, v, info):
        if v:
            raise ValueError(f"{info.field_name} is not supported")
        return v

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatRequest(_Sampling):
    messages: list[Message] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict | None = None

    @field_validator("response_format")
    @classmethod
    def _rf(cls, v):
        if v and v.get("type") != "text":
            raise ValueError("only response_format {\"type\": \"text\"} is supported")
        return v


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] = Field(...)
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt must not be empty")
            if isinstance(v[0], str) and len(v) != 1:
                raise ValueError("give one prompt per request (a list of several is not supported)")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v):
        if v not in (None, 1):
            raise ValueError("only best_of=1 is supported")
        return v


# ----------------------------------------------------------------------------------------------- errors

class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "dict", "list"}


def _validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """pydantic errors -> one OpenAI-style message naming each bad field once, and the first field's name."""
    parts, params = [], []
    for e in errors:
        # the location holds field names and list indexes, plus, inside unions, the member type's name
        # (prompt.str, prompt.list[int].0): leave those out
        loc = [str(x) for x in e.get("loc", ()) if x != "body" and str(x) not in _TYPE_TAGS
               and "[" not in str(x) and "(" not in str(x)]
        param = ".".join(loc) or None
        if param in params:
            continue
        params.append(param)
        msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
        if e.get("type") == "extra_forbidden":
            msg = "unrecognized request argument (not supported by this server)"
        if e.get("type") == "json_invalid":
            msg, param = "the request body is not valid JSON", None
        parts.append(f"{param}: {msg}" if param else msg)
    return "; ".join(parts[:5]), next((p for p in params if p), None)


# ------------------------------------------------------------------------------------------------ slots

class Busy(Exception):
    pass


class Slots:
    """At most `n` generations at once and `max_queue` waiting; the rest are refused at once (429)."""

    def __init__(self, n: int, max_queue: int, timeout: float):
        self.n, self.max_queue, self.timeout = n, max_queue, timeout
        self.sem: asyncio.Semaphore | None = None
        self.waiting = 0
        self.running = 0

    async def acquire(self) -> None:
        if self.sem is None:
            self.sem = asyncio.Semaphore(self.n)
        if self.sem.locked() and self.waiting >= self.max_queue:
            raise Busy(f"{self.running} generations running and {self.waiting} waiting (max_queue "
                       f"{self.max_queue})")
        self.waiting += 1
        try:
            await asyncio.wait_for(self.sem.acquire(), self.timeout)
        except TimeoutError:
            raise Busy(f"no generation slot within {self.timeout:g} s") from None
        finally:
            self.waiting -= 1
        self.running += 1

    def release(self) -> None:
        self.running -= 1
        assert self.sem is not None
        self.sem.release()


async def _in_thread(work, pool) -> AsyncIterator[str]:
    """Run the generator function `work(cancel)` on the thread pool, yielding its items here as they come;
    closing this iterator (client gone) sets `cancel` so that the thread stops at the next token.

    A pool of long-lived threads, not a thread per request: on the demo model a fresh thread per request
    added ~0.4 s to every request (torch's per-thread set-up), 470-930 ms for 8-64 tokens against 36-165 ms
    with reused threads (/tmp/serve-dev/lat.py, 2 cores)."""
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()

    def put(item):
        try:
            loop.call_soon_threadsafe(q.put_nowait, item)
        except RuntimeError:  # the event loop has closed: nobody is listening any more
            cancel.set()

    def run():
        try:
            for piece in work(cancel):
                put(("piece", piece))
            put(("end", None))
        except BaseException as e:  # noqa: BLE001 - handed to the request, which answers with an error
            put(("error", e))

    pool.submit(run)
    try:
        while True:
            kind, value = await q.get()
            if kind == "piece":
                yield value
            elif kind == "end":
                return
            else:
                raise value
    finally:
        cancel.set()


# -------------------------------------------------------------------------------------------------- app

class Server:
    """The loaded models, the router and the limits; create_app wires it to FastAPI routes."""

    def __init__(self, cfg: Config, log=None):
        from slmforge.console import info

        self.cfg = cfg
        self.log = log or info
        if cfg.threads:
            import torch

            torch.set_num_threads(cfg.threads)
        specs = cfg.models or catalog_names(cfg.catalog)
        infos = [resolve(s, cfg.catalog) for s in specs]
        self.fallback_remote: FallbackConfig | None = None
        self.fallback_local: str | None = None
        fb = cfg.fallback
        if isinstance(fb, str):
            fb = FallbackConfig(model=fb)
        if fb is not None and fb.base_url is None:
            fi = resolve(fb.model, cfg.catalog)
            if fi["name"] not in {i["name"] for i in infos}:
                infos.append({**fi, "fallback": True})
            self.fallback_local = fi["name"]
        elif fb is not None:
            self.fallback_remote = fb
        names = [i["name"] for i in infos]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise UserError(f"models: the name(s) {', '.join(dup)} are served twice; give each model once "
                            f"(folder names must differ, or set the name in slmforge.json)")
        if "auto" in names:
            raise UserError("models: 'auto' is reserved for routing; rename that model")
        self.models: dict[str, Served] = {}
        for i in infos:
            t0 = time.perf_counter()
            self.models[i["name"]] = load_served(i, cfg.dtype)
            m = self.models[i["name"]]
            self.log(f"loaded {m.name} (domain {m.domain}, {m.params / 1e6:.2f}M params, context {m.context}, "
                     f"{cfg.dtype}, chat template: {'yes' if m.chat else 'no'}) from {m.path} in "
                     f"{time.perf_counter() - t0:.1f} s")
        self.fallback_names = {i["name"] for i in infos if i.get("fallback")}
        self.slots = Slots(cfg.max_concurrency, cfg.max_queue, cfg.queue_timeout_s)
        self.pool = ThreadPoolExecutor(cfg.max_concurrency, thread_name_prefix="slmforge-generate")
        self._warm_up()
        self.keys = {k.strip() for k in os.environ.get(cfg.api_keys_env, "").split(",") if k.strip()}
        self._setup_router()
        self.started = int(time.time())

    def _warm_up(self) -> None:
        """A short generation per model on every pool thread: the first requests of a fresh process ran up to
        10x slower per token than later ones (torch's first calls at each sequence length, per thread)."""
        barrier = threading.Barrier(self.cfg.max_concurrency)

        def warm(m: Served):
            barrier.wait(30)
            ids = m.tok("The first request warms the model up.").input_ids[: m.context // 2]
            for _ in generate(m, ids, min(32, m.context - len(ids)), 1.0, 1.0, 0, [], GenResult()):
                pass

        t0 = time.perf_counter()
        for m in self.models.values():
            for f in [self.pool.submit(warm, m) for _ in range(self.cfg.max_concurrency)]:
                f.result()
        self.log(f"warmed up {len(self.models)} model(s) on {self.cfg.max_concurrency} thread(s) in "
                 f"{time.perf_counter() - t0:.1f} s")

    # ---- routing

    def _setup_router(self) -> None:
        from slmforge.router import evaluate, make_router, read_texts

        self.by_domain: dict[str, str] = {}
        # A local fallback model is one more class when it has its own domain (e.g. general): prompts of that
        # domain, and prompts below the threshold, go to it. It comes last, so specialists win shared domains.
        ordered = sorted(self.models.values(), key=lambda m: m.name == self.fallback_local)
        for m in ordered:
            no_data = not (m.router_data and m.router_data.get("train"))
            if m.name == self.fallback_local and self.cfg.router.kind == "tfidf" and no_data:
                continue  # no domain data to learn it from: it answers only below the threshold
            if m.domain in self.by_domain:
                self.log(f"[yellow]models {self.by_domain[m.domain]} and {m.name} share domain {m.domain}; "
                         f"auto routes it to {self.by_domain[m.domain]}[/]")
                continue
            self.by_domain[m.domain] = m.name
        self.router = None
        self.router_report: dict = {"kind": None, "domains": dict(self.by_domain),
                                    "threshold": self.cfg.router.threshold,
                                    "fallback": self._fallback_name()}
        if len(self.by_domain) < 2:
            only = next(iter(self.by_domain.values()), None)
            note = f"one domain: auto = {only}"
            if self.fallback_remote or self.fallback_local:
                note += (" (the fallback is used only when routing has two or more classes: serve another "
                         "specialist, or a local fallback with domain data)")
            self.router_report["note"] = note
            self.log(f"router: {note}")
            return
        kind = self.cfg.router.kind
        served = {d: self.models[n] for d, n in self.by_domain.items()}
        if kind == "tfidf":
            missing = [m.name for m in served.values() if not (m.router_data and m.router_data.get("train"))]
            if missing:
                raise UserError(f"router.kind tfidf needs domain/train.jsonl for each model; {', '.join(missing)} "
                                f"has none (serve an export folder with slmforge.json, or pass --router bpb)")
            train = {d: read_texts(m.router_data["train"], self.cfg.router.max_docs) for d, m in served.items()}
            self.router = make_router("tfidf", train=train)
            n_eval = self.cfg.router.eval_docs
        else:
            self.router = make_router("bpb", models={d: (m.model, m.tok, m.context) for d, m in served.items()})
            n_eval = min(30, self.cfg.router.eval_docs)
        test = {}
        for d, m in served.items():
            path = (m.router_data or {}).get("test")
            if path and Path(path).is_file() and n_eval:
                test[d] = read_texts(path, n_eval)
        self.router_report["kind"] = kind
        if test:
            rep = evaluate(self.router, test)
            self.router_report.update(accuracy=rep)
            rows = ", ".join(f"{d} {r['full']:.0%} (first {PROMPT_CUT} chars {r[f'first_{PROMPT_CUT}']:.0%}, "
                             f"n={r['n']})" for d, r in rep["domains"].items())
            self.log(f"router ({kind}): held-out accuracy {rows}; {rep['ms_per_prompt']:.2f} ms per prompt")
        else:
            self.log(f"router ({kind}): no held-out documents (domain/test.jsonl) to measure accuracy on")

    def _fallback_name(self) -> str | None:
        if self.fallback_remote:
            return f"{self.fallback_remote.model} at {self.fallback_remote.base_url}"
        return self.fallback_local

    def route(self, prompt: str) -> tuple[str | None, dict]:
        """(local model name or None for the remote fallback, the `slmforge` extension record)."""
        if self.router is None:
            name = next(iter(self.by_domain.values()), None) or self.fallback_local
            return name, {"routed": True, "confidence": 1.0, "candidates": {}, "fallback": False}
        scores = self.router.scores(prompt)
        top = max(scores, key=scores.get)
        ext = {"routed": True, "router": self.router.kind, "confidence": round(scores[top], 4),
               "candidates": {self.by_domain[d]: round(p, 4) for d, p in scores.items()}, "fallback": False}
        if scores[top] < self.cfg.router.threshold and (self.fallback_remote or self.fallback_local):
            ext["fallback"] = True
            return (self.fallback_local if self.fallback_local else None), ext
        ext["fallback"] = self.by_domain[top] == self.fallback_local
        return self.by_domain[top], ext

    # ---- requests

    def check_key(self, authorization: str | None) -> None:
        if not self.keys:
            return
        key = (authorization or "").removeprefix("Bearer ").strip()
        if not any(hmac.compare_digest(key, k) for k in self.keys):  # constant time: no timing oracle
            raise ApiError(401, "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")

    def model_for(self, name: str) -> Served:
        if name not in self.models:
            raise ApiError(404, f"The model '{name}' does not exist. Served: "
                           f"{', '.join(['auto', *self.models])}.", param="model", code="model_not_found")
        return self.models[name]

    def chat_ids(self, m: Served, req: ChatRequest) -> list[int]:
        if not m.chat:
            raise ApiError(400, f"model '{m.name}' has no chat template; use /v1/completions with it",
                           param="model", code="chat_not_supported")
        msgs = [{"role": "system" if x.role == "developer" else x.role, "content": x.text()} for x in req.messages]
        try:
            text = m.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # noqa: BLE001 - a template may raise on roles it does not support
            raise ApiError(400, f"model '{m.name}': its chat template rejected the messages ({e})",
                           param="messages") from None
        return m.tok(text, add_special_tokens=False).input_ids

    def completion_ids(self, m: Served, req: CompletionRequest) -> list[int]:
        p = req.prompt
        if isinstance(p, list) and p and isinstance(p[0], int):
            bad = [t for t in p if not 0 <= t < len(m.tok)]
            if bad:
                raise ApiError(400, f"prompt: token id {bad[0]} is outside the vocabulary of '{m.name}' "
                               f"(0..{len(m.tok) - 1})", param="prompt")
            return list(p)
        text = p[0] if isinstance(p, list) else p
        return m.tok(text).input_ids

    def budget(self, m: Served, ids: list[int], req: _Sampling) -> int:
        asked = getattr(req, "max_completion_tokens", None) or req.max_tokens
        if len(ids) >= m.context:
            raise ApiError(400, f"This model's maximum context length is {m.context} tokens; the prompt has "
                           f"{len(ids)} tokens. Shorten the prompt.", param="messages" if isinstance(
                               req, ChatRequest) else "prompt", code="context_length_exceeded")
        if asked is None:
            return min(self.cfg.max_tokens, m.context - len(ids))
        if len(ids) + asked > m.context:
            raise ApiError(400, f"This model's maximum context length is {m.context} tokens. However, you "
                           f"requested {len(ids) + asked} tokens ({len(ids)} in the prompt, {asked} for the "
                           f"completion). Reduce the prompt or max_tokens.", param="max_tokens",
                           code="context_length_exceeded")
        return asked


def _prompt_text(req) -> str:
    if isinstance(req, ChatRequest):
        users = [m.text() for m in req.messages if m.role == "user"]
        return users[-1] if users else req.messages[-1].text()
    p = req.prompt
    return p[0] if isinstance(p, list) and p and isinstance(p[0], str) else (p if isinstance(p, str) else "")


def create_app(cfg: Config, log=None):
    """The FastAPI app serving cfg's models (loads them and trains the router now)."""
    from importlib.resources import files

    import httpx
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

    srv = Server(cfg, log)
    app = FastAPI(title="slmforge", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = srv
    page = files("slmforge").joinpath("templates/chat.html").read_text(encoding="utf-8")
    page = page.replace("__NEEDS_KEY__", "true" if srv.keys else "false")

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        msg, param = _validation_message(e.errors())
        return JSONResponse(ApiError(400, msg, param=param).body(), status_code=400)

    @app.exception_handler(Exception)
    async def _crash(request, e: Exception):  # never a bare 500 page: the OpenAI error shape, and the server stays up
        return JSONResponse(ApiError(500, f"internal error: {type(e).__name__}: {e}", type_="server_error").body(),
                            status_code=500)

    @app.exception_handler(404)
    async def _not_found(request, e):
        return JSONResponse(ApiError(404, f"no route {request.method} {request.url.path}", code="not_found").body(),
                            status_code=404)

    async def parse(request: Request, schema):
        srv.check_key(request.headers.get("authorization"))
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "We could not parse the JSON body of your request. Send valid JSON.") from None
        if not isinstance(body, dict):
            raise ApiError(400, "The request body must be a JSON object.")
        try:
            return body, schema.model_validate(body)
        except ValidationError as e:
            msg, param = _validation_message(e.errors())
            raise ApiError(400, msg, param=param) from None

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": srv.slots.running, "waiting": srv.slots.waiting}

    @app.get("/v1/models")
    async def list_models(request: Request):
        srv.check_key(request.headers.get("authorization"))
        data = [{"id": "auto", "object": "model", "created": srv.started, "owned_by": "slmforge",
                 "slmforge": {"router": srv.router_report.get("kind"), "domains": srv.by_domain}}]
        for m in srv.models.values():
            data.append({"id": m.name, "object": "model", "created": srv.started, "owned_by": "slmforge",
                         "slmforge": {"domain": m.domain, "context": m.context, "chat": m.chat,
                                      "params": m.params, "fallback": m.name in srv.fallback_names,
                                      "description": m.description}})
        return {"object": "list", "data": data}

    @app.get("/v1/models/{name}")
    async def get_model(name: str, request: Request):
        srv.check_key(request.headers.get("authorization"))
        m = srv.model_for(name)
        return {"id": m.name, "object": "model", "created": srv.started, "owned_by": "slmforge"}

    @app.get("/v1/router")
    async def router_report(request: Request):
        srv.check_key(request.headers.get("authorization"))
        return srv.router_report

    async def handle(request: Request, schema, chat: bool):
        body, req = await parse(request, schema)
        ext = {"routed": False, "fallback": False}
        name = req.model
        if name == "auto":
            name, ext = srv.route(_prompt_text(req))
            if name is None:
                return await forward(body, chat, ext)
        m = srv.model_for(name)
        ids = srv.chat_ids(m, req) if chat else srv.completion_ids(m, req)
        max_tokens = srv.budget(m, ids, req)
        temperature = 1.0 if req.temperature is None else req.temperature
        top_p = 1.0 if req.top_p is None else req.top_p
        try:
            await srv.slots.acquire()
        except Busy as e:
            raise ApiError(429, f"The server is busy: {e}. Retry shortly.", code="rate_limit_exceeded",
                           type_="rate_limit_error", headers={"Retry-After": "1"}) from None
        res = GenResult()
        stops = req.stops()

        def work(cancel):
            return generate(m, ids, max_tokens, temperature, top_p, req.seed, stops, res, cancel)

        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        headers = {"x-slmforge-model": m.name}
        usage = (lambda: {"prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens,
                          "total_tokens": res.prompt_tokens + res.completion_tokens})
        if not req.stream:
            try:
                text = "".join([p async for p in _in_thread(work, srv.pool)])
            finally:
                srv.slots.release()
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                       "finish_reason": res.finish_reason} if chat else
                      {"index": 0, "text": text, "logprobs": None, "finish_reason": res.finish_reason})
            return JSONResponse({"id": rid, "object": obj, "created": created, "model": m.name,
                                 "choices": [choice], "usage": usage(), "system_fingerprint": None,
                                 "slmforge": ext}, headers=headers)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(delta: str | None, finish: str | None = None, first: bool = False) -> str:
            if chat:
                d = {} if delta is None else ({"role": "assistant", "content": delta} if first else
                                              {"content": delta})
                c = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
            else:
                c = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
            body = {"id": rid, "object": obj + (".chunk" if chat else ""), "created": created, "model": m.name,
                    "choices": [c], "system_fingerprint": None, "slmforge": ext}
            if include_usage:
                body["usage"] = None
            return f"data: {json.dumps(body)}\n\n"

        async def events():
            try:
                if chat:
                    yield chunk("", first=True)
                async for piece in _in_thread(work, srv.pool):
                    yield chunk(piece)
                yield chunk(None, res.finish_reason)
                if include_usage:
                    body = {"id": rid, "object": obj + (".chunk" if chat else ""), "created": created,
                            "model": m.name, "choices": [], "usage": usage(), "system_fingerprint": None}
                    yield f"data: {json.dumps(body)}\n\n"
                yield "data: [DONE]\n\n"
            except Exception as e:  # noqa: BLE001 - headers are sent; report it in the stream as OpenAI does
                yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error'}})}\n\n"
            finally:
                srv.slots.release()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={**headers, "Cache-Control": "no-cache"})

    async def forward(body: dict, chat: bool, ext: dict):
        fb = srv.fallback_remote
        assert fb is not None
        url = f"{fb.base_url}/{'chat/completions' if chat else 'completions'}"
        key = os.environ.get(fb.api_key_env, "") if fb.api_key_env else ""
        hdrs = {"Authorization": f"Bearer {key}"} if key else {}
        body = {**body, "model": fb.model}
        ext = {**ext, "endpoint": fb.base_url}
        headers = {"x-slmforge-model": fb.model}
        client = httpx.AsyncClient(timeout=cfg.fallback_timeout_s)
        try:
            if not body.get("stream"):
                r = await client.post(url, json=body, headers=hdrs)
                await client.aclose()
                try:
                    data = r.json()
                except ValueError:
                    raise ApiError(502, f"fallback {url} answered {r.status_code} with no JSON body",
                                   type_="server_error", code="fallback_error") from None
                if isinstance(data, dict) and r.status_code == 200:
                    data["slmforge"] = ext
                return JSONResponse(data, status_code=r.status_code, headers=headers)
            req = client.build_request("POST", url, json=body, headers=hdrs)
            r = await client.send(req, stream=True)
        except httpx.HTTPError as e:
            await client.aclose()
            raise ApiError(502, f"fallback {url} failed: {e}", type_="server_error", code="fallback_error") from None
        if r.status_code != 200:
            content = await r.aread()
            await r.aclose()
            await client.aclose()
            return JSONResponse(json.loads(content or b"{}"), status_code=r.status_code, headers=headers)

        async def passthrough():
            try:
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        try:
                            data = json.loads(line[6:])
                            if isinstance(data, dict) and "choices" in data:
                                data["slmforge"] = ext
                            line = "data: " + json.dumps(data)
                        except json.JSONDecodeError:
                            pass
                    yield line + "\n"
            finally:
                await r.aclose()
                await client.aclose()

        return StreamingResponse(passthrough(), media_type="text/event-stream",
                                 headers={**headers, "Cache-Control": "no-cache"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, ChatRequest, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, CompletionRequest, chat=False)

    return app


# ---------------------------------------------------------------------------------------------------- CLI

def _recipe_section(path: str) -> dict:
    """The recipe's `serve:` section, validated with the whole recipe (paths relative to the recipe file)."""
    from slmforge.config import load_recipe

    cfg = load_recipe(path).services.get("serve")
    return cfg.model_dump(exclude_unset=True) if cfg is not None else {}


def build_config(section: dict) -> Config:
    from slmforge.config import format_errors

    try:
        return Config(**section)
    except ValidationError as e:
        raise UserError("; ".join(format_errors("serve", e))) from None


def cli_main(argv: list[str] | None = None) -> int:
    """`slmforge serve`: load the models, train the router, print the URL and serve until Ctrl-C."""
    p = argparse.ArgumentParser(
        prog="slmforge serve",
        description="Serve models over an OpenAI-compatible API (/v1/chat/completions, /v1/completions, "
                    "/v1/models) with a chat page at /. model \"auto\" routes each prompt to a specialist.",
        epilog="example: slmforge serve --model runs/demo/export/<key>/demo-dpo --port 8000",
    )
    p.add_argument("--recipe", help="read settings from this recipe's serve: section (flags override it)")
    p.add_argument("--catalog", help="catalog database (default $SLMFORGE_CATALOG or ~/.slmforge/catalog.db)")
    p.add_argument("--model", dest="models", action="append", metavar="NAME_OR_PATH",
                   help="a catalog name or a model folder (repeatable; default: the whole catalog)")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="TCP port (default 8000)")
    p.add_argument("--fallback-url", help="OpenAI-compatible endpoint for low-confidence auto requests")
    p.add_argument("--fallback-model", help="model name at --fallback-url, or a catalog name/folder to load")
    p.add_argument("--fallback-key-env", help="environment variable holding the fallback endpoint's key")
    p.add_argument("--threshold", type=float, help="routing probability below which the fallback answers")
    p.add_argument("--router", choices=KINDS, help=f"router kind (default {DEFAULT_KIND})")
    p.add_argument("--max-concurrency", type=int, help="generations at once (default 2)")
    p.add_argument("--max-queue", type=int, help="requests waiting for a slot before 429s (default 32)")
    p.add_argument("--max-tokens", type=int, help="completion length when a request gives none (default 128)")
    p.add_argument("--dtype", choices=DTYPES, help=f"weights in memory (default {DEFAULT_DTYPE})")
    p.add_argument("--api-keys-env", help="env var with comma-separated API keys (default SLMFORGE_API_KEYS)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    try:
        section = _recipe_section(args.recipe) if args.recipe else {}
        for key in ("catalog", "models", "host", "port", "max_concurrency", "max_queue", "max_tokens", "dtype",
                    "api_keys_env", "threads"):
            if getattr(args, key) is not None:
                section[key] = getattr(args, key)
        router = dict(section.get("router") or {})
        if args.threshold is not None:
            router["threshold"] = args.threshold
        if args.router:
            router["kind"] = args.router
        if router:
            section["router"] = router
        if args.fallback_url or args.fallback_model:
            if not args.fallback_model:
                raise UserError("--fallback-url needs --fallback-model (the model name at that endpoint)")
            section["fallback"] = {"base_url": args.fallback_url, "model": args.fallback_model,
                                   "api_key_env": args.fallback_key_env}
        cfg = build_config(section)
        app = create_app(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import uvicorn

    from slmforge.console import info

    srv = app.state.server
    info(f"serving {', '.join(srv.models)} (+ auto) at http://{cfg.host}:{cfg.port}/v1 ; chat page "
         f"http://{cfg.host}:{cfg.port}/ ; API keys {'required' if srv.keys else 'off'}")
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info", timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
