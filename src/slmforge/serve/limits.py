"""Limits that keep the server up under load: generation slots with a bounded queue (429 beyond it), and the
bridge that hands a generation's pieces from the model's batch thread to the event loop."""

import asyncio
import threading
from collections.abc import AsyncIterator

from slmforge.serve.schemas import ApiError


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


async def take_slot(slots: Slots) -> None:
    """A generation slot, or the OpenAI rate-limit error (429, Retry-After) when the queue is full."""
    try:
        await slots.acquire()
    except Busy as e:
        raise ApiError(429, f"The server is busy: {e}. Retry shortly.", code="rate_limit_exceeded",
                       type_="rate_limit_error", headers={"Retry-After": "1"}) from None


async def in_batch(batcher, seq) -> AsyncIterator[str]:
    """The pieces of `seq` decoded by `batcher` (slmforge.serve.batch), here as they come; closing this
    iterator (client gone) cancels the sequence, which leaves the batch at the next token."""
    async for piece in bridge(lambda put, cancel: batcher.submit(seq, put, cancel)):
        yield piece


async def bridge(start) -> AsyncIterator[str]:
    """`start(put, cancel)` begins work on another thread that calls put("piece", text) per piece, then
    put("end", None) or put("error", exception); the pieces are yielded here, on the event loop."""
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()

    def put(kind, value):
        try:
            loop.call_soon_threadsafe(q.put_nowait, (kind, value))
        except RuntimeError:  # the event loop has closed: nobody is listening any more
            cancel.set()

    start(put, cancel)
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
