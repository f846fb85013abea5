"""Continuous batching (slmforge.serve.batch) on the tiny pretrained specialist: batched decoding gives the
tokens decoding alone gives, for greedy and seeded sampling, whoever shares the batch and whenever they join."""

import threading

import pytest

from slmforge.serve.batch import Batcher
from slmforge.serve.decode import GenResult, Sequence, generate
from slmforge.serve.models import load_served

PROMPTS = ["CREATE INDEX builds an index on", "The planner chooses", "VACUUM reclaims storage occupied by dead",
           "A", "Each row of the table has", "SELECT retrieves rows from zero or more tables. The general"]


@pytest.fixture(scope="module")
def served(pretrained):
    _, workdir, result = pretrained
    assert result.returncode == 0, result.stderr[-2000:]
    folder = next(m.parent for m in sorted((workdir / "pretrain").glob("*/manifest.json"))
                  if (m.parent / "specialist").is_dir()) / "specialist"
    return load_served({"name": "spec", "domain": "pg", "path": str(folder)}, "float32")


def _alone(m, prompt, n, temperature=0.0, seed=None, stops=()):
    res = GenResult()
    text = "".join(generate(m, m.tok(prompt).input_ids, n, temperature, 1.0, seed, list(stops), res))
    return text, res


class Collect:
    """What a batched job emits, and an event set when it ends."""

    def __init__(self):
        self.pieces, self.ended, self.error = [], threading.Event(), None

    def __call__(self, kind, value):
        if kind == "piece":
            self.pieces.append(value)
        else:
            self.error = value if kind == "error" else None
            self.ended.set()

    def text(self):
        assert self.ended.wait(60) and self.error is None, self.error
        return "".join(self.pieces)


def _submit(batcher, m, prompt, n, temperature=0.0, seed=None, stops=(), cancel=None):
    res, out = GenResult(), Collect()
    seq = Sequence(m, m.tok(prompt).input_ids, n, temperature, 1.0, seed, list(stops), res)
    batcher.submit(seq, out, cancel or threading.Event())
    return out, res


def test_batched_greedy_and_seeded_decoding_equal_decoding_alone(served):
    m = served
    batcher = Batcher(m.model, max_batch=8, name="t")
    lengths = [12, 5, 20, 9, 16, 3]  # sequences leave the batch at different steps
    want = [_alone(m, p, n) for p, n in zip(PROMPTS, lengths, strict=True)]
    sampled = [_alone(m, p, 10, temperature=0.9, seed=7 + i) for i, p in enumerate(PROMPTS)]
    jobs = [_submit(batcher, m, p, n) for p, n in zip(PROMPTS, lengths, strict=True)]
    jobs += [_submit(batcher, m, p, 10, temperature=0.9, seed=7 + i) for i, p in enumerate(PROMPTS)]
    got = [(out.text(), res) for out, res in jobs]
    for (text, res), (wtext, wres) in zip(got, want + sampled, strict=True):
        assert text == wtext
        assert (res.prompt_tokens, res.completion_tokens, res.finish_reason) == \
            (wres.prompt_tokens, wres.completion_tokens, wres.finish_reason)
    assert batcher.steps > 0 and batcher.batched_tokens > 2 * batcher.steps  # steps really were shared
    for _ in range(500):  # the last one is told it ended just before it leaves the batch
        if not batcher.active:
            break
        threading.Event().wait(0.01)
    assert not batcher.active and batcher.cache is None  # everyone left


def test_a_request_that_joins_a_running_batch_streams_its_own_text(served):
    """A long sequence is decoding when a second one arrives (a shorter prompt, so the caches are padded
    the other way too); both stream exactly what they stream alone. Stops and cancellation work batched."""
    m = served
    batcher = Batcher(m.model, max_batch=4, name="t")
    long_text, _ = _alone(m, PROMPTS[5], 40)
    short_text, _ = _alone(m, PROMPTS[3], 15)
    first, _ = _submit(batcher, m, PROMPTS[5], 40)
    while len(first.pieces) < 5:  # it is running
        assert not first.ended.is_set()
        threading.Event().wait(0.001)
    second, _ = _submit(batcher, m, PROMPTS[3], 15)
    assert second.text() == short_text and first.text() == long_text
    assert len(first.pieces) > 1  # streamed piece by piece

    stop = long_text[8:11]
    cut, res = _submit(batcher, m, PROMPTS[5], 40, stops=[stop])
    assert cut.text() == long_text[: long_text.index(stop)] and res.finish_reason == "stop"
    cancel = threading.Event()
    cancelled, res = _submit(batcher, m, PROMPTS[0], m.context - 16, cancel=cancel)
    cancel.set()
    cancelled.text()
    assert res.finish_reason == "cancelled"
