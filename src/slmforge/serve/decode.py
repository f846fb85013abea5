"""The decode loop: a model's completion of token ids, streamed piece by piece, with stop sequences,
seeds and cancellation decided per token."""

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


def generate(m: Served, ids: list[int], max_tokens: int, temperature: float, top_p: float, seed: int | None,
             stops: list[str], res: GenResult, cancel: threading.Event | None = None) -> Iterator[str]:
    """Text pieces of the completion of `ids`; `res` gets the token counts and the finish reason.

    A bare decode loop over the model's forward with a KV cache rather than `model.generate`: it decides stop
    sequences, seeds and streaming per token without a streamer thread, and measured faster per token
    (see the numbers at slmforge.serve.config.DEFAULT_DTYPE: 1.57 vs 2.06 ms/token on the demo model, 2 threads).
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

