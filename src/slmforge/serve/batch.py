"""Continuous batching: the requests to one model share its forward passes.

One thread per model owns the model and a batch of running sequences. Between two decode steps it takes
the requests that arrived, prefills each one's prompt in a step of its own (batch 1, no padding), and joins
its KV cache to the batch's: the caches are left-padded to a common length, an attention mask hides the
padding and each row gets its own position ids, the way transformers' `generate` decodes a left-padded
batch. Each decode step then runs the last token of every sequence in one forward pass; a sequence that
ends (end of text, stop sequence, max_tokens, cancelled) leaves the batch at that token boundary and the
columns that only padding still uses are dropped. Sampling is per sequence (slmforge.serve.decode.Sequence:
its own generator and grammar), so a seed gives the same text alone or batched.

Why our own loop and not transformers' ContinuousBatchingManager (`model.generate_batch`, paged SDPA):
16 greedy sequences of 64 tokens on the demo specialist, 2 cores, second of two runs
(benchmarks/serve_load.py, the batching table): this batcher 1248 tokens/s, generate_batch 177, one
sequence at a time 300. The manager also applies one generation config to the whole batch, while each
request here has its own seed, grammar and stop sequences.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from slmforge.serve.decode import Sequence

log = logging.getLogger(__name__)


@dataclass
class Job:
    seq: Sequence
    emit: Callable[[str, object], None]  # ("piece", text) / ("end", None) / ("error", exception)
    cancel: threading.Event
    last: int = -1  # the token to feed next
    length: int = 0  # real (unpadded) tokens in its cache


class Batcher:
    """The decode thread of one model; `submit` hands it a sequence, whose pieces come back through `emit`."""

    def __init__(self, model, max_batch: int, name: str = "", threads: int | None = None):
        self.model, self.max_batch, self.threads = model, max_batch, threads
        self.incoming: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self.active: list[Job] = []
        self.cache = None  # a transformers DynamicCache of the batch, rows in self.active's order
        self.mask = None  # [batch, cached length] 1 = real token, 0 = left padding
        self.steps = 0  # decode steps run (each one token for every active sequence)
        self.batched_tokens = 0  # tokens made by those steps
        self._thread = threading.Thread(target=self._loop, daemon=True, name=f"slmforge-batch-{name}")
        self._thread.start()

    def submit(self, seq: Sequence, emit: Callable[[str, object], None], cancel: threading.Event) -> None:
        self.incoming.put(Job(seq, emit, cancel))

    # ---- the loop

    def _loop(self) -> None:
        import torch

        torch.set_grad_enabled(False)
        if self.threads:
            torch.set_num_threads(self.threads)  # OpenMP's thread count is this thread's own
        while True:
            new = [] if self.active else [self.incoming.get()]  # idle: wait for work
            while len(self.active) + len(new) < self.max_batch:
                try:
                    new.append(self.incoming.get_nowait())
                except queue.Empty:
                    break
            try:
                with torch.inference_mode():
                    for job in new:
                        self._prefill(job)
                    if self.active:
                        self._step()
            except Exception as e:  # noqa: BLE001 - every waiting request gets the error; the thread lives on
                log.exception("batched decoding failed")
                for job in self.active + [j for j in new if j not in self.active]:
                    job.emit("error", e)
                self.active, self.cache, self.mask = [], None, None

    def _prefill(self, job: Job) -> None:
        import torch
        from transformers import DynamicCache

        seq = job.seq
        if job.cancel.is_set():
            seq.cancel()
            job.emit("end", None)
            return
        if seq.done:  # max_tokens 0
            job.emit("end", None)
            return
        cache = DynamicCache()
        dev = self.model.device
        out = self.model(input_ids=torch.tensor([seq.ids], dtype=torch.long, device=dev), past_key_values=cache,
                         use_cache=True)
        if not self._take(job, out.logits[0, -1].float().cpu()):  # sampling and grammars run on the CPU
            return
        job.length = len(seq.ids)
        self._join(job, cache)

    def _take(self, job: Job, logits) -> bool:
        """Choose and push the next token of `job`; False when the job has ended (and was told so)."""
        seq = job.seq
        try:
            job.last = seq.choose(logits)
            piece = seq.push(job.last)
        except Exception as e:  # noqa: BLE001 - this request fails (its grammar, say); the batch goes on
            log.exception("a sequence failed")
            job.emit("error", e)
            return False
        if piece:
            job.emit("piece", piece)
        if seq.done:
            job.emit("end", None)
            return False
        return True

    def _join(self, job: Job, cache) -> None:
        """Add the prefilled `cache` of `job` to the batch's, left-padding the shorter side."""
        import torch
        import torch.nn.functional as F

        n = job.length
        if self.cache is None:
            self.cache, self.mask, self.active = cache, torch.ones(1, n, dtype=torch.long, device=self.model.device), [job]
            return
        total = self.mask.shape[1]
        width = max(total, n)
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([F.pad(mine.keys, (0, 0, width - total, 0)),
                                   F.pad(theirs.keys, (0, 0, width - n, 0))])
            mine.values = torch.cat([F.pad(mine.values, (0, 0, width - total, 0)),
                                     F.pad(theirs.values, (0, 0, width - n, 0))])
        dev = self.model.device
        row = torch.cat([torch.zeros(1, width - n, dtype=torch.long, device=dev),
                         torch.ones(1, n, dtype=torch.long, device=dev)], 1)
        self.mask = torch.cat([F.pad(self.mask, (width - total, 0)), row])
        self.active.append(job)

    def _step(self) -> None:
        """One token for every active sequence, in one forward pass; ended ones leave the batch."""
        import torch

        keep = []
        for i, job in enumerate(self.active):
            if job.cancel.is_set():
                job.seq.cancel()
                job.emit("end", None)
            else:
                keep.append(i)
        self._keep(keep)
        if not self.active:
            return
        total = self.mask.shape[1]
        dev = self.model.device
        self.mask = torch.cat([self.mask, torch.ones(len(self.active), 1, dtype=torch.long, device=dev)], 1)
        out = self.model(input_ids=torch.tensor([[j.last] for j in self.active], dtype=torch.long, device=dev),
                         attention_mask=self.mask,
                         position_ids=torch.tensor([[j.length] for j in self.active], dtype=torch.long, device=dev),
                         cache_position=torch.tensor([total], dtype=torch.long, device=dev),
                         past_key_values=self.cache, use_cache=True)
        logits = out.logits[:, -1].float().cpu()  # sampling and grammars run on the CPU
        self.steps += 1
        self.batched_tokens += len(self.active)
        keep = []
        for i, job in enumerate(self.active):
            job.length += 1
            if self._take(job, logits[i]):
                keep.append(i)
        self._keep(keep)

    def _keep(self, rows: list[int]) -> None:
        """Only these rows stay in the batch; columns that are padding in every remaining row are dropped."""
        import torch

        if len(rows) == len(self.active):
            return
        self.active = [self.active[i] for i in rows]
        if not rows:
            self.cache, self.mask = None, None
            return
        idx = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        self.mask = self.mask.index_select(0, idx)
        first = int(self.mask.argmax(1).min())  # the earliest real token of any remaining row
        self.mask = self.mask[:, first:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, idx)[:, :, first:]
            layer.values = layer.values.index_select(0, idx)[:, :, first:]
