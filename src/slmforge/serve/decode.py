"""One completion's decoding, token by token: sampling (temperature, top-p, its own seeded generator, an
optional grammar), stop sequences, streamed text pieces, token counts and the finish reason. `Sequence` is
driven by the batcher (slmforge.serve.batch), which shares forward passes across requests; `generate` drives
one alone, for warm-up and benchmarks."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from slmforge.serve.models import Served


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


class Sequence:
    """The state of one completion of `ids`: `choose(logits)` picks the next token, `push(token)` takes it
    and returns the text that may be streamed now; `done` is set when it ends (res.finish_reason says why).
    The sampling depends only on this sequence's logits and its own generator, so a seed gives the same text
    whichever other requests share the batch."""

    def __init__(self, m: Served, ids: list[int], max_tokens: int, temperature: float, top_p: float,
                 seed: int | None, stops: list[str], res: GenResult, grammar=None):
        import torch

        self.m, self.ids, self.max_tokens = m, ids, max_tokens
        self.temperature, self.top_p, self.stops, self.res = temperature, top_p, stops, res
        self.grammar = grammar  # a slmforge.serve.structured.Grammar, or None
        self.gen = torch.Generator()
        if seed is None:
            self.gen.seed()
        else:
            self.gen.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
        self.out: list[int] = []
        self.sent = 0
        self.done = max_tokens <= 0
        res.prompt_tokens, res.completion_tokens, res.finish_reason = len(ids), 0, "length"

    def choose(self, logits) -> int:
        """The next token from this sequence's last logits (1-D, float)."""
        import torch

        if self.grammar is not None:
            logits = self.grammar.mask(logits)
        if self.temperature == 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / self.temperature, dim=-1)
        order = None
        if self.top_p < 1.0:
            probs, order = torch.sort(probs, descending=True)
            probs = probs * (torch.cumsum(probs, 0) - probs < self.top_p)  # the smallest prefix reaching top_p
        # inverse-CDF sampling with this sequence's generator, in place of torch.multinomial, which took a
        # quarter of a batched decode step when profiled at commit fae7cd1 (cProfile, 8 sequences; the effect
        # on tokens/s: benchmarks/serve_load.py's 16-client row before and after that commit)
        cdf = torch.cumsum(probs, 0)
        u = torch.rand((), generator=self.gen, dtype=cdf.dtype) * cdf[-1]
        i = min(int(torch.searchsorted(cdf, u, right=True)), len(cdf) - 1)
        return int(order[i]) if order is not None else i

    def push(self, token: int) -> str:
        """Take `token`; the text that can be streamed now ("" while a stop sequence may still begin)."""
        if self.grammar is not None:
            self.grammar.accept(token)
        if token in self.m.eos_ids:
            self.res.completion_tokens = len(self.out) + 1
            self.res.finish_reason, self.done = "stop", True
            return self._rest()
        self.out.append(token)
        self.res.completion_tokens = len(self.out)
        text = self.m.tok.decode(self.out, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.res.finish_reason, self.done = "stop", True
            piece = text[self.sent:cut] if cut > self.sent else ""
            self.sent = len(text)
            return piece
        if len(self.out) >= self.max_tokens:
            self.done = True
            return self._rest(text)
        safe = len(text) - _held_back(text, self.stops)
        if safe > self.sent:
            piece, self.sent = text[self.sent:safe], safe
            return piece
        return ""

    def _rest(self, text: str | None = None) -> str:
        """What is left to stream when the sequence ends (an unfinished UTF-8 character dropped)."""
        if text is None:
            text = self.m.tok.decode(self.out, skip_special_tokens=True)
        text = text.rstrip("\ufffd")
        piece = text[self.sent:] if len(text) > self.sent else ""
        self.sent = max(self.sent, len(text))
        return piece

    def cancel(self) -> None:
        self.res.finish_reason, self.done = "cancelled", True


def generate(m: Served, ids: list[int], max_tokens: int, temperature: float, top_p: float, seed: int | None,
             stops: list[str], res: GenResult, cancel: threading.Event | None = None,
             grammar=None) -> Iterator[str]:
    """Text pieces of the completion of `ids` decoded alone (batch 1) in the calling thread; `res` gets the
    token counts and the finish reason.

    A bare decode loop over the model's forward with a KV cache rather than `model.generate`: it decides stop
    sequences, seeds and streaming per token without a streamer thread, and measured faster per token
    (benchmarks/serve_load.py's decode-speed table; the figures are in the README).
    """
    import torch
    from transformers import DynamicCache

    seq = Sequence(m, ids, max_tokens, temperature, top_p, seed, stops, res, grammar)
    cache = DynamicCache()
    x = torch.tensor([ids], dtype=torch.long, device=m.model.device)
    with torch.inference_mode():
        while not seq.done:
            if cancel is not None and cancel.is_set():
                seq.cancel()
                return
            logits = m.model(input_ids=x, past_key_values=cache, use_cache=True).logits[0, -1].float().cpu()
            token = seq.choose(logits)
            piece = seq.push(token)
            if piece:
                yield piece
            x = torch.tensor([[token]], dtype=torch.long, device=m.model.device)
