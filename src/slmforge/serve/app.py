"""The FastAPI app: route functions at module level over the `Server` in `app.state.server`, the OpenAI
response and stream bodies, the pass-through to a fallback endpoint, and `create_app`, which loads the
models and registers the routes and the error handlers."""

import json
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from importlib.resources import files

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from slmforge.serve import knowledge
from slmforge.serve.config import Config, FallbackConfig
from slmforge.serve.decode import GenResult, Sequence
from slmforge.serve.limits import in_batch, take_slot
from slmforge.serve.schemas import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    Message,
    prompt_text,
    validation_message,
)
from slmforge.serve.server import Server
from slmforge.serve.structured import Grammar, grammar_for

SSE = {"media_type": "text/event-stream"}


def _server(request: Request) -> Server:
    return request.app.state.server


# ------------------------------------------------------------------------------------------ error handlers

async def api_error(request: Request, e: ApiError):
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def invalid_request(request: Request, e: RequestValidationError):
    msg, param = validation_message(e.errors())
    return JSONResponse(ApiError(400, msg, param=param).body(), status_code=400)


async def crash(request: Request, e: Exception):  # never a bare 500 page: the OpenAI error shape, and the server stays up
    return JSONResponse(ApiError(500, f"internal error: {type(e).__name__}: {e}", type_="server_error").body(),
                        status_code=500)


async def not_found(request: Request, e):
    return JSONResponse(ApiError(404, f"no route {request.method} {request.url.path}", code="not_found").body(),
                        status_code=404)


# ----------------------------------------------------------------------------------------------- routes

async def index(request: Request):
    return request.app.state.page


async def health(request: Request):
    srv = _server(request)
    return {"status": "ok", "running": srv.slots.running, "waiting": srv.slots.waiting}


async def list_models(request: Request):
    srv = _server(request)
    srv.check_key(request.headers.get("authorization"))
    data = [{"id": "auto", "object": "model", "created": srv.started, "owned_by": "slmforge",
             "slmforge": {"router": srv.router_report.get("kind"), "domains": srv.by_domain}}]
    for m in srv.models.values():
        data.append({"id": m.name, "object": "model", "created": srv.started, "owned_by": "slmforge",
                     # chat: post-trained to chat, as the catalog says; chat_template: /v1/chat/completions
                     # can format messages for it (a base model with one answers, as a continuation)
                     "slmforge": {"domain": m.domain, "context": m.context, "chat": m.chat_tuned,
                                  "chat_template": m.chat,
                                  "params": m.params, "fallback": m.name in srv.fallback_names,
                                  "endpoint": m.endpoint["base_url"] if m.endpoint else None,
                                  "description": m.description}})
    return {"object": "list", "data": data}


async def get_model(name: str, request: Request):
    srv = _server(request)
    srv.check_key(request.headers.get("authorization"))
    m = srv.model_for(name)
    return {"id": m.name, "object": "model", "created": srv.started, "owned_by": "slmforge"}


async def router_report(request: Request):
    srv = _server(request)
    srv.check_key(request.headers.get("authorization"))
    return srv.router_report


async def chat_completions(request: Request):
    return await handle(request, ChatRequest, chat=True)


async def completions(request: Request):
    return await handle(request, CompletionRequest, chat=False)


ROUTES = (("GET", "/", index), ("GET", "/health", health), ("GET", "/v1/models", list_models),
          ("GET", "/v1/models/{name}", get_model), ("GET", "/v1/router", router_report),
          ("POST", "/v1/chat/completions", chat_completions), ("POST", "/v1/completions", completions))


# ----------------------------------------------------------------------------------------- completions

async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes (by its Content-Length, or while
    it streams in), so that a huge body is never held or parsed."""
    from starlette.requests import ClientDisconnect

    too_big = ApiError(413, f"The request body is larger than this server's limit of {limit // 1024} KB "
                            "(serve.max_body_kb).", code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_big
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
    except ClientDisconnect:  # the client hung up mid-upload: nobody is left to answer, and nothing to log
        raise ApiError(400, "The client disconnected before the request body was complete.") from None
    return b"".join(chunks)


def _unicode_problem(value, path: str = "") -> str | None:
    """The first string in a parsed JSON value that is not valid Unicode (a lone UTF-16 surrogate such as
    "\\ud800", which JSON can spell but UTF-8 cannot encode), as its parameter path (messages.0.content)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
    elif isinstance(value, dict):
        for k, v in value.items():
            if (p := _unicode_problem(k, path) or _unicode_problem(v, f"{path}.{k}" if path else str(k))):
                return p
    elif isinstance(value, list):
        for i, v in enumerate(value):
            if (p := _unicode_problem(v, f"{path}.{i}")):
                return p
    return None


def _decode(raw: bytes, schema):
    """(body, validated request) from the raw bytes; runs in a worker thread, off the event loop."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise ApiError(400, "We could not parse the JSON body of your request. Send valid JSON.") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    try:
        param = _unicode_problem(body)
    except RecursionError:  # nested nearly as deep as json allows
        raise ApiError(400, "The request body is nested too deeply.") from None
    if param is not None:
        raise ApiError(400, f"{param}: the text is not valid Unicode (a lone UTF-16 surrogate); send UTF-8 text.",
                       param=param)
    try:
        return body, schema.model_validate(body)
    except ValidationError as e:
        msg, param = validation_message(e.errors())
        raise ApiError(400, msg, param=param) from None


async def parse(srv: Server, request: Request, schema):
    """(the JSON body, the body validated with `schema`), after the API key check and the size cap; parsed
    and validated in a worker thread, so that a large body does not stall other clients; 4xx with
    OpenAI's shape."""
    srv.check_key(request.headers.get("authorization"))
    raw = await read_body(request, srv.cfg.max_body_kb * 1024)
    return await run_in_threadpool(_decode, raw, schema)


@dataclass
class Reply:
    """One completion's identity, and the bodies (whole, or stream chunks) that carry it."""

    chat: bool
    model: str
    ext: dict
    include_usage: bool = False
    res: GenResult = field(default_factory=GenResult)
    id: str = field(init=False)
    created: int = field(init=False)

    def __post_init__(self):
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def usage(self) -> dict:
        res = self.res
        return {"prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens,
                "total_tokens": res.prompt_tokens + res.completion_tokens}

    def body(self, text: str) -> dict:
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                   "finish_reason": self.res.finish_reason} if self.chat else
                  {"index": 0, "text": text, "logprobs": None, "finish_reason": self.res.finish_reason})
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": [choice], "usage": self.usage(), "system_fingerprint": None, "slmforge": self.ext}

    def chunk(self, delta: str | None, finish: str | None = None, first: bool = False) -> str:
        if self.chat:
            d = {} if delta is None else ({"role": "assistant", "content": delta} if first else {"content": delta})
            c = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
        else:
            c = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
        body = {"id": self.id, "object": self.object + (".chunk" if self.chat else ""), "created": self.created,
                "model": self.model, "choices": [c], "system_fingerprint": None, "slmforge": self.ext}
        if self.include_usage:
            body["usage"] = None
        return f"data: {json.dumps(body)}\n\n"

    def usage_chunk(self) -> str:
        body = {"id": self.id, "object": self.object + (".chunk" if self.chat else ""), "created": self.created,
                "model": self.model, "choices": [], "usage": self.usage(), "system_fingerprint": None}
        return f"data: {json.dumps(body)}\n\n"


async def handle(request: Request, schema, chat: bool):
    """A completion: route `auto`, check the prompt against the model, take a slot, generate (or stream).
    In knowledge mode the specialist's passage is written first and the generalist answers with it."""
    srv = _server(request)
    body, req = await parse(srv, request, schema)
    kplan = knowledge.plan(srv, req.model, req.slmforge) if chat else None
    # a bad schema is refused before any model runs (knowledge mode's passage included)
    compiled = await run_in_threadpool(grammar_for, req.response_format) if chat and req.response_format else None
    know = None
    if kplan is not None:
        know = await write_passage(srv, req, kplan)
        messages = knowledge.with_background([x.model_dump(exclude_none=True) for x in req.messages],
                                             know["specialist"], know["domain"], know["passage"])
        body = {**{k: v for k, v in body.items() if k != "slmforge"}, "messages": messages}
        req = req.model_copy(update={"messages": [Message.model_validate(x) for x in messages]})

    def prepare():
        """Routing and tokenizing cost time on a long prompt: in a worker thread, not on the event loop."""
        ext = {"routed": False, "fallback": False}
        name = req.model
        if kplan is not None:
            name = kplan.generalist
            ext = {"routed": False, "fallback": name is None or name == srv.fallback_local, "knowledge": know}
            if name is None:
                return None, ext, None, None, None
        elif name == "auto":
            name, ext = srv.route(prompt_text(req), chat=chat)
            if name is None:
                return None, ext, None, None, None
        m = srv.model_for(name)
        ids = srv.chat_ids(m, req) if chat else srv.completion_ids(m, req)
        budget = srv.budget(m, ids, req)
        grammar = Grammar(srv.tokenizers.get(m), compiled) if compiled and m.model is not None else None
        return m, ext, ids, budget, grammar

    m, ext, ids, max_tokens, grammar = await run_in_threadpool(prepare)
    if m is None:
        return await forward(srv, body, chat, ext)
    if m.endpoint:  # a catalog endpoint (vLLM, llama.cpp): it generates, structured outputs included
        return await forward(srv, body, chat, ext, FallbackConfig(**m.endpoint))
    temperature = 1.0 if req.temperature is None else req.temperature
    top_p = 1.0 if req.top_p is None else req.top_p
    await take_slot(srv.slots)
    reply = Reply(chat=chat, model=m.name, ext=ext,
                  include_usage=bool(req.stream_options and req.stream_options.include_usage))
    stops = req.stops()

    seq = Sequence(m, ids, max_tokens, temperature, top_p, req.seed, stops, reply.res, grammar)
    batcher = srv.batchers[m.name]

    headers = {"x-slmforge-model": m.name}
    if not req.stream:
        try:
            text = "".join([p async for p in in_batch(batcher, seq)])
        finally:
            srv.slots.release()
        return JSONResponse(reply.body(text), headers=headers)
    return StreamingResponse(events(srv, reply, batcher, seq), **SSE, headers={**headers, "Cache-Control": "no-cache"})


async def write_passage(srv: Server, req: ChatRequest, kplan: knowledge.Plan) -> dict:
    """Knowledge mode's first step: the specialist's greedy passage about the question (in a slot)."""
    question = prompt_text(req)

    def prepare():
        name = kplan.specialist or srv.specialist_for(question)
        m = srv.model_for(name)
        if m.model is None:
            raise ApiError(400, f"knowledge mode: the specialist '{m.name}' is served by an endpoint; name a "
                           "local specialist as '<generalist>+<specialist>'", param="model")
        ids = knowledge.passage_ids(srv, m, question)
        tokens = min(kplan.passage_tokens, m.context // 2)
        return m, ids[-(m.context - tokens):], tokens  # a long question keeps its end

    m, ids, tokens = await run_in_threadpool(prepare)
    res = GenResult()
    await take_slot(srv.slots)
    try:
        seq = Sequence(m, ids, tokens, 0.0, 1.0, None, [], res)
        passage = "".join([p async for p in in_batch(srv.batchers[m.name], seq)])
    finally:
        srv.slots.release()
    return {"specialist": m.name, "domain": m.domain, "passage": passage, "passage_tokens": res.completion_tokens}


async def events(srv: Server, reply: Reply, batcher, seq):
    """The server-sent events of a streamed completion; the slot is released when the stream ends."""
    try:
        if reply.chat:
            yield reply.chunk("", first=True)
        async for piece in in_batch(batcher, seq):
            yield reply.chunk(piece)
        yield reply.chunk(None, reply.res.finish_reason)
        if reply.include_usage:
            yield reply.usage_chunk()
        yield "data: [DONE]\n\n"
    except Exception as e:  # noqa: BLE001 - headers are sent; report it in the stream as OpenAI does
        yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error'}})}\n\n"
    finally:
        srv.slots.release()


# -------------------------------------------------------------------------------------------- fallback

async def forward(srv: Server, body: dict, chat: bool, ext: dict, fb: FallbackConfig | None = None):
    """The request, with the endpoint's model name, to `fb` (default: the fallback endpoint); its answer (or
    stream) back, with the `slmforge` extension record added."""
    fb = fb or srv.fallback_remote
    assert fb is not None
    url = f"{fb.base_url}/{'chat/completions' if chat else 'completions'}"
    key = os.environ.get(fb.api_key_env, "") if fb.api_key_env else ""
    hdrs = {"Authorization": f"Bearer {key}"} if key else {}
    body = {**body, "model": fb.model}
    ext = {**ext, "endpoint": fb.base_url}
    headers = {"x-slmforge-model": fb.model}
    client = httpx.AsyncClient(timeout=srv.cfg.fallback_timeout_s)
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
    return StreamingResponse(passthrough(r, client, ext), **SSE, headers={**headers, "Cache-Control": "no-cache"})


async def passthrough(r: httpx.Response, client: httpx.AsyncClient, ext: dict):
    """The fallback's event stream, line by line, each chunk with the `slmforge` record added."""
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


# ---------------------------------------------------------------------------------------------------- app

def chat_page(keys: bool) -> str:
    """The chat page; its API-key field only when the server asks for keys."""
    page = files("slmforge").joinpath("templates/chat.html").read_text(encoding="utf-8")
    return page.replace("<!--KEYROW-->", "").replace("<!--/KEYROW-->", "") if keys else \
        re.sub(r"<!--KEYROW-->.*?<!--/KEYROW-->\n?", "", page, flags=re.DOTALL)


def create_app(cfg: Config, log=None) -> FastAPI:
    """The FastAPI app serving cfg's models (loads them and trains the router now)."""
    srv = Server(cfg, log)
    app = FastAPI(title="slmforge", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = srv
    app.state.page = chat_page(bool(srv.keys))
    for exc, handler in ((ApiError, api_error), (RequestValidationError, invalid_request), (Exception, crash),
                         (404, not_found)):
        app.add_exception_handler(exc, handler)
    for method, path, endpoint in ROUTES:
        extra = {"response_class": HTMLResponse} if endpoint is index else {}
        app.add_api_route(path, endpoint, methods=[method], **extra)
    return app
