"""The expert's model scheduler: every model call, one at a time, decode steps batched.

An expert has one model and one worker thread for it. Two kinds of work wait for it:

- *steps*: one session's pending decode step each. All the steps waiting when the worker turns
  to them (at most ``max_batch``) run as one call of ``run_batch`` (the agent's, which calls
  ``Backend.decode_batch``): sessions join and leave the batch between steps.
- *jobs*: any other call (a prefill, a score, a byte-path rewrite, a speculative draft, a
  warm-up), run alone, in arrival order. A *batchable* job (``call_batched``: a new session's
  prefill) runs together with the other batchable jobs of the same runner waiting behind it, as
  one call of that runner (the agent's, which calls ``Backend.prefill_batch``), as many as the
  token budget below allows (the first always).

Turns alternate between a batch of the waiting steps and jobs: after a batch, jobs run until
their time adds up to the batch's (at least one job, and the last one may run past it), then the
waiting steps go next. So the sessions already decoding are held back by new sessions' prefills
(or a score) for about one decode step per step, plus one job at most: a new session's prefill
never holds them back longer than one step, a burst of new sessions is prefilled a few per step
(fewer small batches while they join), and neither kind of work can starve the other. A batch of
prefills is capped so that it holds the decoding sessions back no longer than a job alone could:
its estimated tokens (``cost``) times the seconds per token that batches of prefills have taken
so far must fit in what is left of the last batch's time, or in the time the first prefill
would take alone (measured the same way), whichever is longer; until a batch is measured, a
token in a batch is taken to cost half one alone. When no session is decoding (nothing waits
for the model but new sessions) the cap is ``max_prefill_tokens``. Before taking a batch of
prefills the worker lets the event loop turn a few times while more keep arriving
(microseconds, no timed wait), so a burst of Opens already read from the bus is prefilled as
one batch.

Before a batch the scheduler waits up to ``gather_s`` for the steps of sessions that are expected
to step (``expected()``: the agent's open sessions past their prefill) and are not yet waiting:
their fusion agents send the next step about one bus round trip after the last slice, and a
batch that leaves them out would make them wait a whole batch more. With one session, or when
every expected step is there, nothing waits: a lone session's step runs the moment it arrives.

Before ``run`` starts (and after it ends) a call runs directly, still one at a time.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import anyio
import anyio.abc
import anyio.lowlevel

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
    cleanup: bool = False  # a job of ``call_soon``: run even when the scheduler stops
    running: bool = False  # a job's call is in the worker thread now
    runner: Callable[[list[Any]], Sequence[Any]] | None = None  # a batchable job's runner
    cost: int = 0  # a batchable job's estimated tokens

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
        max_prefill_tokens: int = 4096,
    ) -> None:
        self._run_batch = run_batch
        self.max_batch = max_batch
        self.max_prefill_tokens = max_prefill_tokens
        self._s_per_cost = 0.0  # seconds per token of batches of batchable jobs (average)
        self._s_per_cost_alone = 0.0  # the same, of a batchable job run alone
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
        running = 1 if self._jobs and self._jobs[0].running else 0  # still first in its queue
        return (
            len(self._jobs) - running + len(self._steps) + self._limiter.statistics().tasks_waiting
        )

    async def call(self, call: Callable[[], _R], *, abandon: bool = False) -> _R:
        """Run ``call`` alone in the worker thread, in its turn. ``abandon``: if the agent stops
        while it runs, do not wait for it (its result is dropped)."""
        if not self._running:
            return await self._in_thread(call, abandon=abandon)
        job = _Work(call=call, abandon=abandon)
        self._jobs.append(job)
        result: _R = await self._wait(job)
        return result

    async def call_batched(
        self,
        runner: Callable[[list[Any]], Sequence[_R | BaseException]],
        item: Any,
        *,
        cost: int,
    ) -> _R:
        """Run ``item`` in the worker thread, in its turn, in one call ``runner(items)`` with the
        other items of ``runner`` waiting then (see the module's docstring). ``runner`` returns
        one result per item, in order: an exception in a result is raised to that item's caller
        alone; one it raises reaches every caller of the batch. ``cost``: the item's estimated
        tokens."""
        if not self._running:
            result = (await self._in_thread(lambda: runner([item])))[0]
        else:
            job = _Work(item=item, runner=runner, cost=max(1, cost))
            self._jobs.append(job)
            result = await self._wait(job)
        if isinstance(result, BaseException):
            raise result
        done: _R = result
        return done

    def call_soon(self, call: Callable[[], object]) -> None:
        """Run ``call`` in its turn, with no one waiting for it (freeing a session's cache when
        its task ends, cancelled or not): never beside another model call. If ``run`` is not
        running it runs now; if ``run`` ends first, ``run`` runs it on its way out."""
        if not self._running:
            call()
            return
        self._jobs.append(_Work(call=call, cleanup=True))
        self._arrived.set()

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
            batch_next, batch_s, jobs_s = True, 0.0, 0.0
            while True:
                await self._until_work()
                started = time.perf_counter()
                if self._steps and (batch_next or not self._jobs):
                    await self._gather()
                    started = time.perf_counter()  # the gathering is not the batch's cost
                    await self._batch()
                    batch_next, batch_s, jobs_s = False, time.perf_counter() - started, 0.0
                elif self._jobs and self._jobs[0].runner is not None:
                    await self._settle()
                    budget = self._prefill_budget(batch_s - jobs_s, self._jobs[0].cost)
                    await self._job_batch(budget)
                    jobs_s += time.perf_counter() - started
                    batch_next = jobs_s >= batch_s
                elif self._jobs:
                    await self._job(self._jobs[0])
                    jobs_s += time.perf_counter() - started
                    batch_next = jobs_s >= batch_s
        finally:
            self._running = False
            for job in self._jobs:  # no model call runs now: this one's thread call is done
                if job.cleanup and job.call is not None and not job.done.is_set():
                    job.call()

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
        """Run the first job; it leaves the queue once it is done (or never started)."""
        try:
            if not job.dropped and job.call is not None:
                job.running = True
                job.settle(await self._in_thread(job.call, abandon=job.abandon))
        except Exception as exc:
            job.settle(error=exc)
        self._jobs.popleft()

    async def _settle(self) -> None:
        """A few event-loop turns while more jobs keep arriving (at most 64): the messages
        already read from the bus (a burst of Opens) queue their calls before a batch of them
        is taken. Microseconds; no waiting on time."""
        seen, quiet = len(self._jobs), 0
        for _ in range(64):
            await anyio.lowlevel.checkpoint()
            quiet, seen = (quiet + 1, seen) if len(self._jobs) == seen else (0, len(self._jobs))
            if quiet >= 3:
                return

    def _prefill_budget(self, left_s: float, first: int) -> int:
        """The tokens a batch of batchable jobs may hold this turn (the first job always runs):
        with sessions decoding, what fits in ``left_s`` (the rest of the last batch's time) or
        in the time the first job would take alone, whichever is longer (a job alone could
        always run past the batch's time); with none, ``max_prefill_tokens``."""
        if not (self._steps or self._expected()):
            return self.max_prefill_tokens
        alone = self._s_per_cost_alone or self._s_per_cost
        batched = self._s_per_cost or alone / 2  # until a batch is measured: twice as fast
        if batched <= 0:
            return 0
        allowed_s = max(left_s, first * alone)
        return min(self.max_prefill_tokens, int(allowed_s / batched))

    async def _job_batch(self, budget: int) -> None:
        """Run the first job, a batchable one, with those of its runner waiting behind it that
        fit in ``budget`` tokens; they leave the queue now."""
        first = self._jobs[0]
        runner, taken, total = first.runner, [first], first.cost
        for job in list(self._jobs)[1:]:  # in arrival order, past other kinds of jobs
            if job.runner != runner or job.dropped:  # a bound method is a new object each time
                continue
            if total + job.cost > budget:
                break
            taken.append(job)
            total += job.cost
        for job in taken:
            self._jobs.remove(job)
        taken = [job for job in taken if not job.dropped]
        if runner is None or not taken:
            return
        items = [job.item for job in taken]
        started = time.perf_counter()
        try:
            results = await self._in_thread(lambda: runner(items))
        except Exception as exc:  # every caller of the batch learns of it
            for job in taken:
                job.settle(error=exc)
            return
        per_cost = (time.perf_counter() - started) / sum(job.cost for job in taken)
        if len(taken) == 1:
            self._s_per_cost_alone = _average(self._s_per_cost_alone, per_cost)
        else:
            self._s_per_cost = _average(self._s_per_cost, per_cost)
        for job, result in zip(taken, results, strict=True):
            job.settle(result)

    async def _in_thread(self, call: Callable[[], _R], *, abandon: bool = False) -> _R:
        return await anyio.to_thread.run_sync(
            call, limiter=self._limiter, abandon_on_cancel=abandon
        )


def _average(average: float, sample: float) -> float:
    """A moving average that starts at its first sample."""
    return sample if average <= 0 else (average + sample) / 2
