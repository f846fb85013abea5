"""The OpenAI wire format: request bodies (pydantic, unknown fields rejected, unsupported options refused
by name) and the error bodies every failure answers with."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


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


class Sampling(_Strict):
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


class ChatRequest(Sampling):
    messages: list[Message] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict | None = None
    slmforge: dict | None = None  # our extension: {knowledge: true, passage_tokens: N} (slmforge.serve.knowledge)

    @field_validator("response_format")
    @classmethod
    def _rf(cls, v):
        if v and v.get("type") not in ("text", "json_object", "json_schema"):
            raise ValueError(f"response_format.type {v.get('type')!r}: use 'text', 'json_object' or 'json_schema'")
        return v


class CompletionRequest(Sampling):
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


def prompt_text(req: ChatRequest | CompletionRequest) -> str:
    """What the router reads: the last user message, or the prompt."""
    if isinstance(req, ChatRequest):
        users = [m.text() for m in req.messages if m.role == "user"]
        return users[-1] if users else req.messages[-1].text()
    p = req.prompt
    return p[0] if isinstance(p, list) and p and isinstance(p[0], str) else (p if isinstance(p, str) else "")


class ApiError(Exception):
    """An OpenAI-shaped error: the HTTP status and the body {error: {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "dict", "list"}


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
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
