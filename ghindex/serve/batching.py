"""Micro-batching: requests that come together become one call in a worker thread.

One `MicroBatcher` per kind of work (searching codes, encoding images). Each request submits its item
and awaits a future; a single worker task takes the first waiting item plus everything else already
waiting (up to `max_size`) and runs ONE call of `run(items)` in a thread: a flat scan or a network
forward is then paid once per batch instead of once per request, and neither ever blocks the event
loop. While that call runs, new requests queue up and form the next batch ("natural" batching: under
load batches grow by themselves, and a lone request never waits for company).

`window_s` > 0 lets a batch also wait, at most that long, for requests that are on their way: with
`expecting()` tickets (requests announce themselves when they arrive, before their input is parsed
and checked) it waits only while announced requests have not submitted yet, so a lone request is
not delayed and a burst is not cut short; without tickets it waits out the window. `window_s=0,
max_size=1` is one-at-a-time serving.
"""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Sequence

log = logging.getLogger(__name__)


class _Ticket:
    """An announced request (see `MicroBatcher.expecting`); a context manager that withdraws it."""

    __slots__ = ("batcher", "live")

    def __init__(self, batcher: "MicroBatcher"):
        self.batcher = batcher
        self.live = True
        batcher.announcing = True
        batcher.coming += 1

    def release(self) -> None:
        if self.live:
            self.live = False
            batcher = self.batcher
            batcher.coming -= 1
            if batcher.coming <= 0:
                batcher._wake()

    def __enter__(self) -> "_Ticket":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@dataclass(slots=True)
class _Pending:
    item: Any
    size: int
    key: Hashable
    future: asyncio.Future


class MicroBatcher:
    """Batch `submit(item)` calls into `run(items) -> results` (one result per item, in order).

    `size(item)`: how much of the batch cap an item takes (e.g. its number of queries). `key(item)`:
    items with different keys never share a call (e.g. different k). A result that is an exception is
    raised to that item's caller only; an exception from `run` goes to every item of the call.
    `on_batch(items, size)` is called on the event loop after each call (metrics). `announced`: every
    request that could join a waiting batch announces itself with `expecting()` (otherwise that is
    assumed from the first announcement on), so a batch never waits when none is announced.
    """

    def __init__(self, run: Callable[[list], Sequence], *, window_s: float = 0.002, max_size: int = 256,
                 size: Callable[[Any], int] = lambda item: 1, key: Callable[[Any], Hashable] = lambda item: None,
                 executor: Executor | None = None, name: str = "batch",
                 on_batch: Callable[[int, int], None] | None = None, announced: bool = False):
        if window_s < 0 or max_size < 1:
            raise ValueError("window_s must be >= 0 and max_size >= 1")
        self.run, self.window_s, self.max_size = run, float(window_s), int(max_size)
        self.size, self.key, self.executor, self.name, self.on_batch = size, key, executor, name, on_batch
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._carry: _Pending | None = None
        self._waiter: asyncio.Future | None = None  # set while the worker waits for more of a batch
        self.coming = 0  # announced requests that have not submitted (or given up) yet
        self.announcing = announced  # whether requests use expecting(): then `coming` bounds the wait
        self.calls = 0  # calls of `run`
        self.items = 0  # items those calls answered

    def _ensure_worker(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._task is None or self._task.done():
            # first use, or a new event loop (test clients may run each request in a fresh one)
            self._loop, self._queue, self._carry, self._waiter = loop, asyncio.Queue(), None, None
            self._task = loop.create_task(self._work(), name=f"ghindex-{self.name}")

    def expecting(self) -> _Ticket:
        """Announce a request that will probably `submit(item, ticket)`: `with batcher.expecting() as
        ticket:`; leaving the block (or submitting) withdraws the announcement."""
        return _Ticket(self)

    def _wake(self) -> None:
        """Wake a worker waiting for more of its batch (an item came, or no announced one is left)."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def submit(self, item, ticket: "_Ticket | None" = None) -> Any:
        """Queue `item` and wait for its result."""
        self._ensure_worker()
        future = self._loop.create_future()
        self._queue.put_nowait(_Pending(item, max(1, int(self.size(item))), self.key(item), future))
        if ticket is not None:
            ticket.release()
        self._wake()
        return await future

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done() and task.get_loop() is asyncio.get_running_loop():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def _wait(self, seconds: float) -> None:
        """Sleep until `_wake()` or for `seconds`, whichever comes first."""
        loop = self._loop
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(seconds, _set_none, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    async def _next_batch(self) -> list[_Pending]:
        queue, loop = self._queue, self._loop
        first = self._carry or await queue.get()
        self._carry = None
        batch, total = [first], first.size
        deadline = None
        while total < self.max_size:
            if queue.empty():
                if self.window_s <= 0 or (self.announcing and self.coming <= 0):
                    break  # nothing more on its way (or no waiting at all): go with what is here
                if deadline is None:
                    deadline = loop.time() + self.window_s
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                await self._wait(remaining)  # an announced request is on its way (or nobody announces)
                continue
            pending = queue.get_nowait()
            if total + pending.size > self.max_size:
                self._carry = pending  # starts the next batch
                break
            batch.append(pending)
            total += pending.size
        return batch

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            groups: dict[Hashable, list[_Pending]] = {}
            for pending in batch:
                groups.setdefault(pending.key, []).append(pending)
            for group in groups.values():
                live = [p for p in group if not p.future.done()]  # callers that gave up are skipped
                if not live:
                    continue
                try:
                    results = await loop.run_in_executor(self.executor, self.run, [p.item for p in live])
                    if len(results) != len(live):
                        raise RuntimeError(f"{self.name}: {len(results)} results for {len(live)} items")
                except asyncio.CancelledError:
                    for p in live:
                        if not p.future.done():
                            p.future.cancel()
                    raise
                except Exception as exc:  # noqa: BLE001 - handed to the callers, who turn it into a response
                    results = [exc] * len(live)
                self.calls += 1
                self.items += len(live)
                if self.on_batch is not None:
                    try:
                        self.on_batch(len(live), sum(p.size for p in live))
                    except Exception:  # noqa: BLE001 - metrics must never stop the worker
                        log.exception("%s: on_batch failed", self.name)
                for p, result in zip(live, results):
                    if p.future.done():
                        continue
                    if isinstance(result, BaseException):
                        p.future.set_exception(result)
                    else:
                        p.future.set_result(result)


def _set_none(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)
