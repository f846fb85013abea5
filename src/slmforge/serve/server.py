"""The server's state: the loaded models, the router behind `model: "auto"`, the fallback and the checks
every request goes through (API key, model name, chat template, context length)."""

import hmac
import os
import threading
import time
from pathlib import Path

from slmforge.errors import UserError
from slmforge.hardware import auto_batch, resolve_device
from slmforge.serve.batch import Batcher
from slmforge.serve.config import Config, FallbackConfig
from slmforge.serve.decode import GenResult, Sequence
from slmforge.serve.limits import Slots
from slmforge.serve.models import Served, catalog_names, load_served, resolve
from slmforge.serve.router import PROMPT_CUT
from slmforge.serve.schemas import ApiError, ChatRequest, CompletionRequest, Sampling
from slmforge.serve.structured import Tokenizers


class Server:
    """The loaded models, the router and the limits; slmforge.serve.app wires it to FastAPI routes."""

    def __init__(self, cfg: Config, log=None):
        import torch

        from slmforge.console import info

        self.cfg = cfg
        self.log = log or info
        if cfg.threads:
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
        device = resolve_device(cfg.device, "serve.device")
        if cfg.dtype == "int8" and device != "cpu":
            raise UserError(f"serve.dtype: int8 (dynamic quantization) runs on the CPU only, and serve.device is "
                            f"{device}; use float32 or bfloat16 there, or device: cpu")
        for i in infos:
            t0 = time.perf_counter()
            self.models[i["name"]] = load_served(i, cfg.dtype, device)
            m = self.models[i["name"]]
            where = f"served by {m.endpoint['base_url']} as {m.endpoint['model']!r}" if m.endpoint else cfg.dtype
            self.log(f"loaded {m.name} (domain {m.domain}, {m.params / 1e6:.2f}M params, context {m.context}, "
                     f"{where}, chat template: {'yes' if m.chat else 'no'}) from {m.path} in "
                     f"{time.perf_counter() - t0:.1f} s")
        self.fallback_names = {i["name"] for i in infos if i.get("fallback")}
        self.concurrency = auto_batch(cfg.max_concurrency, device, 16, 64)
        self.slots = Slots(self.concurrency, cfg.max_queue, cfg.queue_timeout_s)
        self.tokenizers = Tokenizers()  # llguidance's, for structured outputs
        # each model's batch thread on its share of the cores: with the demo's two models on 2 cores, 1 torch
        # thread each beat 2 each (the two threads' OpenMP pools fighting for the cores) in
        # benchmarks/serve_load.py at 16 clients, at commit 8388b8d (`--threads 2` against `--threads 4`)
        local = {name: m for name, m in self.models.items() if m.model is not None}  # not catalog endpoints
        share = max(1, (cfg.threads or torch.get_num_threads()) // max(1, len(local)))
        self.batchers = {name: Batcher(m.model, self.concurrency, name, share) for name, m in local.items()}
        self._warm_up()
        self.keys = {k.strip() for k in os.environ.get(cfg.api_keys_env, "").split(",") if k.strip()}
        self._setup_router()
        self.started = int(time.time())

    def _warm_up(self) -> None:
        """Short generations per model at batch sizes 1 to max_concurrency: the first requests of a fresh
        process ran several times slower per token than later ones (torch's first calls at each shape; seen at
        commit 3a672eb, before this warm-up)."""
        t0 = time.perf_counter()
        for name in self.batchers:
            m = self.models[name]
            ids = m.tok("The first request warms the model up.").input_ids[: m.context // 2]
            n = min(32, m.context - len(ids))
            for batch in sorted({1, self.concurrency}):
                done = threading.Semaphore(0)
                for k in range(batch):
                    seq = Sequence(m, ids, n - k % 4, 1.0, 1.0, k, [], GenResult())
                    self.batchers[name].submit(seq, lambda kind, v: kind != "piece" and done.release(),
                                               threading.Event())
                for _ in range(batch):
                    done.acquire(timeout=120)
        self.log(f"warmed up {len(self.batchers)} model(s) at batch sizes up to {self.concurrency} in "
                 f"{time.perf_counter() - t0:.1f} s")

    # ---- routing

    def _setup_router(self) -> None:
        from slmforge.serve.router import make_router, read_texts, routing_accuracy

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
            remote = [m.name for m in served.values() if m.model is None]
            if remote:
                raise UserError(f"router.kind bpb scores each model's weights; {', '.join(remote)} is served by "
                                "an endpoint: use router.kind tfidf")
            self.router = make_router("bpb", models={d: (m.model, m.tok, m.context) for d, m in served.items()})
            n_eval = min(30, self.cfg.router.eval_docs)
        test = {}
        for d, m in served.items():
            path = (m.router_data or {}).get("test")
            if path and Path(path).is_file() and n_eval:
                test[d] = read_texts(path, n_eval)
        self.router_report["kind"] = kind
        if test:
            rep = routing_accuracy(self.router, test)
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

    def route(self, prompt: str, chat: bool = False) -> tuple[str | None, dict]:
        """(local model name or None for the remote fallback, the `slmforge` extension record). A chat
        request goes only to models with a chat template (a base model's export has none): among them the
        most likely domain, whose probability must still pass the threshold."""
        if self.router is None:
            name = next(iter(self.by_domain.values()), None) or self.fallback_local
            return name, {"routed": True, "confidence": 1.0, "candidates": {}, "fallback": False}
        scores = self.router.scores(prompt)
        usable = {d: p for d, p in scores.items() if not chat or self.models[self.by_domain[d]].chat} or scores
        top = max(usable, key=usable.get)
        ext = {"routed": True, "router": self.router.kind, "confidence": round(scores[top], 4),
               "candidates": {self.by_domain[d]: round(p, 4) for d, p in scores.items()}, "fallback": False}
        if len(usable) < len(scores):
            ext["chat_models_only"] = True
        if scores[top] < self.cfg.router.threshold and (self.fallback_remote or self.fallback_local):
            ext["fallback"] = True
            return (self.fallback_local if self.fallback_local else None), ext
        ext["fallback"] = self.by_domain[top] == self.fallback_local
        return self.by_domain[top], ext

    def specialist_for(self, prompt: str) -> str:
        """Knowledge mode's specialist for `prompt`: the router's most likely domain among the local models
        that are not the fallback (whatever its confidence)."""
        local = [n for n, m in self.models.items() if n != self.fallback_local and m.model is not None]
        if not local:
            raise ApiError(400, "knowledge mode: no specialist is served (only the fallback)", param="model")
        if self.router is None:
            return local[0]
        scores = {d: p for d, p in self.router.scores(prompt).items() if self.by_domain[d] in local}
        return self.by_domain[max(scores, key=scores.get)] if scores else local[0]

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
        msgs = [{"role": "system" if x.role == "developer" else x.role, "content": x.text()} for x in req.messages]
        return self.template_ids(m, msgs)

    def template_ids(self, m: Served, msgs: list[dict]) -> list[int]:
        """The prompt ids of `msgs` ({role, content}) in m's chat template, ready for the assistant's turn."""
        if not m.chat:
            raise ApiError(400, f"model '{m.name}' has no chat template; use /v1/completions with it",
                           param="model", code="chat_not_supported")
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

    def budget(self, m: Served, ids: list[int], req: Sampling) -> int:
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

