"""Dynamic micro-batching: concurrent requests share one forward pass.

Requests put their images in a queue and await a future.  One worker task takes the oldest image
and gathers more until the batch holds ``max_batch_size`` images or the oldest one has waited
``max_wait_s``, then runs the model on the whole batch in a dedicated thread (so the event loop
keeps accepting and decoding uploads) and hands every image its answer.  While a batch runs, new
images queue up and form the next one; a lone request waits at most ``max_wait_s``.
``max_batch_size = 1`` turns batching off.

When a batch fails, each of its images is run again on its own, so that an input that makes the
model raise fails only its own request (:class:`InferenceFailed`); ``on_failure(all_failed)`` tells the
caller whether anything in the batch could be answered.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Generic, TypeVar

__all__ = ["InferenceFailed", "MicroBatcher", "Overloaded"]

log = logging.getLogger("service.batching")

In = TypeVar("In")
Out = TypeVar("Out")


class Overloaded(RuntimeError):
    """The queue is full: the caller should answer 503 and let the client retry."""


class InferenceFailed(RuntimeError):
    """The model raised on this item, run on its own."""


@dataclass
class _Item(Generic[In]):
    value: Any
    future: asyncio.Future
    enqueued: float = field(default=0.0)


def _shutting_down(items: list[_Item]) -> None:
    """Answer every item still waiting: the worker is being stopped."""
    for item in items:
        if not item.future.done():
            item.future.set_exception(Overloaded("the service is shutting down"))


class MicroBatcher(Generic[In, Out]):
    """Gathers single items into batches for ``infer(list[In]) -> list[Out]`` (same order, same length).

    ``on_batch(size, seconds)`` is called after each batch (for metrics); ``on_failure(all_failed)``
    after each batch that raised, once its items were retried one by one.
    """

    def __init__(
        self,
        infer: Callable[[list[In]], Sequence[Out]],
        max_batch_size: int = 32,
        max_wait_s: float = 0.005,
        max_queue: int = 4096,
        on_batch: Callable[[int, float], None] | None = None,
        on_failure: Callable[[bool], None] | None = None,
    ):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if max_wait_s < 0:
            raise ValueError("max_wait_s must be non-negative")
        self.infer = infer
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.on_batch = on_batch
        self.on_failure = on_failure
        self._pending: deque[_Item] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker on the running event loop."""
        if self._task is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._task = asyncio.create_task(self._run(), name="micro-batcher")

    async def stop(self) -> None:
        """Stop the worker; images still queued get an error."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        while self._pending:
            item = self._pending.popleft()
            if not item.future.done():
                item.future.set_exception(Overloaded("the service is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    async def run_in_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` in the inference thread, between batches (warm-up, thread settings)."""
        if self._executor is None:
            raise RuntimeError("the batcher is not running")
        return await self._loop.run_in_executor(self._executor, partial(fn, *args))

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def queued(self) -> int:
        return len(self._pending)

    # -- submitting ------------------------------------------------------------------------------
    async def submit(self, value: In) -> Out:
        """The answer for one item, computed in some batch."""
        (result,) = await self.submit_many([value])
        return result

    async def submit_many(self, values: Sequence[In]) -> list[Out]:
        """Answers for several items, in order (they may be spread over consecutive batches)."""
        if not self.running:
            raise RuntimeError("the batcher is not running")
        if len(self._pending) + len(values) > self.max_queue:
            raise Overloaded(f"{len(self._pending)} images are already waiting for the model")
        now = self._loop.time()
        items = [_Item(value, self._loop.create_future(), now) for value in values]
        self._pending.extend(items)
        self._wakeup.set()
        try:
            return list(await asyncio.gather(*(item.future for item in items)))
        finally:
            for item in items:  # a cancelled request (client gone) frees its queue places
                if not item.future.done():
                    item.future.cancel()

    # -- the worker ------------------------------------------------------------------------------
    async def _next_batch(self) -> list[_Item]:
        while True:
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            deadline = self._pending[0].enqueued + self.max_wait_s
            while len(self._pending) < self.max_batch_size:
                remaining = deadline - self._loop.time()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch = []
            while self._pending and len(batch) < self.max_batch_size:
                item = self._pending.popleft()
                if not item.future.done():  # skip items whose request was cancelled
                    batch.append(item)
            if batch:
                return batch

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            start = self._loop.time()
            try:
                results = await self._loop.run_in_executor(self._executor, self.infer, [i.value for i in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"infer returned {len(results)} answers for {len(batch)} inputs")
            except asyncio.CancelledError:
                _shutting_down(batch)
                raise
            except Exception as exc:
                log.error("inference failed for a batch of %d: %s: %s", len(batch), type(exc).__name__, exc)
                await self._isolate(batch, exc)
                continue
            elapsed = self._loop.time() - start
            for item, result in zip(batch, results):
                if not item.future.done():
                    item.future.set_result(result)
            if self.on_batch is not None:
                try:
                    self.on_batch(len(batch), elapsed)
                except Exception:  # metrics must never stop the worker
                    log.exception("on_batch callback failed")

    async def _isolate(self, batch: list[_Item], error: Exception) -> None:
        """Run the items of a failed batch one by one: only those the model fails on get the error."""
        failed = 0
        for item in batch:
            if item.future.done():
                continue
            if len(batch) == 1:
                outcome: Exception | Any = error
            else:
                try:
                    (outcome,) = await self._loop.run_in_executor(self._executor, self.infer, [item.value])
                except asyncio.CancelledError:
                    _shutting_down(batch)
                    raise
                except Exception as exc:
                    outcome = exc
            if item.future.done():
                continue
            if isinstance(outcome, Exception):
                failed += 1
                failure = InferenceFailed(f"{type(outcome).__name__}: {outcome}")
                item.future.set_exception(failure)
            else:
                item.future.set_result(outcome)
        if failed:
            log.error("%d of %d images of the batch fail on their own", failed, len(batch))
        if self.on_failure is not None:
            try:
                self.on_failure(failed == len(batch))
            except Exception:
                log.exception("on_failure callback failed")
