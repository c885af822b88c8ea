"""Requests that arrive together decode together: an asyncio queue of rows, drained into batches.

The loop waits for a first row, then collects more for up to ``wait_s`` (or until ``max_batch_size`` rows), and
runs the batch in one worker thread while new rows queue up for the next batch. Batches run one at a time, so
the event loop keeps answering (``/health`` included) while the model decodes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

__all__ = ["Batcher"]

RowT = TypeVar("RowT")
ResultT = TypeVar("ResultT")


class Batcher(Generic[RowT, ResultT]):
    """Collects rows into batches for ``run_batch(rows) -> results`` (one result per row, in order)."""

    def __init__(
        self, run_batch: Callable[[list[RowT]], Sequence[ResultT]], max_batch_size: int, wait_s: float
    ):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, rows: Sequence[RowT]) -> list[ResultT]:
        """The results of ``rows`` (each queued on its own: they may land in different batches)."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in rows]
        for row, future in zip(rows, futures, strict=True):
            self._queue.put_nowait((row, future))
        return list(await asyncio.gather(*futures))

    async def _collect(self) -> list[tuple[RowT, asyncio.Future]]:
        # Polls (1 ms) rather than ``wait_for(queue.get(), timeout)``, whose cancellation can drop a row.
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        deadline = loop.time() + self.wait_s
        while len(batch) < self.max_batch_size:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            await asyncio.sleep(min(remaining, 0.001))
        return [(row, future) for row, future in batch if not future.done()]  # done: its client went away

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self._executor, self._run_batch, [r for r, _ in batch])
            except Exception as exc:  # the batch fails, the server goes on
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
