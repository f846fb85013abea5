"""Knowledge mode (BLADE, CooK): the specialist as a knowledge source for a generalist.

For a chat request with `slmforge: {knowledge: true}`, or to a model named `<generalist>+<specialist>`,
the specialist first writes a short passage about the question (greedy, `passage_tokens` tokens), and the
generalist answers with that passage in its system prompt. The generalist is the fallback (a remote
endpoint or a local model), or the model named before the "+"; the specialist is the router's choice for
the question, or the model named after the "+" ("auto" = routed). The response's `slmforge.knowledge`
records the specialist, its passage and the generalist that answered."""

from __future__ import annotations

from dataclasses import dataclass

from slmforge.serve.schemas import ApiError

PASSAGE_TOKENS = 96
# what the generalist reads before the conversation; BLADE puts the small model's knowledge in the prompt
# the same way, as background the large model may use or ignore
BACKGROUND = "Background from {specialist}, a {domain} specialist (it may err):\n{passage}"


@dataclass
class Plan:
    specialist: str | None  # a local model name; None = the router picks one
    generalist: str | None  # a local model name; None = the remote fallback endpoint
    passage_tokens: int = PASSAGE_TOKENS


def plan(srv, model: str, options: dict | None) -> Plan | None:
    """The knowledge plan of a request (None: an ordinary request); ApiError 400/404 naming the field."""
    options = options or {}
    unknown = sorted(set(options) - {"knowledge", "passage_tokens"})
    if unknown:
        raise ApiError(400, f"slmforge.{unknown[0]}: unknown option; use knowledge, passage_tokens",
                       param=f"slmforge.{unknown[0]}")
    tokens = options.get("passage_tokens", PASSAGE_TOKENS)
    if not isinstance(tokens, int) or isinstance(tokens, bool) or not 1 <= tokens <= 512:
        raise ApiError(400, "slmforge.passage_tokens must be an integer from 1 to 512",
                       param="slmforge.passage_tokens")
    if "+" in model:
        gen, _, spec = model.partition("+")
        return Plan(_specialist(srv, spec), _generalist(srv, gen), tokens)
    if not options.get("knowledge"):
        return None
    if srv.fallback_remote is None and srv.fallback_local is None:
        raise ApiError(400, "slmforge.knowledge needs a generalist: configure serve.fallback, or name one as "
                       "model '<generalist>+<specialist>'", param="slmforge.knowledge")
    spec = None if model == "auto" or model == srv.fallback_local else _specialist(srv, model)
    return Plan(spec, srv.fallback_local, tokens)


def _specialist(srv, name: str) -> str | None:
    if name == "auto":
        return None
    if name not in srv.models:
        raise ApiError(404, f"model: the specialist '{name}' is not served; served: {', '.join(srv.models)}",
                       param="model", code="model_not_found")
    return name


def _generalist(srv, name: str) -> str | None:
    if name in srv.models:
        return name
    if srv.fallback_remote is not None and name in (srv.fallback_remote.model, "fallback"):
        return None
    remote = f", or '{srv.fallback_remote.model}' (the fallback endpoint)" if srv.fallback_remote else ""
    raise ApiError(404, f"model: the generalist '{name}' is neither served here ({', '.join(srv.models)})"
                   f"{remote}", param="model", code="model_not_found")


def passage_ids(srv, m, question: str) -> list[int]:
    """The specialist's prompt: the question in its chat template when it was post-trained to chat, else
    the question as text to continue (a pretrained specialist writes on from it)."""
    if m.chat_tuned and m.chat:
        return srv.template_ids(m, [{"role": "user", "content": question}])
    return m.tok(question.rstrip() + "\n").input_ids


def with_background(messages: list[dict], specialist: str, domain: str, passage: str) -> list[dict]:
    """The conversation with the passage as (or before) its system message."""
    note = BACKGROUND.format(specialist=specialist, domain=domain, passage=passage.strip())
    if messages and messages[0].get("role") in ("system", "developer"):
        first = messages[0]
        content = first.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return [{"role": first["role"], "content": f"{content}\n\n{note}"}, *messages[1:]]
    return [{"role": "system", "content": note}, *messages]
