"""The expert's model scheduler: every model call, one at a time, decode steps batched.

An expert has one model and one worker thread for it. Two kinds of work wait for it:

- *steps*: one session's pending decode step each. All the steps waiting when the worker turns
  to them (at most ``max_batch``) run as one call of ``run_batch`` (the agent's, which calls
  ``Backend.decode_batch``): sessions join and leave the batch between steps.
- *jobs*: any other call (a prefill, a score, a byte-path rewrite, a speculative draft, a
  warm-up), run alone, in arrival order.

Turns alternate: after a job, the waiting steps go next; after a batch, the next job. So a new
session's prefill (or a long score) holds the others back by at most one call, and a stream of
prefills cannot starve the sessions already decoding, nor they it.

Before a batch the scheduler waits up to ``gather_s`` for the steps of sessions that are expected
to step (``expected()``: the agent's open sessions past their prefill) and are not yet waiting:
their fusion agents send the next step about one bus round trip after the last slice, and a
batch that leaves them out would make them wait a whole batch more. With one session, or when
every expected step is there, nothing waits.

Before ``run`` starts (and after it ends) a call runs directly, still one at a time.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import anyio
import anyio.abc

_S = TypeVar("_S")  # a step's item, what ``run_batch`` reads
_T = TypeVar("_T")  # a step's result
_R = TypeVar("_R")


@dataclass(eq=False, slots=True)
class _Work:
    """One call waiting for the model; its waiter reads ``result()`` once ``done`` is set."""

    done: anyio.Event = field(default_factory=anyio.Event)
    value: Any = None
    error: BaseException | None = None
    dropped: bool = False  # its waiter was cancelled before it ran: skip it
    item: Any = None  # a step's item
    call: Callable[[], Any] | None = None  # a job's call
    abandon: bool = False  # a job's: see ``ModelScheduler.call``

    def settle(self, value: Any = None, error: BaseException | None = None) -> None:
        self.value, self.error = value, error
        self.done.set()

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


class ModelScheduler(Generic[_S, _T]):
    """Runs the agent's model calls: ``call`` for a job, ``step`` for a batchable decode step.

    ``run_batch(items)`` runs in the worker thread and returns one result per item, in order
    (or raises, and every step of the batch gets the error).
    """

    def __init__(
        self,
        run_batch: Callable[[list[_S]], Sequence[_T]],
        *,
        max_batch: int,
        gather_s: float,
        expected: Callable[[], int],
        on_batch: Callable[[int], None] = lambda size: None,
    ) -> None:
        self._run_batch = run_batch
        self.max_batch = max_batch
        self.gather_s = gather_s
        self._expected = expected
        self._on_batch = on_batch
        self._jobs: deque[_Work] = deque()
        self._steps: list[_Work] = []
        self._arrived = anyio.Event()
        self._limiter = anyio.CapacityLimiter(1)
        self._running = False

    @property
    def waiting(self) -> int:
        """Calls waiting for the model: jobs and steps."""
        return len(self._jobs) + len(self._steps) + self._limiter.statistics().tasks_waiting

    async def call(self, call: Callable[[], _R], *, abandon: bool = False) -> _R:
        """Run ``call`` alone in the worker thread, in its turn. ``abandon``: if the agent stops
        while it runs, do not wait for it (its result is dropped)."""
        if not self._running:
            return await self._in_thread(call, abandon=abandon)
        job = _Work(call=call, abandon=abandon)
        self._jobs.append(job)
        result: _R = await self._wait(job)
        return result

    async def step(self, item: _S) -> _T:
        """Run ``item`` in the next batch of steps."""
        if not self._running:
            return (await self._in_thread(lambda: self._run_batch([item])))[0]
        work = _Work(item=item)
        self._steps.append(work)
        result: _T = await self._wait(work)
        return result

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        self._running = True
        task_status.started()
        try:
            batch_next = True
            while True:
                await self._until_work()
                if self._steps and (batch_next or not self._jobs):
                    await self._gather()
                    await self._batch()
                    batch_next = False
                elif self._jobs:
                    await self._job(self._jobs.popleft())
                    batch_next = True
        finally:
            self._running = False

    async def _wait(self, work: _Work) -> Any:
        self._arrived.set()
        try:
            await work.done.wait()
        except BaseException:
            work.dropped = True
            raise
        return work.result()

    async def _until_work(self) -> None:
        while not (self._jobs or self._steps):
            self._arrived = anyio.Event()
            await self._arrived.wait()

    async def _gather(self) -> None:
        """Wait up to ``gather_s`` for the steps of the sessions expected to step."""
        with anyio.move_on_after(self.gather_s):
            while len(self._steps) < min(self.max_batch, self._expected()):
                self._arrived = anyio.Event()
                await self._arrived.wait()

    async def _batch(self) -> None:
        taken = [s for s in self._steps[: self.max_batch] if not s.dropped]
        del self._steps[: self.max_batch]
        if not taken:
            return
        self._on_batch(len(taken))
        items = [s.item for s in taken]
        try:
            results = await self._in_thread(lambda: self._run_batch(items))
        except Exception as exc:  # every session of the batch learns of it
            for work in taken:
                work.settle(error=exc)
            return
        for work, result in zip(taken, results, strict=True):
            work.settle(result)

    async def _job(self, job: _Work) -> None:
        if job.dropped or job.call is None:
            return
        try:
            job.settle(await self._in_thread(job.call, abandon=job.abandon))
        except Exception as exc:
            job.settle(error=exc)

    async def _in_thread(self, call: Callable[[], _R], *, abandon: bool = False) -> _R:
        return await anyio.to_thread.run_sync(
            call, limiter=self._limiter, abandon_on_cancel=abandon
        )
